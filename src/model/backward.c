/* The training pass of a Llama-family decoder: the forward of model.c with its activations kept
 * (a tape), next-token cross-entropy, and the backward pass down to every LoRA factor. Base
 * weights are frozen, so the backward forms the input gradients (dy W) and the factors' gradients
 * only. One function per step, outputs first, shapes in comments; the forward steps are model.c's.
 *
 * Backward of each step (dy: gradient of the output; everything float32, row sums in double):
 *   linear   y = x W^T + s (xd A^T) B^T      dx = dy W + s ((dy B) A) .* keep/(1-p)
 *                                            dB += s dy^T (xd A^T),  dA += s (dy B)^T xd
 *   rmsnorm  y = w .* x inv                   dx = inv (g - x inv^2 mean(g .* x)),  g = dy .* w
 *   rotary   y1 = x1 c - x2 s, y2 = x2 c + x1 s   dx1 = dy1 c + dy2 s,  dx2 = dy2 c - dy1 s
 *   attention P = softmax(Q K^T / sqrt(hd)), O = P V
 *            dP = dO V^T, dV += P^T dO, dS = P .* (dP - rowsum(dP .* P)),
 *            dQ = dS K / sqrt(hd), dK += dS^T Q / sqrt(hd)   (K, V shared by a group of heads)
 *   SwiGLU   m = silu(g) u                    dg = dm u sig(g) (1 + g (1 - sig(g))),  du = dm silu(g)
 *   loss     l = logsumexp(z) - z_y           dz = softmax(z) - onehot(y)
 *   MixLoRA  out = sum_j w_j y_{e_j},  w = softmax of the chosen logits z_{e_1..e_k} (the selection fixed)
 *            dw_j = dout . y_{e_j},  dy_{e_j} = w_j dout (then down, SwiGLU, gate/up of expert e_j as above),
 *            dz_i = w_i (dw_i - sum_j w_j dw_j) for chosen i (0 otherwise),  dR += dz^T x,  dx += dz R;
 *            load balancing (itr_moe_aux): dz_t += p_t .* (a - p_t . a),  a_e = weight E c_e / N^2 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/model.h"
#include "model/model_internal.h"

enum { LOGIT_CHUNK = 256 };

/* One layer's tape: what the backward needs, in the shapes of the forward. */
typedef struct {
  float *h_in;   /* (T, D) the layer's input (residual stream) */
  float *xn1;    /* (T, D) rmsnorm(h_in) * w_in: the input of q, k, v */
  float *inv1;   /* (T) */
  float *q, *k;  /* (T, qd), (T, kvd) after the rotary embedding */
  float *v;      /* (T, kvd) */
  float *att;    /* (T, qd) attention output: the input of o */
  float *h_mid;  /* (T, D) residual stream after attention */
  float *xn2;    /* (T, D) the input of gate and up */
  float *inv2;   /* (T) */
  float *g, *u;  /* (T, F) gate and up products (before the activation) */
  float *mlp;    /* (T, F) silu(g) * u: the input of down */
} layer_tape;

static size_t tape_floats(int64_t T, const itr_model_dims *d) {
  size_t qd = (size_t)d->H * d->hd, kvd = (size_t)d->Hkv * d->hd;
  return (size_t)T * (4 * (size_t)d->D + 2 + 2 * qd + 2 * kvd + 3 * (size_t)d->F);
}

static void tape_carve(layer_tape *t, float *p, int64_t T, const itr_model_dims *d) {
  size_t TD = (size_t)T * d->D, Tq = (size_t)T * d->H * d->hd, Tkv = (size_t)T * d->Hkv * d->hd,
         TF = (size_t)T * d->F;
  t->h_in = p, p += TD;
  t->xn1 = p, p += TD;
  t->inv1 = p, p += T;
  t->q = p, p += Tq;
  t->k = p, p += Tkv;
  t->v = p, p += Tkv;
  t->att = p, p += Tq;
  t->h_mid = p, p += TD;
  t->xn2 = p, p += TD;
  t->inv2 = p, p += T;
  t->g = p, p += TF;
  t->u = p, p += TF;
  t->mlp = p;
}

/* ---- LoRA dropout ------------------------------------------------------------------------------ */

