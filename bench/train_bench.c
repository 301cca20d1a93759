/* Cost of a LoRA training step against the forward pass, on one rank: tokens/s of
 * itr_model_forward (embedding, layers, logits) and of itr_model_loss_grad (the same forward keeping
 * its activations, the loss, the backward to every LoRA factor) on the same block, their ratio (the
 * issue's goal: a step costs <= 3.5 forwards), the sgemm rate on the layer's dominant product shape
 * measured in the same run, and the peak RSS.
 * Usage: train_bench [-base DIR] [-D 1024 -F 2816 -H 16 -Hkv 4 -L 4 -V 8192] [-T 512] [-seq 128]
 *                    [-r 16] [-targets all|qv] [-reps 3]
 *   -base DIR: a real model folder (its shapes and weights); otherwise random weights of the given shape
 *   (speed does not depend on the values). */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "iteris/io.h"
#include "iteris/model.h"

static const char *arg_str(int argc, char **argv, const char *key, const char *def) {
  for (int i = 1; i + 1 < argc; i++)
    if (strcmp(argv[i], key) == 0) return argv[i + 1];
  return def;
}
static int arg_int(int argc, char **argv, const char *key, int def) {
  const char *s = arg_str(argc, argv, key, NULL);
  return s ? atoi(s) : def;
}

static void fill(float *p, size_t n, unsigned *s, float scale) {
  for (size_t i = 0; i < n; i++) {
    *s = *s * 1664525u + 1013904223u;
    p[i] = scale * ((float)(*s >> 8) / 16777216.0f - 0.5f);
  }
}

static double peak_rss_mib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;
}

static int die(const char *what) {
  fprintf(stderr, "train_bench: %s: %s\n", what, itr_error_message());
  return 4;
}

