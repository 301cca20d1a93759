// safetensors reader: a hand-made valid file, then a table of hostile files (each built byte by
// byte, without the writer) with the message each must produce, element checks (NaN, infinity,
// f64 beyond f32's range), the header size cap, and itr_tensor_check_shape's message.
#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/io.h"
#include "st_test_util.h"

using st_test::f32_bytes;
using st_test::f64_bytes;
using st_test::has_error;
using st_test::st_bytes;
using st_test::TempDir;

namespace {

std::string entry(const std::string &name, const std::string &dtype, const std::string &shape, long b, long e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(b) + "," + std::to_string(e) + "]}";
}

// A valid two-tensor file: a (2) F32 = [1, 2], b (1, 2) F16 = [1, -2].
std::string valid_file() {
  std::string hdr = "{\"__metadata__\":{\"format\":\"pt\"}," + entry("a", "F32", "[2]", 0, 8) + "," +
                    entry("b", "F16", "[1,2]", 8, 12) + "}";
  std::string data = f32_bytes({1.0f, 2.0f});
  data += std::string("\x00\x3c\x00\xc0", 4); // half 1.0 = 0x3c00, -2.0 = 0xc000
  return st_bytes(hdr, data);
}

enum Stage { OPEN, READ_F32, READ_F64 };

struct HostileCase {
  const char *name;
  std::function<std::string()> bytes;
  const char *expect; // substring of the message
  Stage stage;
};

std::string one(const std::string &e, const std::string &data) { return st_bytes("{" + e + "}", data); }

const HostileCase kCases[] = {
    {"empty file", [] { return std::string(); }, "is 0 bytes, shorter than the 8-byte header length", OPEN},
    {"file shorter than 8 bytes", [] { return std::string("\x02\x00\x00", 3); }, "is 3 bytes, shorter than", OPEN},
    {"header longer than file",
     [] { return st_test::le64(1000) + "{}"; }, "header length 1000 exceeds the 2 bytes after", OPEN},
    {"truncated file (data cut short)",
     [] {
       std::string s = valid_file();
       return s.substr(0, s.size() - 3);
     },
     "'b': data_offsets [8, 12] run past the end of the 9-byte data buffer", OPEN},
    {"truncated file (header cut short)",
     [] {
       std::string s = valid_file();
       return s.substr(0, 20);
     },
     "exceeds the 12 bytes after", OPEN},
    {"bad JSON", [] { return st_bytes("{\"a\": {\"dtype\": ", ""); }, "header is not valid JSON", OPEN},
    {"header not an object", [] { return st_bytes("[1, 2]  ", ""); }, "header is a list, expected a JSON object",
     OPEN},
    {"garbage after the JSON", [] { return st_bytes("{} x", ""); }, "unexpected bytes after the JSON header at byte 3",
     OPEN},
    {"NUL padding instead of spaces", [] { return st_bytes(std::string("{}\0\0\0\0\0\0", 8), ""); },
     "unexpected bytes after the JSON header", OPEN},
    {"offsets past the end", [] { return one(entry("w", "F32", "[4]", 0, 16), f32_bytes({1, 2})); },
     "'w': data_offsets [0, 16] run past the end of the 8-byte data buffer", OPEN},
    {"begin > end", [] { return one(entry("w", "F32", "[0]", 8, 0), f32_bytes({1, 2})); },
     "'w': data_offsets [8, 0] has begin > end", OPEN},
    {"overlapping tensors",
     [] { return one(entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12), f32_bytes({1, 2, 3})); },
     "tensors 'a' [0, 8) and 'b' [4, 12) overlap", OPEN},
    {"byte span not matching shape", [] { return one(entry("w", "F32", "[3]", 0, 8), f32_bytes({1, 2})); },
     "'w': data_offsets [0, 8] span 8 bytes, but shape (3) of F32 needs 12 bytes", OPEN},
    {"byte span not matching dtype", [] { return one(entry("w", "F64", "[2]", 0, 8), f32_bytes({1, 2})); },
     "shape (2) of F64 needs 16 bytes", OPEN},
    {"bytes left over", [] { return one(entry("w", "F32", "[2]", 0, 8), f32_bytes({1, 2, 3})); },
     "4 bytes left over: data buffer bytes [8, 12) belong to no tensor", OPEN},
    {"gap between tensors",
     [] { return one(entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12), f32_bytes({1, 2, 3})); },
     "bytes [4, 8) of the data buffer belong to no tensor (gap before tensor 'b')", OPEN},
    {"gap at the start", [] { return one(entry("a", "F32", "[1]", 4, 8), f32_bytes({1, 2})); },
     "bytes [0, 4) of the data buffer belong to no tensor (gap before tensor 'a')", OPEN},
    {"no tensor but data", [] { return st_bytes("{}      ", f32_bytes({1, 2})); }, "8 bytes left over", OPEN},
    {"unknown dtype", [] { return one(entry("ids", "I64", "[1]", 0, 8), f64_bytes({1})); },
     "'ids': dtype 'I64' is not supported", OPEN},
    {"dtype not a string",
     [] { return one("\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}", f32_bytes({1})); },
     "'w': field \"dtype\" is a number", OPEN},
    {"dtype missing", [] { return one("\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}", f32_bytes({1})); },
     "'w': field \"dtype\" is missing", OPEN},
    {"duplicate names",
     [] { return one(entry("a", "F32", "[1]", 0, 4) + "," + entry("a", "F32", "[1]", 4, 8), f32_bytes({1, 2})); },
     "tensor 'a' appears twice in the header", OPEN},
    {"duplicate __metadata__",
     [] { return one("\"__metadata__\":{},\"__metadata__\":{}," + entry("a", "F32", "[1]", 0, 4), f32_bytes({1})); },
     "\"__metadata__\" appears twice", OPEN},
    {"duplicate metadata key",
     [] { return one("\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}", ""); }, "__metadata__ key 'k' appears twice",
     OPEN},
    {"negative shape", [] { return one(entry("w", "F32", "[-1]", 0, 0), ""); }, "'w': shape[0] is -1, expected a",
     OPEN},
    {"fractional shape", [] { return one(entry("w", "F32", "[1.5]", 0, 4), f32_bytes({1})); },
     "'w': shape[0] is 1.5", OPEN},
    {"shape not a list", [] { return one(entry("w", "F32", "4", 0, 16), f32_bytes({1, 2, 3, 4})); },
     "'w': field \"shape\" is a number, expected a list", OPEN},
    {"too many dimensions", [] { return one(entry("w", "F32", "[1,1,1,1,1,1,1,1,1]", 0, 4), f32_bytes({1})); },
     "'w': shape has 9 dimensions, more than the 8 supported", OPEN},
    {"shape product overflow",
     [] { return one(entry("w", "F32", "[4294967296,4294967296,4294967296]", 0, 0), ""); },
     "'w': shape (4294967296, 4294967296, 4294967296) has too many elements", OPEN},
    {"byte count overflow",
     [] { return one(entry("w", "F64", "[4503599627370496,1024]", 0, 0), ""); },
     "'w': shape (4503599627370496, 1024) has too many elements: its byte count overflows", OPEN},
    {"data_offsets of length 1",
     [] { return one("\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}", f32_bytes({1})); },
     "'w': field \"data_offsets\" is a list whose length is not 2", OPEN},
    {"data_offsets not numbers",
     [] { return one("\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",4]}", f32_bytes({1})); },
     "'w': data_offsets holds a string", OPEN},
    {"data_offsets beyond 2^53",
     [] { return one("\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e300]}", f32_bytes({1})); },
     "'w': data_offsets holds 1.0000000000000001e+300", OPEN},
    {"entry not an object", [] { return one("\"w\":3", ""); }, "'w': entry is a number, expected an object", OPEN},
    {"empty tensor name", [] { return one(entry("", "F32", "[1]", 0, 4), f32_bytes({1})); }, "empty name", OPEN},
    {"non-string metadata",
     [] { return one("\"__metadata__\":{\"step\":100}," + entry("w", "F32", "[1]", 0, 4), f32_bytes({1})); },
     "__metadata__ value of key 'step' is a number, expected a string", OPEN},
    {"metadata not an object", [] { return one("\"__metadata__\":\"pt\"", ""); },
     "\"__metadata__\" is a string, expected an object", OPEN},
    {"NaN in a weight (f32)",
     [] { return one(entry("w", "F32", "[2,2]", 0, 16), f32_bytes({1, 2, 3, NAN})); },
     "tensor 'w': element 3 at index (1, 1) is NaN", READ_F32},
    {"NaN in a weight (f64 read)",
     [] { return one(entry("w", "F32", "[2,2]", 0, 16), f32_bytes({1, NAN, 3, 4})); },
     "tensor 'w': element 1 at index (0, 1) is NaN", READ_F64},
    {"infinity in a bf16 weight",
     [] { return one(entry("w", "BF16", "[3]", 0, 6), std::string("\x80\x3f\x80\xff\x00\x00", 6)); },
     "tensor 'w': element 1 at index (1) is -infinity", READ_F32},
    {"infinity in a f16 weight",
     [] { return one(entry("w", "F16", "[2]", 0, 4), std::string("\x00\x7c\x00\x00", 4)); },
     "tensor 'w': element 0 at index (0) is +infinity", READ_F64},
    {"f64 beyond f32's range",
     [] { return one(entry("w", "F64", "[2]", 0, 16), f64_bytes({1.0, 1e300})); },
     "tensor 'w': element 1 at index (1) is 1e+300, beyond the range of float32", READ_F32},
};

} // namespace

