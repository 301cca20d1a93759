// JSONL token files: reading (blank lines, other keys, CRLF), write/read round trip, and a table
// of hostile files whose messages name the file and the line.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::failed_with;
using io_test::TempDir;
using io_test::write_text;

TEST(TokenSet, ReadsSequencesSkippingBlankLinesAndOtherKeys) {
  TempDir t;
  write_text(t.file("a.jsonl"),
             "{\"text\": \"hello world\", \"input_ids\": [1, 2, 3]}\n"
             "\n"
             "   \t\n"
             "{\"input_ids\": [255], \"attention_mask\": [1]}\r\n"
             "{\"input_ids\": [0, 0, 7, 9], \"labels\": [-100, 1, 2, 3]}");  // no final newline
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read(t.file("a.jsonl").c_str(), 256, &ts), ITR_OK) << itr_error_message();
  EXPECT_EQ(ts.n_seqs, 3);
  EXPECT_EQ(ts.n_tokens, 8);
  EXPECT_EQ(std::vector<int64_t>(ts.offsets, ts.offsets + 4), (std::vector<int64_t>{0, 3, 4, 8}));
  EXPECT_EQ(std::vector<int32_t>(ts.ids, ts.ids + 8), (std::vector<int32_t>{1, 2, 3, 255, 0, 0, 7, 9}));
  itr_token_set_fini(&ts);
  itr_token_set_fini(&ts);  // idempotent
}

TEST(TokenSet, WriteReadRoundTrip) {
  TempDir t;
  std::vector<int64_t> off = {0, 5, 6, 10};
  std::vector<int32_t> ids = {10, 0, 99999, 42, 7, 3, 1, 2, 3, 131071};
  itr_token_set ts = {3, 10, off.data(), ids.data(), nullptr, nullptr, nullptr, 0};
  ASSERT_EQ(itr_token_set_write(t.file("rt.jsonl").c_str(), &ts), ITR_OK) << itr_error_message();
  EXPECT_EQ(io_test::read_text(t.file("rt.jsonl")).substr(0, 45), "{\"input_ids\": [10, 0, 99999, 42, 7]}\n{\"input_");
  itr_token_set back;
  ASSERT_EQ(itr_token_set_read(t.file("rt.jsonl").c_str(), 131072, &back), ITR_OK) << itr_error_message();
  EXPECT_EQ(back.n_seqs, 3);
  EXPECT_EQ(std::vector<int64_t>(back.offsets, back.offsets + 4), off);
  EXPECT_EQ(std::vector<int32_t>(back.ids, back.ids + 10), ids);
  itr_token_set_fini(&back);
  // A malformed set is refused before anything is written.
  std::vector<int64_t> bad_off = {0, 5, 5, 10};
  itr_token_set bad = {3, 10, bad_off.data(), ids.data(), nullptr, nullptr, nullptr, 0};
  EXPECT_TRUE(failed_with(itr_token_set_write(t.file("bad.jsonl").c_str(), &bad), ITR_ERR_INPUT, {"sequence 1"}));
}

