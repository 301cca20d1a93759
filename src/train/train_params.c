/* The trainer's flat parameter vector and the model's tensors it mirrors (dense mode: LoRA pre-training
 * trains the model's norms, biases, embedding, head and untargeted projections beside the LoRA factors). */
#include <string.h>

#include "train/train_internal.h"

/* Dense mode: the model's tensors that gmodel holds (all but the -targets projections), in gmodel's
 * order (layers: projections and biases, the two norms; then embedding, final norm, separate head),
 * to (to_model = 0) or from flat. */
void train_dense_copy(trainer *t, float *flat, int to_model) {
  itr_model *m = t->model, *g = t->gmodel;
  size_t off = 0;
#define SEG(pm, pg, len)                                                                 \
  do {                                                                                   \
    if (pg) {                                                                            \
      if (to_model) memcpy((pm), flat + off, (size_t)(len) * sizeof(float));             \
      else memcpy(flat + off, (pm), (size_t)(len) * sizeof(float));                      \
      off += (size_t)(len);                                                              \
    }                                                                                    \
  } while (0)
  int64_t D = t->cfg.hidden_size, V = t->cfg.vocab_size;
  for (int l = 0; l < t->cfg.num_hidden_layers; l++) {
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)k, &d_out, &d_in);
      SEG(itr_model_weight(m, l, (itr_module)k), itr_model_weight(g, l, (itr_module)k), d_out * d_in);
      SEG(itr_model_bias(m, l, (itr_module)k), itr_model_bias(g, l, (itr_module)k), d_out);
    }
    SEG(itr_model_norm(m, l, 0), itr_model_norm(g, l, 0), D);
    SEG(itr_model_norm(m, l, 1), itr_model_norm(g, l, 1), D);
  }
  SEG(itr_model_embed_weight(m), itr_model_embed_weight(g), V * D);
  SEG(itr_model_final_norm(m), itr_model_final_norm(g), D);
  if (!itr_model_head_is_embed(g)) SEG(itr_model_lm_head(m), itr_model_lm_head(g), V * D);
#undef SEG
  ITR_ASSERT(off == t->n - t->n_lora);
}
