/* Checkpoints (OUT.partial/checkpoint.h5) and the statistics file (stats.h5).
 *
 * checkpoint.h5: attributes "fingerprint" (the options that determine the result) and "resume"
 * ("k l": run iteration k from layer l); datasets "coef" (L*7*N adaptive weights), "resid"
 * (K*L*7 scaled residuals so far), and per (layer, module) slot q the merged update of the last
 * finished iteration, "cur/<q>/A" (R, d_in) and "cur/<q>/B" (d_out, R), or "cur/<q>/dense"
 * (d_out, d_in), and the updates of iteration k already solved (layers < l) under "next/<q>/".
 * All f64: a resumed run continues from exactly the state an uninterrupted run had.
 *
 * With -stages S, each stage g writes checkpoint.stage<g>of<S>.iter<k>.h5 after its iteration k:
 * attributes "fingerprint" and "stage" ("g S lo hi"), "coef" and "resid" as above (the entries of
 * its layers hold), and "cur/<q>/" for its layers. A restart resumes after the last iteration that
 * every stage has a file of. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/pipeline_internal.h"

static void fingerprint(const merge_ctx *c, char *buf, size_t len) {
  const itr_merge_opts *o = c->opt;
  int n = snprintf(buf, len, "method=%s base=%s alpha_1=%.17g alpha_2=%.17g reg_coef=%.17g with_pretrain=%d regmean_alpha=%.17g",
                   o->method, o->base, o->alpha_1, o->alpha_2, o->reg_coef, o->with_pretrain, o->regmean_alpha);
  for (int m = 0; m < c->arch.n_modules && n > 0 && (size_t)n < len; m++)
    n += snprintf(buf + n, len - (size_t)n, "%s%s", m ? "," : " modules=", c->arch.module[m].name);
  for (int i = 0; i < c->N && n > 0 && (size_t)n < len; i++)
    n += snprintf(buf + n, len - (size_t)n, " [%s %s w=%.17g]", o->adapters[i], o->n_calib > i ? o->calib[i] : "-",
                  o->manual_coef[i]);
  /* what the inputs hold (a file changed in place under its name is another input) */
  if (n > 0 && (size_t)n < len)
    snprintf(buf + n, len - (size_t)n, " max_tokens=%d contents=%016llx", o->max_tokens,
             (unsigned long long)c->input_digest);
}

static itr_err write_update(itr_h5 *h, const char *prefix, size_t q, const itr_update *u) {
  char name[128];
  if (u->rank > 0) {
    int64_t da[2] = {u->rank, u->d_in}, db[2] = {u->d_out, u->rank};
    snprintf(name, sizeof name, "%s/%zu/A", prefix, q);
    ITR_TRY(itr_h5_write_f64(h, name, 2, da, u->A));
    snprintf(name, sizeof name, "%s/%zu/B", prefix, q);
    ITR_TRY(itr_h5_write_f64(h, name, 2, db, u->B));
  } else if (u->dense) {
    int64_t dd[2] = {u->d_out, u->d_in};
    snprintf(name, sizeof name, "%s/%zu/dense", prefix, q);
    ITR_TRY(itr_h5_write_f64(h, name, 2, dd, u->dense));
  }
  return ITR_OK;
}

static itr_err read_update(itr_h5 *h, const char *prefix, size_t q, int64_t d_out, int64_t d_in, itr_update *u) {
  char name[128];
  int nd;
  int64_t dims[ITR_MAX_DIMS];
  memset(u, 0, sizeof *u);
  u->d_out = d_out;
  u->d_in = d_in;
  u->energy_kept = 1;
  snprintf(name, sizeof name, "%s/%zu/A", prefix, q);
  if (itr_h5_has(h, name)) {
    ITR_TRY(itr_h5_shape(h, name, &nd, dims));
    ITR_CHECK(nd == 2 && dims[1] == d_in && dims[0] >= 1, ITR_ERR_INPUT, "checkpoint: '%s' has the wrong shape", name);
    u->rank = dims[0];
    int64_t da[2] = {u->rank, d_in}, db[2] = {d_out, u->rank};
    ITR_TRY(itr_calloc((size_t)(u->rank * d_in), sizeof(double), "checkpoint A", &u->A));
    ITR_TRY(itr_calloc((size_t)(u->rank * d_out), sizeof(double), "checkpoint B", &u->B));
    ITR_TRY(itr_h5_read_f64(h, name, 2, da, u->A));
    snprintf(name, sizeof name, "%s/%zu/B", prefix, q);
    ITR_TRY(itr_h5_read_f64(h, name, 2, db, u->B));
    return ITR_OK;
  }
  snprintf(name, sizeof name, "%s/%zu/dense", prefix, q);
  if (itr_h5_has(h, name)) {
    int64_t dd[2] = {d_out, d_in};
    ITR_TRY(itr_calloc((size_t)(d_out * d_in), sizeof(double), "checkpoint dense update", &u->dense));
    ITR_TRY(itr_h5_read_f64(h, name, 2, dd, u->dense));
  }
  return ITR_OK;
}

