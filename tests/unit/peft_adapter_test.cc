// PEFT adapters: reading ranks, alphas and patterns, scaling (alpha/r and rsLoRA), factors read
// back exactly, and a table of hostile adapters, each with the words its message must hold.
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::add_pair;
using io_test::failed_with;
using io_test::peft_config;
using io_test::TempDir;
using io_test::Tensor;
using io_test::write_adapter;

namespace {
// q_proj and v_proj of rank 4 in both layers of tiny_config.
std::vector<Tensor> qv_tensors(int r = 4, itr_dtype dt = ITR_F32) {
  std::vector<Tensor> ts;
  for (int l = 0; l < 2; l++) {
    add_pair(ts, l, ITR_Q_PROJ, r, dt);
    add_pair(ts, l, ITR_V_PROJ, r, dt);
  }
  return ts;
}

// Reads a factor back as float.
std::vector<float> read_f32(const itr_tensor_info *t) {
  std::vector<float> v((size_t)t->numel);
  EXPECT_EQ(itr_tensor_read_f32(t, v.data()), ITR_OK) << itr_error_message();
  return v;
}
}  // namespace

TEST(PeftAdapter, ReadsFactorsRanksAndScaling) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  std::vector<Tensor> ts = qv_tensors();
  write_adapter(t.path(), peft_config(4, 8), ts);
  itr_adapter *a = nullptr;
  ASSERT_EQ(itr_adapter_open(t.path().c_str(), &base, &a), ITR_OK) << itr_error_message();
  EXPECT_STREQ(a->base_model, "tiny/llama");
  EXPECT_EQ(a->r, 4);
  EXPECT_EQ(a->lora_alpha, 8.0);
  EXPECT_EQ(a->use_rslora, 0);
  EXPECT_EQ(a->num_layers, 2);
  EXPECT_EQ(a->target_mask, (1u << ITR_Q_PROJ) | (1u << ITR_V_PROJ));
  for (int l = 0; l < 2; l++) {
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      const itr_lora_module *mod = itr_adapter_module(a, l, (itr_module)m);
      ASSERT_NE(mod, nullptr);
      bool want = m == ITR_Q_PROJ || m == ITR_V_PROJ;
      EXPECT_EQ(mod->present, want ? 1 : 0);
      if (!want) continue;
      EXPECT_EQ(mod->r, 4);
      EXPECT_EQ(mod->alpha, 8.0);
      EXPECT_EQ(mod->scaling, 2.0);  // 8 / 4
      int64_t d_out, d_in;
      io_test::tiny_shape((itr_module)m, &d_out, &d_in);
      EXPECT_EQ(mod->A->shape[0], 4);
      EXPECT_EQ(mod->A->shape[1], d_in);
      EXPECT_EQ(mod->B->shape[0], d_out);
      EXPECT_EQ(mod->B->shape[1], 4);
      EXPECT_EQ(read_f32(mod->A), io_test::pattern((size_t)(4 * d_in), l * 7 + m));
      EXPECT_EQ(read_f32(mod->B), io_test::pattern((size_t)(d_out * 4), 100 + l * 7 + m));
    }
  }
  EXPECT_EQ(itr_adapter_module(a, 2, ITR_Q_PROJ), nullptr);
  EXPECT_EQ(itr_adapter_module(a, -1, ITR_Q_PROJ), nullptr);
  itr_adapter_destroy(a);
  itr_adapter_destroy(nullptr);
}

TEST(PeftAdapter, RsLoraScalesBySquareRoot) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  write_adapter(t.path(), peft_config(4, 8, "[\"q_proj\", \"v_proj\"]", ", \"use_rslora\": true"), qv_tensors());
  itr_adapter *a = nullptr;
  ASSERT_EQ(itr_adapter_open(t.path().c_str(), &base, &a), ITR_OK) << itr_error_message();
  EXPECT_EQ(itr_adapter_module(a, 1, ITR_V_PROJ)->scaling, 4.0);  // 8 / sqrt(4)
  itr_adapter_destroy(a);
}

