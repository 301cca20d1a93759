/* The merge pipeline: `mpirun -np P iteris-mpi -base DIR -adapters ... -calib ... -out OUT`.
 *
 * Phases (each ends at an agreement point, so every rank goes on or every rank stops with the
 * same error):
 *   validate  rank 0 reads every header (config, adapters against the base, token files); then
 *             the other ranks open the same inputs.
 *   load      every rank opens the base model's files and holds the embedding; decoder layers are
 *             read one at a time, when the iteration reaches them.
 *   iterate   for k = 1..max_iter, layer by layer: every rank runs the source model i and (k >= 2)
 *             the merged model of iteration k-1 on its shard of calibration set i, in lockstep,
 *             capturing X_i and Xt_i at every input site; the statistics are formed from the
 *             ranks' rows straight in ScaLAPACK's block-cyclic layout and every module's system is
 *             solved with its Cholesky on a grid over all ranks (merge_site.c, src/dist).
 *             With -stages S the same runs per stage on its own layers and ranks, as a pipeline
 *             (merge_stages.c).
 *   write     rank 0 writes OUT.partial/ (adapter, report) and renames it to OUT.
 *   evaluate  with -heldout: kl_ratio and top-1 per task, on held-out shards, summed over ranks.
 */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <petscsys.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/merge_internal.h"
#include "cli/signals.h"
#include "iteris/dist.h"
#include "iteris/eval.h"
#include "iteris/io.h"
#include "iteris/merge.h"
#include "iteris/model.h"



/* ---- partition of sequences over ranks ------------------------------------------------------ */

/* Assigns the sequences of ts to ranks, longest first, each to the rank with the fewest tokens so
 * far (lowest rank on ties): deterministic, the same on every rank. */
itr_err merge_shard_owners(const itr_token_set *ts, int size, int *owner) {
  const int n = ts->n_seqs;
  int *order = NULL;
  int64_t *load = NULL;
  itr_err e = itr_calloc((size_t)(n ? n : 1), sizeof(int), "sequence order", &order);
  if (e == ITR_OK) e = itr_calloc((size_t)size, sizeof(int64_t), "rank loads", &load);
  if (e != ITR_OK) {
    free(order);
    return e;
  }
  for (int s = 0; s < n; s++) order[s] = s;
  /* insertion sort by length, descending, stable (n is a few dozen to a few thousand) */
  for (int a = 1; a < n; a++) {
    int v = order[a], b = a;
    int64_t lv = ts->offsets[v + 1] - ts->offsets[v];
    while (b > 0 && ts->offsets[order[b - 1] + 1] - ts->offsets[order[b - 1]] < lv) {
      order[b] = order[b - 1];
      b--;
    }
    order[b] = v;
  }
  for (int a = 0; a < n; a++) {
    int s = order[a], best = 0;
    for (int p = 1; p < size; p++)
      if (load[p] < load[best]) best = p;
    owner[s] = best;
    load[best] += ts->offsets[s + 1] - ts->offsets[s];
  }
  free(load);
  free(order);
  return ITR_OK;
}

itr_err merge_shard_from_owners(const itr_token_set *ts, const int *owner, int rank, itr_shard *sh) {
  memset(sh, 0, sizeof *sh);
  const int n = ts->n_seqs;
  for (int s = 0; s < n; s++)
    if (owner[s] == rank) {
      sh->n_seqs++;
      sh->T += ts->offsets[s + 1] - ts->offsets[s];
    }
  itr_err e = itr_calloc((size_t)sh->n_seqs + 1, sizeof(int64_t), "shard offsets", &sh->offsets);
  if (e == ITR_OK) e = itr_calloc((size_t)sh->T + 1, sizeof(int32_t), "shard tokens", &sh->ids);
  if (e != ITR_OK) {
    shard_fini(sh);
    return e;
  }
  int k = 0;
  for (int s = 0; s < n; s++)
    if (owner[s] == rank) {
      int64_t len = ts->offsets[s + 1] - ts->offsets[s];
      memcpy(sh->ids + sh->offsets[k], ts->ids + ts->offsets[s], (size_t)len * sizeof(int32_t));
      sh->offsets[k + 1] = sh->offsets[k] + len;
      k++;
    }
  return ITR_OK;
}

