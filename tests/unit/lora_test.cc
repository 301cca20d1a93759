// itr_lora_set_groups (src/model/lora.c): every float of the packed vector gets its parameter group, in
// itr_lora_set_pack's order. The factors are filled with one value per group (attention 1, router 2,
// experts 3), packed, and the groups compared with the values; the counts with the hand-computed sizes.
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "iteris/model.h"

namespace {

// Two layers, hidden 8, FFN 12, 2 heads of 4, one key/value head: q_proj 8 x 8, v_proj 4 x 8, gate 12 x 8, down 8 x 12.
itr_model_config tiny_config() {
  itr_model_config c;
  std::memset(&c, 0, sizeof c);
  c.arch = ITR_ARCH_LLAMA;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.num_hidden_layers = 2;
  c.vocab_size = 16;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.max_position_embeddings = 64;
  return c;
}

}  // namespace

TEST(LoraSetGroups, MatchPackOrder) {
  itr_model_config cfg = tiny_config();
  itr_lora_set *s = nullptr;
  ASSERT_EQ(itr_lora_set_create(&cfg, &s), ITR_OK);
  std::vector<float> one(64, 1.0f), two(64, 2.0f), three(64, 3.0f);
  // attention: layer 0 q (r 2: 2 (8 + 8) = 32), layer 1 v (r 1: 8 + 4 = 12), layer 1 q (r 1: 16)
  ASSERT_EQ(itr_lora_set_add(s, 0, ITR_Q_PROJ, 2, 1.0f, one.data(), one.data()), ITR_OK);
  ASSERT_EQ(itr_lora_set_add(s, 1, ITR_V_PROJ, 1, 1.0f, one.data(), one.data()), ITR_OK);
  ASSERT_EQ(itr_lora_set_add(s, 1, ITR_Q_PROJ, 1, 1.0f, one.data(), one.data()), ITR_OK);
  // layer 0 MixLoRA, 2 experts: router 2 x 8 = 16; expert 0 gate r 1 (8 + 12 = 20), expert 1 down r 2 (2 (12 + 8) = 40)
  ASSERT_EQ(itr_lora_set_set_moe(s, 0, 2, 1, two.data()), ITR_OK);
  ASSERT_EQ(itr_lora_set_set_expert(s, 0, 0, ITR_GATE_PROJ, 1, 1.0f, three.data(), three.data()), ITR_OK);
  ASSERT_EQ(itr_lora_set_set_expert(s, 0, 1, ITR_DOWN_PROJ, 2, 1.0f, three.data(), three.data()), ITR_OK);
  size_t n = itr_lora_set_n_params(s);
  ASSERT_EQ(n, 32u + 12u + 16u + 16u + 20u + 40u);
  std::vector<float> flat(n);
  std::vector<unsigned char> group(n, 0);
  itr_lora_set_pack(s, flat.data());
  itr_lora_set_groups(s, group.data());
  size_t count[8] = {0};
  for (size_t i = 0; i < n; i++) {
    unsigned char want = flat[i] == 1.0f ? ITR_LORA_GROUP_ATTENTION : flat[i] == 2.0f ? ITR_LORA_GROUP_ROUTERS
                                                                                      : ITR_LORA_GROUP_EXPERTS;
    ASSERT_EQ(group[i], want) << "float " << i << " (packed value " << flat[i] << ")";
    count[group[i]]++;
  }
  EXPECT_EQ(count[ITR_LORA_GROUP_ATTENTION], 60u);
  EXPECT_EQ(count[ITR_LORA_GROUP_ROUTERS], 16u);
  EXPECT_EQ(count[ITR_LORA_GROUP_EXPERTS], 60u);
  itr_lora_set_destroy(s);
}
