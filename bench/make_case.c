/* Writes a generated merge case with real model shapes, for benchmarks:
 *   make_case DIR SHAPE LAYERS N_ADAPTERS RANK SEQS_PER_TASK SEQ_LEN
 * SHAPE: llama3-8b (D 4096, F 14336, 32 heads, 8 key/value heads), llama3-70b (D 8192, F 28672, 64 heads, 8
 * key/value heads), llama2-7b (D 4096, F 11008, 32 heads),
 * tiny (D 256, F 688, 8 heads, 4 key/value heads). Vocabulary 1024 (the embedding does not matter here).
 * Writes DIR/base (BF16), DIR/adapter_i (BF16, all seven modules), DIR/calib_i.jsonl. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/io.h"
#include "iteris/synth.h"

int main(int argc, char **argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: %s DIR SHAPE LAYERS N_ADAPTERS RANK SEQS_PER_TASK SEQ_LEN\n", argv[0]);
    return 2;
  }
  const char *dir = argv[1], *shape = argv[2];
  int L = atoi(argv[3]), N = atoi(argv[4]), r = atoi(argv[5]), seqs = atoi(argv[6]), len = atoi(argv[7]);
  itr_model_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.arch = ITR_ARCH_LLAMA;
  snprintf(cfg.model_type, sizeof cfg.model_type, "llama");
  if (!strcmp(shape, "llama3-8b")) {
    cfg.hidden_size = 4096, cfg.intermediate_size = 14336, cfg.num_attention_heads = 32, cfg.num_key_value_heads = 8;
    cfg.rope_theta = 500000;
  } else if (!strcmp(shape, "llama3-70b")) {
    cfg.hidden_size = 8192, cfg.intermediate_size = 28672, cfg.num_attention_heads = 64, cfg.num_key_value_heads = 8;
    cfg.rope_theta = 500000;
  } else if (!strcmp(shape, "llama2-7b")) {
    cfg.hidden_size = 4096, cfg.intermediate_size = 11008, cfg.num_attention_heads = 32, cfg.num_key_value_heads = 32;
    cfg.rope_theta = 10000;
  } else if (!strcmp(shape, "tiny")) {
    cfg.hidden_size = 256, cfg.intermediate_size = 688, cfg.num_attention_heads = 8, cfg.num_key_value_heads = 4;
    cfg.rope_theta = 10000;
  } else {
    fprintf(stderr, "unknown shape '%s' (llama3-8b, llama3-70b, llama2-7b, tiny)\n", shape);
    return 2;
  }
  cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads;
  cfg.num_hidden_layers = L;
  cfg.vocab_size = 1024;
  cfg.max_position_embeddings = 8192;
  cfg.rms_norm_eps = 1e-5;
  char path[4096];
  itr_err e = itr_iofile_mkdirs(dir);
  snprintf(path, sizeof path, "%s/base", dir);
  if (e == ITR_OK) e = itr_iofile_mkdirs(path);
  if (e == ITR_OK) e = itr_synth_model_write(path, &cfg, ITR_BF16, 1, 1);
  for (int i = 0; i < N && e == ITR_OK; i++) {
    snprintf(path, sizeof path, "%s/adapter_%d", dir, i);
    e = itr_iofile_mkdirs(path);
    if (e == ITR_OK)
      e = itr_synth_adapter_write(path, &cfg, r, 2.0 * r, 0, (1u << ITR_MODULE_COUNT) - 1, ITR_BF16, 100 + (uint64_t)i,
                                  "bench-base");
    snprintf(path, sizeof path, "%s/calib_%d.jsonl", dir, i);
    if (e == ITR_OK) e = itr_synth_tokens_write(path, cfg.vocab_size, seqs, len, len, 200 + (uint64_t)i);
  }
  if (e != ITR_OK) {
    fprintf(stderr, "error: %s\n", itr_error_message());
    return itr_exit_code(e);
  }
  printf("case written to %s: %s shape, %d layers, %d adapters of rank %d, %d x %d tokens per task\n", dir, shape, L,
         N, r, seqs, len);
  return 0;
}
