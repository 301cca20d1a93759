/* Tokens/s of one decoder layer (default: Llama-2-7B shape, D 4096, F 11008, 32 heads) against the
 * sgemm rate measured in the same run on the layer's dominant product shape.
 * Usage: forward_bench [-D 4096] [-F 11008] [-H 32] [-Hkv 32] [-T 256] [-seq 128] [-reps 3] [-r 0]
 *   T tokens per block, packed as sequences of length seq; r > 0 adds a LoRA term of rank r to every
 *   module. Prints one line per measurement; weights are random (speed does not depend on values). */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/model.h"

static int arg_int(int argc, char **argv, const char *key, int def) {
  for (int i = 1; i + 1 < argc; i++)
    if (strcmp(argv[i], key) == 0) return atoi(argv[i + 1]);
  return def;
}

static void fill(float *p, size_t n, unsigned *s, float scale) {
  for (size_t i = 0; i < n; i++) {
    *s = *s * 1664525u + 1013904223u;
    p[i] = scale * ((float)(*s >> 8) / 16777216.0f - 0.5f);
  }
}

int main(int argc, char **argv) {
  int D = arg_int(argc, argv, "-D", 4096), F = arg_int(argc, argv, "-F", 11008);
  int H = arg_int(argc, argv, "-H", 32), Hkv = arg_int(argc, argv, "-Hkv", H);
  int T = arg_int(argc, argv, "-T", 256), seq = arg_int(argc, argv, "-seq", 128);
  int reps = arg_int(argc, argv, "-reps", 3), r = arg_int(argc, argv, "-r", 0);
  if (D <= 0 || F <= 0 || H <= 0 || Hkv <= 0 || T <= 0 || seq <= 0 || reps <= 0 || r < 0) {
    fprintf(stderr, "forward_bench: sizes must be positive\n");
    return 2;
  }
  itr_model_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.hidden_size = D, cfg.intermediate_size = F, cfg.num_hidden_layers = 1;
  cfg.num_attention_heads = H, cfg.num_key_value_heads = Hkv, cfg.head_dim = D / H;
  cfg.vocab_size = 1, cfg.rms_norm_eps = 1e-5, cfg.rope_theta = 10000;
  itr_model *m = NULL;
  itr_lora_set *lora = NULL;
  if (itr_model_create(&cfg, 0, 1, 0, 0, &m) != ITR_OK) {
    fprintf(stderr, "forward_bench: %s\n", itr_error_message());
    return 4;
  }
  unsigned s = 1;
  int hd = D / H;
  int64_t shapes[ITR_MODULE_COUNT][2] = {{(int64_t)H * hd, D}, {(int64_t)Hkv * hd, D}, {(int64_t)Hkv * hd, D},
                                         {D, (int64_t)H * hd}, {F, D}, {F, D}, {D, F}};
  double layer_flop_per_token = 0;
  for (int k = 0; k < ITR_MODULE_COUNT; k++) {
    fill(itr_model_weight(m, 0, (itr_module)k), (size_t)(shapes[k][0] * shapes[k][1]), &s, 0.02f);
    layer_flop_per_token += 2.0 * shapes[k][0] * shapes[k][1];
  }
  for (int p = 0; p < 2; p++)
    for (int i = 0; i < D; i++) itr_model_norm(m, 0, p)[i] = 1.0f;
  if (r > 0) {
    if (itr_lora_set_create(&cfg, &lora) != ITR_OK) return 4;
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      float *A = malloc(sizeof(float) * (size_t)r * shapes[k][1]), *B = malloc(sizeof(float) * (size_t)r * shapes[k][0]);
      fill(A, (size_t)r * shapes[k][1], &s, 0.02f);
      fill(B, (size_t)r * shapes[k][0], &s, 0.02f);
      if (itr_lora_set_add(lora, 0, (itr_module)k, r, 1.0f, A, B) != ITR_OK) return 4;
      free(A);
      free(B);
    }
  }
  int nseq = (T + seq - 1) / seq;
  int64_t *offs = calloc((size_t)nseq + 1, sizeof *offs);
  for (int i = 0; i <= nseq; i++) offs[i] = (int64_t)i * seq < T ? (int64_t)i * seq : T;
  itr_seq_layout lay = {nseq, offs};
  /* attention flops: per sequence of n, per head, 2 n^2 hd (scores) + 2 n^2 hd (values), full squares */
  double attn_flop = 0;
  for (int i = 0; i < nseq; i++) {
    double n = (double)(offs[i + 1] - offs[i]);
    attn_flop += 4.0 * n * n * hd * H;
  }
  float *h = malloc(sizeof(float) * (size_t)T * D), *h0 = malloc(sizeof(float) * (size_t)T * D);
  fill(h0, (size_t)T * D, &s, 1.0f);

  /* sgemm rate on the dominant shape: (T, D) x (D, F)^T */
  float *x = malloc(sizeof(float) * (size_t)T * D), *W = malloc(sizeof(float) * (size_t)F * D),
        *y = malloc(sizeof(float) * (size_t)T * F);
  fill(x, (size_t)T * D, &s, 1.0f);
  fill(W, (size_t)F * D, &s, 0.02f);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, F, D, 1.0f, x, D, W, D, 0.0f, y, F); /* warm up */
  double best_gemm = 1e30;
  for (int i = 0; i < reps; i++) {
    double t0 = itr_wtime();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, F, D, 1.0f, x, D, W, D, 0.0f, y, F);
    double dt = itr_wtime() - t0;
    if (dt < best_gemm) best_gemm = dt;
  }
  double gemm_rate = 2.0 * T * (double)F * D / best_gemm;
  free(x), free(W), free(y);

  double best = 1e30;
  for (int i = 0; i < reps + 1; i++) { /* the first run is a warm-up */
    memcpy(h, h0, sizeof(float) * (size_t)T * D);
    double t0 = itr_wtime();
    itr_err e = itr_model_run_layers(m, 0, 1, h, T, &lay, lora, NULL, NULL);
    double dt = itr_wtime() - t0;
    if (e != ITR_OK) {
      fprintf(stderr, "forward_bench: %s\n", itr_error_message());
      return 4;
    }
    if (i > 0 && dt < best) best = dt;
  }
  double lora_flop = 0;
  for (int k = 0; k < ITR_MODULE_COUNT && r > 0; k++) lora_flop += 2.0 * r * (shapes[k][0] + shapes[k][1]) * T;
  double flop = layer_flop_per_token * T + attn_flop + lora_flop;
  printf("forward_bench: D %d F %d heads %d/%d T %d (%d sequences of <= %d) LoRA rank %d, best of %d\n", D, F, H,
         Hkv, T, nseq, seq, r, reps);
  printf("sgemm (%d x %d x %d): %.1f GFLOP/s\n", T, F, D, gemm_rate / 1e9);
  printf("one layer: %.3f s, %.1f tokens/s, %.1f GFLOP/s = %.0f%% of sgemm\n", best, T / best, flop / best / 1e9,
         100.0 * flop / best / gemm_rate);
  free(h), free(h0), free(offs);
  itr_lora_set_destroy(lora);
  itr_model_destroy(m);
  return 0;
}
