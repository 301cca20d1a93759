/* The forward driver: the held decoder layer run over every task's shard for the source models
 * (base + adapter i) and the merged model, capturing the inputs of every target module (X, Xt) and,
 * in iteration 1, the output norms of the adaptive weights; the merged model's LoRA set rebuilt from
 * the updates; held-out evaluation in parts (one layer at a time, for both drivers). */
#include <petscsys.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/eval.h"
#include "pipeline/pipeline_internal.h"

/* ---- capture of the inputs of the target modules ---------------------------------------------- */

typedef struct {
  float **buf; /* [n_sites] (T, d_in) f32 */
  const itr_arch_desc *arch;
  int64_t row0;  /* row of buf where the captured block starts */
  double *ynorm; /* [n_modules]: ||X W^T||^2 of each module added up, or NULL */
} capture_ctx;

static itr_err capture_copy(int layer, itr_site site, const float *rows, int64_t T, int64_t d_in, void *ctx) {
  (void)layer;
  capture_ctx *cc = ctx;
  const int s = itr_arch_desc_site(cc->arch, site);
  ITR_CHECK(s >= 0 && d_in == cc->arch->site[s].d_in, ITR_ERR_INTERNAL,
            "capture: site %d (index %d) has %lld inputs, not those of the architecture descriptor", (int)site, s,
            (long long)d_in);
  if (cc->buf[s]) memcpy(cc->buf[s] + cc->row0 * d_in, rows, (size_t)T * (size_t)d_in * sizeof(float));
  return ITR_OK;
}

static void capture_norm(int layer, itr_module m, double sumsq, void *ctx) {
  (void)layer;
  capture_ctx *cc = ctx;
  const int q = itr_arch_desc_module(cc->arch, m);
  if (q >= 0) cc->ynorm[q] += sumsq;
}

/* ---- the layer loop ---------------------------------------------------------------------------- */

itr_err merge_alloc_site_buffers(merge_ctx *c) {
  for (int i = 0; i < c->N; i++)
    for (int s = 0; s < c->arch.n_sites; s++) {
      size_t n = (size_t)c->calib_sh[i].T * (size_t)c->arch.site[s].d_in;
      ITR_TRY(itr_calloc(n ? n : 1, sizeof(float), "captured source inputs X", &c->X[i][s]));
      ITR_TRY(itr_calloc(n ? n : 1, sizeof(float), "captured merged inputs Xt", &c->Xt[i][s]));
    }
  return ITR_OK;
}

itr_err merge_embed_all(merge_ctx *c, float **h) {
  for (int i = 0; i < c->N; i++)
    if (c->calib_sh[i].T > 0) ITR_TRY(itr_model_embed(c->model, c->calib_sh[i].ids, c->calib_sh[i].T, h[i]));
  return ITR_OK;
}

/* Makes layer l the one decoder layer this rank holds (a rank never holds more than one: the
 * weights of a 70B-class model do not fit in one process, one layer does). Collective-free; the
 * caller agrees on the result. */
static itr_err load_layer(merge_ctx *c, int l) {
  if (c->layer && c->layer_index == l) return ITR_OK;
  itr_model_destroy(c->layer);
  c->layer = NULL;
  c->layer_index = -1;
  PetscLogStagePush(c->stage_load);
  /* one block for every layer (they have one shape): its pages are faulted in once, not per layer */
  itr_err e = ITR_OK;
  if (!c->layer_mem) e = itr_model_param_floats(&c->cfg, l, l + 1, 0, 0, &c->layer_floats);
  if (e == ITR_OK && !c->layer_mem) e = itr_calloc(c->layer_floats, sizeof(float), "decoder layer (f32)", &c->layer_mem);
  if (e == ITR_OK) e = itr_model_load_into(&c->cfg, c->store, l, l + 1, 0, 0, c->layer_mem, c->layer_floats, &c->layer);
  PetscLogStagePop();
  ITR_TRY(e);
  c->layer_index = l;
  return ITR_OK;
}

