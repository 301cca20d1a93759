/* The MixLoRA feed-forward of one layer (itr_lora_moe in include/iteris/model.h): route each token to
 * its top_k experts, run the FFN with each expert's LoRA terms on the tokens routed to it, add the
 * weighted outputs to the residual. The base products of gate and up are shared by all experts; the
 * down product runs once per (token, chosen expert), as in the reference. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "model/model_internal.h"

/* Per token t: the chosen experts (top_k of softmax(z_t); ties: the lower index) and their weights
 * renormalised over the chosen. z (T, E) in, sel (T, k), w (T, k) out. */
void model_moe_route(const float *z, int64_t T, int E, int k, int *sel, float *w) {
  for (int64_t t = 0; t < T; t++) {
    const float *zt = z + t * E;
    float mx = zt[0];
    for (int e = 1; e < E; e++) mx = zt[e] > mx ? zt[e] : mx;
    double tot = 0;
    for (int e = 0; e < E; e++) tot += exp((double)zt[e] - mx);
    double chosen = 0;
    for (int j = 0; j < k; j++) { /* the j-th largest probability among those not chosen yet */
      int best = -1;
      for (int e = 0; e < E; e++) {
        int taken = 0;
        for (int i = 0; i < j; i++) taken |= sel[t * k + i] == e;
        if (!taken && (best < 0 || zt[e] > zt[best])) best = e;
      }
      sel[t * k + j] = best;
      w[t * k + j] = (float)(exp((double)zt[best] - mx) / tot);
      chosen += w[t * k + j];
    }
    for (int j = 0; j < k; j++) w[t * k + j] = (float)(w[t * k + j] / chosen);
  }
}

/* y (n, d_out) = x W^T + b (+ s (x A^T) B^T when tm has rank > 0); tmp (n, r) scratch. */
static void linear(float *y, const float *x, const float *W, const float *b, const itr_lora_term *tm, float *tmp, int n,
                   int d_out, int d_in) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d_out, d_in, 1.0f, x, d_in, W, d_in, 0.0f, y, d_out);
  if (tm && tm->r > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, tm->r, d_in, 1.0f, x, d_in, tm->A, d_in, 0.0f, tmp, tm->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d_out, tm->r, tm->scaling, tmp, tm->r, tm->B, tm->r, 1.0f, y,
                d_out);
  }
  if (b)
    for (int t = 0; t < n; t++)
      for (int o = 0; o < d_out; o++) y[(int64_t)t * d_out + o] += b[o];
}

itr_err model_moe_forward(float *hidden, const float *xn, const float *Wg, const float *bg, const float *Wu,
                          const float *bu, const float *Wd, const float *bd, const itr_lora_moe *mo, int T, int D,
                          int F) {
  const int E = mo->E, k = mo->top_k;
  int max_r = 1;
  for (int i = 0; i < 3 * E; i++) max_r = mo->experts[i].r > max_r ? mo->experts[i].r : max_r;
  size_t TF = (size_t)T * F, TD = (size_t)T * D;
  size_t total = (size_t)T * E + (size_t)T * k + 4 * TF + 2 * TD + (size_t)T * max_r;
  float *ws = NULL;
  int *sel = NULL, *rows = NULL;
  ITR_TRY(itr_calloc(total, sizeof(float), "MixLoRA workspace", &ws));
  itr_err err = itr_calloc((size_t)T * k, sizeof(int), "MixLoRA routes", &sel);
  if (err == ITR_OK) err = itr_calloc((size_t)T, sizeof(int), "MixLoRA rows", &rows);
  if (err != ITR_OK) {
    free(ws);
    free(sel);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  float *z = ws, *w = z + (size_t)T * E, *g0 = w + (size_t)T * k, *u0 = g0 + TF, *G = u0 + TF, *U = G + TF,
        *X = U + TF, *Y = X + TD, *tmp = Y + TD;
  float *wsel = NULL;
  /* route */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, E, D, 1.0f, xn, D, mo->router, D, 0.0f, z, E);
  model_moe_route(z, T, E, k, sel, w);
  /* the shared base products */
  linear(g0, xn, Wg, bg, NULL, tmp, T, F, D);
  linear(u0, xn, Wu, bu, NULL, tmp, T, F, D);
  err = itr_calloc((size_t)T, sizeof(float), "MixLoRA weights", &wsel);
  for (int e = 0; err == ITR_OK && e < E; e++) {
    int n = 0;
    for (int t = 0; t < T; t++)
      for (int j = 0; j < k; j++)
        if (sel[(size_t)t * k + j] == e) rows[n] = t, wsel[n++] = w[(size_t)t * k + j];
    if (n == 0) continue;
    for (int i = 0; i < n; i++) {
      memcpy(X + (size_t)i * D, xn + (size_t)rows[i] * D, (size_t)D * sizeof(float));
      memcpy(G + (size_t)i * F, g0 + (size_t)rows[i] * F, (size_t)F * sizeof(float));
      memcpy(U + (size_t)i * F, u0 + (size_t)rows[i] * F, (size_t)F * sizeof(float));
    }
    const itr_lora_term *te[3] = {&mo->experts[3 * e], &mo->experts[3 * e + 1], &mo->experts[3 * e + 2]};
    float *dst[2] = {G, U};
    for (int q = 0; q < 2; q++)
      if (te[q]->r > 0) { /* += s (X A^T) B^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, te[q]->r, D, 1.0f, X, D, te[q]->A, D, 0.0f, tmp,
                    te[q]->r);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, F, te[q]->r, te[q]->scaling, tmp, te[q]->r, te[q]->B,
                    te[q]->r, 1.0f, dst[q], F);
      }
    for (size_t i = 0; i < (size_t)n * F; i++) G[i] = G[i] / (1.0f + expf(-G[i])) * U[i];
    linear(Y, G, Wd, bd, te[2], tmp, n, D, F);
    for (int i = 0; i < n; i++) {
      float *h = hidden + (size_t)rows[i] * D;
      const float *y = Y + (size_t)i * D;
      for (int c = 0; c < D; c++) h[c] += wsel[i] * y[c];
    }
  }
  free(wsel);
  free(ws);
  free(sel);
  free(rows);
  return err;
}
