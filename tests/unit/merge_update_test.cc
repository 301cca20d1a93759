// Merged-update outputs: rank-k truncation through the small factors vs LAPACKE_dgesvd directly,
// and the local solve leaving T2 intact.
#include <gtest/gtest.h>

#include "iteris/merge.h"
#include "merge_testutil.h"

using namespace mt;

namespace {
// best rank-k approximation of D (m, n) by a direct dgesvd; energy kept in *frac
Mat svd_truncate(const Mat &D, int m, int n, int k, double *frac) {
  Mat a = D;
  int p = std::min(m, n);
  Mat s(p), u((size_t)m * p), vt((size_t)p * n), sup(p);
  EXPECT_EQ(LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'S', m, n, a.data(), n, s.data(), u.data(), p, vt.data(), n,
                           sup.data()),
            0);
  Mat out((size_t)m * n, 0.0);
  double tot = 0, kept = 0;
  for (int j = 0; j < p; j++) tot += s[j] * s[j];
  for (int j = 0; j < k && j < p; j++) {
    kept += s[j] * s[j];
    for (int i = 0; i < m; i++)
      for (int c = 0; c < n; c++) out[(size_t)i * n + c] += u[(size_t)i * p + j] * s[j] * vt[(size_t)j * n + c];
  }
  *frac = kept / tot;
  return out;
}
}  // namespace

TEST(MergeUpdate, FactoredTruncationMatchesDenseSvd) {
  std::mt19937_64 g(31);
  const int dout = 13, din = 17, R = 9;
  itr_update u{};
  u.d_out = dout, u.d_in = din, u.rank = R, u.energy_kept = 1;
  Mat B = randn(g, (size_t)dout * R), A = randn(g, (size_t)R * din);
  u.B = B.data(), u.A = A.data();
  Mat D = mul(B, A, dout, R, din);
  for (int k : {1, 4, 9, 12}) {
    itr_update t{};
    ASSERT_EQ(itr_update_truncate(&u, k, &t), ITR_OK) << itr_error_message();
    EXPECT_EQ(t.rank, k);
    double frac;
    Mat ref = svd_truncate(D, dout, din, k, &frac);
    EXPECT_LT(rel_diff(dense_of(t), ref), 1e-12) << "k = " << k;
    EXPECT_NEAR(t.energy_kept, frac, 1e-13);
    itr_update_fini(&t);
  }
  // R larger than d_out (more stacked ranks than outputs)
  const int R2 = 20;
  Mat B2 = randn(g, (size_t)dout * R2), A2 = randn(g, (size_t)R2 * din);
  u.rank = R2, u.B = B2.data(), u.A = A2.data();
  itr_update t{};
  ASSERT_EQ(itr_update_truncate(&u, 5, &t), ITR_OK);
  double frac;
  EXPECT_LT(rel_diff(dense_of(t), svd_truncate(mul(B2, A2, dout, R2, din), dout, din, 5, &frac)), 1e-12);
  EXPECT_NEAR(t.energy_kept, frac, 1e-13);
  itr_update_fini(&t);
}

TEST(MergeUpdate, DenseTruncationMatchesDenseSvd) {
  std::mt19937_64 g(32);
  const int dout = 11, din = 8;
  Mat D = randn(g, (size_t)dout * din);
  itr_update u{};
  u.d_out = dout, u.d_in = din, u.rank = 0, u.dense = D.data();
  itr_update t{};
  ASSERT_EQ(itr_update_truncate(&u, 3, &t), ITR_OK);
  double frac;
  EXPECT_LT(rel_diff(dense_of(t), svd_truncate(D, dout, din, 3, &frac)), 1e-12);
  EXPECT_NEAR(t.energy_kept, frac, 1e-13);
  EXPECT_LT(t.energy_kept, 1.0);
  itr_update_fini(&t);
  EXPECT_EQ(itr_update_truncate(&u, 0, &t), ITR_ERR_INPUT);
}

