/* The SPD system T2 Y = RHS of one module: local Cholesky solve and the scaled residual check. */
#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/merge.h"

void itr_system_fini(itr_system *sys) {
  if (!sys) return;
  free(sys->T2);
  free(sys->rhs);
  free(sys->coef);
  memset(sys, 0, sizeof *sys);
}

itr_err itr_system_create(int64_t d_in, int64_t nrhs, int dense, int N, double alpha_2, const char *label,
                          itr_system *sys) {
  ITR_CHECK(d_in >= 1 && nrhs >= 1 && N >= 1, ITR_ERR_INPUT,
            "module '%s': bad system size (d_in = %lld, nrhs = %lld, N = %d)", label ? label : "?", (long long)d_in,
            (long long)nrhs, N);
  itr_system s = {0};
  itr_err e;
  s.d_in = d_in;
  s.nrhs = nrhs;
  s.dense = dense;
  s.N = N;
  s.alpha_2 = alpha_2;
  snprintf(s.label, sizeof s.label, "%s", label ? label : "(unnamed module)");
  ITR_TRY_GOTO(itr_calloc((size_t)d_in * (size_t)d_in, sizeof(double), "T2", &s.T2), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)nrhs * (size_t)d_in, sizeof(double), "right-hand sides", &s.rhs), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)N, sizeof(double), "merge coefficients", &s.coef), e, fail);
  *sys = s;
  return ITR_OK;
fail:
  itr_system_fini(&s);
  return e;
}

/* ||M||_inf of M (d, m) column-major (= (m, d) row-major): the largest row sum over the d rows. */
static double norm_inf(int64_t d, int64_t m, const double *a) {
  double mx = 0.0;
  for (int64_t i = 0; i < d; i++) {
    double s = 0.0;
    for (int64_t j = 0; j < m; j++) s += fabs(a[j * d + i]);
    if (!(s <= mx)) mx = s; /* NaN propagates */
  }
  return mx;
}

itr_err itr_system_check(itr_system *sys, const double *Y, const double *rhs0) {
  const int64_t d = sys->d_in, m = sys->nrhs;
  double *res = NULL;
  ITR_TRY(itr_calloc((size_t)m * (size_t)d, sizeof(double), "solve residual", &res));
  /* Y is (nrhs, d_in) row-major = column-major (d_in, nrhs): T2 Yc = RHSc  <=>  Y T2 = RHS */
  memcpy(res, rhs0, (size_t)m * (size_t)d * sizeof(double));
  cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, (int)m, (int)d, 1.0, sys->T2, (int)d, Y, (int)d,
              -1.0, res, (int)d);
  const double rn = norm_inf(d, m, res), an = norm_inf(d, d, sys->T2), yn = norm_inf(d, m, Y),
               bn = norm_inf(d, m, rhs0);
  free(res);
  sys->residual = itr_scaled_residual(rn, an, yn, bn, d);
  sys->passed = itr_residual_passed(sys->residual);
  itr_log(sys->passed ? ITR_LOG_DEBUG : ITR_LOG_ERROR, "solve %s: d_in %lld, %lld rhs: scaled residual %.3g %s (threshold %.0f)",
          sys->label, (long long)d, (long long)m, sys->residual, sys->passed ? "PASSED" : "FAILED",
          ITR_RESIDUAL_THRESHOLD);
  return ITR_OK;
}

itr_err itr_system_solve_local(itr_system *sys) {
  ITR_CHECK(sys && sys->T2 && sys->rhs && sys->d_in >= 1 && sys->nrhs >= 1, ITR_ERR_INPUT,
            "solve: system not assembled");
  ITR_CHECK(!sys->solved, ITR_ERR_INPUT, "solve %s: system already solved", sys->label);
  const int64_t d = sys->d_in, m = sys->nrhs;
  double *diag = NULL, *rhs0 = NULL;
  itr_err e;
  ITR_TRY_GOTO(itr_calloc((size_t)d, sizeof(double), "T2 diagonal", &diag), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)m * (size_t)d, sizeof(double), "right-hand sides copy", &rhs0), e, done);
  memcpy(rhs0, sys->rhs, (size_t)m * (size_t)d * sizeof(double));
  for (int64_t i = 0; i < d; i++) diag[i] = sys->T2[i * d + i];
  /* Column-major 'U': a[i + j d] with i <= j (the row-major lower triangle) holds the factor; the
   * other strict triangle keeps T2, which restores it below. */
  lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', (lapack_int)d, sys->T2, (lapack_int)d);
  if (info == 0)
    info = LAPACKE_dpotrs(LAPACK_COL_MAJOR, 'U', (lapack_int)d, (lapack_int)m, sys->T2, (lapack_int)d,
                          sys->rhs, (lapack_int)d);
  for (int64_t j = 0; j < d; j++)
    for (int64_t i = 0; i < j; i++) sys->T2[i + j * d] = sys->T2[j + i * d];
  for (int64_t i = 0; i < d; i++) sys->T2[i * d + i] = diag[i];
  if (info < 0) {
    memcpy(sys->rhs, rhs0, (size_t)m * (size_t)d * sizeof(double));
    e = itr_error_set(ITR_ERR_INTERNAL, "solve %s: LAPACK dpotrf/dpotrs rejected argument %d (a bug)",
                      sys->label, (int)-info);
    goto done;
  }
  if (info > 0) {
    memcpy(sys->rhs, rhs0, (size_t)m * (size_t)d * sizeof(double));
    e = itr_error_set(ITR_ERR_NUMERIC,
                      "module '%s': T2 (%lld x %lld) is not positive definite (Cholesky failed at "
                      "leading minor %d, diagonal %g). Raise the ridge: -alpha_2 (now %g), e.g. "
                      "-alpha_2 %g, or check the statistics for NaN",
                      sys->label, (long long)d, (long long)d, (int)info, diag[info - 1], sys->alpha_2,
                      sys->alpha_2 > 0 ? sys->alpha_2 * 100 : 1e-6);
    goto done;
  }
  sys->solved = 1;
  if (itr_fault_residual(sys->label)) /* fault injection: a wrong solution must FAIL the check */
    for (int64_t q = 0; q < m * d; q++) sys->rhs[q] += 1.0;
  ITR_TRY_GOTO(itr_system_check(sys, sys->rhs, rhs0), e, done);
  if (!sys->passed) {
    e = itr_residual_error(sys->label, sys->residual, sys->alpha_2);
    goto done;
  }
  e = ITR_OK;
done:
  free(diag);
  free(rhs0);
  return e;
}

void itr_system_transpose(int64_t m, int64_t n, const double *src, double *dst) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) dst[j * m + i] = src[i * n + j];
}
