/* The merged update of one module: exact factored output, dense output, rank-k truncation. */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/merge.h"
#include "merge/merge_internal.h"

void itr_update_fini(itr_update *u) {
  if (!u) return;
  free(u->A);
  free(u->B);
  free(u->dense);
  memset(u, 0, sizeof *u);
}

void itr_lora_dense(int64_t d_out, int64_t d_in, int r, double s, const double *B, const double *A,
                    double *out) {
  if (r == 0) {
    memset(out, 0, (size_t)d_out * (size_t)d_in * sizeof(double));
    return;
  }
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)d_in, r, s, B, r, A, (int)d_in,
              0.0, out, (int)d_in);
}

itr_err itr_update_from_system(const itr_system *sys, int N, const itr_merge_task *tasks,
                               int64_t d_out, const double *W0, itr_update *out) {
  ITR_CHECK(sys && sys->solved, ITR_ERR_INPUT, "update: the system is not solved");
  const int64_t d_in = sys->d_in;
  itr_update u = {0};
  itr_err e;
  u.d_out = d_out;
  u.d_in = d_in;
  u.energy_kept = 1.0;
  if (sys->dense) {
    ITR_CHECK(sys->nrhs == d_out, ITR_ERR_INPUT, "update %s: dense system has %lld rhs, d_out is %lld",
              sys->label, (long long)sys->nrhs, (long long)d_out);
    ITR_TRY(itr_calloc((size_t)d_out * (size_t)d_in, sizeof(double), "dense update", &u.dense));
    for (int64_t k = 0; k < d_out * d_in; k++) u.dense[k] = sys->rhs[k] - (W0 ? W0[k] : 0.0);
    *out = u;
    return ITR_OK;
  }
  int64_t R = 0;
  for (int i = 0; i < N; i++) R += tasks[i].r;
  ITR_CHECK(R == sys->nrhs, ITR_ERR_INPUT, "update %s: tasks have R = %lld, the system %lld rhs",
            sys->label, (long long)R, (long long)sys->nrhs);
  u.rank = R;
  ITR_TRY_GOTO(itr_calloc((size_t)R * (size_t)d_in, sizeof(double), "merged A", &u.A), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)d_out * (size_t)R, sizeof(double), "merged B", &u.B), e, fail);
  memcpy(u.A, sys->rhs, (size_t)R * (size_t)d_in * sizeof(double));
  int64_t off = 0;
  for (int i = 0; i < N; i++) {
    const int r = tasks[i].r;
    for (int64_t o = 0; o < d_out; o++)
      for (int j = 0; j < r; j++) u.B[o * R + off + j] = tasks[i].B[o * r + j];
    off += r;
  }
  *out = u;
  return ITR_OK;
fail:
  itr_update_fini(&u);
  return e;
}

itr_err itr_update_to_dense(const itr_update *u, double **dense) {
  double *D = NULL;
  ITR_TRY(itr_calloc((size_t)u->d_out * (size_t)u->d_in, sizeof(double), "dense update", &D));
  if (u->rank == 0)
    memcpy(D, u->dense, (size_t)u->d_out * (size_t)u->d_in * sizeof(double));
  else
    itr_lora_dense(u->d_out, u->d_in, (int)u->rank, 1.0, u->B, u->A, D);
  *dense = D;
  return ITR_OK;
}