/* A per-iteration array so far (the residuals, or the updates' changes) into dst; a run restarted with
 * another -max_iter keeps what fits. */
static itr_err read_per_iter(itr_h5 *h, const char *name, merge_ctx *c, size_t nslots, double *dst) {
  int nd;
  int64_t dims[ITR_MAX_DIMS];
  ITR_TRY(itr_h5_shape(h, name, &nd, dims));
  double *r = NULL;
  ITR_TRY(itr_calloc((size_t)dims[0], sizeof(double), "checkpoint per-iteration values", &r));
  itr_err e = itr_h5_read_f64(h, name, 1, dims, r);
  int64_t keep = (int64_t)nslots * c->opt->max_iter;
  if (e == ITR_OK) memcpy(dst, r, (size_t)(dims[0] < keep ? dims[0] : keep) * sizeof(double));
  free(r);
  return e;
}

/* The residuals so far and, when the checkpoint has them, the updates' changes. */
static itr_err read_resid(itr_h5 *h, merge_ctx *c, size_t nslots) {
  ITR_TRY(read_per_iter(h, "resid", c, nslots, c->resid));
  if (itr_h5_has(h, "change")) ITR_TRY(read_per_iter(h, "change", c, nslots, c->change));
  return ITR_OK;
}

static void ckpt_path(const merge_ctx *c, char *buf, size_t len) {
  snprintf(buf, len, "%s.partial/checkpoint.h5", c->opt->out);
}

itr_err checkpoint_write(const merge_ctx *c, int k_next, int l_next) {
  char path[ITR_PATH_MAX + 64], fp[8192], resume[64];
  snprintf(path, sizeof path, "%s.partial", c->opt->out);
  ITR_TRY(itr_iofile_mkdirs(path));
  ckpt_path(c, path, sizeof path);
  itr_h5 *h = NULL;
  ITR_TRY(itr_h5_create(path, &h));
  const size_t nslots = NSLOTS(c);
  const int K = c->opt->max_iter;
  itr_err e = ITR_OK;
  fingerprint(c, fp, sizeof fp);
  snprintf(resume, sizeof resume, "%d %d", k_next, l_next);
  ITR_TRY_GOTO(itr_h5_set_attr(h, "fingerprint", fp), e, fail);
  ITR_TRY_GOTO(itr_h5_set_attr(h, "resume", resume), e, fail);
  int64_t dc = (int64_t)nslots * c->N, dr = (int64_t)nslots * K;
  ITR_TRY_GOTO(itr_h5_write_f64(h, "coef", 1, &dc, c->coef), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "resid", 1, &dr, c->resid), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "change", 1, &dr, c->change), e, fail);
  for (size_t q = 0; q < nslots; q++) {
    ITR_TRY_GOTO(write_update(h, "cur", q, &c->cur[q]), e, fail);
    if ((int)(q / (size_t)c->arch.n_modules) < l_next) ITR_TRY_GOTO(write_update(h, "next", q, &c->next[q]), e, fail);
  }
  return itr_h5_close(h, 1);
fail:
  (void)itr_h5_close(h, 0);
  return e;
}

