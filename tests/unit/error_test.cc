// Error messages, traceback frames, exit codes and the checked allocator.
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "iteris/core.h"

namespace {
itr_err inner(int x) {
  ITR_CHECK(x > 0, ITR_ERR_INPUT, "x must be positive, got %d", x);
  return ITR_OK;
}
itr_err outer(int x) {
  ITR_TRY(inner(x));
  return ITR_OK;
}
}  // namespace

TEST(Error, CheckAndTraceback) {
  itr_error_clear();
  EXPECT_EQ(outer(1), ITR_OK);
  EXPECT_EQ(outer(-3), ITR_ERR_INPUT);
  std::string m = itr_error_message();
  EXPECT_EQ(m.rfind("x must be positive, got -3", 0), 0u);
  EXPECT_NE(m.find("in outer (error_test.cc:"), std::string::npos);
  char head[64];
  itr_error_headline(head, sizeof head);
  EXPECT_STREQ(head, "x must be positive, got -3");
  EXPECT_EQ(itr_exit_code(ITR_ERR_INPUT), 2);
  EXPECT_EQ(itr_exit_code(ITR_ERR_NUMERIC), 3);
  EXPECT_EQ(itr_exit_code(ITR_ERR_INTERNAL), 4);
  EXPECT_EQ(itr_exit_code(ITR_OK), 0);
}

TEST(Alloc, OverflowAndInjectedFault) {
  void *p = nullptr;
  EXPECT_EQ(itr_calloc(SIZE_MAX / 2, 4, "huge", &p), ITR_ERR_INPUT);
  EXPECT_EQ(p, nullptr);
  itr_alloc_fail_after(2);
  EXPECT_EQ(itr_calloc(4, 4, "first", &p), ITR_OK);
  free(p);
  p = nullptr;
  EXPECT_EQ(itr_calloc(4, 4, "second", &p), ITR_ERR_INTERNAL);
  EXPECT_NE(std::string(itr_error_message()).find("second"), std::string::npos);
  EXPECT_EQ(itr_calloc(4, 4, "third", &p), ITR_OK);
  free(p);
}
