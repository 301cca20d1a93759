// BLACS grids on any communicator: shape, position of each rank, local sizes.
#include <mpi.h>

#include <string>

#include <gtest/gtest.h>

#include "dist_fixtures.h"
#include "iteris/dist.h"

TEST(DistGrid, ShapeIsAsSquareAsPossible) {
  struct {
    int size, nprow, npcol;
  } cases[] = {{1, 1, 1}, {2, 1, 2}, {3, 1, 3},  {4, 2, 2},  {5, 1, 5},  {6, 2, 3},   {7, 1, 7},
               {8, 2, 4}, {9, 3, 3}, {12, 3, 4}, {13, 1, 13}, {16, 4, 4}, {18, 3, 6}, {64, 8, 8}};
  for (const auto &c : cases) {
    int nprow = 0, npcol = 0;
    itr_dist_grid_shape(c.size, &nprow, &npcol);
    EXPECT_EQ(nprow, c.nprow) << "size " << c.size;
    EXPECT_EQ(npcol, c.npcol) << "size " << c.size;
  }
}

// Every rank sits at (rank / npcol, rank % npcol), and the local parts of an m x n matrix
// add up to m * n for any block size, including when some ranks own nothing.
static void check_grid(MPI_Comm comm, int mb) {
  int rank, size;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(comm, mb, &g), ITR_OK) << itr_error_message();
  int nprow, npcol;
  itr_dist_grid_shape(size, &nprow, &npcol);
  EXPECT_EQ(g->nprow, nprow);
  EXPECT_EQ(g->npcol, npcol);
  EXPECT_EQ(g->myrow, rank / npcol);
  EXPECT_EQ(g->mycol, rank % npcol);
  EXPECT_EQ(g->mb, mb > 0 ? mb : (int)ITR_DIST_MB_DEFAULT);
  const int shapes[][2] = {{1, 1}, {5, 3}, {64, 64}, {130, 7}, {300, 24}};
  for (const auto &s : shapes) {
    itr_dist_matrix A;
    ASSERT_EQ(itr_dist_matrix_init(&A, g, s[0], s[1]), ITR_OK) << itr_error_message();
    long mine = (long)A.m_loc * A.n_loc, total = 0;
    MPI_Allreduce(&mine, &total, 1, MPI_LONG, MPI_SUM, comm);
    EXPECT_EQ(total, (long)s[0] * s[1]) << s[0] << " x " << s[1] << " mb " << g->mb;
    EXPECT_GE(A.lld, 1);
    EXPECT_GE(A.lld, A.m_loc);
    itr_dist_matrix_fini(&A);
  }
  itr_dist_grid_destroy(g);
}

TEST(DistGrid, CoversWorldInRowMajorOrder) {
  check_grid(MPI_COMM_WORLD, 0);
  check_grid(MPI_COMM_WORLD, 1);
  check_grid(MPI_COMM_WORLD, 3);
}

TEST(DistGrid, SubCommunicatorsGetTheirOwnGrids) {
  int rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm sub;
  MPI_Comm_split(MPI_COMM_WORLD, rank % 2, rank, &sub);
  check_grid(sub, 2);
  MPI_Comm_free(&sub);
}

TEST(DistGrid, CreateDestroyManyTimes) {
  // BLACS keeps tables of system handles and contexts: repeated use must not exhaust them.
  for (int i = 0; i < 40; i++) {
    itr_dist_grid *g = nullptr;
    ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 8, &g), ITR_OK) << itr_error_message();
    itr_dist_grid_destroy(g);
  }
  itr_dist_grid_destroy(nullptr);
}

TEST(DistGrid, BlockSizeDifferingOnLastRankIsRejectedEverywhere) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  itr_dist_grid *g = nullptr;
  itr_err e = itr_dist_grid_create(MPI_COMM_WORLD, rank == size - 1 ? 32 : 64, &g);
  if (size == 1) {
    EXPECT_EQ(e, ITR_OK);
    itr_dist_grid_destroy(g);
    return;
  }
  EXPECT_EQ(e, ITR_ERR_INTERNAL);
  EXPECT_EQ(g, nullptr);
  std::string msg = itr_error_message();
  EXPECT_NE(msg.find("block size mb differs"), std::string::npos) << msg;
  EXPECT_TRUE(dist_fixtures::same_string_on_all_ranks(MPI_COMM_WORLD, msg));
}