int main(int argc, char **argv) {
  const char *base = arg_str(argc, argv, "-base", NULL), *targets = arg_str(argc, argv, "-targets", "all");
  int T = arg_int(argc, argv, "-T", 512), seq = arg_int(argc, argv, "-seq", 128);
  int r = arg_int(argc, argv, "-r", 16), reps = arg_int(argc, argv, "-reps", 3);
  itr_model_config cfg;
  itr_model *m = NULL;
  unsigned s = 1;
  if (base) {
    itr_tensor_store *st = NULL;
    if (itr_model_config_read(base, &cfg) != ITR_OK || itr_tensor_store_open(base, &st) != ITR_OK ||
        itr_model_load(&cfg, st, 0, cfg.num_hidden_layers, 1, 1, &m) != ITR_OK)
      return die(base);
    itr_tensor_store_destroy(st);
  } else {
    memset(&cfg, 0, sizeof cfg);
    snprintf(cfg.model_type, sizeof cfg.model_type, "llama");
    cfg.hidden_size = arg_int(argc, argv, "-D", 1024);
    cfg.intermediate_size = arg_int(argc, argv, "-F", 2816);
    cfg.num_attention_heads = arg_int(argc, argv, "-H", 16);
    cfg.num_key_value_heads = arg_int(argc, argv, "-Hkv", 4);
    cfg.num_hidden_layers = arg_int(argc, argv, "-L", 4);
    cfg.vocab_size = arg_int(argc, argv, "-V", 8192);
    cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads;
    cfg.rms_norm_eps = 1e-5, cfg.rope_theta = 10000;
    if (itr_model_create(&cfg, 0, cfg.num_hidden_layers, 1, 1, &m) != ITR_OK) return die("model");
    for (int l = 0; l < cfg.num_hidden_layers; l++) {
      for (int k = 0; k < ITR_MODULE_COUNT; k++) {
        int64_t o, i;
        itr_module_shape(&cfg, (itr_module)k, &o, &i);
        fill(itr_model_weight(m, l, (itr_module)k), (size_t)(o * i), &s, 0.05f);
      }
      for (int p = 0; p < 2; p++)
        for (int i = 0; i < cfg.hidden_size; i++) itr_model_norm(m, l, p)[i] = 1.0f;
    }
    fill(itr_model_embed_weight(m), (size_t)cfg.vocab_size * cfg.hidden_size, &s, 1.0f);
    fill(itr_model_lm_head(m), (size_t)cfg.vocab_size * cfg.hidden_size, &s, 0.05f);
    for (int i = 0; i < cfg.hidden_size; i++) itr_model_final_norm(m)[i] = 1.0f;
  }
  int D = cfg.hidden_size, F = cfg.intermediate_size, V = cfg.vocab_size, L = cfg.num_hidden_layers;
  unsigned mask = strcmp(targets, "qv") == 0 ? (1u << ITR_Q_PROJ) | (1u << ITR_V_PROJ) : (1u << ITR_MODULE_COUNT) - 1;
  itr_lora_set *lora = NULL, *grad = NULL;
  if (itr_lora_set_create(&cfg, &lora) != ITR_OK) return die("LoRA set");
  for (int l = 0; l < L; l++)
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      if (!(mask & (1u << k))) continue;
      int64_t o, i;
      itr_module_shape(&cfg, (itr_module)k, &o, &i);
      float *A = malloc(sizeof(float) * (size_t)r * i), *B = malloc(sizeof(float) * (size_t)r * o);
      fill(A, (size_t)r * i, &s, 0.05f);
      fill(B, (size_t)r * o, &s, 0.05f);
      if (itr_lora_set_add(lora, l, (itr_module)k, r, 2.0f, A, B) != ITR_OK) return die("LoRA term");
      free(A), free(B);
    }
  if (itr_lora_set_create_like(lora, &grad) != ITR_OK) return die("gradient set");
  int nseq = (T + seq - 1) / seq;
  int64_t *offs = calloc((size_t)nseq + 1, sizeof *offs);
  for (int i = 0; i <= nseq; i++) offs[i] = (int64_t)i * seq < T ? (int64_t)i * seq : T;
  itr_seq_layout lay = {nseq, offs};
  int32_t *ids = malloc(sizeof(int32_t) * (size_t)T), *labels = malloc(sizeof(int32_t) * (size_t)T);
  for (int t = 0; t < T; t++) ids[t] = (int32_t)((t * 7919u + 13u) % (unsigned)V);
  for (int q = 0; q < nseq; q++)
    for (int64_t t = offs[q]; t < offs[q + 1]; t++) labels[t] = t + 1 < offs[q + 1] ? ids[t + 1] : -1;
  float *logits = malloc(sizeof(float) * (size_t)T * V);

  /* sgemm rate on the dominant shape: (T, D) x (D, F)^T */
  float *x = malloc(sizeof(float) * (size_t)T * D), *W = malloc(sizeof(float) * (size_t)F * D),
        *y = malloc(sizeof(float) * (size_t)T * F);
  fill(x, (size_t)T * D, &s, 1.0f);
  fill(W, (size_t)F * D, &s, 0.02f);
  double best_gemm = 1e30;
  for (int i = 0; i < reps + 1; i++) {
    double t0 = itr_wtime();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, F, D, 1.0f, x, D, W, D, 0.0f, y, F);
    double dt = itr_wtime() - t0;
    if (i > 0 && dt < best_gemm) best_gemm = dt;
  }
  double gemm_rate = 2.0 * T * (double)F * D / best_gemm;
  free(x), free(W), free(y);

  double rss0 = peak_rss_mib(), best_fwd = 1e30, best_step = 1e30, loss = 0;
  for (int i = 0; i < reps + 1; i++) { /* the first run of each is a warm-up */
    double t0 = itr_wtime();
    if (itr_model_forward(m, ids, T, &lay, lora, NULL, NULL, logits) != ITR_OK) return die("forward");
    double dt = itr_wtime() - t0;
    if (i > 0 && dt < best_fwd) best_fwd = dt;
  }
  double rss_fwd = peak_rss_mib();
  for (int i = 0; i < reps + 1; i++) {
    int64_t cnt = 0;
    itr_lora_set_zero(grad);
    double t0 = itr_wtime();
    if (itr_model_loss_grad(m, ids, labels, T, &lay, lora, NULL, grad, &loss, &cnt) != ITR_OK) return die("loss_grad");
    double dt = itr_wtime() - t0;
    if (i > 0 && dt < best_step) best_step = dt;
  }
  double rss_step = peak_rss_mib();
  /* matrix flops of the forward: the projections, attention (full squares), the head */
  double flop = 2.0 * V * D * T, hd = (double)D / cfg.num_attention_heads;
  for (int k = 0; k < ITR_MODULE_COUNT; k++) {
    int64_t o, i;
    itr_module_shape(&cfg, (itr_module)k, &o, &i);
    flop += 2.0 * o * i * T * L;
  }
  for (int q = 0; q < nseq; q++) flop += 4.0 * (double)(offs[q + 1] - offs[q]) * (offs[q + 1] - offs[q]) * hd * cfg.num_attention_heads * L;
  printf("train_bench: %s L %d D %d F %d heads %d/%d V %d; T %d (%d sequences of <= %d); LoRA r %d on %s; best of %d\n",
         base ? base : "random weights", L, D, F, cfg.num_attention_heads, cfg.num_key_value_heads, V, T, nseq, seq, r,
         mask == (1u << ITR_MODULE_COUNT) - 1 ? "all 7 modules" : "q_proj, v_proj", reps);
  printf("sgemm (%d x %d x %d): %.1f GFLOP/s\n", T, F, D, gemm_rate / 1e9);
  printf("forward (logits): %.4f s, %.0f tokens/s, %.1f GFLOP/s = %.0f%% of sgemm\n", best_fwd, T / best_fwd,
         flop / best_fwd / 1e9, 100.0 * flop / best_fwd / gemm_rate);
  printf("training step (forward + loss + LoRA backward): %.4f s, %.0f tokens/s = %.2f forwards\n", best_step,
         T / best_step, best_step / best_fwd);
  printf("peak RSS: %.0f MiB before, %.0f MiB after the forwards, %.0f MiB after the steps (loss %.4f)\n", rss0, rss_fwd,
         rss_step, loss / T);
  free(ids), free(labels), free(logits), free(offs);
  itr_lora_set_destroy(lora);
  itr_lora_set_destroy(grad);
  itr_model_destroy(m);
  return 0;
}