TEST(PeftAdapter, ReducedPrecisionFactorsReadAsRoundedValues) {
  for (itr_dtype dt : {ITR_BF16, ITR_F16}) {
    TempDir t;
    itr_model_config base = io_test::tiny_config();
    write_adapter(t.path(), peft_config(4, 4, "\"all-linear\""), [&] {
      std::vector<Tensor> ts;
      for (int l = 0; l < 2; l++)
        for (int m = 0; m < ITR_MODULE_COUNT; m++) add_pair(ts, l, (itr_module)m, 4, dt);
      return ts;
    }());
    itr_adapter *a = nullptr;
    ASSERT_EQ(itr_adapter_open(t.path().c_str(), &base, &a), ITR_OK) << itr_error_message();
    EXPECT_EQ(a->target_mask, (1u << ITR_MODULE_COUNT) - 1);
    const itr_lora_module *mod = itr_adapter_module(a, 1, ITR_DOWN_PROJ);
    EXPECT_EQ(mod->A->dtype, dt);
    std::vector<float> want = io_test::pattern(4 * 24, 7 + ITR_DOWN_PROJ), got = read_f32(mod->A);
    for (size_t i = 0; i < want.size(); i++) {
      float r = dt == ITR_BF16 ? itr_bf16_to_f32(itr_f32_to_bf16(want[i])) : itr_f16_to_f32(itr_f32_to_f16(want[i]));
      ASSERT_EQ(got[i], r) << i;
    }
    itr_adapter_destroy(a);
  }
}

TEST(PeftAdapter, RankAndAlphaPatternsFollowPeftSuffixRule) {
  // 12 layers so that the key for layer 1 must not catch layer 11.
  TempDir t;
  itr_model_config base = io_test::tiny_config(12);
  std::vector<Tensor> ts;
  for (int l = 0; l < 12; l++) {
    add_pair(ts, l, ITR_Q_PROJ, l == 1 ? 2 : 4);
    add_pair(ts, l, ITR_V_PROJ, 6);
    add_pair(ts, l, ITR_UP_PROJ, 4);
  }
  // "1.mlp.up_proj" matches layer 1 only: in layer 11 the character before it is a digit, not a dot.
  write_adapter(t.path(),
                peft_config(4, 8, "[\"q_proj\", \"v_proj\", \"up_proj\"]",
                            ", \"rank_pattern\": {\"model.layers.1.self_attn.q_proj\": 2, \"v_proj\": 6},"
                            " \"alpha_pattern\": {\"self_attn.v_proj\": 3, \"layers.5.self_attn.q_proj\": 1,"
                            " \"1.mlp.up_proj\": 5}"),
                ts);
  itr_adapter *a = nullptr;
  ASSERT_EQ(itr_adapter_open(t.path().c_str(), &base, &a), ITR_OK) << itr_error_message();
  for (int l = 0; l < 12; l++) {
    const itr_lora_module *q = itr_adapter_module(a, l, ITR_Q_PROJ), *v = itr_adapter_module(a, l, ITR_V_PROJ);
    EXPECT_EQ(q->r, l == 1 ? 2 : 4) << l;
    EXPECT_EQ(q->alpha, l == 5 ? 1.0 : 8.0) << l;
    EXPECT_DOUBLE_EQ(q->scaling, (l == 5 ? 1.0 : 8.0) / (l == 1 ? 2 : 4)) << l;
    EXPECT_EQ(v->r, 6);
    EXPECT_EQ(v->alpha, 3.0);
    EXPECT_DOUBLE_EQ(v->scaling, 0.5);
    EXPECT_EQ(itr_adapter_module(a, l, ITR_UP_PROJ)->alpha, l == 1 ? 5.0 : 8.0) << l;
  }
  itr_adapter_destroy(a);
}

struct BadAdapter {
  const char *what;
  std::string config;
  std::function<void(std::vector<Tensor> &)> edit;  // changes to qv_tensors()
  std::vector<std::string> expect;
};

