// config.json: transformers' defaults, the three supported families, write/read round trips,
// projection shapes, and a table of refused configs, each with the words its message must hold.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::failed_with;
using io_test::TempDir;
using io_test::write_text;

namespace {
const char *kLlamaMinimal =
    "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, \"num_hidden_layers\": 4,"
    " \"num_attention_heads\": 4, \"vocab_size\": 256}";

itr_err read_json(const TempDir &t, const std::string &json, itr_model_config *c) {
  write_text(t.file("config.json"), json);
  return itr_model_config_read(t.path().c_str(), c);
}
}  // namespace

TEST(HfConfig, ReadsLlamaWithTransformersDefaults) {
  TempDir t;
  itr_model_config c;
  ASSERT_EQ(read_json(t, kLlamaMinimal, &c), ITR_OK) << itr_error_message();
  EXPECT_EQ(c.arch, ITR_ARCH_LLAMA);
  EXPECT_STREQ(c.model_type, "llama");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 4);  // defaults to the number of heads
  EXPECT_EQ(c.head_dim, 16);            // hidden / heads
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.tie_word_embeddings, 0);
  EXPECT_EQ(c.attention_bias, 0);
  EXPECT_EQ(c.o_bias, 0);
  EXPECT_EQ(c.mlp_bias, 0);
}

TEST(HfConfig, ReadsARealLookingLlamaConfigFile) {
  // Shaped like TinyLlama-1.1B's config.json (with its extra keys), given as a file path.
  TempDir t;
  write_text(t.file("tiny.json"),
             "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"attention_bias\": false,\n"
             "  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n  \"hidden_act\": \"silu\",\n  \"hidden_size\": 2048,\n"
             "  \"initializer_range\": 0.02,\n  \"intermediate_size\": 5632,\n  \"max_position_embeddings\": 2048,\n"
             "  \"model_type\": \"llama\",\n  \"num_attention_heads\": 32,\n  \"num_hidden_layers\": 22,\n"
             "  \"num_key_value_heads\": 4,\n  \"pretraining_tp\": 1,\n  \"rms_norm_eps\": 1e-05,\n"
             "  \"rope_scaling\": null,\n  \"rope_theta\": 10000.0,\n  \"tie_word_embeddings\": false,\n"
             "  \"torch_dtype\": \"bfloat16\",\n  \"transformers_version\": \"4.35.0\",\n  \"use_cache\": true,\n"
             "  \"vocab_size\": 32000\n}\n");
  itr_model_config c;
  ASSERT_EQ(itr_model_config_read(t.file("tiny.json").c_str(), &c), ITR_OK) << itr_error_message();
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  int64_t d_out, d_in;
  itr_module_shape(&c, ITR_K_PROJ, &d_out, &d_in);
  EXPECT_EQ(d_out, 256);  // 4 kv heads x 64
  EXPECT_EQ(d_in, 2048);
}