// Supervision survives the round trip (what -tokenize writes): prompt_len, a completion (written as its
// ids with prompt_len) and a question (one line: the prompt once, the choices, the label). The expected
// text is derived by hand; the set read back must equal the set first read, field by field.
TEST(TokenSet, WriteKeepsPromptsAndQuestions) {
  TempDir t;
  write_text(t.file("s.jsonl"),
             "{\"input_ids\": [5, 6, 7], \"prompt_len\": 1}\n"
             "{\"input_ids\": [1, 2], \"completion_ids\": [3, 4]}\n"
             "{\"input_ids\": [8, 9], \"choices\": [[10], [11, 12], [13]], \"label\": 2}\n"
             "{\"input_ids\": [4]}\n");
  itr_token_set a, b;
  ASSERT_EQ(itr_token_set_read(t.file("s.jsonl").c_str(), 64, &a), ITR_OK) << itr_error_message();
  ASSERT_EQ(itr_token_set_write(t.file("w.jsonl").c_str(), &a), ITR_OK) << itr_error_message();
  EXPECT_EQ(io_test::read_text(t.file("w.jsonl")),
            "{\"input_ids\": [5, 6, 7], \"prompt_len\": 1}\n"
            "{\"input_ids\": [1, 2, 3, 4], \"prompt_len\": 2}\n"
            "{\"input_ids\": [8, 9], \"choices\": [[10], [11, 12], [13]], \"label\": 2}\n"
            "{\"input_ids\": [4]}\n");
  ASSERT_EQ(itr_token_set_read(t.file("w.jsonl").c_str(), 64, &b), ITR_OK) << itr_error_message();
  ASSERT_EQ(a.n_seqs, 6);
  ASSERT_EQ(b.n_seqs, a.n_seqs);
  ASSERT_EQ(b.n_tokens, a.n_tokens);
  ASSERT_TRUE(a.prompt_len && b.prompt_len && a.group && b.group && a.is_label && b.is_label);
  const int n = a.n_seqs;
  EXPECT_EQ(std::vector<int64_t>(b.offsets, b.offsets + n + 1), std::vector<int64_t>(a.offsets, a.offsets + n + 1));
  EXPECT_EQ(std::vector<int32_t>(b.ids, b.ids + b.n_tokens), std::vector<int32_t>(a.ids, a.ids + a.n_tokens));
  EXPECT_EQ(std::vector<int64_t>(b.prompt_len, b.prompt_len + n), std::vector<int64_t>(a.prompt_len, a.prompt_len + n));
  EXPECT_EQ(std::vector<int32_t>(b.group, b.group + n), (std::vector<int32_t>{-1, -1, 0, 0, 0, -1}));
  EXPECT_EQ(std::vector<int32_t>(a.group, a.group + n), (std::vector<int32_t>{-1, -1, 0, 0, 0, -1}));
  EXPECT_EQ(std::vector<int32_t>(b.is_label, b.is_label + n), (std::vector<int32_t>{0, 0, 0, 0, 1, 0}));
  EXPECT_EQ(b.n_groups, 1);
  itr_token_set_fini(&a);
  itr_token_set_fini(&b);
}

struct BadTokens {
  const char *what;
  std::string text;
  std::vector<std::string> expect;
};

TEST(TokenSet, RefusesHostileFilesNamingFileAndLine) {
  const std::string ok = "{\"input_ids\": [1, 2]}\n";
  const std::vector<BadTokens> cases = {
      {"bad JSON", ok + ok + "{\"input_ids\": [1, 2\n", {":3: not valid JSON"}},
      {"missing input_ids", ok + "{\"text\": \"not tokenized\"}\n", {":2: no 'input_ids' key"}},
      {"input_ids not a list", "{\"input_ids\": 5}\n", {":1: 'input_ids' must be a list"}},
      {"non-integer id", ok + ok + ok + "{\"input_ids\": [1, 2.5]}\n", {":4: input_ids[1] is 2.5, not an integer"}},
      {"string id", "{\"input_ids\": [\"7\"]}\n", {":1: input_ids[0] is '7', not an integer"}},
      {"negative id", "{\"input_ids\": [3, -1]}\n", {":1: input_ids[1] = -1 is outside the vocabulary [0, 100)"}},
      {"id past vocabulary", ok + "\n{\"input_ids\": [3, 100]}\n",
       {":3: input_ids[1] = 100 is outside the vocabulary [0, 100)", "tokenized for another model"}},
      {"empty sequence", ok + "{\"input_ids\": []}\n", {":2: 'input_ids' is empty"}},
      {"not an object", "[1, 2, 3]\n", {":1: expected a JSON object"}},
      {"padded sequence", "{\"input_ids\": [1, 2, 0], \"attention_mask\": [1, 1, 0]}\n", {":1: attention_mask has zeros"}},
      {"empty file", "", {"holds no sequences"}},
      {"only blank lines", "\n\n  \n", {"holds no sequences"}},
      {"text after the object", ok + "{\"input_ids\": [1, 2]} xyz\n", {":2: text after the JSON object at column 23"}},
      {"two objects on a line", "{\"input_ids\": [1]}{\"input_ids\": [2]}\n", {":1: text after the JSON object"}},
      {"NUL byte", std::string("{\"input_ids\": [1]}\n{\"input_ids\"\0: [1]}\n", 39), {":2: contains a NUL byte"}},
  };
  for (const auto &bc : cases) {
    TempDir t;
    std::string path = t.file("data.jsonl");
    write_text(path, bc.text);
    itr_token_set ts = {-1, -1, nullptr, nullptr, nullptr, nullptr, nullptr, 0};
    std::vector<std::string> expect = bc.expect;
    expect.push_back(path);
    EXPECT_TRUE(failed_with(itr_token_set_read(path.c_str(), 100, &ts), ITR_ERR_INPUT, expect)) << bc.what;
    EXPECT_EQ(ts.n_seqs, -1) << bc.what << ": out-parameter written on failure";
  }
  itr_token_set ts;
  EXPECT_TRUE(failed_with(itr_token_set_read("/nonexistent/x.jsonl", 100, &ts), ITR_ERR_INPUT,
                          {"cannot open '/nonexistent/x.jsonl'"}));
}

