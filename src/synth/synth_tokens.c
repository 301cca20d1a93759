/* Random token files (JSONL), optionally concentrated on a band of the vocabulary per task. */
#include <stdlib.h>
#include <string.h>

#include "iteris/io.h"
#include "iteris/synth.h"

itr_err itr_synth_tokens_write_band(const char *path, int vocab, int band_lo, int band_hi, double in_band,
                                    int n_seqs, int min_len, int max_len, uint64_t seed) {
  ITR_CHECK(vocab >= 1, ITR_ERR_INPUT, "synth tokens: vocabulary size %d", vocab);
  ITR_CHECK(0 <= band_lo && band_lo < band_hi && band_hi <= vocab, ITR_ERR_INPUT,
            "synth tokens: band [%d, %d) must be a non-empty part of [0, %d)", band_lo, band_hi, vocab);
  ITR_CHECK(in_band >= 0 && in_band <= 1, ITR_ERR_INPUT, "synth tokens: in_band %g must be in [0, 1]", in_band);
  ITR_CHECK(n_seqs >= 1 && 1 <= min_len && min_len <= max_len && max_len <= (1 << 24), ITR_ERR_INPUT,
            "synth tokens: need n_seqs >= 1 and 1 <= min_len <= max_len (got %d, %d, %d)", n_seqs, min_len,
            max_len);
  itr_rng g;
  itr_rng_init(&g, seed);
  itr_token_set ts;
  memset(&ts, 0, sizeof ts);
  ITR_TRY(itr_calloc((size_t)n_seqs + 1, sizeof(int64_t), "synth token offsets", &ts.offsets));
  for (int s = 0; s < n_seqs; s++)
    ts.offsets[s + 1] = ts.offsets[s] + min_len + (int64_t)itr_rng_below(&g, (uint64_t)(max_len - min_len + 1));
  ts.n_seqs = n_seqs;
  ts.n_tokens = ts.offsets[n_seqs];
  itr_err e = itr_calloc((size_t)ts.n_tokens, sizeof(int32_t), "synth token ids", &ts.ids);
  for (int64_t i = 0; i < ts.n_tokens && e == ITR_OK; i++) {
    if (itr_rng_uniform(&g) < in_band)
      ts.ids[i] = band_lo + (int32_t)itr_rng_below(&g, (uint64_t)(band_hi - band_lo));
    else
      ts.ids[i] = (int32_t)itr_rng_below(&g, (uint64_t)vocab);
  }
  if (e == ITR_OK) e = itr_token_set_write(path, &ts);
  itr_token_set_fini(&ts);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_synth_tokens_write(const char *path, int vocab, int n_seqs, int min_len, int max_len, uint64_t seed) {
  ITR_TRY(itr_synth_tokens_write_band(path, vocab, 0, vocab, 1.0, n_seqs, min_len, max_len, seed));
  return ITR_OK;
}
