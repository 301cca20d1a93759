/* IterIS: adaptive weights, assembly of T2 and of the R (or d_out) right-hand sides, exactly as
 * /work/shared/ALGORITHM.md, with the reg_coef mixing Xt' = (1 - rho) Xt + rho X expanded in the
 * statistics:
 *   X^T Xt'   = (1 - rho) X^T Xt + rho X^T X
 *   Xt'^T Xt' = (1 - rho)^2 Xt^T Xt + rho (1 - rho) (X^T Xt + Xt^T X) + rho^2 X^T X
 *   A X^T Xt' = (1 - rho) P + rho A X^T X,   P = (X A^T)^T Xt = A X^T Xt               */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/merge.h"

void itr_iteris_opts_default(itr_iteris_opts *o) {
  o->alpha_1 = 1e-7;
  o->alpha_2 = 1e-7;
  o->reg_coef = 0.0;
  o->with_pretrain = 0;
  o->adaptive = 1;
}

/* W = W0 + s B A  (d_out, d_in); W0 NULL is zero. */
static void full_weight(const itr_merge_task *t, int64_t d_out, int64_t d_in, const double *W0,
                        double *W) {
  if (W0)
    memcpy(W, W0, (size_t)d_out * (size_t)d_in * sizeof(double));
  else
    memset(W, 0, (size_t)d_out * (size_t)d_in * sizeof(double));
  if (t->r > 0)
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)d_in, t->r, t->scale, t->B,
                t->r, t->A, (int)d_in, 1.0, W, (int)d_in);
}

itr_err itr_iteris_coef(const itr_merge_task *t, int64_t d_out, int64_t d_in, const double *W0,
                        const char *label, int task, double *c) {
  double *W = NULL;
  ITR_TRY(itr_calloc((size_t)d_out * (size_t)d_in, sizeof(double), "W0 + dW", &W));
  full_weight(t, d_out, d_in, W0, W);
  double num = 0.0;
  for (int64_t i = 0; i < d_out * d_in; i++) num += W[i] * W[i];
  double den = t->xw_norm2;
  itr_err e = ITR_OK;
  if (!(den > 0)) e = itr_stats_xw_norm2(d_out, d_in, t->stats->gram_x, W, &den);
  free(W);
  ITR_TRY(e);
  ITR_CHECK(den > 0 && isfinite(den) && num > 0 && isfinite(num), ITR_ERR_NUMERIC,
            "module '%s', task %d: adaptive weight ||W0 + dW||^2 / ||X (W0 + dW)^T||^2 = %g / %g is "
            "undefined. Are the calibration inputs of this task zero (n_x = %lld rows)?",
            label, task, num, den, (long long)t->stats->n_x);
  *c = num / den;
  return ITR_OK;
}

static itr_err check_inputs(const itr_iteris_opts *o, int N, const itr_merge_task *tasks, int64_t d_out,
                            int64_t d_in, const char *label) {
  ITR_CHECK(o && tasks && N >= 1 && d_out >= 1 && d_in >= 1, ITR_ERR_INPUT,
            "module '%s': bad merge arguments (N = %d, d_out = %lld, d_in = %lld)", label, N,
            (long long)d_out, (long long)d_in);
  ITR_CHECK(o->alpha_1 >= 0 && isfinite(o->alpha_1), ITR_ERR_INPUT,
            "-alpha_1 must be a finite number >= 0, got %g", o->alpha_1);
  ITR_CHECK(o->alpha_2 >= 0 && isfinite(o->alpha_2), ITR_ERR_INPUT,
            "-alpha_2 must be a finite number >= 0, got %g", o->alpha_2);
  ITR_CHECK(o->reg_coef >= 0 && o->reg_coef <= 1, ITR_ERR_INPUT, "-reg_coef must be in [0, 1], got %g",
            o->reg_coef);
  for (int i = 0; i < N; i++) {
    const itr_merge_task *t = &tasks[i];
    ITR_CHECK(t->r >= 0 && (t->r == 0 || (t->A && t->B)), ITR_ERR_INPUT,
              "module '%s', task %d: rank %d without factors", label, i, t->r);
    ITR_CHECK(t->weight > 0 && isfinite(t->weight) && isfinite(t->scale), ITR_ERR_INPUT,
              "module '%s', task %d: manual coefficient %g must be > 0 (scaling %g)", label, i, t->weight,
              t->scale);
    ITR_CHECK(t->stats && (t->stats->gram_x || (!t->stats->xt_is_x && o->reg_coef == 0)), ITR_ERR_INPUT,
              "module '%s', task %d: no statistics (X^T X is needed in iteration 1 and with -reg_coef > 0)", label, i);
    ITR_CHECK(t->stats->d_in == d_in, ITR_ERR_INPUT,
              "module '%s', task %d: statistics have d_in = %lld, the module takes %lld inputs", label, i,
              (long long)t->stats->d_in, (long long)d_in);
    const itr_stats *s = t->stats;
    if (!s->xt_is_x) {
      ITR_CHECK(s->gram_t, ITR_ERR_INPUT, "module '%s', task %d: no Xt statistics", label, i);
      if (!s->cross) {
        ITR_CHECK(o->reg_coef == 0 && !o->with_pretrain, ITR_ERR_INPUT,
                  "module '%s', task %d: -reg_coef > 0 and -with_pretrain 1 need the full cross "
                  "statistic X^T Xt (ITR_STATS_FULL_CROSS)",
                  label, i);
        ITR_CHECK((t->r == 0 || t->P) && t->cross_norm2 >= 0, ITR_ERR_INPUT,
                  "module '%s', task %d: statistics without cross need P_i and ||X^T Xt||^2", label, i);
      }
    }
  }
  return ITR_OK;
}

