// gtest main for tests/unit: no MPI, so the tests can run under LeakSanitizer.
// Ends with a machine-readable line that tests/run.sh counts:
// "GTEST_SUMMARY passed=X failed=Y skipped=Z" (a skipped test is not a passed one).
#include <cstdio>

#include <gtest/gtest.h>

int main(int argc, char **argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS();
  const auto *u = ::testing::UnitTest::GetInstance();
  // gtest counts a skipped test as successful too
  std::printf("GTEST_SUMMARY passed=%d failed=%d skipped=%d\n", u->successful_test_count() - u->skipped_test_count(),
              u->failed_test_count(), u->skipped_test_count());
  return rc;
}
