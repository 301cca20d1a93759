// Tensor store: a sharded folder written with the writer (names across 2 shards, shards opened
// lazily), a single-file folder, and hostile indexes (missing shard, a name its shard lacks,
// shard names escaping the folder, duplicates), plus fault injection on open + get.
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/io.h"
#include "st_test_util.h"

using st_test::has_error;
using st_test::TempDir;

namespace {

// Writes a shard holding the given names, each a (2) F32 tensor [v, v + 0.5] with v its index
// in the list plus base.
void write_shard(const std::string &path, const std::vector<std::string> &names, float base) {
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  std::vector<float> data(2 * names.size());
  int64_t s[1] = {2};
  for (size_t i = 0; i < names.size(); i++) {
    data[2 * i] = base + (float)i;
    data[2 * i + 1] = base + (float)i + 0.5f;
    ASSERT_EQ(itr_st_writer_add(w, names[i].c_str(), ITR_F32, 1, s, &data[2 * i]), ITR_OK);
  }
  ASSERT_EQ(itr_st_writer_write(w, path.c_str()), ITR_OK) << itr_error_message();
  itr_st_writer_destroy(w);
}

// A two-shard folder: shard 1 holds b, d; shard 2 holds a, c.
void write_sharded(const TempDir &dir, const std::string &index) {
  write_shard(dir.file("model-00001-of-00002.safetensors"), {"b", "d"}, 10);
  write_shard(dir.file("model-00002-of-00002.safetensors"), {"a", "c"}, 20);
  st_test::write_file(dir.file("model.safetensors.index.json"), index);
}

const char *kIndex =
    "{\"metadata\": {\"total_size\": 32},\n"
    " \"weight_map\": {\"d\": \"model-00001-of-00002.safetensors\",\n"
    "                \"a\": \"model-00002-of-00002.safetensors\",\n"
    "                \"b\": \"model-00001-of-00002.safetensors\",\n"
    "                \"c\": \"model-00002-of-00002.safetensors\"}}\n";

} // namespace

TEST(TensorStore, ShardedFolderLazyOpen) {
  TempDir dir;
  write_sharded(dir, kIndex);
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(dir.path().c_str(), &s), ITR_OK) << itr_error_message();
  EXPECT_STREQ(itr_tensor_store_dir(s), dir.path().c_str());
  ASSERT_EQ(itr_tensor_store_count(s), 4);
  const char *sorted[4] = {"a", "b", "c", "d"};
  for (int i = 0; i < 4; i++) EXPECT_STREQ(itr_tensor_store_name(s, i), sorted[i]);
  EXPECT_EQ(itr_tensor_store_name(s, 4), nullptr);
  EXPECT_TRUE(itr_tensor_store_has(s, "c"));
  EXPECT_FALSE(itr_tensor_store_has(s, "e"));

  // Lazy: deleting shard 1 after open does not matter as long as only shard 2 is touched.
  ASSERT_EQ(unlink(dir.file("model-00001-of-00002.safetensors").c_str()), 0);
  const itr_tensor_info *t = nullptr;
  ASSERT_EQ(itr_tensor_store_get(s, "c", &t), ITR_OK) << itr_error_message();
  float f[2];
  ASSERT_EQ(itr_tensor_read_f32(t, f), ITR_OK);
  EXPECT_EQ(f[0], 21.0f); // c is the second tensor of shard 2 (base 20)
  EXPECT_EQ(f[1], 21.5f);
  EXPECT_NE(std::string(t->file).find("model-00002-of-00002.safetensors"), std::string::npos);
  ASSERT_EQ(itr_tensor_store_get(s, "a", &t), ITR_OK);
  ASSERT_EQ(itr_tensor_read_f32(t, f), ITR_OK);
  EXPECT_EQ(f[0], 20.0f);
  // Shard 1 is gone: the first access to one of its tensors fails, naming the shard's path.
  t = nullptr;
  EXPECT_TRUE(has_error(itr_tensor_store_get(s, "b", &t), ITR_ERR_INPUT,
                        {"cannot open", "model-00001-of-00002.safetensors"}));
  EXPECT_EQ(t, nullptr);
  EXPECT_TRUE(has_error(itr_tensor_store_get(s, "zz", &t), ITR_ERR_INPUT,
                        {"tensor 'zz' is not in model folder '" + dir.path() + "'"}));
  itr_tensor_store_destroy(s);
}

TEST(TensorStore, ShardedFolderEveryTensor) {
  TempDir dir;
  write_sharded(dir, kIndex);
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(dir.path().c_str(), &s), ITR_OK) << itr_error_message();
  const float want[4] = {20, 10, 21, 11}; // a, b, c, d
  for (int i = 0; i < 4; i++) {
    const itr_tensor_info *t = nullptr;
    ASSERT_EQ(itr_tensor_store_get(s, itr_tensor_store_name(s, i), &t), ITR_OK) << itr_error_message();
    double d[2];
    ASSERT_EQ(itr_tensor_read_f64(t, d), ITR_OK);
    EXPECT_EQ(d[0], want[i]) << itr_tensor_store_name(s, i);
    EXPECT_EQ(d[1], want[i] + 0.5) << itr_tensor_store_name(s, i);
  }
  itr_tensor_store_destroy(s);
}

TEST(TensorStore, SingleFileFolder) {
  TempDir dir;
  write_shard(dir.file("model.safetensors"), {"y", "x"}, 1);
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(dir.path().c_str(), &s), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_tensor_store_count(s), 2);
  EXPECT_STREQ(itr_tensor_store_name(s, 0), "x");
  EXPECT_STREQ(itr_tensor_store_name(s, 1), "y");
  const itr_tensor_info *t = nullptr;
  ASSERT_EQ(itr_tensor_store_get(s, "y", &t), ITR_OK);
  float f[2];
  ASSERT_EQ(itr_tensor_read_f32(t, f), ITR_OK);
  EXPECT_EQ(f[0], 1.0f);
  itr_tensor_store_destroy(s);
}

