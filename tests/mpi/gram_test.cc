// Statistics formed in the block-cyclic layout from rows spread over the ranks (src/dist/gram.c),
// checked against plain float64 loops over all rows on one rank: the Grams, their norms, the
// kernel and direct forms of ||A^T B||_F, the ridge/scaling update, the diagonal, and the copy of
// a matrix onto the grid of a process group.
#include <mpi.h>

#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "dist_fixtures.h"
#include "iteris/dist.h"

namespace {

// The whole (n, d) f32 row matrix, the same on every rank, and rank k's share: an uneven split
// where rank 1 (when there is one) holds no row at all.
struct Rows {
  int n, d;
  std::vector<float> x, y;
  Rows(int n_, int d_, uint64_t seed) : n(n_), d(d_), x((size_t)n_ * d_), y((size_t)n_ * d_) {
    dist_fixtures::Rng rng(seed);
    for (float &v : x) v = (float)rng.uniform();
    for (float &v : y) v = (float)(0.5 * rng.uniform());
  }
  void share(int k, int size, int *r0, int *T) const {
    std::vector<int> cnt((size_t)size, 0);
    int left = n;
    for (int p = 0; p < size; p++) {
      if (p == 1) continue;
      int c = (n / size) + (p == 0 ? n % size : 0);
      cnt[(size_t)p] = c < left ? c : left;
      left -= cnt[(size_t)p];
    }
    cnt[0] += left;
    *r0 = 0;
    for (int p = 0; p < k; p++) *r0 += cnt[(size_t)p];
    *T = cnt[(size_t)k];
  }
  // (d, d) row-major: sum_t (a x_t + b y_t)^T-ish products, plain loops in float64.
  std::vector<double> product(double a1, double b1, double a2, double b2) const {
    std::vector<double> out((size_t)d * d, 0.0);
    for (int t = 0; t < n; t++)
      for (int i = 0; i < d; i++) {
        double u = a1 * x[(size_t)t * d + i] + b1 * y[(size_t)t * d + i];
        for (int j = 0; j < d; j++) out[(size_t)i * d + j] += u * (a2 * x[(size_t)t * d + j] + b2 * y[(size_t)t * d + j]);
      }
    return out;
  }
};

// Returns the (agreed) error, so that a caller's ASSERT stops the test on every rank at once (an
// ASSERT in here would only leave this helper, and the caller would go on into collective calls).
itr_err make_rows(const itr_dist_grid *g, const Rows &R, double a, double b, itr_dist_matrix *Z) {
  int r0, T;
  R.share(g->rank, g->size, &r0, &T);
  return itr_dist_rows_create(g, T, R.d, R.x.data() + (size_t)r0 * R.d, a, R.y.data() + (size_t)r0 * R.d, b, Z);
}

double max_rel(const std::vector<double> &got, const std::vector<double> &want, int d, bool lower) {
  double num = 0, den = 0;
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++) {
      if (lower && j > i) continue;
      num = std::fmax(num, std::fabs(got[(size_t)i * d + j] - want[(size_t)i * d + j]));
      den = std::fmax(den, std::fabs(want[(size_t)i * d + j]));
    }
  return num / den;
}

struct Case {
  int n, d, mb;
};
// n < d (kernel path) and n >= d (direct path), ragged blocks, more ranks than rows.
const Case kCases[] = {{9, 20, 4}, {40, 13, 4}, {3, 7, 64}, {70, 70, 8}};

}  // namespace

