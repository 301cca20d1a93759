/* The rank-local forward pass of a Llama-family decoder: parameters of the owned layers carved out
 * of one allocation, one function per step, every shape in a comment. float32 with OpenBLAS sgemm;
 * reductions (RMSNorm, rotary angles) in double. See include/iteris/model.h for the maths. */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/model.h"
#include "model/model_internal.h"

typedef struct {
  float *w[ITR_MODULE_COUNT]; /* (d_out, d_in) */
  float *b[ITR_MODULE_COUNT]; /* (d_out) or NULL */
  float *norm_in, *norm_post; /* (D) */
} layer_params;

struct itr_model {
  itr_model_config cfg;
  itr_model_dims dims;
  int layer_begin, layer_end, with_embed, with_head;
  layer_params *layers; /* (layer_end - layer_begin) */
  float *embed;         /* (V, D) or NULL */
  float *final_norm;    /* (D) or NULL */
  float *lm_head;       /* (V, D) or NULL; == embed when tied and with_embed */
  float *mem;           /* the one allocation every parameter lives in */
  size_t n_params;      /* its length in floats */
  int owns_mem;         /* 0: mem is the caller's (itr_model_load_into) */
};

/* ---- configuration ------------------------------------------------------------------------- */

itr_err itr_model_dims_from_config(const itr_model_config *c, itr_model_dims *d) {
  ITR_CHECK(c->hidden_size > 0 && c->intermediate_size > 0 && c->vocab_size > 0 &&
                c->num_attention_heads > 0 && c->num_hidden_layers >= 0,
            ITR_ERR_INPUT,
            "model config: sizes must be positive (hidden_size %d, intermediate_size %d, vocab_size %d, "
            "num_attention_heads %d, num_hidden_layers %d)",
            c->hidden_size, c->intermediate_size, c->vocab_size, c->num_attention_heads,
            c->num_hidden_layers);
  int H = c->num_attention_heads;
  int Hkv = c->num_key_value_heads > 0 ? c->num_key_value_heads : H;
  ITR_CHECK(H % Hkv == 0, ITR_ERR_INPUT,
            "model config: num_attention_heads %d is not a multiple of num_key_value_heads %d", H, Hkv);
  int hd = c->head_dim > 0 ? c->head_dim : c->hidden_size / H;
  ITR_CHECK(hd > 0 && hd % 2 == 0, ITR_ERR_INPUT,
            "model config: head_dim %d must be positive and even (rotary embeddings rotate pairs); "
            "hidden_size %d, num_attention_heads %d",
            hd, c->hidden_size, H);
  ITR_CHECK(c->rms_norm_eps >= 0 && isfinite(c->rms_norm_eps), ITR_ERR_INPUT,
            "model config: rms_norm_eps %g must be finite and >= 0", c->rms_norm_eps);
  double theta = c->rope_theta > 0 ? c->rope_theta : 10000.0;
  ITR_CHECK(isfinite(theta), ITR_ERR_INPUT, "model config: rope_theta %g is not finite", theta);
  d->L = c->num_hidden_layers;
  d->D = c->hidden_size;
  d->F = c->intermediate_size;
  d->V = c->vocab_size;
  d->H = H;
  d->Hkv = Hkv;
  d->hd = hd;
  d->eps = c->rms_norm_eps;
  d->theta = theta;
  return ITR_OK;
}

void itr_model_dims_module(const itr_model_dims *d, itr_module m, int64_t *d_out, int64_t *d_in) {
  int64_t qd = (int64_t)d->H * d->hd, kvd = (int64_t)d->Hkv * d->hd;
  switch (m) {
    case ITR_Q_PROJ: *d_out = qd, *d_in = d->D; break;
    case ITR_K_PROJ:
    case ITR_V_PROJ: *d_out = kvd, *d_in = d->D; break;
    case ITR_O_PROJ: *d_out = d->D, *d_in = qd; break;
    case ITR_GATE_PROJ:
    case ITR_UP_PROJ: *d_out = d->F, *d_in = d->D; break;
    case ITR_DOWN_PROJ: *d_out = d->D, *d_in = d->F; break;
    default: *d_out = 0, *d_in = 0; break;
  }
}

