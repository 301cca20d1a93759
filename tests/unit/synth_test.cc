// The generators: the random number streams against published / hand-derived values, models and
// adapters that read back through the io layer with the promised shapes and scales, sharding that
// does not change a tensor, determinism, token bands, adapters aimed at a task's inputs (against a
// LAPACK eigendecomposition), the demo case, and `inspect` on its folders.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <lapacke.h>

#include "io_fixtures.h"
#include "iteris/io.h"
#include "iteris/synth.h"

using io_test::failed_with;
using io_test::TempDir;

namespace {
std::vector<double> read_f64(const itr_tensor_info *t) {
  std::vector<double> v((size_t)t->numel);
  EXPECT_EQ(itr_tensor_read_f64(t, v.data()), ITR_OK) << itr_error_message();
  return v;
}

void moments(const std::vector<double> &v, double *mean, double *std) {
  double s = 0, s2 = 0;
  for (double x : v) s += x;
  *mean = s / (double)v.size();
  for (double x : v) s2 += (x - *mean) * (x - *mean);
  *std = std::sqrt(s2 / (double)v.size());
}

// A llama with every bias and an untied head: D 64, F 96, L 2, 4 heads of 16, 2 kv heads, vocab 50.
itr_model_config biased_llama() {
  itr_model_config c = io_test::tiny_config(2);
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 50;
  c.attention_bias = c.o_bias = c.mlp_bias = 1;
  return c;
}

std::string capture_inspect(const std::string &dir, itr_err *err) {
  char *buf = nullptr;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  *err = itr_inspect_dir(dir.c_str(), f);
  std::fclose(f);
  std::string s(buf, len);
  std::free(buf);
  return s;
}

// x_t (V, D) = rmsnorm(embed_t) * input_layernorm of layer 0: the layer-0 q/k/v inputs, in float64.
std::vector<double> layer0_inputs(itr_tensor_store *s, const itr_model_config &c) {
  const itr_tensor_info *e = nullptr, *g = nullptr;
  EXPECT_EQ(itr_tensor_store_get(s, "model.embed_tokens.weight", &e), ITR_OK) << itr_error_message();
  EXPECT_EQ(itr_tensor_store_get(s, "model.layers.0.input_layernorm.weight", &g), ITR_OK) << itr_error_message();
  std::vector<double> E = read_f64(e), w = read_f64(g), x(E.size());
  const int D = c.hidden_size;
  for (int t = 0; t < c.vocab_size; t++) {
    double ss = 0;
    for (int j = 0; j < D; j++) ss += E[(size_t)(t * D + j)] * E[(size_t)(t * D + j)];
    double inv = 1.0 / std::sqrt(ss / D + c.rms_norm_eps);
    for (int j = 0; j < D; j++) x[(size_t)(t * D + j)] = E[(size_t)(t * D + j)] * inv * w[(size_t)j];
  }
  return x;
}

// ||scaling B A||_F / ||W0||_F of one module, in float64 from the files.
double update_ratio(const itr_lora_module *mod, const itr_tensor_info *w0) {
  std::vector<double> A = read_f64(mod->A), B = read_f64(mod->B), W = read_f64(w0);
  int64_t d_out = mod->B->shape[0], d_in = mod->A->shape[1];
  double dw2 = 0, w2 = 0;
  for (int64_t i = 0; i < d_out; i++)
    for (int64_t j = 0; j < d_in; j++) {
      double acc = 0;
      for (int k = 0; k < mod->r; k++) acc += B[(size_t)(i * mod->r + k)] * A[(size_t)(k * d_in + j)];
      dw2 += mod->scaling * mod->scaling * acc * acc;
    }
  for (double v : W) w2 += v * v;
  return std::sqrt(dw2 / w2);
}
}  // namespace