/* Runs the held layer on every sequence of a shard, one sequence per call: the float32 GEMMs then
 * see the same operands whatever the rank count (OpenBLAS results depend on the number of rows of
 * a call), so the statistics are independent of how sequences are spread over ranks. */
static itr_err run_sequences(const merge_ctx *c, const itr_shard *sh, float *h, const itr_lora_set *lora,
                             float **capture, double *ynorm) {
  const int64_t D = c->cfg.hidden_size;
  const int l = c->layer_index;
  for (int s = 0; s < sh->n_seqs; s++) {
    int64_t r0 = sh->offsets[s], T = sh->offsets[s + 1] - r0;
    capture_ctx cx = {capture, &c->arch, r0, ynorm};
    (void)PetscLogEventBegin(c->ev_forward, 0, 0, 0, 0);
    itr_err e = itr_model_run_layers_ex(c->layer, l, l + 1, h + r0 * D, T, NULL, lora, capture ? capture_copy : NULL,
                                        ynorm ? capture_norm : NULL, &cx);
    (void)PetscLogFlops(merge_forward_flops(c, T));
    (void)PetscLogEventEnd(c->ev_forward, 0, 0, 0, 0);
    ITR_TRY(e);
  }
  return ITR_OK;
}

itr_err merge_forward_layer(merge_ctx *c, int k, int l) {
  ITR_TRY(load_layer(c, l));
  for (int i = 0; i < c->N; i++) {
    const itr_shard *sh = &c->calib_sh[i];
    /* iteration 1: the source model's outputs give the denominators of the adaptive weights */
    const int norms = k == 1 && (c->method->flags & ITR_METHOD_ADAPTIVE);
    memset(c->ynorm[i], 0, sizeof c->ynorm[i]);
    ITR_TRY(run_sequences(c, sh, c->h_src[i], c->lora_task[i], c->X[i], norms ? c->ynorm[i] : NULL));
    if (k >= 2) ITR_TRY(run_sequences(c, sh, c->h_mrg[i], c->lora_merged, c->Xt[i], NULL));
  }
  return ITR_OK;
}

itr_err merge_rebuild_lora(merge_ctx *c) {
  itr_lora_set_clear(c->lora_merged);
  const int L = c->arch.n_layers;
  for (int l = 0; l < L; l++)
    for (int m = 0; m < c->arch.n_modules; m++) {
      const itr_update *u = &c->cur[SLOT(l, m)];
      if (!u->A && !u->dense) continue;
      size_t nA = (size_t)u->rank * (size_t)u->d_in, nB = (size_t)u->d_out * (size_t)u->rank;
      size_t nD = (size_t)u->d_out * (size_t)u->d_in;
      float *a = NULL, *b = NULL;
      itr_err e = ITR_OK;
      if (u->rank > 0) {
        ITR_TRY_GOTO(itr_calloc(nA, sizeof(float), "merged A f32", &a), e, fail);
        ITR_TRY_GOTO(itr_calloc(nB, sizeof(float), "merged B f32", &b), e, fail);
        for (size_t q = 0; q < nA; q++) a[q] = (float)u->A[q];
        for (size_t q = 0; q < nB; q++) b[q] = (float)u->B[q];
        ITR_TRY_GOTO(itr_lora_set_add(c->lora_merged, l, c->arch.module[m].id, (int)u->rank, 1.0f, a, b), e, fail);
      } else {
        ITR_TRY_GOTO(itr_calloc(nD, sizeof(float), "merged dW f32", &a), e, fail);
        for (size_t q = 0; q < nD; q++) a[q] = (float)u->dense[q];
        ITR_TRY_GOTO(itr_lora_set_set_dense(c->lora_merged, l, c->arch.module[m].id, a, 1.0f, 1), e, fail);
      }
    fail:
      free(a);
      free(b);
      ITR_TRY(e);
    }
  return ITR_OK;
}