/* Frobenius norms of the mixed cross X^T Xt' and of the mixed Gram Xt'^T Xt'. */
static void mixed_norms(const itr_merge_task *t, double rho, double *n1, double *n2) {
  const itr_stats *s = t->stats;
  const int64_t d = s->d_in;
  const double *S = s->gram_x, *G = itr_stats_gram_t(s), *C = itr_stats_cross(s);
  double a = 0.0, b = 0.0;
  if (s->xt_is_x) {
    for (int64_t k = 0; k < d * d; k++) a += S[k] * S[k];
    *n1 = *n2 = sqrt(a);
    return;
  }
  const double p = 1.0 - rho;
  const int use_s = rho > 0; /* S may be NULL (itr_stats_drop_x) when rho == 0 */
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = 0; j < d; j++) {
      double g = p * p * G[i * d + j] + (use_s ? rho * rho * S[i * d + j] : 0.0);
      if (C) {
        double c = p * C[i * d + j] + (use_s ? rho * S[i * d + j] : 0.0);
        a += c * c;
        g += rho * p * (C[i * d + j] + C[j * d + i]);
      }
      b += g * g;
    }
  *n1 = C ? sqrt(a) : sqrt(t->cross_norm2);
  *n2 = sqrt(b);
}

/* T2 += cw Xt'^T Xt' + shift I */
static void add_gram(const itr_merge_task *t, double rho, double cw, double shift, double *T2) {
  const itr_stats *s = t->stats;
  const int64_t d = s->d_in;
  const double *S = s->gram_x, *G = itr_stats_gram_t(s), *C = itr_stats_cross(s);
  const double p = 1.0 - rho;
  if (s->xt_is_x) {
    for (int64_t k = 0; k < d * d; k++) T2[k] += cw * S[k];
  } else {
    for (int64_t i = 0; i < d; i++)
      for (int64_t j = 0; j < d; j++) {
        double g = p * p * G[i * d + j] + (rho > 0 ? rho * rho * S[i * d + j] : 0.0);
        if (C && rho > 0) g += rho * p * (C[i * d + j] + C[j * d + i]);
        T2[i * d + j] += cw * g;
      }
  }
  for (int64_t i = 0; i < d; i++) T2[i * d + i] += shift;
}

/* out (m, d_in) = f (F X^T Xt' + ridge F) for F (m, d_in); P = F X^T Xt (unmixed) or NULL. */
static void right_times_M(const itr_merge_task *t, double rho, double f, double ridge, int64_t m, const double *F, const double *P, double beta, double *out) {
  const itr_stats *s = t->stats;
  const int d = (int)s->d_in;
  const double *S = s->gram_x, *C = itr_stats_cross(s);
  double p = s->xt_is_x ? 0.0 : 1.0 - rho, q = s->xt_is_x ? 1.0 : rho;
  /* out = beta out + f q F S + f p (F C or P) + f ridge F */
  if (q != 0)
    cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, (int)m, d, f * q, S, d, F, d, beta, out, d);
  else if (beta != 1.0)
    for (int64_t k = 0; k < m * d; k++) out[k] *= beta;
  if (p != 0) {
    if (P)
      for (int64_t k = 0; k < m * d; k++) out[k] += f * p * P[k];
    else
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, d, d, f * p, F, d, C, d, 1.0, out, d);
  }
  for (int64_t k = 0; k < m * d; k++) out[k] += f * ridge * F[k];
}