TEST(MergeSystem, LocalSolveRestoresT2AndChecksResidual) {
  std::mt19937_64 g(33);
  const int d = 30, m = 5;
  Mat Q = randn(g, (size_t)d * d);
  Mat T2 = mul(Q, Q, d, d, d, true);
  for (int i = 0; i < d; i++) T2[(size_t)i * d + i] += 0.1;
  Mat rhs = randn(g, (size_t)m * d);
  itr_system s{};
  s.d_in = d, s.nrhs = m;
  snprintf(s.label, sizeof s.label, "test");
  ASSERT_EQ(itr_calloc(d * d, sizeof(double), "t", &s.T2), ITR_OK);
  ASSERT_EQ(itr_calloc(m * d, sizeof(double), "r", &s.rhs), ITR_OK);
  memcpy(s.T2, T2.data(), T2.size() * sizeof(double));
  memcpy(s.rhs, rhs.data(), rhs.size() * sizeof(double));
  ASSERT_EQ(itr_system_solve_local(&s), ITR_OK) << itr_error_message();
  EXPECT_EQ(memcmp(s.T2, T2.data(), T2.size() * sizeof(double)), 0);  // bit for bit
  EXPECT_TRUE(s.passed);
  Mat Y(s.rhs, s.rhs + m * d);
  Mat back = mul(Y, T2, m, d, d);
  EXPECT_LT(rel_diff(back, rhs), 1e-10);
  // a wrong Y fails the check
  Y[3] += 1.0;
  ASSERT_EQ(itr_system_check(&s, Y.data(), rhs.data()), ITR_OK);
  EXPECT_FALSE(s.passed);
  EXPECT_EQ(itr_system_solve_local(&s), ITR_ERR_INPUT);  // already solved
  itr_system_fini(&s);
}

// The change between two iterations' updates, ||now - before|| / ||now||, against the dense matrices
// formed here: with the same B (IterIS's B* = [B_1 | ... | B_N], through A_now - A_before), with different
// factors, and dense; an empty earlier update gives NaN.
TEST(MergeUpdate, ChangeBetweenIterationsMatchesDenseDifference) {
  std::mt19937_64 g(11);
  const int m = 7, n = 9, r = 3;
  Mat B = randn(g, (size_t)m * r), A1 = randn(g, (size_t)r * n), A2 = A1, B2 = randn(g, (size_t)m * r);
  for (size_t q = 0; q < A2.size(); q++) A2[q] += 1e-6 * (double)((q * 7) % 5);  // a small change
  auto fac = [&](Mat &b, Mat &a) {
    itr_update u{};
    u.d_out = m, u.d_in = n, u.rank = r, u.B = b.data(), u.A = a.data();
    return u;
  };
  auto want = [&](const Mat &Dn, const Mat &Db) {
    Mat d(Dn.size());
    for (size_t q = 0; q < d.size(); q++) d[q] = Dn[q] - Db[q];
    return fro(d) / fro(Dn);
  };
  itr_update now = fac(B, A2), same_b = fac(B, A1), other_b = fac(B2, A1);
  double rel = 0;
  ASSERT_EQ(itr_update_change(&now, &same_b, &rel), ITR_OK);
  const double w1 = want(mul(B, A2, m, r, n), mul(B, A1, m, r, n));
  EXPECT_GT(w1, 1e-8);
  EXPECT_NEAR(rel, w1, 1e-9 * w1) << "same B: exact through A_now - A_before";
  ASSERT_EQ(itr_update_change(&now, &other_b, &rel), ITR_OK);
  const double w2 = want(mul(B, A2, m, r, n), mul(B2, A1, m, r, n));
  EXPECT_NEAR(rel, w2, 1e-12 * w2);
  Mat D1 = mul(B, A2, m, r, n), D2 = mul(B2, A1, m, r, n);
  itr_update dn{}, db{};
  dn.d_out = db.d_out = m, dn.d_in = db.d_in = n, dn.dense = D1.data(), db.dense = D2.data();
  ASSERT_EQ(itr_update_change(&dn, &db, &rel), ITR_OK);
  EXPECT_NEAR(rel, w2, 1e-12 * w2) << "dense";
  itr_update empty{};
  empty.d_out = m, empty.d_in = n;
  ASSERT_EQ(itr_update_change(&now, &empty, &rel), ITR_OK);
  EXPECT_TRUE(std::isnan(rel));
}