/* Runs layers [0, l0) without statistics, to bring the hidden states of a resumed iteration to
 * layer l0. */
itr_err merge_forward_prefix(merge_ctx *c, int k, int l0) {
  for (int l = 0; l < l0; l++) {
    ITR_TRY(load_layer(c, l));
    for (int i = 0; i < c->N; i++) {
      ITR_TRY(run_sequences(c, &c->calib_sh[i], c->h_src[i], c->lora_task[i], NULL, NULL));
      if (k >= 2) ITR_TRY(run_sequences(c, &c->calib_sh[i], c->h_mrg[i], c->lora_merged, NULL, NULL));
    }
  }
  return ITR_OK;
}

/* ---- evaluation -------------------------------------------------------------------------------- */

itr_err merge_eval_alloc(merge_ctx *c, itr_shard *sh, float *(*h)[3]) {
  const int64_t D = c->cfg.hidden_size;
  for (int i = 0; i < c->N; i++) {
    ITR_TRY(merge_shard_make(&c->heldout[i], c->rank, c->size, &sh[i]));
    for (int v = 0; v < 3; v++) {
      ITR_TRY(itr_calloc((size_t)(sh[i].T ? sh[i].T : 1) * (size_t)D, sizeof(float), "held-out hidden states", &h[i][v]));
      if (c->stage == 0 && sh[i].T > 0) ITR_TRY(itr_model_embed(c->model, sh[i].ids, sh[i].T, h[i][v]));
    }
  }
  return ITR_OK;
}

itr_err merge_eval_layer(merge_ctx *c, int l, const itr_shard *sh, float *(*h)[3], int merged_only) {
  ITR_TRY(load_layer(c, l));
  for (int i = 0; i < c->N; i++) {
    if (!merged_only) ITR_TRY(run_sequences(c, &sh[i], h[i][0], NULL, NULL, NULL));
    if (!merged_only) ITR_TRY(run_sequences(c, &sh[i], h[i][1], c->lora_task[i], NULL, NULL));
    ITR_TRY(run_sequences(c, &sh[i], h[i][2], c->lora_merged, NULL, NULL));
  }
  return ITR_OK;
}

itr_err merge_eval_finish(merge_ctx *c, itr_err e, int have, const itr_shard *sh, float *(*h)[3]) {
  const int64_t V = c->cfg.vocab_size, D = c->cfg.hidden_size;
  const int N = c->N;
  float *lt = NULL, *lm = NULL, *lb = NULL;
  itr_fidelity_acc acc[ITR_MAX_TASKS];
  memset(acc, 0, sizeof acc);
  int64_t maxlen = 1;
  for (int i = 0; have && i < N; i++)
    for (int s = 0; s < sh[i].n_seqs; s++)
      if (sh[i].offsets[s + 1] - sh[i].offsets[s] > maxlen) maxlen = sh[i].offsets[s + 1] - sh[i].offsets[s];
  size_t n = (size_t)maxlen * (size_t)V;
  if (e == ITR_OK && have) e = itr_calloc(n, sizeof(float), "logits", &lt);
  if (e == ITR_OK && have) e = itr_calloc(n, sizeof(float), "logits", &lm);
  if (e == ITR_OK && have) e = itr_calloc(n, sizeof(float), "logits", &lb);
  for (int i = 0; i < N && e == ITR_OK && have; i++)
    for (int s = 0; s < sh[i].n_seqs && e == ITR_OK; s++) {
      int64_t r0 = sh[i].offsets[s], T = sh[i].offsets[s + 1] - r0;
      e = itr_model_logits(c->model, h[i][1] + r0 * D, T, lt);
      if (e == ITR_OK) e = itr_model_logits(c->model, h[i][2] + r0 * D, T, lm);
      if (e == ITR_OK) e = itr_model_logits(c->model, h[i][0] + r0 * D, T, lb);
      if (e == ITR_OK) itr_fidelity_add(&acc[i], lt, lm, lb, T, V);
    }
  free(lt);
  free(lm);
  free(lb);
  ITR_TRY(itr_dist_agree_relayed(c->world, e));
  for (int i = 0; i < N; i++) {
    double v[4] = {acc[i].kl_merged, acc[i].kl_base, acc[i].top1, acc[i].n};
    if (MPI_Allreduce(MPI_IN_PLACE, v, 4, MPI_DOUBLE, MPI_SUM, c->world) != 0)
      return itr_error_set(ITR_ERR_INTERNAL, "MPI_Allreduce of the fidelity sums failed");
    acc[i].kl_merged = v[0], acc[i].kl_base = v[1], acc[i].top1 = v[2], acc[i].n = v[3];
    itr_fidelity_result(&acc[i], &c->kl_ratio[i], &c->top1[i]);
  }
  c->evaluated = 1;
  return ITR_OK;
}