TEST(PeftAdapter, RefusesHostileAdapters) {
  const std::string qv = "[\"q_proj\", \"v_proj\"]";
  auto none = [](std::vector<Tensor> &) {};
  // The standard config with one field's text replaced.
  auto swap = [](const std::string &from, const std::string &to) {
    std::string c = peft_config(4, 8);
    size_t at = c.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return at == std::string::npos ? c : c.replace(at, from.size(), to);
  };
  auto find = [](std::vector<Tensor> &ts, const std::string &name) -> Tensor & {
    for (auto &t : ts)
      if (t.name == name) return t;
    return ts[0];
  };
  const std::string qA0 = io_test::lora_name(0, ITR_Q_PROJ, 'A'), qB0 = io_test::lora_name(0, ITR_Q_PROJ, 'B');
  const std::vector<BadAdapter> cases = {
      {"rank disagrees with config", peft_config(8, 16), none, {"has rank 4 but adapter_config.json says r = 8"}},
      {"rank disagrees after rank_pattern", peft_config(4, 8, qv, ", \"rank_pattern\": {\"v_proj\": 2}"), none,
       {"v_proj.lora_A.weight' has rank 4", "r = 2", "rank_pattern"}},
      {"NaN in a weight", peft_config(4, 8), [&](std::vector<Tensor> &ts) { find(ts, qB0).data[5] = NAN; },
       {qB0, "NaN"}},
      {"infinity in a weight", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) { find(ts, qA0).data[0] = -INFINITY; }, {qA0, "infinity"}},
      {"another hidden size (d_in)", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         Tensor &a = find(ts, qA0);
         a.shape = {4, 32};
         a.data.assign(4 * 32, 0.01f);
       },
       {qA0, "(4, 32)", "takes 16 inputs", "Was this adapter trained on another base model?"}},
      {"another output size (d_out)", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         Tensor &b = find(ts, qB0);
         b.shape = {20, 4};
         b.data.assign(20 * 4, 0.01f);
       },
       {qB0, "has 16 outputs", "another base model"}},
      {"lora_A without lora_B", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         for (size_t i = 0; i < ts.size(); i++)
           if (ts[i].name == io_test::lora_name(1, ITR_V_PROJ, 'B')) ts.erase(ts.begin() + (long)i);
       },
       {"layer 1 v_proj has lora_A but no lora_B"}},
      {"A and B ranks differ", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         Tensor &b = find(ts, qB0);
         b.shape = {16, 3};
         b.data.assign(16 * 3, 0.01f);
       },
       {"lora_A has rank 4", "lora_B has rank 3"}},
      {"layer index out of range", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) { add_pair(ts, 2, ITR_Q_PROJ, 4); },
       {io_test::lora_name(2, ITR_Q_PROJ, 'A'), "is for layer 2 but the base model has 2 layers"}},
      {"module not in target_modules", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) { add_pair(ts, 0, ITR_K_PROJ, 4); }, {"k_proj", "does not list"}},
      {"target module without tensors", peft_config(4, 8, "[\"q_proj\", \"v_proj\", \"o_proj\"]"), none,
       {"target_modules lists o_proj", "has no tensor for it"}},
      {"unknown module tensor", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         ts.push_back({"base_model.model.model.layers.0.mlp.experts.lora_A.weight", ITR_F32, {4, 16},
                       std::vector<float>(64, 0.1f)});
       },
       {"unknown module", "experts"}},
      {"'.default' infix", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         ts.push_back({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight", ITR_F32, {4, 16},
                       std::vector<float>(64, 0.1f)});
       },
       {"'.default'", "save_pretrained"}},
      {"not a LoRA tensor", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         ts.push_back({"model.embed_tokens.weight", ITR_F32, {32, 16}, std::vector<float>(512, 0.1f)});
       },
       {"'model.embed_tokens.weight' is not a LoRA factor"}},
      {"DoRA magnitude tensor", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         ts.push_back({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", ITR_F32, {16},
                       std::vector<float>(16, 1.0f)});
       },
       {"DoRA magnitude"}},
      {"3-D factor", peft_config(4, 8),
       [&](std::vector<Tensor> &ts) {
         Tensor &a = find(ts, qA0);
         a.shape = {4, 4, 4};
       },
       {"3 dimensions"}},
      {"DoRA", swap("\"use_dora\": false", "\"use_dora\": true"), none, {"DoRA", "use_dora"}},
      {"bias all", swap("\"bias\": \"none\"", "\"bias\": \"all\""), none, {"bias 'all'"}},
      {"lora_bias", peft_config(4, 8, qv, ", \"lora_bias\": true"), none, {"lora_bias"}},
      {"modules_to_save", swap("\"modules_to_save\": null", "\"modules_to_save\": [\"lm_head\"]"), none,
       {"modules_to_save is ['lm_head']"}},
      {"fan_in_fan_out", swap("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true"), none, {"fan_in_fan_out"}},
      {"layer_replication", peft_config(4, 8, qv, ", \"layer_replication\": [[0, 2]]"), none, {"layer_replication"}},
      {"regex target_modules", peft_config(4, 8, "\".*\\\\.(q|v)_proj\""), none, {"regular expression"}},
      {"unsupported target module", peft_config(4, 8, "[\"q_proj\", \"embed_tokens\"]"), none,
       {"target module 'embed_tokens' is not supported"}},
      {"rank_pattern key matching nothing", peft_config(4, 8, qv, ", \"rank_pattern\": {\"model.layers.7.self_attn.q_proj\": 4}"),
       none, {"rank_pattern key 'model.layers.7.self_attn.q_proj' matches no module"}},
      {"alpha_pattern key in PEFT's full naming",
       peft_config(4, 8, qv, ", \"alpha_pattern\": {\"base_model.model.model.layers.0.self_attn.q_proj\": 4}"), none,
       {"alpha_pattern key", "matches no module"}},
      {"regex rank_pattern key", peft_config(4, 8, qv, ", \"rank_pattern\": {\"^model.layers.0.*q_proj$\": 4}"), none,
       {"is a regular expression"}},
      {"conflicting pattern keys",
       peft_config(4, 8, qv, ", \"alpha_pattern\": {\"q_proj\": 2, \"model.layers.1.self_attn.q_proj\": 3}"), none,
       {"both match model.layers.1.self_attn.q_proj"}},
      {"non-integer rank_pattern value", peft_config(4, 8, qv, ", \"rank_pattern\": {\"q_proj\": 2.5}"), none,
       {"rank_pattern['q_proj'] must be an integer rank"}},
      {"r = 0", peft_config(0, 8), none, {"'r' must be an integer", "got 0"}},
      {"another PEFT method", swap("\"LORA\"", "\"IA3\""), none,
       {"peft_type 'IA3' is not supported"}},
      {"bad JSON in adapter_config", "{\"r\": 4, \"lora_alpha\": 8,\n  \"target_modules\": [\"q_proj\" \"v_proj\"]}",
       none, {"adapter_config.json: not valid JSON", "line 2"}},
      {"missing target_modules", "{\"r\": 4, \"lora_alpha\": 8}", none, {"'target_modules' is missing"}},
  };
  for (const auto &bc : cases) {
    TempDir t;
    itr_model_config base = io_test::tiny_config();
    std::vector<Tensor> ts = qv_tensors();
    bc.edit(ts);
    write_adapter(t.path(), bc.config, ts);
    itr_adapter *a = reinterpret_cast<itr_adapter *>(0x1);
    EXPECT_TRUE(failed_with(itr_adapter_open(t.path().c_str(), &base, &a), ITR_ERR_INPUT, bc.expect)) << bc.what;
    EXPECT_EQ(a, reinterpret_cast<itr_adapter *>(0x1)) << bc.what << ": out-parameter written on failure";
  }
}

