/* libFuzzer: a SentencePiece tokenizer.model (the protobuf reader) and its BPE encoder. The first 2
 * bytes (little-endian) are config.json's vocab_size, the rest the file; when it opens, a few fixed
 * texts and the input's last 64 bytes (any bytes: invalid UTF-8, NUL) are encoded with and without
 * BOS / EOS, and every id must be below vocab_size. */
#include "fuzz_common.h"
#include "iteris/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  if (n < 2) return 0;
  const int vocab = data[0] | data[1] << 8;
  const char *path = fuzz_file("tokenizer.model", data + 2, n - 2);
  itr_tokenizer *t = NULL;
  if (itr_tokenizer_open(path, vocab, &t) == ITR_OK) {
    static const char *const texts[] = {"", " ", "Hello world", "a  \t\n b  ", "\xe4\xbd\xa0\xf0\x9f\x98\x80",
                                        "\xff\x80\x80\xc3<s><sep>\xe2\x96\x81"};
    const size_t tail = n < 64 ? n : 64;
    for (int k = 0; k < 7; k++) {
      const char *s = k < 6 ? texts[k] : (const char *)data + n - tail;
      const size_t len = k < 6 ? strlen(s) : tail;
      int32_t *ids = NULL;
      int64_t m = 0;
      if (itr_tokenizer_encode(t, s, len, k & 1, k & 2, &ids, &m) == ITR_OK) {
        for (int64_t i = 0; i < m; i++)
          if (ids[i] < 0 || ids[i] >= vocab) abort(); /* every id inside the vocabulary */
        free(ids);
      }
    }
    itr_tokenizer_destroy(t);
  }
  itr_error_clear();
  return 0;
}
