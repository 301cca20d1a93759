// Baselines: TIES on a hand-made example, task arithmetic, RegMean vs a naive solve, DARE,
// KnOTS vs a dense SVD of the concatenation.
#include <gtest/gtest.h>

#include "iteris/merge.h"
#include "merge_testutil.h"

using namespace mt;

TEST(Baseline, TiesHandMade2x2) {
  // task 1 [[1, -2], [3, 0.5]], task 2 [[-4, 1], [2, -0.1]]; density 0.5 keeps 2 of 4 each:
  // t1 = [[0, -2], [3, 0]], t2 = [[-4, 0], [2, 0]]; sum [[-4, -2], [5, 0]] elects [-, -, +, none];
  // disjoint means: -4, -2, (3 + 2) / 2 = 2.5, 0; times lambda 0.5.
  const double a[4] = {1, -2, 3, 0.5}, b[4] = {-4, 1, 2, -0.1};
  const double *dW[2] = {a, b};
  double out[4];
  ASSERT_EQ(itr_baseline_ties(2, 4, dW, nullptr, 0.5, 0.5, out), ITR_OK);
  EXPECT_DOUBLE_EQ(out[0], -2.0);
  EXPECT_DOUBLE_EQ(out[1], -1.0);
  EXPECT_DOUBLE_EQ(out[2], 1.25);
  EXPECT_DOUBLE_EQ(out[3], 0.0);
  // density 1: nothing trimmed; entry 1: sum -1 elects '-', only -2 agrees
  ASSERT_EQ(itr_baseline_ties(2, 4, dW, nullptr, 1.0, 1.0, out), ITR_OK);
  EXPECT_DOUBLE_EQ(out[0], -4.0);
  EXPECT_DOUBLE_EQ(out[1], -2.0);
  EXPECT_DOUBLE_EQ(out[2], 2.5);
  EXPECT_DOUBLE_EQ(out[3], 0.5);
  EXPECT_EQ(itr_baseline_ties(2, 4, dW, nullptr, 0.0, 1.0, out), ITR_ERR_INPUT);
}

TEST(Baseline, TiesKeepsExactlyTopFractionWithTies) {
  const double a[5] = {1, 1, 1, 1, 1};
  const double *dW[1] = {a};
  double out[5];
  ASSERT_EQ(itr_baseline_ties(1, 5, dW, nullptr, 0.4, 1.0, out), ITR_OK);  // 2 of 5, lower index first
  EXPECT_EQ(out[0] + out[1] + out[2] + out[3] + out[4], 2.0);
  EXPECT_EQ(out[0], 1.0);
  EXPECT_EQ(out[1], 1.0);
}

TEST(Baseline, TaskArithmeticIsExactConcatenation) {
  std::mt19937_64 g(41);
  const int dout = 9, din = 11;
  auto ts = random_tasks(g, dout, din, {2, 3}, {5, 5}, true);
  std::vector<itr_stats> st(2);
  auto mt = merge_tasks(ts, st);
  itr_update u{};
  ASSERT_EQ(itr_baseline_task_arithmetic(2, mt.data(), dout, din, 0.7, &u), ITR_OK);
  EXPECT_EQ(u.rank, 5);
  Mat ref((size_t)dout * din, 0.0);
  for (auto &t : ts) {
    Mat d = mul(t.B, t.A, dout, t.r, din);
    for (size_t k = 0; k < ref.size(); k++) ref[k] += 0.7 * t.weight * t.scale * d[k];
  }
  EXPECT_LT(rel_diff(dense_of(u), ref), 1e-14);
  itr_update_fini(&u);
}

TEST(Baseline, RegMeanMatchesNaiveSolve) {
  std::mt19937_64 g(42);
  const int dout = 7, din = 10;
  auto ts = random_tasks(g, dout, din, {2, 3}, {30, 25}, true);
  std::vector<itr_stats> st;
  make_stats(ts, din, true, ITR_STATS_FULL_CROSS, 8, st);
  auto mt = merge_tasks(ts, st);
  const double ra = 0.7;
  itr_system sys{};
  ASSERT_EQ(itr_baseline_regmean_assemble(2, mt.data(), din, ra, 0.0, "m", &sys), ITR_OK);
  ASSERT_EQ(itr_system_solve_local(&sys), ITR_OK) << itr_error_message();
  itr_update u{};
  ASSERT_EQ(itr_update_from_system(&sys, 2, mt.data(), dout, nullptr, &u), ITR_OK);
  Mat T1((size_t)dout * din, 0.0), T2((size_t)din * din, 0.0);
  for (auto &t : ts) {
    Mat Gr = mul(to_d(t.X), to_d(t.X), din, t.n, din, true);
    for (int i = 0; i < din; i++)
      for (int j = 0; j < din; j++)
        if (i != j) Gr[(size_t)i * din + j] *= ra;
    Mat d = mul(t.B, t.A, dout, t.r, din);
    for (double &x : d) x *= t.scale;
    Mat dG = mul(d, Gr, dout, din, din);
    for (size_t k = 0; k < T1.size(); k++) T1[k] += dG[k];
    for (size_t k = 0; k < T2.size(); k++) T2[k] += Gr[k];
  }
  EXPECT_LT(rel_diff(dense_of(u), right_solve(T1, T2, dout, din)), 1e-10);
  itr_update_fini(&u);
  itr_system_fini(&sys);
  for (auto &s : st) itr_stats_fini(&s);
}