/* This rank's shard of ts over size ranks. */
static itr_err shard_make(const itr_token_set *ts, int rank, int size, itr_shard *sh) {
  memset(sh, 0, sizeof *sh);
  int *owner = NULL;
  ITR_TRY(itr_calloc((size_t)(ts->n_seqs ? ts->n_seqs : 1), sizeof(int), "sequence owners", &owner));
  itr_err e = merge_shard_owners(ts, size, owner);
  if (e == ITR_OK) e = merge_shard_from_owners(ts, owner, rank, sh);
  free(owner);
  return e;
}

void shard_fini(itr_shard *sh) {
  free(sh->offsets);
  free(sh->ids);
  memset(sh, 0, sizeof *sh);
}

/* ---- inputs --------------------------------------------------------------------------------- */

/* Keeps the first max_tokens tokens of every sequence (in place). */
static void truncate_sequences(itr_token_set *ts, int max_tokens) {
  int64_t w = 0;
  for (int s = 0; s < ts->n_seqs; s++) {
    int64_t b = ts->offsets[s], len = ts->offsets[s + 1] - b;
    if (len > max_tokens) len = max_tokens;
    memmove(ts->ids + w, ts->ids + b, (size_t)len * sizeof(int32_t));
    ts->offsets[s] = w;
    w += len;
  }
  ts->offsets[ts->n_seqs] = w;
  ts->n_tokens = w;
}

