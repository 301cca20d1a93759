// IterIS assembly + local Cholesky solve against the naive dense formula (dgesv) and invariants.
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "iteris/merge.h"
#include "merge_testutil.h"

using namespace mt;

namespace {
const int DOUT = 16, DIN = 24;

struct Problem {
  std::vector<Task> ts;
  std::vector<itr_stats> st;
  std::vector<itr_merge_task> mt;
  Mat W0;
  ~Problem() {
    for (auto &s : st) itr_stats_fini(&s);
  }
};

void build(Problem &p, uint64_t seed, const std::vector<int> &ranks, const std::vector<int> &ns, bool xt_is_x,
           int mode = ITR_STATS_FULL_CROSS, int block = 5) {
  std::mt19937_64 g(seed);
  p.ts = random_tasks(g, DOUT, DIN, ranks, ns, xt_is_x);
  p.W0 = randn(g, (size_t)DOUT * DIN, 0.2);
  make_stats(p.ts, DIN, xt_is_x, mode, block, p.st);
  p.mt = merge_tasks(p.ts, p.st);
}

itr_iteris_opts opts(double a1, double a2, double rho, int pretrain = 0, int adaptive = 1) {
  itr_iteris_opts o;
  itr_iteris_opts_default(&o);
  o.alpha_1 = a1, o.alpha_2 = a2, o.reg_coef = rho, o.with_pretrain = pretrain, o.adaptive = adaptive;
  return o;
}
}  // namespace

TEST(IterIS, DefaultsMatchAlgorithm) {
  itr_iteris_opts o;
  itr_iteris_opts_default(&o);
  EXPECT_EQ(o.alpha_1, 1e-7);
  EXPECT_EQ(o.alpha_2, 1e-7);
  EXPECT_EQ(o.reg_coef, 0.0);
  EXPECT_EQ(o.with_pretrain, 0);
  EXPECT_EQ(o.adaptive, 1);
}

// Fewer tokens than d_in per task, mixed ranks, rsLoRA scalings, manual weights, rho > 0, Xt != X.
TEST(IterIS, MatchesNaiveDenseFormulaWithMixing) {
  Problem p;
  build(p, 1, {2, 3, 4}, {10, 14, 12}, false);
  auto o = opts(1e-3, 2e-3, 0.3);
  itr_update u{};
  itr_system sys{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 3, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "layers.0.q_proj", &u, &sys),
            ITR_OK)
      << itr_error_message();
  NaiveOut ref = naive_iteris(p.ts, DOUT, DIN, p.W0, 1e-3, 2e-3, 0.3, false, true);
  ASSERT_FALSE(ref.dW.empty());
  EXPECT_EQ(u.rank, 9);
  EXPECT_LT(rel_diff(dense_of(u), ref.dW), 1e-9);
  for (int i = 0; i < 3; i++) EXPECT_NEAR(sys.coef[i], ref.cw[i], 1e-10 * ref.cw[i]);
  EXPECT_TRUE(sys.passed);
  EXPECT_LT(sys.residual, ITR_RESIDUAL_THRESHOLD);
  itr_update_fini(&u);
  itr_system_fini(&sys);
}

// Iteration 1 (Xt = X stored once): the mixing is a no-op.
TEST(IterIS, MatchesNaiveFirstIteration) {
  Problem p;
  build(p, 2, {4, 2}, {9, 20}, true);
  auto o = opts(1e-4, 1e-4, 0.5);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 2, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  NaiveOut ref = naive_iteris(p.ts, DOUT, DIN, p.W0, 1e-4, 1e-4, 0.5, false, true);
  EXPECT_LT(rel_diff(dense_of(u), ref.dW), 1e-8);
  itr_update_fini(&u);
}

TEST(IterIS, WithPretrainMatchesNaiveDense) {
  Problem p;
  build(p, 3, {2, 3, 4}, {10, 14, 12}, false);
  auto o = opts(1e-3, 2e-3, 0.2, 1);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 3, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  EXPECT_EQ(u.rank, 0);
  ASSERT_NE(u.dense, nullptr);
  NaiveOut ref = naive_iteris(p.ts, DOUT, DIN, p.W0, 1e-3, 2e-3, 0.2, true, true);
  EXPECT_LT(rel_diff(dense_of(u), ref.dW), 1e-9);
  itr_update_fini(&u);
}

