/* Writes a merged adapter in PEFT's format: per (layer, module) factors A (r, d_in) and
 * B (d_out, r) with any rank per module, scaling 1 everywhere (lora_alpha = r per module, with
 * rank_pattern / alpha_pattern keyed by "layers.L.block.module" (matched as a suffix by old and new
 * PEFT versions alike) for the ranks that differ from the
 * most common one). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/iofile.h"
#include "iteris/io.h"

typedef struct {
  int r;   /* 0: module absent */
  void *A; /* (r, d_in) in the writer's dtype */
  void *B; /* (d_out, r) in the writer's dtype */
} writer_module;

struct itr_adapter_writer {
  itr_model_config cfg;
  char base_model[512];
  itr_dtype dtype;
  writer_module *mods; /* [L * ITR_MODULE_COUNT] */
  double alpha;        /* > 0: one lora_alpha for every module (itr_adapter_writer_set_scaling) */
  int rslora;
  double dropout;
};

itr_err itr_adapter_writer_set_scaling(itr_adapter_writer *w, double lora_alpha, int use_rslora, double lora_dropout) {
  ITR_CHECK(lora_alpha > 0 && isfinite(lora_alpha), ITR_ERR_INPUT, "adapter writer: lora_alpha %g must be > 0",
            lora_alpha);
  ITR_CHECK(lora_dropout >= 0 && lora_dropout < 1, ITR_ERR_INPUT, "adapter writer: lora_dropout %g must be in [0, 1)",
            lora_dropout);
  w->alpha = lora_alpha;
  w->rslora = use_rslora != 0;
  w->dropout = lora_dropout;
  return ITR_OK;
}