TEST(TokenSet, ReadsALargeFile) {
  TempDir t;
  std::string text;
  for (int s = 0; s < 300; s++) {
    text += "{\"input_ids\": [";
    for (int i = 0; i < 100; i++) text += (i ? ", " : "") + std::to_string((s * 7 + i) % 1000);
    text += "]}\n";
  }
  write_text(t.file("big.jsonl"), text);
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read(t.file("big.jsonl").c_str(), 1000, &ts), ITR_OK) << itr_error_message();
  EXPECT_EQ(ts.n_seqs, 300);
  EXPECT_EQ(ts.n_tokens, 30000);
  EXPECT_EQ(ts.ids[299 * 100 + 99], (299 * 7 + 99) % 1000);
  itr_token_set_fini(&ts);
}

// ---- {"text": ...} lines (itr_token_set_read_text) ------------------------------------------------------

namespace {
// A tokenizer.bin of 262 pieces (bytes, then " ", "a", "b") in a folder: "ab" is no piece, so text
// "ab" encodes as BOS, " ", "a", "b" = 1, 259, 260, 261.
std::string tok_folder(const TempDir &t) {
  write_text(t.file("base/tokenizer.bin"), io_test::tokenizer_bin(io_test::byte_vocab({{" ", 0}, {"a", -1}, {"b", -1}})));
  return t.file("base");
}
}  // namespace

TEST(TokenSet, ReadTextEncodesTextLinesWithBos) {
  TempDir t;
  const std::string base = tok_folder(t);
  write_text(t.file("a.jsonl"),
             "{\"text\": \"ab\"}\n"
             "{\"input_ids\": [7, 8]}\n"
             "\n"
             "{\"text\": \"ignored\", \"input_ids\": [9]}\n"  // both keys: input_ids
             "{\"text\": \"\"}\n"                             // empty text: BOS alone
             "{\"text\": \"b\\u00e9\", \"meta\": 1}\r\n");    // é: byte fallback of C3 A9
  itr_tokenizer *tok = nullptr;
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read_text(t.file("a.jsonl").c_str(), 262, base.c_str(), &tok, &ts), ITR_OK)
      << itr_error_message();
  ASSERT_NE(tok, nullptr);  // opened on the first text line, kept for the next file
  EXPECT_EQ(std::string(itr_tokenizer_path(tok)), base + "/tokenizer.bin");
  EXPECT_EQ(ts.n_seqs, 5);
  EXPECT_EQ(std::vector<int64_t>(ts.offsets, ts.offsets + 6), (std::vector<int64_t>{0, 4, 6, 7, 8, 13}));
  EXPECT_EQ(std::vector<int32_t>(ts.ids, ts.ids + ts.n_tokens),
            (std::vector<int32_t>{1, 259, 260, 261, 7, 8, 9, 1, 1, 259, 261, 3 + 0xC3, 3 + 0xA9}));
  itr_token_set_fini(&ts);
  // a second file reuses the tokenizer (the folder is not read again)
  write_text(t.file("b.jsonl"), "{\"text\": \"a\"}\n");
  ASSERT_EQ(itr_token_set_read_text(t.file("b.jsonl").c_str(), 262, "/nonexistent", &tok, &ts), ITR_OK)
      << itr_error_message();
  EXPECT_EQ(std::vector<int32_t>(ts.ids, ts.ids + ts.n_tokens), (std::vector<int32_t>{1, 259, 260}));
  itr_token_set_fini(&ts);
  itr_tokenizer_destroy(tok);
}

