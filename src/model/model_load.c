/* Loading the owned part of a model from a tensor store (bf16/f16/f32 -> f32), every shape checked
 * against the configuration; the CLI's logits writer. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/model.h"
#include "model/model_internal.h"

static itr_err read_into(itr_tensor_store *store, const char *name, int ndim, const int64_t *shape,
                         const char *what, float *dst) {
  const itr_tensor_info *t;
  ITR_TRY(itr_tensor_store_get(store, name, &t));
  ITR_TRY(itr_tensor_check_shape(t, ndim, shape, what));
  ITR_TRY(itr_tensor_read_f32(t, dst));
  return ITR_OK;
}

static itr_err load_weights(itr_model *m, itr_tensor_store *store) {
  const itr_model_config *cfg = itr_model_config_of(m);
  const itr_model_dims *d = itr_model_dims_of(m);
  char name[256];
  int a, b;
  itr_model_layers(m, &a, &b);
  int64_t shD[1] = {d->D}, shVD[2] = {d->V, d->D};
  for (int l = a; l < b; l++) {
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t sh[2];
      itr_model_dims_module(d, (itr_module)k, &sh[0], &sh[1]);
      itr_name_base(l, (itr_module)k, "weight", name, sizeof name);
      ITR_TRY(read_into(store, name, 2, sh, "config.json (hidden_size, heads, head_dim, intermediate_size)",
                        itr_model_weight(m, l, (itr_module)k)));
      if (itr_model_has_bias(cfg, (itr_module)k)) {
        itr_name_base(l, (itr_module)k, "bias", name, sizeof name);
        ITR_TRY(read_into(store, name, 1, sh, "config.json", itr_model_bias(m, l, (itr_module)k)));
      }
    }
    for (int post = 0; post < 2; post++) {
      itr_name_layer_norm(l, post, name, sizeof name);
      ITR_TRY(read_into(store, name, 1, shD, "config.json (hidden_size)", itr_model_norm(m, l, post)));
    }
  }
  if (itr_model_embed_weight(m))
    ITR_TRY(read_into(store, ITR_NAME_EMBED, 2, shVD, "config.json (vocab_size, hidden_size)",
                      itr_model_embed_weight(m)));
  if (itr_model_final_norm(m)) {
    ITR_TRY(read_into(store, ITR_NAME_FINAL_NORM, 1, shD, "config.json (hidden_size)", itr_model_final_norm(m)));
    if (!itr_model_head_is_embed(m)) {
      const char *hn = ITR_NAME_LM_HEAD;
      /* tied weights: lm_head is the embedding (often absent from the file) */
      if (cfg->tie_word_embeddings && !itr_tensor_store_has(store, ITR_NAME_LM_HEAD)) hn = ITR_NAME_EMBED;
      ITR_TRY(read_into(store, hn, 2, shVD, "config.json (vocab_size, hidden_size)", itr_model_lm_head(m)));
    }
  }
  return ITR_OK;
}

itr_err itr_model_load(const itr_model_config *cfg, itr_tensor_store *store, int layer_begin, int layer_end,
                       int with_embed, int with_head, itr_model **out) {
  return itr_model_load_into(cfg, store, layer_begin, layer_end, with_embed, with_head, NULL, 0, out);
}

itr_err itr_model_load_into(const itr_model_config *cfg, itr_tensor_store *store, int layer_begin, int layer_end,
                            int with_embed, int with_head, float *mem, size_t n, itr_model **out) {
  itr_model *m = NULL;
  if (mem)
    ITR_TRY(itr_model_create_in(cfg, layer_begin, layer_end, with_embed, with_head, mem, n, &m));
  else
    ITR_TRY(itr_model_create(cfg, layer_begin, layer_end, with_embed, with_head, &m));
  itr_err err = load_weights(m, store);
  if (err != ITR_OK) {
    itr_model_destroy(m);
    return itr_error_frame(err, __func__, __FILE__, __LINE__);
  }
  *out = m;
  return ITR_OK;
}

itr_err itr_model_write_logits(const char *base_dir, const char *const *adapter_dirs, int n_adapters,
                               const char *tokens_jsonl, const char *out_safetensors) {
  itr_model_config cfg;
  itr_tensor_store *store = NULL;
  itr_model *model = NULL;
  itr_lora_set *lora = NULL;
  itr_st_writer *w = NULL;
  itr_token_set ts;
  itr_tokenizer *tok = NULL;
  float *logits = NULL;
  int have_ts = 0;
  itr_err err;
  memset(&ts, 0, sizeof ts);
  ITR_TRY(itr_model_config_read(base_dir, &cfg));
  ITR_TRY_GOTO(itr_tensor_store_open(base_dir, &store), err, done);
  ITR_TRY_GOTO(itr_model_load(&cfg, store, 0, cfg.num_hidden_layers, 1, 1, &model), err, done);
  if (n_adapters > 0) {
    ITR_TRY_GOTO(itr_lora_set_create(&cfg, &lora), err, done);
    for (int i = 0; i < n_adapters; i++) {
      ITR_TRY_GOTO(itr_lora_set_add_dir(lora, adapter_dirs[i], 1.0), err, done);
    }
  }
  /* {"input_ids": [...]} lines, or {"text": ...} through base_dir's tokenizer (opened on first need) */
  err = itr_token_set_read_text(tokens_jsonl, cfg.vocab_size, base_dir, &tok, &ts);
  itr_tokenizer_destroy(tok);
  ITR_TRY_GOTO(err, err, done);
  have_ts = 1;
  ITR_TRY_GOTO(itr_st_writer_create(&w), err, done);
  for (int s = 0; s < ts.n_seqs; s++) {
    int64_t T = ts.offsets[s + 1] - ts.offsets[s];
    ITR_TRY_GOTO(itr_calloc((size_t)T, (size_t)cfg.vocab_size * sizeof(float), "logits", &logits), err, done);
    ITR_TRY_GOTO(itr_model_forward(model, ts.ids + ts.offsets[s], T, NULL, lora, NULL, NULL, logits), err, done);
    char name[32];
    snprintf(name, sizeof name, "logits.%d", s);
    int64_t shape[2] = {T, cfg.vocab_size};
    ITR_TRY_GOTO(itr_st_writer_add_f32(w, name, ITR_F32, 2, shape, logits), err, done);
    free(logits);
    logits = NULL;
  }
  ITR_TRY_GOTO(itr_st_writer_set_metadata(w, "format", "iteris-mpi logits"), err, done);
  ITR_TRY_GOTO(itr_st_writer_write(w, out_safetensors), err, done);
  itr_log(ITR_LOG_INFO, "wrote logits of %d sequences to %s", ts.n_seqs, out_safetensors);
done:
  free(logits);
  itr_st_writer_destroy(w);
  if (have_ts) itr_token_set_fini(&ts);
  itr_lora_set_destroy(lora);
  itr_model_destroy(model);
  itr_tensor_store_destroy(store);
  return err;
}
