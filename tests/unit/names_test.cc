// The one table of Hugging Face / PEFT names: exact spellings, round trips, and names that are
// not standard PEFT LoRA factors.
#include <string>

#include <gtest/gtest.h>

#include "iteris/io.h"

TEST(Names, ModuleTableMatchesHuggingFace) {
  const char *names[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  const char *blocks[] = {"self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"};
  const itr_site sites[] = {ITR_SITE_ATTN_IN, ITR_SITE_ATTN_IN, ITR_SITE_ATTN_IN, ITR_SITE_ATTN_OUT,
                            ITR_SITE_MLP_IN,  ITR_SITE_MLP_IN,  ITR_SITE_MLP_OUT};
  for (int m = 0; m < ITR_MODULE_COUNT; m++) {
    EXPECT_STREQ(itr_module_name((itr_module)m), names[m]);
    EXPECT_STREQ(itr_module_block((itr_module)m), blocks[m]);
    EXPECT_EQ(itr_module_site((itr_module)m), sites[m]);
    itr_module back;
    ASSERT_TRUE(itr_module_parse(names[m], &back));
    EXPECT_EQ(back, (itr_module)m);
  }
  itr_module x = ITR_Q_PROJ;
  EXPECT_FALSE(itr_module_parse("lm_head", &x));
  EXPECT_FALSE(itr_module_parse("Q_PROJ", &x));
  EXPECT_FALSE(itr_module_parse("", &x));
  EXPECT_EQ(x, ITR_Q_PROJ);
}

TEST(Names, BaseAndLayerNames) {
  char buf[160];
  itr_name_base(3, ITR_Q_PROJ, "weight", buf, sizeof buf);
  EXPECT_STREQ(buf, "model.layers.3.self_attn.q_proj.weight");
  itr_name_base(17, ITR_DOWN_PROJ, "bias", buf, sizeof buf);
  EXPECT_STREQ(buf, "model.layers.17.mlp.down_proj.bias");
  itr_name_layer_norm(0, 0, buf, sizeof buf);
  EXPECT_STREQ(buf, "model.layers.0.input_layernorm.weight");
  itr_name_layer_norm(5, 1, buf, sizeof buf);
  EXPECT_STREQ(buf, "model.layers.5.post_attention_layernorm.weight");
  EXPECT_STREQ(ITR_NAME_EMBED, "model.embed_tokens.weight");
  EXPECT_STREQ(ITR_NAME_FINAL_NORM, "model.norm.weight");
  EXPECT_STREQ(ITR_NAME_LM_HEAD, "lm_head.weight");
}

TEST(Names, LoraNamesRoundTripForEveryModule) {
  char buf[160];
  itr_name_lora(3, ITR_Q_PROJ, 'A', buf, sizeof buf);
  EXPECT_STREQ(buf, "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight");
  itr_name_lora(31, ITR_UP_PROJ, 'B', buf, sizeof buf);
  EXPECT_STREQ(buf, "base_model.model.model.layers.31.mlp.up_proj.lora_B.weight");
  for (int layer : {0, 1, 9, 10, 123}) {
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      for (char which : {'A', 'B'}) {
        itr_name_lora(layer, (itr_module)m, which, buf, sizeof buf);
        int l = -1;
        itr_module mm = ITR_MODULE_COUNT;
        char w = 0;
        ASSERT_TRUE(itr_name_parse_lora(buf, &l, &mm, &w)) << buf;
        EXPECT_EQ(l, layer);
        EXPECT_EQ(mm, (itr_module)m);
        EXPECT_EQ(w, which);
      }
    }
  }
}

TEST(Names, ParseLoraRejectsNonStandardNames) {
  const char *bad[] = {
      "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",  // adapter-name infix
      "base_model.model.model.layers.3.mlp.q_proj.lora_A.weight",                // wrong block
      "base_model.model.model.layers.3.self_attn.gate_proj.lora_A.weight",       // wrong block
      "base_model.model.model.layers.03.self_attn.q_proj.lora_A.weight",         // leading zero
      "base_model.model.model.layers.-1.self_attn.q_proj.lora_A.weight",         // negative
      "base_model.model.model.layers..self_attn.q_proj.lora_A.weight",           // no index
      "base_model.model.model.layers.3.self_attn.q_proj.lora_C.weight",          // not A/B
      "base_model.model.model.layers.3.self_attn.q_proj.lora_B.bias",            // LoRA bias
      "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weightx",         // trailing text
      "base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector",  // DoRA
      "base_model.model.layers.3.self_attn.q_proj.lora_A.weight",                // one "model" short
      "model.layers.3.self_attn.q_proj.lora_A.weight",                           // no PEFT prefix
      "base_model.model.model.layers.3.self_attn.qq_proj.lora_A.weight",         // unknown module
      "base_model.model.model.layers.99999999.self_attn.q_proj.lora_A.weight",   // absurd index
      "",
  };
  for (const char *name : bad) {
    int l = -7;
    itr_module m = ITR_MODULE_COUNT;
    char w = 'x';
    EXPECT_FALSE(itr_name_parse_lora(name, &l, &m, &w)) << name;
    EXPECT_EQ(l, -7) << "out-parameters must stay untouched: " << name;
  }
}