TEST(TokenSet, ReadTextOpensTheTokenizerOnlyForTextLines) {
  TempDir t;
  write_text(t.file("base/tokenizer.bin"), "broken");  // never read: no line has text
  write_text(t.file("ids.jsonl"), "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3], \"text\": \"x\"}\n");
  itr_tokenizer *tok = nullptr;
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read_text(t.file("ids.jsonl").c_str(), 262, t.file("base").c_str(), &tok, &ts), ITR_OK)
      << itr_error_message();
  EXPECT_EQ(tok, nullptr);
  EXPECT_EQ(ts.n_tokens, 3);
  itr_token_set_fini(&ts);
  // a text line then opens it, and its error names the data file, the line and the tokenizer
  write_text(t.file("text.jsonl"), "{\"input_ids\": [1, 2]}\n{\"text\": \"hello\"}\n");
  EXPECT_TRUE(failed_with(itr_token_set_read_text(t.file("text.jsonl").c_str(), 262, t.file("base").c_str(), &tok, &ts),
                          ITR_ERR_INPUT, {t.file("text.jsonl") + ":2: has 'text'", t.file("base/tokenizer.bin")}));
  EXPECT_EQ(tok, nullptr);
}

TEST(TokenSet, ReadTextRefusesTextItCannotTokenize) {
  TempDir t;
  const std::string base = tok_folder(t);
  const std::string ok = "{\"text\": \"ab\"}\n";
  struct Case {
    const char *what;
    std::string text;
    const char *dir;
    std::vector<std::string> expect;
  };
  const std::string empty_dir = t.file("empty");
  write_text(t.file("empty/config.json"), "{}");
  const std::vector<Case> cases = {
      {"no tokenizer in the folder", ok + ok + "{\"text\": \"x\"}\n", empty_dir.c_str(),
       {":1: has 'text', but the base folder " + empty_dir + " has no tokenizer"}},
      {"no folder given", "{\"input_ids\": [1]}\n" + ok, nullptr, {":2: has 'text' but no 'input_ids', and no tokenizer"}},
      {"text not a string", ok + "{\"text\": [1, 2]}\n", base.c_str(), {":2: 'text' must be a string"}},
      {"NUL escape", ok + ok + "{\"text\": \"a\\u0000b\"}\n", base.c_str(), {":3: a string holds \\u0000"}},
      {"neither key", ok + "{\"txt\": \"ab\"}\n", base.c_str(), {":2: no 'input_ids' or 'text' key"}},
      {"bad ids beside text", ok + "{\"text\": \"ab\", \"input_ids\": [999]}\n", base.c_str(),
       {":2: input_ids[0] = 999 is outside the vocabulary [0, 262)"}},
      {"tokenizer of another size", ok, base.c_str(), {":1: has 'text'", "holds 262 tokens", "vocab_size (config.json) is 300"}},
  };
  for (const auto &c : cases) {
    write_text(t.file("d.jsonl"), c.text);
    itr_tokenizer *tok = nullptr;
    itr_token_set ts = {-1, -1, nullptr, nullptr, nullptr, nullptr, nullptr, 0};
    std::vector<std::string> expect = c.expect;
    expect.push_back(t.file("d.jsonl"));
    const int vocab = std::string(c.what) == "tokenizer of another size" ? 300 : 262;
    EXPECT_TRUE(failed_with(itr_token_set_read_text(t.file("d.jsonl").c_str(), vocab, c.dir, &tok, &ts), ITR_ERR_INPUT,
                            expect))
        << c.what;
    EXPECT_EQ(ts.n_seqs, -1) << c.what;
    itr_tokenizer_destroy(tok);
  }
  // an escaped backslash before u0000 is text, not NUL
  write_text(t.file("e.jsonl"), "{\"text\": \"a\\\\u0000\"}\n");
  itr_tokenizer *tok = nullptr;
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read_text(t.file("e.jsonl").c_str(), 262, base.c_str(), &tok, &ts), ITR_OK)
      << itr_error_message();
  EXPECT_EQ(ts.n_tokens, 1 + 1 + 1 + 6);  // BOS, " ", "a", then "\u0000" by byte fallback
  itr_token_set_fini(&ts);
  itr_tokenizer_destroy(tok);
}

