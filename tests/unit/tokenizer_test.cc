// llama2.c's tokenizer.bin and encode(): stories260K's prompts against the ids they carry, hand-built
// vocabularies whose ids are worked out by hand (merge order, ties, the -1e10 floor, byte fallback,
// empty text, invalid UTF-8, whitespace runs, emoji / CJK), folder lookup, and a table of hostile files
// whose messages name the file and the token.
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io_fixtures.h"
#include "iteris/io.h"

using io_test::byte_vocab;
using io_test::failed_with;
using io_test::Piece;
using io_test::TempDir;
using io_test::tokenizer_bin;
using io_test::write_text;

namespace {

// Owns an opened tokenizer; encode() returns the ids (empty and a failure on error).
struct Tok {
  itr_tokenizer *t = nullptr;
  ~Tok() { itr_tokenizer_destroy(t); }
  ::testing::AssertionResult open(const std::string &path, int vocab) {
    if (itr_tokenizer_open(path.c_str(), vocab, &t) != ITR_OK) return ::testing::AssertionFailure() << itr_error_message();
    return ::testing::AssertionSuccess();
  }
  std::vector<int32_t> encode(const std::string &text, int bos = 1, int eos = 0) {
    int32_t *ids = nullptr;
    int64_t n = -1;
    itr_err e = itr_tokenizer_encode(t, text.data(), text.size(), bos, eos, &ids, &n);
    EXPECT_EQ(e, ITR_OK) << itr_error_message();
    std::vector<int32_t> v = e == ITR_OK ? std::vector<int32_t>(ids, ids + n) : std::vector<int32_t>{};
    std::free(ids);
    return v;
  }
};

// A vocabulary of byte_vocab plus extra pieces, written to DIR/tokenizer.bin and opened.
struct Vocab {
  TempDir dir;
  std::vector<Piece> pieces;
  Tok tok;
  explicit Vocab(const std::vector<Piece> &extra) : pieces(byte_vocab(extra)) {
    write_text(dir.file("tokenizer.bin"), tokenizer_bin(pieces));
    EXPECT_TRUE(tok.open(dir.path(), (int)pieces.size()));
  }
  int id(const std::string &piece) const {
    for (size_t i = 0; i < pieces.size(); i++)
      if (pieces[i].bytes == piece) return (int)i;
    ADD_FAILURE() << "no piece '" << piece << "'";
    return -1;
  }
  std::vector<int32_t> ids(std::initializer_list<const char *> ps) const {
    std::vector<int32_t> v;
    for (const char *p : ps) v.push_back(id(p));
    return v;
  }
};

constexpr int32_t BOS = 1, EOS = 2;
int32_t fb(unsigned char byte) { return 3 + byte; }  // the byte fallback id

std::string stories_dir() {
  const char *env = std::getenv("ITERIS_STORIES260K");
  if (env && access((std::string(env) + "/tok512.bin").c_str(), R_OK) == 0) return env;
  for (const char *p : {"../shared/models/stories260K", "/work/shared/models/stories260K", "shared/models/stories260K"})
    if (access((std::string(p) + "/tok512.bin").c_str(), R_OK) == 0) return p;
  return "";
}

}  // namespace

// ---- stories260K (shared data, skipped when absent) --------------------------------------------------