int itr_model_has_bias(const itr_model_config *c, itr_module m) {
  switch (m) {
    case ITR_Q_PROJ:
    case ITR_K_PROJ:
    case ITR_V_PROJ: return c->attention_bias || c->arch == ITR_ARCH_QWEN2;
    case ITR_O_PROJ: return c->o_bias;
    case ITR_GATE_PROJ:
    case ITR_UP_PROJ:
    case ITR_DOWN_PROJ: return c->mlp_bias;
    default: return 0;
  }
}

/* ---- creation and accessors ------------------------------------------------------------------ */

/* no_weight: bit k set = module k's weight matrices are not allocated (itr_model_weight gives NULL).
 * ext: the caller's memory of ext_floats floats (not owned, not zeroed), or NULL: allocated here. With
 * out NULL only *floats is set (the parameter count). */
static itr_err model_create(const itr_model_config *cfg, int layer_begin, int layer_end, int with_embed,
                            int with_head, unsigned no_weight, float *ext, size_t ext_floats, size_t *floats,
                            itr_model **out) {
  itr_model_dims d;
  ITR_TRY(itr_model_dims_from_config(cfg, &d));
  ITR_CHECK(0 <= layer_begin && layer_begin <= layer_end && layer_end <= d.L, ITR_ERR_INPUT,
            "model: layer range [%d, %d) is not inside [0, %d) (num_hidden_layers)", layer_begin,
            layer_end, d.L);
  int nl = layer_end - layer_begin;
  /* count the floats first, then carve */
  size_t per_layer = 0;
  for (int m = 0; m < ITR_MODULE_COUNT; m++) {
    int64_t o, i;
    itr_model_dims_module(&d, (itr_module)m, &o, &i);
    per_layer += (no_weight & (1u << m) ? 0 : (size_t)o * (size_t)i) + (itr_model_has_bias(cfg, (itr_module)m) ? (size_t)o : 0);
  }
  per_layer += 2 * (size_t)d.D;
  size_t total, vd = (size_t)d.V * (size_t)d.D;
  if (!itr_mul_size(per_layer, (size_t)nl, &total))
    return itr_error_set(ITR_ERR_INPUT, "model: parameter count overflows");
  int head_separate = with_head && !(cfg->tie_word_embeddings && with_embed);
  total += (with_embed ? vd : 0) + (head_separate ? vd : 0) + (with_head ? (size_t)d.D : 0);
  if (floats) *floats = total;
  if (!out) return ITR_OK;
  ITR_CHECK(!ext || ext_floats >= total, ITR_ERR_INTERNAL,
            "model: the memory given holds %zu floats, the layers [%d, %d) need %zu", ext_floats, layer_begin,
            layer_end, total);

  itr_model *m = NULL;
  ITR_TRY(itr_calloc(1, sizeof *m, "model", &m));
  itr_err err = ITR_OK;
  if (ext)
    m->mem = ext;
  else
    err = itr_calloc(total, sizeof(float), "model parameters (f32)", &m->mem);
  m->owns_mem = !ext;
  if (err == ITR_OK) err = itr_calloc((size_t)(nl > 0 ? nl : 1), sizeof(layer_params), "model layers", &m->layers);
  if (err != ITR_OK) {
    if (m->owns_mem) free(m->mem);
    free(m);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  m->cfg = *cfg;
  m->dims = d;
  m->layer_begin = layer_begin;
  m->layer_end = layer_end;
  m->with_embed = with_embed;
  m->with_head = with_head;
  float *p = m->mem;
  for (int l = 0; l < nl; l++) {
    layer_params *lp = &m->layers[l];
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t o, i;
      itr_model_dims_module(&d, (itr_module)k, &o, &i);
      if (!(no_weight & (1u << k))) lp->w[k] = p, p += o * i;
      if (itr_model_has_bias(cfg, (itr_module)k)) lp->b[k] = p, p += o;
    }
    lp->norm_in = p, p += d.D;
    lp->norm_post = p, p += d.D;
  }
  if (with_embed) m->embed = p, p += vd;
  if (with_head) {
    m->final_norm = p, p += d.D;
    if (head_separate) m->lm_head = p, p += vd;
    else m->lm_head = m->embed;
  }
  ITR_ASSERT((size_t)(p - m->mem) == total);
  m->n_params = total;
  *out = m;
  return ITR_OK;
}

