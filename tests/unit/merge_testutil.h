// Shared helpers of the merge tests: random problems and naive float64 references (plain loops
// plus LAPACKE_dgesv), written independently of src/merge.
#ifndef ITERIS_TESTS_MERGE_TESTUTIL_H
#define ITERIS_TESTS_MERGE_TESTUTIL_H

#include <lapacke.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "iteris/merge.h"

namespace mt {

using Mat = std::vector<double>;  // row-major

inline Mat randn(std::mt19937_64 &g, size_t n, double sd = 1.0) {
  std::normal_distribution<double> d(0.0, sd);
  Mat m(n);
  for (auto &x : m) x = d(g);
  return m;
}
// float-valued random data (so f32 inputs and f64 references see the same numbers)
inline std::vector<float> randf(std::mt19937_64 &g, size_t n, double sd = 1.0) {
  std::normal_distribution<double> d(0.0, sd);
  std::vector<float> m(n);
  for (auto &x : m) x = (float)d(g);
  return m;
}
inline Mat to_d(const std::vector<float> &f) { return Mat(f.begin(), f.end()); }

// C (m, n) = op(A) op(B), naive
inline Mat mul(const Mat &A, const Mat &B, int m, int k, int n, bool ta = false, bool tb = false) {
  Mat C((size_t)m * n, 0.0);
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double s = 0;
      for (int l = 0; l < k; l++) {
        double a = ta ? A[(size_t)l * m + i] : A[(size_t)i * k + l];
        double b = tb ? B[(size_t)j * k + l] : B[(size_t)l * n + j];
        s += a * b;
      }
      C[(size_t)i * n + j] = s;
    }
  return C;
}
inline double fro(const Mat &A) {
  double s = 0;
  for (double x : A) s += x * x;
  return std::sqrt(s);
}
inline double rel_diff(const Mat &A, const Mat &B) {
  Mat D(A.size());
  for (size_t i = 0; i < A.size(); i++) D[i] = A[i] - B[i];
  double n = fro(B);
  return n > 0 ? fro(D) / n : fro(D);
}

// Solves Z T2 = T1 for Z (T2 symmetric): Z = T1 T2^{-1}, via dgesv on T2 Z^T = T1^T.
inline Mat right_solve(const Mat &T1, const Mat &T2, int m, int d) {
  Mat A = T2;
  Mat B((size_t)d * m);
  for (int i = 0; i < m; i++)
    for (int j = 0; j < d; j++) B[(size_t)j * m + i] = T1[(size_t)i * d + j];
  std::vector<lapack_int> piv(d);
  lapack_int info = LAPACKE_dgesv(LAPACK_ROW_MAJOR, d, m, A.data(), d, piv.data(), B.data(), m);
  if (info != 0) return Mat();
  Mat Z((size_t)m * d);
  for (int i = 0; i < m; i++)
    for (int j = 0; j < d; j++) Z[(size_t)i * d + j] = B[(size_t)j * m + i];
  return Z;
}

struct Task {
  int r, n;
  double scale, weight;
  Mat A, B;                  // (r, d_in), (d_out, r)
  std::vector<float> X, Xt;  // (n, d_in) f32
};