void merge_eval_free(merge_ctx *c, itr_shard *sh, float *(*h)[3]) {
  for (int i = 0; i < c->N; i++) {
    shard_fini(&sh[i]);
    for (int v = 0; v < 3; v++) {
      free(h[i][v]);
      h[i][v] = NULL;
    }
  }
}

/* Fidelity on the held-out sets: base, base + adapter i and the merged model run layer by layer
 * (one layer held at a time) on this rank's held-out sequences; then the logits, sequence by
 * sequence, and the sums over ranks. */
itr_err merge_evaluate(merge_ctx *c) {
  itr_shard sh[ITR_MAX_TASKS];
  float *h[ITR_MAX_TASKS][3];
  memset(sh, 0, sizeof sh);
  memset(h, 0, sizeof h);
  itr_err e = merge_eval_alloc(c, sh, h);
  for (int l = 0; l < c->cfg.num_hidden_layers && e == ITR_OK; l++) e = merge_eval_layer(c, l, sh, h, 0);
  e = itr_dist_agree(c->world, e);
  if (e == ITR_OK) e = merge_eval_finish(c, e, 1, sh, h);
  merge_eval_free(c, sh, h);
  return e;
}

/* Fidelity after iteration k (-fidelity_per_iter, data-parallel driver): as merge_evaluate, but the
 * base and task models' held-out states are computed once (the first call) and kept in c->ev_h;
 * later calls rerun only the merged model from the embedding. Fills row k - 1 of c->kl_iter and
 * c->top1_iter; after the last iteration the result is also the final evaluation (c->evaluated). */
itr_err merge_evaluate_iter(merge_ctx *c, int k) {
  const int first = !c->ev_ready;
  itr_err e = ITR_OK;
  if (first) {
    e = merge_eval_alloc(c, c->ev_sh, c->ev_h);
    c->ev_ready = 1; /* allocated (merge_eval_free runs in ctx_fini either way) */
  } else {
    for (int i = 0; i < c->N && e == ITR_OK; i++)
      if (c->ev_sh[i].T > 0) e = itr_model_embed(c->model, c->ev_sh[i].ids, c->ev_sh[i].T, c->ev_h[i][2]);
  }
  for (int l = 0; l < c->cfg.num_hidden_layers && e == ITR_OK; l++) e = merge_eval_layer(c, l, c->ev_sh, c->ev_h, !first);
  e = itr_dist_agree(c->world, e);
  if (e == ITR_OK) e = merge_eval_finish(c, e, 1, c->ev_sh, c->ev_h);
  ITR_TRY(e);
  for (int i = 0; i < c->N; i++) {
    c->kl_iter[(size_t)(k - 1) * (size_t)c->N + (size_t)i] = c->kl_ratio[i];
    c->top1_iter[(size_t)(k - 1) * (size_t)c->N + (size_t)i] = c->top1[i];
  }
  c->evaluated = k == merge_n_iters(c);
  return ITR_OK;
}