itr_err itr_model_create(const itr_model_config *cfg, int layer_begin, int layer_end, int with_embed,
                         int with_head, itr_model **out) {
  return model_create(cfg, layer_begin, layer_end, with_embed, with_head, 0, NULL, 0, NULL, out);
}

itr_err itr_model_param_floats(const itr_model_config *cfg, int layer_begin, int layer_end, int with_embed,
                               int with_head, size_t *n) {
  return model_create(cfg, layer_begin, layer_end, with_embed, with_head, 0, NULL, 0, n, NULL);
}

itr_err itr_model_create_in(const itr_model_config *cfg, int layer_begin, int layer_end, int with_embed, int with_head,
                            float *mem, size_t n, itr_model **out) {
  ITR_CHECK(mem, ITR_ERR_INTERNAL, "itr_model_create_in: no memory given");
  return model_create(cfg, layer_begin, layer_end, with_embed, with_head, 0, mem, n, NULL, out);
}

itr_err itr_model_create_except(const itr_model_config *cfg, unsigned no_weight, itr_model **out) {
  itr_model_dims d;
  ITR_TRY(itr_model_dims_from_config(cfg, &d));
  return model_create(cfg, 0, d.L, 1, 1, no_weight & ((1u << ITR_MODULE_COUNT) - 1), NULL, 0, NULL, out);
}

void itr_model_destroy(itr_model *m) {
  if (!m) return;
  if (m->owns_mem) free(m->mem);
  free(m->layers);
  free(m);
}

const itr_model_config *itr_model_config_of(const itr_model *m) { return &m->cfg; }
void itr_model_layers(const itr_model *m, int *layer_begin, int *layer_end) {
  *layer_begin = m->layer_begin;
  *layer_end = m->layer_end;
}
const itr_model_dims *itr_model_dims_of(const itr_model *m) { return &m->dims; }
int itr_model_head_is_embed(const itr_model *m) { return m->with_head && m->lm_head == m->embed; }

static layer_params *layer_of(itr_model *m, int layer) {
  if (layer < m->layer_begin || layer >= m->layer_end) return NULL;
  return &m->layers[layer - m->layer_begin];
}
float *itr_model_weight(itr_model *m, int layer, itr_module mod) {
  layer_params *lp = layer_of(m, layer);
  return lp && (unsigned)mod < ITR_MODULE_COUNT ? lp->w[mod] : NULL;
}
float *itr_model_bias(itr_model *m, int layer, itr_module mod) {
  layer_params *lp = layer_of(m, layer);
  return lp && (unsigned)mod < ITR_MODULE_COUNT ? lp->b[mod] : NULL;
}
float *itr_model_norm(itr_model *m, int layer, int post_attention) {
  layer_params *lp = layer_of(m, layer);
  return lp ? (post_attention ? lp->norm_post : lp->norm_in) : NULL;
}
float *itr_model_embed_weight(itr_model *m) { return m->embed; }
float *itr_model_params(itr_model *m, size_t *n) {
  *n = m->n_params;
  return m->mem;
}
float *itr_model_final_norm(itr_model *m) { return m->final_norm; }
float *itr_model_lm_head(itr_model *m) { return m->lm_head; }

/* ---- steps of the forward pass ------------------------------------------------------------- */

void model_rmsnorm_forward(float *out, float *inv_out, const float *x, const float *w, int64_t T, int D,
                           double eps) {
  for (int64_t t = 0; t < T; t++) {
    const float *xr = x + t * D;
    float *o = out + t * D;
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
    float inv = (float)(1.0 / sqrt(ss / D + eps));
    if (inv_out) inv_out[t] = inv;
    for (int i = 0; i < D; i++) o[i] = w[i] * (xr[i] * inv);
  }
}

