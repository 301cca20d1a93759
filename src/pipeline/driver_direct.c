/* The direct driver: methods that need no calibration data (task arithmetic, TIES, DARE, KnOTS),
 * one module at a time from the adapters' factors, on every rank (deterministic). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"

/* ---- baselines without statistics ------------------------------------------------------------ */

/* One module of a data-free method: task arithmetic and KnOTS give factors, TIES and DARE a
 * dense update (written through -out_rank). Every rank computes every module (deterministic). */
static itr_err data_free_module(merge_ctx *c, int l, int q, itr_update *out) {
  const itr_module m = c->arch.module[q].id;
  const itr_merge_opts *o = c->opt;
  const int N = c->N;
  int64_t d_out, d_in;
  d_out = c->arch.module[q].d_out, d_in = c->arch.module[q].d_in;
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
  if (c->method->id == ITR_METHOD_TASK_ARITHMETIC) {
    e = itr_baseline_task_arithmetic(N, tasks, d_out, d_in, o->ta_lambda, out);
  } else if (c->method->id == ITR_METHOD_KNOTS) {
    e = itr_baseline_knots(N, tasks, d_out, d_in, 1, o->density, o->ta_lambda, out); /* KnOTS-TIES */
  } else { /* ties, dare: on the dense updates */
    const size_t n = (size_t)d_out * (size_t)d_in;
    char label[96];
    snprintf(label, sizeof label, "layers.%d.%s.%s", l, c->arch.module[q].block, c->arch.module[q].name);
    for (int i = 0; i < N && e == ITR_OK; i++) {
      e = itr_calloc(n, sizeof(double), "dense task update", &dW[i]);
      if (e == ITR_OK && tasks[i].r > 0) itr_lora_dense(d_out, d_in, tasks[i].r, tasks[i].scale, B[i], A[i], dW[i]);
    }
    memset(out, 0, sizeof *out);
    out->d_out = d_out, out->d_in = d_in, out->energy_kept = 1;
    if (e == ITR_OK) e = itr_calloc(n, sizeof(double), "merged dense update", &out->dense);
    if (e == ITR_OK && c->method->id == ITR_METHOD_TIES)
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

itr_err merge_run_direct(merge_ctx *c) {
  const int L = c->cfg.num_hidden_layers;
  itr_err e = ITR_OK;
  for (int l = 0; l < L && e == ITR_OK; l++) {
    for (int m = 0; m < c->arch.n_modules && e == ITR_OK; m++)
      if (TARGETED(c, m)) e = data_free_module(c, l, m, &c->cur[SLOT(l, m)]);
    if (e == ITR_OK) itr_log(ITR_LOG_INFO, "%s: layer %d/%d done", c->opt->method, l + 1, L);
  }
  ITR_TRY(itr_dist_agree(c->comm, e));
  ITR_TRY(itr_dist_agree(c->comm, merge_rebuild_lora(c)));
  c->iters_done = 1;
  return ITR_OK;
}
