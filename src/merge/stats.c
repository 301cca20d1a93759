/* Per-site statistics in float64, additive over row blocks (see include/iteris/merge.h). */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/merge.h"

#define STATS_CHUNK 256 /* rows converted to f64 per BLAS call */

itr_err itr_stats_init(itr_stats *st, int64_t d_in, int mode) {
  ITR_CHECK(d_in >= 1, ITR_ERR_INPUT, "statistics: d_in must be >= 1, got %lld", (long long)d_in);
  ITR_CHECK(mode == ITR_STATS_FULL_CROSS || mode == ITR_STATS_NO_CROSS, ITR_ERR_INPUT,
            "statistics: unknown mode %d (expected ITR_STATS_FULL_CROSS or ITR_STATS_NO_CROSS)", mode);
  size_t dd;
  ITR_CHECK(itr_mul_size((size_t)d_in, (size_t)d_in, &dd), ITR_ERR_INPUT,
            "statistics: d_in = %lld overflows d_in^2", (long long)d_in);
  itr_stats s = {0};
  s.d_in = d_in;
  s.mode = mode;
  s.xt_is_x = 1;
  s.chunk = STATS_CHUNK;
  ITR_TRY(itr_calloc(dd, sizeof(double), "gram X^T X", &s.gram_x));
  itr_err e = itr_calloc((size_t)(2 * s.chunk), (size_t)d_in * sizeof(double), "statistics scratch",
                         &s.scratch);
  if (e != ITR_OK) {
    free(s.gram_x);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *st = s;
  return ITR_OK;
}

void itr_stats_fini(itr_stats *st) {
  if (!st) return;
  free(st->gram_x);
  free(st->gram_t);
  free(st->cross);
  free(st->scratch);
  memset(st, 0, sizeof *st);
}

static void to_f64(int64_t n, const float *src, double *dst) {
  for (int64_t i = 0; i < n; i++) dst[i] = (double)src[i];
}

itr_err itr_stats_add_x(itr_stats *st, int64_t T, const float *x) {
  ITR_CHECK(st && st->gram_x, ITR_ERR_INPUT, "statistics: add_x on uninitialised statistics (or after drop_x)");
  ITR_CHECK(T >= 0 && (T == 0 || x), ITR_ERR_INPUT, "statistics: bad block (T = %lld, x = %p)",
            (long long)T, (const void *)x);
  const int64_t d = st->d_in;
  for (int64_t t0 = 0; t0 < T; t0 += st->chunk) {
    int64_t k = T - t0 < st->chunk ? T - t0 : st->chunk;
    to_f64(k * d, x + t0 * d, st->scratch);
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)k, 1.0, st->scratch, (int)d, 1.0,
                st->gram_x, (int)d);
  }
  st->n_x += T;
  return ITR_OK;
}

itr_err itr_stats_reset_xt(itr_stats *st) {
  ITR_CHECK(st && st->scratch, ITR_ERR_INPUT, "statistics: reset_xt on uninitialised statistics");
  const size_t dd = (size_t)st->d_in * (size_t)st->d_in;
  if (!st->gram_t) ITR_TRY(itr_calloc(dd, sizeof(double), "gram Xt^T Xt", &st->gram_t));
  if (st->mode == ITR_STATS_FULL_CROSS && !st->cross)
    ITR_TRY(itr_calloc(dd, sizeof(double), "cross X^T Xt", &st->cross));
  memset(st->gram_t, 0, dd * sizeof(double));
  if (st->cross) memset(st->cross, 0, dd * sizeof(double));
  st->n_t = 0;
  st->xt_is_x = 0;
  return ITR_OK;
}

itr_err itr_stats_add_pair(itr_stats *st, int64_t T, const float *x, const float *xt) {
  ITR_CHECK(st && st->scratch, ITR_ERR_INPUT, "statistics: add_pair on uninitialised statistics");
  ITR_CHECK(!st->xt_is_x, ITR_ERR_INPUT,
            "statistics: add_pair while Xt = X (iteration 1). Call itr_stats_reset_xt first.");
  ITR_CHECK(T >= 0 && (T == 0 || (x && xt)), ITR_ERR_INPUT, "statistics: bad pair block (T = %lld)",
            (long long)T);
  const int64_t d = st->d_in;
  double *xs = st->scratch, *ts = st->scratch + st->chunk * d;
  for (int64_t t0 = 0; t0 < T; t0 += st->chunk) {
    int64_t k = T - t0 < st->chunk ? T - t0 : st->chunk;
    to_f64(k * d, xt + t0 * d, ts);
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)k, 1.0, ts, (int)d, 1.0,
                st->gram_t, (int)d);
    if (st->cross) {
      to_f64(k * d, x + t0 * d, xs);
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)k, 1.0, xs, (int)d,
                  ts, (int)d, 1.0, st->cross, (int)d);
    }
  }
  st->n_t += T;
  return ITR_OK;
}

static void mirror_upper(int64_t d, double *g) {
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = 0; j < i; j++) g[i * d + j] = g[j * d + i];
}

itr_err itr_stats_drop_x(itr_stats *st) {
  ITR_CHECK(st && st->scratch && !st->xt_is_x, ITR_ERR_INPUT,
            "statistics: drop_x needs the Xt statistics of an iteration >= 2 (call itr_stats_reset_xt first)");
  free(st->gram_x);
  st->gram_x = NULL;
  st->n_x = 0;
  return ITR_OK;
}

