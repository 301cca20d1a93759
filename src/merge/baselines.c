/* Baselines of ALGORITHM.md: task_arithmetic, regmean, ties, dare, knots. */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/merge.h"
#include "merge/merge_internal.h"

static int64_t total_rank(int N, const itr_merge_task *t) {
  int64_t R = 0;
  for (int i = 0; i < N; i++) R += t[i].r;
  return R;
}

static itr_err check_factors(int N, const itr_merge_task *tasks, int64_t d_out, int64_t d_in,
                             const char *what) {
  ITR_CHECK(N >= 1 && tasks && d_out >= 1 && d_in >= 1, ITR_ERR_INPUT,
            "%s: bad arguments (N = %d, d_out = %lld, d_in = %lld)", what, N, (long long)d_out,
            (long long)d_in);
  for (int i = 0; i < N; i++)
    ITR_CHECK(tasks[i].r >= 0 && (tasks[i].r == 0 || (tasks[i].A && tasks[i].B)), ITR_ERR_INPUT,
              "%s: task %d has rank %d without factors", what, i, tasks[i].r);
  ITR_CHECK(total_rank(N, tasks) > 0, ITR_ERR_INPUT, "%s: no adapter targets this module (R = 0)", what);
  return ITR_OK;
}

/* [B_1 | .. | B_N] (d_out, R) */
static itr_err concat_B(int N, const itr_merge_task *tasks, int64_t d_out, int64_t R, double **out) {
  double *B = NULL;
  ITR_TRY(itr_calloc((size_t)d_out * (size_t)R, sizeof(double), "concatenated B", &B));
  int64_t off = 0;
  for (int i = 0; i < N; i++) {
    for (int64_t o = 0; o < d_out; o++)
      for (int j = 0; j < tasks[i].r; j++) B[o * R + off + j] = tasks[i].B[o * tasks[i].r + j];
    off += tasks[i].r;
  }
  *out = B;
  return ITR_OK;
}

itr_err itr_baseline_task_arithmetic(int N, const itr_merge_task *tasks, int64_t d_out, int64_t d_in,
                                     double lambda, itr_update *out) {
  ITR_TRY(check_factors(N, tasks, d_out, d_in, "task_arithmetic"));
  const int64_t R = total_rank(N, tasks);
  itr_update u = {0};
  itr_err e;
  u.d_out = d_out, u.d_in = d_in, u.rank = R, u.energy_kept = 1.0;
  ITR_TRY_GOTO(concat_B(N, tasks, d_out, R, &u.B), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)R * (size_t)d_in, sizeof(double), "merged A", &u.A), e, fail);
  int64_t row = 0;
  for (int i = 0; i < N; i++) {
    const double f = lambda * tasks[i].weight * tasks[i].scale;
    for (int64_t k = 0; k < (int64_t)tasks[i].r * d_in; k++) u.A[row * d_in + k] = f * tasks[i].A[k];
    row += tasks[i].r;
  }
  *out = u;
  return ITR_OK;
fail:
  itr_update_fini(&u);
  return e;
}

itr_err itr_regmean_terms(const itr_terms_params *p, const itr_merge_task *t, int i, double coef, double n1,
                          double n2, const char *label, itr_task_terms *out) {
  (void)coef, (void)n1;
  const double a = p->regmean_alpha, shift = p->alpha_2 * n2;
  ITR_CHECK(a >= 0 && a <= 1, ITR_ERR_INPUT, "-regmean_alpha must be in [0, 1], got %g", a);
  ITR_CHECK(shift >= 0 && isfinite(shift), ITR_ERR_NUMERIC,
            "regmean %s, task %d: the ridge alpha_2 ||X^T X||_F = %g is not finite and >= 0", label, i, shift);
  /* T2 += Gr_i = X^T X (off-diagonal times a) + alpha_2 ||X^T X||_F I; rows = s_i A_i Gr_i =
   * s_i (a A X^T X + ((1 - a) diag(X^T X) + shift) .* A) */
  *out = (itr_task_terms){.weight = 1.0, .gram = 1.0, .offdiag = a, .shift = shift, .rhs = t->scale, .cross = a,
                          .diag = 1.0 - a, .ridge = shift};
  return ITR_OK;
}

