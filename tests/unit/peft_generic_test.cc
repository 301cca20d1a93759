// PEFT LoRA of any architecture (io/peft_generic.c): module paths, ranks and scalings after the
// patterns (hand-derived), refusals with the words the message must hold, and the writer's padded
// round trip (dW = B A unchanged, checked in float64 against the factors given). Also the
// hyperslab row read of HDF5 files and the atomic replacement of an output folder.
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::failed_with;
using io_test::TempDir;
using io_test::Tensor;
using io_test::write_adapter;

namespace {
// A T5-style adapter: q (16 x 8) and v (16 x 8) of block 0, rank r; o (8 x 16) of rank 2 when with_o.
std::vector<Tensor> t5_tensors(int r, bool with_o = false) {
  std::vector<Tensor> ts;
  const char *mods[] = {"encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.v"};
  int salt = 0;
  for (const char *m : mods) {
    std::string p = std::string("base_model.model.") + m;
    ts.push_back({p + ".lora_A.weight", ITR_F32, {r, 8}, io_test::pattern((size_t)(r * 8), salt++)});
    ts.push_back({p + ".lora_B.weight", ITR_F32, {16, r}, io_test::pattern((size_t)(16 * r), salt++)});
  }
  if (with_o) {
    std::string p = "base_model.model.encoder.block.0.layer.0.SelfAttention.o";
    ts.push_back({p + ".lora_A.weight", ITR_F32, {2, 16}, io_test::pattern(32, salt++)});
    ts.push_back({p + ".lora_B.weight", ITR_F32, {8, 2}, io_test::pattern(16, salt++)});
  }
  return ts;
}

std::string t5_config(int r, double alpha, const std::string &extra = "") {
  return "{\"peft_type\": \"LORA\", \"task_type\": \"SEQ_2_SEQ_LM\", \"r\": " + std::to_string(r) +
         ", \"lora_alpha\": " + std::to_string(alpha) + ", \"target_modules\": [\"q\", \"v\"], \"bias\": \"none\"" +
         extra + "}\n";
}
}  // namespace

TEST(PeftGeneric, ReadsModulePathsRanksAndScalings) {
  TempDir t;
  write_adapter(t.path(), t5_config(4, 8, ", \"rank_pattern\": {\"SelfAttention.o\": 2}, "
                                          "\"alpha_pattern\": {\"o\": 6}"),
                t5_tensors(4, true));
  itr_lora_file *a = nullptr;
  ASSERT_EQ(itr_lora_file_open(t.path().c_str(), &a), ITR_OK) << itr_error_message();
  EXPECT_STREQ(a->task_type, "SEQ_2_SEQ_LM");
  ASSERT_EQ(a->n_mod, 3);
  const itr_lora_pair *q = itr_lora_file_find(a, "encoder.block.0.layer.0.SelfAttention.q");
  const itr_lora_pair *o = itr_lora_file_find(a, "encoder.block.0.layer.0.SelfAttention.o");
  ASSERT_NE(q, nullptr);
  ASSERT_NE(o, nullptr);
  EXPECT_EQ(itr_lora_file_find(a, "SelfAttention.q"), nullptr) << "a suffix is not a module path";
  EXPECT_EQ(q->r, 4);
  EXPECT_EQ(q->scaling, 2.0);  // 8 / 4
  EXPECT_EQ(o->r, 2);
  EXPECT_EQ(o->scaling, 3.0);  // 6 / 2 after both patterns
  EXPECT_EQ(o->A->shape[1], 16);
  EXPECT_EQ(o->B->shape[0], 8);
  itr_lora_file_destroy(a);
}

TEST(PeftGeneric, RefusesWhatCannotBeMergedAndNamesIt) {
  struct Case {
    const char *what;
    std::string config;
    std::vector<Tensor> tensors;
    std::vector<std::string> words;
  };
  std::vector<Tensor> missing_b = t5_tensors(4);
  missing_b.pop_back();
  std::vector<Tensor> bad_rank = t5_tensors(4);
  std::vector<Tensor> nan = t5_tensors(4);
  nan[1].data[3] = NAN;
  std::vector<Tensor> bad_name = t5_tensors(4);
  bad_name[0].name = "encoder.q.lora_A.weight";
  const std::vector<Case> cases = {
      {"DoRA", t5_config(4, 8, ", \"use_dora\": true"), t5_tensors(4), {"DoRA", "adapter_config.json"}},
      {"lora_B missing", t5_config(4, 8), missing_b, {"SelfAttention.v", "lora_A but no lora_B"}},
      {"rank against r", t5_config(8, 8), bad_rank, {"has rank 4", "r = 8"}},
      {"unused pattern", t5_config(4, 8, ", \"rank_pattern\": {\"nope\": 2}"), t5_tensors(4), {"nope", "matches no module"}},
      {"not finite", t5_config(4, 8), nan, {"SelfAttention.q.lora_B.weight", "NaN"}},
      {"not a LoRA name", t5_config(4, 8), bad_name, {"encoder.q.lora_A.weight", "not a LoRA factor"}},
  };
  for (const Case &c : cases) {
    TempDir t;
    write_adapter(t.path(), c.config, c.tensors);
    itr_lora_file *a = nullptr;
    EXPECT_TRUE(failed_with(itr_lora_file_open(t.path().c_str(), &a), ITR_ERR_INPUT, c.words)) << c.what;
    EXPECT_EQ(a, nullptr) << c.what;
  }
}