static uint64_t mix64(uint64_t x) { /* splitmix64's finaliser */
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* keep (T, d_in) = 1/(1-p) where the entry is kept, 0 where dropped, for (layer, module). */
static void dropout_mask(float *keep, const itr_lora_dropout *dr, const itr_seq_layout *seqs, int layer,
                         itr_module mod, int d_in) {
  float kept = (float)(1.0 / (1.0 - dr->p));
  uint64_t thresh = (uint64_t)(dr->p * 18446744073709551616.0); /* p 2^64 */
  uint64_t base = mix64(mix64(mix64(dr->seed) ^ dr->step) ^ (uint64_t)(layer * ITR_MODULE_COUNT + (int)mod));
  for (int s = 0; s < seqs->n_seqs; s++) {
    uint64_t sid = dr->seq_ids ? (uint64_t)dr->seq_ids[s] : (uint64_t)s;
    uint64_t bs = mix64(base ^ mix64(sid));
    for (int64_t t = seqs->offsets[s]; t < seqs->offsets[s + 1]; t++) {
      uint64_t bt = mix64(bs ^ (uint64_t)(t - seqs->offsets[s]));
      float *row = keep + t * d_in;
      for (int i = 0; i < d_in; i++) row[i] = mix64(bt + (uint64_t)i) >= thresh ? kept : 0.0f;
    }
  }
}

/* The LoRA input of (layer, mod): x itself without dropout or LoRA terms, else xd (T, d_in) =
 * x .* keep (keep (T, d_in) filled). */
static const float *lora_input(float *xd, float *keep, const float *x, const itr_lora_slot *sl,
                               const itr_lora_dropout *dr, const itr_seq_layout *seqs, int layer,
                               itr_module mod, int64_t T, int d_in) {
  if (!dr || dr->p <= 0 || !sl || sl->n_terms == 0) return x;
  dropout_mask(keep, dr, seqs, layer, mod, d_in);
  for (size_t i = 0; i < (size_t)T * d_in; i++) xd[i] = x[i] * keep[i];
  return xd;
}

/* ---- backward steps ---------------------------------------------------------------------------- */

/* dx (T, d_in) (+)= dy (T, d_out) W (d_out, d_in) + the LoRA terms' input gradient; every term's
 * dA, dB of gsl (may be NULL) += as in the header; gW (d_out, d_in) += dy^T x and gb (d_out) += the
 * column sums of dy when given (full-rank training). x (T, d_in) is the module's input, xd its LoRA
 * input (x after dropout, == x without), keep (T, d_in) the dropout scale or NULL. t1, t2: (T, max r);
 * dxl (T, d_in) scratch. accumulate = 0 overwrites dx. */
static void linear_backward(float *dx, const float *dy, const float *x, const float *xd, const float *keep,
                            const float *W, const itr_lora_slot *sl, itr_lora_slot *gsl, float *gW, float *gb,
                            float *t1, float *t2, float *dxl, int T, int d_out, int d_in, int accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d_in, d_out, 1.0f, dy, d_out, W, d_in,
              accumulate ? 1.0f : 0.0f, dx, d_in);
  if (gW) cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d_out, d_in, T, 1.0f, dy, d_out, x, d_in, 1.0f, gW, d_in);
  if (gb)
    for (int t = 0; t < T; t++)
      for (int o = 0; o < d_out; o++) gb[o] += dy[(int64_t)t * d_out + o];
  if (sl && sl->dW)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d_in, d_out, sl->dW_scale, dy, d_out,
                sl->dW, d_in, 1.0f, dx, d_in);
  if (!sl || sl->n_terms == 0) return;
  float *dlora = keep ? dxl : dx; /* the LoRA input's gradient, before the dropout scale */
  if (keep) memset(dxl, 0, (size_t)T * d_in * sizeof(float));
  for (int k = 0; k < sl->n_terms; k++) {
    const itr_lora_term *tm = &sl->terms[k];
    int r = tm->r;
    float s = tm->scaling;
    /* t2 (T, r) = dy B */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, r, d_out, 1.0f, dy, d_out, tm->B, r, 0.0f, t2, r);
    if (gsl) {
      itr_lora_term *gt = &gsl->terms[k];
      /* t1 (T, r) = xd A^T;  dB (d_out, r) += s dy^T t1;  dA (r, d_in) += s t2^T xd */
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, r, d_in, 1.0f, xd, d_in, tm->A, d_in, 0.0f, t1, r);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d_out, r, T, s, dy, d_out, t1, r, 1.0f, gt->B, r);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, d_in, T, s, t2, r, xd, d_in, 1.0f, gt->A, d_in);
    }
    /* d(xd) (T, d_in) += s t2 A */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d_in, r, s, t2, r, tm->A, d_in, 1.0f, dlora, d_in);
  }
  if (keep)
    for (size_t i = 0; i < (size_t)T * d_in; i++) dx[i] += dxl[i] * keep[i];
}

/* dx (T, D) (+)= the gradient through y = w .* x inv for dy (T, D); inv (T) from the forward.
 * gw (D) (may be NULL) += the gradient of the weight: sum over rows of dy .* x inv. */
static void rmsnorm_backward(float *dx, const float *dy, const float *x, const float *inv, const float *w,
                             float *gw, int64_t T, int D, int accumulate) {
  for (int64_t t = 0; t < T; t++) {
    const float *xr = x + t * D, *gr = dy + t * D;
    float *o = dx + t * D;
    double gx = 0;
    for (int i = 0; i < D; i++) gx += (double)gr[i] * w[i] * xr[i];
    double iv = inv[t];
    float a = (float)iv, b = (float)(iv * iv * iv * gx / D);
    for (int i = 0; i < D; i++) {
      float v = a * gr[i] * w[i] - b * xr[i];
      o[i] = accumulate ? o[i] + v : v;
    }
    if (gw)
      for (int i = 0; i < D; i++) gw[i] += gr[i] * xr[i] * a;
  }
}

/* In place on dx (n, nh heads of hd, row stride ld): the transpose of the rotation. */
static void rope_backward(float *dx, int n, int nh, int hd, int ld, const float *cosv, const float *sinv) {
  int half = hd / 2;
  for (int t = 0; t < n; t++)
    for (int h = 0; h < nh; h++) {
      float *v = dx + (int64_t)t * ld + (int64_t)h * hd;
      const float *c = cosv + (int64_t)t * half, *s = sinv + (int64_t)t * half;
      for (int i = 0; i < half; i++) {
        float d1 = v[i], d2 = v[i + half];
        v[i] = d1 * c[i] + d2 * s[i];
        v[i + half] = d2 * c[i] - d1 * s[i];
      }
    }
}

/* One sequence: dq (n, qd) = , dk, dv (n, kvd) += the gradients through attention for datt (n, qd);
 * q, k (after the rotary embedding), v from the forward. S, dP (n, n) scratch. */
static void attention_backward(float *dq, float *dk, float *dv, const float *datt, const float *q,
                               const float *k, const float *v, float *S, float *dP, int n,
                               const itr_model_dims *d) {
  int qd = d->H * d->hd, kvd = d->Hkv * d->hd, group = d->H / d->Hkv, hd = d->hd;
  float scale = (float)(1.0 / sqrt((double)hd));
  for (int h = 0; h < d->H; h++) {
    int kh = h / group;
    const float *qh = q + h * hd, *kk = k + kh * hd, *vv = v + kh * hd, *dO = datt + h * hd;
    model_attention_probs(S, qh, qd, kk, kvd, n, hd); /* P */
    /* dP (n, n) = dO V^T;  dV (n, hd) += P^T dO */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, hd, 1.0f, dO, qd, vv, kvd, 0.0f, dP, n);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, hd, n, 1.0f, S, n, dO, qd, 1.0f, dv + kh * hd, kvd);
    /* dS = P .* (dP - rowsum(dP .* P)), in dP */
    for (int i = 0; i < n; i++) {
      float *pr = S + (int64_t)i * n, *dr = dP + (int64_t)i * n;
      double dot = 0;
      for (int j = 0; j <= i; j++) dot += (double)dr[j] * pr[j];
      for (int j = 0; j <= i; j++) dr[j] = pr[j] * (dr[j] - (float)dot);
      for (int j = i + 1; j < n; j++) dr[j] = 0.0f;
    }
    /* dQ_h (n, hd) = scale dS K;  dK (n, hd) += scale dS^T Q_h */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, n, scale, dP, n, kk, kvd, 0.0f, dq + h * hd, qd);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, hd, n, scale, dP, n, qh, qd, 1.0f, dk + kh * hd, kvd);
  }
}