void model_linear_forward(float *out, const float *x, const float *x_lora, const float *W, const float *b,
                          const itr_lora_slot *slot, float *tmp, int T, int d_out, int d_in,
                          int accumulate, float *prod, double *sumsq) {
  if (!x_lora) x_lora = x;
  float *y = accumulate ? prod : out;
  const size_t n = (size_t)T * (size_t)d_out;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, d_out, d_in, 1.0f, x, d_in, W, d_in, 0.0f, y, d_out);
  for (int k = 0; slot && k < slot->n_terms; k++) {
    const itr_lora_term *tm = &slot->terms[k];
    /* tmp (T, r) = x A^T;  y += s tmp B^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, tm->r, d_in, 1.0f, x_lora, d_in, tm->A, d_in,
                0.0f, tmp, tm->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, d_out, tm->r, tm->scaling, tmp, tm->r,
                tm->B, tm->r, 1.0f, y, d_out);
  }
  if (slot && slot->dW)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, d_out, d_in, slot->dW_scale, x, d_in,
                slot->dW, d_in, 1.0f, y, d_out);
  if (sumsq) {
    double ss = 0.0;
    for (size_t i = 0; i < n; i++) ss += (double)y[i] * (double)y[i];
    *sumsq = ss;
  }
  if (b)
    for (int t = 0; t < T; t++)
      for (int o = 0; o < d_out; o++) y[(int64_t)t * d_out + o] += b[o];
  if (accumulate)
    for (size_t i = 0; i < n; i++) out[i] += prod[i];
}

void model_rope_forward(float *x, int n, int nh, int hd, int ld, const float *cosv, const float *sinv) {
  int half = hd / 2;
  for (int t = 0; t < n; t++)
    for (int h = 0; h < nh; h++) {
      float *v = x + (int64_t)t * ld + (int64_t)h * hd;
      const float *c = cosv + (int64_t)t * half, *s = sinv + (int64_t)t * half;
      for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
}

void model_attention_probs(float *S, const float *qh, int ldq, const float *kh, int ldk, int n, int hd) {
  float scale = (float)(1.0 / sqrt((double)hd));
  /* S (n, n) = scale * Q_h K_kh^T */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, hd, scale, qh, ldq, kh, ldk, 0.0f, S, n);
  for (int i = 0; i < n; i++) {
    float *row = S + (int64_t)i * n, mx = row[0];
    for (int j = 1; j <= i; j++) mx = row[j] > mx ? row[j] : mx;
    double sum = 0;
    for (int j = 0; j <= i; j++) {
      row[j] = expf(row[j] - mx);
      sum += row[j];
    }
    float inv = (float)(1.0 / sum);
    for (int j = 0; j <= i; j++) row[j] *= inv;
    for (int j = i + 1; j < n; j++) row[j] = 0.0f;
  }
}

void model_attention_forward(float *att, const float *q, const float *k, const float *v, float *S, int n,
                             const itr_model_dims *d) {
  int qd = d->H * d->hd, kvd = d->Hkv * d->hd, group = d->H / d->Hkv;
  for (int h = 0; h < d->H; h++) {
    int kh = h / group;
    model_attention_probs(S, q + h * d->hd, qd, k + kh * d->hd, kvd, n, d->hd);
    /* att_h (n, hd) = S V_kh */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d->hd, n, 1.0f, S, n, v + kh * d->hd,
                kvd, 0.0f, att + h * d->hd, qd);
  }
}

void model_rope_table(float *cosv, float *sinv, int64_t max_len, const itr_model_dims *d) {
  int half = d->hd / 2;
  for (int64_t t = 0; t < max_len; t++)
    for (int i = 0; i < half; i++) {
      double ang = (double)t * pow(d->theta, -2.0 * i / d->hd);
      cosv[t * half + i] = (float)cos(ang);
      sinv[t * half + i] = (float)sin(ang);
    }
}

const itr_lora_slot *model_lora_slot(const itr_lora_set *s, int layer, itr_module m) {
  if (!s || layer < 0 || layer >= s->num_layers) return NULL;
  const itr_lora_slot *sl = &s->slots[layer * ITR_MODULE_COUNT + m];
  return (sl->n_terms > 0 || sl->dW) ? sl : NULL;
}

