// Site statistics: additivity over row blocks and across "ranks", against naive float64 sums.
#include <gtest/gtest.h>

#include "iteris/merge.h"
#include "merge_testutil.h"

using namespace mt;

namespace {
const int D = 19;
}

TEST(Stats, BlocksAndPartialSumsAreAdditive) {
  std::mt19937_64 g(21);
  const int n = 37;
  auto X = randf(g, (size_t)n * D), Xt = randf(g, (size_t)n * D);
  Mat S = mul(to_d(X), to_d(X), D, n, D, true), G = mul(to_d(Xt), to_d(Xt), D, n, D, true),
      C = mul(to_d(X), to_d(Xt), D, n, D, true);
  // one block
  itr_stats one{};
  ASSERT_EQ(itr_stats_init(&one, D, ITR_STATS_FULL_CROSS), ITR_OK);
  ASSERT_EQ(itr_stats_add_x(&one, n, X.data()), ITR_OK);
  ASSERT_EQ(itr_stats_reset_xt(&one), ITR_OK);
  ASSERT_EQ(itr_stats_add_pair(&one, n, X.data(), Xt.data()), ITR_OK);
  itr_stats_finalize(&one);
  EXPECT_LT(rel_diff(Mat(one.gram_x, one.gram_x + D * D), S), 1e-14);
  EXPECT_LT(rel_diff(Mat(one.gram_t, one.gram_t + D * D), G), 1e-14);
  EXPECT_LT(rel_diff(Mat(one.cross, one.cross + D * D), C), 1e-14);
  EXPECT_EQ(one.n_x, n);
  EXPECT_EQ(one.n_t, n);
  // two "ranks" holding rows [0, 13) and [13, 37), fed in uneven blocks, summed before finalize
  itr_stats part[2] = {};
  const int cut = 13, blocks[2] = {4, 7};
  for (int p = 0; p < 2; p++) {
    ASSERT_EQ(itr_stats_init(&part[p], D, ITR_STATS_FULL_CROSS), ITR_OK);
    int lo = p ? cut : 0, hi = p ? n : cut;
    for (int r = lo; r < hi; r += blocks[p]) itr_stats_add_x(&part[p], std::min(blocks[p], hi - r), X.data() + r * D);
    itr_stats_reset_xt(&part[p]);
    for (int r = lo; r < hi; r += blocks[p])
      itr_stats_add_pair(&part[p], std::min(blocks[p], hi - r), X.data() + r * D, Xt.data() + r * D);
  }
  double *b0[3], *b1[3];
  int64_t c0[3], c1[3];
  int nb = itr_stats_additive(&part[0], b0, c0);
  ASSERT_EQ(nb, 3);
  ASSERT_EQ(itr_stats_additive(&part[1], b1, c1), 3);
  for (int k = 0; k < nb; k++) {
    ASSERT_EQ(c0[k], (int64_t)D * D);
    for (int64_t e = 0; e < c0[k]; e++) b0[k][e] += b1[k][e];  // what MPI_SUM does
  }
  part[0].n_x += part[1].n_x, part[0].n_t += part[1].n_t;
  itr_stats_finalize(&part[0]);
  EXPECT_LT(rel_diff(Mat(part[0].gram_x, part[0].gram_x + D * D), Mat(one.gram_x, one.gram_x + D * D)), 1e-13);
  EXPECT_LT(rel_diff(Mat(part[0].gram_t, part[0].gram_t + D * D), Mat(one.gram_t, one.gram_t + D * D)), 1e-13);
  EXPECT_LT(rel_diff(Mat(part[0].cross, part[0].cross + D * D), Mat(one.cross, one.cross + D * D)), 1e-13);
  EXPECT_EQ(part[0].n_x, n);
  itr_stats_finalize(&part[0]);  // idempotent
  EXPECT_LT(rel_diff(Mat(part[0].gram_x, part[0].gram_x + D * D), S), 1e-13);
  itr_stats_fini(&one);
  itr_stats_fini(&part[0]);
  itr_stats_fini(&part[1]);
}

TEST(Stats, FirstIterationAliasesGramX) {
  std::mt19937_64 g(22);
  auto X = randf(g, 300 * D);  // more rows than one conversion chunk
  itr_stats s{};
  ASSERT_EQ(itr_stats_init(&s, D, ITR_STATS_NO_CROSS), ITR_OK);
  ASSERT_EQ(itr_stats_add_x(&s, 300, X.data()), ITR_OK);
  itr_stats_finalize(&s);
  EXPECT_EQ(itr_stats_gram_t(&s), s.gram_x);
  EXPECT_EQ(itr_stats_cross(&s), s.gram_x);
  EXPECT_LT(rel_diff(Mat(s.gram_x, s.gram_x + D * D), mul(to_d(X), to_d(X), D, 300, D, true)), 1e-14);
  EXPECT_EQ(itr_stats_add_pair(&s, 1, X.data(), X.data()), ITR_ERR_INPUT);  // must reset_xt first
  ASSERT_EQ(itr_stats_reset_xt(&s), ITR_OK);
  EXPECT_EQ(s.cross, nullptr);  // NO_CROSS
  EXPECT_NE(itr_stats_gram_t(&s), s.gram_x);
  itr_stats_fini(&s);
}