TEST(Synth, SplitmixMatchesPublishedValues) {
  uint64_t x = 0;  // splitmix64 reference outputs for seed 0
  EXPECT_EQ(itr_splitmix64(&x), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(itr_splitmix64(&x), 0x6e789e6aa1b965f4ULL);
  EXPECT_EQ(itr_splitmix64(&x), 0x06c45d188009454fULL);
}

TEST(Synth, XoshiroFromHandDerivedState) {
  // State {1, 2, 3, 4}: first output rotl(2 * 5, 7) * 9 = 1280 * 9; after one step s[1] = 0, so the
  // second output is 0.
  itr_rng g;
  itr_rng_init(&g, 0);
  g.s[0] = 1;
  g.s[1] = 2;
  g.s[2] = 3;
  g.s[3] = 4;
  EXPECT_EQ(itr_rng_next(&g), 11520u);
  EXPECT_EQ(itr_rng_next(&g), 0u);
}

TEST(Synth, UniformNormalAndBelowHaveTheRightDistribution) {
  itr_rng g;
  itr_rng_init(&g, 42);
  const int n = 200000;
  double s = 0, s2 = 0, within1 = 0, umin = 1, umax = 0, usum = 0;
  for (int i = 0; i < n; i++) {
    double x = itr_rng_normal(&g);
    s += x;
    s2 += x * x;
    within1 += std::fabs(x) < 1.0;
    double u = itr_rng_uniform(&g);
    umin = std::min(umin, u);
    umax = std::max(umax, u);
    usum += u;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.015);
  EXPECT_NEAR(within1 / n, 0.682689, 0.005);  // P(|Z| < 1)
  EXPECT_GE(umin, 0.0);
  EXPECT_LT(umax, 1.0);
  EXPECT_NEAR(usum / n, 0.5, 0.005);
  std::vector<int> counts(7, 0);
  for (int i = 0; i < 70000; i++) {
    uint64_t k = itr_rng_below(&g, 7);
    ASSERT_LT(k, 7u);
    counts[k]++;
  }
  for (int c : counts) EXPECT_NEAR(c, 10000, 400);
  EXPECT_EQ(itr_rng_below(&g, 1), 0u);
  // Per-name seeds differ by name and by seed.
  EXPECT_NE(itr_synth_seed(1, "a"), itr_synth_seed(1, "b"));
  EXPECT_NE(itr_synth_seed(1, "a"), itr_synth_seed(2, "a"));
  EXPECT_EQ(itr_synth_seed(1, "a"), itr_synth_seed(1, "a"));
}

TEST(Synth, ModelHasEveryTensorWithShapesAndScales) {
  TempDir t;
  itr_model_config c = biased_llama();
  ASSERT_EQ(itr_synth_model_write(t.path().c_str(), &c, ITR_F32, 1, 7), ITR_OK) << itr_error_message();
  itr_model_config back;
  ASSERT_EQ(itr_model_config_read(t.path().c_str(), &back), ITR_OK) << itr_error_message();
  EXPECT_EQ(back.hidden_size, 64);
  EXPECT_EQ(back.o_bias, 1);
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(t.path().c_str(), &s), ITR_OK) << itr_error_message();
  // Expected names and shapes, spelled out by hand: per layer 2 norms + 7 weights + 7 biases.
  std::vector<std::pair<std::string, std::vector<int64_t>>> want = {
      {"model.embed_tokens.weight", {50, 64}}, {"model.norm.weight", {64}}, {"lm_head.weight", {50, 64}}};
  const char *mods[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  const int64_t shp[7][2] = {{64, 64}, {32, 64}, {32, 64}, {64, 64}, {96, 64}, {96, 64}, {64, 96}};
  for (int l = 0; l < 2; l++) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    want.push_back({p + "input_layernorm.weight", {64}});
    want.push_back({p + "post_attention_layernorm.weight", {64}});
    for (int m = 0; m < 7; m++) {
      want.push_back({p + mods[m] + ".weight", {shp[m][0], shp[m][1]}});
      want.push_back({p + mods[m] + ".bias", {shp[m][0]}});
    }
  }
  EXPECT_EQ(itr_tensor_store_count(s), (int)want.size());
  for (const auto &w : want) {
    const itr_tensor_info *ti = nullptr;
    ASSERT_EQ(itr_tensor_store_get(s, w.first.c_str(), &ti), ITR_OK) << itr_error_message();
    EXPECT_EQ(ti->dtype, ITR_F32);
    ASSERT_EQ(ti->ndim, (int)w.second.size()) << w.first;
    for (int d = 0; d < ti->ndim; d++) EXPECT_EQ(ti->shape[d], w.second[d]) << w.first;
    double mean, std;
    moments(read_f64(ti), &mean, &std);
    if (w.first.find("layernorm") != std::string::npos || w.first == "model.norm.weight") {
      EXPECT_NEAR(mean, 1.0, 0.05) << w.first;
      EXPECT_NEAR(std, 0.1, 0.04) << w.first;
    } else if (w.first.find(".bias") != std::string::npos) {
      EXPECT_NEAR(std, 0.1, 0.04) << w.first;
    } else if (w.first == "model.embed_tokens.weight") {
      EXPECT_NEAR(std, 1.0, 0.05) << w.first;
    } else if (w.first == "lm_head.weight") {
      EXPECT_NEAR(std, 3.0 / 8.0, 0.03) << w.first;
    } else {
      EXPECT_NEAR(std, 1.0 / std::sqrt((double)w.second[1]), 0.1 / std::sqrt((double)w.second[1])) << w.first;
      EXPECT_NEAR(mean, 0.0, 0.02) << w.first;
    }
  }
  itr_tensor_store_destroy(s);
}