TEST(TokenizerStories, EncodesThePromptsToTheIdsTheyCarry) {
  const std::string dir = stories_dir();
  if (dir.empty()) GTEST_SKIP() << "stories260K not found (../shared/models/stories260K, /work/shared/models/stories260K)";
  Tok tok;
  ASSERT_TRUE(tok.open(dir, 512));
  EXPECT_EQ(itr_tokenizer_bos(tok.t), 1);
  EXPECT_EQ(itr_tokenizer_eos(tok.t), 2);
  EXPECT_EQ(itr_tokenizer_vocab_size(tok.t), 512);
  EXPECT_EQ(std::string(itr_tokenizer_path(tok.t)), dir + "/tok512.bin");  // found as tok*.bin
  // the ids (BOS first) as prompts.jsonl gives them
  itr_token_set want;
  ASSERT_EQ(itr_token_set_read((dir + "/prompts.jsonl").c_str(), 512, &want), ITR_OK) << itr_error_message();
  ASSERT_EQ(want.n_seqs, 4);
  // the texts: each line is {"text": "<no escapes>", "input_ids": ...}
  const std::string file = io_test::read_text(dir + "/prompts.jsonl");
  size_t pos = 0;
  for (int s = 0; s < want.n_seqs; s++) {
    const size_t a = file.find("\"text\": \"", pos) + 9, b = file.find('"', a);
    ASSERT_NE(a, std::string::npos + 9);
    const std::string text = file.substr(a, b - a);
    ASSERT_EQ(text.find('\\'), std::string::npos) << "prompt " << s << " has an escape";
    pos = b;
    const std::vector<int32_t> expect(want.ids + want.offsets[s], want.ids + want.offsets[s + 1]);
    EXPECT_EQ(tok.encode(text), expect) << "prompt " << s << ": " << text;
    // without BOS: the same ids after it; with EOS: 2 appended
    EXPECT_EQ(tok.encode(text, 0, 0), std::vector<int32_t>(expect.begin() + 1, expect.end()));
    std::vector<int32_t> with_eos = expect;
    with_eos.push_back(EOS);
    EXPECT_EQ(tok.encode(text, 1, 1), with_eos);
  }
  // the same through the token set reader: text-only lines, tokenizer opened from the folder on demand
  TempDir t;
  std::string text_lines;
  pos = 0;
  for (int s = 0; s < want.n_seqs; s++) {
    const size_t a = file.find("\"text\": \"", pos) + 9, b = file.find('"', a);
    text_lines += "{\"text\": \"" + file.substr(a, b - a) + "\"}\n";
    pos = b;
  }
  write_text(t.file("p.jsonl"), text_lines);
  itr_tokenizer *lazy = nullptr;
  itr_token_set got;
  ASSERT_EQ(itr_token_set_read_text(t.file("p.jsonl").c_str(), 512, dir.c_str(), &lazy, &got), ITR_OK)
      << itr_error_message();
  EXPECT_NE(lazy, nullptr);
  EXPECT_EQ(std::vector<int64_t>(got.offsets, got.offsets + 5), std::vector<int64_t>(want.offsets, want.offsets + 5));
  EXPECT_EQ(std::vector<int32_t>(got.ids, got.ids + got.n_tokens), std::vector<int32_t>(want.ids, want.ids + want.n_tokens));
  itr_tokenizer_destroy(lazy);
  itr_token_set_fini(&got);
  itr_token_set_fini(&want);
}

// ---- hand-built vocabularies ---------------------------------------------------------------------------

TEST(Tokenizer, MergesTheHighestScoringPairFirst) {
  // "ab" and "bc" compete for the b of "abc": "bc" scores higher, so a + bc (a + b first gives ab + c)
  Vocab v({{" ", 0}, {"a", -10}, {"b", -10}, {"c", -10}, {"ab", -2}, {"bc", -1}});
  EXPECT_EQ(v.tok.encode("abc", 0), v.ids({" ", "a", "bc"}));
  // merges repeat on merged pieces: " a" + "bc" needs " a" first, then " abc"
  Vocab w({{" ", 0}, {"a", -10}, {"b", -10}, {"c", -10}, {" a", -3}, {"bc", -1}, {" abc", -5}});
  EXPECT_EQ(w.tok.encode("abc", 0), w.ids({" abc"}));
  std::vector<int32_t> with_bos = {BOS, w.id(" abc")};
  EXPECT_EQ(w.tok.encode("abc"), with_bos);
}

TEST(Tokenizer, BreaksTiesByTheFirstPair) {
  // equal scores: the leftmost pair merges first
  Vocab v({{" ", 0}, {"a", -10}, {"b", -10}, {"c", -10}, {"ab", -1}, {"bc", -1}});
  EXPECT_EQ(v.tok.encode("abc", 0), v.ids({" ", "ab", "c"}));
  EXPECT_EQ(v.tok.encode("cabc", 0), v.ids({" ", "c", "ab", "c"}));
  EXPECT_EQ(v.tok.encode("bcab", 0), v.ids({" ", "bc", "ab"}));
  // a run of equal pairs merges from the left: "aaa" -> aa + a, "aaaa" -> aa + aa
  Vocab w({{" ", 0}, {"a", -10}, {"aa", -1}});
  EXPECT_EQ(w.tok.encode("aaa", 0), w.ids({" ", "aa", "a"}));
  EXPECT_EQ(w.tok.encode("aaaa", 0), w.ids({" ", "aa", "aa"}));
  EXPECT_EQ(w.tok.encode("aaaaa", 0), w.ids({" ", "aa", "aa", "a"}));
}

TEST(Tokenizer, NeverMergesAtOrBelowLlama2cFloor) {
  // llama2.c starts the best score at -1e10 and needs strictly more: such merges never happen
  Vocab v({{" ", 0}, {"a", -10}, {"b", -10}, {"ab", -2e10f}, {"ba", -1e10f}});
  EXPECT_EQ(v.tok.encode("abab", 0), v.ids({" ", "a", "b", "a", "b"}));
}

