// MPI harness sanity: every rank sees the same communicator size and an all-reduce works.
#include <mpi.h>

#include <gtest/gtest.h>

TEST(MpiHarness, AllreduceSumsRanks) {
  int rank, size, sum = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(sum, size * (size - 1) / 2);
}
