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
/* 1 when lm_head is the embedding (tied and with_embed). */
int itr_model_head_is_embed(const itr_model *m);

#endif