itr_err model_check_layout(const itr_seq_layout *seqs, int64_t T, int64_t *max_len) {
  ITR_CHECK(seqs->n_seqs >= 1 && seqs->offsets, ITR_ERR_INPUT,
            "forward: sequence layout has %d sequences (need >= 1 and offsets)", seqs->n_seqs);
  ITR_CHECK(seqs->offsets[0] == 0 && seqs->offsets[seqs->n_seqs] == T, ITR_ERR_INPUT,
            "forward: sequence offsets run from %lld to %lld but the block has T = %lld tokens "
            "(offsets[0] must be 0 and offsets[n_seqs] = T)",
            (long long)seqs->offsets[0], (long long)seqs->offsets[seqs->n_seqs], (long long)T);
  int64_t mx = 0;
  for (int s = 0; s < seqs->n_seqs; s++) {
    int64_t n = seqs->offsets[s + 1] - seqs->offsets[s];
    ITR_CHECK(n > 0, ITR_ERR_INPUT,
              "forward: sequence %d is empty or offsets decrease (offsets %lld -> %lld); sequences "
              "must have at least one token",
              s, (long long)seqs->offsets[s], (long long)seqs->offsets[s + 1]);
    if (n > mx) mx = n;
  }
  *max_len = mx;
  return ITR_OK;
}

itr_err itr_model_run_layers(const itr_model *m, int a, int b, float *hidden, int64_t T,
                             const itr_seq_layout *seqs, const itr_lora_set *lora,
                             itr_capture_fn sink, void *ctx) {
  return itr_model_run_layers_ex(m, a, b, hidden, T, seqs, lora, sink, NULL, ctx);
}