/* ---- the pass ------------------------------------------------------------------------------------ */

static itr_err check_grad_set(const itr_lora_set *lora, const itr_lora_set *grad, const itr_model_dims *d) {
  ITR_CHECK(lora && grad, ITR_ERR_INPUT, "loss_grad: the LoRA set and its gradient set are required");
  ITR_CHECK(lora->num_layers == d->L && grad->num_layers == d->L && lora->cfg.hidden_size == d->D &&
                lora->cfg.intermediate_size == d->F,
            ITR_ERR_INPUT, "loss_grad: the LoRA set was made for another model (L %d, D %d; model L %d, D %d)",
            lora->num_layers, lora->cfg.hidden_size, d->L, d->D);
  for (int i = 0; i < d->L * ITR_MODULE_COUNT; i++) {
    const itr_lora_slot *a = &lora->slots[i], *g = &grad->slots[i];
    ITR_CHECK(a->n_terms == g->n_terms, ITR_ERR_INPUT,
              "loss_grad: layer %d module %d has %d LoRA terms but its gradient %d (use itr_lora_set_create_like)",
              i / ITR_MODULE_COUNT, i % ITR_MODULE_COUNT, a->n_terms, g->n_terms);
    for (int k = 0; k < a->n_terms; k++)
      ITR_CHECK(a->terms[k].r == g->terms[k].r, ITR_ERR_INPUT,
                "loss_grad: layer %d module %d term %d has rank %d but its gradient %d", i / ITR_MODULE_COUNT,
                i % ITR_MODULE_COUNT, k, a->terms[k].r, g->terms[k].r);
  }
  ITR_CHECK(!lora->moe == !grad->moe, ITR_ERR_INPUT,
            "loss_grad: the LoRA set %s MixLoRA layers but its gradient set %s (use itr_lora_set_create_like)",
            lora->moe ? "has" : "has no", grad->moe ? "has" : "has none");
  for (int l = 0; lora->moe && l < d->L; l++) {
    const itr_lora_moe *a = &lora->moe[l], *g = &grad->moe[l];
    int same = a->E == g->E;
    for (int i = 0; same && i < 3 * a->E; i++) same = a->experts[i].r == g->experts[i].r;
    ITR_CHECK(same, ITR_ERR_INPUT, "loss_grad: layer %d's MixLoRA experts (%d) differ from its gradient's (%d)", l,
              a->E, g->E);
  }
  return ITR_OK;
}

/* ---- the MixLoRA feed-forward -------------------------------------------------------------------------- */

/* The backward of one MixLoRA layer (itr_lora_moe; the forward is moe.c's, recomputed here from its input).
 * dx (T, D) = the gradient of xn (T, D), the FFN input, for dout (T, D), the gradient of the block's output;
 * gmo (may be NULL) gets the router's and every expert's factor gradients added; aux (may be NULL) adds the
 * load-balancing term. W*, b*: the base gate, up, down weights and biases (b NULL: none). */