TEST(Synth, ShardingDoesNotChangeAnyTensorAndQwenTiesEmbeddings) {
  TempDir t;
  itr_model_config c = biased_llama();
  c.arch = ITR_ARCH_QWEN2;
  std::snprintf(c.model_type, sizeof c.model_type, "qwen2");
  c.o_bias = c.mlp_bias = 0;
  c.tie_word_embeddings = 1;
  ASSERT_EQ(itr_synth_model_write(t.file("one").c_str(), &c, ITR_BF16, 1, 11), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_synth_model_write(t.file("three").c_str(), &c, ITR_BF16, 3, 11), ITR_OK) << itr_error_message();
  EXPECT_TRUE(std::filesystem::exists(t.file("three/model.safetensors.index.json")));
  EXPECT_TRUE(std::filesystem::exists(t.file("three/model-00003-of-00003.safetensors")));
  EXPECT_FALSE(std::filesystem::exists(t.file("three/model.safetensors")));
  itr_tensor_store *a = nullptr, *b = nullptr;
  ASSERT_EQ(itr_tensor_store_open(t.file("one").c_str(), &a), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_tensor_store_open(t.file("three").c_str(), &b), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_tensor_store_count(a), itr_tensor_store_count(b));
  // qwen2: q/k/v biases only, tied embeddings (no lm_head): 1 + 2 * (2 + 7 + 3) + 1 tensors.
  EXPECT_EQ(itr_tensor_store_count(a), 26);
  EXPECT_FALSE(itr_tensor_store_has(a, "lm_head.weight"));
  EXPECT_TRUE(itr_tensor_store_has(a, "model.layers.1.self_attn.v_proj.bias"));
  EXPECT_FALSE(itr_tensor_store_has(a, "model.layers.1.self_attn.o_proj.bias"));
  EXPECT_FALSE(itr_tensor_store_has(a, "model.layers.1.mlp.up_proj.bias"));
  std::set<std::string> files;
  for (int i = 0; i < itr_tensor_store_count(a); i++) {
    const char *name = itr_tensor_store_name(a, i);
    const itr_tensor_info *x = nullptr, *y = nullptr;
    ASSERT_EQ(itr_tensor_store_get(a, name, &x), ITR_OK);
    ASSERT_EQ(itr_tensor_store_get(b, name, &y), ITR_OK) << itr_error_message();
    EXPECT_EQ(x->dtype, ITR_BF16);
    ASSERT_EQ(x->nbytes, y->nbytes);
    EXPECT_EQ(std::memcmp(x->data, y->data, x->nbytes), 0) << name;
    files.insert(y->file);
  }
  EXPECT_EQ(files.size(), 3u);
  itr_tensor_store_destroy(a);
  itr_tensor_store_destroy(b);
}