itr_err itr_model_run_layers_ex(const itr_model *m, int a, int b, float *hidden, int64_t T,
                                const itr_seq_layout *seqs, const itr_lora_set *lora,
                                itr_capture_fn sink, itr_output_norm_fn out_norm, void *ctx) {
  const itr_model_dims *d = &m->dims;
  ITR_CHECK(m->layer_begin <= a && a <= b && b <= m->layer_end, ITR_ERR_INPUT,
            "forward: layers [%d, %d) requested but this model owns [%d, %d)", a, b, m->layer_begin,
            m->layer_end);
  ITR_CHECK(T >= 1 && T <= INT_MAX / 2, ITR_ERR_INPUT, "forward: block of %lld tokens (need 1..%d)",
            (long long)T, INT_MAX / 2);
  if (lora) {
    ITR_CHECK(lora->num_layers == d->L && lora->cfg.hidden_size == d->D &&
                  lora->cfg.intermediate_size == d->F,
              ITR_ERR_INPUT,
              "forward: the LoRA set was made for another model (L %d, D %d, F %d; model has L %d, "
              "D %d, F %d)",
              lora->num_layers, lora->cfg.hidden_size, lora->cfg.intermediate_size, d->L, d->D, d->F);
  }
  int64_t one[2] = {0, T};
  itr_seq_layout whole = {1, one};
  if (!seqs) seqs = &whole;
  int64_t max_len = 0;
  ITR_TRY(model_check_layout(seqs, T, &max_len));
  if (a == b) return ITR_OK;

  int max_r = 1;
  if (lora)
    for (int l = a; l < b; l++)
      for (int k = 0; k < ITR_MODULE_COUNT; k++) {
        const itr_lora_slot *sl = model_lora_slot(lora, l, (itr_module)k);
        for (int j = 0; sl && j < sl->n_terms; j++)
          if (sl->terms[j].r > max_r) max_r = sl->terms[j].r;
      }

  int D = d->D, F = d->F, qd = d->H * d->hd, kvd = d->Hkv * d->hd, half = d->hd / 2;
  /* workspace, one allocation */
  size_t n_xn = (size_t)T * D, n_q = (size_t)T * qd, n_kv = (size_t)T * kvd, n_f = (size_t)T * F;
  size_t n_S = (size_t)max_len * (size_t)max_len, n_tmp = (size_t)T * max_r,
         n_rope = (size_t)max_len * half;
  size_t total = 2 * n_xn + 2 * n_q + 2 * n_kv + 2 * n_f + n_S + n_tmp + 2 * n_rope;
  float *ws = NULL;
  ITR_TRY(itr_calloc(total, sizeof(float), "forward workspace", &ws));
  float *xn = ws, *q = xn + n_xn, *att = q + n_q, *k = att + n_q, *v = k + n_kv, *g = v + n_kv,
        *u = g + n_f, *S = u + n_f, *tmp = S + n_S, *cosv = tmp + n_tmp, *sinv = cosv + n_rope,
        *prod = sinv + n_rope; /* (T, D): the o and down products before they join the residual */
  double ss[ITR_MODULE_COUNT];
  double *want = out_norm ? ss : NULL;
#define SS(mod) (want ? &ss[mod] : NULL)
  model_rope_table(cosv, sinv, max_len, d);

  itr_err err = ITR_OK;
  int Ti = (int)T;
  for (int l = a; l < b; l++) {
    const layer_params *lp = &m->layers[l - m->layer_begin];
    /* attention block */
    model_rmsnorm_forward(xn, NULL, hidden, lp->norm_in, T, D, d->eps);
    if (sink) ITR_TRY_GOTO(sink(l, ITR_SITE_ATTN_IN, xn, T, D, ctx), err, done);
    model_linear_forward(q, xn, NULL, lp->w[ITR_Q_PROJ], lp->b[ITR_Q_PROJ], model_lora_slot(lora, l, ITR_Q_PROJ), tmp, Ti, qd, D, 0, prod, SS(ITR_Q_PROJ));
    model_linear_forward(k, xn, NULL, lp->w[ITR_K_PROJ], lp->b[ITR_K_PROJ], model_lora_slot(lora, l, ITR_K_PROJ), tmp, Ti, kvd, D, 0, prod, SS(ITR_K_PROJ));
    model_linear_forward(v, xn, NULL, lp->w[ITR_V_PROJ], lp->b[ITR_V_PROJ], model_lora_slot(lora, l, ITR_V_PROJ), tmp, Ti, kvd, D, 0, prod, SS(ITR_V_PROJ));
    for (int s = 0; s < seqs->n_seqs; s++) {
      int64_t t0 = seqs->offsets[s];
      int n = (int)(seqs->offsets[s + 1] - t0);
      model_rope_forward(q + t0 * qd, n, d->H, d->hd, qd, cosv, sinv);
      model_rope_forward(k + t0 * kvd, n, d->Hkv, d->hd, kvd, cosv, sinv);
      model_attention_forward(att + t0 * qd, q + t0 * qd, k + t0 * kvd, v + t0 * kvd, S, n, d);
    }
    if (sink) ITR_TRY_GOTO(sink(l, ITR_SITE_ATTN_OUT, att, T, qd, ctx), err, done);
    model_linear_forward(hidden, att, NULL, lp->w[ITR_O_PROJ], lp->b[ITR_O_PROJ], model_lora_slot(lora, l, ITR_O_PROJ), tmp, Ti, D, qd, 1, prod, SS(ITR_O_PROJ));
    /* MLP block */
    model_rmsnorm_forward(xn, NULL, hidden, lp->norm_post, T, D, d->eps);
    if (sink) ITR_TRY_GOTO(sink(l, ITR_SITE_MLP_IN, xn, T, D, ctx), err, done);
    if (lora && lora->moe && lora->moe[l].E > 0) { /* MixLoRA: no MLP_OUT capture (each expert has its own) */
      ITR_TRY_GOTO(model_moe_forward(hidden, xn, lp->w[ITR_GATE_PROJ], lp->b[ITR_GATE_PROJ], lp->w[ITR_UP_PROJ],
                                     lp->b[ITR_UP_PROJ], lp->w[ITR_DOWN_PROJ], lp->b[ITR_DOWN_PROJ], &lora->moe[l],
                                     Ti, D, F),
                   err, done);
      if (out_norm)
        for (int mm = 0; mm < ITR_MODULE_COUNT; mm++) out_norm(l, (itr_module)mm, mm < ITR_GATE_PROJ ? ss[mm] : 0, ctx);
      continue;
    }
    model_linear_forward(g, xn, NULL, lp->w[ITR_GATE_PROJ], lp->b[ITR_GATE_PROJ], model_lora_slot(lora, l, ITR_GATE_PROJ), tmp, Ti, F, D, 0, prod, SS(ITR_GATE_PROJ));
    model_linear_forward(u, xn, NULL, lp->w[ITR_UP_PROJ], lp->b[ITR_UP_PROJ], model_lora_slot(lora, l, ITR_UP_PROJ), tmp, Ti, F, D, 0, prod, SS(ITR_UP_PROJ));
    for (size_t i = 0; i < n_f; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    if (sink) ITR_TRY_GOTO(sink(l, ITR_SITE_MLP_OUT, g, T, F, ctx), err, done);
    model_linear_forward(hidden, g, NULL, lp->w[ITR_DOWN_PROJ], lp->b[ITR_DOWN_PROJ], model_lora_slot(lora, l, ITR_DOWN_PROJ), tmp, Ti, D, F, 1, prod, SS(ITR_DOWN_PROJ));
    if (out_norm)
      for (int mm = 0; mm < ITR_MODULE_COUNT; mm++) out_norm(l, (itr_module)mm, ss[mm], ctx);
  }
done:
#undef SS
  free(ws);
  return err;
}

itr_err itr_model_embed(const itr_model *m, const int32_t *ids, int64_t T, float *hidden) {
  ITR_CHECK(m->embed, ITR_ERR_INPUT, "embed: this model part was created without the embedding (with_embed = 0)");
  int D = m->dims.D;
  for (int64_t t = 0; t < T; t++)
    ITR_CHECK(ids[t] >= 0 && ids[t] < m->dims.V, ITR_ERR_INPUT,
              "embed: token id %d at position %lld is outside the vocabulary [0, %d)", (int)ids[t],
              (long long)t, m->dims.V);
  for (int64_t t = 0; t < T; t++) memcpy(hidden + t * D, m->embed + (int64_t)ids[t] * D, (size_t)D * sizeof(float));
  return ITR_OK;
}

itr_err itr_model_logits(const itr_model *m, const float *hidden, int64_t T, float *logits) {
  ITR_CHECK(m->lm_head && m->final_norm, ITR_ERR_INPUT,
            "logits: this model part was created without the head (with_head = 0)");
  ITR_CHECK(T >= 1 && T <= INT_MAX / 2, ITR_ERR_INPUT, "logits: block of %lld tokens (need >= 1)", (long long)T);
  int D = m->dims.D, V = m->dims.V;
  float *xn = NULL;
  ITR_TRY(itr_calloc((size_t)T * D, sizeof(float), "logits workspace", &xn));
  model_rmsnorm_forward(xn, NULL, hidden, m->final_norm, T, D, m->dims.eps);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, V, D, 1.0f, xn, D, m->lm_head, D, 0.0f,
              logits, V);
  free(xn);
  return ITR_OK;
}