// Memory-light statistics (no X^T Xt): per-module P_i and the kernel norm give the same result.
TEST(IterIS, NoCrossStatisticsMatchFullCross) {
  Problem p;
  build(p, 4, {3, 5}, {11, 13}, false, ITR_STATS_NO_CROSS);
  std::vector<Mat> P(2);
  for (int i = 0; i < 2; i++) {
    const Task &t = p.ts[i];
    P[i].assign((size_t)t.r * DIN, 0.0);
    for (int r0 = 0; r0 < t.n; r0 += 4) {  // additive over blocks
      int k = std::min(4, t.n - r0);
      ASSERT_EQ(itr_stats_cross_add(t.r, DIN, t.A.data(), k, t.X.data() + r0 * DIN, t.Xt.data() + r0 * DIN,
                                    P[i].data()),
                ITR_OK);
    }
    p.mt[i].P = P[i].data();
    ASSERT_EQ(itr_stats_cross_norm2_kernel(t.n, DIN, t.X.data(), t.Xt.data(), &p.mt[i].cross_norm2), ITR_OK);
  }
  auto o = opts(1e-3, 1e-3, 0.0);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 2, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  NaiveOut ref = naive_iteris(p.ts, DOUT, DIN, p.W0, 1e-3, 1e-3, 0.0, false, true);
  EXPECT_LT(rel_diff(dense_of(u), ref.dW), 1e-9);
  itr_update_fini(&u);
  // rho > 0 needs the full cross statistic: refused by name
  o.reg_coef = 0.1;
  EXPECT_EQ(itr_iteris_solve_local(&o, 2, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr),
            ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("FULL_CROSS"), std::string::npos);
}

TEST(IterIS, SingleAdapterWithXtEqualXReturnsIt) {
  Problem p;
  build(p, 5, {4}, {12}, true);
  auto o = opts(1e-9, 1e-9, 0.0);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  Mat dW = mul(p.ts[0].B, p.ts[0].A, DOUT, 4, DIN);
  for (double &x : dW) x *= p.ts[0].scale;
  EXPECT_LT(rel_diff(dense_of(u), dW), 1e-6);
  itr_update_fini(&u);
}

TEST(IterIS, IdenticalAdaptersReturnTheAdapter) {
  Problem p;
  build(p, 6, {3}, {30}, true);
  Task t = p.ts[0];
  p.ts = {t, t, t};
  p.ts[1].weight = 2.0, p.ts[2].weight = 0.5;
  for (auto &s : p.st) itr_stats_fini(&s);
  make_stats(p.ts, DIN, true, ITR_STATS_FULL_CROSS, 7, p.st);
  p.mt = merge_tasks(p.ts, p.st);
  auto o = opts(1e-7, 1e-7, 0.0);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 3, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  Mat dW = mul(t.B, t.A, DOUT, 3, DIN);
  for (double &x : dW) x *= t.scale;
  EXPECT_LT(rel_diff(dense_of(u), dW), 1e-8);
  itr_update_fini(&u);
}

// alpha_1 = alpha_2 = a -> inf: M_i ~ a ||X^T Xt'|| I, G_i ~ a ||Xt'^T Xt'|| I, so
// dW* -> sum_i c_i w_i ||X_i^T Xt_i'||_F dW_i / sum_i c_i w_i ||Xt_i'^T Xt_i'||_F (error O(1/a)).
TEST(IterIS, HugeRidgeTendsToWeightedLinearMerge) {
  Problem p;
  build(p, 7, {2, 3, 4}, {10, 14, 12}, false);
  const double a = 1e9;
  auto o = opts(a, a, 0.25);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 3, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  NaiveOut ref = naive_iteris(p.ts, DOUT, DIN, p.W0, 1.0, 1.0, 0.25, false, true);  // for cw, n1, n2
  Mat lin((size_t)DOUT * DIN, 0.0);
  double den = 0;
  for (int i = 0; i < 3; i++) {
    Mat dW = mul(p.ts[i].B, p.ts[i].A, DOUT, p.ts[i].r, DIN);
    for (size_t k = 0; k < lin.size(); k++) lin[k] += ref.cw[i] * ref.n1[i] * p.ts[i].scale * dW[k];
    den += ref.cw[i] * ref.n2[i];
  }
  for (double &x : lin) x /= den;
  EXPECT_LT(rel_diff(dense_of(u), lin), 1e-6);
  itr_update_fini(&u);
}

// Iteration 1 without adaptive weights is RegMean with the same ridge.
TEST(IterIS, FirstIterationEqualsRegMean) {
  Problem p;
  build(p, 8, {2, 5}, {15, 9}, true);
  for (auto &t : p.mt) t.weight = 1.0;
  auto o = opts(1e-3, 1e-3, 0.0, 0, 0);
  itr_update u{}, v{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 2, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK)
      << itr_error_message();
  itr_system rs{};
  ASSERT_EQ(itr_baseline_regmean_assemble(2, p.mt.data(), DIN, 1.0, 1e-3, "m", &rs), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_system_solve_local(&rs), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_update_from_system(&rs, 2, p.mt.data(), DOUT, nullptr, &v), ITR_OK);
  EXPECT_LT(rel_diff(dense_of(u), dense_of(v)), 1e-12);
  itr_update_fini(&u);
  itr_update_fini(&v);
  itr_system_fini(&rs);
}