TEST(DistGram, SyrkAndGemmMatchFloat64Loops) {
  for (const Case &c : kCases) {
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, c.mb, &g), ITR_OK) << itr_error_message();
    Rows R(c.n, c.d, 5 + c.n);
    itr_dist_matrix X, M, G, C;
    ASSERT_EQ(make_rows(g, R, 1.0, 0.0, &X), ITR_OK) << itr_error_message();  // X
    ASSERT_EQ(make_rows(g, R, 0.3, 0.7, &M), ITR_OK) << itr_error_message();  // 0.3 X + 0.7 Y (-reg_coef's mixing)
    ASSERT_EQ(itr_dist_matrix_init(&G, g, c.d, c.d), ITR_OK);
    ASSERT_EQ(itr_dist_matrix_init(&C, g, c.d, c.d), ITR_OK);
    ASSERT_EQ(itr_dist_gram(2.0, &M, &M, 0.0, &G), ITR_OK) << itr_error_message();
    ASSERT_EQ(itr_dist_gram(1.0, &X, &M, 0.0, &C), ITR_OK) << itr_error_message();
    std::vector<double> g_out((size_t)c.d * c.d), c_out((size_t)c.d * c.d);
    ASSERT_EQ(itr_dist_matrix_gather(&G, -1, g_out.data()), ITR_OK);
    ASSERT_EQ(itr_dist_matrix_gather(&C, -1, c_out.data()), ITR_OK);
    std::vector<double> g_ref = R.product(0.3, 0.7, 0.3, 0.7), c_ref = R.product(1.0, 0.0, 0.3, 0.7);
    for (double &v : g_ref) v *= 2.0;
    EXPECT_LT(max_rel(g_out, g_ref, c.d, true), 1e-13) << c.n << " x " << c.d;
    EXPECT_LT(max_rel(c_out, c_ref, c.d, false), 1e-13) << c.n << " x " << c.d;
    for (int i = 0; i < c.d; i++)  // pdsyrk leaves the strict upper triangle alone (zero here)
      for (int j = i + 1; j < c.d; j++) EXPECT_EQ(g_out[(size_t)i * c.d + j], 0.0);

    // norms: ||G|| from its lower triangle, ||X^T M|| by kernels (n < d) or directly
    double g2 = 0, c2 = 0, g2_ref = 0, c2_ref = 0;
    for (double v : g_ref) g2_ref += v * v;
    for (double v : c_ref) c2_ref += v * v;
    ASSERT_EQ(itr_dist_frob2(&G, 1, &g2), ITR_OK);
    ASSERT_EQ(itr_dist_cross_norm2(&X, &M, &c2), ITR_OK) << itr_error_message();
    EXPECT_NEAR(g2 / g2_ref, 1.0, 1e-13);
    EXPECT_NEAR(c2 / c2_ref, 1.0, 1e-12) << (c.n < c.d ? "kernel" : "direct");

    // T2 += 0.5 (G, off-diagonals x 0.25) + 3 I on the lower triangle; the diagonal on every rank
    itr_dist_matrix T2;
    ASSERT_EQ(itr_dist_matrix_init(&T2, g, c.d, c.d), ITR_OK);
    itr_dist_matrix_add(&T2, 0.5, &G, 0.25, 3.0, 1);
    itr_dist_matrix_add(&T2, 0.5, &G, 0.25, 3.0, 1);
    std::vector<double> t_out((size_t)c.d * c.d), diag((size_t)c.d);
    ASSERT_EQ(itr_dist_matrix_gather(&T2, -1, t_out.data()), ITR_OK);
    ASSERT_EQ(itr_dist_matrix_diag(&G, diag.data()), ITR_OK);
    for (int i = 0; i < c.d; i++) {
      EXPECT_NEAR(diag[(size_t)i], g_ref[(size_t)i * c.d + i], 1e-12 * std::fabs(g_ref[(size_t)i * c.d + i]));
      for (int j = 0; j <= i; j++) {
        double want = i == j ? g_ref[(size_t)i * c.d + i] + 6.0 : 0.25 * g_ref[(size_t)i * c.d + j];
        EXPECT_NEAR(t_out[(size_t)i * c.d + j], want, 1e-12 * (std::fabs(want) + 1));
      }
    }
    // every entry (lower = 0) of the non-symmetric cross: off-diagonals x 0.5, diagonal + 1
    itr_dist_matrix F;
    ASSERT_EQ(itr_dist_matrix_init(&F, g, c.d, c.d), ITR_OK);
    itr_dist_matrix_add(&F, 2.0, &C, 0.5, 1.0, 0);
    std::vector<double> f_out((size_t)c.d * c.d);
    ASSERT_EQ(itr_dist_matrix_gather(&F, -1, f_out.data()), ITR_OK);
    for (int i = 0; i < c.d; i++)
      for (int j = 0; j < c.d; j++) {
        double want = i == j ? 2.0 * c_ref[(size_t)i * c.d + i] + 1.0 : c_ref[(size_t)i * c.d + j];
        EXPECT_NEAR(f_out[(size_t)i * c.d + j], want, 1e-12 * (std::fabs(want) + 1));
      }
    itr_dist_matrix_fini(&F);
    itr_dist_matrix_fini(&T2);
    itr_dist_matrix_fini(&X);
    itr_dist_matrix_fini(&M);
    itr_dist_matrix_fini(&G);
    itr_dist_matrix_fini(&C);
    itr_dist_grid_destroy(g);
  }
}

