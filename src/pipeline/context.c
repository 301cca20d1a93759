/* What both drivers share about a run in progress: the agreed stop (signal or fault injection) and
 * the progress line with its ETA. */
#include <petscsys.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"

void merge_log_register(merge_ctx *c) {
  PetscClassId cid;
  PetscLogStageRegister("load", &c->stage_load);
  PetscLogStageRegister("forward", &c->stage_forward);
  PetscLogStageRegister("statistics", &c->stage_stats);
  PetscLogStageRegister("reduce", &c->stage_reduce);
  PetscLogStageRegister("assemble", &c->stage_assemble);
  PetscLogStageRegister("solve", &c->stage_solve);
  PetscLogStageRegister("write", &c->stage_write);
  PetscLogStageRegister("evaluate", &c->stage_eval);
  PetscClassIdRegister("IterIS", &cid);
  PetscLogEventRegister("ItrForward", cid, &c->ev_forward);   /* f32 forward of one layer, one sequence */
  PetscLogEventRegister("ItrGram", cid, &c->ev_gram);         /* rows in, Gram (pdsyrk) and its norms */
  PetscLogEventRegister("ItrAssemble", cid, &c->ev_assemble); /* right-hand side terms and T2 += ... */
  PetscLogEventRegister("ItrSolve", cid, &c->ev_solve);       /* Cholesky, solves and residual */
  PetscLogEventRegister("ItrRows", cid, &c->ev_rows);         /* inside ItrGram: rows into the block-cyclic layout */
  PetscLogEventRegister("ItrWeights", cid, &c->ev_weights);   /* numerators of the adaptive weights */
}

double merge_forward_flops(const merge_ctx *c, int64_t T) {
  double f = 0.0;
  for (int m = 0; m < c->arch.n_modules; m++)
    f += 2.0 * (double)T * (double)c->arch.module[m].d_out * (double)c->arch.module[m].d_in;
  return f + 4.0 * (double)T * (double)T * (double)c->cfg.hidden_size;
}

int merge_n_iters(const merge_ctx *c) { return (c->method->flags & ITR_METHOD_ITERATES) ? c->opt->max_iter : 1; }

int merge_fidelity_per_iter(const merge_ctx *c) {
  return c->opt->fidelity_per_iter && c->opt->n_heldout > 0 && merge_n_iters(c) >= 2 && !c->st;
}

int merge_stop_agree(merge_ctx *c, int k, int l) {
  int sig = itr_signals_agree(c->comm);
  /* fault injection for the restart tests: ITERIS_FAULT_STOP_AT="k l" acts as a signal there */
  const char *at = getenv("ITERIS_FAULT_STOP_AT");
  int fk, fl;
  if (!sig && at && sscanf(at, "%d %d", &fk, &fl) == 2 && fk == k && fl == l) sig = 15;
  return sig;
}

void merge_progress(merge_ctx *c, int k, int l, double t_layer, double max_resid, int done, int total,
                    double t0) {
  const int K = merge_n_iters(c), L = c->cfg.num_hidden_layers;
  const double el = itr_wtime() - t0, eta = el / done * (total - done);
  char stage[48] = "";
  if (c->n_stages > 1) snprintf(stage, sizeof stage, "stage %d/%d ", c->stage + 1, c->n_stages);
  /* with -stages, each stage's first rank reports its own layers */
  const int speak = c->n_stages > 1 && c->rank == 0 && c->wrank != 0;
  if (speak) itr_log_set_quiet(0);
  itr_log(ITR_LOG_INFO, "%siter %d/%d layer %d/%d: %.2f s, max scaled residual %.3g %s, elapsed %.1f s, ETA %.1f s",
          stage, k, K, l + 1, L, t_layer, max_resid, "PASSED", el, eta);
  if (speak) itr_log_set_quiet(1);
}


itr_err merge_commit_update(merge_ctx *c, int k, size_t q) {
  double rel = NAN;
  itr_err e = k >= 2 ? itr_update_change(&c->next[q], &c->cur[q], &rel) : ITR_OK;
  c->change[(size_t)(k - 1) * NSLOTS(c) + q] = rel;
  itr_update_fini(&c->cur[q]);
  c->cur[q] = c->next[q];
  memset(&c->next[q], 0, sizeof c->next[q]);
  return e;
}
