// Hugging Face tokenizer.json (src/io/tokenizer_json.c) through the itr_tokenizer API:
//   - the ids of every case of tests/data/tokenizers/<family>/cases.jsonl (GPT-2, Llama 3, Llama 2,
//     TinyLlama, Qwen2): llama.cpp's test vectors (ids Hugging Face produced) and
//     hard texts with the ids of tests/ref/hf_bpe_ref.py, an independent Python implementation;
//   - hand-derived cases on tiny vocabularies (merge rank order, leftmost on equal rank,
//     ignore_merges, byte fallback, unk fusing, added tokens, BOS/EOS from the template and
//     tokenizer_config.json);
//   - a table of malformed files, each ITR_ERR_INPUT naming the file and the field or token.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <cjson/cJSON.h>
#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::failed_with;
using io_test::TempDir;
using io_test::write_text;

namespace {

// tests/data/tokenizers, found from the working directory (the repository root) or this file's path.
std::string data_dir() {
  std::ifstream probe("tests/data/tokenizers/README.md");
  if (probe) return "tests/data/tokenizers";
  std::string f = __FILE__;
  return f.substr(0, f.rfind('/')) + "/../data/tokenizers";
}

struct Tok {
  itr_tokenizer *t = nullptr;
  ~Tok() { itr_tokenizer_destroy(t); }
  ::testing::AssertionResult open(const std::string &path, int vocab) {
    if (itr_tokenizer_open(path.c_str(), vocab, &t) != ITR_OK) return ::testing::AssertionFailure() << itr_error_message();
    return ::testing::AssertionSuccess();
  }
  std::vector<int32_t> encode(const std::string &text, int bos = 0, int eos = 0) {
    int32_t *ids = nullptr;
    int64_t n = -1;
    itr_err e = itr_tokenizer_encode(t, text.data(), text.size(), bos, eos, &ids, &n);
    EXPECT_EQ(e, ITR_OK) << itr_error_message();
    std::vector<int32_t> v = e == ITR_OK ? std::vector<int32_t>(ids, ids + n) : std::vector<int32_t>{};
    std::free(ids);
    return v;
  }
};

std::string show(const std::vector<int32_t> &v) {
  std::ostringstream o;
  for (size_t i = 0; i < v.size() && i < 24; i++) o << (i ? " " : "") << v[i];
  if (v.size() > 24) o << " ...";
  return o.str();
}

// ---- real files against independent ids ---------------------------------------------------------

struct Family {
  const char *dir;
  int vocab;  // the model's config.json vocab_size
  int min_cases;
};

TEST(TokenizerJson, GivesTheIndependentIdsOnRealFiles) {
  const Family families[] = {{"gpt2", 50257, 84},      {"llama3", 128256, 84},    {"llama2", 32000, 84},
                             {"tinyllama", 32000, 38}, {"qwen2", 151936, 84}};
  int total = 0, wrong = 0;
  for (const Family &f : families) {
    const std::string dir = data_dir() + "/" + f.dir;
    Tok tok;
    ASSERT_TRUE(tok.open(dir, f.vocab)) << dir;
    EXPECT_EQ(std::string(itr_tokenizer_path(tok.t)), dir + "/tokenizer.json");
    std::ifstream in(dir + "/cases.jsonl");
    ASSERT_TRUE(in) << dir << "/cases.jsonl";
    int n = 0, bad = 0, from_llamacpp = 0;
    for (std::string line; std::getline(in, line);) {
      cJSON *c = cJSON_Parse(line.c_str());
      ASSERT_NE(c, nullptr) << line;
      const std::string text = cJSON_GetObjectItem(c, "text")->valuestring;
      const int special = cJSON_IsTrue(cJSON_GetObjectItem(c, "special"));
      std::vector<int32_t> want;
      for (const cJSON *x = cJSON_GetObjectItem(c, "ids")->child; x; x = x->next) want.push_back(x->valueint);
      from_llamacpp += std::string(cJSON_GetObjectItem(c, "source")->valuestring) == "llama.cpp";
      cJSON_Delete(c);
      const std::vector<int32_t> got = tok.encode(text, special);
      n++;
      if (got != want) {
        bad++;
        ADD_FAILURE() << f.dir << ": '" << text.substr(0, 60) << "' (special " << special << ")\n  got:  " << show(got)
                      << "\n  want: " << show(want);
      }
    }
    std::printf("  %-10s %3d cases (%2d from llama.cpp's Hugging Face ids), %d different\n", f.dir, n, from_llamacpp, bad);
    EXPECT_GE(n, f.min_cases) << dir;
    total += n;
    wrong += bad;
  }
  std::printf("  %d cases, %d different\n", total, wrong);
}

// ---- hand-derived cases ------------------------------------------------------------------------------

// A tokenizer.json with this model body (vocab, merges, flags) and the given top-level extras.
std::string tj(const std::string &model, const std::string &extra = "") {
  return "{" + extra + (extra.empty() ? "" : ",") + "\"model\": {\"type\": \"BPE\", " + model + "}}";
}

struct Small {
  TempDir dir;
  Tok tok;
  Small(const std::string &json, int vocab, const std::string &config = "") {
    write_text(dir.file("tokenizer.json"), json);
    if (!config.empty()) write_text(dir.file("tokenizer_config.json"), config);
    EXPECT_TRUE(tok.open(dir.path(), vocab));
  }
};

TEST(TokenizerJson, MergesLowestRankFirstAndLeftmostOnTies) {
  {  // "aaa" with the one merge "a a": the leftmost pair merges -> "aa" "a"
    Small s(tj("\"vocab\": {\"a\": 0, \"aa\": 1}, \"merges\": [\"a a\"]"), 2);
    EXPECT_EQ(s.tok.encode("aaa"), (std::vector<int32_t>{1, 0}));
    EXPECT_EQ(s.tok.encode("aaaaa"), (std::vector<int32_t>{1, 1, 0}));
  }
  {  // "abc": rank 0 is "b c" although "a b" is leftmost -> "a" "bc"; pairs form ["a","b"] works alike
    Small s(tj("\"vocab\": {\"a\": 0, \"b\": 1, \"c\": 2, \"ab\": 3, \"bc\": 4}, \"merges\": [[\"b\", \"c\"], [\"a\", \"b\"]]"), 5);
    EXPECT_EQ(s.tok.encode("abc"), (std::vector<int32_t>{0, 4}));
    EXPECT_EQ(s.tok.encode("ab"), (std::vector<int32_t>{3}));
  }
  {  // ids may be sparse; a merge only applies to the pair it names
    Small s(tj("\"vocab\": {\"x\": 7, \"y\": 3, \"xy\": 40}, \"merges\": [\"x y\"]"), 41);
    EXPECT_EQ(s.tok.encode("yxyx"), (std::vector<int32_t>{3, 40, 7}));
  }
}

TEST(TokenizerJson, IgnoreMergesEmitsAVocabularyWordWhole) {
  const std::string model = "\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2, \"abab\": 3}, \"merges\": [\"a b\"]";
  {
    Small s(tj(model + ", \"ignore_merges\": true"), 4);
    EXPECT_EQ(s.tok.encode("abab"), (std::vector<int32_t>{3}));  // no merge "ab ab", but a vocabulary entry
    EXPECT_EQ(s.tok.encode("ababa"), (std::vector<int32_t>{2, 2, 0}));
  }
  {
    Small s(tj(model), 4);
    EXPECT_EQ(s.tok.encode("abab"), (std::vector<int32_t>{2, 2}));
  }
}

TEST(TokenizerJson, ByteFallbackAndUnk) {
  std::string bytes;
  for (int b = 0; b < 256; b++) {
    char name[32];
    std::snprintf(name, sizeof name, ", \"<0x%02X>\": %d", b, 3 + b);
    bytes += name;
  }
  {  // "é" (C3 A9) is not in the vocabulary: its bytes' tokens
    Small s(tj("\"byte_fallback\": true, \"vocab\": {\"<unk>\": 0, \"a\": 1" + bytes + "}, \"merges\": []"), 259);
    EXPECT_EQ(s.tok.encode("a\xc3\xa9"), (std::vector<int32_t>{1, 3 + 0xC3, 3 + 0xA9}));
  }
  {  // no byte fallback: unk, fused when fuse_unk; dropped without an unk_token
    const std::string v = "\"vocab\": {\"<unk>\": 0, \"a\": 1}, \"merges\": []";
    Small fused(tj("\"unk_token\": \"<unk>\", \"fuse_unk\": true, " + v), 2);
    EXPECT_EQ(fused.tok.encode("a\xc3\xa9\xc3\xa9" "a"), (std::vector<int32_t>{1, 0, 1}));
    Small unfused(tj("\"unk_token\": \"<unk>\", " + v), 2);
    EXPECT_EQ(unfused.tok.encode("a\xc3\xa9\xc3\xa9" "a"), (std::vector<int32_t>{1, 0, 0, 1}));
    Small none(tj(v), 2);
    EXPECT_EQ(none.tok.encode("a\xc3\xa9" "a"), (std::vector<int32_t>{1, 1}));
  }
}

TEST(TokenizerJson, AddedTokensSpecialTokensAndTemplates) {
  const std::string added =
      "\"added_tokens\": [{\"id\": 5, \"content\": \"<s>\", \"special\": true}, {\"id\": 6, \"content\": \"</s>\", "
      "\"special\": true}, {\"id\": 7, \"content\": \"<s>x\", \"special\": true}],"
      "\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\"}}, "
      "{\"Sequence\": {\"id\": \"A\"}}], \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [5]}}}";
  const std::string model = "\"vocab\": {\"a\": 0, \"x\": 1, \"<\": 2, \"s\": 3, \">\": 4}, \"merges\": []";
  Small s(tj(model, added), 8, "{\"eos_token\": \"</s>\"}");
  EXPECT_EQ(itr_tokenizer_bos(s.tok.t), 5);
  EXPECT_EQ(itr_tokenizer_eos(s.tok.t), 6);
  // the longest added token at the leftmost position; no special tokens unless asked
  EXPECT_EQ(s.tok.encode("a<s>xa</s><s"), (std::vector<int32_t>{0, 7, 0, 6, 2, 3}));
  EXPECT_EQ(s.tok.encode("a", 1, 0), (std::vector<int32_t>{5, 0}));
  EXPECT_EQ(s.tok.encode("a", 1, 1), (std::vector<int32_t>{5, 0, 6}));
  EXPECT_EQ(s.tok.encode("a", 0, 1), (std::vector<int32_t>{0, 6}));
  EXPECT_EQ(s.tok.encode("", 1, 0), (std::vector<int32_t>{5}));
  EXPECT_EQ(s.tok.encode("", 0, 0), (std::vector<int32_t>{}));
  // tokenizer_config.json's add_bos_token false takes BOS out of the template; add_eos_token adds EOS
  Small off(tj(model, added), 8, "{\"bos_token\": \"<s>\", \"eos_token\": {\"content\": \"</s>\"}, \"add_bos_token\": false, "
                                 "\"add_eos_token\": true}");
  EXPECT_EQ(off.tok.encode("a", 1, 0), (std::vector<int32_t>{0, 6}));
  EXPECT_EQ(off.tok.encode("a", 1, 1), (std::vector<int32_t>{0, 6}));  // EOS once
}

TEST(TokenizerJson, RefusesInvalidUtf8NamingTheOffset) {
  Small s(tj("\"vocab\": {\"a\": 0}, \"merges\": []"), 1);
  for (const std::string &bad : {std::string("ab\xff" "c"), std::string("ab\xc3("), std::string("ab\xed\xa0\x80"),
                                 std::string("ab\xf0\x9f\x98")}) {
    int32_t *ids = nullptr;
    int64_t n = 0;
    EXPECT_TRUE(failed_with(itr_tokenizer_encode(s.tok.t, bad.data(), bad.size(), 1, 0, &ids, &n), ITR_ERR_INPUT,
                            {"not valid UTF-8 at byte offset 2", s.dir.file("tokenizer.json")}));
    EXPECT_EQ(ids, nullptr);
  }
}

TEST(TokenizerJson, EveryIdMustBeBelowTheModelsVocabSize) {
  const std::string dir = data_dir() + "/llama3";
  itr_tokenizer *t = nullptr;  // the added tokens reach 128255
  EXPECT_TRUE(failed_with(itr_tokenizer_open(dir.c_str(), 128000, &t), ITR_ERR_INPUT,
                          {dir + "/tokenizer.json", "<|begin_of_text|>", "128000", "vocab_size is 128000"}));
  EXPECT_EQ(t, nullptr);
  Tok larger;  // a config vocabulary larger than the tokenizer's (Qwen2's 151936) is fine
  ASSERT_TRUE(larger.open(dir, 151936));
  EXPECT_EQ(itr_tokenizer_bos(larger.t), 128000);
  EXPECT_EQ(larger.encode("Hello", 1, 0), (std::vector<int32_t>{128000, 9906}));
}

// ---- malformed files --------------------------------------------------------------------------------

struct BadJson {
  const char *what;
  std::string json;
  int vocab;
  std::vector<std::string> expect;
};

TEST(TokenizerJson, RefusesMalformedFilesNamingFileAndField) {
  const std::string ok = tj("\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]");
  const std::string split = "\"pre_tokenizer\": {\"type\": \"Split\", \"behavior\": \"Isolated\", \"pattern\": ";
  const std::vector<BadJson> cases = {
      {"truncated", ok.substr(0, ok.size() / 2), 3, {"tokenizer.json"}},
      {"not an object", "[1, 2]", 3, {"tokenizer.json"}},
      {"no model", "{\"version\": \"1.0\"}", 3, {"'model' must be an object"}},
      {"unigram", "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", 3, {"model.type is 'Unigram'"}},
      {"vocab not an object", tj("\"vocab\": [1], \"merges\": []"), 3, {"model.vocab must be an object"}},
      {"merge of an unknown token", tj("\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a c\"]"), 3,
       {"model.merges[0] names the token 'c'"}},
      {"merge result not in vocab", tj("\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"b a\"]"), 3,
       {"model.merges[0] merges 'b' and 'a' into 'ba'"}},
      {"merge with two spaces", tj("\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b c\"]"), 3, {"model.merges[0]"}},
      {"merge of numbers", tj("\"vocab\": {\"a\": 0}, \"merges\": [[1, 2]]"), 3, {"model.merges[0] must be"}},
      {"repeated merge", tj("\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\", [\"a\", \"b\"]]"), 3,
       {"model.merges[1] repeats"}},
      {"duplicate id", tj("\"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []"), 3, {"gives id 0 twice", "'b'"}},
      {"duplicate token", tj("\"vocab\": {\"a\": 0, \"a\": 1}, \"merges\": []"), 3, {"key 'a' appears twice"}},
      {"id >= vocab_size", tj("\"vocab\": {\"a\": 0, \"b\": 5}, \"merges\": []"), 3,
       {"token 'b' has id 5, outside 0..2", "vocab_size is 3"}},
      {"negative id", tj("\"vocab\": {\"a\": -1}, \"merges\": []"), 3, {"token 'a' has id -1"}},
      {"fractional id", tj("\"vocab\": {\"a\": 0.5}, \"merges\": []"), 3, {"token 'a' has id"}},
      {"string id", tj("\"vocab\": {\"a\": \"0\"}, \"merges\": []"), 3, {"token 'a' has no integer id"}},
      {"non-UTF-8 token", tj("\"vocab\": {\"a\xff\": 0}, \"merges\": []"), 3, {"not valid UTF-8"}},
      {"unk not in vocab", tj("\"unk_token\": \"<unk>\", \"vocab\": {\"a\": 0}, \"merges\": []"), 3,
       {"model.unk_token '<unk>'"}},
      {"dropout", tj("\"dropout\": 0.1, \"vocab\": {\"a\": 0}, \"merges\": []"), 3, {"model.dropout"}},
      {"bad regex", tj("\"vocab\": {\"a\": 0}, \"merges\": []", split + "{\"Regex\": \"(a|\"}}"), 3,
       {"pre_tokenizer.pattern: the regex '(a|' does not compile"}},
      {"bad behavior",
       tj("\"vocab\": {\"a\": 0}, \"merges\": []",
          "\"pre_tokenizer\": {\"type\": \"Split\", \"behavior\": \"Sideways\", \"pattern\": {\"Regex\": \"a\"}}"),
       3, {"pre_tokenizer.behavior is 'Sideways'"}},
      {"unknown pre-tokenizer", tj("\"vocab\": {\"a\": 0}, \"merges\": []", "\"pre_tokenizer\": {\"type\": \"Whitespace\"}"),
       3, {"pre_tokenizer has type 'Whitespace'"}},
      {"unknown normalizer", tj("\"vocab\": {\"a\": 0}, \"merges\": []", "\"normalizer\": {\"type\": \"Lowercase\"}"), 3,
       {"normalizer has type 'Lowercase'"}},
      {"added token id", tj("\"vocab\": {\"a\": 0}, \"merges\": []", "\"added_tokens\": [{\"id\": 9, \"content\": \"<s>\"}]"),
       3, {"added token '<s>' has id 9"}},
      {"added token twice",
       tj("\"vocab\": {\"a\": 0}, \"merges\": []",
          "\"added_tokens\": [{\"id\": 1, \"content\": \"<s>\"}, {\"id\": 2, \"content\": \"<s>\"}]"),
       3, {"added_tokens[1] repeats the added token '<s>'"}},
      {"template without ids",
       tj("\"vocab\": {\"a\": 0}, \"merges\": []",
          "\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\"}}, "
          "{\"Sequence\": {\"id\": \"A\"}}], \"special_tokens\": {}}"),
       3, {"post_processor.special_tokens has no entry with ids for '<s>'"}},
  };
  for (const BadJson &c : cases) {
    TempDir t;
    write_text(t.file("tokenizer.json"), c.json);
    itr_tokenizer *tok = nullptr;
    std::vector<std::string> expect = c.expect;
    expect.push_back(t.file("tokenizer.json"));
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.path().c_str(), c.vocab, &tok), ITR_ERR_INPUT, expect)) << c.what;
    EXPECT_EQ(tok, nullptr) << c.what;
  }
  {  // tokenizer_config.json naming a token that does not exist
    TempDir t;
    write_text(t.file("tokenizer.json"), ok);
    write_text(t.file("tokenizer_config.json"), "{\"eos_token\": \"</s>\"}");
    itr_tokenizer *tok = nullptr;
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.path().c_str(), 3, &tok), ITR_ERR_INPUT,
                            {t.file("tokenizer_config.json"), "eos_token '</s>'"}));
  }
}

}  // namespace