itr_err itr_iteris_terms(const itr_terms_params *p, const itr_merge_task *t, int i, double coef, double n1, double n2,
                         const char *label, itr_task_terms *out) {
  ITR_CHECK(coef > 0 && isfinite(coef), ITR_ERR_NUMERIC, "module '%s', task %d: adaptive weight %g is not > 0", label, i,
            coef);
  const double cw = coef * t->weight; /* c_i w_i */
  /* T2 += c_i w_i (G' + alpha_2 ||G'|| I); rows = c_i w_i s_i (A X^T Xt' + alpha_1 ||X^T Xt'|| A), or
   * with_pretrain rhs += c_i w_i ((W0 + dW_i) X^T Xt' + alpha_1 ||X^T Xt'|| (W0 + dW_i)) */
  *out = (itr_task_terms){.weight = cw, .gram = cw, .offdiag = 1.0, .shift = cw * p->alpha_2 * n2,
                          .rhs = p->dense ? cw : cw * t->scale, .cross = 1.0, .diag = 0.0, .ridge = p->alpha_1 * n1};
  return ITR_OK;
}

itr_err itr_iteris_assemble_add(const itr_iteris_opts *o, const itr_merge_task *t, int i, int64_t d_out,
                                int64_t d_in, const double *W0, double c, int64_t row, itr_system *sys) {
  const char *label = sys->label;
  ITR_TRY(check_inputs(o, 1, t, d_out, d_in, label));
  ITR_CHECK(i >= 0 && i < sys->N && sys->d_in == d_in && sys->dense == (o->with_pretrain ? 1 : 0) &&
                (sys->dense ? sys->nrhs == d_out : row >= 0 && row + t->r <= sys->nrhs),
            ITR_ERR_INTERNAL, "module '%s': task %d does not fit the system (row %lld, r %d, nrhs %lld)", label, i,
            (long long)row, t->r, (long long)sys->nrhs);
  double n1, n2;
  mixed_norms(t, o->reg_coef, &n1, &n2);
  const itr_terms_params p = {o->alpha_1, o->alpha_2, 0.0, sys->dense};
  itr_task_terms tt;
  ITR_TRY(itr_iteris_terms(&p, t, i, c, n1, n2, label, &tt));
  sys->coef[i] = tt.weight;
  add_gram(t, o->reg_coef, tt.gram, tt.shift, sys->T2);
  if (sys->dense) {
    double *W = NULL;
    ITR_TRY(itr_calloc((size_t)d_out * (size_t)d_in, sizeof(double), "W0 + dW", &W));
    full_weight(t, d_out, d_in, W0, W);
    right_times_M(t, o->reg_coef, tt.rhs, tt.ridge, d_out, W, NULL, 1.0, sys->rhs);
    free(W);
  } else if (t->r > 0) {
    right_times_M(t, o->reg_coef, tt.rhs, tt.ridge, t->r, t->A, t->P, 0.0, sys->rhs + row * d_in);
  }
  return ITR_OK;
}

itr_err itr_iteris_assemble(const itr_iteris_opts *o, int N, const itr_merge_task *tasks,
                            int64_t d_out, int64_t d_in, const double *W0, const double *coef,
                            const char *label, itr_system *sys) {
  if (!label) label = "(unnamed module)";
  ITR_TRY(check_inputs(o, N, tasks, d_out, d_in, label));
  int64_t R = 0;
  for (int i = 0; i < N; i++) R += tasks[i].r;
  ITR_CHECK(o->with_pretrain || R > 0, ITR_ERR_INPUT,
            "module '%s': no adapter targets this module (R = 0); skip it", label);
  itr_system s = {0};
  itr_err e;
  ITR_TRY(itr_system_create(d_in, o->with_pretrain ? d_out : R, o->with_pretrain ? 1 : 0, N, o->alpha_2, label, &s));
  int64_t row = 0;
  for (int i = 0; i < N; i++) {
    double c = 1.0;
    if (coef)
      c = coef[i];
    else if (o->adaptive)
      ITR_TRY_GOTO(itr_iteris_coef(&tasks[i], d_out, d_in, W0, label, i, &c), e, fail);
    ITR_TRY_GOTO(itr_iteris_assemble_add(o, &tasks[i], i, d_out, d_in, W0, c, row, &s), e, fail);
    row += tasks[i].r;
  }
  *sys = s;
  return ITR_OK;
fail:
  itr_system_fini(&s);
  return e;
}

itr_err itr_iteris_solve_local(const itr_iteris_opts *o, int N, const itr_merge_task *tasks,
                               int64_t d_out, int64_t d_in, const double *W0, const double *coef,
                               const char *label, itr_update *out, itr_system *sys_out) {
  itr_system sys = {0};
  itr_update u = {0};
  itr_err e;
  ITR_TRY_GOTO(itr_iteris_assemble(o, N, tasks, d_out, d_in, W0, coef, label, &sys), e, fail);
  ITR_TRY_GOTO(itr_system_solve_local(&sys), e, fail);
  ITR_TRY_GOTO(itr_update_from_system(&sys, N, tasks, d_out, W0, &u), e, fail);
  *out = u;
  if (sys_out)
    *sys_out = sys;
  else
    itr_system_fini(&sys);
  return ITR_OK;
fail:
  itr_system_fini(&sys);
  return e;
}