itr_err checkpoint_read(merge_ctx *c, int *found) {
  char path[ITR_PATH_MAX + 64], fp[8192], got[8192], resume[64];
  ckpt_path(c, path, sizeof path);
  *found = 0;
  FILE *f = fopen(path, "rb");
  if (!f) return ITR_OK;
  fclose(f);
  itr_h5 *h = NULL;
  ITR_TRY(itr_h5_open(path, &h));
  itr_err e = ITR_OK;
  const int L = c->cfg.num_hidden_layers;
  const size_t nslots = NSLOTS(c);
  fingerprint(c, fp, sizeof fp);
  ITR_TRY_GOTO(itr_h5_get_attr(h, "fingerprint", got, sizeof got), e, done);
  if (strcmp(fp, got) != 0) {
    e = itr_error_set(ITR_ERR_INPUT,
                      "-restart: the checkpoint '%s' was made by a run with other inputs or options:\n  checkpoint: %s\n  this run:   %s\n"
                      "Use the same options, or run without -restart to start over.",
                      path, got, fp);
    goto done;
  }
  ITR_TRY_GOTO(itr_h5_get_attr(h, "resume", resume, sizeof resume), e, done);
  int k, l;
  if (sscanf(resume, "%d %d", &k, &l) != 2 || k < 1 || l < 0 || l >= L) {
    e = itr_error_set(ITR_ERR_INPUT, "checkpoint '%s': bad resume point '%s'", path, resume);
    goto done;
  }
  if (k > c->opt->max_iter + 1) { /* iterations 1..k-1 are done: more than this run asks for */
    e = itr_error_set(ITR_ERR_INPUT,
                      "-restart: the checkpoint '%s' has finished %d iterations, more than this run's -max_iter %d: "
                      "give -max_iter %d or more, or run without -restart to start over",
                      path, k - 1, c->opt->max_iter, k - 1);
    goto done;
  }
  int64_t dc = (int64_t)nslots * c->N;
  ITR_TRY_GOTO(itr_h5_read_f64(h, "coef", 1, &dc, c->coef), e, done);
  ITR_TRY_GOTO(read_resid(h, c, nslots), e, done);
  for (size_t q = 0; q < nslots; q++) {
    int64_t d_out, d_in;
    const itr_arch_module *am = &c->arch.module[q % (size_t)c->arch.n_modules];
    d_out = am->d_out, d_in = am->d_in;
    itr_update_fini(&c->cur[q]);
    itr_update_fini(&c->next[q]);
    ITR_TRY_GOTO(read_update(h, "cur", q, d_out, d_in, &c->cur[q]), e, done);
    if ((int)(q / (size_t)c->arch.n_modules) < l) ITR_TRY_GOTO(read_update(h, "next", q, d_out, d_in, &c->next[q]), e, done);
  }
  c->start_iter = k;
  c->start_layer = l;
  c->iters_done = k - 1;
  *found = 1;
done:
  (void)itr_h5_close(h, 0);
  return e;
}

static void stage_path(const merge_ctx *c, int k, char *buf, size_t len) {
  snprintf(buf, len, "%s.partial/checkpoint.stage%dof%d.iter%d.h5", c->opt->out, c->stage + 1, c->n_stages, k);
}

itr_err checkpoint_write_stage(const merge_ctx *c, int k) {
  char path[ITR_PATH_MAX + 96], fp[8192], st[96];
  snprintf(path, sizeof path, "%s.partial", c->opt->out);
  ITR_TRY(itr_iofile_mkdirs(path));
  stage_path(c, k, path, sizeof path);
  itr_h5 *h = NULL;
  ITR_TRY(itr_h5_create(path, &h));
  const size_t nslots = NSLOTS(c);
  itr_err e = ITR_OK;
  fingerprint(c, fp, sizeof fp);
  snprintf(st, sizeof st, "%d %d %d %d", c->stage, c->n_stages, c->layer_lo, c->layer_hi);
  int64_t dc = (int64_t)nslots * c->N, dr = (int64_t)nslots * c->opt->max_iter;
  ITR_TRY_GOTO(itr_h5_set_attr(h, "fingerprint", fp), e, fail);
  ITR_TRY_GOTO(itr_h5_set_attr(h, "stage", st), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "coef", 1, &dc, c->coef), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "resid", 1, &dr, c->resid), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "change", 1, &dr, c->change), e, fail);
  for (int l = c->layer_lo; l < c->layer_hi; l++)
    for (int m = 0; m < c->arch.n_modules; m++) ITR_TRY_GOTO(write_update(h, "cur", SLOT(l, m), &c->cur[SLOT(l, m)]), e, fail);
  return itr_h5_close(h, 1);
fail:
  (void)itr_h5_close(h, 0);
  return e;
}

int checkpoint_stage_latest(const merge_ctx *c) {
  char path[ITR_PATH_MAX + 96];
  for (int k = c->opt->max_iter; k >= 1; k--) {
    stage_path(c, k, path, sizeof path);
    if (access(path, F_OK) == 0) return k;
  }
  return 0;
}

