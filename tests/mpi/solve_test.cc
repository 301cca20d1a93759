// The distributed SPD solve T2 Y = RHS (itr_dist_solve_spd, as the pipeline calls it) of systems summed
// from per-rank partials, against a float64 LAPACKE_dposv of the full system on one rank (so every -np
// is compared with the serial answer).
#include <mpi.h>

#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "dist_fixtures.h"
#include "iteris/dist.h"

using dist_fixtures::rel_error;
using dist_fixtures::same_on_all_ranks;
using dist_fixtures::same_string_on_all_ranks;
using dist_fixtures::solve_partial;
using dist_fixtures::System;

namespace {

// Solves sys on comm (ranks share the tokens round-robin) and compares with the serial reference.
void solve_and_check(MPI_Comm comm, const System &sys, int mb, uint64_t tag) {
  int rank, size;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(comm, mb, &g), ITR_OK) << itr_error_message();
  std::vector<double> t2p, rhsp, t2_full, rhs_full;
  sys.partial(rank, size, t2p, rhsp);
  std::vector<double> ref = sys.reference_solution(&t2_full, &rhs_full);
  std::vector<double> y((size_t)sys.d * sys.R, NAN);
  itr_dist_solve_report rep;
  std::string label = "test.d" + std::to_string(sys.d) + ".R" + std::to_string(sys.R) + "." + std::to_string(tag);
  itr_err e = solve_partial(g, label.c_str(), sys.d, sys.R, t2p.data(), rhsp.data(), -1, y.data(), &rep);
  ASSERT_EQ(e, ITR_OK) << itr_error_message();
  double err = rel_error(y, ref);
  EXPECT_LT(err, 1e-10) << label << " mb " << mb << " grid " << g->nprow << "x" << g->npcol;
  EXPECT_TRUE(rep.passed) << label << " residual " << rep.residual;
  EXPECT_LT(rep.residual, ITR_RESIDUAL_THRESHOLD);
  EXPECT_GE(rep.residual, 0.0);
  // The reported norms are those of the full, summed matrices.
  double t2n = 0, rhsn = 0;
  for (int i = 0; i < sys.d; i++) {
    double s = 0, r = 0;
    for (int j = 0; j < sys.d; j++) s += std::fabs(t2_full[(size_t)i * sys.d + j]);
    for (int j = 0; j < sys.R; j++) r += std::fabs(rhs_full[(size_t)i * sys.R + j]);
    t2n = std::fmax(t2n, s);
    rhsn = std::fmax(rhsn, r);
  }
  EXPECT_NEAR(rep.t2_norm, t2n, 1e-12 * t2n);
  EXPECT_NEAR(rep.rhs_norm, rhsn, 1e-12 * rhsn);
  // Every rank returns bitwise the same Y and the same report.
  EXPECT_TRUE(same_on_all_ranks(comm, y)) << label;
  EXPECT_TRUE(same_on_all_ranks(comm, std::vector<double>{rep.residual, rep.t2_norm, rep.y_norm, rep.rhs_norm}));
  itr_dist_grid_destroy(g);
}

}  // namespace

TEST(DistSolve, MatchesSerialLapackForEveryShape) {
  const int ds[] = {1, 5, 64, 130, 300}, Rs[] = {1, 7, 24};
  uint64_t seed = 1;
  for (int d : ds)
    for (int R : Rs) {
      seed++;
      solve_and_check(MPI_COMM_WORLD, System(d, R, seed), 0, seed);
    }
}

TEST(DistSolve, SmallBlocksSpreadOverManyOwners) {
  // mb 1..8: many block cycles per rank, ragged edges, and ranks owning nothing for d = 1.
  const int mbs[] = {1, 2, 3, 8};
  uint64_t seed = 100;
  for (int mb : mbs) {
    seed++;
    solve_and_check(MPI_COMM_WORLD, System(1, 3, seed), mb, seed);
    seed++;
    solve_and_check(MPI_COMM_WORLD, System(37, 5, seed), mb, seed);
    seed++;
    solve_and_check(MPI_COMM_WORLD, System(130, 24, seed), mb, seed);
  }
}

