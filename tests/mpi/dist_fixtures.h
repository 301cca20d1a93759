// Shared by the Dist* MPI tests: a seeded RNG that gives the same numbers on every rank,
// SPD systems T2 = X^T X + ridge I built from a token matrix X (T, d_in) whose rows are shared
// out round-robin (rank k of size holds rows k, k + size, ...), and a float64 LAPACK reference.
#ifndef ITERIS_TESTS_MPI_DIST_FIXTURES_H
#define ITERIS_TESTS_MPI_DIST_FIXTURES_H

#include <mpi.h>

#include <lapacke.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "iteris/dist.h"

namespace dist_fixtures {

// splitmix64: uniform doubles in [-1, 1), identical on every rank for one seed.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (double)(next() >> 11) * (2.0 / 9007199254740992.0) - 1.0; }
};

// One system: tokens X (T, d) and targets Z (T, R), both row-major; T2 = X^T X + ridge I,
// RHS = X^T Z. part(k, size) gives rank k's share: the rows t = k, k + size, ... (ridge on rank 0).
struct System {
  int d, R, T;
  double ridge;
  std::vector<double> X, Z;

  System(int d_in, int r, uint64_t seed, double ridge_ = 1.0) : d(d_in), R(r), T(d_in + 7), ridge(ridge_) {
    Rng rng(seed);
    X.resize((size_t)T * d);
    Z.resize((size_t)T * R);
    for (double &x : X) x = rng.uniform();
    for (double &z : Z) z = rng.uniform();
  }

  // (d, d) and (d, R) row-major sums over rows t with t % size == k (all rows when size == 1).
  void partial(int k, int size, std::vector<double> &t2, std::vector<double> &rhs) const {
    t2.assign((size_t)d * d, 0.0);
    rhs.assign((size_t)d * R, 0.0);
    for (int t = k; t < T; t += size) {
      const double *x = &X[(size_t)t * d], *z = &Z[(size_t)t * R];
      for (int i = 0; i < d; i++) {
        for (int j = 0; j < d; j++) t2[(size_t)i * d + j] += x[i] * x[j];
        for (int j = 0; j < R; j++) rhs[(size_t)i * R + j] += x[i] * z[j];
      }
    }
    if (k == 0)
      for (int i = 0; i < d; i++) t2[(size_t)i * d + i] += ridge;
  }

  // The serial reference: full T2 and RHS on one rank, solved with LAPACKE_dposv in float64.
  std::vector<double> reference_solution(std::vector<double> *t2_out = nullptr,
                                         std::vector<double> *rhs_out = nullptr) const {
    std::vector<double> t2, rhs;
    partial(0, 1, t2, rhs);
    if (t2_out) *t2_out = t2;
    if (rhs_out) *rhs_out = rhs;
    lapack_int info = LAPACKE_dposv(LAPACK_ROW_MAJOR, 'L', d, R, t2.data(), d, rhs.data(), R);
    if (info != 0) rhs.assign(rhs.size(), NAN);
    return rhs;
  }
};

// max |a - b| / max |b|
inline double rel_error(const std::vector<double> &a, const std::vector<double> &b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); i++) {
    num = std::fmax(num, std::fabs(a[i] - b[i]));
    den = std::fmax(den, std::fabs(b[i]));
  }
  if (a.size() != b.size() || std::isnan(num)) return INFINITY;
  return den > 0 ? num / den : num;
}

// 1 when every rank of comm holds bitwise the same vector (compared with rank 0's copy).
inline int same_on_all_ranks(MPI_Comm comm, const std::vector<double> &v) {
  std::vector<double> root(v);
  int n = (int)v.size(), n0 = n;
  MPI_Bcast(&n0, 1, MPI_INT, 0, comm);
  int ok = n0 == n, sizes_agree = 0;
  MPI_Allreduce(&ok, &sizes_agree, 1, MPI_INT, MPI_MIN, comm);
  if (sizes_agree) {
    MPI_Bcast(root.data(), n, MPI_DOUBLE, 0, comm);
    for (int i = 0; i < n; i++)
      if (std::memcmp(&root[i], &v[i], sizeof(double)) != 0) ok = 0;
  }
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, comm);
  return all;
}

// 1 when every rank of comm holds the same string.
inline int same_string_on_all_ranks(MPI_Comm comm, const std::string &s) {
  int n = (int)s.size(), n0 = n;
  MPI_Bcast(&n0, 1, MPI_INT, 0, comm);
  std::string root(s);
  root.resize((size_t)n0);
  MPI_Bcast(&root[0], n0, MPI_CHAR, 0, comm);
  int ok = root == s, all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, comm);
  return all;
}

// The solve as the pipeline runs it (src/pipeline/site.c): every rank's partial sums t2p (d, d)
// and rhsp (d, R), row-major, added up (MPI_Allreduce: the tests' stand-in for the statistics),
// entered into the block-cyclic layout (itr_dist_matrix_scatter), itr_dist_solve_spd, and Y (d, R)
// gathered on root (every rank: root < 0). Collective on the grid; d and R the same on all ranks.
inline itr_err solve_partial(const itr_dist_grid *g, const char *label, int d, int R, const double *t2p,
                             const double *rhsp, int root, double *y, itr_dist_solve_report *report) {
  std::vector<double> t2((size_t)d * d), rhs((size_t)d * R);
  MPI_Allreduce(t2p, t2.data(), d * d, MPI_DOUBLE, MPI_SUM, g->comm);
  MPI_Allreduce(rhsp, rhs.data(), d * R, MPI_DOUBLE, MPI_SUM, g->comm);
  itr_dist_matrix T2, B, Y;
  std::memset(&T2, 0, sizeof T2);
  std::memset(&B, 0, sizeof B);
  std::memset(&Y, 0, sizeof Y);
  itr_dist_solve_report rep;
  itr_err e = itr_dist_matrix_init(&T2, g, d, d);
  if (e == ITR_OK) e = itr_dist_matrix_init(&B, g, d, R);
  if (e == ITR_OK) e = itr_dist_matrix_init(&Y, g, d, R);
  e = itr_dist_agree(g->comm, e);
  if (e == ITR_OK) {
    itr_dist_matrix_scatter(&T2, t2.data());
    itr_dist_matrix_scatter(&B, rhs.data());
    e = itr_dist_solve_spd(label, &T2, &B, &Y, &rep);
  }
  if (e == ITR_OK) e = itr_dist_matrix_gather(&Y, root, y);
  if (e == ITR_OK && report) *report = rep;
  itr_dist_matrix_fini(&T2);
  itr_dist_matrix_fini(&B);
  itr_dist_matrix_fini(&Y);
  return e;
}

}  // namespace dist_fixtures
#endif
