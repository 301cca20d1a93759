/* -features FILE.h5: merge from external features (docs/FEATURES.md), for architectures the built-in
 * forward does not cover (T5, BLIP, diffusion UNets, ...). The user supplies, per task and per module,
 * either the input rows X_i and Xt_i or their reduced statistics (X^T X, Xt^T Xt, X^T Xt); this
 * driver makes one solve per module. Adapters come from io's reader of PEFT LoRA of any
 * architecture (itr_lora_file: module paths key the HDF5 groups and the output tensors).
 *
 * Collective on comm. Every rank opens the adapters and the file (read-only). Per module and task,
 * each rank reads its share of the rows (a hyperslab) and forms their statistics, summed over the
 * ranks (rows variant), or reads the statistics (statistics variant); the system is assembled with
 * the method table's formulas (src/merge, the same on every rank) and solved with ScaLAPACK on
 * all ranks (site_solve_system); a FAILED residual stops the run (itr_residual_error, exit 3).
 * Rank 0 writes OUT.partial/ (io's writer, merge_report.json) and renames it to OUT. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"

#define FEAT_GROUP_MAX 440 /* "task_<i>/<module path of up to 400 characters>" */
#define FEAT_NAME_MAX (FEAT_GROUP_MAX + 16) /* the group, "/gram_x" */

typedef struct {
  const char *path;      /* owned by an adapter */
  int64_t d_out, d_in;
  itr_update upd;        /* the merged update (factored) */
  double residual;       /* scaled residual of the solve (0: no solve) */
  double energy_kept;    /* with -out_rank: ||kept||^2 / ||dW||^2 */
  double coef[ITR_MAX_TASKS];
} feat_module;

typedef struct {
  const itr_merge_opts *opt;
  const itr_method *method;
  MPI_Comm comm;
  int rank, size, N;
  itr_lora_file *ad[ITR_MAX_TASKS];
  int n_mod;
  feat_module *mods;
  itr_h5 *h5;
  itr_dist_grid *grid;
  PetscLogEvent ev_solve;
  double energy_kept_min;
} feat_ctx;

/* Every module some adapter targets, in the order met; the adapters must agree on its shape. */
static itr_err collect_modules(feat_ctx *c) {
  int total = 0;
  for (int i = 0; i < c->N; i++) total += c->ad[i]->n_mod;
  ITR_TRY(itr_calloc((size_t)total, sizeof *c->mods, "module table", &c->mods));
  for (int i = 0; i < c->N; i++)
    for (int k = 0; k < c->ad[i]->n_mod; k++) {
      const itr_lora_pair *l = &c->ad[i]->mods[k];
      const int64_t d_out = l->B->shape[0], d_in = l->A->shape[1];
      feat_module *m = NULL;
      for (int q = 0; q < c->n_mod && !m; q++)
        if (strcmp(c->mods[q].path, l->path) == 0) m = &c->mods[q];
      if (!m) {
        m = &c->mods[c->n_mod++];
        m->path = l->path, m->d_out = d_out, m->d_in = d_in, m->energy_kept = 1.0;
        continue;
      }
      ITR_CHECK(m->d_out == d_out && m->d_in == d_in, ITR_ERR_INPUT,
                "adapter '%s': module %s has shape (%lld, %lld) (from lora_B and lora_A) but another adapter's "
                "has (%lld, %lld). Were the adapters trained on the same base model?",
                c->ad[i]->dir, l->path, (long long)d_out, (long long)d_in, (long long)m->d_out, (long long)m->d_in);
    }
  return ITR_OK;
}

/* Task i's factors for module m as f64 (absent: r = 0). */
static itr_err task_factors(feat_ctx *c, int i, const feat_module *m, itr_merge_task *t, double **A, double **B) {
  memset(t, 0, sizeof *t);
  t->weight = itr_method_reads(c->method, "manual_coef") ? c->opt->manual_coef[i] : 1.0;
  const itr_lora_pair *l = itr_lora_file_find(c->ad[i], m->path);
  if (!l) return ITR_OK;
  ITR_TRY(itr_calloc((size_t)l->A->numel, sizeof(double), "lora_A f64", A));
  ITR_TRY(itr_calloc((size_t)l->B->numel, sizeof(double), "lora_B f64", B));
  ITR_TRY(itr_tensor_read_f64(l->A, *A));
  ITR_TRY(itr_tensor_read_f64(l->B, *B));
  t->r = l->r, t->scale = l->scaling, t->A = *A, t->B = *B;
  return ITR_OK;
}

