// The merged-adapter writer: round trips through itr_adapter_open (scaling 1 everywhere, factors
// identical), PEFT's config fields and rank_pattern keys, and refused inputs.
#include <cmath>
#include <string>
#include <vector>

#include <cjson/cJSON.h>
#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::failed_with;
using io_test::TempDir;

namespace {
std::vector<float> read_f32(const itr_tensor_info *t) {
  std::vector<float> v((size_t)t->numel);
  EXPECT_EQ(itr_tensor_read_f32(t, v.data()), ITR_OK) << itr_error_message();
  return v;
}

// rank of (layer, m) in the mixed-rank test: mostly 3, a few 5 and one 1; o_proj absent.
int mixed_rank(int l, int m) {
  if (m == ITR_O_PROJ) return 0;
  if (l == 1 && m == ITR_Q_PROJ) return 1;
  if (m == ITR_DOWN_PROJ) return 5;
  return 3;
}

cJSON *read_json(const std::string &path) { return cJSON_Parse(io_test::read_text(path).c_str()); }
}  // namespace

TEST(AdapterWriter, RoundTripMixedRanksThroughPeftReader) {
  TempDir t;
  itr_model_config base = io_test::tiny_config(3);
  itr_adapter_writer *w = nullptr;
  ASSERT_EQ(itr_adapter_writer_create(&base, "org/tiny-llama", ITR_F32, &w), ITR_OK) << itr_error_message();
  for (int l = 0; l < 3; l++)
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      int r = mixed_rank(l, m);
      if (!r) continue;
      int64_t d_out, d_in;
      io_test::tiny_shape((itr_module)m, &d_out, &d_in);
      std::vector<float> A = io_test::pattern((size_t)(r * d_in), l * 10 + m, 0.3f);
      std::vector<float> B = io_test::pattern((size_t)(d_out * r), 500 + l * 10 + m, 0.3f);
      ASSERT_EQ(itr_adapter_writer_add(w, l, (itr_module)m, r, A.data(), B.data()), ITR_OK) << itr_error_message();
    }
  std::string dir = t.file("out/merged");  // created by the writer
  ASSERT_EQ(itr_adapter_writer_write(w, dir.c_str()), ITR_OK) << itr_error_message();
  itr_adapter_writer_destroy(w);
  itr_adapter_writer_destroy(nullptr);

  // The config, as PEFT reads it.
  cJSON *cfg = read_json(dir + "/adapter_config.json");
  ASSERT_NE(cfg, nullptr);
  EXPECT_EQ(cJSON_GetObjectItem(cfg, "r")->valuedouble, 3);  // the most common rank
  EXPECT_EQ(cJSON_GetObjectItem(cfg, "lora_alpha")->valuedouble, 3);
  EXPECT_STREQ(cJSON_GetObjectItem(cfg, "peft_type")->valuestring, "LORA");
  EXPECT_STREQ(cJSON_GetObjectItem(cfg, "task_type")->valuestring, "CAUSAL_LM");
  EXPECT_STREQ(cJSON_GetObjectItem(cfg, "bias")->valuestring, "none");
  EXPECT_STREQ(cJSON_GetObjectItem(cfg, "base_model_name_or_path")->valuestring, "org/tiny-llama");
  EXPECT_TRUE(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "use_rslora")));
  const cJSON *tm = cJSON_GetObjectItem(cfg, "target_modules");
  std::vector<std::string> targets;
  for (const cJSON *e = tm->child; e; e = e->next) targets.push_back(e->valuestring);
  EXPECT_EQ(targets, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}));
  const cJSON *rp = cJSON_GetObjectItem(cfg, "rank_pattern"), *ap = cJSON_GetObjectItem(cfg, "alpha_pattern");
  EXPECT_EQ(cJSON_GetArraySize(rp), 4);  // layer 1 q_proj and three down_proj
  EXPECT_EQ(cJSON_GetObjectItem(rp, "layers.1.self_attn.q_proj")->valuedouble, 1);
  EXPECT_EQ(cJSON_GetObjectItem(ap, "layers.1.self_attn.q_proj")->valuedouble, 1);
  EXPECT_EQ(cJSON_GetObjectItem(rp, "layers.2.mlp.down_proj")->valuedouble, 5);
  EXPECT_EQ(cJSON_GetObjectItem(ap, "layers.2.mlp.down_proj")->valuedouble, 5);
  cJSON_Delete(cfg);

  // Reading it back: scaling 1 everywhere, factors bit-identical (F32).
  itr_adapter *a = nullptr;
  ASSERT_EQ(itr_adapter_open(dir.c_str(), &base, &a), ITR_OK) << itr_error_message();
  for (int l = 0; l < 3; l++)
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      const itr_lora_module *mod = itr_adapter_module(a, l, (itr_module)m);
      int r = mixed_rank(l, m);
      ASSERT_EQ(mod->present, r ? 1 : 0);
      if (!r) continue;
      EXPECT_EQ(mod->r, r);
      EXPECT_EQ(mod->scaling, 1.0);
      int64_t d_out, d_in;
      io_test::tiny_shape((itr_module)m, &d_out, &d_in);
      EXPECT_EQ(read_f32(mod->A), io_test::pattern((size_t)(r * d_in), l * 10 + m, 0.3f));
      EXPECT_EQ(read_f32(mod->B), io_test::pattern((size_t)(d_out * r), 500 + l * 10 + m, 0.3f));
    }
  itr_adapter_destroy(a);
}

