/* A PEFT LoRA adapter aimed at one task's inputs, as trained adapters are: the rows of each A lie
 * mostly in the top principal subspace of the inputs that the task's tokens produce at that site.
 *
 * The inputs are those of the base model plus the adapter's own earlier modules, run in float64
 * on every token of the vocabulary as a sequence of one token (so attention returns v and rotary
 * is the identity: no context, the one proxy that needs no sampling and no BLAS), weighted by the
 * task's token distribution: C = sum_t w_t x_t x_t^T at each input site. Plain loops in a fixed
 * order, so the files are a function of the arguments alone. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/io.h"
#include "iteris/synth.h"
#include "synth/synth_internal.h"

/* Subspace iterations for the top-r principal directions (a fixed count: deterministic). */
#define AIM_ITERS 40

typedef struct {
  itr_model_config c;
  itr_tensor_store *store;
  itr_st_writer *w;
  int r;
  double scaling, aim;
  itr_dtype dtype;
  uint64_t seed;
  const double *wt; /* (V) token weights, sum 1 */
} aim_ctx;

/* *out = the tensor name as f64 (numel elements, checked); NULL with ITR_OK when absent and optional. */
static itr_err read_tensor(itr_tensor_store *s, const char *name, int64_t numel, int optional, double **out) {
  *out = NULL;
  if (optional && !itr_tensor_store_has(s, name)) return ITR_OK;
  const itr_tensor_info *t = NULL;
  ITR_TRY(itr_tensor_store_get(s, name, &t));
  ITR_CHECK(t->numel == numel, ITR_ERR_INPUT,
            "synth aimed adapter: tensor '%s' in '%s' has %lld elements, expected %lld", name,
            itr_tensor_store_dir(s), (long long)t->numel, (long long)numel);
  double *buf = NULL;
  ITR_TRY(itr_calloc((size_t)numel, sizeof(double), name, &buf));
  itr_err e = itr_tensor_read_f64(t, buf);
  if (e != ITR_OK) {
    free(buf);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = buf;
  return ITR_OK;
}

/* x (V, D) = rmsnorm(h) * g. */
static void rmsnorm(const double *h, int64_t V, int D, const double *g, double eps, double *x) {
  for (int64_t t = 0; t < V; t++) {
    const double *hr = h + t * D;
    double ss = 0;
    for (int j = 0; j < D; j++) ss += hr[j] * hr[j];
    double inv = 1.0 / sqrt(ss / D + eps);
    for (int j = 0; j < D; j++) x[t * D + j] = hr[j] * inv * g[j];
  }
}

/* y (V, d_out) (+)= x (V, d_in) W^T + b; W (d_out, d_in), b (d_out) or NULL. */
static void linear(const double *x, int64_t V, int64_t d_in, const double *W, const double *b, int64_t d_out,
                   int accumulate, double *y) {
  for (int64_t t = 0; t < V; t++)
    for (int64_t o = 0; o < d_out; o++) {
      const double *wr = W + o * d_in, *xr = x + t * d_in;
      double acc = b ? b[o] : 0.0;
      for (int64_t j = 0; j < d_in; j++) acc += wr[j] * xr[j];
      y[t * d_out + o] = accumulate ? y[t * d_out + o] + acc : acc;
    }
}

/* C (d, d) = sum_t wt[t] x_t x_t^T. */
static void gram(const double *x, int64_t V, int64_t d, const double *wt, double *C) {
  memset(C, 0, (size_t)(d * d) * sizeof(double));
  for (int64_t t = 0; t < V; t++) {
    if (wt[t] == 0) continue;
    const double *xr = x + t * d;
    for (int64_t i = 0; i < d; i++) {
      double wi = wt[t] * xr[i];
      for (int64_t j = i; j < d; j++) C[i * d + j] += wi * xr[j];
    }
  }
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = 0; j < i; j++) C[i * d + j] = C[j * d + i];
}