/* Thin QR of a (m, n) row-major: q (m, kq) and r (kq, n) upper trapezoidal, kq = min(m, n). */
itr_err itr_thin_qr(int64_t m, int64_t n, const double *a, double **q, double **r) {
  const int64_t kq = m < n ? m : n;
  double *w = NULL, *tau = NULL, *Q = NULL, *Rm = NULL;
  itr_err e;
  ITR_TRY_GOTO(itr_calloc((size_t)m * (size_t)n, sizeof(double), "QR work", &w), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)kq, sizeof(double), "QR tau", &tau), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)m * (size_t)kq, sizeof(double), "QR Q", &Q), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)kq * (size_t)n, sizeof(double), "QR R", &Rm), e, fail);
  memcpy(w, a, (size_t)m * (size_t)n * sizeof(double));
  lapack_int info = LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, (lapack_int)m, (lapack_int)n, w, (lapack_int)n, tau);
  if (info != 0) {
    e = itr_error_set(ITR_ERR_INTERNAL, "dgeqrf (%lld x %lld) returned info %d", (long long)m,
                      (long long)n, (int)info);
    goto fail;
  }
  for (int64_t i = 0; i < kq; i++)
    for (int64_t j = i; j < n; j++) Rm[i * n + j] = w[i * n + j];
  info = LAPACKE_dorgqr(LAPACK_ROW_MAJOR, (lapack_int)m, (lapack_int)kq, (lapack_int)kq, w, (lapack_int)n, tau);
  if (info != 0) {
    e = itr_error_set(ITR_ERR_INTERNAL, "dorgqr (%lld x %lld) returned info %d", (long long)m,
                      (long long)kq, (int)info);
    goto fail;
  }
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < kq; j++) Q[i * kq + j] = w[i * n + j];
  free(w);
  free(tau);
  *q = Q;
  *r = Rm;
  return ITR_OK;
fail:
  free(w);
  free(tau);
  free(Q);
  free(Rm);
  return e;
}

/* Thin SVD of a (m, n) row-major: u (m, p), s (p), vt (p, n), p = min(m, n). a is destroyed. */
itr_err itr_thin_svd(int64_t m, int64_t n, double *a, double **u, double **s, double **vt) {
  const int64_t p = m < n ? m : n;
  double *U = NULL, *S = NULL, *VT = NULL, *sup = NULL;
  itr_err e;
  ITR_TRY_GOTO(itr_calloc((size_t)m * (size_t)p, sizeof(double), "SVD U", &U), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)p, sizeof(double), "SVD S", &S), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)p * (size_t)n, sizeof(double), "SVD VT", &VT), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)p + 1, sizeof(double), "SVD work", &sup), e, fail);
  lapack_int info = LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'S', (lapack_int)m, (lapack_int)n, a,
                                   (lapack_int)n, S, U, (lapack_int)p, VT, (lapack_int)n, sup);
  if (info != 0) {
    e = itr_error_set(info > 0 ? ITR_ERR_NUMERIC : ITR_ERR_INTERNAL,
                      "dgesvd (%lld x %lld) returned info %d (%s)", (long long)m, (long long)n, (int)info,
                      info > 0 ? "did not converge: NaN or Inf in the update?" : "bad argument");
    goto fail;
  }
  free(sup);
  *u = U;
  *s = S;
  *vt = VT;
  return ITR_OK;
fail:
  free(U);
  free(S);
  free(VT);
  free(sup);
  return e;
}

/* out: rank k factors B = L U_k sqrt(S_k) (d_out, k), A = sqrt(S_k) VT_k Rt (k, d_in), zero-padded
 * past p. L (d_out, p_l) or NULL (identity), Rt (p_r, d_in) or NULL (identity). */