TEST(Tokenizer, EmptyTextGivesOnlyBosAndEos) {
  Vocab v({{" ", 0}});
  EXPECT_EQ(v.tok.encode(""), std::vector<int32_t>{BOS});  // no dummy prefix for empty text
  EXPECT_EQ(v.tok.encode("", 0), std::vector<int32_t>{});
  EXPECT_EQ(v.tok.encode("", 1, 1), (std::vector<int32_t>{BOS, EOS}));
  EXPECT_EQ(v.tok.encode("", 0, 1), std::vector<int32_t>{EOS});
  // a non-empty text gets the dummy prefix " " (merged here with the text's own space)
  Vocab w({{" ", 0}, {"  ", -1}});
  EXPECT_EQ(w.tok.encode(" ", 0), w.ids({"  "}));
}

TEST(Tokenizer, WhitespaceRunsMergeFromTheLeft) {
  Vocab v({{" ", 0}, {"a", -10}, {"b", -10}, {"\t", -10}, {"  ", -1}});
  // " " + "a   b": the pairs of spaces tie, so the first pair merges and the third space stays alone
  EXPECT_EQ(v.tok.encode("a   b", 0), v.ids({" ", "a", "  ", " ", "b"}));
  EXPECT_EQ(v.tok.encode("a    b", 0), v.ids({" ", "a", "  ", "  ", "b"}));
  EXPECT_EQ(v.tok.encode("\t\t a", 0), v.ids({" ", "\t", "\t", " ", "a"}));
  // a newline without a piece goes to byte fallback
  std::vector<int32_t> want = {v.id(" "), v.id("a"), fb('\n'), v.id("b")};
  EXPECT_EQ(v.tok.encode("a\nb", 0), want);
}

TEST(Tokenizer, UnknownCodePointsFallBackToBytes) {
  Vocab v({{" ", 0}, {"a", -10}, {"\xc3\xa9", -10} /* é */});
  // é is a piece: one id; ñ is not: its two bytes
  std::vector<int32_t> want = {v.id(" "), v.id("a"), v.id("\xc3\xa9"), fb(0xc3), fb(0xb1)};
  EXPECT_EQ(v.tok.encode("a\xc3\xa9\xc3\xb1", 0), want);
  // CJK (3 bytes) and emoji (4 bytes, and a ZWJ sequence): every byte
  const std::string cjk = "\xe4\xbd\xa0", emoji = "\xf0\x9f\x98\x80", zwj = "\xe2\x80\x8d";
  want = {v.id(" "), fb(0xe4), fb(0xbd), fb(0xa0), fb(0xf0), fb(0x9f), fb(0x98), fb(0x80), fb(0xe2), fb(0x80), fb(0x8d)};
  EXPECT_EQ(v.tok.encode(cjk + emoji + zwj, 0), want);
  // merges join the pieces' strings, and a byte fallback token's piece is "<0xNN>" (as in llama2.c)
  Vocab w({{" ", 0}, {"a", -10}, {"<0xC3>a", -1}});
  EXPECT_EQ(w.tok.encode("\xc3" "a", 0), w.ids({" ", "<0xC3>a"}));
  EXPECT_EQ(w.tok.encode("\xc4" "a", 0), (std::vector<int32_t>{w.id(" "), fb(0xc4), w.id("a")}));
}

TEST(Tokenizer, InvalidUtf8GroupsBytesLikeLlama2c) {
  // llama2.c cuts pieces at lead / ASCII bytes, at most 4 bytes long: six stray continuation bytes are a
  // piece of 4 (a token here) and a piece of 2 (byte fallback)
  const std::string four(4, '\x80');
  Vocab v({{" ", 0}, {"a", -10}, {four, -10}});
  std::vector<int32_t> want = {v.id(" "), v.id(four), fb(0x80), fb(0x80)};
  EXPECT_EQ(v.tok.encode(std::string(6, '\x80'), 0), want);
  // a lead byte with too many continuation bytes: the first 4 bytes are one piece
  want = {v.id(" "), fb(0xe2), fb(0x80), fb(0x80), fb(0x80), fb(0x80), v.id("a")};
  EXPECT_EQ(v.tok.encode("\xe2\x80\x80\x80\x80" "a", 0), want);
  // 0xFF, a cut sequence at the end, a lead byte before ASCII, and NUL (byte fallback <0x00>)
  want = {v.id(" "), fb(0xff), v.id("a"), fb(0xc3), v.id("a"), fb(0x00), fb(0xe2), fb(0x82)};
  EXPECT_EQ(v.tok.encode(std::string("\xff" "a\xc3" "a\0\xe2\x82", 7), 0), want);
}

