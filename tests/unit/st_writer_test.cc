// safetensors writer: exact bytes of a small file (against a hand-written header), round trip
// through the reader in every dtype, metadata, sorting, atomic write, argument checks, and
// fault injection (every allocation of a write + read round trip fails in turn).
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/io.h"
#include "st_test_util.h"

using st_test::has_error;
using st_test::TempDir;

TEST(StWriter, ExactBytesOfASmallFile) {
  TempDir dir;
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  const float b[3] = {1.0f, -2.0f, 0.5f};
  const double a[1] = {3.25};
  int64_t sb[1] = {3}, sa[2] = {1, 1};
  // Added out of order: the file stores them sorted by name.
  ASSERT_EQ(itr_st_writer_add(w, "b", ITR_F32, 1, sb, b), ITR_OK);
  ASSERT_EQ(itr_st_writer_add(w, "a", ITR_F64, 2, sa, a), ITR_OK);
  ASSERT_EQ(itr_st_writer_set_metadata(w, "format", "pt"), ITR_OK);
  std::string path = dir.file("x.safetensors");
  ASSERT_EQ(itr_st_writer_write(w, path.c_str()), ITR_OK) << itr_error_message();
  itr_st_writer_destroy(w);

  std::string hdr =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"a\":{\"dtype\":\"F64\",\"shape\":[1,1],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[8,20]}}";
  while ((8 + hdr.size()) % 8) hdr += ' ';
  std::string want = st_test::st_bytes(hdr, st_test::f64_bytes({3.25}) + st_test::f32_bytes({1.0f, -2.0f, 0.5f}));
  EXPECT_EQ(st_test::read_file(path), want);
  // No temporary file is left behind.
  std::string tmp = path + ".tmp." + std::to_string((long)getpid());
  EXPECT_NE(access(tmp.c_str(), F_OK), 0);
}

