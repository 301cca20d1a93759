/* A random Llama-family model: config.json plus weights in one safetensors file or in shards
 * with model.safetensors.index.json, every tensor from its own deterministic stream. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/io.h"
#include "iteris/synth.h"
#include "synth/synth_internal.h"

typedef enum { K_PROJ, K_NORM, K_BIAS, K_EMBED, K_HEAD } kind;

typedef struct {
  char name[128];
  int ndim;
  int64_t shape[2];
  kind k;
} spec;

/* The tensors of cfg in Hugging Face order; *n their count (specs holds L * 16 + 3). */
static int list_tensors(const itr_model_config *c, spec *specs) {
  int n = 0;
  int64_t V = c->vocab_size, D = c->hidden_size;
  specs[n++] = (spec){"", 2, {V, D}, K_EMBED};
  snprintf(specs[n - 1].name, sizeof specs[0].name, "%s", ITR_NAME_EMBED);
  for (int l = 0; l < c->num_hidden_layers; l++) {
    specs[n] = (spec){"", 1, {D, 0}, K_NORM};
    itr_name_layer_norm(l, 0, specs[n].name, sizeof specs[n].name);
    n++;
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      int64_t d_out, d_in;
      itr_module_shape(c, (itr_module)m, &d_out, &d_in);
      specs[n] = (spec){"", 2, {d_out, d_in}, K_PROJ};
      itr_name_base(l, (itr_module)m, "weight", specs[n].name, sizeof specs[n].name);
      n++;
      int bias = (m <= ITR_V_PROJ && c->attention_bias) || (m == ITR_O_PROJ && c->o_bias) ||
                 (m >= ITR_GATE_PROJ && c->mlp_bias);
      if (bias) {
        specs[n] = (spec){"", 1, {d_out, 0}, K_BIAS};
        itr_name_base(l, (itr_module)m, "bias", specs[n].name, sizeof specs[n].name);
        n++;
      }
      if (m == ITR_O_PROJ) {
        specs[n] = (spec){"", 1, {D, 0}, K_NORM};
        itr_name_layer_norm(l, 1, specs[n].name, sizeof specs[n].name);
        n++;
      }
    }
  }
  specs[n] = (spec){"", 1, {D, 0}, K_NORM};
  snprintf(specs[n].name, sizeof specs[n].name, "%s", ITR_NAME_FINAL_NORM);
  n++;
  if (!c->tie_word_embeddings) {
    specs[n] = (spec){"", 2, {V, D}, K_HEAD};
    snprintf(specs[n].name, sizeof specs[n].name, "%s", ITR_NAME_LM_HEAD);
    n++;
  }
  return n;
}

