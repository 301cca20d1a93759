// itr_dist_agree: the agreement point that ends every phase (STYLE.md, Errors).
#include <mpi.h>

#include <string>

#include <gtest/gtest.h>

#include "dist_fixtures.h"
#include "iteris/dist.h"

using dist_fixtures::same_string_on_all_ranks;

TEST(DistAgree, AllRanksOkGivesOk) {
  itr_error_clear();
  EXPECT_EQ(itr_dist_agree(MPI_COMM_WORLD, ITR_OK), ITR_OK);
}

TEST(DistAgree, ErrorOnLastRankOnlyReachesEveryRank) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  itr_error_clear();
  itr_err local = ITR_OK;
  if (rank == size - 1) local = itr_error_set(ITR_ERR_INPUT, "shard 'x.safetensors' truncated on rank %d", rank);
  itr_err e = itr_dist_agree(MPI_COMM_WORLD, local);
  EXPECT_EQ(e, ITR_ERR_INPUT);
  std::string msg = itr_error_message();
  std::string expected = "shard 'x.safetensors' truncated on rank " + std::to_string(size - 1);
  EXPECT_NE(msg.find(expected), std::string::npos) << msg;
  if (size > 1) {
    std::string prefix = "rank " + std::to_string(size - 1) + " of " + std::to_string(size) + ": ";
    EXPECT_EQ(msg.rfind(prefix, 0), 0u) << msg;
  }
  EXPECT_TRUE(same_string_on_all_ranks(MPI_COMM_WORLD, msg));
  // The next phase starts clean: a later all-OK agreement returns OK again.
  EXPECT_EQ(itr_dist_agree(MPI_COMM_WORLD, ITR_OK), ITR_OK);
}

TEST(DistAgree, LargestCodeWinsAndItsLowestRankSpeaks) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // Ranks below size/2 fail with INPUT, the others with INTERNAL (the larger code).
  itr_err local = rank < size / 2 ? itr_error_set(ITR_ERR_INPUT, "input problem on rank %d", rank)
                                  : itr_error_set(ITR_ERR_INTERNAL, "internal problem on rank %d", rank);
  itr_err e = itr_dist_agree(MPI_COMM_WORLD, local);
  EXPECT_EQ(e, ITR_ERR_INTERNAL);
  std::string msg = itr_error_message();
  EXPECT_NE(msg.find("internal problem on rank " + std::to_string(size / 2)), std::string::npos) << msg;
  EXPECT_TRUE(same_string_on_all_ranks(MPI_COMM_WORLD, msg));
  itr_error_clear();
}

TEST(DistAgree, WorksOnSubCommunicators) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm sub;
  MPI_Comm_split(MPI_COMM_WORLD, rank % 2, rank, &sub);
  int srank, ssize;
  MPI_Comm_rank(sub, &srank);
  MPI_Comm_size(sub, &ssize);
  // Only group 1 has an error (on its last rank); group 0 agrees on OK.
  itr_err local = ITR_OK;
  if (rank % 2 == 1 && srank == ssize - 1) local = itr_error_set(ITR_ERR_NUMERIC, "group 1 failed");
  itr_err e = itr_dist_agree(sub, local);
  EXPECT_EQ(e, rank % 2 == 1 ? ITR_ERR_NUMERIC : ITR_OK);
  if (rank % 2 == 1) {
    EXPECT_NE(std::string(itr_error_message()).find("group 1 failed"), std::string::npos);
  }
  MPI_Comm_free(&sub);
  itr_error_clear();
}