TEST(HfConfig, FamiliesAndTheirBiases) {
  TempDir t;
  itr_model_config c;
  ASSERT_EQ(read_json(t,
                      "{\"architectures\": [\"Qwen2ForCausalLM\"], \"hidden_size\": 64, \"intermediate_size\": 128,"
                      " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2,"
                      " \"vocab_size\": 100, \"use_sliding_window\": false, \"sliding_window\": 4096,"
                      " \"max_position_embeddings\": 32768, \"tie_word_embeddings\": true}",
                      &c),
            ITR_OK)
      << itr_error_message();
  EXPECT_EQ(c.arch, ITR_ARCH_QWEN2);
  EXPECT_STREQ(c.model_type, "qwen2");
  EXPECT_EQ(c.attention_bias, 1);  // q/k/v always
  EXPECT_EQ(c.o_bias, 0);
  EXPECT_EQ(c.mlp_bias, 0);
  EXPECT_EQ(c.tie_word_embeddings, 1);

  ASSERT_EQ(read_json(t,
                      "{\"model_type\": \"mistral\", \"hidden_size\": 64, \"intermediate_size\": 128,"
                      " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 1,"
                      " \"head_dim\": 32, \"vocab_size\": 100, \"sliding_window\": null}",
                      &c),
            ITR_OK)
      << itr_error_message();
  EXPECT_EQ(c.arch, ITR_ARCH_MISTRAL);
  EXPECT_EQ(c.head_dim, 32);  // explicit head_dim wins over hidden / heads
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.attention_bias + c.o_bias + c.mlp_bias, 0);

  // A window that covers every position is plain causal attention.
  ASSERT_EQ(read_json(t,
                      "{\"model_type\": \"mistral\", \"hidden_size\": 64, \"intermediate_size\": 128,"
                      " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100,"
                      " \"max_position_embeddings\": 4096, \"sliding_window\": 4096}",
                      &c),
            ITR_OK)
      << itr_error_message();

  ASSERT_EQ(read_json(t,
                      "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128,"
                      " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100,"
                      " \"attention_bias\": true, \"mlp_bias\": true, \"rope_scaling\": {\"rope_type\": \"default\"}}",
                      &c),
            ITR_OK)
      << itr_error_message();
  EXPECT_EQ(c.attention_bias, 1);
  EXPECT_EQ(c.o_bias, 1);  // llama's attention_bias covers o_proj too
  EXPECT_EQ(c.mlp_bias, 1);
}

TEST(HfConfig, ReadsTransformers5RopeParameters) {
  TempDir t;
  itr_model_config c;
  ASSERT_EQ(read_json(t,
                      "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128,"
                      " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100,"
                      " \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 500000.0}}",
                      &c),
            ITR_OK)
      << itr_error_message();
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_TRUE(failed_with(read_json(t,
                                    "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128,"
                                    " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100,"
                                    " \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4.0}}",
                                    &c),
                          ITR_ERR_INPUT, {"rope_parameters type 'yarn' is not supported yet"}));
}

TEST(HfConfig, ModuleShapesFollowHeadsAndHeadDim) {
  itr_model_config c = io_test::tiny_config();
  c.head_dim = 12;  // heads x head_dim = 24 != hidden 16: projections are not square
  const int64_t want[ITR_MODULE_COUNT][2] = {{24, 16}, {12, 16}, {12, 16}, {16, 24}, {24, 16}, {24, 16}, {16, 24}};
  for (int m = 0; m < ITR_MODULE_COUNT; m++) {
    int64_t d_out = -1, d_in = -1;
    itr_module_shape(&c, (itr_module)m, &d_out, &d_in);
    EXPECT_EQ(d_out, want[m][0]) << itr_module_name((itr_module)m);
    EXPECT_EQ(d_in, want[m][1]) << itr_module_name((itr_module)m);
  }
}

TEST(HfConfig, WriteReadRoundTripForEveryFamily) {
  TempDir t;
  for (int a = 0; a < 3; a++) {
    itr_model_config c = io_test::tiny_config(3);
    c.arch = (itr_arch)a;
    std::snprintf(c.model_type, sizeof c.model_type, "%s", a == 0 ? "llama" : a == 1 ? "mistral" : "qwen2");
    c.head_dim = 10;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 500000.0;
    c.tie_word_embeddings = a == 2;
    c.attention_bias = a != 1;
    c.o_bias = a == 0;
    c.mlp_bias = a == 0;
    std::string path = t.file("config_" + std::to_string(a) + ".json");
    ASSERT_EQ(itr_model_config_write(path.c_str(), &c), ITR_OK) << itr_error_message();
    itr_model_config back;
    ASSERT_EQ(itr_model_config_read(path.c_str(), &back), ITR_OK) << itr_error_message();
    EXPECT_EQ(back.arch, c.arch);
    EXPECT_STREQ(back.model_type, c.model_type);
    EXPECT_EQ(back.hidden_size, c.hidden_size);
    EXPECT_EQ(back.intermediate_size, c.intermediate_size);
    EXPECT_EQ(back.num_hidden_layers, c.num_hidden_layers);
    EXPECT_EQ(back.num_attention_heads, c.num_attention_heads);
    EXPECT_EQ(back.num_key_value_heads, c.num_key_value_heads);
    EXPECT_EQ(back.head_dim, c.head_dim);
    EXPECT_EQ(back.vocab_size, c.vocab_size);
    EXPECT_EQ(back.max_position_embeddings, c.max_position_embeddings);
    EXPECT_EQ(back.rms_norm_eps, c.rms_norm_eps);
    EXPECT_EQ(back.rope_theta, c.rope_theta);
    EXPECT_EQ(back.tie_word_embeddings, c.tie_word_embeddings);
    EXPECT_EQ(back.attention_bias, c.attention_bias);
    EXPECT_EQ(back.o_bias, c.o_bias);
    EXPECT_EQ(back.mlp_bias, c.mlp_bias);
  }
  // Writing to a folder writes DIR/config.json.
  itr_model_config c = io_test::tiny_config();
  ASSERT_EQ(itr_model_config_write(t.path().c_str(), &c), ITR_OK) << itr_error_message();
  EXPECT_NE(io_test::read_text(t.file("config.json")).find("\"LlamaForCausalLM\""), std::string::npos);
}