static itr_err open_inputs(merge_ctx *c) {
  const itr_options *o = c->opt;
  char path[ITR_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/config.json", o->base);
  ITR_TRY(itr_model_config_read(path, &c->cfg));
  for (int i = 0; i < c->N; i++) ITR_TRY(itr_adapter_open(o->adapters[i], &c->cfg, &c->ad[i]));
  for (int i = 0; i < o->n_calib; i++) {
    ITR_TRY(itr_token_set_read(o->calib[i], c->cfg.vocab_size, &c->calib[i]));
    if (o->max_tokens > 0) truncate_sequences(&c->calib[i], o->max_tokens);
  }
  for (int i = 0; i < o->n_heldout; i++)
    ITR_TRY(itr_token_set_read(o->heldout[i], c->cfg.vocab_size, &c->heldout[i]));
  for (int i = 1; i < c->N; i++)
    if (strcmp(c->ad[i]->base_model, c->ad[0]->base_model) != 0)
      itr_log(ITR_LOG_WARN, "adapters name different base models: '%s' (%s) and '%s' (%s); shapes match -base, going on",
              c->ad[0]->base_model, o->adapters[0], c->ad[i]->base_model, o->adapters[i]);
  c->module_mask = 0;
  for (int i = 0; i < c->N; i++) c->module_mask |= c->ad[i]->target_mask;
  return ITR_OK;
}

static itr_err check_out_dir(const itr_options *o) {
  struct stat sb;
  char path[ITR_PATH_MAX + 64];
  if (stat(o->out, &sb) == 0) {
    snprintf(path, sizeof path, "%s/merge_report.json", o->out);
    ITR_CHECK(access(path, F_OK) == 0, ITR_ERR_INPUT,
              "-out '%s' exists and is not an iteris-mpi output (no merge_report.json): choose another -out "
              "or remove it",
              o->out);
  }
  return ITR_OK;
}

/* ---- capture of the inputs of the target modules ---------------------------------------------- */

typedef struct {
  float **buf; /* [ITR_SITE_COUNT] (T, d_in) f32 */
  const int64_t *d_in;
  int64_t row0;  /* row of buf where the captured block starts */
  double *ynorm; /* [ITR_MODULE_COUNT]: ||X W^T||^2 of each module added up, or NULL */
} capture_ctx;

static itr_err capture_copy(int layer, itr_site site, const float *rows, int64_t T, int64_t d_in, void *ctx) {
  (void)layer;
  capture_ctx *cc = ctx;
  ITR_CHECK(d_in == cc->d_in[site], ITR_ERR_INTERNAL, "capture: site %d has %lld inputs, expected %lld", (int)site,
            (long long)d_in, (long long)cc->d_in[site]);
  if (cc->buf[site]) memcpy(cc->buf[site] + cc->row0 * d_in, rows, (size_t)T * (size_t)d_in * sizeof(float));
  return ITR_OK;
}

static void capture_norm(int layer, itr_module m, double sumsq, void *ctx) {
  (void)layer;
  capture_ctx *cc = ctx;
  cc->ynorm[m] += sumsq;
}

static int64_t site_d_in(const itr_model_config *cfg, itr_site s) {
  static const itr_module first[ITR_SITE_COUNT] = {ITR_Q_PROJ, ITR_O_PROJ, ITR_GATE_PROJ, ITR_DOWN_PROJ};
  int64_t d_out, d_in;
  itr_module_shape(cfg, first[s], &d_out, &d_in);
  return d_in;
}

/* ---- the layer loop ---------------------------------------------------------------------------- */

static itr_err alloc_site_buffers(merge_ctx *c) {
  for (int i = 0; i < c->N; i++)
    for (int s = 0; s < ITR_SITE_COUNT; s++) {
      size_t n = (size_t)c->calib_sh[i].T * (size_t)c->site_d[s];
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
  itr_err e = itr_model_load(&c->cfg, c->store, l, l + 1, 0, 0, &c->layer);
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
    capture_ctx cx = {capture, c->site_d, r0, ynorm};
    ITR_TRY(itr_model_run_layers_ex(c->layer, l, l + 1, h + r0 * D, T, NULL, lora, capture ? capture_copy : NULL,
                                    ynorm ? capture_norm : NULL, &cx));
  }
  return ITR_OK;
}

itr_err merge_forward_layer(merge_ctx *c, int k, int l) {
  ITR_TRY(load_layer(c, l));
  for (int i = 0; i < c->N; i++) {
    const itr_shard *sh = &c->calib_sh[i];
    /* iteration 1: the source model's outputs give the denominators of the adaptive weights */
    const int norms = k == 1 && c->method == METHOD_ITERIS;
    memset(c->ynorm[i], 0, sizeof c->ynorm[i]);
    ITR_TRY(run_sequences(c, sh, c->h_src[i], c->lora_task[i], c->X[i], norms ? c->ynorm[i] : NULL));
    if (k >= 2) ITR_TRY(run_sequences(c, sh, c->h_mrg[i], c->lora_merged, c->Xt[i], NULL));
  }
  return ITR_OK;
}

itr_err merge_rebuild_lora(merge_ctx *c) {
  itr_lora_set_clear(c->lora_merged);
  const int L = c->cfg.num_hidden_layers;
  for (int l = 0; l < L; l++)
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
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
        ITR_TRY_GOTO(itr_lora_set_add(c->lora_merged, l, (itr_module)m, (int)u->rank, 1.0f, a, b), e, fail);
      } else {
        ITR_TRY_GOTO(itr_calloc(nD, sizeof(float), "merged dW f32", &a), e, fail);
        for (size_t q = 0; q < nD; q++) a[q] = (float)u->dense[q];
        ITR_TRY_GOTO(itr_lora_set_set_dense(c->lora_merged, l, (itr_module)m, a, 1.0f, 1), e, fail);
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
static itr_err forward_prefix(merge_ctx *c, int k, int l0) {
  for (int l = 0; l < l0; l++) {
    ITR_TRY(load_layer(c, l));
    for (int i = 0; i < c->N; i++) {
      ITR_TRY(run_sequences(c, &c->calib_sh[i], c->h_src[i], c->lora_task[i], NULL, NULL));
      if (k >= 2) ITR_TRY(run_sequences(c, &c->calib_sh[i], c->h_mrg[i], c->lora_merged, NULL, NULL));
    }
  }
  return ITR_OK;
}

int merge_stop_agree(merge_ctx *c, int k, int l) {
  int sig = itr_cli_stop_agree(c->comm);
  /* fault injection for the restart tests: ITERIS_FAULT_STOP_AT="k l" acts as a signal there */
  const char *at = getenv("ITERIS_FAULT_STOP_AT");
  int fk, fl;
  if (!sig && at && sscanf(at, "%d %d", &fk, &fl) == 2 && fk == k && fl == l) sig = 15;
  return sig;
}

void merge_progress(merge_ctx *c, int k, int l, double t_layer, double max_resid, int n_failed, int done, int total,
                    double t0) {
  const int K = c->method == METHOD_ITERIS ? c->opt->max_iter : 1, L = c->cfg.num_hidden_layers;
  const double el = itr_wtime() - t0, eta = el / done * (total - done);
  char stage[48] = "";
  if (c->n_stages > 1) snprintf(stage, sizeof stage, "stage %d/%d ", c->stage + 1, c->n_stages);
  /* with -stages, each stage's first rank reports its own layers */
  const int speak = c->n_stages > 1 && c->rank == 0 && c->wrank != 0;
  if (speak) itr_log_set_quiet(0);
  itr_log(ITR_LOG_INFO, "%siter %d/%d layer %d/%d: %.2f s, max scaled residual %.3g %s, elapsed %.1f s, ETA %.1f s",
          stage, k, K, l + 1, L, t_layer, max_resid, n_failed ? "FAILED" : "PASSED", el, eta);
  if (speak) itr_log_set_quiet(1);
}

/* At a layer boundary: when any rank got SIGTERM/SIGINT/SIGUSR1, save the state (resume at
 * iteration k, layer l) and stop every rank with ITR_ERR_INTERRUPTED. */
static itr_err maybe_stop(merge_ctx *c, int k, int l) {
  int sig = merge_stop_agree(c, k, l);
  if (!sig) return ITR_OK;
  ITR_TRY(itr_dist_agree(c->comm, c->rank == 0 ? checkpoint_write(c, k, l) : ITR_OK));
  return itr_error_set(ITR_ERR_INTERRUPTED,
                       "stopped by signal %d after layer %d/%d of iteration %d; the checkpoint is in %s.partial/: "
                       "rerun the same command with -restart 1 to continue",
                       sig, l, c->cfg.num_hidden_layers, l == 0 ? k - 1 : k, c->opt->out);
}

static itr_err run_iterations(merge_ctx *c) {
  const int L = c->cfg.num_hidden_layers, K = c->method == METHOD_ITERIS ? c->opt->max_iter : 1;
  const double t0 = itr_wtime();
  const int total = (K - c->start_iter + 1) * L - c->start_layer;
  int done = 0;
  for (int k = c->start_iter; k <= K; k++) {
    const int l0 = k == c->start_iter ? c->start_layer : 0;
    itr_err e = merge_embed_all(c, c->h_src);
    if (e == ITR_OK && k >= 2) e = merge_embed_all(c, c->h_mrg);
    if (e == ITR_OK) e = forward_prefix(c, k, l0);
    ITR_TRY(itr_dist_agree(c->comm, e));
    for (int l = l0; l < L; l++) {
      double tl = itr_wtime(), max_resid = 0;
      int n_failed = 0;
      PetscLogStagePush(c->stage_forward);
      e = merge_forward_layer(c, k, l);
      PetscLogStagePop();
      ITR_TRY(itr_dist_agree(c->comm, e));
      e = merge_solve_layer(c, k, l, &max_resid, &n_failed);
      ITR_TRY(e);
      done++;
      merge_progress(c, k, l, itr_wtime() - tl, max_resid, n_failed, done, total, t0);
      c->n_residual_failed += n_failed;
      if (l + 1 < L) ITR_TRY(maybe_stop(c, k, l + 1));
    }
    /* the new updates become the merged model of the next iteration */
    for (size_t q = 0; q < (size_t)L * ITR_MODULE_COUNT; q++) {
      itr_update_fini(&c->cur[q]);
      c->cur[q] = c->next[q];
      memset(&c->next[q], 0, sizeof c->next[q]);
    }
    ITR_TRY(itr_dist_agree(c->comm, merge_rebuild_lora(c)));
    c->iters_done = k;
    if (k < K && c->method == METHOD_ITERIS) {
      ITR_TRY(itr_dist_agree(c->comm, c->rank == 0 ? checkpoint_write(c, k + 1, 0) : ITR_OK));
      ITR_TRY(maybe_stop(c, k + 1, 0));
    }
  }
  return ITR_OK;
}

/* ---- baselines without statistics ------------------------------------------------------------ */

/* One module of a data-free method: task arithmetic and KnOTS give factors, TIES and DARE a
 * dense update (written through -out_rank). Every rank computes every module (deterministic). */
static itr_err data_free_module(merge_ctx *c, int l, itr_module m, itr_update *out) {
  const itr_options *o = c->opt;
  const int N = c->N;
  int64_t d_out, d_in;
  itr_module_shape(&c->cfg, m, &d_out, &d_in);
  itr_merge_task tasks[ITR_MAX_TASKS];
  double *A[ITR_MAX_TASKS] = {0}, *B[ITR_MAX_TASKS] = {0}, *dW[ITR_MAX_TASKS] = {0}, w[ITR_MAX_TASKS];
  memset(tasks, 0, sizeof tasks);
  int R = 0;
  itr_err e = ITR_OK;
  for (int i = 0; i < N && e == ITR_OK; i++) {
    e = merge_task_factors(c->ad[i], l, m, d_out, d_in, &tasks[i], &A[i], &B[i]);
    tasks[i].weight = w[i] = o->manual_coef[i];
    R += tasks[i].r;
  }
  if (e != ITR_OK || R == 0) goto done;
  if (c->method == METHOD_TA) {
    e = itr_baseline_task_arithmetic(N, tasks, d_out, d_in, o->ta_lambda, out);
  } else if (c->method == METHOD_KNOTS) {
    e = itr_baseline_knots(N, tasks, d_out, d_in, 1, o->density, o->ta_lambda, out); /* KnOTS-TIES */
  } else { /* ties, dare: on the dense updates */
    const size_t n = (size_t)d_out * (size_t)d_in;
    char label[96];
    snprintf(label, sizeof label, "layers.%d.%s.%s", l, itr_module_block(m), itr_module_name(m));
    for (int i = 0; i < N && e == ITR_OK; i++) {
      e = itr_calloc(n, sizeof(double), "dense task update", &dW[i]);
      if (e == ITR_OK && tasks[i].r > 0) itr_lora_dense(d_out, d_in, tasks[i].r, tasks[i].scale, B[i], A[i], dW[i]);
    }
    memset(out, 0, sizeof *out);
    out->d_out = d_out, out->d_in = d_in, out->energy_kept = 1;
    if (e == ITR_OK) e = itr_calloc(n, sizeof(double), "merged dense update", &out->dense);
    if (e == ITR_OK && c->method == METHOD_TIES)
      e = itr_baseline_ties(N, (int64_t)n, (const double *const *)dW, w, o->density, o->ta_lambda, out->dense);
    else if (e == ITR_OK)
      e = itr_baseline_dare(N, (int64_t)n, (const double *const *)dW, w, o->dare_p, o->dare_ties, o->density,
                            o->ta_lambda, (uint64_t)o->seed, itr_hash64(label), out->dense);
  }
done:
  for (int i = 0; i < N; i++) {
    free(A[i]);
    free(B[i]);
    free(dW[i]);
  }
  return e;
}

static itr_err run_data_free(merge_ctx *c) {
  const int L = c->cfg.num_hidden_layers;
  itr_err e = ITR_OK;
  for (int l = 0; l < L && e == ITR_OK; l++) {
    for (int m = 0; m < ITR_MODULE_COUNT && e == ITR_OK; m++)
      if (c->module_mask & (1u << m)) e = data_free_module(c, l, (itr_module)m, &c->cur[SLOT(l, m)]);
    if (e == ITR_OK) itr_log(ITR_LOG_INFO, "%s: layer %d/%d done", c->opt->method, l + 1, L);
  }
  ITR_TRY(itr_dist_agree(c->comm, e));
  ITR_TRY(itr_dist_agree(c->comm, merge_rebuild_lora(c)));
  c->iters_done = 1;
  return ITR_OK;
}

/* ---- evaluation -------------------------------------------------------------------------------- */

itr_err merge_eval_alloc(merge_ctx *c, itr_shard *sh, float *(*h)[3]) {
  const int64_t D = c->cfg.hidden_size;
  for (int i = 0; i < c->N; i++) {
    ITR_TRY(shard_make(&c->heldout[i], c->rank, c->size, &sh[i]));
    for (int v = 0; v < 3; v++) {
      ITR_TRY(itr_calloc((size_t)(sh[i].T ? sh[i].T : 1) * (size_t)D, sizeof(float), "held-out hidden states", &h[i][v]));
      if (c->stage == 0 && sh[i].T > 0) ITR_TRY(itr_model_embed(c->model, sh[i].ids, sh[i].T, h[i][v]));
    }
  }
  return ITR_OK;
}

itr_err merge_eval_layer(merge_ctx *c, int l, const itr_shard *sh, float *(*h)[3]) {
  ITR_TRY(load_layer(c, l));
  for (int i = 0; i < c->N; i++) {
    ITR_TRY(run_sequences(c, &sh[i], h[i][0], NULL, NULL, NULL));
    ITR_TRY(run_sequences(c, &sh[i], h[i][1], c->lora_task[i], NULL, NULL));
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
static itr_err evaluate(merge_ctx *c) {
  itr_shard sh[ITR_MAX_TASKS];
  float *h[ITR_MAX_TASKS][3];
  memset(sh, 0, sizeof sh);
  memset(h, 0, sizeof h);
  itr_err e = merge_eval_alloc(c, sh, h);
  for (int l = 0; l < c->cfg.num_hidden_layers && e == ITR_OK; l++) e = merge_eval_layer(c, l, sh, h);
  e = itr_dist_agree(c->world, e);
  if (e == ITR_OK) e = merge_eval_finish(c, e, 1, sh, h);
  merge_eval_free(c, sh, h);
  return e;
}

/* ---- output ------------------------------------------------------------------------------------ */

static itr_err write_adapter(merge_ctx *c, const char *dir) {
  itr_dtype dt = ITR_F32;
  (void)itr_dtype_parse(c->opt->out_dtype, &dt);
  itr_adapter_writer *w = NULL;
  ITR_TRY(itr_adapter_writer_create(&c->cfg, c->ad[0]->base_model[0] ? c->ad[0]->base_model : c->opt->base, dt, &w));
  itr_err e = ITR_OK;
  const int L = c->cfg.num_hidden_layers;
  for (int l = 0; l < L && e == ITR_OK; l++)
    for (int m = 0; m < ITR_MODULE_COUNT && e == ITR_OK; m++) {
      const itr_update *u = &c->cur[SLOT(l, m)];
      if (!u->A && !u->dense) continue;
      itr_update t = {0};
      const itr_update *use = u;
      if (c->opt->out_rank > 0 && (u->rank == 0 || u->rank > c->opt->out_rank)) {
        e = itr_update_truncate(u, c->opt->out_rank, &t);
        use = &t;
        c->energy_kept_min = fmin(c->energy_kept_min, t.energy_kept);
        c->energy_kept[SLOT(l, m)] = t.energy_kept;
      }
      if (e == ITR_OK) e = itr_adapter_writer_add_f64(w, l, (itr_module)m, (int)use->rank, use->A, use->B);
      itr_update_fini(&t);
    }
  if (e == ITR_OK) e = itr_adapter_writer_write(w, dir);
  itr_adapter_writer_destroy(w);
  return e;
}

static itr_err write_outputs(merge_ctx *c) {
  const itr_options *o = c->opt;
  char partial[ITR_PATH_MAX + 16], old[ITR_PATH_MAX + 32];
  snprintf(partial, sizeof partial, "%s.partial", o->out);
  snprintf(old, sizeof old, "%s.old.%ld", o->out, (long)getpid());
  ITR_TRY(itr_iofile_mkdirs(partial));
  /* each file is written atomically; OUT appears only when all are there */
  ITR_TRY(write_adapter(c, partial));
  ITR_TRY(merge_report_write(c, partial));
  ITR_TRY(stats_write(c, partial));
  checkpoint_remove(c, partial);
  int had_old = access(o->out, F_OK) == 0;
  if (had_old) ITR_CHECK(rename(o->out, old) == 0, ITR_ERR_INTERNAL, "cannot move the old '%s' aside: %s", o->out, strerror(errno));
  ITR_CHECK(rename(partial, o->out) == 0, ITR_ERR_INTERNAL, "cannot rename '%s' to '%s': %s", partial, o->out,
            strerror(errno));
  if (had_old) ITR_TRY(itr_iofile_remove_tree(old));
  return ITR_OK;
}

/* ---- entry ------------------------------------------------------------------------------------- */

static void ctx_fini(merge_ctx *c) {
  const size_t nslots = (size_t)c->cfg.num_hidden_layers * ITR_MODULE_COUNT;
  if (c->cur)
    for (size_t q = 0; q < nslots; q++) itr_update_fini(&c->cur[q]);
  if (c->next)
    for (size_t q = 0; q < nslots; q++) itr_update_fini(&c->next[q]);
  free(c->cur);
  free(c->next);
  free(c->coef);
  free(c->resid);
  free(c->energy_kept);
  for (int i = 0; i < ITR_MAX_TASKS; i++) {
    itr_adapter_destroy(c->ad[i]);
    itr_token_set_fini(&c->calib[i]);
    itr_token_set_fini(&c->heldout[i]);
    shard_fini(&c->calib_sh[i]);
    itr_lora_set_destroy(c->lora_task[i]);
    free(c->h_src[i]);
    free(c->h_mrg[i]);
    for (int s = 0; s < ITR_SITE_COUNT; s++) {
      free(c->X[i][s]);
      free(c->Xt[i][s]);
    }
  }
  itr_lora_set_destroy(c->lora_merged);
  itr_model_destroy(c->model);
  itr_model_destroy(c->layer);
  itr_tensor_store_destroy(c->store);
  itr_dist_grid_destroy(c->group_grid);
  itr_dist_grid_destroy(c->grid);
  merge_stages_fini(c);
}

static itr_err setup(merge_ctx *c) {
  const itr_options *o = c->opt;
  /* validate on rank 0 first, so that an input error is reported once, then everywhere */
  itr_err e = c->wrank == 0 ? open_inputs(c) : ITR_OK;
  if (e == ITR_OK && c->wrank == 0) e = check_out_dir(o);
  ITR_TRY(itr_dist_agree(c->world, e));
  ITR_TRY(itr_dist_agree(c->world, c->wrank != 0 ? open_inputs(c) : ITR_OK));
  ITR_TRY(merge_stages_setup(c));

  PetscLogStagePush(c->stage_load);
  e = itr_tensor_store_open(o->base, &c->store);
  /* the embedding feeds the first stage; the head gives the last stage the held-out logits */
  const int last = c->stage == c->n_stages - 1;
  if (e == ITR_OK && (c->stage == 0 || (last && o->n_heldout > 0)))
    e = itr_model_load(&c->cfg, c->store, 0, 0, 1, last && o->n_heldout > 0, &c->model);
  PetscLogStagePop();
  ITR_TRY(itr_dist_agree(c->world, e));

  const int L = c->cfg.num_hidden_layers, N = c->N;
  const size_t nslots = (size_t)L * ITR_MODULE_COUNT;
  const int K = c->method == METHOD_ITERIS ? o->max_iter : 1;
  e = itr_calloc(nslots, sizeof(itr_update), "updates", &c->cur);
  if (e == ITR_OK) e = itr_calloc(nslots, sizeof(itr_update), "updates", &c->next);
  if (e == ITR_OK) e = itr_calloc(nslots * (size_t)N, sizeof(double), "adaptive weights", &c->coef);
  if (e == ITR_OK) e = itr_calloc(nslots * (size_t)K, sizeof(double), "residuals", &c->resid);
  if (e == ITR_OK) e = itr_calloc(nslots, sizeof(double), "kept energy", &c->energy_kept);
  for (size_t q = 0; e == ITR_OK && q < nslots; q++) c->energy_kept[q] = 1.0;
  for (int s = 0; s < ITR_SITE_COUNT; s++) c->site_d[s] = site_d_in(&c->cfg, (itr_site)s);
  if (e == ITR_OK) e = itr_lora_set_create(&c->cfg, &c->lora_merged);
  for (int i = 0; i < N && e == ITR_OK; i++) {
    e = itr_lora_set_create(&c->cfg, &c->lora_task[i]);
    if (e == ITR_OK) e = itr_lora_set_add_adapter(c->lora_task[i], c->ad[i], 0, L, 1.0);
  }
  if (c->method == METHOD_ITERIS || c->method == METHOD_REGMEAN) {
    /* the calibration sequences are shared out over the ranks of this rank's stage */
    for (int i = 0; i < N && e == ITR_OK; i++) {
      e = shard_make(&c->calib[i], c->rank, c->size, &c->calib_sh[i]);
      size_t n = (size_t)(c->calib_sh[i].T ? c->calib_sh[i].T : 1) * (size_t)c->cfg.hidden_size;
      if (e == ITR_OK) e = itr_calloc(n, sizeof(float), "hidden states", &c->h_src[i]);
      if (e == ITR_OK) e = itr_calloc(n, sizeof(float), "hidden states", &c->h_mrg[i]);
    }
    if (e == ITR_OK) e = alloc_site_buffers(c);
  }
  ITR_TRY(itr_dist_agree(c->world, e));
  ITR_TRY(itr_dist_agree(c->world, itr_dist_grid_create(c->comm, 0, &c->grid)));
  c->n_groups = o->solve_groups < c->size ? o->solve_groups : c->size;
  if (c->n_groups > 1) {
    for (int g = 0; g < c->n_groups; g++) c->group_root[g] = itr_dist_group_first(g, c->n_groups, c->size);
    ITR_TRY(itr_dist_agree(c->world, itr_dist_grid_split(c->grid, c->n_groups, &c->group_grid, &c->group)));
  }

  char partial[ITR_PATH_MAX + 16];
  snprintf(partial, sizeof partial, "%s.partial", o->out);
  if (o->restart) {
    int found = 0;
    if (c->st)
      ITR_TRY(merge_stages_restart(c, &found));
    else
      ITR_TRY(itr_dist_agree(c->world, checkpoint_read(c, &found)));
    if (found) {
      itr_log(ITR_LOG_INFO, "-restart: resuming at iteration %d, layer %d from %s/", c->start_iter, c->start_layer + 1,
              partial);
      ITR_TRY(itr_dist_agree(c->world, merge_rebuild_lora(c)));
    } else {
      itr_log(ITR_LOG_WARN, "-restart: no checkpoint in %s/: starting from the beginning", partial);
    }
  } else {
    ITR_TRY(itr_dist_agree(c->world, c->wrank == 0 ? itr_iofile_remove_tree(partial) : ITR_OK));
  }
  return ITR_OK;
}

itr_err itr_cli_merge(const itr_options *opt, MPI_Comm comm) {
  merge_ctx *c = NULL;
  ITR_TRY(itr_dist_agree(comm, itr_calloc(1, sizeof *c, "merge context", &c)));
  c->opt = opt;
  c->world = c->comm = comm;
  MPI_Comm_rank(comm, &c->wrank);
  MPI_Comm_size(comm, &c->wsize);
  c->rank = c->wrank;
  c->size = c->wsize;
  c->n_stages = 1;
  c->N = opt->n_adapters;
  c->start_iter = 1;
  c->layer_index = -1;
  c->energy_kept_min = 1.0;
  c->method = !strcmp(opt->method, "iteris") ? METHOD_ITERIS
              : !strcmp(opt->method, "regmean") ? METHOD_REGMEAN
              : !strcmp(opt->method, "task_arithmetic") ? METHOD_TA
              : !strcmp(opt->method, "ties") ? METHOD_TIES
              : !strcmp(opt->method, "dare") ? METHOD_DARE
                                               : METHOD_KNOTS;
  PetscLogStageRegister("load", &c->stage_load);
  PetscLogStageRegister("forward", &c->stage_forward);
  PetscLogStageRegister("statistics", &c->stage_stats);
  PetscLogStageRegister("reduce", &c->stage_reduce);
  PetscLogStageRegister("assemble", &c->stage_assemble);
  PetscLogStageRegister("solve", &c->stage_solve);
  PetscLogStageRegister("write", &c->stage_write);
  PetscLogStageRegister("evaluate", &c->stage_eval);
  double t0 = itr_wtime();
  itr_err e = setup(c);
  if (e == ITR_OK) {
    itr_log(ITR_LOG_INFO, "merging %d adapters of %s (%d layers, D = %d) with %s on %d rank(s)", c->N, opt->base,
            c->cfg.num_hidden_layers, c->cfg.hidden_size, opt->method, c->wsize);
    e = c->st ? merge_stages_run(c)
        : c->method == METHOD_ITERIS || c->method == METHOD_REGMEAN ? run_iterations(c)
                                                                  : run_data_free(c);
  }
  c->seconds_merge = itr_wtime() - t0;
  if (e == ITR_OK && opt->n_heldout > 0 && !c->evaluated) {
    PetscLogStagePush(c->stage_eval);
    e = evaluate(c);
    PetscLogStagePop();
  }
  if (e == ITR_OK) {
    PetscLogStagePush(c->stage_write);
    e = itr_dist_agree(comm, c->wrank == 0 ? write_outputs(c) : ITR_OK);
    PetscLogStagePop();
  }
  if (e == ITR_OK && c->wrank == 0) merge_report_print(c, stdout);
  if (e == ITR_OK && c->n_residual_failed > 0)
    itr_log(ITR_LOG_WARN, "%d solve(s) had a scaled residual above the threshold: see merge_report.json", c->n_residual_failed);
  ctx_fini(c);
  free(c);
  return e;
}
