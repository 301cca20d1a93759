/* A random PEFT LoRA adapter whose update is a noticeable fraction of the base weights. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/io.h"
#include "iteris/synth.h"
#include "synth/synth_internal.h"

itr_err itr_synth_adapter_config_write(const char *dir, int r, double alpha, int use_rslora, unsigned mask,
                                       const char *base_model_name) {
  cJSON *o = cJSON_CreateObject();
  int ok = o != NULL;
  ok = ok && cJSON_AddObjectToObject(o, "alpha_pattern");
  ok = ok && cJSON_AddStringToObject(o, "base_model_name_or_path", base_model_name ? base_model_name : "");
  ok = ok && cJSON_AddStringToObject(o, "bias", "none");
  ok = ok && cJSON_AddFalseToObject(o, "fan_in_fan_out");
  ok = ok && cJSON_AddTrueToObject(o, "inference_mode");
  ok = ok && cJSON_AddTrueToObject(o, "init_lora_weights");
  ok = ok && cJSON_AddNullToObject(o, "layers_pattern");
  ok = ok && cJSON_AddNullToObject(o, "layers_to_transform");
  ok = ok && cJSON_AddNumberToObject(o, "lora_alpha", alpha);
  ok = ok && cJSON_AddNumberToObject(o, "lora_dropout", 0.05);
  ok = ok && cJSON_AddNullToObject(o, "modules_to_save");
  ok = ok && cJSON_AddStringToObject(o, "peft_type", "LORA");
  ok = ok && cJSON_AddNumberToObject(o, "r", r);
  ok = ok && cJSON_AddObjectToObject(o, "rank_pattern");
  ok = ok && cJSON_AddNullToObject(o, "revision");
  cJSON *tm = ok ? cJSON_AddArrayToObject(o, "target_modules") : NULL;
  ok = ok && tm;
  for (int m = 0; m < ITR_MODULE_COUNT && ok; m++)
    if (mask & (1u << m)) ok = cJSON_AddItemToArray(tm, cJSON_CreateString(itr_module_name((itr_module)m)));
  ok = ok && cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM");
  ok = ok && cJSON_AddFalseToObject(o, "use_dora");
  ok = ok && cJSON_AddBoolToObject(o, "use_rslora", use_rslora);
  char path[ITR_PATH_MAX];
  itr_err e = ok ? itr_synth_join(path, sizeof path, dir, "adapter_config.json")
                 : itr_error_set(ITR_ERR_INTERNAL, "out of memory building adapter_config.json");
  if (e == ITR_OK) e = itr_synth_write_json(path, o);
  cJSON_Delete(o);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

static itr_err add_factors(itr_st_writer *w, const itr_model_config *cfg, int l, itr_module m, int r, double std_b,
                           itr_dtype dtype, uint64_t seed) {
  int64_t d_out, d_in;
  itr_module_shape(cfg, m, &d_out, &d_in);
  size_t na = (size_t)r * (size_t)d_in, nb = (size_t)d_out * (size_t)r;
  float *buf = NULL;
  ITR_TRY(itr_calloc(na > nb ? na : nb, sizeof(float), "synth adapter factor", &buf));
  char name[160];
  int64_t sa[2] = {r, d_in}, sb[2] = {d_out, r};
  itr_name_lora(l, m, 'A', name, sizeof name);
  itr_synth_fill_normal(buf, na, 0.0, 1.0 / sqrt((double)d_in), seed, name);
  itr_err e = itr_st_writer_add_f32(w, name, dtype, 2, sa, buf);
  if (e == ITR_OK) {
    itr_name_lora(l, m, 'B', name, sizeof name);
    itr_synth_fill_normal(buf, nb, 0.0, std_b, seed, name);
    e = itr_st_writer_add_f32(w, name, dtype, 2, sb, buf);
  }
  free(buf);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_synth_adapter_write(const char *dir, const itr_model_config *cfg, int r, double alpha, int use_rslora,
                                unsigned module_mask, itr_dtype dtype, uint64_t seed, const char *base_model_name) {
  ITR_CHECK(r >= 1 && r <= 65536, ITR_ERR_INPUT, "synth adapter: rank %d must be >= 1", r);
  ITR_CHECK(isfinite(alpha) && alpha > 0, ITR_ERR_INPUT, "synth adapter: lora_alpha %g must be positive", alpha);
  ITR_CHECK(module_mask != 0 && module_mask < (1u << ITR_MODULE_COUNT), ITR_ERR_INPUT,
            "synth adapter: module mask 0x%x must name some of the %d modules", module_mask, ITR_MODULE_COUNT);
  ITR_CHECK(dtype == ITR_F32 || dtype == ITR_BF16 || dtype == ITR_F16, ITR_ERR_INPUT,
            "synth adapter: dtype %s is not an adapter dtype (F32, BF16 or F16)", itr_dtype_name(dtype));
  ITR_CHECK(cfg->num_hidden_layers >= 1, ITR_ERR_INPUT, "synth adapter: %d layers", cfg->num_hidden_layers);
  /* E||B A||_F^2 = d_out r std_b^2 and E||W0||_F^2 = d_out (W0 ~ N(0, 1/d_in), A ~ N(0, 1/d_in)). */
  double scaling = use_rslora ? alpha / sqrt((double)r) : alpha / r;
  double std_b = ITR_SYNTH_ADAPTER_REL_NORM / (scaling * sqrt((double)r));
  ITR_TRY(itr_iofile_mkdirs(dir));
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  itr_err e = itr_st_writer_set_metadata(w, "format", "pt");
  for (int l = 0; l < cfg->num_hidden_layers && e == ITR_OK; l++)
    for (int m = 0; m < ITR_MODULE_COUNT && e == ITR_OK; m++)
      if (module_mask & (1u << m)) e = add_factors(w, cfg, l, (itr_module)m, r, std_b, dtype, seed);
  char path[ITR_PATH_MAX];
  if (e == ITR_OK) e = itr_synth_join(path, sizeof path, dir, "adapter_model.safetensors");
  if (e == ITR_OK) e = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  if (e == ITR_OK) e = itr_synth_adapter_config_write(dir, r, alpha, use_rslora, module_mask, base_model_name);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}
