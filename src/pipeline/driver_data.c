/* The data-parallel driver: every rank of c->comm runs every layer on its share of the calibration
 * sequences; for k = 1..K, layer by layer: forward (capture), statistics, assembly and solves
 * (site.c), a checkpoint after each iteration and a stop agreed at every layer boundary. */
#include <petscsys.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"

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

itr_err merge_run_data_parallel(merge_ctx *c) {
  const int L = c->cfg.num_hidden_layers, K = merge_n_iters(c);
  const double t0 = itr_wtime();
  const int total = (K - c->start_iter + 1) * L - c->start_layer;
  int done = 0;
  for (int k = c->start_iter; k <= K; k++) {
    const int l0 = k == c->start_iter ? c->start_layer : 0;
    itr_err e = merge_embed_all(c, c->h_src);
    if (e == ITR_OK && k >= 2) e = merge_embed_all(c, c->h_mrg);
    if (e == ITR_OK) e = merge_forward_prefix(c, k, l0);
    ITR_TRY(itr_dist_agree(c->comm, e));
    for (int l = l0; l < L; l++) {
      double tl = itr_wtime(), max_resid = 0;
      PetscLogStagePush(c->stage_forward);
      e = merge_forward_layer(c, k, l);
      PetscLogStagePop();
      ITR_TRY(itr_dist_agree(c->comm, e));
      e = merge_solve_layer(c, k, l, &max_resid);
      ITR_TRY(e);
      done++;
      merge_progress(c, k, l, itr_wtime() - tl, max_resid, done, total, t0);
      if (l + 1 < L) ITR_TRY(maybe_stop(c, k, l + 1));
    }
    /* the new updates become the merged model of the next iteration */
    e = ITR_OK;
    for (size_t q = 0; q < NSLOTS(c) && e == ITR_OK; q++) e = merge_commit_update(c, k, q);
    ITR_TRY(itr_dist_agree(c->comm, e));
    ITR_TRY(itr_dist_agree(c->comm, merge_rebuild_lora(c)));
    c->iters_done = k;
    if (merge_fidelity_per_iter(c)) ITR_TRY(merge_evaluate_iter(c, k));
    if (k < K && (c->method->flags & ITR_METHOD_ITERATES)) {
      ITR_TRY(itr_dist_agree(c->comm, c->rank == 0 ? checkpoint_write(c, k + 1, 0) : ITR_OK));
      ITR_TRY(maybe_stop(c, k + 1, 0));
    }
  }
  return ITR_OK;
}