TEST(DistSolve, GathersToOneRootOnly) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  System sys(70, 7, 42);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 16, &g), ITR_OK);
  std::vector<double> t2p, rhsp;
  sys.partial(rank, size, t2p, rhsp);
  const int root = size - 1;
  std::vector<double> y;
  if (rank == root) y.assign((size_t)sys.d * sys.R, NAN);
  itr_err e = solve_partial(g, "root_only", sys.d, sys.R, t2p.data(), rhsp.data(), root,
                                         rank == root ? y.data() : nullptr, nullptr);
  ASSERT_EQ(e, ITR_OK) << itr_error_message();
  if (rank == root) {
    EXPECT_LT(rel_error(y, sys.reference_solution()), 1e-10);
  }
  itr_dist_grid_destroy(g);
}

TEST(DistSolve, ReadsOnlyTheLowerTriangleOfPartials) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  System sys(100, 7, 7);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 8, &g), ITR_OK);
  std::vector<double> t2p, rhsp, y((size_t)sys.d * sys.R);
  sys.partial(rank, size, t2p, rhsp);
  for (int i = 0; i < sys.d; i++)
    for (int j = i + 1; j < sys.d; j++) t2p[(size_t)i * sys.d + j] = NAN;  // poison above the diagonal
  itr_dist_solve_report rep;
  ASSERT_EQ(solve_partial(g, "lower", sys.d, sys.R, t2p.data(), rhsp.data(), -1, y.data(), &rep), ITR_OK)
      << itr_error_message();
  EXPECT_LT(rel_error(y, sys.reference_solution()), 1e-10);
  EXPECT_TRUE(rep.passed);
  itr_dist_grid_destroy(g);
}

TEST(DistSolve, NotPositiveDefiniteIsNumericErrorOnEveryRank) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int d = 70, R = 2;
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 0, &g), ITR_OK);
  // T2 = identity except T2[65][65] = -1 (in the second block of 64), shared out over the ranks:
  // rank k holds the diagonal entries i with i % size == k.
  std::vector<double> t2p((size_t)d * d, 0.0), rhsp((size_t)d * R, 1.0 / size), y((size_t)d * R, 5.0);
  for (int i = rank; i < d; i += size) t2p[(size_t)i * d + i] = i == 65 ? -1.0 : 1.0;
  itr_err e = solve_partial(g, "layers.3.self_attn.q_proj", d, R, t2p.data(), rhsp.data(), -1,
                                         y.data(), nullptr);
  EXPECT_EQ(e, ITR_ERR_NUMERIC);
  std::string msg = itr_error_message();
  EXPECT_NE(msg.find("layers.3.self_attn.q_proj"), std::string::npos) << msg;
  EXPECT_NE(msg.find("-alpha_2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("order 66"), std::string::npos) << msg;
  EXPECT_TRUE(same_string_on_all_ranks(MPI_COMM_WORLD, msg));
  EXPECT_EQ(y, std::vector<double>((size_t)d * R, 5.0));  // outputs untouched on failure
  itr_dist_grid_destroy(g);
  itr_error_clear();
}

TEST(DistSolve, NonFiniteStatisticsAreNumericErrorOnEveryRank) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  System sys(20, 3, 9);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 4, &g), ITR_OK);
  std::vector<double> t2p, rhsp, y((size_t)sys.d * sys.R);
  sys.partial(rank, size, t2p, rhsp);
  if (rank == size - 1) rhsp[5] = INFINITY;  // only on the last rank
  itr_err e = solve_partial(g, "layers.0.mlp.down_proj", sys.d, sys.R, t2p.data(), rhsp.data(), -1,
                                         y.data(), nullptr);
  EXPECT_EQ(e, ITR_ERR_NUMERIC);
  std::string msg = itr_error_message();
  EXPECT_NE(msg.find("layers.0.mlp.down_proj"), std::string::npos) << msg;
  EXPECT_TRUE(same_string_on_all_ranks(MPI_COMM_WORLD, msg));
  itr_dist_grid_destroy(g);
  itr_error_clear();
}