TEST(Baseline, DareIsDeterministicAndRescales) {
  std::mt19937_64 g(43);
  const int n = 20000;
  Mat a = randn(g, n), b = randn(g, n);
  const double *dW[2] = {a.data(), b.data()};
  Mat o1(n), o2(n), o3(n);
  ASSERT_EQ(itr_baseline_dare(2, n, dW, nullptr, 0.9, 0, 1.0, 1.0, 7, itr_hash64("layers.0.q_proj"), o1.data()),
            ITR_OK);
  ASSERT_EQ(itr_baseline_dare(2, n, dW, nullptr, 0.9, 0, 1.0, 1.0, 7, itr_hash64("layers.0.q_proj"), o2.data()),
            ITR_OK);
  EXPECT_EQ(o1, o2);
  ASSERT_EQ(itr_baseline_dare(2, n, dW, nullptr, 0.9, 0, 1.0, 1.0, 8, itr_hash64("layers.0.q_proj"), o3.data()),
            ITR_OK);
  EXPECT_NE(o1, o3);
  // single task: survivors are exactly 10 x the input, about 10% survive
  const double *one[1] = {a.data()};
  ASSERT_EQ(itr_baseline_dare(1, n, one, nullptr, 0.9, 0, 1.0, 1.0, 7, 0, o1.data()), ITR_OK);
  int kept = 0;
  for (int k = 0; k < n; k++)
    if (o1[k] != 0) {
      kept++;
      EXPECT_DOUBLE_EQ(o1[k], a[k] / (1.0 - 0.9));
    }
  EXPECT_NEAR(kept / (double)n, 0.1, 0.01);
  // p = 0 is task arithmetic; p = 0 with ties is ties
  ASSERT_EQ(itr_baseline_dare(2, n, dW, nullptr, 0.0, 0, 1.0, 0.5, 7, 0, o1.data()), ITR_OK);
  for (int k = 0; k < n; k++) ASSERT_DOUBLE_EQ(o1[k], 0.5 * (a[k] + b[k]));
  ASSERT_EQ(itr_baseline_dare(2, n, dW, nullptr, 0.0, 1, 0.3, 1.0, 7, 0, o1.data()), ITR_OK);
  ASSERT_EQ(itr_baseline_ties(2, n, dW, nullptr, 0.3, 1.0, o2.data()), ITR_OK);
  EXPECT_EQ(o1, o2);
  EXPECT_EQ(itr_baseline_dare(2, n, dW, nullptr, 1.0, 0, 1.0, 1.0, 7, 0, o1.data()), ITR_ERR_INPUT);
}

TEST(Baseline, KnotsWithTaskArithmeticIsTaskArithmetic) {
  std::mt19937_64 g(44);
  const int dout = 10, din = 12;
  auto ts = random_tasks(g, dout, din, {2, 4, 3}, {5, 5, 5}, true);
  std::vector<itr_stats> st(3);
  auto mt = merge_tasks(ts, st);
  itr_update k{}, t{};
  ASSERT_EQ(itr_baseline_knots(3, mt.data(), dout, din, 0, 1.0, 0.8, &k), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_baseline_task_arithmetic(3, mt.data(), dout, din, 0.8, &t), ITR_OK);
  EXPECT_EQ(k.rank, 9);
  EXPECT_LT(rel_diff(dense_of(k), dense_of(t)), 1e-12);
  itr_update_fini(&k);
  itr_update_fini(&t);
}

// KnOTS-TIES against a dense reference: dgesvd of [dW_1 | dW_2] (d_out, 2 d_in), TIES on the
// per-task blocks of V^T, rebuild U S V^T (invariant under the SVD's sign choices).
TEST(Baseline, KnotsTiesMatchesDenseSvdReference) {
  std::mt19937_64 g(45);
  const int dout = 8, din = 6, N = 2;
  auto ts = random_tasks(g, dout, din, {2, 3}, {5, 5}, true);
  std::vector<itr_stats> st(N);
  auto mt = merge_tasks(ts, st);
  itr_update k{};
  ASSERT_EQ(itr_baseline_knots(N, mt.data(), dout, din, 1, 0.5, 1.0, &k), ITR_OK) << itr_error_message();
  const int nc = N * din, p = std::min(dout, nc);
  Mat cat((size_t)dout * nc);
  for (int i = 0; i < N; i++) {
    Mat d = mul(ts[i].B, ts[i].A, dout, ts[i].r, din);
    for (int o = 0; o < dout; o++)
      for (int c = 0; c < din; c++) cat[(size_t)o * nc + i * din + c] = ts[i].scale * d[(size_t)o * din + c];
  }
  Mat s(p), u((size_t)dout * p), vt((size_t)p * nc), sup(p);
  ASSERT_EQ(LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'S', dout, nc, cat.data(), nc, s.data(), u.data(), p, vt.data(), nc,
                           sup.data()),
            0);
  const int rk = 5;  // R = 5 < min(dout, nc)
  EXPECT_EQ(k.rank, rk);
  std::vector<Mat> V(N, Mat((size_t)rk * din));
  for (int i = 0; i < N; i++)
    for (int j = 0; j < rk; j++)
      for (int c = 0; c < din; c++) V[i][(size_t)j * din + c] = vt[(size_t)j * nc + i * din + c];
  const double *vp[2] = {V[0].data(), V[1].data()};
  const double w[2] = {ts[0].weight, ts[1].weight};
  Mat merged((size_t)rk * din);
  ASSERT_EQ(itr_baseline_ties(N, rk * din, vp, w, 0.5, 1.0, merged.data()), ITR_OK);
  Mat US((size_t)dout * rk);
  for (int o = 0; o < dout; o++)
    for (int j = 0; j < rk; j++) US[(size_t)o * rk + j] = u[(size_t)o * p + j] * s[j];
  EXPECT_LT(rel_diff(dense_of(k), mul(US, merged, dout, rk, din)), 1e-10);
  itr_update_fini(&k);
}
