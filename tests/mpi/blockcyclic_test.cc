// Block-cyclic matrices: scatter/gather round trips, the update C += alpha A (off-diagonal times off)
// + shift I that assembles T2, and the diagonal, checked entry by entry against closed forms (integers and
// halves, exact in float64).
#include <mpi.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "dist_fixtures.h"
#include "iteris/dist.h"

namespace {

struct Shape {
  int m, n, mb;
};
// Tiny (m < mb), one block, ragged last blocks, more ranks than blocks, many cycles.
const Shape kShapes[] = {{1, 1, 64}, {5, 3, 64}, {5, 5, 2},   {7, 1, 1},  {64, 64, 64},
                         {65, 9, 8}, {130, 7, 64}, {37, 41, 4}, {300, 24, 64}};

// Rank k's partial: (k + 1) * (i * n + j + 1). The sum over ranks is size(size+1)/2 times that.
std::vector<double> partial_of(int k, int m, int n) {
  std::vector<double> p((size_t)m * n);
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) p[(size_t)i * n + j] = (double)(k + 1) * (double)(i * n + j + 1);
  return p;
}

// Square shapes for the update and the diagonal.
const Shape kSquare[] = {{1, 1, 64}, {5, 5, 2}, {7, 7, 1}, {64, 64, 64}, {37, 37, 4}, {130, 130, 64}, {65, 65, 8}};

}  // namespace

TEST(DistBlockCyclic, ScatterThenGatherIsIdentity) {
  int size;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (const Shape &s : kShapes) {
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, s.mb, &g), ITR_OK) << itr_error_message();
    std::vector<double> full((size_t)s.m * s.n);
    dist_fixtures::Rng rng(17);
    for (double &x : full) x = rng.uniform();
    itr_dist_matrix A;
    ASSERT_EQ(itr_dist_matrix_init(&A, g, s.m, s.n), ITR_OK);
    itr_dist_matrix_scatter(&A, full.data());
    // to every rank
    std::vector<double> all((size_t)s.m * s.n, 0.0);
    ASSERT_EQ(itr_dist_matrix_gather(&A, -1, all.data()), ITR_OK) << itr_error_message();
    EXPECT_EQ(all, full) << s.m << " x " << s.n << " mb " << s.mb;
    // to the last rank only; the others' buffers stay untouched
    std::vector<double> one((size_t)s.m * s.n, 7.0);
    ASSERT_EQ(itr_dist_matrix_gather(&A, size - 1, one.data()), ITR_OK) << itr_error_message();
    if (g->rank == size - 1)
      EXPECT_EQ(one, full);
    else
      EXPECT_EQ(one, std::vector<double>((size_t)s.m * s.n, 7.0));
    itr_dist_matrix_fini(&A);
    itr_dist_grid_destroy(g);
  }
}

TEST(DistBlockCyclic, AddScalesOffDiagonalAndShiftsDiagonal) {
  // C = 1 everywhere, A = i n + j + 1: C += 2 (A, off-diagonal times 0.5) + 3 I, on the lower triangle
  // (lower = 1: entries above the diagonal keep 1) or on every entry.
  for (const Shape &s : kSquare)
    for (int lower = 0; lower < 2; lower++) {
      itr_dist_grid *g = nullptr;
      ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, s.mb, &g), ITR_OK) << itr_error_message();
      std::vector<double> a = partial_of(0, s.m, s.n), ones((size_t)s.m * s.n, 1.0), out((size_t)s.m * s.n);
      itr_dist_matrix A, C;
      ASSERT_EQ(itr_dist_matrix_init(&A, g, s.m, s.n), ITR_OK);
      ASSERT_EQ(itr_dist_matrix_init(&C, g, s.m, s.n), ITR_OK);
      itr_dist_matrix_scatter(&A, a.data());
      itr_dist_matrix_scatter(&C, ones.data());
      itr_dist_matrix_add(&C, 2.0, &A, 0.5, 3.0, lower);
      ASSERT_EQ(itr_dist_matrix_gather(&C, -1, out.data()), ITR_OK) << itr_error_message();
      long bad = 0;
      for (int i = 0; i < s.m; i++)
        for (int j = 0; j < s.n; j++) {
          const double aij = (double)(i * s.n + j + 1);
          const double want = i == j ? 1.0 + 2.0 * aij + 3.0 : (lower && i < j) ? 1.0 : 1.0 + aij;
          if (out[(size_t)i * s.n + j] != want) bad++;
        }
      EXPECT_EQ(bad, 0) << s.m << " x " << s.n << " mb " << s.mb << " lower " << lower;
      itr_dist_matrix_fini(&A);
      itr_dist_matrix_fini(&C);
      itr_dist_grid_destroy(g);
    }
}

TEST(DistBlockCyclic, DiagonalReachesEveryRank) {
  for (const Shape &s : kSquare) {
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, s.mb, &g), ITR_OK) << itr_error_message();
    std::vector<double> a = partial_of(0, s.m, s.n), diag((size_t)s.m, -1.0), want((size_t)s.m);
    for (int i = 0; i < s.m; i++) want[i] = (double)(i * s.n + i + 1);
    itr_dist_matrix A;
    ASSERT_EQ(itr_dist_matrix_init(&A, g, s.m, s.n), ITR_OK);
    itr_dist_matrix_scatter(&A, a.data());
    ASSERT_EQ(itr_dist_matrix_diag(&A, diag.data()), ITR_OK) << itr_error_message();
    EXPECT_EQ(diag, want) << s.m << " mb " << s.mb;
    itr_dist_matrix_fini(&A);
    itr_dist_grid_destroy(g);
  }
}

TEST(DistBlockCyclic, AllocationFailureOnLastRankOnlyFailsEverywhere) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 4, &g), ITR_OK);
  itr_dist_matrix A;
  ASSERT_EQ(itr_dist_matrix_init(&A, g, 37, 41), ITR_OK);
  std::vector<double> full = partial_of(rank, 37, 41), out((size_t)37 * 41);
  itr_dist_matrix_scatter(&A, full.data());
  // Fail the k-th allocation of the gather (to one root, then to every rank), for every k, on the
  // last rank only.
  for (int which = 0; which < 2; which++) {
    for (int k = 1; k <= 8; k++) {
      if (rank == size - 1) itr_alloc_fail_after(k);
      itr_err e = itr_dist_matrix_gather(&A, which == 0 ? 0 : -1, out.data());
      int fired = rank == size - 1 && e != ITR_OK;
      itr_alloc_fail_after(0);
      int any = 0;
      MPI_Allreduce(&fired, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
      // Whatever happened on the last rank happened everywhere.
      EXPECT_EQ(e, any ? ITR_ERR_INTERNAL : ITR_OK) << "which " << which << " k " << k;
      if (any) {
        EXPECT_NE(std::string(itr_error_message()).find("injected fault"), std::string::npos);
      }
      if (!any) break;
    }
  }
  itr_dist_matrix_fini(&A);
  itr_dist_grid_destroy(g);
}