TEST(AdapterWriter, UniformRankHasEmptyPatternsAndBf16Rounds) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  itr_adapter_writer *w = nullptr;
  ASSERT_EQ(itr_adapter_writer_create(&base, nullptr, ITR_BF16, &w), ITR_OK);
  std::vector<float> A = io_test::pattern(2 * 16, 1, 3.0f), B = io_test::pattern(8 * 2, 2, 3.0f);
  for (int l = 0; l < 2; l++) ASSERT_EQ(itr_adapter_writer_add(w, l, ITR_K_PROJ, 2, A.data(), B.data()), ITR_OK);
  ASSERT_EQ(itr_adapter_writer_write(w, t.path().c_str()), ITR_OK) << itr_error_message();
  itr_adapter_writer_destroy(w);
  cJSON *cfg = read_json(t.file("adapter_config.json"));
  ASSERT_NE(cfg, nullptr);
  EXPECT_EQ(cJSON_GetArraySize(cJSON_GetObjectItem(cfg, "rank_pattern")), 0);
  EXPECT_EQ(cJSON_GetObjectItem(cfg, "r")->valuedouble, 2);
  EXPECT_STREQ(cJSON_GetObjectItem(cfg, "base_model_name_or_path")->valuestring, "");
  cJSON_Delete(cfg);
  itr_adapter *a = nullptr;
  ASSERT_EQ(itr_adapter_open(t.path().c_str(), &base, &a), ITR_OK) << itr_error_message();
  EXPECT_EQ(a->target_mask, 1u << ITR_K_PROJ);
  const itr_lora_module *mod = itr_adapter_module(a, 1, ITR_K_PROJ);
  EXPECT_EQ(mod->A->dtype, ITR_BF16);
  EXPECT_EQ(mod->scaling, 1.0);
  std::vector<float> got = read_f32(mod->B);
  for (size_t i = 0; i < B.size(); i++) EXPECT_EQ(got[i], itr_bf16_to_f32(itr_f32_to_bf16(B[i]))) << i;
  itr_adapter_destroy(a);
}