static itr_err moe_backward(float *dx, const float *dout, const float *xn, const float *Wg, const float *bg,
                            const float *Wu, const float *bu, const float *Wd, const float *bd, const itr_lora_moe *mo,
                            itr_lora_moe *gmo, const itr_moe_aux *aux, double *loss, int T, int D, int F) {
  const int E = mo->E, k = mo->top_k;
  int max_r = 1;
  for (int i = 0; i < 3 * E; i++) max_r = mo->experts[i].r > max_r ? mo->experts[i].r : max_r;
  size_t TE = (size_t)T * E, Tk = (size_t)T * k, TF = (size_t)T * F, TD = (size_t)T * D, Tr = (size_t)T * max_r,
         TW = (size_t)T * (D > F ? D : F);
  size_t total = 3 * TE + 2 * Tk + 8 * TF + 4 * TD + 2 * Tr + TW;
  float *ws = NULL;
  int *sel = NULL, *rows = NULL, *slot = NULL;
  ITR_TRY(itr_calloc(total, sizeof(float), "MixLoRA backward workspace", &ws));
  itr_err err = itr_calloc(Tk, sizeof(int), "MixLoRA routes", &sel);
  if (err == ITR_OK) err = itr_calloc((size_t)T, sizeof(int), "MixLoRA rows", &rows);
  if (err == ITR_OK) err = itr_calloc((size_t)T, sizeof(int), "MixLoRA route slots", &slot);
  if (err != ITR_OK) {
    free(ws);
    free(sel);
    free(rows);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  float *z = ws, *pr = z + TE, *dz = pr + TE, *w = dz + TE, *dw = w + Tk, *g0 = dw + Tk, *u0 = g0 + TF, *G = u0 + TF,
        *U = G + TF, *M = U + TF, *dM = M + TF, *dG = dM + TF, *dU = dG + TF, *X = dU + TF, *Y = X + TD, *dY = Y + TD,
        *dX = dY + TD, *t1 = dX + TD, *t2 = t1 + Tr, *dxl = t2 + Tr;
  /* the routing of the forward (same product, same choices) and the full softmax */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, E, D, 1.0f, xn, D, mo->router, D, 0.0f, z, E);
  model_moe_route(z, T, E, k, sel, w);
  for (int t = 0; t < T; t++) {
    const float *zt = z + (size_t)t * E;
    float mx = zt[0];
    for (int e = 1; e < E; e++) mx = zt[e] > mx ? zt[e] : mx;
    double tot = 0;
    for (int e = 0; e < E; e++) tot += exp((double)zt[e] - mx);
    for (int e = 0; e < E; e++) pr[(size_t)t * E + e] = (float)(exp((double)zt[e] - mx) / tot);
  }
  /* the shared base products */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, F, D, 1.0f, xn, D, Wg, D, 0.0f, g0, F);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, F, D, 1.0f, xn, D, Wu, D, 0.0f, u0, F);
  for (int t = 0; t < T; t++)
    for (int f = 0; f < F; f++) {
      if (bg) g0[(size_t)t * F + f] += bg[f];
      if (bu) u0[(size_t)t * F + f] += bu[f];
    }
  memset(dx, 0, TD * sizeof(float));
  for (int e = 0; e < E; e++) {
    int n = 0;
    for (int t = 0; t < T; t++)
      for (int j = 0; j < k; j++)
        if (sel[(size_t)t * k + j] == e) rows[n] = t, slot[n++] = t * k + j;
    if (n == 0) continue;
    for (int i = 0; i < n; i++) {
      memcpy(X + (size_t)i * D, xn + (size_t)rows[i] * D, (size_t)D * sizeof(float));
      memcpy(G + (size_t)i * F, g0 + (size_t)rows[i] * F, (size_t)F * sizeof(float));
      memcpy(U + (size_t)i * F, u0 + (size_t)rows[i] * F, (size_t)F * sizeof(float));
    }
    /* expert e's gate, up and down as one-term slots (rank 0: none) */
    itr_lora_slot sl[3], gs[3];
    for (int q = 0; q < 3; q++) {
      memset(&sl[q], 0, sizeof sl[q]);
      memset(&gs[q], 0, sizeof gs[q]);
      sl[q].n_terms = mo->experts[3 * e + q].r > 0;
      sl[q].terms = (itr_lora_term *)&mo->experts[3 * e + q];
      gs[q].n_terms = sl[q].n_terms;
      gs[q].terms = gmo ? &gmo->experts[3 * e + q] : NULL;
    }
    float *dst[2] = {G, U};
    for (int q = 0; q < 2; q++)
      if (sl[q].n_terms) { /* += s (X A^T) B^T */
        const itr_lora_term *tm = sl[q].terms;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, tm->r, D, 1.0f, X, D, tm->A, D, 0.0f, t1, tm->r);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, F, tm->r, tm->scaling, t1, tm->r, tm->B, tm->r, 1.0f,
                    dst[q], F);
      }
    for (size_t i = 0; i < (size_t)n * F; i++) M[i] = G[i] / (1.0f + expf(-G[i])) * U[i];
    /* y (n, D) = M Wd^T + bd + s (M Ad^T) Bd^T */
    model_linear_forward(Y, M, M, Wd, bd, &sl[2], t1, n, D, F, 0, NULL, NULL);
    for (int i = 0; i < n; i++) {
      const float *dh = dout + (size_t)rows[i] * D, *y = Y + (size_t)i * D;
      double acc = 0;
      for (int c = 0; c < D; c++) acc += (double)dh[c] * y[c];
      dw[slot[i]] = (float)acc;
      for (int c = 0; c < D; c++) dY[(size_t)i * D + c] = w[slot[i]] * dh[c];
    }
    linear_backward(dM, dY, M, M, NULL, Wd, &sl[2], gmo ? &gs[2] : NULL, NULL, NULL, t1, t2, dxl, n, D, F, 0);
    for (size_t i = 0; i < (size_t)n * F; i++) {
      float g = G[i], sg = 1.0f / (1.0f + expf(-g));
      dG[i] = dM[i] * U[i] * sg * (1.0f + g * (1.0f - sg));
      dU[i] = dM[i] * g * sg;
    }
    linear_backward(dX, dG, X, X, NULL, Wg, &sl[0], gmo ? &gs[0] : NULL, NULL, NULL, t1, t2, dxl, n, F, D, 0);
    linear_backward(dX, dU, X, X, NULL, Wu, &sl[1], gmo ? &gs[1] : NULL, NULL, NULL, t1, t2, dxl, n, F, D, 1);
    for (int i = 0; i < n; i++)
      for (int c = 0; c < D; c++) dx[(size_t)rows[i] * D + c] += dX[(size_t)i * D + c];
  }
  /* the router: through the renormalisation over the chosen, then the load-balancing term */
  memset(dz, 0, TE * sizeof(float));
  for (int t = 0; t < T; t++) {
    double sdw = 0;
    for (int j = 0; j < k; j++) sdw += (double)w[(size_t)t * k + j] * dw[(size_t)t * k + j];
    for (int j = 0; j < k; j++)
      dz[(size_t)t * E + sel[(size_t)t * k + j]] = (float)(w[(size_t)t * k + j] * (dw[(size_t)t * k + j] - sdw));
  }
  if (aux && aux->weight != 0) {
    double part = 0, scale = (double)E / (aux->n_routed * aux->n_routed);
    for (int t = 0; t < T; t++) {
      const float *pt = pr + (size_t)t * E;
      double pa = 0;
      for (int e = 0; e < E; e++) {
        part += scale * aux->counts[e] * pt[e];
        pa += (double)pt[e] * aux->weight * scale * aux->counts[e];
      }
      for (int e = 0; e < E; e++)
        dz[(size_t)t * E + e] += (float)(pt[e] * (aux->weight * scale * aux->counts[e] - pa));
    }
    *aux->aux_part += part;
    *loss += aux->weight * part;
  }
  if (gmo) cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, E, D, T, 1.0f, dz, E, xn, D, 1.0f, gmo->router, D);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, E, 1.0f, dz, E, mo->router, D, 1.0f, dx, D);
  free(ws);
  free(sel);
  free(rows);
  free(slot);
  return ITR_OK;
}

/* Cross-entropy of rows [t0, t0 + c) of xn (the final norm's output); dxn (c, D) = its gradient
 * (rows without a target are zero). logits (c, V) scratch. */
static void loss_chunk(float *dxn, float *logits, const float *xn, const float *head, float *ghead,
                       const int32_t *labels, const float *teacher, int c, int D, int V, double *loss,
                       int64_t *count) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c, V, D, 1.0f, xn, D, head, D, 0.0f, logits, V);
  for (int t = 0; t < c; t++) {
    float *z = logits + (int64_t)t * V;
    if (labels[t] < 0) {
      memset(z, 0, (size_t)V * sizeof(float));
      continue;
    }
    if (teacher) { /* KL(q || p), q = softmax(teacher row): dz = p - q */
      const float *y = teacher + (int64_t)t * V;
      float mz = z[0], my = y[0];
      for (int j = 1; j < V; j++) mz = z[j] > mz ? z[j] : mz, my = y[j] > my ? y[j] : my;
      double sz = 0, sy = 0;
      for (int j = 0; j < V; j++) sz += exp((double)z[j] - mz), sy += exp((double)y[j] - my);
      double lz = mz + log(sz), ly = my + log(sy), kl = 0;
      for (int j = 0; j < V; j++) {
        double lq = (double)y[j] - ly, q = exp(lq);
        kl += q * (lq - ((double)z[j] - lz));
        z[j] = (float)(exp((double)z[j] - lz) - q);
      }
      *loss += kl;
      (*count)++;
      continue;
    }
    float mx = z[0];
    for (int j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
    double sum = 0;
    for (int j = 0; j < V; j++) sum += exp((double)z[j] - mx);
    double lse = mx + log(sum);
    *loss += lse - z[labels[t]];
    (*count)++;
    for (int j = 0; j < V; j++) z[j] = (float)exp((double)z[j] - lse);
    z[labels[t]] -= 1.0f;
  }
  /* dxn (c, D) = dz (c, V) head (V, D);  ghead (V, D) += dz^T xn */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c, D, V, 1.0f, logits, V, head, D, 0.0f, dxn, D);
  if (ghead) cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, V, D, c, 1.0f, logits, V, xn, D, 1.0f, ghead, D);
}