TEST(DistSolve, TwoProcessGroupsSolveDifferentSystemsAtOnce) {
  int rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm sub;
  const int color = rank % 2;
  MPI_Comm_split(MPI_COMM_WORLD, color, rank, &sub);
  if (color == 0)
    solve_and_check(sub, System(130, 7, 501), 32, 0);
  else
    solve_and_check(sub, System(64, 24, 502), 16, 1);
  MPI_Comm_free(&sub);
}

TEST(DistSolve, SizesDifferingOnLastRankAreRejectedEverywhere) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 0, &g), ITR_OK);
  const int d = rank == size - 1 ? 11 : 10, R = 2;
  std::vector<double> t2((size_t)d * d, 0.0), rhs((size_t)d * R, 0.0);
  for (int i = 0; i < d; i++) t2[(size_t)i * d + i] = 1.0;
  itr_dist_matrix T2, B, Y;
  ASSERT_EQ(itr_dist_matrix_init(&T2, g, d, d), ITR_OK);
  ASSERT_EQ(itr_dist_matrix_init(&B, g, d, R), ITR_OK);
  ASSERT_EQ(itr_dist_matrix_init(&Y, g, d, R), ITR_OK);
  itr_dist_matrix_scatter(&T2, t2.data());
  itr_dist_matrix_scatter(&B, rhs.data());
  itr_err e = itr_dist_solve_spd("mismatch", &T2, &B, &Y, nullptr);
  if (size == 1) {
    EXPECT_EQ(e, ITR_OK) << itr_error_message();
  } else {
    EXPECT_EQ(e, ITR_ERR_INTERNAL);
    std::string msg = itr_error_message();
    EXPECT_NE(msg.find("same on all ranks"), std::string::npos) << msg;
    EXPECT_TRUE(same_string_on_all_ranks(MPI_COMM_WORLD, msg));
  }
  itr_dist_matrix_fini(&T2);
  itr_dist_matrix_fini(&B);
  itr_dist_matrix_fini(&Y);
  itr_dist_grid_destroy(g);
  itr_error_clear();
}

TEST(DistSolve, AllocationFailureOnLastRankOnlyFailsEverywhere) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  System sys(40, 3, 77);
  itr_dist_grid *g = nullptr;
  ASSERT_EQ(itr_dist_grid_create(MPI_COMM_WORLD, 8, &g), ITR_OK);
  std::vector<double> t2p, rhsp, y((size_t)sys.d * sys.R);
  sys.partial(rank, size, t2p, rhsp);
  int k = 1;
  for (; k <= 40; k++) {
    if (rank == size - 1) itr_alloc_fail_after(k);
    itr_err e = solve_partial(g, "faulty", sys.d, sys.R, t2p.data(), rhsp.data(), -1, y.data(), nullptr);
    itr_alloc_fail_after(0);
    int fired = rank == size - 1 && e != ITR_OK, any = 0;
    MPI_Allreduce(&fired, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_EQ(e, any ? ITR_ERR_INTERNAL : ITR_OK) << "allocation " << k;
    if (any) {
      std::string msg = itr_error_message();
      EXPECT_NE(msg.find("injected fault"), std::string::npos) << msg;
      EXPECT_TRUE(same_string_on_all_ranks(MPI_COMM_WORLD, msg));
    } else {
      EXPECT_LT(rel_error(y, sys.reference_solution()), 1e-10);
      break;
    }
  }
  EXPECT_GT(k, 5);  // several allocations were exercised before one run went through
  itr_dist_grid_destroy(g);
  itr_error_clear();
}