TEST(Tokenizer, RefusesByteFallbackPastTheVocabulary) {
  TempDir t;
  write_text(t.file("tokenizer.bin"), tokenizer_bin({{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}, {" ", 0}, {"a", -1}}));
  Tok tok;
  ASSERT_TRUE(tok.open(t.file("tokenizer.bin"), 5));
  EXPECT_EQ(tok.encode("aa"), (std::vector<int32_t>{BOS, 3, 4, 4}));
  int32_t *ids = nullptr;
  int64_t n = 0;
  EXPECT_TRUE(failed_with(itr_tokenizer_encode(tok.t, "ab", 2, 1, 0, &ids, &n), ITR_ERR_INPUT,
                          {t.file("tokenizer.bin"), "byte 0x62", "token 101", "5 tokens"}));
  EXPECT_EQ(ids, nullptr);
}

TEST(Tokenizer, LongTextEncodesInOrder) {
  // 20000 a's with "aa" and "aaaa": merges pair up from the left, then the pairs
  Vocab v({{" ", 0}, {"a", -10}, {"aa", -1}, {"aaaa", -2}});
  std::vector<int32_t> got = v.tok.encode(std::string(20001, 'a'), 0);
  ASSERT_EQ(got.size(), 1u + 5000u + 1u);
  EXPECT_EQ(got[0], v.id(" "));
  for (size_t i = 1; i <= 5000; i++) ASSERT_EQ(got[i], v.id("aaaa")) << i;
  EXPECT_EQ(got.back(), v.id("a"));
}

// ---- finding the file ---------------------------------------------------------------------------------

TEST(Tokenizer, FindsTheFileInAFolder) {
  const std::string bin = tokenizer_bin(byte_vocab({{" ", 0}}));
  const int V = 260;
  {
    TempDir t;  // tokenizer.bin wins over tok*.bin
    write_text(t.file("tokenizer.bin"), bin);
    write_text(t.file("tok260.bin"), "junk");
    Tok tok;
    ASSERT_TRUE(tok.open(t.path(), V));
    EXPECT_EQ(std::string(itr_tokenizer_path(tok.t)), t.file("tokenizer.bin"));
  }
  {
    TempDir t;  // several tok*.bin: which one?
    write_text(t.file("tok1.bin"), bin);
    write_text(t.file("tok2.bin"), bin);
    itr_tokenizer *tok = nullptr;
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.path().c_str(), V, &tok), ITR_ERR_INPUT,
                            {t.path(), "several tokenizers", "tok1.bin", "tok2.bin"}));
    EXPECT_EQ(tok, nullptr);
  }
  {
    TempDir t;  // tokenizer.model comes before tokenizer.bin (and is read as one: tokenizer_spm_test.cc)
    write_text(t.file("tokenizer.bin"), bin);
    write_text(t.file("tokenizer.model"), "{}");
    char path[ITR_PATH_MAX];
    ASSERT_EQ(itr_tokenizer_find(t.path().c_str(), path, sizeof path), ITR_OK) << itr_error_message();
    EXPECT_EQ(std::string(path), t.file("tokenizer.model"));
    itr_tokenizer *tok = nullptr;
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.path().c_str(), V, &tok), ITR_ERR_INPUT, {t.file("tokenizer.model")}));
    EXPECT_EQ(tok, nullptr);
  }
  {
    TempDir t;  // tokenizer.json comes first (and is read as one: tokenizer_json_test.cc)
    write_text(t.file("tokenizer.bin"), bin);
    write_text(t.file("tokenizer.model"), "{}");
    write_text(t.file("tokenizer.json"), "{}");
    char path[ITR_PATH_MAX];
    ASSERT_EQ(itr_tokenizer_find(t.path().c_str(), path, sizeof path), ITR_OK) << itr_error_message();
    EXPECT_EQ(std::string(path), t.file("tokenizer.json"));
    itr_tokenizer *tok = nullptr;
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.path().c_str(), V, &tok), ITR_ERR_INPUT,
                            {t.file("tokenizer.json"), "'model' must be an object"}));
  }
  {
    TempDir t;  // none
    write_text(t.file("config.json"), "{}");
    char path[ITR_PATH_MAX] = "x";
    ASSERT_EQ(itr_tokenizer_find(t.path().c_str(), path, sizeof path), ITR_OK) << itr_error_message();
    EXPECT_EQ(std::string(path), "");
    itr_tokenizer *tok = nullptr;
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.path().c_str(), V, &tok), ITR_ERR_INPUT,
                            {t.path(), "has no tokenizer"}));
    EXPECT_TRUE(failed_with(itr_tokenizer_open(t.file("missing.bin").c_str(), V, &tok), ITR_ERR_INPUT,
                            {"missing.bin"}));
  }
  itr_tokenizer_destroy(nullptr);
}