itr_err itr_baseline_regmean_assemble_add(const itr_merge_task *t, int i, double regmean_alpha, double ridge,
                                          int64_t row, itr_system *sys) {
  const char *label = sys->label;
  const int64_t d = sys->d_in;
  ITR_CHECK(regmean_alpha >= 0 && regmean_alpha <= 1, ITR_ERR_INPUT,
            "-regmean_alpha must be in [0, 1], got %g", regmean_alpha);
  ITR_CHECK(ridge >= 0 && isfinite(ridge), ITR_ERR_INPUT, "regmean ridge must be >= 0, got %g", ridge);
  ITR_CHECK(t->stats && t->stats->gram_x && t->stats->d_in == d, ITR_ERR_INPUT,
            "regmean %s: task %d has no statistics for %lld inputs", label, i, (long long)d);
  ITR_CHECK(t->r >= 0 && (t->r == 0 || t->A), ITR_ERR_INPUT, "regmean %s: task %d has rank %d without factors", label,
            i, t->r);
  ITR_CHECK(i >= 0 && i < sys->N && !sys->dense && row >= 0 && row + t->r <= sys->nrhs, ITR_ERR_INTERNAL,
            "regmean %s: task %d does not fit the system", label, i);
  const double *S = t->stats->gram_x;
  double nrm = 0.0;
  for (int64_t k = 0; k < d * d; k++) nrm += S[k] * S[k];
  nrm = sqrt(nrm);
  const itr_terms_params p = {0.0, ridge, regmean_alpha, 0};
  itr_task_terms tt;
  ITR_TRY(itr_regmean_terms(&p, t, i, 1.0, 0.0, nrm, label, &tt));
  sys->coef[i] = tt.weight;
  for (int64_t a = 0; a < d; a++)
    for (int64_t b = 0; b < d; b++) sys->T2[a * d + b] += (a == b ? tt.gram : tt.gram * tt.offdiag) * S[a * d + b];
  for (int64_t a = 0; a < d; a++) sys->T2[a * d + a] += tt.shift;
  if (t->r == 0) return ITR_OK;
  /* rows = rhs (cross A S + (diag diag(S) + ridge) .* A) */
  double *out = sys->rhs + row * d;
  cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, t->r, (int)d, tt.rhs * tt.cross, S, (int)d, t->A, (int)d, 0.0,
              out, (int)d);
  for (int j = 0; j < t->r; j++)
    for (int64_t c = 0; c < d; c++) out[j * d + c] += tt.rhs * (tt.diag * S[c * d + c] + tt.ridge) * t->A[j * d + c];
  return ITR_OK;
}

itr_err itr_baseline_regmean_assemble(int N, const itr_merge_task *tasks, int64_t d_in,
                                      double regmean_alpha, double ridge, const char *label,
                                      itr_system *sys) {
  if (!label) label = "(unnamed module)";
  ITR_CHECK(N >= 1 && tasks && d_in >= 1, ITR_ERR_INPUT, "regmean %s: bad arguments", label);
  const int64_t R = total_rank(N, tasks);
  ITR_CHECK(R > 0, ITR_ERR_INPUT, "regmean %s: no adapter targets this module (R = 0)", label);
  itr_system s = {0};
  itr_err e;
  ITR_TRY(itr_system_create(d_in, R, 0, N, ridge, label, &s));
  int64_t row = 0;
  for (int i = 0; i < N; i++) {
    ITR_TRY_GOTO(itr_baseline_regmean_assemble_add(&tasks[i], i, regmean_alpha, ridge, row, &s), e, fail);
    row += tasks[i].r;
  }
  *sys = s;
  return ITR_OK;
fail:
  itr_system_fini(&s);
  return e;
}

/* The value v such that exactly `keep` of the n magnitudes are >= v when ties are broken by index:
 * the keep-th largest magnitude. a is scratch (n) and is reordered. 3-way quickselect. */
