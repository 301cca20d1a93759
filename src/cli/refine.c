/* -method M ... -refine_steps K: merge (or compose), then distil (docs/ALGORITHM.md, "Merge, then distil").
 * The merge writes OUT.merge/ (its own atomic commit); with -method mixlora the composition of it and the
 * task adapters' FFNs then writes OUT.compose/ and OUT.merge/ goes. The trainer refines that stage's adapter
 * (the merged LoRA or the composed MixLoRA) by KL(base + A_i || base + stage) on task i's calibration rows
 * (-train -distil) and writes OUT/; rank 0 moves the stage's report, statistics and plot into OUT/ and removes
 * the stage folder. A failed refinement leaves no OUT (and removes the stage folder unless the refinement was
 * stopped by a signal: -restart 1 then skips the finished merge or composition). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "iteris/dist.h"
#include "iteris/io.h"

static int is_dir(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Rank 0: the stage's files into OUT, then the stage folder removed. */
static itr_err move_stage_files(const char *stage, const char *out) {
  static const char *const files[] = {"merge_report.json", "stats.h5", "convergence.png", "compose_report.json"};
  char a[ITR_OPT_PATH + 64], b[ITR_OPT_PATH + 64];
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(a, sizeof a, "%s/%s", stage, files[i]);
    snprintf(b, sizeof b, "%s/%s", out, files[i]);
    struct stat st;
    if (stat(a, &st) != 0) continue;
    ITR_CHECK(rename(a, b) == 0, ITR_ERR_INTERNAL, "cannot move %s to %s: %s", a, b, strerror(errno));
  }
  return itr_iofile_remove_tree(stage);
}

/* The refinement's options, checked before the merge runs. Not Collective (the caller agrees). */
static itr_err check_refine(const itr_options *opt) {
  const itr_merge_opts *m = &opt->m;
  ITR_CHECK(m->n_calib == m->n_adapters, ITR_ERR_INPUT,
            "-refine_steps needs one -calib file per adapter (the distillation data)");
  ITR_CHECK(opt->refine_lr >= 0 && opt->refine_batch >= 1 && opt->refine_drop >= 0 && opt->refine_drop < 1 &&
                opt->refine_val >= 0 && opt->refine_val <= 0.5 && opt->refine_weight_decay >= 0,
            ITR_ERR_INPUT,
            "-refine_lr %g must be >= 0, -refine_batch %d >= 1, -refine_drop %g in [0, 1), -refine_val %g "
            "in [0, 0.5], -refine_weight_decay %g >= 0",
            opt->refine_lr, opt->refine_batch, opt->refine_drop, opt->refine_val, opt->refine_weight_decay);
  return ITR_OK;
}

/* stage = OUT + suffix, or an input error. */
static itr_err stage_path(const char *out, const char *suffix, char *stage, size_t len) {
  ITR_CHECK(snprintf(stage, len, "%s%s", out, suffix) < (int)len, ITR_ERR_INPUT, "-out %s: path too long", out);
  return ITR_OK;
}

/* -restart 1 and a finished stage folder (rank 0 looks): 1 to skip the stages before the refinement. Collective. */
static int stage_done(const itr_options *opt, const char *stage, MPI_Comm comm) {
  int rank, have = 0;
  MPI_Comm_rank(comm, &rank);
  if (rank == 0) have = opt->m.restart && is_dir(stage);
  MPI_Bcast(&have, 1, MPI_INT, 0, comm);
  if (have && rank == 0) itr_log(ITR_LOG_INFO, "-restart: %s is complete; continuing the refinement", stage);
  return have;
}

/* The trainer on the finished stage's adapter (a merged LoRA or a composed MixLoRA) into OUT, then the stage's
 * files moved into OUT (reused: -restart skipped the stages, the folder stays if the refinement fails).
 * Collective. */