/* Rejects NaN / infinity in buf (n values of dataset name; row0: the first row's index, ncols: its
 * columns, for the message). */
static itr_err check_finite(const feat_ctx *c, const char *name, const double *buf, size_t n, int64_t row0,
                            int64_t ncols) {
  for (size_t k = 0; k < n; k++)
    ITR_CHECK(isfinite(buf[k]), ITR_ERR_INPUT,
              "'%s': dataset '%s' holds %g at element %lld (row %lld); features must be finite", c->opt->features,
              name, buf[k], (long long)(row0 * ncols + (int64_t)k), (long long)(row0 + (int64_t)k / ncols));
  return ITR_OK;
}

/* Reads the whole dataset name (d0, d1) as f64 into a new buffer, rejecting NaN / infinity. */
static itr_err read_whole(feat_ctx *c, const char *name, int64_t d0, int64_t d1, double **out) {
  size_t n = 1;
  ITR_CHECK(itr_mul_size((size_t)d0, (size_t)d1, &n), ITR_ERR_INPUT, "'%s': dataset '%s' is too large",
            c->opt->features, name);
  double *buf = NULL;
  ITR_TRY(itr_calloc(n ? n : 1, sizeof(double), name, &buf));
  const int64_t dims[2] = {d0, d1};
  itr_err e = itr_h5_read_f64(c->h5, name, 2, dims, buf);
  if (e == ITR_OK) e = check_finite(c, name, buf, n, 0, d1);
  if (e != ITR_OK) {
    free(buf);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = buf;
  return ITR_OK;
}

/* Dataset name must exist and be 2-D (d0, d1); d0 < 0: any number n >= 1 of rows, returned in rows. */
static itr_err check_2d(feat_ctx *c, const char *name, int64_t d0, int64_t d1, const char *what, int64_t *rows) {
  ITR_CHECK(itr_h5_has(c->h5, name), ITR_ERR_INPUT, "'%s' has no dataset '%s' (%s); see docs/FEATURES.md",
            c->opt->features, name, what);
  int nd;
  int64_t dims[ITR_MAX_DIMS];
  ITR_TRY(itr_h5_shape(c->h5, name, &nd, dims));
  char got[96] = "(", want[64];
  for (int k = 0; k < nd && k < 4; k++)
    snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", k ? ", " : "", (long long)dims[k]);
  snprintf(got + strlen(got), sizeof got - strlen(got), "%s)", nd > 4 ? ", ..." : "");
  if (d0 < 0) snprintf(want, sizeof want, "(n, %lld) with n >= 1", (long long)d1);
  else snprintf(want, sizeof want, "(%lld, %lld)", (long long)d0, (long long)d1);
  ITR_CHECK(nd == 2 && (d0 < 0 ? dims[0] >= 1 : dims[0] == d0) && dims[1] == d1, ITR_ERR_INPUT,
            "'%s': dataset '%s' has shape %s but %s must be %s for this module (d_out, d_in from the adapters' "
            "lora_B and lora_A)",
            c->opt->features, name, got, what, want);
  if (rows) *rows = dims[0];
  return ITR_OK;
}

/* gram (d, d) must be symmetric up to rounding; it is symmetrised exactly. */
static itr_err symmetrise(feat_ctx *c, const char *name, int64_t d, double *g) {
  double asym = 0, nrm = 0;
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = 0; j < d; j++) {
      double x = g[i * d + j] - g[j * d + i];
      asym += x * x;
      nrm += g[i * d + j] * g[i * d + j];
    }
  ITR_CHECK(asym <= 1e-10 * nrm, ITR_ERR_INPUT,
            "'%s': dataset '%s' is not symmetric (||G - G^T||_F / ||G||_F = %.3g): a Gram X^T X is. Is it the "
            "cross term X^T Xt?",
            c->opt->features, name, sqrt(asym / (nrm > 0 ? nrm : 1)));
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = i + 1; j < d; j++) g[i * d + j] = g[j * d + i] = 0.5 * (g[i * d + j] + g[j * d + i]);
  return ITR_OK;
}

/* Rows variant: the statistics of this rank's share of the n rows, summed over the ranks (the
 * upper triangles of the Grams, the whole cross term), then mirrored. Collective on c->comm. */