// The factored output B* A* is exactly the dense solution; B* = [B_1 .. B_N].
TEST(IterIS, FactoredOutputIsConcatenationAndEqualsDense) {
  Problem p;
  build(p, 9, {1, 3}, {12, 16}, false);
  auto o = opts(1e-3, 1e-3, 0.1);
  itr_update u{};
  ASSERT_EQ(itr_iteris_solve_local(&o, 2, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &u, nullptr), ITR_OK);
  ASSERT_EQ(u.rank, 4);
  for (int r = 0; r < DOUT; r++) {
    EXPECT_EQ(u.B[r * 4 + 0], p.ts[0].B[r]);
    for (int j = 0; j < 3; j++) EXPECT_EQ(u.B[r * 4 + 1 + j], p.ts[1].B[r * 3 + j]);
  }
  NaiveOut ref = naive_iteris(p.ts, DOUT, DIN, p.W0, 1e-3, 1e-3, 0.1, false, true);
  EXPECT_LT(rel_diff(dense_of(u), ref.dW), 1e-9);
  itr_update_fini(&u);
}

// A dimension with no signal and no ridge makes T2 singular: the error names the module and -alpha_2.
TEST(IterIS, NotSpdNamesModuleAndSuggestsAlpha2) {
  Problem p;
  std::mt19937_64 g(10);
  p.ts = random_tasks(g, DOUT, DIN, {2}, {40}, true);
  for (int t = 0; t < 40; t++) p.ts[0].X[(size_t)t * DIN + 5] = 0.0f, p.ts[0].Xt[(size_t)t * DIN + 5] = 0.0f;
  make_stats(p.ts, DIN, true, ITR_STATS_FULL_CROSS, 40, p.st);
  p.mt = merge_tasks(p.ts, p.st);
  auto o = opts(0.0, 0.0, 0.0);
  itr_update u{};
  EXPECT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN, nullptr, nullptr, "layers.7.mlp.down_proj", &u,
                                   nullptr),
            ITR_ERR_NUMERIC);
  std::string m = itr_error_message();
  EXPECT_NE(m.find("layers.7.mlp.down_proj"), std::string::npos) << m;
  EXPECT_NE(m.find("-alpha_2"), std::string::npos) << m;
  EXPECT_EQ(u.A, nullptr);  // out untouched
  o.alpha_2 = 1e-6;
  EXPECT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN, nullptr, nullptr, "x", &u, nullptr), ITR_OK)
      << itr_error_message();
  itr_update_fini(&u);
}

TEST(IterIS, RejectsBadOptionsAndShapes) {
  Problem p;
  build(p, 11, {2}, {10}, true);
  itr_update u{};
  auto o = opts(-1.0, 1e-7, 0.0);
  EXPECT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN, nullptr, nullptr, "m", &u, nullptr), ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("-alpha_1"), std::string::npos);
  o = opts(1e-7, 1e-7, 1.5);
  EXPECT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN, nullptr, nullptr, "m", &u, nullptr), ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("-reg_coef"), std::string::npos);
  o = opts(1e-7, 1e-7, 0.0);
  EXPECT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN + 1, nullptr, nullptr, "m", &u, nullptr),
            ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("d_in"), std::string::npos);
  p.mt[0].weight = 0.0;
  EXPECT_EQ(itr_iteris_solve_local(&o, 1, p.mt.data(), DOUT, DIN, nullptr, nullptr, "m", &u, nullptr), ITR_ERR_INPUT);
}

// The assembled system handed to another solver: transposes round-trip and the check agrees.
TEST(IterIS, AssembledSystemCanBeSolvedElsewhere) {
  Problem p;
  build(p, 12, {2, 2}, {20, 20}, false);
  auto o = opts(1e-3, 1e-3, 0.0);
  itr_system sys{};
  ASSERT_EQ(itr_iteris_assemble(&o, 2, p.mt.data(), DOUT, DIN, p.W0.data(), nullptr, "m", &sys), ITR_OK);
  ASSERT_EQ(sys.nrhs, 4);
  // solve (T2) Y^T = rhs^T with dgesv on the (d_in, R) transposed layout, as the dist layer takes it
  Mat rhsT((size_t)DIN * 4), T2(sys.T2, sys.T2 + DIN * DIN), rhs0(sys.rhs, sys.rhs + 4 * DIN);
  itr_system_transpose(4, DIN, sys.rhs, rhsT.data());
  std::vector<lapack_int> piv(DIN);
  ASSERT_EQ(LAPACKE_dgesv(LAPACK_ROW_MAJOR, DIN, 4, T2.data(), DIN, piv.data(), rhsT.data(), 4), 0);
  Mat Y(4 * DIN);
  itr_system_transpose(DIN, 4, rhsT.data(), Y.data());
  ASSERT_EQ(itr_system_check(&sys, Y.data(), rhs0.data()), ITR_OK);
  EXPECT_TRUE(sys.passed);
  ASSERT_EQ(itr_system_solve_local(&sys), ITR_OK);
  EXPECT_LT(rel_diff(Mat(sys.rhs, sys.rhs + 4 * DIN), Y), 1e-9);
  itr_system_fini(&sys);
}
