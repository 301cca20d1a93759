// HDF5 files: round trip, atomic publication, and the errors a reader gets.
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/io.h"

namespace {
std::string tmp_path(const char *name) {
  char dir[] = "/tmp/h5test.XXXXXX";
  std::string d = mkdtemp(dir);
  return d + "/" + name;
}
}  // namespace

TEST(H5File, RoundTripIsPublishedOnlyOnCommit) {
  std::string p = tmp_path("ck.h5");
  itr_h5 *h = nullptr;
  ASSERT_EQ(itr_h5_create(p.c_str(), &h), ITR_OK);
  std::vector<double> a = {1.5, -2.0, 3.25, 1e-300, 4.0, 5.0};
  int64_t dims[2] = {2, 3};
  ASSERT_EQ(itr_h5_write_f64(h, "layers.0/q_proj/A", 2, dims, a.data()), ITR_OK);
  ASSERT_EQ(itr_h5_set_attr(h, "fingerprint", "abc def"), ITR_OK);
  EXPECT_NE(access(p.c_str(), F_OK), 0) << "visible before commit";
  ASSERT_EQ(itr_h5_close(h, 1), ITR_OK);
  ASSERT_EQ(access(p.c_str(), F_OK), 0);

  ASSERT_EQ(itr_h5_open(p.c_str(), &h), ITR_OK);
  EXPECT_TRUE(itr_h5_has(h, "layers.0/q_proj/A"));
  EXPECT_FALSE(itr_h5_has(h, "layers.1/q_proj/A"));
  std::vector<double> b(6);
  ASSERT_EQ(itr_h5_read_f64(h, "layers.0/q_proj/A", 2, dims, b.data()), ITR_OK);
  EXPECT_EQ(a, b);
  char buf[64];
  ASSERT_EQ(itr_h5_get_attr(h, "fingerprint", buf, sizeof buf), ITR_OK);
  EXPECT_STREQ(buf, "abc def");
  int64_t wrong[2] = {3, 2};
  EXPECT_EQ(itr_h5_read_f64(h, "layers.0/q_proj/A", 2, wrong, b.data()), ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("layers.0/q_proj/A"), std::string::npos);
  EXPECT_EQ(itr_h5_read_f64(h, "missing", 2, dims, b.data()), ITR_ERR_INPUT);
  EXPECT_EQ(itr_h5_get_attr(h, "nope", buf, sizeof buf), ITR_ERR_INPUT);
  ASSERT_EQ(itr_h5_close(h, 0), ITR_OK);
  std::remove(p.c_str());
  rmdir(p.substr(0, p.rfind('/')).c_str());
}

TEST(H5File, DiscardLeavesNothingAndGarbageIsRejected) {
  std::string p = tmp_path("gone.h5");
  itr_h5 *h = nullptr;
  ASSERT_EQ(itr_h5_create(p.c_str(), &h), ITR_OK);
  ASSERT_EQ(itr_h5_close(h, 0), ITR_OK);
  EXPECT_NE(access(p.c_str(), F_OK), 0);
  FILE *f = std::fopen(p.c_str(), "w");
  std::fputs("not hdf5", f);
  std::fclose(f);
  EXPECT_EQ(itr_h5_open(p.c_str(), &h), ITR_ERR_INPUT);
  EXPECT_NE(std::string(itr_error_message()).find("not a readable HDF5 file"), std::string::npos);
  std::remove(p.c_str());
  rmdir(p.substr(0, p.rfind('/')).c_str());
}
