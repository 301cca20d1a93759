// Block-cyclic matrices: scatter/gather round trips and reductions of per-rank partial sums,
// checked entry by entry against closed forms (integers, exact in float64).
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

void check_reduce(const itr_dist_grid *g, const Shape &s, itr_dist_part part) {
  int rank = g->rank, size = g->size;
  std::vector<double> partial = partial_of(rank, s.m, s.n), out((size_t)s.m * s.n, -1.0);
  itr_dist_matrix A;
  ASSERT_EQ(itr_dist_matrix_init(&A, g, s.m, s.n), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_dist_matrix_reduce(&A, part, partial.data()), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_dist_matrix_gather(&A, -1, out.data()), ITR_OK) << itr_error_message();
  const double factor = size * (size + 1) / 2.0;
  long bad = 0;
  for (int i = 0; i < s.m; i++)
    for (int j = 0; j < s.n; j++) {
      bool kept = part == ITR_DIST_ALL || i / s.mb >= j / s.mb;
      double want = kept ? factor * (double)(i * s.n + j + 1) : 0.0;
      if (out[(size_t)i * s.n + j] != want) bad++;
    }
  EXPECT_EQ(bad, 0) << s.m << " x " << s.n << " mb " << s.mb << " part " << part;
  itr_dist_matrix_fini(&A);
}

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

TEST(DistBlockCyclic, ReduceSumsPartialsIntoOwnersBlocks) {
  for (const Shape &s : kShapes) {
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, s.mb, &g), ITR_OK) << itr_error_message();
    check_reduce(g, s, ITR_DIST_ALL);
    check_reduce(g, s, ITR_DIST_LOWER);
    itr_dist_grid_destroy(g);
  }
}

TEST(DistBlockCyclic, ReduceAcrossManySmallPanels) {
  // A panel of 1 byte forces one cycle of block columns per MPI_Reduce_scatter.
  itr_dist_set_reduce_panel_bytes(1);
  for (const Shape &s : kShapes) {
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, s.mb, &g), ITR_OK) << itr_error_message();
    check_reduce(g, s, ITR_DIST_ALL);
    check_reduce(g, s, ITR_DIST_LOWER);
    itr_dist_grid_destroy(g);
  }
  // Two cycles per panel with 65 x 9, mb 8: panels of 2 * npcol block columns.
  itr_dist_set_reduce_panel_bytes(2 * 65 * 8 * sizeof(double) * 4);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 2, &g), ITR_OK);
  check_reduce(g, Shape{65, 19, 2}, ITR_DIST_ALL);
  check_reduce(g, Shape{65, 19, 2}, ITR_DIST_LOWER);
  itr_dist_grid_destroy(g);
  itr_dist_set_reduce_panel_bytes(0);
}

TEST(DistBlockCyclic, AllocationFailureOnLastRankOnlyFailsEverywhere) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 4, &g), ITR_OK);
  itr_dist_matrix A;
  ASSERT_EQ(itr_dist_matrix_init(&A, g, 37, 41), ITR_OK);
  std::vector<double> partial = partial_of(rank, 37, 41), out((size_t)37 * 41);
  // Fail the k-th allocation of the reduce, then of the gather, for every k, on the last rank only.
  for (int which = 0; which < 2; which++) {
    for (int k = 1; k <= 8; k++) {
      if (rank == size - 1) itr_alloc_fail_after(k);
      itr_err e = which == 0 ? itr_dist_matrix_reduce(&A, ITR_DIST_ALL, partial.data())
                             : itr_dist_matrix_gather(&A, 0, out.data());
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
