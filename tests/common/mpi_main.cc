// gtest main for tests/mpi: MPI, then PETSc; every test runs on every rank; rank 0 prints. After all tests, the
// per-test verdicts are max-reduced so a failure on any rank fails the test everywhere; rank 0
// prints "GTEST_SUMMARY passed=X failed=Y skipped=Z" for tests/run.sh (a test skipped on any rank is
// skipped, not passed). Assertion hooks never communicate.
#include <mpi.h>
#include <petscsys.h>

#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace {
// On ranks other than 0: print failed assertions (prefixed by the rank) and nothing else.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult &r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
  }

 private:
  int rank_;
};
}  // namespace

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  // PETSc after MPI (then MPI_Finalize is ours): the pipeline's tests register log stages and events
  if (PetscInitializeNoArguments() != 0) {
    std::fprintf(stderr, "PETSc failed to start\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  PetscPushErrorHandler(PetscReturnErrorHandler, NULL);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ::testing::InitGoogleTest(&argc, argv);
  auto &listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int gtest_rc = RUN_ALL_TESTS();
  (void)gtest_rc;

  const auto *u = ::testing::UnitTest::GetInstance();
  std::vector<int> failed, skipped;
  std::vector<std::string> names;
  for (int i = 0; i < u->total_test_suite_count(); i++) {
    const auto *s = u->GetTestSuite(i);
    for (int j = 0; j < s->total_test_count(); j++) {
      const auto *t = s->GetTestInfo(j);
      if (!t->should_run()) continue;
      failed.push_back(t->result()->Failed() ? 1 : 0);
      skipped.push_back(t->result()->Skipped() ? 1 : 0);
      names.push_back(std::string(s->name()) + "." + t->name());
    }
  }
  std::vector<int> any(failed.size()), all_skipped(skipped.size());
  MPI_Allreduce(failed.data(), any.data(), (int)failed.size(), MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(skipped.data(), all_skipped.data(), (int)skipped.size(), MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  int npass = 0, nfail = 0, nskip = 0;
  for (size_t k = 0; k < any.size(); k++) {
    if (any[k]) {
      nfail++;
      if (rank == 0) std::printf("FAILED on some rank (np=%d): %s\n", size, names[k].c_str());
    } else if (all_skipped[k]) {  // skipped on some rank: it did not run everywhere, so it did not pass
      nskip++;
      if (rank == 0) std::printf("SKIPPED (np=%d): %s\n", size, names[k].c_str());
    } else {
      npass++;
    }
  }
  if (rank == 0) std::printf("GTEST_SUMMARY passed=%d failed=%d skipped=%d\n", npass, nfail, nskip);
  PetscFinalize();
  MPI_Finalize();
  return nfail ? 1 : 0;
}