void itr_stats_finalize(itr_stats *st) {
  if (!st || !st->scratch) return;
  if (st->gram_x) mirror_upper(st->d_in, st->gram_x);
  if (st->gram_t) mirror_upper(st->d_in, st->gram_t);
}

const double *itr_stats_gram_t(const itr_stats *st) { return st->xt_is_x ? st->gram_x : st->gram_t; }
const double *itr_stats_cross(const itr_stats *st) { return st->xt_is_x ? st->gram_x : st->cross; }

int itr_stats_additive(itr_stats *st, double *bufs[3], int64_t counts[3]) {
  int n = 0;
  const int64_t dd = st->d_in * st->d_in;
  if (st->gram_x) bufs[n] = st->gram_x, counts[n++] = dd;
  if (!st->xt_is_x && st->gram_t) bufs[n] = st->gram_t, counts[n++] = dd;
  if (!st->xt_is_x && st->cross) bufs[n] = st->cross, counts[n++] = dd;
  return n;
}

itr_err itr_stats_cross_add(int r, int64_t d_in, const double *A, int64_t T, const float *x,
                            const float *xt, double *P) {
  ITR_CHECK(r >= 0 && d_in >= 1 && T >= 0, ITR_ERR_INPUT,
            "cross term: bad sizes r = %d, d_in = %lld, T = %lld", r, (long long)d_in, (long long)T);
  if (r == 0 || T == 0) return ITR_OK;
  double *xs = NULL, *ts = NULL, *xa = NULL;
  itr_err e;
  ITR_TRY_GOTO(itr_calloc((size_t)T * (size_t)d_in, sizeof(double), "cross term x block", &xs), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)T * (size_t)d_in, sizeof(double), "cross term xt block", &ts), e, done);
  ITR_TRY_GOTO(itr_calloc((size_t)T * (size_t)r, sizeof(double), "cross term X A^T", &xa), e, done);
  to_f64(T * d_in, x, xs);
  to_f64(T * d_in, xt, ts);
  /* xa (T, r) = x A^T; P (r, d_in) += xa^T xt */
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, r, (int)d_in, 1.0, xs, (int)d_in, A,
              (int)d_in, 0.0, xa, r);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, (int)d_in, (int)T, 1.0, xa, r, ts,
              (int)d_in, 1.0, P, (int)d_in);
  e = ITR_OK;
done:
  free(xs);
  free(ts);
  free(xa);
  return e;
}

itr_err itr_stats_cross_norm2_kernel(int64_t n, int64_t d_in, const float *x, const float *xt,
                                     double *out) {
  ITR_CHECK(n >= 0 && d_in >= 1, ITR_ERR_INPUT, "cross norm: bad sizes n = %lld, d_in = %lld",
            (long long)n, (long long)d_in);
  if (n == 0) {
    *out = 0.0;
    return ITR_OK;
  }
  double *xs = NULL, *ts = NULL, *kx = NULL, *kt = NULL;
  itr_err e;
  size_t nd = (size_t)n * (size_t)d_in, nn = (size_t)n * (size_t)n;
  ITR_TRY_GOTO(itr_calloc(nd, sizeof(double), "cross norm x", &xs), e, done);
  ITR_TRY_GOTO(itr_calloc(nd, sizeof(double), "cross norm xt", &ts), e, done);
  ITR_TRY_GOTO(itr_calloc(nn, sizeof(double), "kernel X X^T", &kx), e, done);
  ITR_TRY_GOTO(itr_calloc(nn, sizeof(double), "kernel Xt Xt^T", &kt), e, done);
  to_f64((int64_t)nd, x, xs);
  to_f64((int64_t)nd, xt, ts);
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)n, (int)d_in, 1.0, xs, (int)d_in, 0.0, kx,
              (int)n);
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)n, (int)d_in, 1.0, ts, (int)d_in, 0.0, kt,
              (int)n);
  /* <Kx, Kt> over the full symmetric matrices from their upper triangles */
  double s = 0.0;
  for (int64_t i = 0; i < n; i++) {
    s += kx[i * n + i] * kt[i * n + i];
    for (int64_t j = i + 1; j < n; j++) s += 2.0 * kx[i * n + j] * kt[i * n + j];
  }
  *out = s;
  e = ITR_OK;
done:
  free(xs);
  free(ts);
  free(kx);
  free(kt);
  return e;
}

itr_err itr_stats_xw_norm2(int64_t d_out, int64_t d_in, const double *gram, const double *W,
                           double *out) {
  ITR_CHECK(d_out >= 1 && d_in >= 1 && gram && W, ITR_ERR_INPUT,
            "||X W^T||: bad arguments (d_out = %lld, d_in = %lld)", (long long)d_out, (long long)d_in);
  double *ws = NULL;
  ITR_TRY(itr_calloc((size_t)d_out * (size_t)d_in, sizeof(double), "W X^T X", &ws));
  /* ws (d_out, d_in) = W gram; result = sum(ws .* W) = tr(W gram W^T) */
  cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, (int)d_out, (int)d_in, 1.0, gram, (int)d_in, W,
              (int)d_in, 0.0, ws, (int)d_in);
  double s = 0.0;
  for (int64_t i = 0; i < d_out * d_in; i++) s += ws[i] * W[i];
  free(ws);
  *out = s;
  return ITR_OK;
}
