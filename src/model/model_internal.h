/* Private to src/model: derived sizes of a configuration and small shared helpers. */
#ifndef ITERIS_MODEL_INTERNAL_H
#define ITERIS_MODEL_INTERNAL_H

#include "iteris/model.h"

typedef struct {
  int L, D, F, V;   /* layers, width, FFN width, vocabulary */
  int H, Hkv, hd;   /* heads, key/value heads, head_dim */
  double eps;       /* rms_norm_eps */
  double theta;     /* rope_theta (10000 when the config says 0) */
} itr_model_dims;

/* Validates cfg (positive sizes, heads divisible by kv heads, even head_dim) and fills d. */
itr_err itr_model_dims_from_config(const itr_model_config *cfg, itr_model_dims *d);
/* (d_out, d_in) of module m. */
void itr_model_dims_module(const itr_model_dims *d, itr_module m, int64_t *d_out, int64_t *d_in);
/* 1 when module m carries a bias under cfg (q/k/v: attention_bias or Qwen2; o: o_bias; MLP: mlp_bias). */
int itr_model_has_bias(const itr_model_config *cfg, itr_module m);
const itr_model_dims *itr_model_dims_of(const itr_model *m);


/* ---- steps of the forward pass (model.c), shared with the backward pass (backward.c) ---------- */

/* out (T, D) = x (T, D) / sqrt(mean(x^2) + eps) * w (D); x and out may alias. inv_out (T) (may
 * be NULL) gets each row's 1 / sqrt(mean(x^2) + eps). */
void model_rmsnorm_forward(float *out, float *inv_out, const float *x, const float *w, int64_t T, int D,
                           double eps);
/* out (T, d_out) (+)= x (T, d_in) W^T + sum_terms s (x_lora A^T) B^T + dW_scale x dW^T + b.
 * x_lora: the LoRA terms' input (x after LoRA dropout), NULL: x. accumulate = 1 adds into out
 * (the residual stream): the product is formed in prod (T, d_out) first, then added. sumsq (may be
 * NULL) gets ||product||_F^2 in float64, before the bias. tmp holds T * (largest r). */
void model_linear_forward(float *out, const float *x, const float *x_lora, const float *W, const float *b,
                          const itr_lora_slot *slot, float *tmp, int T, int d_out, int d_in,
                          int accumulate, float *prod, double *sumsq);
/* Rotate-half rotary embedding in place on x (n, nh heads of hd) with row stride ld, positions
 * 0..n-1; cosv/sinv (n, hd/2) from model_rope_table. */
void model_rope_forward(float *x, int n, int nh, int hd, int ld, const float *cosv, const float *sinv);
/* cosv, sinv (max_len, hd/2): cos and sin of position t times theta^(-2i/hd). */
void model_rope_table(float *cosv, float *sinv, int64_t max_len, const itr_model_dims *d);
/* S (n, n) = causal softmax(q_h k_h^T / sqrt(hd)) of one head of one sequence; q_h (n, hd) with row
 * stride ldq, k_h (n, hd) with row stride ldk; entries above the diagonal are 0. */
void model_attention_probs(float *S, const float *qh, int ldq, const float *kh, int ldk, int n, int hd);
/* Causal attention of one sequence: att (n, H*hd) from q (n, H*hd), k, v (n, Hkv*hd); S (n, n). */
void model_attention_forward(float *att, const float *q, const float *k, const float *v, float *S, int n,
                             const itr_model_dims *d);
/* The slot of (layer, m) when it adds anything, else NULL (also for s NULL). */
/* moe.c: top-k routing (ties: the lower index; weights renormalised over the chosen) and the MixLoRA
 * feed-forward of one layer, adding sum_e w_e y_e to hidden (T, D); xn (T, D) the FFN input. */
void model_moe_route(const float *z, int64_t T, int E, int k, int *sel, float *w);
itr_err model_moe_forward(float *hidden, const float *xn, const float *Wg, const float *bg, const float *Wu,
                          const float *bu, const float *Wd, const float *bd, const itr_lora_moe *mo, int T, int D,
                          int F);
const itr_lora_slot *model_lora_slot(const itr_lora_set *s, int layer, itr_module m);
/* Checks a sequence layout against T; *max_len = its longest sequence. */
itr_err model_check_layout(const itr_seq_layout *seqs, int64_t T, int64_t *max_len);

#endif
