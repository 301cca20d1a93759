/* -method M ... -refine_steps K: merge, then distil (docs/ALGORITHM.md, "Merge, then distil"). The merge
 * writes OUT.merge/ (its own atomic commit); the trainer then refines that adapter by KL(base + A_i ||
 * base + merged) on task i's calibration rows (-train -distil) and writes OUT/; rank 0 moves the merge's
 * report, statistics and plot into OUT/ and removes OUT.merge/. A failed refinement leaves no OUT (and
 * removes OUT.merge/ unless the refinement was stopped by a signal: -restart 1 then skips the finished merge). */
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

/* Rank 0: the merge's files into OUT, then OUT.merge removed. */
static itr_err move_merge_files(const char *merge_dir, const char *out) {
  static const char *const files[] = {"merge_report.json", "stats.h5", "convergence.png"};
  char a[ITR_OPT_PATH + 64], b[ITR_OPT_PATH + 64];
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(a, sizeof a, "%s/%s", merge_dir, files[i]);
    snprintf(b, sizeof b, "%s/%s", out, files[i]);
    struct stat st;
    if (stat(a, &st) != 0) continue;
    ITR_CHECK(rename(a, b) == 0, ITR_ERR_INTERNAL, "cannot move %s to %s: %s", a, b, strerror(errno));
  }
  return itr_iofile_remove_tree(merge_dir);
}

/* -method mixlora: IterIS into OUT.merge/, composed into OUT/, OUT.merge/ removed. */
static itr_err merge_compose(const itr_options *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_merge_opts *mm = NULL;
  ITR_TRY(itr_dist_agree(comm, itr_calloc(1, sizeof *mm, "merge options", &mm)));
  *mm = opt->m;
  itr_err err = ITR_OK;
  if (opt->refine_steps > 0) err = itr_error_set(ITR_ERR_INPUT, "-method mixlora does not combine with -refine_steps");
  else if (snprintf(mm->out, sizeof mm->out, "%s.merge", opt->m.out) >= (int)sizeof mm->out)
    err = itr_error_set(ITR_ERR_INPUT, "-out %s: path too long", opt->m.out);
  err = itr_dist_agree(comm, err);
  mm->plots = 0;
  if (err == ITR_OK) err = itr_pipeline_merge(mm, comm);
  if (err == ITR_OK) err = itr_pipeline_compose(&opt->m, mm->out, comm);
  if (rank == 0) (void)itr_iofile_remove_tree(mm->out);
  free(mm);
  return itr_dist_agree(comm, err);
}

itr_err itr_cli_merge(const itr_options *opt, MPI_Comm comm) {
  if (opt->mixlora) return merge_compose(opt, comm);
  if (opt->refine_steps <= 0) return itr_pipeline_merge(&opt->m, comm);
  int rank;
  MPI_Comm_rank(comm, &rank);
  const itr_merge_opts *m = &opt->m;
  itr_merge_opts *mm = NULL;
  itr_train_opts *t = NULL;
  itr_err err = itr_calloc(1, sizeof *mm, "merge options", &mm);
  if (err == ITR_OK) err = itr_calloc(1, sizeof *t, "refinement options", &t);
  if (err == ITR_OK && m->n_calib != m->n_adapters)
    err = itr_error_set(ITR_ERR_INPUT, "-refine_steps needs one -calib file per adapter (the distillation data)");
  /* the refinement's options are checked before the merge runs */
  if (err == ITR_OK && !(opt->refine_lr >= 0 && opt->refine_batch >= 1 && opt->refine_drop >= 0 && opt->refine_drop < 1 &&
                         opt->refine_val >= 0 && opt->refine_val <= 0.5 && opt->refine_weight_decay >= 0))
    err = itr_error_set(ITR_ERR_INPUT,
                        "-refine_lr %g must be >= 0, -refine_batch %d >= 1, -refine_drop %g in [0, 1), -refine_val %g "
                        "in [0, 0.5], -refine_weight_decay %g >= 0",
                        opt->refine_lr, opt->refine_batch, opt->refine_drop, opt->refine_val, opt->refine_weight_decay);
  ITR_TRY(itr_dist_agree(comm, err));
  *mm = *m;
  if (snprintf(mm->out, sizeof mm->out, "%s.merge", m->out) >= (int)sizeof mm->out) {
    free(mm);
    free(t);
    return itr_dist_agree(comm, itr_error_set(ITR_ERR_INPUT, "-out %s: path too long", m->out));
  }
  int have = 0;
  if (rank == 0) have = m->restart && is_dir(mm->out);
  MPI_Bcast(&have, 1, MPI_INT, 0, comm);
  if (have) {
    if (rank == 0) itr_log(ITR_LOG_INFO, "-restart: the merge in %s is complete; continuing the refinement", mm->out);
  } else {
    err = itr_pipeline_merge(mm, comm);
  }
  if (err == ITR_OK) {
    itr_train_opts_defaults(t);
    snprintf(t->base, sizeof t->base, "%s", m->base);
    snprintf(t->init_adapter, sizeof t->init_adapter, "%s", mm->out);
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
    t->seed = m->seed;
    t->restart = m->restart;
    t->log_every = opt->refine_steps / 10 > 0 ? opt->refine_steps / 10 : 1;
    t->verbose = m->verbose;
    if (rank == 0)
      itr_log(ITR_LOG_INFO, "refining the merge: %d steps of KL(base + adapter i || base + merged) on -calib i, lr %g",
              t->steps, t->lr);
    err = itr_train_run(t, comm);
    if (rank == 0 && err == ITR_OK) err = move_merge_files(mm->out, m->out);
    else if (rank == 0 && err != ITR_ERR_INTERRUPTED && !have) (void)itr_iofile_remove_tree(mm->out);
    err = itr_dist_agree(comm, err);
  }
  free(mm);
  free(t);
  return err;
}