static double kth_largest(int64_t n, double *a, int64_t keep) {
  int64_t lo = 0, hi = n - 1, want = keep - 1; /* index in descending order */
  uint64_t x = 0x2545F4914F6CDD1Dull;
  while (lo < hi) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    double piv = a[lo + (int64_t)(x % (uint64_t)(hi - lo + 1))];
    int64_t lt = lo, i = lo, gt = hi; /* [lo,lt) > piv, [lt,i) == piv, (gt,hi] < piv */
    while (i <= gt) {
      if (a[i] > piv) {
        double t = a[lt]; a[lt] = a[i]; a[i] = t; lt++, i++;
      } else if (a[i] < piv) {
        double t = a[gt]; a[gt] = a[i]; a[i] = t; gt--;
      } else {
        i++;
      }
    }
    if (want < lt) hi = lt - 1;
    else if (want > gt) lo = gt + 1;
    else return piv;
  }
  return a[lo];
}

/* mask[k] = 1 for the top `keep` entries of |v| (ties broken by lower index first). */
static void top_mask(int64_t n, const double *v, int64_t keep, double *scratch, unsigned char *mask) {
  if (keep >= n) {
    memset(mask, 1, (size_t)n);
    return;
  }
  memset(mask, 0, (size_t)n);
  if (keep <= 0) return;
  for (int64_t k = 0; k < n; k++) scratch[k] = fabs(v[k]);
  const double thr = kth_largest(n, scratch, keep);
  int64_t kept = 0;
  for (int64_t k = 0; k < n; k++)
    if (fabs(v[k]) > thr) mask[k] = 1, kept++;
  for (int64_t k = 0; k < n && kept < keep; k++)
    if (fabs(v[k]) == thr) mask[k] = 1, kept++;
}

/* TIES on N arrays v_i (already weighted): trim, elect, disjoint mean, times lambda. */
static itr_err ties_core(int N, int64_t n, const double *const *v, const double *weights, double density,
                         double lambda, double *out) {
  ITR_CHECK(density > 0 && density <= 1, ITR_ERR_INPUT, "-density must be in (0, 1], got %g", density);
  unsigned char *mask = NULL;
  double *scratch = NULL;
  itr_err e;
  size_t nm;
  ITR_CHECK(itr_mul_size((size_t)N, (size_t)n, &nm), ITR_ERR_INPUT, "ties: N n overflows");
  ITR_TRY_GOTO(itr_calloc(nm, 1, "ties masks", &mask), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)n, sizeof(double), "ties scratch", &scratch), e, done);
  const int64_t keep = (int64_t)ceil(density * (double)n - 1e-9);
  for (int i = 0; i < N; i++) top_mask(n, v[i], keep, scratch, mask + (size_t)i * (size_t)n);
  for (int64_t k = 0; k < n; k++) {
    double sum = 0.0;
    for (int i = 0; i < N; i++)
      if (mask[(size_t)i * (size_t)n + (size_t)k]) sum += (weights ? weights[i] : 1.0) * v[i][k];
    double acc = 0.0;
    int cnt = 0;
    if (sum != 0.0)
      for (int i = 0; i < N; i++) {
        double x = (weights ? weights[i] : 1.0) * v[i][k];
        if (mask[(size_t)i * (size_t)n + (size_t)k] && x != 0.0 && (x > 0) == (sum > 0)) acc += x, cnt++;
      }
    out[k] = cnt ? lambda * acc / cnt : 0.0;
  }
  e = ITR_OK;
done:
  free(mask);
  free(scratch);
  return e;
}

itr_err itr_baseline_ties(int N, int64_t n, const double *const *dW, const double *weights,
                          double density, double lambda, double *out) {
  ITR_CHECK(N >= 1 && n >= 1 && dW && out, ITR_ERR_INPUT, "ties: bad arguments (N = %d, n = %lld)", N,
            (long long)n);
  if (weights)
    for (int i = 0; i < N; i++)
      ITR_CHECK(weights[i] > 0, ITR_ERR_INPUT, "ties: weight %d is %g, must be > 0", i, weights[i]);
  /* weights > 0 do not change the top-k by magnitude within one task, so trimming may use dW_i */
  ITR_TRY(ties_core(N, n, dW, weights, density, lambda, out));
  return ITR_OK;
}