static itr_err build_factors(int64_t d_out, int64_t d_in, int64_t k, int64_t p, const double *U,
                             int64_t ldu, const double *S, const double *VT, int64_t ldvt,
                             const double *L, int64_t pl, const double *Rt, int64_t pr, itr_update *out) {
  itr_update u = {0};
  double *us = NULL, *sv = NULL;
  itr_err e;
  const int64_t kk = k < p ? k : p;
  u.d_out = d_out;
  u.d_in = d_in;
  u.rank = k;
  ITR_TRY_GOTO(itr_calloc((size_t)d_out * (size_t)k, sizeof(double), "truncated B", &u.B), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)k * (size_t)d_in, sizeof(double), "truncated A", &u.A), e, fail);
  /* us (pl, kk) = U[:, :kk] sqrt(S); sv (kk, pr) = sqrt(S) VT[:kk, :] */
  const int64_t rows_u = L ? pl : d_out, cols_v = Rt ? pr : d_in;
  ITR_TRY_GOTO(itr_calloc((size_t)rows_u * (size_t)(kk ? kk : 1), sizeof(double), "U sqrt(S)", &us), e, fail);
  ITR_TRY_GOTO(itr_calloc((size_t)(kk ? kk : 1) * (size_t)cols_v, sizeof(double), "sqrt(S) VT", &sv), e, fail);
  for (int64_t i = 0; i < rows_u; i++)
    for (int64_t j = 0; j < kk; j++) us[i * kk + j] = U[i * ldu + j] * sqrt(S[j]);
  for (int64_t j = 0; j < kk; j++)
    for (int64_t c = 0; c < cols_v; c++) sv[j * cols_v + c] = sqrt(S[j]) * VT[j * ldvt + c];
  if (kk > 0) {
    if (L)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)kk, (int)pl, 1.0, L, (int)pl,
                  us, (int)kk, 0.0, u.B, (int)k);
    else
      for (int64_t i = 0; i < d_out; i++) memcpy(u.B + i * k, us + i * kk, (size_t)kk * sizeof(double));
    if (Rt)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)kk, (int)d_in, (int)pr, 1.0, sv, (int)pr,
                  Rt, (int)d_in, 0.0, u.A, (int)d_in);
    else
      memcpy(u.A, sv, (size_t)kk * (size_t)d_in * sizeof(double));
  }
  double tot = 0.0, kept = 0.0;
  for (int64_t j = 0; j < p; j++) tot += S[j] * S[j];
  for (int64_t j = 0; j < kk; j++) kept += S[j] * S[j];
  u.energy_kept = tot > 0 ? kept / tot : 1.0;
  free(us);
  free(sv);
  *out = u;
  return ITR_OK;
fail:
  free(us);
  free(sv);
  itr_update_fini(&u);
  return e;
}

itr_err itr_update_truncate(const itr_update *in, int64_t k, itr_update *out) {
  ITR_CHECK(in && k >= 1, ITR_ERR_INPUT, "-out_rank must be >= 1, got %lld", (long long)k);
  const int64_t d_out = in->d_out, d_in = in->d_in;
  double *qb = NULL, *rb = NULL, *qa = NULL, *ra = NULL, *at = NULL, *M = NULL, *U = NULL, *S = NULL,
         *VT = NULL, *qat = NULL;
  itr_err e;
  if (in->rank == 0) {
    ITR_TRY_GOTO(itr_calloc((size_t)d_out * (size_t)d_in, sizeof(double), "SVD input", &M), e, done);
    memcpy(M, in->dense, (size_t)d_out * (size_t)d_in * sizeof(double));
    ITR_TRY_GOTO(itr_thin_svd(d_out, d_in, M, &U, &S, &VT), e, done);
    const int64_t p = d_out < d_in ? d_out : d_in;
    ITR_TRY_GOTO(build_factors(d_out, d_in, k, p, U, p, S, VT, d_in, NULL, 0, NULL, 0, out), e, done);
    e = ITR_OK;
    goto done;
  }
  const int64_t R = in->rank;
  const int64_t kb = d_out < R ? d_out : R, ka = d_in < R ? d_in : R;
  ITR_TRY_GOTO(itr_thin_qr(d_out, R, in->B, &qb, &rb), e, done); /* B = qb (d_out, kb) rb (kb, R) */
  ITR_TRY_GOTO(itr_calloc((size_t)d_in * (size_t)R, sizeof(double), "A^T", &at), e, done);
  for (int64_t i = 0; i < R; i++)
    for (int64_t j = 0; j < d_in; j++) at[j * R + i] = in->A[i * d_in + j];
  ITR_TRY_GOTO(itr_thin_qr(d_in, R, at, &qa, &ra), e, done); /* A^T = qa (d_in, ka) ra (ka, R) */
  ITR_TRY_GOTO(itr_calloc((size_t)kb * (size_t)ka, sizeof(double), "R_B R_A^T", &M), e, done);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)kb, (int)ka, (int)R, 1.0, rb, (int)R, ra,
              (int)R, 0.0, M, (int)ka);
  ITR_TRY_GOTO(itr_thin_svd(kb, ka, M, &U, &S, &VT), e, done);
  const int64_t p = kb < ka ? kb : ka;
  /* B A = qb U S VT qa^T */
  ITR_TRY_GOTO(itr_calloc((size_t)ka * (size_t)d_in, sizeof(double), "Q_A^T", &qat), e, done);
  for (int64_t i = 0; i < d_in; i++)
    for (int64_t j = 0; j < ka; j++) qat[j * d_in + i] = qa[i * ka + j];
  ITR_TRY_GOTO(build_factors(d_out, d_in, k, p, U, p, S, VT, ka, qb, kb, qat, ka, out), e, done);
  e = ITR_OK;