TEST(StWriter, RoundTripEveryDtype) {
  TempDir dir;
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  // Values exactly representable in half and bfloat16 (k/8 with small k), so every dtype must
  // give them back exactly.
  std::vector<float> v(6);
  for (int i = 0; i < 6; i++) v[i] = (float)(i - 2) / 8.0f;
  int64_t shp[2] = {2, 3};
  const char *names[4] = {"t.f32", "t.f16", "t.bf16", "t.f64"};
  itr_dtype dts[4] = {ITR_F32, ITR_F16, ITR_BF16, ITR_F64};
  for (int k = 0; k < 4; k++) ASSERT_EQ(itr_st_writer_add_f32(w, names[k], dts[k], 2, shp, v.data()), ITR_OK);
  double raw[2] = {1e-300, -7.0}; // not representable in f32: read_f64 must keep it exactly
  int64_t s1[1] = {2};
  ASSERT_EQ(itr_st_writer_add(w, "raw.f64", ITR_F64, 1, s1, raw), ITR_OK);
  int64_t s0[1] = {0};
  ASSERT_EQ(itr_st_writer_add(w, "empty", ITR_F32, 1, s0, nullptr), ITR_OK);
  ASSERT_EQ(itr_st_writer_add(w, "scalar", ITR_F32, 0, nullptr, v.data() + 5), ITR_OK);
  ASSERT_EQ(itr_st_writer_set_metadata(w, "k", "old"), ITR_OK);
  ASSERT_EQ(itr_st_writer_set_metadata(w, "k", "new \"quoted\" \\ \n"), ITR_OK);
  ASSERT_EQ(itr_st_writer_set_metadata(w, "other", ""), ITR_OK);
  std::string path = dir.file("rt.safetensors");
  ASSERT_EQ(itr_st_writer_write(w, path.c_str()), ITR_OK) << itr_error_message();
  itr_st_writer_destroy(w);

  std::string bytes = st_test::read_file(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | (unsigned char)bytes[i];
  EXPECT_EQ((8 + n) % 8, 0u) << "header must be padded to a multiple of 8";

  itr_safetensors *st = nullptr;
  ASSERT_EQ(itr_safetensors_open(path.c_str(), &st), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_safetensors_count(st), 7);
  EXPECT_STREQ(itr_safetensors_path(st), path.c_str());
  // File order is the header order, which the writer sorts by name.
  const char *sorted[7] = {"empty", "raw.f64", "scalar", "t.bf16", "t.f16", "t.f32", "t.f64"};
  for (int i = 0; i < 7; i++) EXPECT_STREQ(itr_safetensors_at(st, i)->name, sorted[i]);
  EXPECT_EQ(itr_safetensors_at(st, 7), nullptr);
  EXPECT_EQ(itr_safetensors_at(st, -1), nullptr);
  EXPECT_STREQ(itr_safetensors_metadata(st, "k"), "new \"quoted\" \\ \n");
  EXPECT_STREQ(itr_safetensors_metadata(st, "other"), "");
  EXPECT_EQ(itr_safetensors_metadata(st, "absent"), nullptr);
  EXPECT_EQ(itr_safetensors_find(st, "t.f3"), nullptr);

  for (int k = 0; k < 4; k++) {
    const itr_tensor_info *t = itr_safetensors_find(st, names[k]);
    ASSERT_NE(t, nullptr) << names[k];
    EXPECT_EQ(t->dtype, dts[k]);
    EXPECT_EQ(t->ndim, 2);
    EXPECT_EQ(t->shape[0], 2);
    EXPECT_EQ(t->shape[1], 3);
    EXPECT_EQ(t->numel, 6);
    EXPECT_EQ(t->nbytes, 6 * itr_dtype_size(dts[k]));
    EXPECT_STREQ(t->file, path.c_str());
    float f[6];
    double d[6];
    ASSERT_EQ(itr_tensor_read_f32(t, f), ITR_OK);
    ASSERT_EQ(itr_tensor_read_f64(t, d), ITR_OK);
    for (int i = 0; i < 6; i++) {
      EXPECT_EQ(f[i], (float)(i - 2) / 8.0f) << names[k] << " element " << i;
      EXPECT_EQ(d[i], (double)(i - 2) / 8.0) << names[k] << " element " << i;
    }
  }
  const itr_tensor_info *r = itr_safetensors_find(st, "raw.f64");
  ASSERT_NE(r, nullptr);
  double d2[2];
  ASSERT_EQ(itr_tensor_read_f64(r, d2), ITR_OK);
  EXPECT_EQ(d2[0], 1e-300);
  EXPECT_EQ(d2[1], -7.0);
  const itr_tensor_info *e = itr_safetensors_find(st, "empty");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->numel, 0);
  EXPECT_EQ(e->nbytes, 0u);
  EXPECT_EQ(itr_tensor_read_f32(e, nullptr), ITR_OK);
  const itr_tensor_info *s = itr_safetensors_find(st, "scalar");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->ndim, 0);
  EXPECT_EQ(s->numel, 1);
  float sv = 0;
  ASSERT_EQ(itr_tensor_read_f32(s, &sv), ITR_OK);
  EXPECT_EQ(sv, 3.0f / 8.0f);
  itr_safetensors_destroy(st);
}

TEST(StWriter, ReplacesAnExistingFile) {
  TempDir dir;
  std::string path = dir.file("x.safetensors");
  st_test::write_file(path, "old contents");
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  ASSERT_EQ(itr_st_writer_write(w, path.c_str()), ITR_OK); // no tensor at all is a valid file
  itr_st_writer_destroy(w);
  std::string want = st_test::st_bytes("{}      ", "");
  EXPECT_EQ(st_test::read_file(path), want);
  itr_safetensors *st = nullptr;
  ASSERT_EQ(itr_safetensors_open(path.c_str(), &st), ITR_OK) << itr_error_message();
  EXPECT_EQ(itr_safetensors_count(st), 0);
  itr_safetensors_destroy(st);
}