static itr_err add_tensor(itr_st_writer *w, const itr_model_config *c, const spec *s, itr_dtype dtype,
                          uint64_t seed) {
  size_t numel = (size_t)s->shape[0] * (size_t)(s->ndim == 2 ? s->shape[1] : 1);
  float *buf = NULL;
  ITR_TRY(itr_calloc(numel, sizeof(float), s->name, &buf));
  double D = c->hidden_size;
  switch (s->k) {
    case K_PROJ: itr_synth_fill_normal(buf, numel, 0.0, 1.0 / sqrt((double)s->shape[1]), seed, s->name); break;
    case K_NORM: itr_synth_fill_normal(buf, numel, 1.0, 0.1, seed, s->name); break;
    case K_BIAS: itr_synth_fill_normal(buf, numel, 0.0, 0.1, seed, s->name); break;
    case K_EMBED:
      itr_synth_fill_normal(buf, numel, 0.0, c->tie_word_embeddings ? 3.0 / sqrt(D) : 1.0, seed, s->name);
      break;
    case K_HEAD: itr_synth_fill_normal(buf, numel, 0.0, 3.0 / sqrt(D), seed, s->name); break;
  }
  itr_err e = itr_st_writer_add_f32(w, s->name, dtype, s->ndim, s->shape, buf);
  free(buf);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

/* Writes specs[lo, hi) to path. */
static itr_err write_shard(const char *path, const itr_model_config *c, const spec *specs, int lo, int hi,
                           itr_dtype dtype, uint64_t seed) {
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  itr_err e = itr_st_writer_set_metadata(w, "format", "pt");
  for (int i = lo; i < hi && e == ITR_OK; i++) e = add_tensor(w, c, &specs[i], dtype, seed);
  if (e == ITR_OK) e = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

static itr_err write_index(const char *dir, const spec *specs, int n, int n_shards, itr_dtype dtype) {
  cJSON *root = cJSON_CreateObject();
  cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
  cJSON *map = cJSON_AddObjectToObject(root, "weight_map");
  int ok = root && meta && map;
  double total = 0;
  for (int i = 0; i < n && ok; i++) {
    char file[64];
    int k = (int)((int64_t)i * n_shards / n);
    snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", k + 1, n_shards);
    ok &= cJSON_AddStringToObject(map, specs[i].name, file) != NULL;
    total += (double)specs[i].shape[0] * (double)(specs[i].ndim == 2 ? specs[i].shape[1] : 1) *
             (double)itr_dtype_size(dtype);
  }
  ok &= cJSON_AddNumberToObject(meta, "total_size", total) != NULL;
  char path[ITR_PATH_MAX];
  itr_err e = ok ? itr_synth_join(path, sizeof path, dir, "model.safetensors.index.json")
                 : itr_error_set(ITR_ERR_INTERNAL, "out of memory building the shard index");
  if (e == ITR_OK) e = itr_synth_write_json(path, root);
  cJSON_Delete(root);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_synth_model_write(const char *dir, const itr_model_config *cfg, itr_dtype dtype, int n_shards,
                              uint64_t seed) {
  ITR_CHECK(dtype == ITR_F32 || dtype == ITR_BF16 || dtype == ITR_F16, ITR_ERR_INPUT,
            "synth model: dtype %s is not a model dtype (F32, BF16 or F16)", itr_dtype_name(dtype));
  ITR_CHECK(cfg->num_hidden_layers >= 1 && cfg->num_hidden_layers <= 100000, ITR_ERR_INPUT,
            "synth model: %d layers", cfg->num_hidden_layers);
  int cap = cfg->num_hidden_layers * 16 + 3;
  ITR_CHECK(n_shards >= 1 && n_shards <= cap && n_shards <= 99999, ITR_ERR_INPUT,
            "synth model: n_shards %d must be in [1, number of tensors]", n_shards);
  ITR_TRY(itr_iofile_mkdirs(dir));
  ITR_TRY(itr_model_config_write(dir, cfg)); /* also validates cfg */
  spec *specs = NULL;
  ITR_TRY(itr_calloc((size_t)cap, sizeof *specs, "synth tensor list", &specs));
  int n = list_tensors(cfg, specs);
  itr_err e = ITR_OK;
  if (n_shards > n)
    e = itr_error_set(ITR_ERR_INPUT, "synth model: %d shards for %d tensors", n_shards, n);
  char path[ITR_PATH_MAX];
  if (e == ITR_OK && n_shards == 1) {
    e = itr_synth_join(path, sizeof path, dir, "model.safetensors");
    if (e == ITR_OK) e = write_shard(path, cfg, specs, 0, n, dtype, seed);
  } else if (e == ITR_OK) {
    /* Shard k holds the contiguous block of tensors i with floor(i * n_shards / n) == k. */
    for (int k = 0, lo = 0; k < n_shards && e == ITR_OK; k++) {
      int hi = lo;
      while (hi < n && (int)((int64_t)hi * n_shards / n) == k) hi++;
      char file[64];
      snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", k + 1, n_shards);
      e = itr_synth_join(path, sizeof path, dir, file);
      if (e == ITR_OK) e = write_shard(path, cfg, specs, lo, hi, dtype, seed);
      lo = hi;
    }
    if (e == ITR_OK) e = write_index(dir, specs, n, n_shards, dtype);
  }
  free(specs);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}