TEST(Synth, OutputIsAFunctionOfTheSeed) {
  TempDir t;
  itr_model_config c = io_test::tiny_config();
  ASSERT_EQ(itr_synth_model_write(t.file("a").c_str(), &c, ITR_F16, 1, 5), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_synth_model_write(t.file("b").c_str(), &c, ITR_F16, 1, 5), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_synth_model_write(t.file("c").c_str(), &c, ITR_F16, 1, 6), ITR_OK) << itr_error_message();
  std::string a = io_test::read_text(t.file("a/model.safetensors"));
  EXPECT_GT(a.size(), 1000u);
  EXPECT_EQ(a, io_test::read_text(t.file("b/model.safetensors")));
  EXPECT_NE(a, io_test::read_text(t.file("c/model.safetensors")));
  ASSERT_EQ(itr_synth_tokens_write(t.file("x.jsonl").c_str(), 100, 5, 2, 9, 3), ITR_OK);
  ASSERT_EQ(itr_synth_tokens_write(t.file("y.jsonl").c_str(), 100, 5, 2, 9, 3), ITR_OK);
  EXPECT_EQ(io_test::read_text(t.file("x.jsonl")), io_test::read_text(t.file("y.jsonl")));
}

TEST(Synth, AdapterUpdateIsANoticeableFractionOfTheBaseWeights) {
  TempDir t;
  itr_model_config c = biased_llama();
  ASSERT_EQ(itr_synth_model_write(t.file("base").c_str(), &c, ITR_F32, 1, 1), ITR_OK) << itr_error_message();
  struct {
    int r;
    double alpha;
    int rslora;
  } cases[] = {{8, 16, 0}, {4, 32, 1}};
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(t.file("base").c_str(), &s), ITR_OK);
  for (const auto &cs : cases) {
    std::string dir = t.file("ad" + std::to_string(cs.r));
    unsigned mask = (1u << ITR_MODULE_COUNT) - 1 - (1u << ITR_K_PROJ);
    ASSERT_EQ(itr_synth_adapter_write(dir.c_str(), &c, cs.r, cs.alpha, cs.rslora, mask, ITR_F32, 99, "base"), ITR_OK)
        << itr_error_message();
    itr_adapter *a = nullptr;
    ASSERT_EQ(itr_adapter_open(dir.c_str(), &c, &a), ITR_OK) << itr_error_message();
    EXPECT_EQ(a->target_mask, mask);
    EXPECT_STREQ(a->base_model, "base");
    double ratio_sum = 0;
    int n = 0;
    for (int l = 0; l < 2; l++)
      for (int m = 0; m < ITR_MODULE_COUNT; m++) {
        const itr_lora_module *mod = itr_adapter_module(a, l, (itr_module)m);
        ASSERT_EQ(mod->present, m != ITR_K_PROJ);
        if (!mod->present) continue;
        EXPECT_EQ(mod->r, cs.r);
        EXPECT_DOUBLE_EQ(mod->scaling, cs.rslora ? cs.alpha / std::sqrt(cs.r) : cs.alpha / cs.r);
        // ||scaling B A||_F / ||W0||_F in float64, computed here from the files.
        std::vector<double> A = read_f64(mod->A), B = read_f64(mod->B);
        int64_t d_out = mod->B->shape[0], d_in = mod->A->shape[1];
        double dw2 = 0;
        for (int64_t i = 0; i < d_out; i++)
          for (int64_t j = 0; j < d_in; j++) {
            double acc = 0;
            for (int k = 0; k < cs.r; k++) acc += B[(size_t)(i * cs.r + k)] * A[(size_t)(k * d_in + j)];
            dw2 += mod->scaling * mod->scaling * acc * acc;
          }
        char name[128];
        itr_name_base(l, (itr_module)m, "weight", name, sizeof name);
        const itr_tensor_info *w0 = nullptr;
        ASSERT_EQ(itr_tensor_store_get(s, name, &w0), ITR_OK);
        double w2 = 0;
        for (double x : read_f64(w0)) w2 += x * x;
        double ratio = std::sqrt(dw2 / w2);
        EXPECT_GT(ratio, 0.08) << name;
        EXPECT_LT(ratio, 0.4) << name;
        ratio_sum += ratio;
        n++;
      }
    EXPECT_NEAR(ratio_sum / n, ITR_SYNTH_ADAPTER_REL_NORM, 0.04);
    itr_adapter_destroy(a);
  }
  itr_tensor_store_destroy(s);
}