TEST(TensorStore, MissingShardFile) {
  TempDir dir;
  write_sharded(dir, kIndex);
  ASSERT_EQ(unlink(dir.file("model-00002-of-00002.safetensors").c_str()), 0);
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(dir.path().c_str(), &s), ITR_OK) << itr_error_message();
  const itr_tensor_info *t = nullptr;
  EXPECT_TRUE(has_error(itr_tensor_store_get(s, "a", &t), ITR_ERR_INPUT,
                        {"cannot open safetensors file '" + dir.file("model-00002-of-00002.safetensors") + "'"}));
  ASSERT_EQ(itr_tensor_store_get(s, "b", &t), ITR_OK); // the other shard still works
  itr_tensor_store_destroy(s);
}

TEST(TensorStore, IndexNamesATensorNotInItsShard) {
  TempDir dir;
  write_sharded(dir, "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", "
                     "\"b\": \"model-00001-of-00002.safetensors\"}}");
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(dir.path().c_str(), &s), ITR_OK) << itr_error_message();
  const itr_tensor_info *t = nullptr;
  ASSERT_EQ(itr_tensor_store_get(s, "b", &t), ITR_OK);
  EXPECT_TRUE(has_error(itr_tensor_store_get(s, "a", &t), ITR_ERR_INPUT,
                        {"maps tensor 'a' to shard 'model-00001-of-00002.safetensors', but that shard does not "
                         "contain it", dir.path()}));
  itr_tensor_store_destroy(s);
}

TEST(TensorStore, HostileIndexTable) {
  struct Case {
    const char *name, *index, *expect;
  } cases[] = {
      {"shard path with a slash", "{\"weight_map\": {\"a\": \"../x/model.safetensors\"}}",
       "tensor 'a' maps to shard '../x/model.safetensors', which is not a plain file name"},
      {"absolute shard path", "{\"weight_map\": {\"a\": \"/etc/passwd\"}}", "which is not a plain file name"},
      {"shard name with ..", "{\"weight_map\": {\"a\": \"..\"}}", "shard '..', which is not a plain file name"},
      {"empty shard name", "{\"weight_map\": {\"a\": \"\"}}", "shard '', which is not a plain file name"},
      {"shard not a string", "{\"weight_map\": {\"a\": 3}}", "weight_map entry of tensor 'a' is not a string"},
      {"duplicate tensor", "{\"weight_map\": {\"a\": \"s1\", \"a\": \"s2\"}}",
       "tensor 'a' appears twice in weight_map"},
      {"no weight_map", "{\"metadata\": {}}", "\"weight_map\" is missing"},
      {"weight_map a list", "{\"weight_map\": []}", "\"weight_map\" is not an object"},
      {"weight_map twice", "{\"weight_map\": {}, \"weight_map\": {}}", "\"weight_map\" appears twice"},
      {"not JSON", "{\"weight_map\": {", "is not valid JSON"},
      {"not an object", "[]", "expected a JSON object at the top level"},
      {"trailing text", "{\"weight_map\": {}} x", "unexpected text after the JSON object"},
  };
  for (const Case &c : cases) {
    SCOPED_TRACE(c.name);
    TempDir dir;
    st_test::write_file(dir.file("model.safetensors.index.json"), c.index);
    itr_tensor_store *sentinel = reinterpret_cast<itr_tensor_store *>(0x1), *s = sentinel;
    EXPECT_TRUE(has_error(itr_tensor_store_open(dir.path().c_str(), &s), ITR_ERR_INPUT,
                          {c.expect, dir.file("model.safetensors.index.json")}));
    EXPECT_EQ(s, sentinel);
    if (s != sentinel) itr_tensor_store_destroy(s);
  }
}

TEST(TensorStore, NotAModelFolder) {
  TempDir dir;
  itr_tensor_store *s = nullptr;
  EXPECT_TRUE(has_error(itr_tensor_store_open(dir.path().c_str(), &s), ITR_ERR_INPUT,
                        {"has neither model.safetensors.index.json nor model.safetensors", dir.path()}));
  std::string absent = dir.file("absent");
  EXPECT_TRUE(has_error(itr_tensor_store_open(absent.c_str(), &s), ITR_ERR_INPUT, {"does not exist", absent}));
  // A hostile single file is reported with its path.
  st_test::write_file(dir.file("model.safetensors"), "short");
  EXPECT_TRUE(has_error(itr_tensor_store_open(dir.path().c_str(), &s), ITR_ERR_INPUT,
                        {dir.file("model.safetensors"), "shorter than the 8-byte"}));
  EXPECT_EQ(s, nullptr);
}

TEST(TensorStore, FaultInjectionOpenAndGet) {
  TempDir dir;
  write_sharded(dir, kIndex);
  long k = 1;
  for (; k < 1000; k++) {
    itr_alloc_fail_after(k);
    itr_tensor_store *s = nullptr;
    itr_err err = itr_tensor_store_open(dir.path().c_str(), &s);
    const itr_tensor_info *t = nullptr;
    for (int i = 0; i < 4 && err == ITR_OK; i++) err = itr_tensor_store_get(s, itr_tensor_store_name(s, i), &t);
    itr_alloc_fail_after(0);
    itr_tensor_store_destroy(s);
    if (err == ITR_OK) break;
    EXPECT_TRUE(has_error(err, ITR_ERR_INTERNAL, {"injected fault"})) << "allocation " << k;
  }
  EXPECT_GT(k, 10);
  EXPECT_LT(k, 1000);
}