static itr_err rows_stats(feat_ctx *c, const char *nx, const char *nt, int64_t n, int need_t, itr_stats *st) {
  const int64_t d = st->d_in;
  const int64_t lo = n * c->rank / c->size, hi = n * (c->rank + 1) / c->size, T = hi - lo;
  double *X = NULL, *Xt = NULL;
  itr_err e = itr_calloc((size_t)(T * d) + 1, sizeof(double), "rows X", &X);
  if (e == ITR_OK && need_t) e = itr_calloc((size_t)(T * d) + 1, sizeof(double), "rows Xt", &Xt);
  if (e == ITR_OK) e = itr_h5_read_rows_f64(c->h5, nx, lo, T, d, X);
  if (e == ITR_OK) e = check_finite(c, nx, X, (size_t)(T * d), lo, d);
  if (e == ITR_OK && need_t) e = itr_h5_read_rows_f64(c->h5, nt, lo, T, d, Xt);
  if (e == ITR_OK && need_t) e = check_finite(c, nt, Xt, (size_t)(T * d), lo, d);
  if (e == ITR_OK && T > 0) {
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)T, 1.0, X, (int)d, 0.0, st->gram_x, (int)d);
    if (need_t) {
      cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)T, 1.0, Xt, (int)d, 0.0, st->gram_t, (int)d);
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)T, 1.0, X, (int)d, Xt, (int)d, 0.0,
                  st->cross, (int)d);
    }
  }
  free(X);
  free(Xt);
  ITR_TRY(itr_dist_agree(c->comm, e));
  double *bufs[3] = {st->gram_x, need_t ? st->gram_t : NULL, need_t ? st->cross : NULL};
  for (int b = 0; b < 3; b++)
    if (bufs[b]) ITR_TRY(itr_dist_allreduce_sum(bufs[b], d * d, c->comm, "the statistics of a task"));
  st->n_x = n;
  if (need_t) st->n_t = n;
  itr_stats_finalize(st); /* mirror the upper triangles */
  return ITR_OK;
}

/* Statistics variant: gram_x (+ gram_t, cross, optional n_rows), read whole on every rank. Not
 * Collective (every rank reads the same data and reaches the same verdict). */
static itr_err read_stats(feat_ctx *c, const char *g, int need_t, itr_stats *st) {
  const char *file = c->opt->features;
  const int64_t d = st->d_in;
  char name[FEAT_NAME_MAX];
  double *buf = NULL;
  const struct {
    const char *what;
    double *dst;
    int sym;
  } parts[3] = {{"gram_x", st->gram_x, 1}, {"gram_t", st->gram_t, 1}, {"cross", st->cross, 0}};
  for (int p = 0; p < (need_t ? 3 : 1); p++) {
    snprintf(name, sizeof name, "%s/%s", g, parts[p].what);
    ITR_TRY(check_2d(c, name, d, d, parts[p].what, NULL));
  }
  for (int p = 0; p < (need_t ? 3 : 1); p++) {
    snprintf(name, sizeof name, "%s/%s", g, parts[p].what);
    ITR_TRY(read_whole(c, name, d, d, &buf));
    memcpy(parts[p].dst, buf, (size_t)(d * d) * sizeof(double));
    free(buf);
    if (parts[p].sym) ITR_TRY(symmetrise(c, name, d, parts[p].dst));
  }
  snprintf(name, sizeof name, "%s/n_rows", g); /* optional, informational */
  if (itr_h5_has(c->h5, name)) {
    int nd;
    int64_t dims[ITR_MAX_DIMS], one = 1;
    double v = 0;
    ITR_TRY(itr_h5_shape(c->h5, name, &nd, dims));
    ITR_CHECK(nd == 0 || (nd == 1 && dims[0] == 1), ITR_ERR_INPUT,
              "'%s': dataset '%s' must be a scalar (the number of rows the statistics sum over)", file, name);
    ITR_TRY(itr_h5_read_f64(c->h5, name, nd, &one, &v));
    ITR_CHECK(v >= 1 && v == floor(v) && v < 9e15, ITR_ERR_INPUT, "'%s': dataset '%s' is %g; expected an integer >= 1",
              file, name, v);
    st->n_x = (int64_t)v;
    if (need_t) st->n_t = (int64_t)v;
  }
  return ITR_OK;
}

/* Statistics of task i at module m, the same on every rank: from rows X (and Xt) or from the
 * reduced statistics. need_t: Xt is needed (IterIS); otherwise Xt = X (RegMean reads X^T X only).
 * Collective on c->comm. */