TEST(HfConfig, WriteRefusesInconsistentConfigs) {
  TempDir t;
  itr_model_config c = io_test::tiny_config();
  c.arch = ITR_ARCH_QWEN2;
  c.attention_bias = 1;
  c.o_bias = 1;
  EXPECT_TRUE(failed_with(itr_model_config_write(t.file("c.json").c_str(), &c), ITR_ERR_INPUT, {"qwen2", "o_bias"}));
  c = io_test::tiny_config();
  c.num_key_value_heads = 3;
  EXPECT_TRUE(failed_with(itr_model_config_write(t.file("c.json").c_str(), &c), ITR_ERR_INPUT,
                          {"not a multiple of num_key_value_heads 3"}));
  EXPECT_FALSE(std::filesystem::exists(t.file("c.json")));
}

struct BadConfig {
  const char *what;
  std::string json;
  std::vector<std::string> expect;
};

TEST(HfConfig, RefusesHostileOrUnsupportedConfigs) {
  const std::string base =
      "\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
      " \"vocab_size\": 100";
  const std::vector<BadConfig> cases = {
      {"unsupported model_type", "{\"model_type\": \"gemma\", " + base + "}",
       {"model_type 'gemma' is not supported", "llama, mistral, qwen2"}},
      {"unsupported architecture", "{\"architectures\": [\"GPT2LMHeadModel\"], " + base + "}",
       {"architecture 'GPT2LMHeadModel' is not supported"}},
      {"not a causal LM", "{\"architectures\": [\"LlamaForSequenceClassification\"], " + base + "}",
       {"'LlamaForSequenceClassification' is not supported", "causal language models"}},
      {"family disagreement", "{\"model_type\": \"llama\", \"architectures\": [\"Qwen2ForCausalLM\"], " + base + "}",
       {"disagrees"}},
      {"no family at all", "{" + base + "}", {"neither 'model_type' nor 'architectures'"}},
      {"rope_scaling llama3",
       "{\"model_type\": \"llama\", \"rope_scaling\": {\"factor\": 8.0, \"rope_type\": \"llama3\"}, " + base + "}",
       {"rope_scaling type 'llama3' is not supported yet"}},
      {"rope_scaling linear (old key)",
       "{\"model_type\": \"llama\", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}, " + base + "}",
       {"rope_scaling type 'linear' is not supported yet"}},
      {"hidden_act gelu", "{\"model_type\": \"llama\", \"hidden_act\": \"gelu\", " + base + "}",
       {"hidden_act 'gelu' is not supported"}},
      {"sliding window (mistral)",
       "{\"model_type\": \"mistral\", \"sliding_window\": 4096, \"max_position_embeddings\": 32768, " + base + "}",
       {"sliding_window 4096 is smaller than max_position_embeddings 32768"}},
      {"sliding window (qwen2)",
       "{\"model_type\": \"qwen2\", \"use_sliding_window\": true, \"sliding_window\": 1024, \"max_position_embeddings\": "
       "32768, " + base + "}",
       {"sliding_window 1024"}},
      {"quantized", "{\"model_type\": \"llama\", \"quantization_config\": {\"bits\": 4}, " + base + "}",
       {"quantization_config"}},
      {"kv heads do not divide heads", "{\"model_type\": \"llama\", \"num_key_value_heads\": 3, " + base + "}",
       {"num_attention_heads 4 is not a multiple of num_key_value_heads 3"}},
      {"hidden not divisible by heads",
       "{\"model_type\": \"llama\", \"hidden_size\": 66, \"intermediate_size\": 128, \"num_hidden_layers\": 2,"
       " \"num_attention_heads\": 4, \"vocab_size\": 100}",
       {"hidden_size 66 is not a multiple of num_attention_heads 4"}},
      {"odd head_dim", "{\"model_type\": \"llama\", \"head_dim\": 15, " + base + "}", {"head_dim 15 is odd"}},
      {"negative size",
       "{\"model_type\": \"llama\", \"hidden_size\": -64, \"intermediate_size\": 128, \"num_hidden_layers\": 2,"
       " \"num_attention_heads\": 4, \"vocab_size\": 100}",
       {"'hidden_size' must be an integer", "got -64"}},
      {"fractional size",
       "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128.5, \"num_hidden_layers\": 2,"
       " \"num_attention_heads\": 4, \"vocab_size\": 100}",
       {"'intermediate_size' must be an integer", "128.5"}},
      {"boolean size",
       "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": true,"
       " \"num_attention_heads\": 4, \"vocab_size\": 100}",
       {"'num_hidden_layers' must be an integer", "got true"}},
      {"missing vocab_size",
       "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2,"
       " \"num_attention_heads\": 4}",
       {"missing 'vocab_size'"}},
      {"zero rms_norm_eps", "{\"model_type\": \"llama\", \"rms_norm_eps\": 0, " + base + "}", {"rms_norm_eps"}},
      {"string tie flag", "{\"model_type\": \"llama\", \"tie_word_embeddings\": \"yes\", " + base + "}",
       {"'tie_word_embeddings' must be true or false"}},
      {"bad JSON", "{\"model_type\": \"llama\",\n \"hidden_size\": 64,,\n" + base + "}",
       {"not valid JSON", "line 2"}},
      {"duplicate key", "{\"model_type\": \"llama\", \"hidden_size\": 32, " + base + "}",
       {"key 'hidden_size' appears twice"}},
      {"trailing text", "{\"model_type\": \"llama\", " + base + "} extra", {"unexpected text after the JSON value"}},
      {"top-level list", "[1, 2, 3]", {"expected a JSON object"}},
      {"empty file", "", {"not valid JSON"}},
  };
  for (const auto &bc : cases) {
    TempDir t;
    itr_model_config c;
    std::memset(&c, 0x5a, sizeof c);
    itr_model_config before = c;
    itr_err e = read_json(t, bc.json, &c);
    std::vector<std::string> expect = bc.expect;
    expect.push_back(t.file("config.json"));  // every message names the file
    EXPECT_TRUE(failed_with(e, ITR_ERR_INPUT, expect)) << bc.what;
    EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0) << bc.what << ": out-parameter written on failure";
  }
}

TEST(HfConfig, MissingFileNamesThePath) {
  TempDir t;
  itr_model_config c;
  EXPECT_TRUE(failed_with(itr_model_config_read(t.path().c_str(), &c), ITR_ERR_INPUT,
                          {"cannot open", t.file("config.json")}));
}

TEST(HfConfig, SurvivesEveryAllocationFailure) {
  TempDir t;
  write_text(t.file("config.json"), kLlamaMinimal);
  for (long k = 1; k < 20; k++) {
    itr_model_config c;
    itr_alloc_fail_after(k);
    itr_err e = itr_model_config_read(t.path().c_str(), &c);
    itr_alloc_fail_after(0);
    if (e == ITR_OK) break;
    EXPECT_EQ(e, ITR_ERR_INTERNAL) << itr_error_message();
  }
}