done:
  free(qb);
  free(rb);
  free(qa);
  free(ra);
  free(at);
  free(M);
  free(U);
  free(S);
  free(VT);
  free(qat);
  return e;
}

/* ||B D||_F^2 for B (m, r), D (r, n): tr(D^T (B^T B) D), no cancellation. */
static itr_err frob2_product(int64_t m, int64_t r, int64_t n, const double *B, const double *D, double *out) {
  double *G = NULL, *M = NULL;
  itr_err e = itr_calloc((size_t)(r * r) + 1, sizeof(double), "B^T B", &G);
  if (e == ITR_OK) e = itr_calloc((size_t)(r * n) + 1, sizeof(double), "B^T B D", &M);
  if (e == ITR_OK) {
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)r, (int)r, (int)m, 1.0, B, (int)r, B, (int)r, 0.0, G,
                (int)r);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)r, (int)n, (int)r, 1.0, G, (int)r, D, (int)n, 0.0, M,
                (int)n);
    double s = 0;
    for (int64_t q = 0; q < r * n; q++) s += D[q] * M[q];
    *out = s > 0 ? s : 0;
  }
  free(G);
  free(M);
  return e;
}

itr_err itr_update_change(const itr_update *now, const itr_update *before, double *rel) {
  *rel = NAN;
  const int empty = !before || (!before->dense && (before->rank == 0 || !before->A));
  if (empty || !now || (!now->dense && (now->rank == 0 || !now->A))) return ITR_OK;
  const int64_t dout = now->d_out, din = now->d_in;
  ITR_CHECK(before->d_out == dout && before->d_in == din, ITR_ERR_INTERNAL, "update change: shapes differ");
  double num = 0, den = 0;
  if (!now->dense && !before->dense && now->rank == before->rank &&
      !memcmp(now->B, before->B, (size_t)(dout * now->rank) * sizeof(double))) {
    double *D = NULL;
    ITR_TRY(itr_calloc((size_t)(now->rank * din), sizeof(double), "A change", &D));
    for (int64_t q = 0; q < now->rank * din; q++) D[q] = now->A[q] - before->A[q];
    itr_err e = frob2_product(dout, now->rank, din, now->B, D, &num);
    if (e == ITR_OK) e = frob2_product(dout, now->rank, din, now->B, now->A, &den);
    free(D);
    ITR_TRY(e);
  } else { /* dense, or different factors: through the dense difference */
    double *a = NULL, *b = NULL;
    itr_err e = itr_update_to_dense(now, &a);
    if (e == ITR_OK) e = itr_update_to_dense(before, &b);
    for (int64_t q = 0; e == ITR_OK && q < dout * din; q++) num += (a[q] - b[q]) * (a[q] - b[q]), den += a[q] * a[q];
    free(a);
    free(b);
    ITR_TRY(e);
  }
  if (den > 0) *rel = sqrt(num / den);
  return ITR_OK;
}