itr_err itr_adapter_writer_create(const itr_model_config *base, const char *base_model_name, itr_dtype dtype,
                                  itr_adapter_writer **out) {
  ITR_CHECK(dtype == ITR_F32 || dtype == ITR_BF16 || dtype == ITR_F16 || dtype == ITR_F64, ITR_ERR_INPUT,
            "adapter writer: dtype %s is not supported (F32, BF16, F16 or F64)", itr_dtype_name(dtype));
  ITR_CHECK(base->num_hidden_layers >= 1, ITR_ERR_INPUT, "adapter writer: base model has %d layers",
            base->num_hidden_layers);
  const char *name = base_model_name ? base_model_name : "";
  ITR_CHECK(strlen(name) < 512, ITR_ERR_INPUT, "adapter writer: base model name is too long");
  itr_adapter_writer *w = NULL;
  ITR_TRY(itr_calloc(1, sizeof *w, "adapter writer", &w));
  itr_err e = itr_calloc((size_t)base->num_hidden_layers * ITR_MODULE_COUNT, sizeof *w->mods,
                         "adapter writer module table", &w->mods);
  if (e != ITR_OK) {
    free(w);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  w->cfg = *base;
  w->dtype = dtype;
  snprintf(w->base_model, sizeof w->base_model, "%s", name);
  *out = w;
  return ITR_OK;
}

void itr_adapter_writer_destroy(itr_adapter_writer *w) {
  if (!w) return;
  for (size_t k = 0; k < (size_t)w->cfg.num_hidden_layers * ITR_MODULE_COUNT; k++) {
    free(w->mods[k].A);
    free(w->mods[k].B);
  }
  free(w->mods);
  free(w);
}

/* Converts n floats to the writer's dtype into a new buffer, checking that every value is finite
 * and stays finite in that dtype. */
static itr_err convert(const itr_adapter_writer *w, const float *src, size_t n, const char *what, int layer,
                       itr_module m, void **out) {
  for (size_t i = 0; i < n; i++) {
    ITR_CHECK(isfinite(src[i]), ITR_ERR_NUMERIC,
              "adapter writer: layer %d %s: %s[%zu] is %g; the merge produced a non-finite value", layer,
              itr_module_name(m), what, i, (double)src[i]);
    ITR_CHECK(w->dtype != ITR_F16 || fabsf(src[i]) <= 65504.0f, ITR_ERR_NUMERIC,
              "adapter writer: layer %d %s: %s[%zu] = %g does not fit in F16 (largest 65504); write the "
              "adapter as BF16 or F32",
              layer, itr_module_name(m), what, i, (double)src[i]);
  }
  void *buf = NULL;
  ITR_TRY(itr_calloc(n, itr_dtype_size(w->dtype), "adapter factor", &buf));
  itr_convert_from_f32(w->dtype, src, n, buf);
  *out = buf;
  return ITR_OK;
}

/* Same for doubles: F64 keeps them exactly, other dtypes go through float. */
static itr_err convert64(const itr_adapter_writer *w, const double *src, size_t n, const char *what, int layer,
                         itr_module m, void **out) {
  if (w->dtype != ITR_F64) {
    float *f = NULL;
    ITR_TRY(itr_calloc(n, sizeof(float), "adapter factor f32", &f));
    for (size_t i = 0; i < n; i++) f[i] = (float)src[i];
    for (size_t i = 0; i < n; i++)
      if (isfinite(src[i]) && !isfinite(f[i])) {
        free(f);
        return itr_error_set(ITR_ERR_NUMERIC, "adapter writer: layer %d %s: %s[%zu] = %g does not fit in F32", layer,
                             itr_module_name(m), what, i, src[i]);
      }
    itr_err e = convert(w, f, n, what, layer, m, out);
    free(f);
    return e;
  }
  for (size_t i = 0; i < n; i++)
    ITR_CHECK(isfinite(src[i]), ITR_ERR_NUMERIC,
              "adapter writer: layer %d %s: %s[%zu] is %g; the merge produced a non-finite value", layer,
              itr_module_name(m), what, i, src[i]);
  void *buf = NULL;
  ITR_TRY(itr_calloc(n, sizeof(double), "adapter factor", &buf));
  memcpy(buf, src, n * sizeof(double));
  *out = buf;
  return ITR_OK;
}

static itr_err add_converted(itr_adapter_writer *w, int layer, itr_module m, int r, const float *A, const float *B,
                             const double *A64, const double *B64) {
  ITR_CHECK(layer >= 0 && layer < w->cfg.num_hidden_layers, ITR_ERR_INPUT,
            "adapter writer: layer %d is outside 0..%d", layer, w->cfg.num_hidden_layers - 1);
  ITR_CHECK((unsigned)m < ITR_MODULE_COUNT, ITR_ERR_INPUT, "adapter writer: bad module %d", (int)m);
  ITR_CHECK(r >= 1 && r <= (1 << 20), ITR_ERR_INPUT, "adapter writer: layer %d %s: rank %d must be >= 1", layer,
            itr_module_name(m), r);
  writer_module *mod = &w->mods[(size_t)layer * ITR_MODULE_COUNT + m];
  ITR_CHECK(mod->r == 0, ITR_ERR_INPUT, "adapter writer: layer %d %s was added twice", layer, itr_module_name(m));
  int64_t d_out, d_in;
  itr_module_shape(&w->cfg, m, &d_out, &d_in);
  void *a = NULL, *b = NULL;
  size_t na = (size_t)r * (size_t)d_in, nb = (size_t)d_out * (size_t)r;
  ITR_TRY(A ? convert(w, A, na, "A", layer, m, &a) : convert64(w, A64, na, "A", layer, m, &a));
  itr_err e = B ? convert(w, B, nb, "B", layer, m, &b) : convert64(w, B64, nb, "B", layer, m, &b);
  if (e != ITR_OK) {
    free(a);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  mod->r = r;
  mod->A = a;
  mod->B = b;
  return ITR_OK;
}

itr_err itr_adapter_writer_add(itr_adapter_writer *w, int layer, itr_module m, int r, const float *A,
                               const float *B) {
  return add_converted(w, layer, m, r, A, B, NULL, NULL);
}

itr_err itr_adapter_writer_add_f64(itr_adapter_writer *w, int layer, itr_module m, int r, const double *A,
                                   const double *B) {
  return add_converted(w, layer, m, r, NULL, NULL, A, B);
}

/* The most common rank (the smallest among equally common ones). */
static int common_rank(const itr_adapter_writer *w) {
  size_t n = (size_t)w->cfg.num_hidden_layers * ITR_MODULE_COUNT;
  int best = 0, best_count = 0;
  for (size_t i = 0; i < n; i++) {
    int r = w->mods[i].r;
    if (r == 0) continue;
    int count = 0;
    for (size_t j = 0; j < n; j++) count += w->mods[j].r == r;
    if (count > best_count || (count == best_count && r < best)) {
      best = r;
      best_count = count;
    }
  }
  return best;
}

static itr_err build_config(const itr_adapter_writer *w, cJSON *o) {
  int r0 = common_rank(w);
  unsigned mask = 0;
  int L = w->cfg.num_hidden_layers;
  cJSON *rp = cJSON_CreateObject(), *ap = cJSON_CreateObject();
  int ok = rp && ap;
  for (int l = 0; l < L && ok; l++)
    for (int m = 0; m < ITR_MODULE_COUNT && ok; m++) {
      int r = w->mods[(size_t)l * ITR_MODULE_COUNT + m].r;
      if (r == 0) continue;
      mask |= 1u << m;
      if (r == r0) continue;
      char key[128];
      snprintf(key, sizeof key, "layers.%d.%s.%s", l, itr_module_block((itr_module)m),
               itr_module_name((itr_module)m));
      ok &= cJSON_AddNumberToObject(rp, key, r) != NULL;
      if (w->alpha <= 0) ok &= cJSON_AddNumberToObject(ap, key, r) != NULL;
    }
  if (!ok) {
    cJSON_Delete(rp);
    cJSON_Delete(ap);
    return itr_error_set(ITR_ERR_INTERNAL, "out of memory building adapter_config.json");
  }
  cJSON_AddItemToObject(o, "alpha_pattern", ap);
  ok &= cJSON_AddNullToObject(o, "auto_mapping") != NULL;
  ok &= cJSON_AddStringToObject(o, "base_model_name_or_path", w->base_model) != NULL;
  ok &= cJSON_AddStringToObject(o, "bias", "none") != NULL;
  ok &= cJSON_AddFalseToObject(o, "fan_in_fan_out") != NULL;
  ok &= cJSON_AddTrueToObject(o, "inference_mode") != NULL;
  ok &= cJSON_AddTrueToObject(o, "init_lora_weights") != NULL;
  ok &= cJSON_AddNullToObject(o, "layers_pattern") != NULL;
  ok &= cJSON_AddNullToObject(o, "layers_to_transform") != NULL;
  ok &= cJSON_AddNumberToObject(o, "lora_alpha", w->alpha > 0 ? w->alpha : r0) != NULL;
  ok &= cJSON_AddNumberToObject(o, "lora_dropout", w->dropout) != NULL;
  ok &= cJSON_AddNullToObject(o, "modules_to_save") != NULL;
  ok &= cJSON_AddStringToObject(o, "peft_type", "LORA") != NULL;
  ok &= cJSON_AddNumberToObject(o, "r", r0) != NULL;
  cJSON_AddItemToObject(o, "rank_pattern", rp);
  ok &= cJSON_AddNullToObject(o, "revision") != NULL;
  cJSON *tm = cJSON_AddArrayToObject(o, "target_modules");
  ok &= tm != NULL;
  for (int m = 0; m < ITR_MODULE_COUNT && ok; m++)
    if (mask & (1u << m)) ok &= cJSON_AddItemToArray(tm, cJSON_CreateString(itr_module_name((itr_module)m)));
  ok &= cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM") != NULL;
  ok &= cJSON_AddFalseToObject(o, "use_dora") != NULL;
  ok &= cJSON_AddBoolToObject(o, "use_rslora", w->rslora) != NULL;
  ITR_CHECK(ok, ITR_ERR_INTERNAL, "out of memory building adapter_config.json");
  return ITR_OK;
}

static itr_err write_config(const itr_adapter_writer *w, const char *file) {
  cJSON *o = cJSON_CreateObject();
  ITR_CHECK(o, ITR_ERR_INTERNAL, "out of memory building %s", file);
  itr_err e = build_config(w, o);
  char *text = e == ITR_OK ? cJSON_Print(o) : NULL;
  cJSON_Delete(o);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory printing %s", file);
  e = itr_iofile_write_atomic(file, text, strlen(text));
  cJSON_free(text);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

static itr_err write_tensors(const itr_adapter_writer *w, itr_st_writer *st, const char *file) {
  int any = 0;
  for (int l = 0; l < w->cfg.num_hidden_layers; l++)
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      const writer_module *mod = &w->mods[(size_t)l * ITR_MODULE_COUNT + m];
      if (mod->r == 0) continue;
      any = 1;
      int64_t d_out, d_in;
      itr_module_shape(&w->cfg, (itr_module)m, &d_out, &d_in);
      char name[160];
      int64_t sa[2] = {mod->r, d_in}, sb[2] = {d_out, mod->r};
      itr_name_lora(l, (itr_module)m, 'A', name, sizeof name);
      ITR_TRY(itr_st_writer_add(st, name, w->dtype, 2, sa, mod->A));
      itr_name_lora(l, (itr_module)m, 'B', name, sizeof name);
      ITR_TRY(itr_st_writer_add(st, name, w->dtype, 2, sb, mod->B));
    }
  ITR_CHECK(any, ITR_ERR_INPUT, "adapter writer: no module was added; refusing to write an empty adapter to %s",
            file);
  ITR_TRY(itr_st_writer_set_metadata(st, "format", "pt"));
  ITR_TRY(itr_st_writer_write(st, file));
  return ITR_OK;
}

itr_err itr_adapter_writer_write(const itr_adapter_writer *w, const char *dir) {
  char cfg_file[ITR_PATH_MAX], st_file[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_join(cfg_file, sizeof cfg_file, dir, "adapter_config.json"));
  ITR_TRY(itr_iofile_join(st_file, sizeof st_file, dir, "adapter_model.safetensors"));
  ITR_TRY(itr_iofile_mkdirs(dir));
  itr_st_writer *st = NULL;
  ITR_TRY(itr_st_writer_create(&st));
  itr_err e = write_tensors(w, st, st_file);
  itr_st_writer_destroy(st);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  ITR_TRY(write_config(w, cfg_file));
  return ITR_OK;
}