TEST(Synth, AimedAdapterLiesInItsTaskInputSubspace) {
  TempDir t;
  itr_model_config c = biased_llama();  // D 64, vocab 50
  ASSERT_EQ(itr_synth_model_write(t.file("base").c_str(), &c, ITR_F32, 1, 3), ITR_OK) << itr_error_message();
  std::vector<double> wt((size_t)c.vocab_size, 0.0);
  for (int k = 0; k < 25; k++) wt[(size_t)k] = 2.0;  // the task uses tokens 0..24 only (weights normalised)
  const unsigned all = (1u << ITR_MODULE_COUNT) - 1;
  const int r = 4;
  for (double aim : {0.9, 0.0})
    ASSERT_EQ(itr_synth_adapter_write_aimed(t.file("aim" + std::to_string((int)(aim * 10))).c_str(),
                                            t.file("base").c_str(), r, 8, 0, all, ITR_F32, wt.data(), aim, 5, "b"),
              ITR_OK)
        << itr_error_message();
  ASSERT_EQ(itr_synth_adapter_write_aimed(t.file("again").c_str(), t.file("base").c_str(), r, 8, 0, all, ITR_F32,
                                          wt.data(), 0.9, 5, "b"),
            ITR_OK);
  EXPECT_EQ(io_test::read_text(t.file("aim9/adapter_model.safetensors")),
            io_test::read_text(t.file("again/adapter_model.safetensors")));
  // The task's layer-0 input second moment and its top-r eigenvectors, by LAPACK.
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(t.file("base").c_str(), &s), ITR_OK);
  const int D = c.hidden_size;
  std::vector<double> x = layer0_inputs(s, c), C((size_t)(D * D), 0.0), ev((size_t)D);
  for (int k = 0; k < 25; k++)
    for (int i = 0; i < D; i++)
      for (int j = 0; j < D; j++) C[(size_t)(i * D + j)] += x[(size_t)(k * D + i)] * x[(size_t)(k * D + j)] / 25;
  ASSERT_EQ(LAPACKE_dsyev(LAPACK_ROW_MAJOR, 'V', 'U', D, C.data(), D, ev.data()), 0);  // ascending; columns
  for (double aim : {0.9, 0.0}) {
    itr_adapter *a = nullptr;
    ASSERT_EQ(itr_adapter_open(t.file("aim" + std::to_string((int)(aim * 10))).c_str(), &c, &a), ITR_OK)
        << itr_error_message();
    for (itr_module m : {ITR_Q_PROJ, ITR_V_PROJ}) {
      // Fraction of ||A||_F^2 inside the top-r eigenspace: aim (+ (1 - aim) r / D from the random part).
      std::vector<double> A = read_f64(itr_adapter_module(a, 0, m)->A);
      double in = 0, tot = 0;
      for (int k = 0; k < r; k++) {
        for (int j = 0; j < D; j++) tot += A[(size_t)(k * D + j)] * A[(size_t)(k * D + j)];
        for (int e = D - r; e < D; e++) {
          double p = 0;
          for (int j = 0; j < D; j++) p += A[(size_t)(k * D + j)] * C[(size_t)(j * D + e)];
          in += p * p;
        }
      }
      if (aim > 0)
        EXPECT_GT(in / tot, 0.8) << itr_module_name(m);
      else
        EXPECT_LT(in / tot, 0.35) << itr_module_name(m);
    }
    // Every module's update is exactly ITR_SYNTH_ADAPTER_REL_NORM of its base weight.
    for (int l = 0; l < 2; l++)
      for (int m = 0; m < ITR_MODULE_COUNT; m++) {
        char name[128];
        itr_name_base(l, (itr_module)m, "weight", name, sizeof name);
        const itr_tensor_info *w0 = nullptr;
        ASSERT_EQ(itr_tensor_store_get(s, name, &w0), ITR_OK);
        const itr_lora_module *mod = itr_adapter_module(a, l, (itr_module)m);
        ASSERT_TRUE(mod->present);
        EXPECT_EQ(mod->r, r);
        EXPECT_NEAR(update_ratio(mod, w0), ITR_SYNTH_ADAPTER_REL_NORM, 1e-5) << name;
      }
    itr_adapter_destroy(a);
  }
  itr_tensor_store_destroy(s);
  EXPECT_TRUE(failed_with(itr_synth_adapter_write_aimed(t.file("x").c_str(), t.file("base").c_str(), r, 8, 0, all,
                                                        ITR_F32, wt.data(), 1.5, 5, "b"),
                          ITR_ERR_INPUT, {"aim 1.5"}));
  std::vector<double> zero((size_t)c.vocab_size, 0.0);
  EXPECT_TRUE(failed_with(itr_synth_adapter_write_aimed(t.file("x").c_str(), t.file("base").c_str(), r, 8, 0, all,
                                                        ITR_F32, zero.data(), 0.9, 5, "b"),
                          ITR_ERR_INPUT, {"sum to 0"}));
}