itr_err itr_baseline_dare(int N, int64_t n, const double *const *dW, const double *weights, double p,
                          int use_ties, double density, double lambda, uint64_t seed, uint64_t stream,
                          double *out) {
  ITR_CHECK(N >= 1 && n >= 1 && dW && out, ITR_ERR_INPUT, "dare: bad arguments");
  ITR_CHECK(p >= 0 && p < 1, ITR_ERR_INPUT, "-dare_p must be in [0, 1), got %g", p);
  double *buf = NULL;
  double **v = NULL;
  itr_err e;
  size_t nm;
  ITR_CHECK(itr_mul_size((size_t)N, (size_t)n, &nm), ITR_ERR_INPUT, "dare: N n overflows");
  ITR_TRY_GOTO(itr_calloc(nm, sizeof(double), "dare dropped copies", &buf), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)N, sizeof(double *), "dare pointers", &v), e, done);
  const double keep_scale = 1.0 / (1.0 - p);
  for (int i = 0; i < N; i++) {
    itr_rng g;
    itr_rng_init_stream(&g, seed, stream + (uint64_t)i);
    const double w = weights ? weights[i] : 1.0;
    v[i] = buf + (size_t)i * (size_t)n;
    for (int64_t k = 0; k < n; k++) v[i][k] = itr_rng_uniform(&g) < p ? 0.0 : w * keep_scale * dW[i][k];
  }
  if (use_ties) {
    ITR_TRY_GOTO(ties_core(N, n, (const double *const *)v, NULL, density, lambda, out), e, done);
  } else {
    for (int64_t k = 0; k < n; k++) {
      double s = 0.0;
      for (int i = 0; i < N; i++) s += v[i][k];
      out[k] = lambda * s;
    }
  }
  e = ITR_OK;
done:
  free(buf);
  free(v);
  return e;
}