// The Gram of rows that stay on their ranks, both ways of moving them (the columns to their owners,
// in one round and in rounds of a few rows; the partial products summed into the layout, in one panel
// and in panels of one block column), on every grid shape of the rank count.
TEST(DistGram, GramOfRowsMatchesFloat64Loops) {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (const Case &c : kCases)
    for (int how = 0; how < 2; how++)
      for (int rows = 1; rows <= size; rows++)
        for (int small = 0; small < 2; small++) {
          if (size % rows) continue;
          itr_dist_grid *g = nullptr;
          ASSERT_EQ(itr_dist_grid_create_shape(MPI_COMM_WORLD, c.mb, rows, &g), ITR_OK) << itr_error_message();
          itr_dist_gram_rows_exchange(how ? ITR_GRAM_PARTIAL : ITR_GRAM_COLUMNS);
          itr_dist_gram_rows_panel(small ? (size_t)8 * c.d * c.mb : 0);
          Rows R(c.n, c.d, 11 + c.n);
          int r0, T;
          R.share(g->rank, g->size, &r0, &T);
          itr_dist_matrix G;
          ASSERT_EQ(itr_dist_matrix_init(&G, g, c.d, c.d), ITR_OK);
          ASSERT_EQ(itr_dist_gram_rows(g, T, c.d, R.x.data() + (size_t)r0 * c.d, 0.3, R.y.data() + (size_t)r0 * c.d, 0.7,
                                       &G),
                    ITR_OK)
              << itr_error_message();
          std::vector<double> out((size_t)c.d * c.d);
          ASSERT_EQ(itr_dist_matrix_gather(&G, -1, out.data()), ITR_OK);
          EXPECT_LT(max_rel(out, R.product(0.3, 0.7, 0.3, 0.7), c.d, true), 1e-13)
              << c.n << " x " << c.d << " how " << how << " grid rows " << rows << " small " << small;
          // plain rows (no y)
          ASSERT_EQ(itr_dist_gram_rows(g, T, c.d, R.x.data() + (size_t)r0 * c.d, 2.0, nullptr, 0.0, &G), ITR_OK);
          ASSERT_EQ(itr_dist_matrix_gather(&G, -1, out.data()), ITR_OK);
          EXPECT_LT(max_rel(out, R.product(2.0, 0.0, 2.0, 0.0), c.d, true), 1e-13)
              << c.n << " x " << c.d << " how " << how << " grid rows " << rows << " small " << small;
          itr_dist_gram_rows_panel(0);
          itr_dist_gram_rows_exchange(ITR_GRAM_AUTO);
          itr_dist_matrix_fini(&G);
          itr_dist_grid_destroy(g);
        }
}

// The kernel of every rank's rows, laid out as itr_dist_rows_create does (rank p's row t at p T_max +
// t, zero rows between), from the rows where they are; in one panel and in panels of one block.
TEST(DistGram, KernelOfRowsMatchesFloat64Loops) {
  for (const Case &c : kCases)
    for (int small = 0; small < 2; small++) {
      itr_dist_grid *g = nullptr;
      ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, c.mb, &g), ITR_OK) << itr_error_message();
      Rows R(c.n, c.d, 23 + c.n);
      int r0, T, tmax = 1;
      for (int p = 0; p < g->size; p++) {
        R.share(p, g->size, &r0, &T);
        tmax = T > tmax ? T : tmax;
      }
      const int n = g->size * tmax;
      itr_dist_gram_rows_panel(small ? (size_t)8 * n * c.mb : 0);
      std::vector<double> want((size_t)n * n, 0.0);
      for (int p = 0; p < g->size; p++)
        for (int q = 0; q < g->size; q++) {
          int rp, Tp, rq, Tq;
          R.share(p, g->size, &rp, &Tp);
          R.share(q, g->size, &rq, &Tq);
          for (int t = 0; t < Tp; t++)
            for (int u = 0; u < Tq; u++) {
              double sum = 0;
              for (int j = 0; j < c.d; j++) {
                const size_t a = (size_t)(rp + t) * c.d + j, b = (size_t)(rq + u) * c.d + j;
                sum += (0.3 * R.x[a] + 0.7 * R.y[a]) * (0.3 * R.x[b] + 0.7 * R.y[b]);
              }
              want[(size_t)(p * tmax + t) * n + (q * tmax + u)] = sum;
            }
        }
      R.share(g->rank, g->size, &r0, &T);
      itr_dist_matrix K;
      ASSERT_EQ(itr_dist_matrix_init(&K, g, n, n), ITR_OK);
      ASSERT_EQ(itr_dist_kernel_rows(g, T, c.d, R.x.data() + (size_t)r0 * c.d, 0.3, R.y.data() + (size_t)r0 * c.d, 0.7, &K),
                ITR_OK)
          << itr_error_message();
      std::vector<double> out((size_t)n * n);
      ASSERT_EQ(itr_dist_matrix_gather(&K, -1, out.data()), ITR_OK);
      EXPECT_LT(max_rel(out, want, n, true), 1e-13) << c.n << " x " << c.d << " small " << small;
      itr_dist_gram_rows_panel(0);
      itr_dist_matrix_fini(&K);
      itr_dist_grid_destroy(g);
    }
}