TEST(Synth, TokensStayInTheirBandAndLengthRange) {
  TempDir t;
  ASSERT_EQ(itr_synth_tokens_write_band(t.file("b.jsonl").c_str(), 300, 100, 200, 0.8, 200, 5, 12, 17), ITR_OK)
      << itr_error_message();
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read(t.file("b.jsonl").c_str(), 300, &ts), ITR_OK) << itr_error_message();
  EXPECT_EQ(ts.n_seqs, 200);
  int64_t in_band = 0;
  std::set<int64_t> lengths;
  for (int s = 0; s < ts.n_seqs; s++) lengths.insert(ts.offsets[s + 1] - ts.offsets[s]);
  EXPECT_EQ(*lengths.begin(), 5);
  EXPECT_EQ(*lengths.rbegin(), 12);
  EXPECT_EQ(lengths.size(), 8u);
  for (int64_t i = 0; i < ts.n_tokens; i++) in_band += ts.ids[i] >= 100 && ts.ids[i] < 200;
  // 0.8 from the band plus 0.2 x 1/3 of the uniform draws.
  EXPECT_NEAR((double)in_band / (double)ts.n_tokens, 0.8 + 0.2 / 3, 0.03);
  itr_token_set_fini(&ts);
}

TEST(Synth, RefusesBadArguments) {
  TempDir t;
  itr_model_config c = io_test::tiny_config();
  EXPECT_TRUE(failed_with(itr_synth_model_write(t.path().c_str(), &c, ITR_F64, 1, 1), ITR_ERR_INPUT, {"F64"}));
  EXPECT_TRUE(failed_with(itr_synth_model_write(t.path().c_str(), &c, ITR_F32, 0, 1), ITR_ERR_INPUT, {"n_shards"}));
  EXPECT_TRUE(failed_with(itr_synth_adapter_write(t.path().c_str(), &c, 0, 1, 0, 1, ITR_F32, 1, ""), ITR_ERR_INPUT,
                          {"rank 0"}));
  EXPECT_TRUE(failed_with(itr_synth_adapter_write(t.path().c_str(), &c, 2, 1, 0, 0, ITR_F32, 1, ""), ITR_ERR_INPUT,
                          {"module mask"}));
  EXPECT_TRUE(failed_with(itr_synth_tokens_write_band(t.file("x").c_str(), 10, 5, 20, 1, 1, 1, 1, 1), ITR_ERR_INPUT,
                          {"band [5, 20)"}));
  EXPECT_TRUE(failed_with(itr_synth_tokens_write(t.file("x").c_str(), 10, 1, 5, 4, 1), ITR_ERR_INPUT, {"min_len"}));
}