TEST(TokenSet, PromptsCompletionsAndQuestions) {
  TempDir t;
  write_text(t.file("s.jsonl"),
             "{\"input_ids\": [1, 2, 3, 4], \"prompt_len\": 2}\n"
             "{\"input_ids\": [5, 6], \"completion_ids\": [7, 8, 9]}\n"
             "{\"input_ids\": [1, 2, 3]}\n"
             "{\"input_ids\": [10, 11], \"choices\": [[12], [13, 14], [15]], \"label\": 1}\n");
  itr_token_set ts;
  ASSERT_EQ(itr_token_set_read(t.file("s.jsonl").c_str(), 32, &ts), ITR_OK) << itr_error_message();
  // the question becomes three sequences: prompt + each choice
  ASSERT_EQ(ts.n_seqs, 6);
  EXPECT_EQ(std::vector<int64_t>(ts.offsets, ts.offsets + 7), (std::vector<int64_t>{0, 4, 9, 12, 15, 19, 22}));
  EXPECT_EQ(std::vector<int32_t>(ts.ids + 12, ts.ids + 22), (std::vector<int32_t>{10, 11, 12, 10, 11, 13, 14, 10, 11, 15}));
  ASSERT_NE(ts.prompt_len, nullptr);
  EXPECT_EQ(std::vector<int64_t>(ts.prompt_len, ts.prompt_len + 6), (std::vector<int64_t>{2, 2, 0, 2, 2, 2}));
  EXPECT_EQ(std::vector<int32_t>(ts.group, ts.group + 6), (std::vector<int32_t>{-1, -1, -1, 0, 0, 0}));
  EXPECT_EQ(std::vector<int32_t>(ts.is_label, ts.is_label + 6), (std::vector<int32_t>{0, 0, 0, 0, 1, 0}));
  EXPECT_EQ(ts.n_groups, 1);
  itr_token_set_fini(&ts);
  // without supervision the arrays stay NULL
  write_text(t.file("p.jsonl"), "{\"input_ids\": [1, 2]}\n");
  ASSERT_EQ(itr_token_set_read(t.file("p.jsonl").c_str(), 32, &ts), ITR_OK);
  EXPECT_EQ(ts.prompt_len, nullptr);
  EXPECT_EQ(ts.group, nullptr);
  itr_token_set_fini(&ts);
}

TEST(TokenSet, RefusesMalformedSupervision) {
  TempDir t;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"input_ids\": [1, 2], \"prompt_len\": 2}", ":1: prompt_len must be an integer in [0, 2)"},
      {"{\"input_ids\": [1, 2], \"prompt_len\": -1}", ":1: prompt_len must be an integer"},
      {"{\"input_ids\": [1], \"choices\": [[2], [3]], \"label\": 2}", ":1: 'label' must be the index of the right choice, in [0, 2)"},
      {"{\"input_ids\": [1], \"choices\": [[2]], \"label\": 0}", ":1: 'choices' must be a list of at least two"},
      {"{\"input_ids\": [1], \"choices\": [[2], []], \"label\": 0}", ":1: 'choices[]' must be a non-empty list"},
      {"{\"input_ids\": [1], \"choices\": [[2], [99]], \"label\": 0}", ":1: choices[][0] is not a token id in [0, 32)"},
      {"{\"input_ids\": [1, 2], \"label\": 0}", ":1: 'label' needs 'choices'"},
      {"{\"input_ids\": [1, 2], \"prompt_len\": 1, \"completion_ids\": [3]}", ":1: give at most one of"},
      {"{\"input_ids\": [1], \"completion\": \"joy\"}", ":1: 'completion' is text; give 'completion_ids'"},
      {"{\"input_ids\": [1], \"choices\": [\"a\", \"b\"], \"label\": 0}", ":1: choice 0 is text; give lists of ids"},
  };
  for (const auto &c : cases) {
    write_text(t.file("bad.jsonl"), c.first + "\n");
    itr_token_set ts;
    EXPECT_TRUE(failed_with(itr_token_set_read(t.file("bad.jsonl").c_str(), 32, &ts), ITR_ERR_INPUT,
                            {"bad.jsonl" + c.second}))
        << c.first;
  }
}