TEST(PeftGeneric, WriterPadsToOneRankAndKeepsTheUpdate) {
  TempDir t;
  // module a: rank 2, (3 x 4); module b: rank 1, (2 x 4); module c: rank 0 (a zero update)
  const std::vector<double> Aa = {1, 2, 3, 4, -1, 0.5, 0.25, 2}, Ba = {1, 0, 0, 1, 2, -1};
  const std::vector<double> Ab = {0.5, -0.5, 1.5, 3}, Bb = {2, -3};
  itr_lora_writer *w = nullptr;
  ASSERT_EQ(itr_lora_writer_create("org/t5", "SEQ_2_SEQ_LM", ITR_F64, &w), ITR_OK);
  ASSERT_EQ(itr_lora_writer_add_f64(w, "enc.a", 3, 4, 2, Aa.data(), Ba.data()), ITR_OK);
  ASSERT_EQ(itr_lora_writer_add_f64(w, "enc.b", 2, 4, 1, Ab.data(), Bb.data()), ITR_OK);
  ASSERT_EQ(itr_lora_writer_add_f64(w, "enc.c", 2, 4, 0, nullptr, nullptr), ITR_OK);
  ASSERT_EQ(itr_lora_writer_write(w, t.path().c_str()), ITR_OK) << itr_error_message();
  itr_lora_writer_destroy(w);

  itr_lora_file *a = nullptr;
  ASSERT_EQ(itr_lora_file_open(t.path().c_str(), &a), ITR_OK) << itr_error_message();
  EXPECT_STREQ(a->base_model, "org/t5");
  ASSERT_EQ(a->n_mod, 3);
  struct {
    const char *path;
    int64_t d_out, r;
    const double *A, *B;
  } want[] = {{"enc.a", 3, 2, Aa.data(), Ba.data()}, {"enc.b", 2, 1, Ab.data(), Bb.data()}, {"enc.c", 2, 0, nullptr, nullptr}};
  for (const auto &m : want) {
    const itr_lora_pair *p = itr_lora_file_find(a, m.path);
    ASSERT_NE(p, nullptr) << m.path;
    EXPECT_EQ(p->r, 2) << "every module at the largest rank";
    EXPECT_EQ(p->scaling, 1.0);
    std::vector<double> A((size_t)p->A->numel), B((size_t)p->B->numel);
    ASSERT_EQ(itr_tensor_read_f64(p->A, A.data()), ITR_OK);
    ASSERT_EQ(itr_tensor_read_f64(p->B, B.data()), ITR_OK);
    for (int64_t i = 0; i < m.d_out; i++)
      for (int64_t j = 0; j < 4; j++) {
        double got = 0, ref = 0;
        for (int k = 0; k < 2; k++) got += B[(size_t)(i * 2 + k)] * A[(size_t)(k * 4 + j)];
        for (int k = 0; k < m.r; k++) ref += m.B[i * m.r + k] * m.A[k * 4 + j];
        EXPECT_EQ(got, ref) << m.path << " (" << i << ", " << j << ")";
      }
  }
  itr_lora_file_destroy(a);
}

TEST(PeftGeneric, WriterRefusesNonFiniteAndF16Overflow) {
  TempDir t;
  const std::vector<double> A = {1, 2}, B = {1e6};
  itr_lora_writer *w = nullptr;
  ASSERT_EQ(itr_lora_writer_create("", "", ITR_F16, &w), ITR_OK);
  ASSERT_EQ(itr_lora_writer_add_f64(w, "m", 1, 2, 1, A.data(), B.data()), ITR_OK);
  EXPECT_TRUE(failed_with(itr_lora_writer_write(w, t.path().c_str()), ITR_ERR_NUMERIC, {"m.lora_B.weight", "F16"}));
  itr_lora_writer_destroy(w);
}