TEST(Synth, DemoCaseIsCompleteAndTasksAreDistinguishable) {
  TempDir t;
  ASSERT_EQ(itr_synth_demo_write(t.path().c_str()), ITR_OK) << itr_error_message();
  itr_model_config c, want;
  itr_synth_demo_config(&want);
  ASSERT_EQ(itr_model_config_read(t.file("base").c_str(), &c), ITR_OK) << itr_error_message();
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.tie_word_embeddings, 0);
  EXPECT_EQ(c.rms_norm_eps, want.rms_norm_eps);
  itr_tensor_store *s = nullptr;
  ASSERT_EQ(itr_tensor_store_open(t.file("base").c_str(), &s), ITR_OK) << itr_error_message();
  EXPECT_EQ(itr_tensor_store_count(s), 1 + 4 * 9 + 2);  // embed, 4 x (2 norms + 7), norm, lm_head
  const itr_tensor_info *emb = nullptr;
  ASSERT_EQ(itr_tensor_store_get(s, "model.embed_tokens.weight", &emb), ITR_OK);
  EXPECT_EQ(emb->dtype, ITR_BF16);
  // Each adapter is aimed at its task: at layer 0, its q_proj update moves the outputs of its own
  // band's tokens clearly more than those of the other bands (a random adapter: about equally).
  std::vector<double> x = layer0_inputs(s, c);
  std::vector<std::vector<double>> resp(3, std::vector<double>(3, 0.0));
  const int ranks[3] = {4, 8, 16};
  const double scalings[3] = {2.0, 2.0, 4.0};
  const itr_dtype dtypes[3] = {ITR_BF16, ITR_F32, ITR_F16};
  for (int i = 0; i < 3; i++) {
    itr_adapter *a = nullptr;
    ASSERT_EQ(itr_adapter_open(t.file("adapter_" + std::to_string(i)).c_str(), &c, &a), ITR_OK) << itr_error_message();
    EXPECT_EQ(a->target_mask, (1u << ITR_MODULE_COUNT) - 1);
    const itr_lora_module *mod = itr_adapter_module(a, 3, ITR_DOWN_PROJ);
    EXPECT_EQ(mod->r, ranks[i]);
    EXPECT_DOUBLE_EQ(mod->scaling, scalings[i]);
    EXPECT_EQ(mod->A->dtype, dtypes[i]);
    const itr_lora_module *q = itr_adapter_module(a, 0, ITR_Q_PROJ);
    std::vector<double> A = read_f64(q->A);
    for (int tok = 0; tok < 256; tok++)
      for (int k = 0; k < q->r; k++) {
        double p = 0;
        for (int j = 0; j < 64; j++) p += A[(size_t)(k * 64 + j)] * x[(size_t)(tok * 64 + j)];
        resp[(size_t)i][(size_t)std::min(tok / 85, 2)] += p * p;  // ||B|| scales a row equally
      }
    itr_adapter_destroy(a);
    for (const char *kind : {"calib", "heldout"}) {
      itr_token_set ts;
      std::string path = t.file(std::string(kind) + "_" + std::to_string(i) + ".jsonl");
      ASSERT_EQ(itr_token_set_read(path.c_str(), 256, &ts), ITR_OK) << itr_error_message();
      EXPECT_EQ(ts.n_seqs, kind[0] == 'c' ? 32 : 16);
      int64_t own = 0;
      for (int64_t k = 0; k < ts.n_tokens; k++) own += std::min(ts.ids[k] / 85, 2) == i;
      EXPECT_GT((double)own / (double)ts.n_tokens, 0.85) << path;
      itr_token_set_fini(&ts);
    }
  }
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      if (j != i) {
        EXPECT_GT(resp[(size_t)i][(size_t)i], 1.5 * resp[(size_t)i][(size_t)j]) << "adapter " << i << " band " << j;
      }
  itr_tensor_store_destroy(s);
  EXPECT_NE(io_test::read_text(t.file("calib_0.jsonl")), io_test::read_text(t.file("heldout_0.jsonl")));
}

TEST(SynthInspect, SummarisesModelAndAdapterFolders) {
  TempDir t;
  ASSERT_EQ(itr_synth_demo_write(t.path().c_str()), ITR_OK) << itr_error_message();
  itr_err e;
  std::string m = capture_inspect(t.file("base"), &e);
  ASSERT_EQ(e, ITR_OK) << itr_error_message();
  for (const char *s : {"model folder", "model_type llama", "D (hidden_size) 64", "F (intermediate_size) 172",
                        "key/value heads 2", "tensors: 39", "model.layers.3.mlp.down_proj.weight", "(64, 172)",
                        "BF16", "total:"})
    EXPECT_NE(m.find(s), std::string::npos) << "lacks '" << s << "' in:\n" << m;
  std::string a = capture_inspect(t.file("adapter_2"), &e);
  ASSERT_EQ(e, ITR_OK) << itr_error_message();
  for (const char *s : {"adapter folder", "base model: iteris-mpi/demo-llama-d64", "r 16", "use_rslora yes",
                        "target modules: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj", "tensors: 56"})
    EXPECT_NE(a.find(s), std::string::npos) << "lacks '" << s << "' in:\n" << a;
  // The down_proj row: 4 layers 0-3, rank 16, scaling 16 / sqrt(16) = 4, (64 x 172).
  EXPECT_NE(a.find("down_proj  4        0-3      16       4                    64 x 172"), std::string::npos) << a;
  EXPECT_TRUE(failed_with((capture_inspect(t.path(), &e), e), ITR_ERR_INPUT,
                          {"neither a model folder", "nor an adapter folder"}));
}
