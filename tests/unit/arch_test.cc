// The architecture descriptor (src/model/arch.c) against shapes derived by hand from config.json's
// fields (Hugging Face's LlamaForCausalLM / Qwen2ForCausalLM layer definitions).
#include <gtest/gtest.h>

#include <cstring>
#include <string>

extern "C" {
#include "iteris/model.h"
}

namespace {

itr_model_config llama3_8b_like() {
  itr_model_config c;
  std::memset(&c, 0, sizeof c);
  c.arch = ITR_ARCH_LLAMA;
  std::strcpy(c.model_type, "llama");
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000;
  return c;
}

}  // namespace

TEST(Arch, Llama3ShapesSitesAndOrder) {
  itr_model_config c = llama3_8b_like();
  itr_arch_desc a;
  ASSERT_EQ(itr_arch_desc_init(&c, &a), ITR_OK);
  EXPECT_EQ(a.n_layers, 32);
  EXPECT_EQ(a.hidden_size, 4096);
  EXPECT_EQ(a.vocab_size, 128256);
  EXPECT_EQ(a.tied_embeddings, 0);
  // q: H*hd x D; k, v: Hkv*hd x D; o: D x H*hd; gate, up: F x D; down: D x F
  struct {
    const char *name, *block;
    int64_t d_out, d_in;
    const char *site;
  } want[] = {{"q_proj", "self_attn", 4096, 4096, "attn_in"}, {"k_proj", "self_attn", 1024, 4096, "attn_in"},
              {"v_proj", "self_attn", 1024, 4096, "attn_in"}, {"o_proj", "self_attn", 4096, 4096, "attn_out"},
              {"gate_proj", "mlp", 14336, 4096, "mlp_in"},    {"up_proj", "mlp", 14336, 4096, "mlp_in"},
              {"down_proj", "mlp", 4096, 14336, "mlp_out"}};
  ASSERT_EQ(a.n_modules, 7);
  for (int q = 0; q < 7; q++) {
    SCOPED_TRACE(want[q].name);
    EXPECT_STREQ(a.module[q].name, want[q].name);
    EXPECT_STREQ(a.module[q].block, want[q].block);
    EXPECT_EQ(a.module[q].d_out, want[q].d_out);
    EXPECT_EQ(a.module[q].d_in, want[q].d_in);
    EXPECT_STREQ(a.site[a.module[q].site].name, want[q].site);
    EXPECT_EQ(a.module[q].has_bias, 0);
    EXPECT_EQ(itr_arch_desc_module(&a, a.module[q].id), q);
  }
  // sites: every module once, in module order, with the site's width
  ASSERT_EQ(a.n_sites, 4);
  const int64_t width[4] = {4096, 4096, 4096, 14336};
  const int count[4] = {3, 1, 2, 1};
  int seen = 0;
  for (int s = 0; s < 4; s++) {
    EXPECT_EQ(a.site[s].d_in, width[s]);
    ASSERT_EQ(a.site[s].n_modules, count[s]);
    for (int k = 0; k < a.site[s].n_modules; k++) {
      EXPECT_EQ(a.site[s].modules[k], seen) << "site " << s;
      EXPECT_EQ(a.module[a.site[s].modules[k]].site, s);
      seen++;
    }
    EXPECT_EQ(itr_arch_desc_site(&a, a.site[s].id), s);
  }
  EXPECT_EQ(seen, 7);
}

TEST(Arch, Qwen2BiasesAndTiedEmbeddings) {
  itr_model_config c = llama3_8b_like();
  c.arch = ITR_ARCH_QWEN2;
  std::strcpy(c.model_type, "qwen2");
  c.tie_word_embeddings = 1;
  itr_arch_desc a;
  ASSERT_EQ(itr_arch_desc_init(&c, &a), ITR_OK);
  EXPECT_EQ(a.tied_embeddings, 1);
  for (int q = 0; q < a.n_modules; q++) {
    const std::string n = a.module[q].name;
    EXPECT_EQ(a.module[q].has_bias, n == "q_proj" || n == "k_proj" || n == "v_proj") << n;
  }
}

TEST(Arch, HeadDimOtherThanHiddenOverHeads) {
  itr_model_config c = llama3_8b_like();
  c.hidden_size = 2048;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 128;  // H * hd = 1024 != D
  itr_arch_desc a;
  ASSERT_EQ(itr_arch_desc_init(&c, &a), ITR_OK);
  EXPECT_EQ(a.module[0].d_out, 1024);  // q
  EXPECT_EQ(a.module[1].d_out, 256);   // k
  EXPECT_EQ(a.module[3].d_in, 1024);   // o reads the attention output
  EXPECT_EQ(a.site[1].d_in, 1024);
  EXPECT_EQ(a.module[3].d_out, 2048);
}