itr_err itr_baseline_knots(int N, const itr_merge_task *tasks, int64_t d_out, int64_t d_in, int use_ties,
                           double density, double lambda, itr_update *out) {
  ITR_TRY(check_factors(N, tasks, d_out, d_in, "knots"));
  const int64_t R = total_rank(N, tasks);
  double *Bc = NULL, *qb = NULL, *rb = NULL, *M = NULL, *U = NULL, *S = NULL, *VT = NULL, *at = NULL,
         *Vi = NULL, *merged = NULL, *wts = NULL;
  double **qa = NULL, **ra = NULL;
  const double **vp = NULL;
  itr_update u = {0};
  itr_err e;
  ITR_TRY_GOTO(itr_calloc((size_t)N, sizeof(double *), "knots Q_i", &qa), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)N, sizeof(double *), "knots R_i", &ra), e, done);
  ITR_TRY_GOTO(concat_B(N, tasks, d_out, R, &Bc), e, done);
  ITR_TRY_GOTO(itr_thin_qr(d_out, R, Bc, &qb, &rb), e, done); /* qb (d_out, kb), rb (kb, R) */
  const int64_t kb = d_out < R ? d_out : R;
  /* (s_i A_i)^T = Q_i (d_in, ka_i) R_i (ka_i, r_i) */
  int64_t Ka = 0;
  for (int i = 0; i < N; i++) {
    const int r = tasks[i].r;
    if (r == 0) continue;
    free(at), at = NULL;
    ITR_TRY_GOTO(itr_calloc((size_t)d_in * (size_t)r, sizeof(double), "knots A^T", &at), e, done);
    for (int j = 0; j < r; j++)
      for (int64_t c = 0; c < d_in; c++) at[c * r + j] = tasks[i].scale * tasks[i].A[j * d_in + c];
    ITR_TRY_GOTO(itr_thin_qr(d_in, r, at, &qa[i], &ra[i]), e, done);
    Ka += d_in < r ? d_in : r;
  }
  /* M (kb, Ka): block i = rb[:, rows of task i] R_i^T */
  ITR_TRY_GOTO(itr_calloc((size_t)kb * (size_t)Ka, sizeof(double), "knots core", &M), e, done);
  {
    int64_t roff = 0, coff = 0;
    for (int i = 0; i < N; i++) {
      const int r = tasks[i].r;
      if (r == 0) continue;
      const int64_t ka = d_in < r ? d_in : r;
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)kb, (int)ka, r, 1.0, rb + roff, (int)R, ra[i],
                  r, 0.0, M + coff, (int)Ka);
      roff += r, coff += ka;
    }
  }
  ITR_TRY_GOTO(itr_thin_svd(kb, Ka, M, &U, &S, &VT), e, done); /* U (kb, p), VT (p, Ka) */
  const int64_t p = kb < Ka ? kb : Ka;
  int64_t k = 0;
  const double tol = (p > 0 ? S[0] : 0.0) * (double)(d_out > N * d_in ? d_out : N * d_in) * DBL_EPSILON;
  while (k < p && S[k] > tol) k++;
  if (k == 0) {
    e = itr_error_set(ITR_ERR_NUMERIC, "knots: the concatenated updates are zero");
    goto done;
  }
  /* V_i^T (k, d_in) = VT[:k, cols of task i] Q_i^T, one after the other in Vi (N, k, d_in) */
  ITR_TRY_GOTO(itr_calloc((size_t)N * (size_t)k * (size_t)d_in, sizeof(double), "knots V_i", &Vi), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)k * (size_t)d_in, sizeof(double), "knots merged V", &merged), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)N, sizeof(double *), "knots pointers", &vp), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)N, sizeof(double), "knots weights", &wts), e, done);
  {
    int64_t coff = 0;
    for (int i = 0; i < N; i++) {
      double *vi = Vi + (size_t)i * (size_t)k * (size_t)d_in;
      vp[i] = vi;
      wts[i] = tasks[i].weight;
      const int r = tasks[i].r;
      if (r == 0) continue;
      const int64_t ka = d_in < r ? d_in : r;
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)k, (int)d_in, (int)ka, 1.0, VT + coff, (int)Ka,
                  qa[i], (int)ka, 0.0, vi, (int)d_in);
      coff += ka;
    }
  }
  if (use_ties) {
    for (int i = 0; i < N; i++)
      if (!(wts[i] > 0)) {
        e = itr_error_set(ITR_ERR_INPUT, "knots: weight %d is %g, must be > 0", i, wts[i]);
        goto done;
      }
    ITR_TRY_GOTO(ties_core(N, k * d_in, vp, wts, density, lambda, merged), e, done);
  } else {
    for (int i = 0; i < N; i++)
      for (int64_t c = 0; c < k * d_in; c++) merged[c] += lambda * wts[i] * vp[i][c];
  }
  /* dW = qb U[:, :k] S_k merged */
  u.d_out = d_out, u.d_in = d_in, u.rank = k, u.energy_kept = 1.0;
  ITR_TRY_GOTO(itr_calloc((size_t)d_out * (size_t)k, sizeof(double), "knots B", &u.B), e, done);
  for (int64_t a = 0; a < kb; a++)
    for (int64_t j = 0; j < k; j++) U[a * p + j] *= S[j];
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)k, (int)kb, 1.0, qb, (int)kb, U, (int)p,
              0.0, u.B, (int)k);
  u.A = merged, merged = NULL;
  *out = u;
  memset(&u, 0, sizeof u);
  e = ITR_OK;
done:
  itr_update_fini(&u);
  if (qa)
    for (int i = 0; i < N; i++) free(qa[i]);
  if (ra)
    for (int i = 0; i < N; i++) free(ra[i]);
  free(qa);
  free(ra);
  free(Bc);
  free(qb);
  free(rb);
  free(M);
  free(U);
  free(S);
  free(VT);
  free(at);
  free(Vi);
  free(merged);
  free((void *)vp);
  free(wts);
  return e;
}
