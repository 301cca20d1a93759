/* Bridge from a PEFT adapter (io layer) to an itr_lora_set: converts the factors of the requested
 * layers to f32. Kept apart from lora.c so code that builds sets in memory does not need the io layer. */
#include <stdlib.h>

#include "iteris/model.h"
#include "model/model_internal.h"

itr_err itr_lora_set_add_adapter(itr_lora_set *s, const itr_adapter *a, int layer_begin, int layer_end,
                                 double weight) {
  ITR_CHECK(a->num_layers == s->num_layers, ITR_ERR_INPUT,
            "adapter '%s' was opened for a model with %d layers but the LoRA set has %d", a->dir,
            a->num_layers, s->num_layers);
  ITR_CHECK(0 <= layer_begin && layer_begin <= layer_end && layer_end <= s->num_layers, ITR_ERR_INPUT,
            "adapter '%s': layer range [%d, %d) is not inside [0, %d)", a->dir, layer_begin, layer_end,
            s->num_layers);
  itr_model_dims d;
  ITR_TRY(itr_model_dims_from_config(&s->cfg, &d));
  for (int l = layer_begin; l < layer_end; l++)
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      const itr_lora_module *lm = itr_adapter_module(a, l, (itr_module)k);
      if (!lm || !lm->present) continue;
      int64_t d_out, d_in;
      itr_model_dims_module(&d, (itr_module)k, &d_out, &d_in);
      int64_t shA[2] = {lm->r, d_in}, shB[2] = {d_out, lm->r};
      ITR_TRY(itr_tensor_check_shape(lm->A, 2, shA, "the adapter's rank and the base model's module"));
      ITR_TRY(itr_tensor_check_shape(lm->B, 2, shB, "the adapter's rank and the base model's module"));
      float *A = NULL, *B = NULL;
      itr_err err = itr_calloc((size_t)lm->r * (size_t)d_in, sizeof(float), "LoRA A (f32)", &A);
      if (err == ITR_OK) err = itr_calloc((size_t)d_out * (size_t)lm->r, sizeof(float), "LoRA B (f32)", &B);
      if (err == ITR_OK) err = itr_tensor_read_f32(lm->A, A);
      if (err == ITR_OK) err = itr_tensor_read_f32(lm->B, B);
      if (err == ITR_OK) err = itr_lora_set_add(s, l, (itr_module)k, lm->r, (float)(weight * lm->scaling), A, B);
      free(A);
      free(B);
      if (err != ITR_OK) return itr_error_frame(err, __func__, __FILE__, __LINE__);
    }
  return ITR_OK;
}

/* One tensor pair as f32 copies (the caller frees). */
static itr_err read_pair(const itr_tensor_info *ta, const itr_tensor_info *tb, float **A, float **B) {
  *A = *B = NULL;
  ITR_TRY(itr_calloc((size_t)ta->numel, sizeof(float), "MixLoRA A (f32)", A));
  ITR_TRY(itr_calloc((size_t)tb->numel, sizeof(float), "MixLoRA B (f32)", B));
  ITR_TRY(itr_tensor_read_f32(ta, *A));
  return itr_tensor_read_f32(tb, *B);
}

itr_err itr_lora_set_add_mixlora(itr_lora_set *s, const itr_mixlora *x, double weight) {
  ITR_CHECK(x->num_layers == s->num_layers, ITR_ERR_INPUT,
            "MixLoRA adapter '%s' was opened for a model with %d layers but the LoRA set has %d", x->dir,
            x->num_layers, s->num_layers);
  const int M = ITR_MODULE_COUNT, E = x->num_experts;
  float *A = NULL, *B = NULL, *router = NULL;
  itr_err err = ITR_OK;
  for (int l = 0; err == ITR_OK && l < s->num_layers; l++) {
    for (int m = ITR_Q_PROJ; err == ITR_OK && m <= ITR_O_PROJ; m++) {
      if (!x->attn_A[l * M + m]) continue;
      err = read_pair(x->attn_A[l * M + m], x->attn_B[l * M + m], &A, &B);
      if (err == ITR_OK) err = itr_lora_set_add(s, l, (itr_module)m, x->attn_r, (float)(weight * x->attn_scaling), A, B);
      free(A);
      free(B);
      A = B = NULL;
    }
    if (err != ITR_OK || !x->router[l]) continue;
    for (int m = ITR_GATE_PROJ; m <= ITR_DOWN_PROJ; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(s, l, (itr_module)m);
      if (sl && (sl->n_terms || sl->dW))
        err = itr_error_set(ITR_ERR_INPUT, "MixLoRA adapter '%s': layer %d's %s already has a LoRA term; a MixLoRA "
                            "feed-forward replaces the plain one (apply it alone)", x->dir, l, itr_module_name((itr_module)m));
    }
    if (err == ITR_OK) err = itr_calloc((size_t)x->router[l]->numel, sizeof(float), "MixLoRA router (f32)", &router);
    if (err == ITR_OK) err = itr_tensor_read_f32(x->router[l], router);
    if (err == ITR_OK) err = itr_lora_set_set_moe(s, l, E, x->top_k, router);
    free(router);
    router = NULL;
    for (int e = 0; err == ITR_OK && e < E; e++)
      for (int m = ITR_GATE_PROJ; err == ITR_OK && m <= ITR_DOWN_PROJ; m++) {
        int k = (l * E + e) * M + m;
        if (!x->exp_A[k]) continue;
        err = read_pair(x->exp_A[k], x->exp_B[k], &A, &B);
        if (err == ITR_OK)
          err = itr_lora_set_set_expert(s, l, e, (itr_module)m, x->expert_r, (float)(weight * x->expert_scaling), A, B);
        free(A);
        free(B);
        A = B = NULL;
      }
  }
  return err;
}

itr_err itr_lora_set_add_dir(itr_lora_set *s, const char *dir, double weight) {
  if (itr_adapter_is_mixlora(dir)) {
    itr_mixlora *x = NULL;
    ITR_TRY(itr_mixlora_open(dir, &s->cfg, &x));
    itr_err err = itr_lora_set_add_mixlora(s, x, weight);
    itr_mixlora_destroy(x);
    return err;
  }
  itr_adapter *a = NULL;
  ITR_TRY(itr_adapter_open(dir, &s->cfg, &a));
  itr_err err = itr_lora_set_add_adapter(s, a, 0, s->num_layers, weight);
  itr_adapter_destroy(a);
  return err;
}
