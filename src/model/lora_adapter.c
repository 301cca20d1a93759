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