TEST(StWriter, RejectsBadArguments) {
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  float x[2] = {1, 2};
  int64_t s[1] = {2}, neg[1] = {-1}, big[3] = {INT64_MAX / 2, INT64_MAX / 2, 4};
  ASSERT_EQ(itr_st_writer_add(w, "a", ITR_F32, 1, s, x), ITR_OK);
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "a", ITR_F32, 1, s, x), ITR_ERR_INPUT, {"'a' added twice"}));
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "", ITR_F32, 1, s, x), ITR_ERR_INPUT, {"non-empty name"}));
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "__metadata__", ITR_F32, 1, s, x), ITR_ERR_INPUT, {"reserved"}));
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "n", ITR_F32, 1, neg, x), ITR_ERR_INPUT, {"'n'", "negative"}));
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "o", ITR_F32, 3, big, x), ITR_ERR_INPUT, {"'o'", "overflows"}));
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "d", (itr_dtype)9, 1, s, x), ITR_ERR_INPUT, {"unknown dtype"}));
  EXPECT_TRUE(has_error(itr_st_writer_add(w, "m", ITR_F32, ITR_MAX_DIMS + 1, s, x), ITR_ERR_INPUT,
                        {"dimensions"}));
  EXPECT_TRUE(has_error(itr_st_writer_add_f32(w, "a", ITR_F16, 1, s, x), ITR_ERR_INPUT, {"added twice"}));
  itr_st_writer_destroy(w);
}

TEST(StWriter, MissingFolderNamesThePath) {
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  EXPECT_TRUE(has_error(itr_st_writer_write(w, "/nonexistent_itr_dir/x.safetensors"), ITR_ERR_INPUT,
                        {"/nonexistent_itr_dir/x.safetensors.tmp.", "Does the folder exist"}));
  itr_st_writer_destroy(w);
}

// One write + read round trip; returns the first error (and cleans up after itself).
static itr_err round_trip(const std::string &path) {
  itr_st_writer *w = nullptr;
  itr_safetensors *st = nullptr;
  itr_err err = ITR_OK;
  float v[4] = {1, 2, 3, 4};
  int64_t s[2] = {2, 2};
  float back[4];
  if ((err = itr_st_writer_create(&w))) goto out;
  for (int i = 0; i < 20 && !err; i++) // enough tensors to grow the list past its first capacity
    err = itr_st_writer_add_f32(w, ("t" + std::to_string(i)).c_str(), i % 2 ? ITR_BF16 : ITR_F32, 2, s, v);
  if (err) goto out;
  if ((err = itr_st_writer_add(w, "raw", ITR_F32, 2, s, v))) goto out;
  for (int i = 0; i < 20 && !err; i++)
    err = itr_st_writer_set_metadata(w, ("k" + std::to_string(i)).c_str(), "v");
  if (err) goto out;
  if ((err = itr_st_writer_set_metadata(w, "k0", "again"))) goto out;
  if ((err = itr_st_writer_write(w, path.c_str()))) goto out;
  if ((err = itr_safetensors_open(path.c_str(), &st))) goto out;
  if ((err = itr_tensor_read_f32(itr_safetensors_find(st, "t3"), back))) goto out;
  if (back[3] != 4.0f || itr_safetensors_count(st) != 21 || strcmp(itr_safetensors_metadata(st, "k0"), "again"))
    err = ITR_ERR_NUMERIC;
out:
  itr_safetensors_destroy(st);
  itr_st_writer_destroy(w);
  return err;
}

TEST(StWriter, FaultInjectionEveryAllocation) {
  TempDir dir;
  std::string path = dir.file("fi.safetensors");
  long k = 1;
  for (; k < 10000; k++) {
    itr_error_clear();
    itr_alloc_fail_after(k);
    unlink(path.c_str());
    itr_err err = round_trip(path);
    itr_alloc_fail_after(0);
    if (err == ITR_OK) break;
    ASSERT_TRUE(has_error(err, ITR_ERR_INTERNAL, {"injected fault"})) << "allocation " << k;
    // A failed write leaves neither the file nor its temporary.
    struct stat sb;
    std::string tmp = path + ".tmp." + std::to_string((long)getpid());
    EXPECT_NE(stat(tmp.c_str(), &sb), 0) << "allocation " << k;
  }
  EXPECT_GT(k, 40) << "the round trip should make dozens of allocations";
  EXPECT_LT(k, 10000);
}