TEST(SafetensorsRead, ValidHandMadeFile) {
  TempDir dir;
  std::string path = dir.file("v.safetensors");
  st_test::write_file(path, valid_file());
  itr_safetensors *st = nullptr;
  ASSERT_EQ(itr_safetensors_open(path.c_str(), &st), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_safetensors_count(st), 2);
  EXPECT_STREQ(itr_safetensors_metadata(st, "format"), "pt");
  const itr_tensor_info *b = itr_safetensors_find(st, "b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b, itr_safetensors_at(st, 1));
  EXPECT_EQ(b->dtype, ITR_F16);
  float f[2];
  double d[2];
  ASSERT_EQ(itr_tensor_read_f32(b, f), ITR_OK);
  ASSERT_EQ(itr_tensor_read_f64(b, d), ITR_OK);
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], -2.0f);
  EXPECT_EQ(d[1], -2.0);
  const itr_tensor_info *a = itr_safetensors_find(st, "a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(itr_tensor_read_f64(a, d), ITR_OK);
  EXPECT_EQ(d[0], 1.0);
  EXPECT_EQ(d[1], 2.0);
  // Tensors listed in the header out of buffer order are fine as long as they tile it.
  itr_safetensors_destroy(st);
  std::string hdr = "{" + entry("late", "F32", "[1]", 4, 8) + "," + entry("early", "F32", "[1]", 0, 4) + "}";
  st_test::write_file(path, st_bytes(hdr, f32_bytes({5, 6})));
  ASSERT_EQ(itr_safetensors_open(path.c_str(), &st), ITR_OK) << itr_error_message();
  EXPECT_STREQ(itr_safetensors_at(st, 0)->name, "late");
  ASSERT_EQ(itr_tensor_read_f32(itr_safetensors_find(st, "late"), f), ITR_OK);
  EXPECT_EQ(f[0], 6.0f);
  itr_safetensors_destroy(st);
}