/* ---- the routing counts of a block (the load-balancing loss's f, itr_model_moe_counts; here, not in moe.c,
 * which model.c calls: it runs model.c's forward) ---------------------------------------------------------- */

typedef struct {
  const itr_lora_set *lora;
  int E;
  double *counts, *n_routed;
} count_ctx;

static itr_err count_sink(int layer, itr_site site, const float *rows, int64_t T, int64_t d_in, void *vctx) {
  count_ctx *c = vctx;
  if (site != ITR_SITE_MLP_IN || !c->lora->moe || c->lora->moe[layer].E == 0) return ITR_OK;
  const itr_lora_moe *mo = &c->lora->moe[layer];
  const int E = mo->E, k = mo->top_k;
  float *z = NULL, *w = NULL;
  int *sel = NULL;
  itr_err err = itr_calloc((size_t)T * E, sizeof(float), "router logits", &z);
  if (err == ITR_OK) err = itr_calloc((size_t)T * k, sizeof(float), "routing weights", &w);
  if (err == ITR_OK) err = itr_calloc((size_t)T * k, sizeof(int), "routes", &sel);
  if (err == ITR_OK) {
    /* the same product and routing as model_moe_forward, so the same choices */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, E, (int)d_in, 1.0f, rows, (int)d_in, mo->router,
                (int)d_in, 0.0f, z, E);
    model_moe_route(z, T, E, k, sel, w);
    for (int64_t i = 0; i < T * k; i++) c->counts[sel[i]] += 1;
    *c->n_routed += (double)T;
  }
  free(z);
  free(w);
  free(sel);
  return err;
}

itr_err itr_model_moe_counts(const itr_model *m, const int32_t *ids, int64_t T, const itr_seq_layout *seqs,
                             const itr_lora_set *lora, int E, double *counts, double *n_routed) {
  const itr_model_dims *d = itr_model_dims_of(m);
  ITR_CHECK(lora && lora->moe, ITR_ERR_INPUT, "MixLoRA counts: the LoRA set has no MixLoRA layer");
  for (int l = 0; l < lora->num_layers; l++)
    ITR_CHECK(lora->moe[l].E == 0 || lora->moe[l].E == E, ITR_ERR_INPUT,
              "MixLoRA counts: layer %d has %d experts, expected %d in every MixLoRA layer", l, lora->moe[l].E, E);
  float *h = NULL;
  ITR_TRY(itr_calloc((size_t)T, (size_t)d->D * sizeof(float), "residual stream", &h));
  count_ctx c = {lora, E, counts, n_routed};
  itr_err err = itr_model_embed(m, ids, T, h);
  if (err == ITR_OK) err = itr_model_run_layers(m, 0, d->L, h, T, seqs, lora, count_sink, &c);
  free(h);
  return err;
}

itr_err itr_model_loss_grad(const itr_model *m, const int32_t *ids, const int32_t *labels, int64_t T,
                            const itr_seq_layout *seqs, const itr_lora_set *lora,
                            const itr_lora_dropout *drop, itr_lora_set *grad, double *loss_sum,
                            int64_t *n_targets) {
  ITR_CHECK(grad, ITR_ERR_INPUT, "loss_grad: the gradient set is required");
  return itr_model_loss_grad_full(m, ids, labels, T, seqs, lora, drop, NULL, NULL, grad, NULL, loss_sum, n_targets);
}