static itr_err load_stats(feat_ctx *c, int i, const feat_module *m, int need_t, itr_stats *st) {
  const char *file = c->opt->features;
  const int64_t d = m->d_in;
  char g[FEAT_GROUP_MAX], nx[FEAT_NAME_MAX], nt[FEAT_NAME_MAX], ngx[FEAT_NAME_MAX];
  snprintf(g, sizeof g, "task_%d/%s", i, m->path);
  snprintf(nx, sizeof nx, "%s/X", g);
  snprintf(nt, sizeof nt, "%s/Xt", g);
  snprintf(ngx, sizeof ngx, "%s/gram_x", g);
  const int rows = itr_h5_has(c->h5, nx), stats = itr_h5_has(c->h5, ngx);
  itr_err e = ITR_OK;
  int64_t n = 0, nn = 0;
  if (!rows && !stats)
    e = itr_error_set(ITR_ERR_INPUT,
                      "'%s' has no dataset '%s' nor '%s': task %d (adapter '%s') needs the inputs of module %s (rows "
                      "X, or the statistic gram_x); see docs/FEATURES.md",
                      file, nx, ngx, i, c->opt->adapters[i], m->path);
  else if (rows && stats)
    e = itr_error_set(ITR_ERR_INPUT, "'%s': group '%s' holds both rows X and statistics gram_x: give one of the two",
                      file, g);
  if (e == ITR_OK) e = itr_stats_init(st, d, ITR_STATS_FULL_CROSS);
  if (e == ITR_OK && need_t) e = itr_stats_reset_xt(st);
  if (e == ITR_OK && rows) {
    e = check_2d(c, nx, -1, d, "X", &n);
    if (e == ITR_OK && need_t && !itr_h5_has(c->h5, nt))
      e = itr_error_set(ITR_ERR_INPUT,
                        "'%s' has no dataset '%s': -method iteris needs Xt (the merged model's inputs to %s, rows in "
                        "the same order as X) next to X; see docs/FEATURES.md",
                        file, nt, m->path);
    if (e == ITR_OK && need_t) e = check_2d(c, nt, -1, d, "Xt", &nn);
    if (e == ITR_OK && need_t && nn != n)
      e = itr_error_set(ITR_ERR_INPUT,
                        "'%s': dataset '%s' has %lld rows but '%s' has %lld: Xt must hold the same tokens, in the same "
                        "order, as X",
                        file, nt, (long long)nn, nx, (long long)n);
  }
  if (e == ITR_OK && stats) e = read_stats(c, g, need_t, st);
  ITR_TRY(itr_dist_agree(c->comm, e));
  if (rows) ITR_TRY(rows_stats(c, nx, nt, n, need_t, st));
  return ITR_OK;
}

/* The system of one module, task by task (one task's statistics in memory at a time), the same on
 * every rank; then one ScaLAPACK solve on all ranks. Collective on c->comm. */