itr_err itr_model_forward(const itr_model *m, const int32_t *ids, int64_t T, const itr_seq_layout *seqs,
                          const itr_lora_set *lora, itr_capture_fn sink, void *ctx, float *logits) {
  ITR_CHECK(m->layer_begin == 0 && m->layer_end == m->dims.L && m->embed && m->lm_head, ITR_ERR_INPUT,
            "forward: the whole forward needs every layer, the embedding and the head (this part has "
            "layers [%d, %d) of %d, embedding %s, head %s)",
            m->layer_begin, m->layer_end, m->dims.L, m->embed ? "yes" : "no", m->lm_head ? "yes" : "no");
  ITR_CHECK(T >= 1, ITR_ERR_INPUT, "forward: empty token block");
  float *h = NULL;
  ITR_TRY(itr_calloc((size_t)T, (size_t)m->dims.D * sizeof(float), "hidden states", &h));
  itr_err err;
  ITR_TRY_GOTO(itr_model_embed(m, ids, T, h), err, done);
  ITR_TRY_GOTO(itr_model_run_layers(m, 0, m->dims.L, h, T, seqs, lora, sink, ctx), err, done);
  ITR_TRY_GOTO(itr_model_logits(m, h, T, logits), err, done);
done:
  free(h);
  return err;
}