itr_err itr_model_loss_grad_full(const itr_model *m, const int32_t *ids, const int32_t *labels, int64_t T,
                                 const itr_seq_layout *seqs, const itr_lora_set *lora,
                                 const itr_lora_dropout *drop, const float *teacher, const itr_moe_aux *aux,
                                 itr_lora_set *grad, itr_model *gm, double *loss_sum, int64_t *n_targets) {
  const itr_model_dims *d = itr_model_dims_of(m);
  int lb, le;
  itr_model_layers(m, &lb, &le);
  itr_model *mm = (itr_model *)m; /* the accessors hand out writable pointers; nothing is written */
  ITR_CHECK(lb == 0 && le == d->L && itr_model_embed_weight(mm) && itr_model_lm_head(mm), ITR_ERR_INPUT,
            "loss_grad: needs every layer, the embedding and the head (this part has layers [%d, %d) of %d)",
            lb, le, d->L);
  ITR_CHECK(T >= 1 && T <= INT_MAX / 2, ITR_ERR_INPUT, "loss_grad: block of %lld tokens (need 1..%d)",
            (long long)T, INT_MAX / 2);
  ITR_CHECK(!drop || (drop->p >= 0 && drop->p < 1), ITR_ERR_INPUT,
            "loss_grad: LoRA dropout %g must be in [0, 1)", drop ? drop->p : 0.0);
  ITR_CHECK(grad || gm, ITR_ERR_INPUT, "loss_grad: give a LoRA gradient set, a weight-gradient model, or both");
  ITR_CHECK(!gm || !lora || !lora->moe, ITR_ERR_INPUT,
            "loss_grad: full-rank weight gradients with a MixLoRA feed-forward are not supported");
  ITR_CHECK(!aux || (lora && lora->moe && aux->counts && aux->aux_part && aux->n_routed > 0), ITR_ERR_INPUT,
            "loss_grad: the load-balancing loss needs MixLoRA layers, the batch's counts and N > 0");
  for (int l = 0; aux && l < d->L; l++)
    ITR_CHECK(lora->moe[l].E == 0 || lora->moe[l].E == aux->E, ITR_ERR_INPUT,
              "loss_grad: layer %d has %d experts but the load-balancing counts %d", l, lora->moe[l].E, aux->E);
  if (grad) ITR_TRY(check_grad_set(lora, grad, d));
  if (gm) {
    int gb, ge;
    itr_model_layers(gm, &gb, &ge);
    const itr_model_dims *gd = itr_model_dims_of(gm);
    ITR_CHECK(gb == 0 && ge == d->L && gd->D == d->D && gd->F == d->F && gd->V == d->V && gd->H == d->H &&
                  gd->Hkv == d->Hkv && gd->hd == d->hd && itr_model_embed_weight(gm) && itr_model_lm_head(gm) &&
                  itr_model_head_is_embed(gm) == itr_model_head_is_embed(m),
              ITR_ERR_INPUT, "loss_grad: the weight-gradient model must have the model's configuration, every layer, "
              "the embedding and the head");
  }
  for (int64_t t = 0; t < T; t++)
    ITR_CHECK(labels[t] < d->V, ITR_ERR_INPUT, "loss_grad: label %d at position %lld is outside the vocabulary [0, %d)",
              (int)labels[t], (long long)t, d->V);
  int64_t one[2] = {0, T};
  itr_seq_layout whole = {1, one};
  if (!seqs) seqs = &whole;
  int64_t max_len = 0;
  ITR_TRY(model_check_layout(seqs, T, &max_len));

  int max_r = 1;
  for (int i = 0; lora && i < d->L * ITR_MODULE_COUNT; i++)
    for (int k = 0; k < lora->slots[i].n_terms; k++)
      if (lora->slots[i].terms[k].r > max_r) max_r = lora->slots[i].terms[k].r;

  const int L = d->L, D = d->D, F = d->F, V = d->V, qd = d->H * d->hd, kvd = d->Hkv * d->hd,
            half = d->hd / 2, Ti = (int)T;
  const int64_t wide = F > qd ? (F > D ? F : D) : (qd > D ? qd : D); /* widest module input */
  const int chunk = T < LOGIT_CHUNK ? (int)T : LOGIT_CHUNK;
  /* one allocation: the tapes, the final state, and the scratch of both passes */
  size_t per_layer = tape_floats(T, d), TD = (size_t)T * D, TW = (size_t)T * wide, TF = (size_t)T * F,
         Tq = (size_t)T * qd, Tkv = (size_t)T * kvd, nS = (size_t)max_len * (size_t)max_len,
         nrope = (size_t)max_len * half, Tr = (size_t)T * max_r;
  size_t scratch = 5 * TD + T + 3 * TW + 2 * TF + 2 * Tq + 2 * Tkv + 2 * nS + 2 * nrope + 2 * Tr +
                   (size_t)chunk * V + TD;
  size_t total;
  if (!itr_mul_size(per_layer, (size_t)(L > 0 ? L : 1), &total) || total + scratch < total)
    return itr_error_set(ITR_ERR_INPUT, "loss_grad: the activations of %lld tokens overflow", (long long)T);
  float *mem = NULL;
  ITR_TRY(itr_calloc(total + scratch, sizeof(float), "training activations", &mem));
  layer_tape *tape = NULL;
  itr_err err = itr_calloc((size_t)(L > 0 ? L : 1), sizeof *tape, "training tape", &tape);
  if (err != ITR_OK) {
    free(mem);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  float *p = mem;
  for (int l = 0; l < L; l++, p += per_layer) tape_carve(&tape[l], p, T, d);
  float *h = p;                 /* (T, D) residual stream; after the layers, their output */
  float *xnf = h + TD;          /* (T, D) final norm */
  float *invf = xnf + TD;       /* (T) */
  float *dh = invf + T;         /* (T, D) gradient of the residual stream */
  float *dx = dh + TD;          /* (T, D) gradient of a norm's output (q/k/v or gate/up input) */
  float *prod = dx + TD;        /* (T, D) forward: o and down products before the residual add */
  float *xd = prod + TD;        /* (T, wide) LoRA input after dropout */
  float *keep = xd + TW;        /* (T, wide) dropout scale */
  float *dxl = keep + TW;       /* (T, wide) gradient of the LoRA input under dropout */
  float *dmlp = dxl + TW;       /* (T, F) */
  float *dgu = dmlp + TF;       /* (T, F) */
  float *datt = dgu + TF;       /* (T, qd) */
  float *dq = datt + Tq;        /* (T, qd) */
  float *dk = dq + Tq;          /* (T, kvd) */
  float *dv = dk + Tkv;         /* (T, kvd) */
  float *S = dv + Tkv;          /* (max_len, max_len) */
  float *dP = S + nS;           /* (max_len, max_len) */
  float *cosv = dP + nS, *sinv = cosv + nrope;
  float *t1 = sinv + nrope, *t2 = t1 + Tr; /* (T, max r) */
  float *logits = t2 + Tr;      /* (chunk, V) */
  float *dxn = logits + (size_t)chunk * V; /* (T, D) gradient of the final norm's output */
  model_rope_table(cosv, sinv, max_len, d);
  double loss = 0;
  int64_t count = 0;

  /* ---- forward, keeping the tape ---- */
  ITR_TRY_GOTO(itr_model_embed(m, ids, T, h), err, done);
  for (int l = 0; l < L; l++) {
    layer_tape *tp = &tape[l];
    const itr_lora_slot *sl;
    memcpy(tp->h_in, h, TD * sizeof(float));
    model_rmsnorm_forward(tp->xn1, tp->inv1, h, itr_model_norm(mm, l, 0), T, D, d->eps);
    sl = model_lora_slot(lora, l, ITR_Q_PROJ);
    model_linear_forward(tp->q, tp->xn1, lora_input(xd, keep, tp->xn1, sl, drop, seqs, l, ITR_Q_PROJ, T, D),
                         itr_model_weight(mm, l, ITR_Q_PROJ), itr_model_bias(mm, l, ITR_Q_PROJ), sl, t1, Ti, qd, D, 0, NULL, NULL);
    sl = model_lora_slot(lora, l, ITR_K_PROJ);
    model_linear_forward(tp->k, tp->xn1, lora_input(xd, keep, tp->xn1, sl, drop, seqs, l, ITR_K_PROJ, T, D),
                         itr_model_weight(mm, l, ITR_K_PROJ), itr_model_bias(mm, l, ITR_K_PROJ), sl, t1, Ti, kvd, D, 0, NULL, NULL);
    sl = model_lora_slot(lora, l, ITR_V_PROJ);
    model_linear_forward(tp->v, tp->xn1, lora_input(xd, keep, tp->xn1, sl, drop, seqs, l, ITR_V_PROJ, T, D),
                         itr_model_weight(mm, l, ITR_V_PROJ), itr_model_bias(mm, l, ITR_V_PROJ), sl, t1, Ti, kvd, D, 0, NULL, NULL);
    for (int s = 0; s < seqs->n_seqs; s++) {
      int64_t t0 = seqs->offsets[s];
      int n = (int)(seqs->offsets[s + 1] - t0);
      model_rope_forward(tp->q + t0 * qd, n, d->H, d->hd, qd, cosv, sinv);
      model_rope_forward(tp->k + t0 * kvd, n, d->Hkv, d->hd, kvd, cosv, sinv);
      model_attention_forward(tp->att + t0 * qd, tp->q + t0 * qd, tp->k + t0 * kvd, tp->v + t0 * kvd, S, n, d);
    }
    sl = model_lora_slot(lora, l, ITR_O_PROJ);
    model_linear_forward(h, tp->att, lora_input(xd, keep, tp->att, sl, drop, seqs, l, ITR_O_PROJ, T, qd),
                         itr_model_weight(mm, l, ITR_O_PROJ), itr_model_bias(mm, l, ITR_O_PROJ), sl, t1, Ti, D, qd, 1, prod, NULL);
    memcpy(tp->h_mid, h, TD * sizeof(float));
    model_rmsnorm_forward(tp->xn2, tp->inv2, h, itr_model_norm(mm, l, 1), T, D, d->eps);
    if (lora && lora->moe && lora->moe[l].E > 0) { /* MixLoRA: the backward recomputes from xn2 */
      ITR_TRY_GOTO(model_moe_forward(h, tp->xn2, itr_model_weight(mm, l, ITR_GATE_PROJ), itr_model_bias(mm, l, ITR_GATE_PROJ),
                                     itr_model_weight(mm, l, ITR_UP_PROJ), itr_model_bias(mm, l, ITR_UP_PROJ),
                                     itr_model_weight(mm, l, ITR_DOWN_PROJ), itr_model_bias(mm, l, ITR_DOWN_PROJ),
                                     &lora->moe[l], Ti, D, F),
                   err, done);
      continue;
    }
    sl = model_lora_slot(lora, l, ITR_GATE_PROJ);
    model_linear_forward(tp->g, tp->xn2, lora_input(xd, keep, tp->xn2, sl, drop, seqs, l, ITR_GATE_PROJ, T, D),
                         itr_model_weight(mm, l, ITR_GATE_PROJ), itr_model_bias(mm, l, ITR_GATE_PROJ), sl, t1, Ti, F, D, 0, NULL, NULL);
    sl = model_lora_slot(lora, l, ITR_UP_PROJ);
    model_linear_forward(tp->u, tp->xn2, lora_input(xd, keep, tp->xn2, sl, drop, seqs, l, ITR_UP_PROJ, T, D),
                         itr_model_weight(mm, l, ITR_UP_PROJ), itr_model_bias(mm, l, ITR_UP_PROJ), sl, t1, Ti, F, D, 0, NULL, NULL);
    for (size_t i = 0; i < TF; i++) tp->mlp[i] = tp->g[i] / (1.0f + expf(-tp->g[i])) * tp->u[i];
    sl = model_lora_slot(lora, l, ITR_DOWN_PROJ);
    model_linear_forward(h, tp->mlp, lora_input(xd, keep, tp->mlp, sl, drop, seqs, l, ITR_DOWN_PROJ, T, F),
                         itr_model_weight(mm, l, ITR_DOWN_PROJ), itr_model_bias(mm, l, ITR_DOWN_PROJ), sl, t1, Ti, D, F, 1, prod, NULL);
  }

  /* ---- loss and its gradient at the final norm, LOGIT_CHUNK positions at a time ---- */
  const float *wf = itr_model_final_norm(mm), *head = itr_model_lm_head(mm);
  model_rmsnorm_forward(xnf, invf, h, wf, T, D, d->eps);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    int c = (int)(T - t0 < chunk ? T - t0 : chunk);
    loss_chunk(dxn + t0 * D, logits, xnf + t0 * D, head, gm ? itr_model_lm_head(gm) : NULL, labels + t0,
               teacher ? teacher + t0 * V : NULL, c, D, V, &loss, &count);
  }
  rmsnorm_backward(dh, dxn, h, invf, wf, gm ? itr_model_final_norm(gm) : NULL, T, D, 0);

  /* ---- backward through the layers; dh is the gradient of each layer's output ---- */
#define GW(mod) (gm ? itr_model_weight(gm, l, mod) : NULL)
#define GB(mod) (gm ? itr_model_bias(gm, l, mod) : NULL)
  for (int l = L - 1; l >= 0; l--) {
    layer_tape *tp = &tape[l];
    const itr_lora_slot *sl;
    itr_lora_slot *gs = grad ? grad->slots + (size_t)l * ITR_MODULE_COUNT : NULL;
    const float *xl;
    if (lora && lora->moe && lora->moe[l].E > 0) { /* MixLoRA: dx = the gradient of xn2 */
      ITR_TRY_GOTO(moe_backward(dx, dh, tp->xn2, itr_model_weight(mm, l, ITR_GATE_PROJ), itr_model_bias(mm, l, ITR_GATE_PROJ),
                                itr_model_weight(mm, l, ITR_UP_PROJ), itr_model_bias(mm, l, ITR_UP_PROJ),
                                itr_model_weight(mm, l, ITR_DOWN_PROJ), itr_model_bias(mm, l, ITR_DOWN_PROJ), &lora->moe[l],
                                grad ? &grad->moe[l] : NULL, aux, &loss, Ti, D, F),
                   err, done);
      goto post_attention_norm;
    }
    /* down: dmlp = dh Wd (+ LoRA) */
    sl = model_lora_slot(lora, l, ITR_DOWN_PROJ);
    xl = lora_input(xd, keep, tp->mlp, sl, drop, seqs, l, ITR_DOWN_PROJ, T, F);
    linear_backward(dmlp, dh, tp->mlp, xl, xl == tp->mlp ? NULL : keep, itr_model_weight(mm, l, ITR_DOWN_PROJ), sl,
                    gs ? &gs[ITR_DOWN_PROJ] : NULL, GW(ITR_DOWN_PROJ), GB(ITR_DOWN_PROJ), t1, t2, dxl, Ti, D, F, 0);
    /* SwiGLU: dgu holds dg, dmlp becomes du */
    for (size_t i = 0; i < TF; i++) {
      float g = tp->g[i], sg = 1.0f / (1.0f + expf(-g)), dm = dmlp[i];
      dgu[i] = dm * tp->u[i] * sg * (1.0f + g * (1.0f - sg));
      dmlp[i] = dm * g * sg;
    }
    /* gate, up: dx (T, D) = dg Wg + du Wu (+ LoRA) */
    sl = model_lora_slot(lora, l, ITR_GATE_PROJ);
    xl = lora_input(xd, keep, tp->xn2, sl, drop, seqs, l, ITR_GATE_PROJ, T, D);
    linear_backward(dx, dgu, tp->xn2, xl, xl == tp->xn2 ? NULL : keep, itr_model_weight(mm, l, ITR_GATE_PROJ), sl,
                    gs ? &gs[ITR_GATE_PROJ] : NULL, GW(ITR_GATE_PROJ), GB(ITR_GATE_PROJ), t1, t2, dxl, Ti, F, D, 0);
    sl = model_lora_slot(lora, l, ITR_UP_PROJ);
    xl = lora_input(xd, keep, tp->xn2, sl, drop, seqs, l, ITR_UP_PROJ, T, D);
    linear_backward(dx, dmlp, tp->xn2, xl, xl == tp->xn2 ? NULL : keep, itr_model_weight(mm, l, ITR_UP_PROJ), sl,
                    gs ? &gs[ITR_UP_PROJ] : NULL, GW(ITR_UP_PROJ), GB(ITR_UP_PROJ), t1, t2, dxl, Ti, F, D, 1);
  post_attention_norm:
    /* dh (now the gradient of h_mid) += through the post-attention norm */
    rmsnorm_backward(dh, dx, tp->h_mid, tp->inv2, itr_model_norm(mm, l, 1), gm ? itr_model_norm(gm, l, 1) : NULL, T, D, 1);
    /* o: datt (T, qd) = dh Wo (+ LoRA) */
    sl = model_lora_slot(lora, l, ITR_O_PROJ);
    xl = lora_input(xd, keep, tp->att, sl, drop, seqs, l, ITR_O_PROJ, T, qd);
    linear_backward(datt, dh, tp->att, xl, xl == tp->att ? NULL : keep, itr_model_weight(mm, l, ITR_O_PROJ), sl,
                    gs ? &gs[ITR_O_PROJ] : NULL, GW(ITR_O_PROJ), GB(ITR_O_PROJ), t1, t2, dxl, Ti, D, qd, 0);
    /* attention, per sequence: dq = , dk, dv += */
    memset(dk, 0, Tkv * sizeof(float));
    memset(dv, 0, Tkv * sizeof(float));
    for (int s = 0; s < seqs->n_seqs; s++) {
      int64_t t0 = seqs->offsets[s];
      int n = (int)(seqs->offsets[s + 1] - t0);
      attention_backward(dq + t0 * qd, dk + t0 * kvd, dv + t0 * kvd, datt + t0 * qd, tp->q + t0 * qd,
                         tp->k + t0 * kvd, tp->v + t0 * kvd, S, dP, n, d);
      rope_backward(dq + t0 * qd, n, d->H, d->hd, qd, cosv, sinv);
      rope_backward(dk + t0 * kvd, n, d->Hkv, d->hd, kvd, cosv, sinv);
    }
    /* q, k, v: dx (T, D) = dq Wq + dk Wk + dv Wv (+ LoRA) */
    sl = model_lora_slot(lora, l, ITR_Q_PROJ);
    xl = lora_input(xd, keep, tp->xn1, sl, drop, seqs, l, ITR_Q_PROJ, T, D);
    linear_backward(dx, dq, tp->xn1, xl, xl == tp->xn1 ? NULL : keep, itr_model_weight(mm, l, ITR_Q_PROJ), sl,
                    gs ? &gs[ITR_Q_PROJ] : NULL, GW(ITR_Q_PROJ), GB(ITR_Q_PROJ), t1, t2, dxl, Ti, qd, D, 0);
    sl = model_lora_slot(lora, l, ITR_K_PROJ);
    xl = lora_input(xd, keep, tp->xn1, sl, drop, seqs, l, ITR_K_PROJ, T, D);
    linear_backward(dx, dk, tp->xn1, xl, xl == tp->xn1 ? NULL : keep, itr_model_weight(mm, l, ITR_K_PROJ), sl,
                    gs ? &gs[ITR_K_PROJ] : NULL, GW(ITR_K_PROJ), GB(ITR_K_PROJ), t1, t2, dxl, Ti, kvd, D, 1);
    sl = model_lora_slot(lora, l, ITR_V_PROJ);
    xl = lora_input(xd, keep, tp->xn1, sl, drop, seqs, l, ITR_V_PROJ, T, D);
    linear_backward(dx, dv, tp->xn1, xl, xl == tp->xn1 ? NULL : keep, itr_model_weight(mm, l, ITR_V_PROJ), sl,
                    gs ? &gs[ITR_V_PROJ] : NULL, GW(ITR_V_PROJ), GB(ITR_V_PROJ), t1, t2, dxl, Ti, kvd, D, 1);
    /* dh (gradient of h_in) += through the input norm */
    rmsnorm_backward(dh, dx, tp->h_in, tp->inv1, itr_model_norm(mm, l, 0), gm ? itr_model_norm(gm, l, 0) : NULL, T, D, 1);
  }
#undef GW
#undef GB
  /* the embedding: dh is now the gradient of its rows (a tied head adds into the same table) */
  if (gm) {
    float *ge = itr_model_embed_weight(gm);
    for (int64_t t = 0; t < T; t++)
      for (int i = 0; i < D; i++) ge[(int64_t)ids[t] * D + i] += dh[t * D + i];
  }
  *loss_sum = loss;
  *n_targets = count;
done:
  free(tape);
  free(mem);
  return err;
}
