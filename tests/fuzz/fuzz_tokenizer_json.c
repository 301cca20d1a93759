/* libFuzzer: a Hugging Face tokenizer.json (src/io/tokenizer_json.c) and its encoder. The first 3
 * bytes (little-endian) are the vocab_size every id must stay below, the rest the file; when it
 * opens, a few fixed texts (whitespace runs, digits, CJK, emoji, special-token look-alikes) and the
 * input's last 64 bytes (any bytes: invalid UTF-8 is refused) are encoded with and without the
 * special tokens and EOS. */
#include "fuzz_common.h"
#include "iteris/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  if (n < 3) return 0;
  const int vocab = data[0] | data[1] << 8 | data[2] << 16;
  const char *path = fuzz_file("tokenizer.json", data + 3, n - 3);
  itr_tokenizer *t = NULL;
  if (itr_tokenizer_open(path, vocab, &t) == ITR_OK) {
    static const char *const texts[] = {"", " ", "Hello world, it's 2024!", "a  \t\n\n b   ",
                                        "\xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98\x80\xe2\x80\x8d", "<s>x</s><|endoftext|>"};
    const size_t tail = n < 64 ? n : 64;
    for (int k = 0; k < 7; k++) {
      const char *s = k < 6 ? texts[k] : (const char *)data + n - tail;
      const size_t len = k < 6 ? strlen(s) : tail;
      int32_t *ids = NULL;
      int64_t m = 0;
      if (itr_tokenizer_encode(t, s, len, k & 1, (k & 2) && itr_tokenizer_eos(t) >= 0, &ids, &m) == ITR_OK) {
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