static itr_err refine_stage(const itr_options *opt, const char *stage, int reused, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  const itr_merge_opts *m = &opt->m;
  itr_train_opts *t = NULL;
  ITR_TRY(itr_dist_agree(comm, itr_calloc(1, sizeof *t, "refinement options", &t)));
  itr_train_opts_defaults(t);
  snprintf(t->base, sizeof t->base, "%s", m->base);
  snprintf(t->init_adapter, sizeof t->init_adapter, "%s", stage);
  snprintf(t->out, sizeof t->out, "%s", m->out);
  t->n_teachers = t->n_teacher_data = m->n_adapters;
  for (int i = 0; i < m->n_adapters; i++) {
    snprintf(t->teachers[i], sizeof t->teachers[i], "%s", m->adapters[i]);
    snprintf(t->teacher_data[i], sizeof t->teacher_data[i], "%s", m->calib[i]);
  }
  t->steps = opt->refine_steps;
  t->lr = opt->refine_lr;
  t->batch = opt->refine_batch;
  t->warmup = opt->refine_steps / 20;
  t->weight_decay = opt->refine_weight_decay;
  t->val_fraction = opt->refine_val;
  t->distil_drop = opt->refine_drop;
  t->mixlora_aux_coef = 0; /* a composed MixLoRA: only the teachers' KL (no load balancing; results/mixlora.md) */
  t->train_only = opt->refine_only;
  t->seed = m->seed;
  t->restart = m->restart;
  t->log_every = opt->refine_steps / 10 > 0 ? opt->refine_steps / 10 : 1;
  t->verbose = m->verbose;
  const char *what = opt->mixlora ? "composition" : "merge";
  if (rank == 0)
    itr_log(ITR_LOG_INFO, "refining the %s: %d steps of KL(base + adapter i || base + %s) on -calib i, lr %g", what,
            t->steps, what, t->lr);
  itr_err err = itr_train_run(t, comm);
  if (rank == 0 && err == ITR_OK) err = move_stage_files(stage, m->out);
  else if (rank == 0 && err != ITR_ERR_INTERRUPTED && !reused) (void)itr_iofile_remove_tree(stage);
  free(t);
  return itr_dist_agree(comm, err);
}

/* -method mixlora: IterIS into OUT.merge/, composed into OUT/ (or, with -refine_steps, into OUT.compose/ and
 * refined into OUT/), OUT.merge/ removed. */
static itr_err merge_compose(const itr_options *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_merge_opts *mm = NULL, *mc = NULL;
  itr_err err = itr_calloc(1, sizeof *mm, "merge options", &mm);
  if (err == ITR_OK) err = itr_calloc(1, sizeof *mc, "compose options", &mc);
  if (err == ITR_OK && opt->refine_steps > 0) err = check_refine(opt);
  if (err == ITR_OK) {
    *mm = *mc = opt->m;
    err = stage_path(opt->m.out, ".merge", mm->out, sizeof mm->out);
  }
  if (err == ITR_OK && opt->refine_steps > 0) err = stage_path(opt->m.out, ".compose", mc->out, sizeof mc->out);
  err = itr_dist_agree(comm, err);
  int reused = err == ITR_OK && opt->refine_steps > 0 && stage_done(opt, mc->out, comm);
  if (err == ITR_OK && !reused) {
    mm->plots = 0;
    err = itr_pipeline_merge(mm, comm);
    if (err == ITR_OK) err = itr_pipeline_compose(mc, mm->out, comm);
    if (rank == 0) (void)itr_iofile_remove_tree(mm->out);
    err = itr_dist_agree(comm, err);
  }
  if (err == ITR_OK && opt->refine_steps > 0) err = refine_stage(opt, mc->out, reused, comm);
  free(mm);
  free(mc);
  return err;
}

itr_err itr_cli_merge(const itr_options *opt, MPI_Comm comm) {
  if (opt->mixlora) return merge_compose(opt, comm);
  if (opt->refine_steps <= 0) return itr_pipeline_merge(&opt->m, comm);
  itr_merge_opts *mm = NULL;
  itr_err err = itr_calloc(1, sizeof *mm, "merge options", &mm);
  if (err == ITR_OK) err = check_refine(opt);
  if (err == ITR_OK) {
    *mm = opt->m;
    err = stage_path(opt->m.out, ".merge", mm->out, sizeof mm->out);
  }
  err = itr_dist_agree(comm, err);
  int reused = err == ITR_OK && stage_done(opt, mm->out, comm);
  if (err == ITR_OK && !reused) err = itr_pipeline_merge(mm, comm);
  if (err == ITR_OK) err = refine_stage(opt, mm->out, reused, comm);
  free(mm);
  return err;
}