TEST(AdapterWriter, RefusesBadFactorsAndEmptyAdapters) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  itr_adapter_writer *w = nullptr;
  EXPECT_TRUE(failed_with(itr_adapter_writer_create(&base, "x", (itr_dtype)ITR_DTYPE_COUNT, &w), ITR_ERR_INPUT,
                          {"is not supported"}));
  ASSERT_EQ(itr_adapter_writer_create(&base, "x", ITR_F16, &w), ITR_OK);
  std::vector<float> A(4 * 16, 0.5f), B(16 * 4, 0.5f);
  EXPECT_TRUE(failed_with(itr_adapter_writer_write(w, t.path().c_str()), ITR_ERR_INPUT, {"no module was added"}));
  EXPECT_TRUE(failed_with(itr_adapter_writer_add(w, 2, ITR_Q_PROJ, 4, A.data(), B.data()), ITR_ERR_INPUT,
                          {"layer 2 is outside 0..1"}));
  EXPECT_TRUE(failed_with(itr_adapter_writer_add(w, 0, ITR_Q_PROJ, 0, A.data(), B.data()), ITR_ERR_INPUT,
                          {"rank 0"}));
  A[7] = NAN;
  EXPECT_TRUE(failed_with(itr_adapter_writer_add(w, 0, ITR_Q_PROJ, 4, A.data(), B.data()), ITR_ERR_NUMERIC,
                          {"layer 0 q_proj", "A[7]", "non-finite"}));
  A[7] = 1e5f;  // beyond F16's largest finite value
  EXPECT_TRUE(failed_with(itr_adapter_writer_add(w, 0, ITR_Q_PROJ, 4, A.data(), B.data()), ITR_ERR_NUMERIC,
                          {"does not fit in F16"}));
  A[7] = 0.5f;
  ASSERT_EQ(itr_adapter_writer_add(w, 0, ITR_Q_PROJ, 4, A.data(), B.data()), ITR_OK);
  EXPECT_TRUE(failed_with(itr_adapter_writer_add(w, 0, ITR_Q_PROJ, 4, A.data(), B.data()), ITR_ERR_INPUT,
                          {"added twice"}));
  itr_adapter_writer_destroy(w);
}

TEST(AdapterWriter, SurvivesEveryAllocationFailure) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  std::vector<float> A = io_test::pattern(3 * 16, 1), B = io_test::pattern(24 * 3, 2);
  bool succeeded = false;
  for (long k = 1; k < 200 && !succeeded; k++) {
    itr_adapter_writer *w = nullptr;
    itr_alloc_fail_after(k);
    itr_err e = itr_adapter_writer_create(&base, "x", ITR_F32, &w);
    if (e == ITR_OK) e = itr_adapter_writer_add(w, 1, ITR_UP_PROJ, 3, A.data(), B.data());
    if (e == ITR_OK) e = itr_adapter_writer_write(w, t.path().c_str());
    itr_alloc_fail_after(0);
    itr_adapter_writer_destroy(w);
    if (e == ITR_OK)
      succeeded = true;
    else
      EXPECT_EQ(e, ITR_ERR_INTERNAL) << "k = " << k << ": " << itr_error_message();
  }
  EXPECT_TRUE(succeeded);
}

TEST(AdapterWriter, F64FactorsAreKeptExactly) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  itr_adapter_writer *w = nullptr;
  ASSERT_EQ(itr_adapter_writer_create(&base, "x", ITR_F64, &w), ITR_OK);
  int64_t d_out, d_in;
  itr_module_shape(&base, ITR_Q_PROJ, &d_out, &d_in);
  std::vector<double> A(3 * d_in), B(d_out * 3);
  for (size_t k = 0; k < A.size(); k++) A[k] = 1.0 / 3.0 + 1e-13 * (double)k;  // not representable in f32
  for (size_t k = 0; k < B.size(); k++) B[k] = -2.0 / 7.0 + 1e-13 * (double)k;
  ASSERT_EQ(itr_adapter_writer_add_f64(w, 1, ITR_Q_PROJ, 3, A.data(), B.data()), ITR_OK);
  ASSERT_EQ(itr_adapter_writer_write(w, t.path().c_str()), ITR_OK);
  itr_adapter_writer_destroy(w);
  itr_adapter *a = nullptr;
  ASSERT_EQ(itr_adapter_open(t.path().c_str(), &base, &a), ITR_OK) << itr_error_message();
  const itr_lora_module *m = itr_adapter_module(a, 1, ITR_Q_PROJ);
  ASSERT_TRUE(m && m->present);
  EXPECT_EQ(m->scaling, 1.0);
  std::vector<double> A2(A.size()), B2(B.size());
  ASSERT_EQ(itr_tensor_read_f64(m->A, A2.data()), ITR_OK);
  ASSERT_EQ(itr_tensor_read_f64(m->B, B2.data()), ITR_OK);
  EXPECT_EQ(A, A2);
  EXPECT_EQ(B, B2);
  itr_adapter_destroy(a);
}
