// Helpers for the io-layer tests (names, hf_config, peft_adapter, adapter_writer, token_set,
// synth): a scratch folder, text files, a tiny base config, an adapter folder built tensor by
// tensor, and an error-expectation helper.
#ifndef ITERIS_TESTS_IO_FIXTURES_H
#define ITERIS_TESTS_IO_FIXTURES_H

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "../common/test_files.h"
#include "iteris/core.h"
#include "iteris/io.h"

namespace io_test {

using itr_test::TempDir;
inline void write_text(const std::string &path, const std::string &text) { itr_test::write_file(path, text); }
inline std::string read_text(const std::string &path) { return itr_test::read_file(path); }

// Expects err == code and the message to contain every one of the substrings.
inline ::testing::AssertionResult failed_with(itr_err err, itr_err code, const std::vector<std::string> &subs) {
  std::string msg = itr_error_message();
  if (err != code)
    return ::testing::AssertionFailure() << "got code " << err << " (expected " << code << "), message: " << msg;
  for (const auto &s : subs)
    if (msg.find(s) == std::string::npos)
      return ::testing::AssertionFailure() << "message lacks '" << s << "': " << msg;
  return ::testing::AssertionSuccess();
}

// A tiny Llama: D 16, F 24, L 2, 2 heads of 8 (1 key/value head), vocab 32.
// Projections (d_out, d_in): q (16,16) k (8,16) v (8,16) o (16,16) gate (24,16) up (24,16) down (16,24).
inline itr_model_config tiny_config(int layers = 2) {
  itr_model_config c;
  std::memset(&c, 0, sizeof c);
  c.arch = ITR_ARCH_LLAMA;
  std::snprintf(c.model_type, sizeof c.model_type, "llama");
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 8;
  c.vocab_size = 32;
  c.max_position_embeddings = 128;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  return c;
}

// Hand-derived (d_out, d_in) of tiny_config's modules, independent of itr_module_shape.
inline void tiny_shape(itr_module m, int64_t *d_out, int64_t *d_in) {
  static const int64_t s[ITR_MODULE_COUNT][2] = {{16, 16}, {8, 16}, {8, 16}, {16, 16}, {24, 16}, {24, 16}, {16, 24}};
  *d_out = s[m][0];
  *d_in = s[m][1];
}

struct Tensor {
  std::string name;
  itr_dtype dtype;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Deterministic, distinct, finite values: v[i] = scale * (((i * 37 + salt) % 101) - 50) / 50.
inline std::vector<float> pattern(size_t n, int salt, float scale = 0.1f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; i++) v[i] = scale * (float)((int)((i * 37 + (size_t)salt) % 101) - 50) / 50.0f;
  return v;
}

inline std::string lora_name(int layer, itr_module m, char which) {
  char buf[160];
  itr_name_lora(layer, m, which, buf, sizeof buf);
  return buf;
}

// LoRA factors of rank r for (layer, m) of tiny_config, salted by layer and module.
inline void add_pair(std::vector<Tensor> &ts, int layer, itr_module m, int r, itr_dtype dt = ITR_F32) {
  int64_t d_out, d_in;
  tiny_shape(m, &d_out, &d_in);
  ts.push_back({lora_name(layer, m, 'A'), dt, {r, d_in}, pattern((size_t)(r * d_in), layer * 7 + (int)m)});
  ts.push_back({lora_name(layer, m, 'B'), dt, {d_out, r}, pattern((size_t)(d_out * r), 100 + layer * 7 + (int)m)});
}

// Writes DIR/adapter_model.safetensors from ts (via the safetensors writer) and
// DIR/adapter_config.json from config_json.
inline void write_adapter(const std::string &dir, const std::string &config_json, const std::vector<Tensor> &ts) {
  std::filesystem::create_directories(dir);
  write_text(dir + "/adapter_config.json", config_json);
  itr_st_writer *w = nullptr;
  ASSERT_EQ(itr_st_writer_create(&w), ITR_OK);
  for (const auto &t : ts)
    ASSERT_EQ(itr_st_writer_add_f32(w, t.name.c_str(), t.dtype, (int)t.shape.size(), t.shape.data(), t.data.data()),
              ITR_OK)
        << itr_error_message();
  ASSERT_EQ(itr_st_writer_write(w, (dir + "/adapter_model.safetensors").c_str()), ITR_OK) << itr_error_message();
  itr_st_writer_destroy(w);
}

// A PEFT adapter_config.json; extra is spliced in as additional top-level fields (",\"k\": v").
inline std::string peft_config(int r, double alpha, const std::string &targets = "[\"q_proj\", \"v_proj\"]",
                               const std::string &extra = "") {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "{\"peft_type\": \"LORA\", \"task_type\": \"CAUSAL_LM\", \"r\": %d, \"lora_alpha\": %g,\n"
                " \"target_modules\": %s, \"bias\": \"none\", \"use_dora\": false, \"fan_in_fan_out\": false,\n"
                " \"modules_to_save\": null, \"base_model_name_or_path\": \"tiny/llama\"",
                r, alpha, targets.c_str());
  return std::string(buf) + extra + "}\n";
}

// The bytes of a llama2.c tokenizer.bin: max_token_length (default: the longest piece), then per
// piece its float32 score, int32 length and bytes (include/iteris/io.h).
struct Piece {
  std::string bytes;
  float score;
};
inline std::string tokenizer_bin(const std::vector<Piece> &pieces, int max_len = -1) {
  auto put = [](std::string &s, const void *p) { s.append(static_cast<const char *>(p), 4); };
  std::string out;
  if (max_len < 0) {
    max_len = 1;
    for (const auto &p : pieces) max_len = std::max(max_len, (int)p.bytes.size());
  }
  int32_t m = max_len;
  put(out, &m);
  for (const auto &p : pieces) {
    int32_t n = (int32_t)p.bytes.size();
    put(out, &p.score);
    put(out, &n);
    out += p.bytes;
  }
  return out;
}

// llama2.c's layout of the first 259 pieces: <unk>, BOS, EOS, then the byte fallback <0x00>..<0xFF>
// (ids 3..258), all scored 0; extra pieces follow from id 259.
inline std::vector<Piece> byte_vocab(const std::vector<Piece> &extra = {}) {
  std::vector<Piece> v = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  for (int b = 0; b < 256; b++) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    v.push_back({buf, 0});
  }
  v.insert(v.end(), extra.begin(), extra.end());
  return v;
}

}  // namespace io_test

#endif