static itr_err merge_module(feat_ctx *c, feat_module *m) {
  const itr_merge_opts *o = c->opt;
  const int N = c->N, iteris = (c->method->flags & ITR_METHOD_ADAPTIVE) != 0;
  itr_merge_task tasks[ITR_MAX_TASKS];
  double *A[ITR_MAX_TASKS] = {0}, *B[ITR_MAX_TASKS] = {0}, *W0 = NULL;
  itr_system sys = {0};
  itr_dist_matrix T2 = {0};
  int64_t R = 0;
  itr_err e = ITR_OK;
  for (int i = 0; i < N && e == ITR_OK; i++) {
    e = task_factors(c, i, m, &tasks[i], &A[i], &B[i]);
    R += tasks[i].r;
  }
  if (e == ITR_OK && !(c->method->flags & ITR_METHOD_STATS)) {
    e = itr_baseline_task_arithmetic(N, tasks, m->d_out, m->d_in, o->ta_lambda, &m->upd);
    goto done;
  }
  if (e == ITR_OK && iteris) {
    char name[FEAT_NAME_MAX];
    snprintf(name, sizeof name, "base/%s", m->path);
    if (!itr_h5_has(c->h5, name))
      e = itr_error_set(ITR_ERR_INPUT,
                        "'%s' has no dataset '%s': -method iteris needs the base weight W0 (%lld, %lld) of every "
                        "module for the adaptive weights c_i; see docs/FEATURES.md",
                        o->features, name, (long long)m->d_out, (long long)m->d_in);
    if (e == ITR_OK) e = check_2d(c, name, m->d_out, m->d_in, "W0", NULL);
    if (e == ITR_OK) e = read_whole(c, name, m->d_out, m->d_in, &W0);
  }
  if (e == ITR_OK) e = itr_system_create(m->d_in, R, 0, N, o->alpha_2, m->path, &sys);
  e = itr_dist_agree(c->comm, e);
  itr_iteris_opts io;
  itr_iteris_opts_default(&io);
  io.alpha_1 = o->alpha_1, io.alpha_2 = o->alpha_2, io.reg_coef = o->reg_coef;
  int64_t row = 0;
  for (int i = 0; i < N && e == ITR_OK; i++) {
    itr_stats st = {0};
    e = load_stats(c, i, m, iteris, &st);
    tasks[i].stats = &st;
    if (e == ITR_OK && iteris) {
      e = itr_iteris_coef(&tasks[i], m->d_out, m->d_in, W0, m->path, i, &m->coef[i]);
      if (e == ITR_OK) e = itr_iteris_assemble_add(&io, &tasks[i], i, m->d_out, m->d_in, W0, m->coef[i], row, &sys);
    } else if (e == ITR_OK) {
      m->coef[i] = 1.0;
      e = itr_baseline_regmean_assemble_add(&tasks[i], i, o->regmean_alpha, o->alpha_2, row, &sys);
    }
    e = itr_dist_agree(c->comm, e);
    tasks[i].stats = NULL;
    row += tasks[i].r;
    itr_stats_fini(&st);
  }
  /* T2 in the block-cyclic layout, solved on every rank's grid */
  if (e == ITR_OK) e = itr_dist_agree(c->comm, itr_dist_matrix_init(&T2, c->grid, (int)m->d_in, (int)m->d_in));
  if (e == ITR_OK) {
    itr_dist_matrix_scatter(&T2, sys.T2);
    itr_dist_solve_report rep;
    memset(&rep, 0, sizeof rep);
    e = site_solve_system(c->grid, &T2, &sys, &rep, c->ev_solve);
    m->residual = rep.residual;
    if (e == ITR_OK)
      itr_log(o->verbose >= 1 ? ITR_LOG_INFO : ITR_LOG_DEBUG, "  %s: R = %lld, scaled residual %.3g %s", m->path,
              (long long)R, rep.residual, rep.passed ? "PASSED" : "FAILED");
    if (e == ITR_OK && !rep.passed) e = itr_residual_error(m->path, rep.residual, o->alpha_2);
  }
  if (e == ITR_OK) e = itr_dist_agree(c->comm, itr_update_from_system(&sys, N, tasks, m->d_out, W0, &m->upd));
done:
  itr_dist_matrix_fini(&T2);
  itr_system_fini(&sys);
  free(W0);
  for (int i = 0; i < N; i++) {
    free(A[i]);
    free(B[i]);
  }
  return e;
}

/* -out_rank: each update truncated to rank k (itr_update_truncate), its energy kept. Not Collective. */
static itr_err truncate_all(feat_ctx *c) {
  for (int q = 0; q < c->n_mod; q++) {
    feat_module *m = &c->mods[q];
    if (c->opt->out_rank <= 0 || m->upd.rank <= c->opt->out_rank) continue;
    itr_update t = {0};
    ITR_TRY(itr_update_truncate(&m->upd, c->opt->out_rank, &t));
    m->energy_kept = t.energy_kept;
    c->energy_kept_min = fmin(c->energy_kept_min, t.energy_kept);
    itr_update_fini(&m->upd);
    m->upd = t;
  }
  return ITR_OK;
}

/* Rank 0: OUT.partial/ with the adapter (io's writer) and merge_report.json, renamed to OUT. */
static itr_err write_outputs(feat_ctx *c, double seconds) {
  const itr_merge_opts *o = c->opt;
  char partial[ITR_PATH_MAX + 16];
  snprintf(partial, sizeof partial, "%s.partial", o->out);
  itr_dtype dt = ITR_F32;
  (void)itr_dtype_parse(o->out_dtype, &dt);
  ITR_TRY(itr_iofile_remove_tree(partial));
  ITR_TRY(itr_iofile_mkdirs(partial));
  itr_lora_writer *w = NULL;
  report_module *rm = NULL;
  itr_err e = itr_lora_writer_create(c->ad[0]->base_model, c->ad[0]->task_type, dt, &w);
  if (e == ITR_OK) e = itr_calloc((size_t)c->n_mod, sizeof *rm, "report modules", &rm);
  for (int q = 0; q < c->n_mod && e == ITR_OK; q++) {
    const feat_module *m = &c->mods[q];
    e = itr_lora_writer_add_f64(w, m->path, m->d_out, m->d_in, (int)m->upd.rank, m->upd.A, m->upd.B);
    rm[q] = (report_module){m->path, m->d_out, m->d_in, m->upd.rank, m->residual, m->energy_kept, m->coef};
  }
  if (e == ITR_OK) e = itr_lora_writer_write(w, partial);
  if (e == ITR_OK)
    e = merge_report_write_modules(o, c->method, c->size, seconds, c->energy_kept_min, c->n_mod, rm, partial);
  itr_lora_writer_destroy(w);
  free(rm);
  if (e == ITR_OK) e = itr_iofile_commit_dir(partial, o->out);
  if (e != ITR_OK) (void)itr_iofile_remove_tree(partial);
  return e;
}

