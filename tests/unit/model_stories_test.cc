// The forward pass on a real pretrained model (stories260K, shared data outside the repository):
// logits against an independent float64 implementation, layer-split loading, the CLI's logits
// writer, and a greedy continuation decoded with the model's own vocabulary.
// Skipped (GTEST_SKIP) when ../shared/models/stories260K is not present.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

extern "C" {
#include "iteris/io.h"
#include "iteris/model.h"
}

namespace {

std::string stories_dir() {
  const char *env = std::getenv("ITERIS_STORIES260K");
  if (env && access((std::string(env) + "/config.json").c_str(), R_OK) == 0) return env;
  for (const char *p : {"../shared/models/stories260K", "/work/shared/models/stories260K", "shared/models/stories260K"})
    if (access((std::string(p) + "/config.json").c_str(), R_OK) == 0) return p;
  return "";
}

#define REQUIRE_STORIES(dir)                                                                    \
  std::string dir = stories_dir();                                                              \
  if (dir.empty()) GTEST_SKIP() << "stories260K not found (looked for ../shared/models/stories260K, " \
                                   "/work/shared/models/stories260K; set ITERIS_STORIES260K)";

struct Loaded {
  itr_model_config cfg;
  itr_tensor_store *store = nullptr;
  itr_model *model = nullptr;
  itr_token_set prompts;
  itr_safetensors *ref = nullptr;
  bool have_prompts = false;
  ~Loaded() {
    itr_model_destroy(model);
    itr_tensor_store_destroy(store);
    itr_safetensors_destroy(ref);
    if (have_prompts) itr_token_set_fini(&prompts);
  }
  ::testing::AssertionResult open(const std::string &dir) {
    if (itr_model_config_read(dir.c_str(), &cfg) != ITR_OK ||
        itr_tensor_store_open(dir.c_str(), &store) != ITR_OK ||
        itr_model_load(&cfg, store, 0, cfg.num_hidden_layers, 1, 1, &model) != ITR_OK)
      return ::testing::AssertionFailure() << itr_error_message();
    std::memset(&prompts, 0, sizeof prompts);
    if (itr_token_set_read((dir + "/prompts.jsonl").c_str(), cfg.vocab_size, &prompts) != ITR_OK)
      return ::testing::AssertionFailure() << itr_error_message();
    have_prompts = true;
    if (itr_safetensors_open((dir + "/reference_logits.safetensors").c_str(), &ref) != ITR_OK)
      return ::testing::AssertionFailure() << itr_error_message();
    return ::testing::AssertionSuccess();
  }
  std::vector<float> reference(int k, int64_t T) {
    char name[32];
    std::snprintf(name, sizeof name, "logits.%d", k);
    const itr_tensor_info *t = itr_safetensors_find(ref, name);
    EXPECT_NE(t, nullptr) << name;
    if (!t) return {};
    EXPECT_EQ(t->numel, T * cfg.vocab_size) << name;
    std::vector<float> v(t->numel);
    EXPECT_EQ(itr_tensor_read_f32(t, v.data()), ITR_OK);
    return v;
  }
};

double rel_err(const std::vector<float> &got, const std::vector<float> &want) {
  double md = 0, mw = 0;
  for (size_t j = 0; j < want.size() && j < got.size(); j++) {
    md = std::max(md, std::fabs((double)got[j] - want[j]));
    mw = std::max(mw, std::fabs((double)want[j]));
  }
  return md / mw;
}

TEST(ModelStories260K, LogitsMatchFloat64Reference) {
  REQUIRE_STORIES(dir);
  Loaded m;
  ASSERT_TRUE(m.open(dir));
  ASSERT_EQ(m.prompts.n_seqs, 4);
  for (int s = 0; s < m.prompts.n_seqs; s++) {
    int64_t T = m.prompts.offsets[s + 1] - m.prompts.offsets[s];
    std::vector<float> lg(T * m.cfg.vocab_size);
    ASSERT_EQ(itr_model_forward(m.model, m.prompts.ids + m.prompts.offsets[s], T, nullptr, nullptr, nullptr, nullptr,
                                lg.data()),
              ITR_OK)
        << itr_error_message();
    double e = rel_err(lg, m.reference(s, T));
    std::printf("stories260K prompt %d: %lld tokens, max |diff| / max |ref| = %.3g\n", s, (long long)T, e);
    EXPECT_LT(e, 1e-5) << "prompt " << s;
  }
}

TEST(ModelStories260K, PackedPromptsMatchReference) {
  REQUIRE_STORIES(dir);
  Loaded m;
  ASSERT_TRUE(m.open(dir));
  int64_t T = m.prompts.n_tokens;
  std::vector<float> lg(T * m.cfg.vocab_size);
  itr_seq_layout lay = {m.prompts.n_seqs, m.prompts.offsets};
  ASSERT_EQ(itr_model_forward(m.model, m.prompts.ids, T, &lay, nullptr, nullptr, nullptr, lg.data()), ITR_OK)
      << itr_error_message();
  for (int s = 0; s < m.prompts.n_seqs; s++) {
    int64_t a = m.prompts.offsets[s], n = m.prompts.offsets[s + 1] - a;
    std::vector<float> part(lg.begin() + a * m.cfg.vocab_size, lg.begin() + (a + n) * m.cfg.vocab_size);
    EXPECT_LT(rel_err(part, m.reference(s, n)), 1e-5) << "prompt " << s;
  }
}

// Two "ranks": layers [0, 2) with the embedding, [2, 5) with the head, each loading only its part.
TEST(ModelStories260K, LayerSplitLoadMatchesReference) {
  REQUIRE_STORIES(dir);
  Loaded m;
  ASSERT_TRUE(m.open(dir));
  itr_model *p0 = nullptr, *p1 = nullptr;
  ASSERT_EQ(itr_model_load(&m.cfg, m.store, 0, 2, 1, 0, &p0), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_model_load(&m.cfg, m.store, 2, 5, 0, 1, &p1), ITR_OK) << itr_error_message();
  int64_t T = m.prompts.offsets[1];
  std::vector<float> h(T * m.cfg.hidden_size), lg(T * m.cfg.vocab_size);
  EXPECT_EQ(itr_model_embed(p0, m.prompts.ids, T, h.data()), ITR_OK);
  EXPECT_EQ(itr_model_run_layers(p0, 0, 2, h.data(), T, nullptr, nullptr, nullptr, nullptr), ITR_OK);
  EXPECT_EQ(itr_model_run_layers(p1, 2, 5, h.data(), T, nullptr, nullptr, nullptr, nullptr), ITR_OK);
  EXPECT_EQ(itr_model_logits(p1, h.data(), T, lg.data()), ITR_OK) << itr_error_message();
  EXPECT_LT(rel_err(lg, m.reference(0, T)), 1e-5);
  itr_model_destroy(p0);
  itr_model_destroy(p1);
}

TEST(ModelStories260K, WriteLogitsMatchesReference) {
  REQUIRE_STORIES(dir);
  char tmpl[] = "/tmp/iteris_logits_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string out = std::string(tmpl) + "/logits.safetensors";
  ASSERT_EQ(itr_model_write_logits(dir.c_str(), nullptr, 0, (dir + "/prompts.jsonl").c_str(), out.c_str()), ITR_OK)
      << itr_error_message();
  Loaded m;
  ASSERT_TRUE(m.open(dir));
  itr_safetensors *st = nullptr;
  ASSERT_EQ(itr_safetensors_open(out.c_str(), &st), ITR_OK) << itr_error_message();
  EXPECT_EQ(itr_safetensors_count(st), 4);
  for (int s = 0; s < 4; s++) {
    char name[32];
    std::snprintf(name, sizeof name, "logits.%d", s);
    const itr_tensor_info *t = itr_safetensors_find(st, name);
    ASSERT_NE(t, nullptr) << name;
    int64_t T = m.prompts.offsets[s + 1] - m.prompts.offsets[s];
    ASSERT_EQ(t->ndim, 2);
    EXPECT_EQ(t->shape[0], T);
    EXPECT_EQ(t->shape[1], 512);
    EXPECT_EQ(t->dtype, ITR_F32);
    std::vector<float> v(t->numel);
    ASSERT_EQ(itr_tensor_read_f32(t, v.data()), ITR_OK);
    EXPECT_LT(rel_err(v, m.reference(s, T)), 1e-5) << name;
  }
  itr_safetensors_destroy(st);
  std::remove(out.c_str());
  rmdir(tmpl);
}

TEST(ModelStories260K, WriteLogitsNamesMissingFolder) {
  EXPECT_NE(itr_model_write_logits("/nonexistent/model", nullptr, 0, "/nonexistent/t.jsonl", "/tmp/x.safetensors"),
            ITR_OK);
  EXPECT_NE(std::string(itr_error_message()).find("/nonexistent/model"), std::string::npos) << itr_error_message();
}

// Greedy continuation of prompt 0, decoded with tok512.bin (llama2.c format): the README says it
// continues "She loved to play outside in the park."
TEST(ModelStories260K, GreedyContinuationIsSensible) {
  REQUIRE_STORIES(dir);
  Loaded m;
  ASSERT_TRUE(m.open(dir));
  FILE *f = std::fopen((dir + "/tok512.bin").c_str(), "rb");
  if (!f) GTEST_SKIP() << "no tok512.bin";
  std::vector<std::string> vocab;
  int maxlen = 0;
  ASSERT_EQ(std::fread(&maxlen, 4, 1, f), 1u);
  for (int i = 0; i < 512; i++) {
    float score;
    int len;
    ASSERT_EQ(std::fread(&score, 4, 1, f), 1u);
    ASSERT_EQ(std::fread(&len, 4, 1, f), 1u);
    ASSERT_TRUE(len >= 0 && len <= 64);
    std::string s(len, '\0');
    ASSERT_EQ(std::fread(&s[0], 1, len, f), (size_t)len);
    vocab.push_back(s);
  }
  std::fclose(f);
  std::vector<int32_t> ids(m.prompts.ids, m.prompts.ids + m.prompts.offsets[1]);
  std::string text;
  for (int step = 0; step < 12; step++) {
    std::vector<float> lg(ids.size() * 512);
    ASSERT_EQ(itr_model_forward(m.model, ids.data(), (int64_t)ids.size(), nullptr, nullptr, nullptr, nullptr, lg.data()),
              ITR_OK);
    const float *last = lg.data() + (ids.size() - 1) * 512;
    int best = 0;
    for (int j = 1; j < 512; j++)
      if (last[j] > last[best]) best = j;
    ids.push_back(best);
    text += vocab[best];
  }
  std::printf("greedy continuation: \"%s\"\n", text.c_str());
  EXPECT_EQ(text.rfind(" She loved to play outside", 0), 0u) << text;
}

}  // namespace