int checkpoint_exists(const merge_ctx *c) {
  char path[ITR_PATH_MAX + 64];
  ckpt_path(c, path, sizeof path);
  return access(path, F_OK) == 0;
}

void checkpoint_remove_stage(const merge_ctx *c, int k) {
  char path[ITR_PATH_MAX + 96];
  stage_path(c, k, path, sizeof path);
  remove(path);
}

void checkpoint_remove(const merge_ctx *c, const char *dir) {
  char path[ITR_PATH_MAX + 96];
  snprintf(path, sizeof path, "%s/checkpoint.h5", dir);
  remove(path);
  for (int g = 1; g <= c->n_stages && c->n_stages > 1; g++)
    for (int k = 1; k <= c->opt->max_iter; k++) {
      snprintf(path, sizeof path, "%s/checkpoint.stage%dof%d.iter%d.h5", dir, g, c->n_stages, k);
      remove(path);
    }
}

itr_err checkpoint_read_stage(merge_ctx *c, int k) {
  char path[ITR_PATH_MAX + 96], fp[8192], got[8192], st[96], want[96];
  stage_path(c, k, path, sizeof path);
  itr_h5 *h = NULL;
  ITR_TRY(itr_h5_open(path, &h));
  itr_err e = ITR_OK;
  const size_t nslots = NSLOTS(c);
  fingerprint(c, fp, sizeof fp);
  snprintf(want, sizeof want, "%d %d %d %d", c->stage, c->n_stages, c->layer_lo, c->layer_hi);
  ITR_TRY_GOTO(itr_h5_get_attr(h, "fingerprint", got, sizeof got), e, done);
  ITR_TRY_GOTO(itr_h5_get_attr(h, "stage", st, sizeof st), e, done);
  if (strcmp(fp, got) != 0 || strcmp(st, want) != 0) {
    e = itr_error_set(ITR_ERR_INPUT,
                      "-restart: the checkpoint '%s' was made by a run with other inputs or options:\n  checkpoint: %s "
                      "(stage %s)\n  this run:   %s (stage %s)\nUse the same options, or run without -restart to start over.",
                      path, got, st, fp, want);
    goto done;
  }
  int64_t dc = (int64_t)nslots * c->N;
  ITR_TRY_GOTO(itr_h5_read_f64(h, "coef", 1, &dc, c->coef), e, done);
  ITR_TRY_GOTO(read_resid(h, c, nslots), e, done);
  for (int l = c->layer_lo; l < c->layer_hi; l++)
    for (int m = 0; m < c->arch.n_modules; m++) {
      int64_t d_out, d_in;
      const size_t q = SLOT(l, m);
      d_out = c->arch.module[m].d_out, d_in = c->arch.module[m].d_in;
      itr_update_fini(&c->cur[q]);
      ITR_TRY_GOTO(read_update(h, "cur", q, d_out, d_in, &c->cur[q]), e, done);
    }
done:
  (void)itr_h5_close(h, 0);
  return e;
}

itr_err stats_write(const merge_ctx *c, const char *dir) {
  char path[ITR_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/stats.h5", dir);
  itr_h5 *h = NULL;
  ITR_TRY(itr_h5_create(path, &h));
  const int L = c->cfg.num_hidden_layers, K = merge_n_iters(c);
  itr_err e = ITR_OK;
  int64_t dc[3] = {L, c->arch.n_modules, c->N}, dr[3] = {K, L, c->arch.n_modules};
  char names[ITR_ARCH_MAX_MODULES * 24] = "";
  for (int m = 0, n = 0; m < c->arch.n_modules && n >= 0 && (size_t)n < sizeof names; m++)
    n += snprintf(names + n, sizeof names - (size_t)n, "%s%s", m ? " " : "", c->arch.module[m].name);
  ITR_TRY_GOTO(itr_h5_set_attr(h, "modules", names), e, fail);
  ITR_TRY_GOTO(itr_h5_set_attr(h, "method", c->opt->method), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "adaptive_weight", 3, dc, c->coef), e, fail);
  ITR_TRY_GOTO(itr_h5_write_f64(h, "scaled_residual", 3, dr, c->resid), e, fail);
  return itr_h5_close(h, 1);
fail:
  (void)itr_h5_close(h, 0);
  return e;
}