/* The task groups must be task_0 .. task_{N-1} (task_N would mean a missing adapter). */
static itr_err check_tasks(feat_ctx *c) {
  char g[32];
  for (int i = 0; i < c->N; i++) {
    snprintf(g, sizeof g, "task_%d", i);
    ITR_CHECK(itr_h5_has(c->h5, g), ITR_ERR_INPUT,
              "'%s' has no group '%s' for adapter %d ('%s'); tasks are numbered from 0 in -adapters order (see "
              "docs/FEATURES.md)",
              c->opt->features, g, i, c->opt->adapters[i]);
  }
  snprintf(g, sizeof g, "task_%d", c->N);
  ITR_CHECK(!itr_h5_has(c->h5, g), ITR_ERR_INPUT,
            "'%s' has a group '%s' but -adapters lists only %d adapter(s): give one adapter per task group, in order",
            c->opt->features, g, c->N);
  return ITR_OK;
}

itr_err itr_pipeline_features(const itr_merge_opts *o, MPI_Comm comm) {
  feat_ctx c;
  memset(&c, 0, sizeof c);
  c.opt = o;
  c.comm = comm;
  MPI_Comm_rank(comm, &c.rank);
  MPI_Comm_size(comm, &c.size);
  c.N = o->n_adapters;
  c.energy_kept_min = 1.0;
  c.method = itr_method_find(o->method);
  PetscClassId cid;
  PetscClassIdRegister("IterIS", &cid);
  PetscLogEventRegister("ItrSolve", cid, &c.ev_solve);
  itr_err e = c.method ? ITR_OK : itr_error_set(ITR_ERR_INPUT, "-method %s is not known", o->method);
  for (int i = 0; i < c.N && e == ITR_OK; i++) e = itr_lora_file_open(o->adapters[i], &c.ad[i]);
  if (e == ITR_OK) e = collect_modules(&c);
  if (e == ITR_OK) e = itr_h5_open(o->features, &c.h5);
  if (e == ITR_OK && (c.method->flags & ITR_METHOD_STATS)) e = check_tasks(&c);
  e = itr_dist_agree(comm, e);
  if (e == ITR_OK) e = itr_dist_agree(comm, itr_dist_grid_create_shape(comm, o->block_size, o->grid_rows, &c.grid));
  if (e == ITR_OK)
    itr_log(ITR_LOG_INFO, "features: %d adapters, %d modules, -method %s, from %s on %d rank(s)", c.N, c.n_mod,
            o->method, o->features, c.size);
  const double t0 = itr_wtime();
  for (int q = 0; q < c.n_mod && e == ITR_OK; q++) e = itr_dist_agree(comm, merge_module(&c, &c.mods[q]));
  const double seconds = itr_wtime() - t0;
  if (e == ITR_OK) e = itr_dist_agree(comm, truncate_all(&c));
  if (e == ITR_OK) e = itr_dist_agree(comm, c.rank == 0 ? write_outputs(&c, seconds) : ITR_OK);
  if (e == ITR_OK)
    itr_log(ITR_LOG_INFO, "features: merged %d modules in %.2f s on %d rank(s); adapter written to %s", c.n_mod,
            seconds, c.size, o->out);
  if (c.h5) (void)itr_h5_close(c.h5, 0);
  itr_dist_grid_destroy(c.grid);
  for (int q = 0; q < c.n_mod; q++) itr_update_fini(&c.mods[q].upd);
  free(c.mods);
  for (int i = 0; i < c.N; i++) itr_lora_file_destroy(c.ad[i]);
  return e;
}