TEST(SafetensorsRead, HostileFileTable) {
  TempDir dir;
  int n_open = 0;
  for (const HostileCase &c : kCases) {
    SCOPED_TRACE(c.name);
    std::string path = dir.file("hostile.safetensors");
    st_test::write_file(path, c.bytes());
    itr_error_clear();
    itr_safetensors *sentinel = reinterpret_cast<itr_safetensors *>(0x1);
    itr_safetensors *st = sentinel;
    itr_err err = itr_safetensors_open(path.c_str(), &st);
    if (c.stage == OPEN) {
      n_open++;
      EXPECT_TRUE(has_error(err, ITR_ERR_INPUT, {c.expect, "'" + path + "'"}));
      EXPECT_EQ(st, sentinel) << "out-parameter written on failure";
      if (err == ITR_OK && st != sentinel) itr_safetensors_destroy(st);
      continue;
    }
    ASSERT_EQ(err, ITR_OK) << itr_error_message();
    const itr_tensor_info *t = itr_safetensors_at(st, 0);
    ASSERT_NE(t, nullptr);
    std::vector<float> f((size_t)t->numel);
    std::vector<double> d((size_t)t->numel);
    err = c.stage == READ_F32 ? itr_tensor_read_f32(t, f.data()) : itr_tensor_read_f64(t, d.data());
    EXPECT_TRUE(has_error(err, ITR_ERR_INPUT, {c.expect, "'" + path + "'"}));
    itr_safetensors_destroy(st);
  }
  EXPECT_GE(n_open, 15);
}