/* Modified Gram-Schmidt (twice) on the rows of Q (k, d); a row that vanishes becomes zero. */
static void orth_rows(double *Q, int k, int64_t d) {
  for (int pass = 0; pass < 2; pass++)
    for (int a = 0; a < k; a++) {
      double *qa = Q + (int64_t)a * d;
      for (int b = 0; b < a; b++) {
        const double *qb = Q + (int64_t)b * d;
        double dot = 0;
        for (int64_t j = 0; j < d; j++) dot += qa[j] * qb[j];
        for (int64_t j = 0; j < d; j++) qa[j] -= dot * qb[j];
      }
      double nn = 0;
      for (int64_t j = 0; j < d; j++) nn += qa[j] * qa[j];
      double inv = nn > 1e-24 ? 1.0 / sqrt(nn) : 0.0;
      for (int64_t j = 0; j < d; j++) qa[j] *= inv;
    }
}

/* Q (k, d): orthonormal rows spanning (approximately) the top-k eigenvectors of C (d, d), by
 * subspace iteration from a seeded Gaussian start; tmp holds k * d. k <= d. */
static void top_subspace(const double *C, int64_t d, int k, uint64_t seed, const char *name, double *Q, double *tmp) {
  itr_rng g;
  itr_rng_init(&g, itr_synth_seed(seed, name));
  for (int64_t i = 0; i < (int64_t)k * d; i++) Q[i] = itr_rng_normal(&g);
  orth_rows(Q, k, d);
  for (int it = 0; it < AIM_ITERS; it++) {
    linear(Q, k, d, C, NULL, d, 0, tmp); /* C symmetric: rows of Q C */
    memcpy(Q, tmp, (size_t)((int64_t)k * d) * sizeof(double));
    orth_rows(Q, k, d);
  }
}

/* Rounds v[n] to what dtype stores (through f32). */
static void round_to(itr_dtype dt, double *v, size_t n) {
  for (size_t i = 0; i < n; i++) {
    float f = (float)v[i];
    if (dt == ITR_BF16) f = itr_bf16_to_f32(itr_f32_to_bf16(f));
    if (dt == ITR_F16) f = itr_f16_to_f32(itr_f32_to_f16(f));
    v[i] = f;
  }
}

/* Builds module m of layer l from the input Gram C (d_in, d_in): adds lora_A / lora_B to the
 * writer and returns *W_eff (d_out, d_in) = W0 + scaling B A with the stored (rounded) factors. */
