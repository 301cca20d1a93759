/* The bundled demo case: a tiny Llama, three adapters of ranks 4, 8, 16 aimed at their tasks' inputs,
 * and per-task token files. */
#include <stdio.h>
#include <string.h>

#include "iteris/io.h"
#include "iteris/synth.h"
#include "synth/synth_internal.h"

void itr_synth_demo_config(itr_model_config *c) {
  memset(c, 0, sizeof *c);
  c->arch = ITR_ARCH_LLAMA;
  snprintf(c->model_type, sizeof c->model_type, "llama");
  c->hidden_size = 64;
  c->intermediate_size = 172;
  c->num_hidden_layers = 4;
  c->num_attention_heads = 4;
  c->num_key_value_heads = 2;
  c->head_dim = 16;
  c->vocab_size = 256;
  c->max_position_embeddings = 2048;
  c->rms_norm_eps = 1e-5;
  c->rope_theta = 10000.0;
}

itr_err itr_synth_demo_write(const char *dir) {
  static const struct {
    int r;
    double alpha;
    int rslora;
    itr_dtype dtype;
  } ad[3] = {{4, 8.0, 0, ITR_BF16}, {8, 16.0, 0, ITR_F32}, {16, 16.0, 1, ITR_F16}};
  const uint64_t seed = 20250101;
  itr_model_config c;
  itr_synth_demo_config(&c);
  char path[ITR_PATH_MAX], base[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_mkdirs(dir));
  ITR_TRY(itr_synth_join(base, sizeof base, dir, "base"));
  ITR_TRY(itr_synth_model_write(base, &c, ITR_BF16, 1, seed));
  const int band = c.vocab_size / 3;
  ITR_CHECK(c.vocab_size <= 256, ITR_ERR_INTERNAL, "demo vocabulary %d exceeds the token weights table", c.vocab_size);
  const double in_band = 0.9; /* task i draws this fraction of its ids from its band */
  double wt[256];
  for (int i = 0; i < 3; i++) {
    char name[64];
    int lo = i * band, hi = i == 2 ? c.vocab_size : (i + 1) * band;
    /* Task i's token distribution, as itr_synth_tokens_write_band draws it. */
    for (int t = 0; t < c.vocab_size; t++)
      wt[t] = (1 - in_band) / c.vocab_size + (t >= lo && t < hi ? in_band / (hi - lo) : 0.0);
    snprintf(name, sizeof name, "adapter_%d", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(itr_synth_adapter_write_aimed(path, base, ad[i].r, ad[i].alpha, ad[i].rslora,
                                          (1u << ITR_MODULE_COUNT) - 1, ad[i].dtype, wt, ITR_SYNTH_DEMO_AIM,
                                          seed + 100 + (uint64_t)i, "iteris-mpi/demo-llama-d64"));
    snprintf(name, sizeof name, "calib_%d.jsonl", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(itr_synth_tokens_write_band(path, c.vocab_size, lo, hi, in_band, 32, 16, 48, seed + 200 + (uint64_t)i));
    snprintf(name, sizeof name, "heldout_%d.jsonl", i);
    ITR_TRY(itr_synth_join(path, sizeof path, dir, name));
    ITR_TRY(itr_synth_tokens_write_band(path, c.vocab_size, lo, hi, in_band, 16, 16, 48, seed + 300 + (uint64_t)i));
  }
  return ITR_OK;
}