TEST(PeftAdapter, PickleOnlyAdapterIsRefusedWithAHint) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  io_test::write_text(t.file("adapter_config.json"), peft_config(4, 8));
  io_test::write_text(t.file("adapter_model.bin"), "PK\x03\x04");
  itr_adapter *a = nullptr;
  EXPECT_TRUE(failed_with(itr_adapter_open(t.path().c_str(), &base, &a), ITR_ERR_INPUT,
                          {"adapter_model.bin", "safe_serialization=True"}));
  EXPECT_TRUE(failed_with(itr_adapter_open(t.file("nowhere").c_str(), &base, &a), ITR_ERR_INPUT,
                          {"cannot open", "nowhere/adapter_config.json"}));
}

TEST(PeftAdapter, SurvivesEveryAllocationFailure) {
  TempDir t;
  itr_model_config base = io_test::tiny_config();
  write_adapter(t.path(), peft_config(4, 8, "[\"q_proj\", \"v_proj\"]", ", \"rank_pattern\": {\"q_proj\": 4}"),
                qv_tensors());
  bool succeeded = false;
  for (long k = 1; k < 200 && !succeeded; k++) {
    itr_adapter *a = nullptr;
    itr_alloc_fail_after(k);
    itr_err e = itr_adapter_open(t.path().c_str(), &base, &a);
    itr_alloc_fail_after(0);
    if (e == ITR_OK) {
      succeeded = true;
      itr_adapter_destroy(a);
    } else {
      EXPECT_EQ(e, ITR_ERR_INTERNAL) << "k = " << k << ": " << itr_error_message();
    }
  }
  EXPECT_TRUE(succeeded);
}