TEST(Stats, CrossTermsAndNormsMatchNaive) {
  std::mt19937_64 g(23);
  const int n = 11, r = 3, dout = 7;
  auto X = randf(g, (size_t)n * D), Xt = randf(g, (size_t)n * D);
  Mat A = randn(g, (size_t)r * D), W = randn(g, (size_t)dout * D);
  Mat C = mul(to_d(X), to_d(Xt), D, n, D, true);
  Mat P(r * D, 0.0);
  ASSERT_EQ(itr_stats_cross_add(r, D, A.data(), 6, X.data(), Xt.data(), P.data()), ITR_OK);
  ASSERT_EQ(itr_stats_cross_add(r, D, A.data(), n - 6, X.data() + 6 * D, Xt.data() + 6 * D, P.data()), ITR_OK);
  EXPECT_LT(rel_diff(P, mul(A, C, r, D, D)), 1e-13);
  double k2 = 0;
  ASSERT_EQ(itr_stats_cross_norm2_kernel(n, D, X.data(), Xt.data(), &k2), ITR_OK);
  EXPECT_NEAR(k2, fro(C) * fro(C), 1e-11 * k2);
  Mat S = mul(to_d(X), to_d(X), D, n, D, true);
  double xw = 0;
  ASSERT_EQ(itr_stats_xw_norm2(dout, D, S.data(), W.data(), &xw), ITR_OK);
  double direct = std::pow(fro(mul(to_d(X), W, n, D, dout, false, true)), 2);
  EXPECT_NEAR(xw, direct, 1e-11 * direct);
}

TEST(Stats, RejectsBadArguments) {
  itr_stats s{};
  EXPECT_EQ(itr_stats_init(&s, 0, ITR_STATS_FULL_CROSS), ITR_ERR_INPUT);
  EXPECT_EQ(itr_stats_init(&s, 4, 7), ITR_ERR_INPUT);
  EXPECT_EQ(s.gram_x, nullptr);
  itr_alloc_fail_after(1);
  EXPECT_EQ(itr_stats_init(&s, 4, ITR_STATS_FULL_CROSS), ITR_ERR_INTERNAL);
  itr_alloc_fail_after(2);
  EXPECT_EQ(itr_stats_init(&s, 4, ITR_STATS_FULL_CROSS), ITR_ERR_INTERNAL);  // scratch fails, gram freed
  itr_alloc_fail_after(0);
  EXPECT_EQ(s.gram_x, nullptr);
  itr_stats_fini(&s);
}

// Dropping X^T X in an iteration >= 2 (reg_coef 0, c_i given) assembles the same system; with
// reg_coef > 0 it is refused, naming the need.
TEST(StatsDropX, SameSystemWithoutGramX) {
  const int64_t d = 6, T = 9, d_out = 4;
  const int r = 2;
  std::vector<float> x(T * d), xt(T * d);
  std::vector<double> A(r * d), B(d_out * r);
  unsigned s = 7;
  auto rnd = [&s]() { s = s * 1664525u + 1013904223u; return (double)(s >> 8) / 16777216.0 - 0.5; };
  for (auto &v : x) v = (float)rnd();
  for (auto &v : xt) v = (float)rnd();
  for (auto &v : A) v = rnd();
  for (auto &v : B) v = rnd();
  itr_stats full = {}, lean = {};
  ASSERT_EQ(itr_stats_init(&full, d, ITR_STATS_FULL_CROSS), ITR_OK);
  ASSERT_EQ(itr_stats_init(&lean, d, ITR_STATS_FULL_CROSS), ITR_OK);
  EXPECT_EQ(itr_stats_drop_x(&lean), ITR_ERR_INPUT);  // not in iteration 1
  for (itr_stats *st : {&full, &lean}) {
    ASSERT_EQ(itr_stats_reset_xt(st), ITR_OK);
    ASSERT_EQ(itr_stats_add_pair(st, T, x.data(), xt.data()), ITR_OK);
  }
  ASSERT_EQ(itr_stats_add_x(&full, T, x.data()), ITR_OK);
  ASSERT_EQ(itr_stats_drop_x(&lean), ITR_OK);
  EXPECT_EQ(lean.gram_x, nullptr);
  EXPECT_EQ(itr_stats_add_x(&lean, T, x.data()), ITR_ERR_INPUT);
  itr_stats_finalize(&full);
  itr_stats_finalize(&lean);
  double *bufs[3];
  int64_t counts[3];
  EXPECT_EQ(itr_stats_additive(&lean, bufs, counts), 2);
  itr_iteris_opts o;
  itr_iteris_opts_default(&o);
  o.alpha_1 = 1e-3;
  o.alpha_2 = 1e-2;
  itr_merge_task t = {};
  t.r = r, t.scale = 0.5, t.weight = 2.0, t.A = A.data(), t.B = B.data();
  const double c = 0.75;
  itr_system a = {}, b = {};
  t.stats = &full;
  ASSERT_EQ(itr_iteris_assemble(&o, 1, &t, d_out, d, nullptr, &c, "m", &a), ITR_OK);
  t.stats = &lean;
  ASSERT_EQ(itr_iteris_assemble(&o, 1, &t, d_out, d, nullptr, &c, "m", &b), ITR_OK);
  for (int64_t k = 0; k < d * d; k++) EXPECT_EQ(a.T2[k], b.T2[k]);
  for (int64_t k = 0; k < r * d; k++) EXPECT_EQ(a.rhs[k], b.rhs[k]);
  itr_system_fini(&a);
  itr_system_fini(&b);
  o.reg_coef = 0.3;
  EXPECT_EQ(itr_iteris_assemble(&o, 1, &t, d_out, d, nullptr, &c, "m", &b), ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("reg_coef"), std::string::npos);
  itr_stats_fini(&full);
  itr_stats_fini(&lean);
}