// The IterIS formula of ALGORITHM.md, naively: explicit Xt', C, G, T1, T2, dgesv.
struct NaiveOut {
  Mat dW;
  std::vector<double> cw, n1, n2;  // c_i w_i, ||X^T Xt'||, ||Xt'^T Xt'||
};
inline NaiveOut naive_iteris(const std::vector<Task> &ts, int d_out, int d_in, const Mat &W0,
                             double a1, double a2, double rho, bool pretrain, bool adaptive) {
  NaiveOut o;
  Mat T1((size_t)d_out * d_in, 0.0), T2((size_t)d_in * d_in, 0.0);
  for (const Task &t : ts) {
    Mat X = to_d(t.X), Xt = to_d(t.Xt);
    for (size_t k = 0; k < Xt.size(); k++) Xt[k] = (1 - rho) * Xt[k] + rho * X[k];
    Mat dW = t.r ? mul(t.B, t.A, d_out, t.r, d_in) : Mat((size_t)d_out * d_in, 0.0);
    for (double &x : dW) x *= t.scale;
    Mat W = dW;
    for (size_t k = 0; k < W.size(); k++) W[k] += W0.empty() ? 0.0 : W0[k];
    double c = 1.0;
    if (adaptive) {
      Mat XW = mul(to_d(t.X), W, t.n, d_in, d_out, false, true);
      c = std::pow(fro(W), 2) / std::pow(fro(XW), 2);
    }
    const double cw = c * t.weight;
    Mat C = mul(X, Xt, d_in, t.n, d_in, true, false);
    Mat G = mul(Xt, Xt, d_in, t.n, d_in, true, false);
    double n1 = fro(C), n2 = fro(G);
    for (int i = 0; i < d_in; i++) C[(size_t)i * d_in + i] += a1 * n1, G[(size_t)i * d_in + i] += a2 * n2;
    Mat F = pretrain ? W : dW;
    Mat FM = mul(F, C, d_out, d_in, d_in);
    for (size_t k = 0; k < T1.size(); k++) T1[k] += cw * FM[k];
    for (size_t k = 0; k < T2.size(); k++) T2[k] += cw * G[k];
    o.cw.push_back(cw), o.n1.push_back(n1), o.n2.push_back(n2);
  }
  o.dW = right_solve(T1, T2, d_out, d_in);
  if (pretrain && !o.dW.empty() && !W0.empty())
    for (size_t k = 0; k < o.dW.size(); k++) o.dW[k] -= W0[k];
  return o;
}

inline std::vector<Task> random_tasks(std::mt19937_64 &g, int d_out, int d_in, const std::vector<int> &ranks,
                                      const std::vector<int> &ns, bool xt_is_x) {
  std::vector<Task> ts;
  for (size_t i = 0; i < ranks.size(); i++) {
    Task t;
    t.r = ranks[i];
    t.n = ns[i];
    t.scale = (8.0 + 4.0 * i) / std::sqrt((double)t.r);  // rsLoRA-style scaling
    t.weight = 1.0 + 0.5 * i;
    t.A = randn(g, (size_t)t.r * d_in, 0.3);
    t.B = randn(g, (size_t)d_out * t.r, 0.1);
    t.X = randf(g, (size_t)t.n * d_in);
    if (xt_is_x) {
      t.Xt = t.X;
    } else {
      t.Xt = t.X;
      std::normal_distribution<double> nd(0.0, 0.3);
      for (auto &x : t.Xt) x = (float)(x + nd(g));
    }
    ts.push_back(t);
  }
  return ts;
}

// Statistics for every task, fed in blocks of `block` rows; iteration 1 when xt_is_x.
inline void make_stats(const std::vector<Task> &ts, int d_in, bool xt_is_x, int mode, int block,
                       std::vector<itr_stats> &st) {
  st.assign(ts.size(), itr_stats{});
  for (size_t i = 0; i < ts.size(); i++) {
    itr_stats_init(&st[i], d_in, mode);
    const Task &t = ts[i];
    for (int r0 = 0; r0 < t.n; r0 += block) {
      int k = std::min(block, t.n - r0);
      itr_stats_add_x(&st[i], k, t.X.data() + (size_t)r0 * d_in);
    }
    if (!xt_is_x) {
      itr_stats_reset_xt(&st[i]);
      for (int r0 = 0; r0 < t.n; r0 += block) {
        int k = std::min(block, t.n - r0);
        itr_stats_add_pair(&st[i], k, t.X.data() + (size_t)r0 * d_in, t.Xt.data() + (size_t)r0 * d_in);
      }
    }
    itr_stats_finalize(&st[i]);
  }
}

inline std::vector<itr_merge_task> merge_tasks(const std::vector<Task> &ts, const std::vector<itr_stats> &st) {
  std::vector<itr_merge_task> mt(ts.size());
  for (size_t i = 0; i < ts.size(); i++) {
    mt[i] = itr_merge_task{};
    mt[i].r = ts[i].r;
    mt[i].scale = ts[i].scale;
    mt[i].weight = ts[i].weight;
    mt[i].A = ts[i].A.data();
    mt[i].B = ts[i].B.data();
    mt[i].stats = &st[i];
    mt[i].cross_norm2 = -1;
  }
  return mt;
}

inline Mat dense_of(const itr_update &u) {
  double *D = nullptr;
  if (itr_update_to_dense(&u, &D) != ITR_OK) return Mat();
  Mat M(D, D + (size_t)u.d_out * u.d_in);
  free(D);
  return M;
}

}  // namespace mt
#endif