static itr_err build_module(aim_ctx *x, int l, itr_module m, const double *C, double **W_eff) {
  int64_t d_out, d_in;
  itr_module_shape(&x->c, m, &d_out, &d_in);
  const int r = x->r;
  char wname[160], aname[160], bname[176];
  itr_name_base(l, m, "weight", wname, sizeof wname);
  itr_name_lora(l, m, 'A', aname, sizeof aname);
  itr_name_lora(l, m, 'B', bname, sizeof bname);
  double *W = NULL, *A = NULL, *B = NULL, *Z = NULL, *tmp = NULL;
  float *f = NULL;
  itr_err e = read_tensor(x->store, wname, d_out * d_in, 0, &W);
  size_t na = (size_t)r * (size_t)d_in, nb = (size_t)d_out * (size_t)r;
  if (e == ITR_OK) e = itr_calloc(na, sizeof(double), "synth aimed A", &A);
  if (e == ITR_OK) e = itr_calloc(na, sizeof(double), "synth aimed random part", &Z);
  if (e == ITR_OK) e = itr_calloc(na, sizeof(double), "synth aimed scratch", &tmp);
  if (e == ITR_OK) e = itr_calloc(nb, sizeof(double), "synth aimed B", &B);
  if (e == ITR_OK) e = itr_calloc(na > nb ? na : nb, sizeof(float), "synth aimed factor", &f);
  if (e == ITR_OK) {
    /* A = sqrt(aim) Q + sqrt(1 - aim) Z: Q orthonormal rows in the top-r principal subspace (rows
     * beyond d_in are zero), Z ~ N(0, 1/d_in) (unit rows in expectation). */
    int k = r < d_in ? r : (int)d_in;
    char qname[192];
    snprintf(qname, sizeof qname, "%s/aim", aname);
    top_subspace(C, d_in, k, x->seed, qname, A, tmp);
    itr_rng g;
    itr_rng_init(&g, itr_synth_seed(x->seed, aname));
    for (size_t i = 0; i < na; i++) Z[i] = itr_rng_normal(&g) / sqrt((double)d_in);
    double ca = sqrt(x->aim), cz = sqrt(1.0 - x->aim);
    for (size_t i = 0; i < na; i++) A[i] = ca * A[i] + cz * Z[i];
    itr_rng_init(&g, itr_synth_seed(x->seed, bname));
    for (size_t i = 0; i < nb; i++) B[i] = itr_rng_normal(&g);
    round_to(x->dtype, A, na);
    /* Scale B so that ||scaling B A||_F = ITR_SYNTH_ADAPTER_REL_NORM ||W0||_F exactly:
     * ||B A||_F^2 = <B^T B, A A^T>. */
    double w2 = 0, ba2 = 0;
    for (int64_t i = 0; i < d_out * d_in; i++) w2 += W[i] * W[i];
    for (int a = 0; a < r; a++)
      for (int b = 0; b < r; b++) {
        double btb = 0, aat = 0;
        for (int64_t o = 0; o < d_out; o++) btb += B[o * r + a] * B[o * r + b];
        for (int64_t j = 0; j < d_in; j++) aat += A[(int64_t)a * d_in + j] * A[(int64_t)b * d_in + j];
        ba2 += btb * aat;
      }
    double s = ba2 > 0 ? ITR_SYNTH_ADAPTER_REL_NORM * sqrt(w2) / (x->scaling * sqrt(ba2)) : 0.0;
    for (size_t i = 0; i < nb; i++) B[i] *= s;
    round_to(x->dtype, B, nb);
    int64_t sa[2] = {r, d_in}, sb[2] = {d_out, r};
    for (size_t i = 0; i < na; i++) f[i] = (float)A[i];
    e = itr_st_writer_add_f32(x->w, aname, x->dtype, 2, sa, f);
    for (size_t i = 0; i < nb && e == ITR_OK; i++) f[i] = (float)B[i];
    if (e == ITR_OK) e = itr_st_writer_add_f32(x->w, bname, x->dtype, 2, sb, f);
  }
  if (e == ITR_OK) {
    for (int64_t o = 0; o < d_out; o++)
      for (int64_t j = 0; j < d_in; j++) {
        double acc = 0;
        for (int k = 0; k < r; k++) acc += B[o * r + k] * A[(int64_t)k * d_in + j];
        W[o * d_in + j] += x->scaling * acc;
      }
  }
  free(A);
  free(B);
  free(Z);
  free(tmp);
  free(f);
  if (e != ITR_OK) {
    free(W);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *W_eff = W;
  return ITR_OK;
}

/* Effective weight of module m: built (when in the mask, from the Gram C) or the base's. */
static itr_err module_weight(aim_ctx *x, unsigned mask, int l, itr_module m, const double *C, double **W) {
  if (mask & (1u << m)) {
    ITR_TRY(build_module(x, l, m, C, W));
  } else {
    int64_t d_out, d_in;
    itr_module_shape(&x->c, m, &d_out, &d_in);
    char name[160];
    itr_name_base(l, m, "weight", name, sizeof name);
    ITR_TRY(read_tensor(x->store, name, d_out * d_in, 0, W));
  }
  return ITR_OK;
}

static itr_err module_bias(aim_ctx *x, int l, itr_module m, double **b) {
  int64_t d_out, d_in;
  itr_module_shape(&x->c, m, &d_out, &d_in);
  char name[160];
  itr_name_base(l, m, "bias", name, sizeof name);
  ITR_TRY(read_tensor(x->store, name, d_out, 1, b));
  return ITR_OK;
}

/* One layer on the single-token hidden states h (V, D), in place, building the layer's modules. */
static itr_err run_layer(aim_ctx *x, unsigned mask, int l, double *h) {
  const itr_model_config *c = &x->c;
  const int64_t V = c->vocab_size, D = c->hidden_size, F = c->intermediate_size;
  const int H = c->num_attention_heads, KV = c->num_key_value_heads, hd = c->head_dim;
  const int64_t dq = (int64_t)H * hd, dkv = (int64_t)KV * hd;
  const int64_t dmax = F > dq ? (F > D ? F : D) : (dq > D ? dq : D);
  double *xin = NULL, *v = NULL, *a = NULL, *g = NULL, *u = NULL, *C = NULL, *nw = NULL;
  double *Wv = NULL, *Wo = NULL, *Wg = NULL, *Wu = NULL, *Wd = NULL, *Wq = NULL, *Wk = NULL;
  double *bv = NULL, *bo = NULL, *bg = NULL, *bu = NULL, *bd = NULL;
  itr_err e = itr_calloc((size_t)(V * dmax), sizeof(double), "synth aimed inputs", &xin);
  if (e == ITR_OK) e = itr_calloc((size_t)(V * dkv), sizeof(double), "synth aimed v", &v);
  if (e == ITR_OK) e = itr_calloc((size_t)(V * dq), sizeof(double), "synth aimed attention", &a);
  if (e == ITR_OK) e = itr_calloc((size_t)(V * F), sizeof(double), "synth aimed gate", &g);
  if (e == ITR_OK) e = itr_calloc((size_t)(V * F), sizeof(double), "synth aimed up", &u);
  if (e == ITR_OK) e = itr_calloc((size_t)(dmax * dmax), sizeof(double), "synth aimed Gram", &C);
  char name[160];
  /* ATTN_IN: q, k, v read x = rmsnorm(h) w_in (q and k do not change a one-token output). */
  if (e == ITR_OK) itr_name_layer_norm(l, 0, name, sizeof name);
  if (e == ITR_OK) e = read_tensor(x->store, name, D, 0, &nw);
  if (e == ITR_OK) {
    rmsnorm(h, V, (int)D, nw, c->rms_norm_eps, xin);
    gram(xin, V, D, x->wt, C);
    e = module_weight(x, mask, l, ITR_Q_PROJ, C, &Wq);
  }
  if (e == ITR_OK) e = module_weight(x, mask, l, ITR_K_PROJ, C, &Wk);
  if (e == ITR_OK) e = module_weight(x, mask, l, ITR_V_PROJ, C, &Wv);
  if (e == ITR_OK) e = module_bias(x, l, ITR_V_PROJ, &bv);
  /* ATTN_OUT: one token attends to itself: head h's output is its key/value head's v. */
  if (e == ITR_OK) {
    linear(xin, V, D, Wv, bv, dkv, 0, v);
    const int grp = H / KV;
    for (int64_t t = 0; t < V; t++)
      for (int hh = 0; hh < H; hh++)
        memcpy(a + t * dq + (int64_t)hh * hd, v + t * dkv + (int64_t)(hh / grp) * hd, (size_t)hd * sizeof(double));
    gram(a, V, dq, x->wt, C);
    e = module_weight(x, mask, l, ITR_O_PROJ, C, &Wo);
  }
  if (e == ITR_OK) e = module_bias(x, l, ITR_O_PROJ, &bo);
  if (e == ITR_OK) {
    linear(a, V, dq, Wo, bo, D, 1, h);
    free(nw);
    nw = NULL;
    itr_name_layer_norm(l, 1, name, sizeof name);
    e = read_tensor(x->store, name, D, 0, &nw);
  }
  /* MLP_IN: gate and up read rmsnorm(h) w_post. */
  if (e == ITR_OK) {
    rmsnorm(h, V, (int)D, nw, c->rms_norm_eps, xin);
    gram(xin, V, D, x->wt, C);
    e = module_weight(x, mask, l, ITR_GATE_PROJ, C, &Wg);
  }
  if (e == ITR_OK) e = module_weight(x, mask, l, ITR_UP_PROJ, C, &Wu);
  if (e == ITR_OK) e = module_bias(x, l, ITR_GATE_PROJ, &bg);
  if (e == ITR_OK) e = module_bias(x, l, ITR_UP_PROJ, &bu);
  /* MLP_OUT: down reads silu(gate) * up. */
  if (e == ITR_OK) {
    linear(xin, V, D, Wg, bg, F, 0, g);
    linear(xin, V, D, Wu, bu, F, 0, u);
    for (int64_t i = 0; i < V * F; i++) g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
    gram(g, V, F, x->wt, C);
    e = module_weight(x, mask, l, ITR_DOWN_PROJ, C, &Wd);
  }
  if (e == ITR_OK) e = module_bias(x, l, ITR_DOWN_PROJ, &bd);
  if (e == ITR_OK) linear(g, V, F, Wd, bd, D, 1, h);
  double *all[] = {xin, v, a, g, u, C, nw, Wq, Wk, Wv, Wo, Wg, Wu, Wd, bv, bo, bg, bu, bd};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_synth_adapter_write_aimed(const char *dir, const char *base_dir, int r, double alpha, int use_rslora,
                                      unsigned module_mask, itr_dtype dtype, const double *token_weights,
                                      double aim, uint64_t seed, const char *base_model_name) {
  ITR_CHECK(r >= 1 && r <= 65536, ITR_ERR_INPUT, "synth aimed adapter: rank %d must be >= 1", r);
  ITR_CHECK(isfinite(alpha) && alpha > 0, ITR_ERR_INPUT, "synth aimed adapter: lora_alpha %g must be positive",
            alpha);
  ITR_CHECK(module_mask != 0 && module_mask < (1u << ITR_MODULE_COUNT), ITR_ERR_INPUT,
            "synth aimed adapter: module mask 0x%x must name some of the %d modules", module_mask, ITR_MODULE_COUNT);
  ITR_CHECK(dtype == ITR_F32 || dtype == ITR_BF16 || dtype == ITR_F16, ITR_ERR_INPUT,
            "synth aimed adapter: dtype %s is not an adapter dtype (F32, BF16 or F16)", itr_dtype_name(dtype));
  ITR_CHECK(aim >= 0 && aim <= 1, ITR_ERR_INPUT, "synth aimed adapter: aim %g must be in [0, 1]", aim);
  aim_ctx x;
  memset(&x, 0, sizeof x);
  ITR_TRY(itr_model_config_read(base_dir, &x.c));
  const int64_t V = x.c.vocab_size, D = x.c.hidden_size;
  double sum = 0;
  for (int64_t t = 0; t < V; t++) {
    ITR_CHECK(isfinite(token_weights[t]) && token_weights[t] >= 0, ITR_ERR_INPUT,
              "synth aimed adapter: token weight %lld is %g; weights must be finite and >= 0", (long long)t,
              token_weights[t]);
    sum += token_weights[t];
  }
  ITR_CHECK(sum > 0, ITR_ERR_INPUT, "synth aimed adapter: the %lld token weights sum to 0", (long long)V);
  double *wt = NULL, *h = NULL, *emb = NULL;
  ITR_TRY(itr_calloc((size_t)V, sizeof(double), "synth aimed token weights", &wt));
  for (int64_t t = 0; t < V; t++) wt[t] = token_weights[t] / sum;
  x.wt = wt;
  x.r = r;
  x.scaling = use_rslora ? alpha / sqrt((double)r) : alpha / r;
  x.aim = aim;
  x.dtype = dtype;
  x.seed = seed;
  itr_err e = itr_tensor_store_open(base_dir, &x.store);
  if (e == ITR_OK) e = read_tensor(x.store, ITR_NAME_EMBED, V * D, 0, &emb);
  if (e == ITR_OK) e = itr_calloc((size_t)(V * D), sizeof(double), "synth aimed hidden", &h);
  if (e == ITR_OK) {
    memcpy(h, emb, (size_t)(V * D) * sizeof(double));
    e = itr_iofile_mkdirs(dir);
  }
  if (e == ITR_OK) e = itr_st_writer_create(&x.w);
  if (e == ITR_OK) e = itr_st_writer_set_metadata(x.w, "format", "pt");
  for (int l = 0; l < x.c.num_hidden_layers && e == ITR_OK; l++) e = run_layer(&x, module_mask, l, h);
  char path[ITR_PATH_MAX];
  if (e == ITR_OK) e = itr_synth_join(path, sizeof path, dir, "adapter_model.safetensors");
  if (e == ITR_OK) e = itr_st_writer_write(x.w, path);
  if (e == ITR_OK) e = itr_synth_adapter_config_write(dir, r, alpha, use_rslora, module_mask, base_model_name);
  itr_st_writer_destroy(x.w);
  itr_tensor_store_destroy(x.store);
  free(wt);
  free(h);
  free(emb);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}