TEST(H5File, ReadsARangeOfRows) {
  TempDir t;
  const std::string p = t.path() + "/x.h5";
  std::vector<double> x(5 * 3);
  for (size_t i = 0; i < x.size(); i++) x[i] = (double)i + 0.5;
  itr_h5 *h = nullptr;
  ASSERT_EQ(itr_h5_create(p.c_str(), &h), ITR_OK);
  const int64_t dims[2] = {5, 3};
  ASSERT_EQ(itr_h5_write_f64(h, "task_0/m/X", 2, dims, x.data()), ITR_OK);
  ASSERT_EQ(itr_h5_close(h, 1), ITR_OK);
  ASSERT_EQ(itr_h5_open(p.c_str(), &h), ITR_OK);
  std::vector<double> rows(2 * 3, -1);
  ASSERT_EQ(itr_h5_read_rows_f64(h, "task_0/m/X", 2, 2, 3, rows.data()), ITR_OK) << itr_error_message();
  for (int k = 0; k < 6; k++) EXPECT_EQ(rows[(size_t)k], x[(size_t)(6 + k)]);
  EXPECT_EQ(itr_h5_read_rows_f64(h, "task_0/m/X", 5, 0, 3, rows.data()), ITR_OK) << "an empty share";
  EXPECT_TRUE(failed_with(itr_h5_read_rows_f64(h, "task_0/m/X", 4, 2, 3, rows.data()), ITR_ERR_INPUT,
                          {"task_0/m/X", "[4, 6)"}));
  EXPECT_TRUE(failed_with(itr_h5_read_rows_f64(h, "task_0/m/X", 0, 1, 4, rows.data()), ITR_ERR_INPUT, {"4 columns"}));
  ASSERT_EQ(itr_h5_close(h, 0), ITR_OK);
}

TEST(IoFile, CommitDirReplacesTheOldFolderWhole) {
  TempDir t;
  const std::string out = t.path() + "/out", partial = out + ".partial";
  std::filesystem::create_directories(out);
  io_test::write_text(out + "/stale.txt", "old");
  std::filesystem::create_directories(partial);
  io_test::write_text(partial + "/adapter_config.json", "{}");
  ASSERT_EQ(itr_iofile_commit_dir(partial.c_str(), out.c_str()), ITR_OK) << itr_error_message();
  EXPECT_FALSE(std::filesystem::exists(partial));
  EXPECT_TRUE(std::filesystem::exists(out + "/adapter_config.json"));
  EXPECT_FALSE(std::filesystem::exists(out + "/stale.txt")) << "nothing of the old folder is left";
  for (const auto &e : std::filesystem::directory_iterator(t.path()))
    EXPECT_EQ(e.path().filename().string().find(".old."), std::string::npos) << e.path();
  EXPECT_TRUE(failed_with(itr_iofile_commit_dir(partial.c_str(), out.c_str()), ITR_ERR_INTERNAL, {"out.partial"}));
  EXPECT_TRUE(std::filesystem::exists(out + "/adapter_config.json")) << "a failed commit leaves OUT as it was";
}

TEST(IoFile, DigestsSeeContentsNotNames) {
  TempDir t;
  const std::string a = t.path() + "/a", b = t.path() + "/b";
  io_test::write_text(a, "hello world");
  io_test::write_text(b, "hello world");
  uint64_t ha = itr_hash64(NULL), hb = itr_hash64(NULL), h0 = itr_hash64(NULL);
  itr_iofile_digest(a.c_str(), 0, &ha);
  itr_iofile_digest(b.c_str(), 0, &hb);
  EXPECT_EQ(ha, hb);
  EXPECT_NE(ha, h0);
  io_test::write_text(b, "hello world!");
  hb = itr_hash64(NULL);
  itr_iofile_digest(b.c_str(), 0, &hb);
  EXPECT_NE(ha, hb);
  uint64_t hm = h0;
  itr_iofile_digest((t.path() + "/missing").c_str(), 0, &hm);
  EXPECT_EQ(hm, h0) << "a missing file leaves the digest as it was";
  char parent[64];
  itr_iofile_parent("/x", parent, sizeof parent);
  EXPECT_STREQ(parent, "/");
  itr_iofile_parent("name", parent, sizeof parent);
  EXPECT_STREQ(parent, ".");
  itr_iofile_parent("a/b/c", parent, sizeof parent);
  EXPECT_STREQ(parent, "a/b");
}