TEST(DistGram, RankCountDoesNotChangeTheGramBeyondRounding) {
  // the same rows on a grid of all ranks and on a grid of rank 0 alone
  Rows R(33, 29, 77);
  std::vector<double> all((size_t)29 * 29), one((size_t)29 * 29);
  for (int solo = 0; solo < 2; solo++) {
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm comm;
    MPI_Comm_split(MPI_COMM_WORLD, solo && rank != 0 ? MPI_UNDEFINED : 0, rank, &comm);
    if (comm == MPI_COMM_NULL) continue;
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(comm, 8, &g), ITR_OK);
    itr_dist_matrix X, G;
    ASSERT_EQ(make_rows(g, R, 1.0, 0.0, &X), ITR_OK) << itr_error_message();
    ASSERT_EQ(itr_dist_matrix_init(&G, g, 29, 29), ITR_OK);
    ASSERT_EQ(itr_dist_gram(1.0, &X, &X, 0.0, &G), ITR_OK);
    ASSERT_EQ(itr_dist_matrix_gather(&G, -1, (solo ? one : all).data()), ITR_OK);
    itr_dist_matrix_fini(&X);
    itr_dist_matrix_fini(&G);
    itr_dist_grid_destroy(g);
    MPI_Comm_free(&comm);
  }
  int rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    EXPECT_LT(max_rel(all, one, 29, true), 1e-14);
  }
}

TEST(DistGram, CopyToEveryGroupGrid) {
  int size;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int n_groups = 1; n_groups <= size; n_groups++) {
    itr_dist_grid *g = nullptr, *sub = nullptr;
    int mine = -1;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 4, &g), ITR_OK);
    ASSERT_EQ(itr_dist_grid_split(g, n_groups, &sub, &mine), ITR_OK) << itr_error_message();
    EXPECT_EQ(mine, g->rank * n_groups / size);
    EXPECT_EQ(sub->size, itr_dist_group_first(mine + 1, n_groups, size) - itr_dist_group_first(mine, n_groups, size));
    const int m = 11, n = 6;
    std::vector<double> full((size_t)m * n), out((size_t)m * n, -1);
    dist_fixtures::Rng rng(3);
    for (double &v : full) v = rng.uniform();
    itr_dist_matrix A;
    ASSERT_EQ(itr_dist_matrix_init(&A, g, m, n), ITR_OK);
    itr_dist_matrix_scatter(&A, full.data());
    for (int q = 0; q < n_groups; q++) {
      itr_dist_matrix B;
      const bool member = q == mine;
      if (member) {
        ASSERT_EQ(itr_dist_matrix_init(&B, sub, m, n), ITR_OK);
      }
      ASSERT_EQ(itr_dist_matrix_to_group(&A, g, q, n_groups, member ? &B : nullptr), ITR_OK) << itr_error_message();
      if (member) {
        ASSERT_EQ(itr_dist_matrix_gather(&B, -1, out.data()), ITR_OK);
        EXPECT_EQ(out, full) << "group " << q << " of " << n_groups;
        itr_dist_matrix_fini(&B);
      }
    }
    itr_dist_matrix_fini(&A);
    itr_dist_grid_destroy(sub);
    itr_dist_grid_destroy(g);
  }
}