// ---- hostile files ------------------------------------------------------------------------------------

struct BadTok {
  const char *what;
  std::string bytes;
  int vocab;
  std::vector<std::string> expect;
};

TEST(Tokenizer, RefusesHostileFilesNamingFileAndToken) {
  const std::vector<Piece> ok = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}, {" ", 0}, {"ab", -1}};
  const std::string good = tokenizer_bin(ok, 8);
  auto i32 = [](int32_t v) { return std::string(reinterpret_cast<const char *>(&v), 4); };
  auto f32 = [](float v) { return std::string(reinterpret_cast<const char *>(&v), 4); };
  // token 4 ("ab") starts at byte 4 + (8+5) + (8+3) + (8+4) + (8+1) = 49
  const size_t tok4 = 49;
  ASSERT_EQ(good.size(), tok4 + 8 + 2);
  const std::vector<BadTok> cases = {
      {"empty file", "", 5, {"too short"}},
      {"max_token_length only", i32(8), 5, {"max_token_length is 8"}},
      {"max_token_length 0", i32(0) + good.substr(4), 5, {"max_token_length is 0"}},
      {"max_token_length negative", i32(-3) + good.substr(4), 5, {"max_token_length is -3"}},
      {"max_token_length past the file", i32(1 << 30) + good.substr(4), 5, {"max_token_length is 1073741824"}},
      {"truncated in a score", good.substr(0, tok4 + 3), 5, {"token 4 is truncated", "3 byte(s) left"}},
      {"truncated in a piece", good.substr(0, tok4 + 9), 5, {"token 4 is truncated: its length is 2 but 1 byte(s)"}},
      {"negative length", good.substr(0, tok4) + f32(-1) + i32(-2) + "ab", 5, {"token 4 has length -2"}},
      {"zero length", good.substr(0, tok4) + f32(-1) + i32(0), 5, {"token 4 has length 0"}},
      {"length past max_token_length", i32(1) + good.substr(4), 5, {"token 0 has length 5", "max_token_length"}},
      {"huge length", good.substr(0, tok4) + f32(-1) + i32(0x7fffffff) + "ab", 8 << 20, {"token 4 has length 2147483647"}},
      {"NaN score", good.substr(0, tok4) + f32(std::numeric_limits<float>::quiet_NaN()) + i32(2) + "ab", 5,
       {"token 4 has score nan"}},
      {"infinite score", good.substr(0, tok4) + f32(INFINITY) + i32(2) + "ab", 5, {"token 4 has score inf"}},
      {"NUL in a piece", good.substr(0, tok4) + f32(-1) + i32(2) + std::string("a\0", 2), 5, {"token 4 holds a NUL"}},
      {"fewer tokens than vocab_size", good, 6, {"holds 5 tokens but the model's vocab_size", "is 6"}},
      {"more tokens than vocab_size", good, 4, {"holds 5 tokens but the model's vocab_size", "is 4"}},
      {"vocab_size below 3", good, 2, {"vocab_size 2 is too small"}},
  };
  for (const auto &bc : cases) {
    TempDir t;
    const std::string path = t.file("tok_bad.bin");
    write_text(path, bc.bytes);
    itr_tokenizer *tok = nullptr;
    std::vector<std::string> subs = bc.expect;
    subs.push_back(path);
    EXPECT_TRUE(failed_with(itr_tokenizer_open(path.c_str(), bc.vocab, &tok), ITR_ERR_INPUT, subs)) << bc.what;
    EXPECT_EQ(tok, nullptr) << bc.what;
    itr_tokenizer_destroy(tok);
  }
  // the good file opens, and so through its folder
  TempDir t;
  write_text(t.file("tok5.bin"), good);
  Tok tok;
  ASSERT_TRUE(tok.open(t.path(), 5));
}

TEST(Tokenizer, RepeatedPiecesLookUpTheLowestId) {
  // a file that repeats a piece: lookups find the first id (llama2.c's bsearch would pick either)
  Vocab v({{" ", 0}, {"a", -10}, {"a", -10}, {"aa", -1}, {"aa", -1}});
  EXPECT_EQ(v.tok.encode("aa", 0), (std::vector<int32_t>{v.id(" "), v.id("aa")}));
  EXPECT_EQ(v.id("aa"), 262);
}