TEST(SafetensorsRead, F64BeyondF32IsFineAsF64) {
  TempDir dir;
  std::string path = dir.file("big.safetensors");
  st_test::write_file(path, one(entry("w", "F64", "[2]", 0, 16), f64_bytes({1.0, 1e300})));
  itr_safetensors *st = nullptr;
  ASSERT_EQ(itr_safetensors_open(path.c_str(), &st), ITR_OK);
  double d[2];
  ASSERT_EQ(itr_tensor_read_f64(itr_safetensors_find(st, "w"), d), ITR_OK);
  EXPECT_EQ(d[1], 1e300);
  itr_safetensors_destroy(st);
}

TEST(SafetensorsRead, MissingFileAndFolder) {
  TempDir dir;
  itr_safetensors *st = nullptr;
  std::string path = dir.file("absent.safetensors");
  EXPECT_TRUE(has_error(itr_safetensors_open(path.c_str(), &st), ITR_ERR_INPUT, {"cannot open", path}));
  EXPECT_TRUE(has_error(itr_safetensors_open(dir.path().c_str(), &st), ITR_ERR_INPUT, {"not a regular file"}));
  EXPECT_EQ(st, nullptr);
}

TEST(SafetensorsRead, HeaderLengthCap) {
  // A sparse 101 MiB file whose header claims all of it: refused before parsing.
  TempDir dir;
  std::string path = dir.file("huge.safetensors");
  uint64_t n = (uint64_t)101 << 20;
  st_test::write_file(path, st_test::le64(n));
  ASSERT_EQ(truncate(path.c_str(), (off_t)(n + 8)), 0);
  itr_safetensors *st = nullptr;
  EXPECT_TRUE(has_error(itr_safetensors_open(path.c_str(), &st), ITR_ERR_INPUT,
                        {"header length 105906176 exceeds the limit of 104857600 bytes", path}));
  EXPECT_EQ(st, nullptr);
}

TEST(SafetensorsRead, CheckShapeMessage) {
  TempDir dir;
  std::string path = dir.file("v.safetensors");
  st_test::write_file(path, valid_file());
  itr_safetensors *st = nullptr;
  ASSERT_EQ(itr_safetensors_open(path.c_str(), &st), ITR_OK);
  const itr_tensor_info *b = itr_safetensors_find(st, "b");
  int64_t good[2] = {1, 2}, bad[2] = {2, 1}, flat[1] = {2};
  EXPECT_EQ(itr_tensor_check_shape(b, 2, good, "x"), ITR_OK);
  EXPECT_TRUE(has_error(itr_tensor_check_shape(b, 2, bad, "the base model's q_proj"), ITR_ERR_INPUT,
                        {"file '" + path + "': tensor 'b' has shape (1, 2), but the base model's q_proj has shape "
                         "(2, 1)"}));
  EXPECT_TRUE(has_error(itr_tensor_check_shape(b, 1, flat, "a vector"), ITR_ERR_INPUT,
                        {"has shape (1, 2), but a vector has shape (2)"}));
  itr_safetensors_destroy(st);
}

TEST(SafetensorsRead, FaultInjectionOnOpen) {
  TempDir dir;
  std::string path = dir.file("v.safetensors");
  st_test::write_file(path, valid_file());
  long k = 1;
  for (; k < 1000; k++) {
    itr_alloc_fail_after(k);
    itr_safetensors *st = nullptr;
    itr_err err = itr_safetensors_open(path.c_str(), &st);
    itr_alloc_fail_after(0);
    if (err == ITR_OK) {
      EXPECT_EQ(itr_safetensors_count(st), 2);
      itr_safetensors_destroy(st);
      break;
    }
    EXPECT_TRUE(has_error(err, ITR_ERR_INTERNAL, {"injected fault"})) << "allocation " << k;
    EXPECT_EQ(st, nullptr);
  }
  EXPECT_GT(k, 5);
  EXPECT_LT(k, 1000);
}
