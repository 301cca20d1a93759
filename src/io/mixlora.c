/* MixLoRA adapters in the format of the reference implementation (github.com/TUDB-Labs/MixLoRA,
 * mixlora/config.py and model.py), read from adapter_config.json and adapter_model.safetensors:
 *
 *   adapter_config.json: "peft_type": "MIXLORA", "routing_strategy": "mixtral", "num_experts": E,
 *     "top_k" (2), "r", "lora_alpha", "use_rslora", "target_modules" (list, or {name: bool}), optionally
 *     "expert_lora": {"r", "lora_alpha", "use_rslora", ...} for the experts, "act_fn" (silu or absent);
 *   tensors: mixlora.layers.<l>.self_attn.<q|k|v|o>_proj.lora_{A,B}.weight (shared attention LoRA),
 *            mixlora.layers.<l>.gate.weight (the router, (E, D)),
 *            mixlora.layers.<l>.experts.<e>.<gate|up|down>_proj.lora_{A,B}.weight.
 *
 * The reference saves adapter_model.bin (torch.save of the same name -> tensor dict); a safetensors file
 * with the same names is what iteris-mpi reads and writes (`torch.save(safetensors.torch.load_file(f))`
 * converts). Shapes are checked against the base model; every value must be finite. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/iofile.h"
#include "iteris/io.h"

int itr_adapter_is_mixlora(const char *dir) {
  char path[ITR_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/adapter_config.json", dir);
  cJSON *root = NULL;
  if (itr_json_read_object(path, &root) != ITR_OK) {
    itr_error_clear();
    return 0;
  }
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
  int yes = cJSON_IsString(t) && strcmp(t->valuestring, "MIXLORA") == 0;
  cJSON_Delete(root);
  return yes;
}

static itr_err read_targets(const cJSON *root, const char *file, unsigned *mask) {
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "target_modules");
  ITR_CHECK(t && (cJSON_IsArray(t) || cJSON_IsObject(t)), ITR_ERR_INPUT,
            "%s: 'target_modules' must be a list of module names or an object {name: true|false}", file);
  *mask = 0;
  for (const cJSON *e = t->child; e; e = e->next) {
    const char *name = cJSON_IsArray(t) ? (cJSON_IsString(e) ? e->valuestring : NULL) : e->string;
    ITR_CHECK(name, ITR_ERR_INPUT, "%s: 'target_modules' must hold module names", file);
    if (cJSON_IsObject(t) && !cJSON_IsTrue(e)) continue;
    int m = -1;
    for (int k = 0; k < ITR_MODULE_COUNT; k++)
      if (strcmp(name, itr_module_name((itr_module)k)) == 0) m = k;
    ITR_CHECK(m >= 0, ITR_ERR_INPUT, "%s: target module '%s' is not one of the seven Llama projections", file, name);
    *mask |= 1u << m;
  }
  ITR_CHECK(*mask, ITR_ERR_INPUT, "%s: 'target_modules' names no module", file);
  return ITR_OK;
}

/* r, lora_alpha, use_rslora of obj (defaults from def_*), and the scaling. */
static itr_err read_lora(const cJSON *obj, const char *file, int def_r, double def_alpha, int def_rs, int *r,
                         double *scaling) {
  double alpha;
  int rs;
  ITR_TRY(itr_json_int(obj, "r", file, def_r <= 0, def_r, 1, 65536, r));
  ITR_TRY(itr_json_double(obj, "lora_alpha", file, def_alpha <= 0, def_alpha, &alpha));
  ITR_TRY(itr_json_bool(obj, "use_rslora", file, def_rs, &rs));
  int dora = 0;
  ITR_TRY(itr_json_bool(obj, "use_dora", file, 0, &dora));
  ITR_CHECK(!dora, ITR_ERR_INPUT, "%s: use_dora true is not supported", file);
  ITR_CHECK(*r >= 1 && alpha > 0 && isfinite(alpha), ITR_ERR_INPUT, "%s: r %d and lora_alpha %g must be positive", file,
            *r, alpha);
  *scaling = rs ? alpha / sqrt((double)*r) : alpha / *r;
  return ITR_OK;
}

static itr_err read_config(itr_mixlora *x, const char *file, const itr_model_config *base) {
  cJSON *root = NULL;
  ITR_TRY(itr_json_read_object(file, &root));
  const char *s = NULL;
  itr_err err = itr_json_string(root, "peft_type", file, "", &s);
  if (err == ITR_OK && strcmp(s, "MIXLORA") != 0)
    err = itr_error_set(ITR_ERR_INPUT, "%s: peft_type '%s' is not MIXLORA", file, s);
  if (err == ITR_OK) err = itr_json_string(root, "routing_strategy", file, "", &s);
  if (err == ITR_OK && strcmp(s, "mixtral") != 0)
    err = itr_error_set(ITR_ERR_INPUT, "%s: routing_strategy '%s' is not supported (only \"mixtral\": top-k softmax)",
                        file, s);
  if (err == ITR_OK) err = itr_json_int(root, "num_experts", file, 1, 0, 1, 4096, &x->num_experts);
  if (err == ITR_OK) err = itr_json_int(root, "top_k", file, 0, 2, 1, 4096, &x->top_k);
  if (err == ITR_OK && !(x->num_experts >= 1 && x->num_experts <= 4096 && x->top_k >= 1 && x->top_k <= x->num_experts))
    err = itr_error_set(ITR_ERR_INPUT, "%s: num_experts %d and top_k %d must satisfy 1 <= top_k <= num_experts <= 4096",
                        file, x->num_experts, x->top_k);
  if (err == ITR_OK) err = itr_json_string(root, "act_fn", file, "silu", &s);
  if (err == ITR_OK && strcmp(s, "silu") != 0)
    err = itr_error_set(ITR_ERR_INPUT, "%s: act_fn '%s' is not supported (the Llama FFN's silu)", file, s);
  int rs = 0;
  if (err == ITR_OK) err = read_targets(root, file, &x->target_mask);
  if (err == ITR_OK) err = itr_json_bool(root, "use_rslora", file, 0, &rs);
  double alpha = 0;
  if (err == ITR_OK) err = itr_json_double(root, "lora_alpha", file, 1, 0, &alpha);
  if (err == ITR_OK) err = read_lora(root, file, 0, 0, 0, &x->attn_r, &x->attn_scaling);
  const cJSON *ex = cJSON_GetObjectItemCaseSensitive(root, "expert_lora");
  if (err == ITR_OK && ex && !cJSON_IsNull(ex)) {
    if (!cJSON_IsObject(ex)) err = itr_error_set(ITR_ERR_INPUT, "%s: 'expert_lora' must be an object", file);
    else err = read_lora(ex, file, x->attn_r, alpha, rs, &x->expert_r, &x->expert_scaling);
  } else if (err == ITR_OK) {
    x->expert_r = x->attn_r;
    x->expert_scaling = x->attn_scaling;
  }
  (void)base;
  cJSON_Delete(root);
  return err;
}

/* The tensor name, its expected shape; NULL when absent; checked and finite when present (the f32 read
 * refuses NaN and Inf, naming the element). */
static itr_err find(itr_mixlora *x, const char *name, int64_t rows, int64_t cols, const itr_tensor_info **out) {
  const itr_tensor_info *t = itr_safetensors_find(x->file, name);
  *out = t;
  if (!t) return ITR_OK;
  ITR_CHECK(t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols, ITR_ERR_INPUT,
            "%s: tensor '%s' has shape (%lld, %lld), expected (%lld, %lld) for this base model", t->file, name,
            (long long)(t->ndim > 0 ? t->shape[0] : 0), (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)rows,
            (long long)cols);
  float *buf = NULL;
  ITR_TRY(itr_calloc((size_t)t->numel, sizeof(float), "MixLoRA tensor", &buf));
  itr_err err = itr_tensor_read_f32(t, buf);
  free(buf);
  return err;
}

static itr_err pair(itr_mixlora *x, const char *prefix, itr_module m, int r, const itr_tensor_info **A,
                    const itr_tensor_info **B, const itr_model_config *base) {
  char na[256], nb[256];
  int64_t d_out, d_in;
  itr_module_shape(base, m, &d_out, &d_in);
  snprintf(na, sizeof na, "%s.%s.lora_A.weight", prefix, itr_module_name(m));
  snprintf(nb, sizeof nb, "%s.%s.lora_B.weight", prefix, itr_module_name(m));
  ITR_TRY(find(x, na, r, d_in, A));
  ITR_TRY(find(x, nb, d_out, r, B));
  ITR_CHECK((*A != NULL) == (*B != NULL), ITR_ERR_INPUT, "%s: %s has one of lora_A and lora_B but not the other",
            itr_safetensors_path(x->file), *A ? na : nb);
  return ITR_OK;
}

itr_err itr_mixlora_open(const char *dir, const itr_model_config *base, itr_mixlora **out) {
  itr_mixlora *x = NULL;
  ITR_TRY(itr_calloc(1, sizeof *x, "MixLoRA adapter", &x));
  *out = NULL;
  snprintf(x->dir, sizeof x->dir, "%s", dir);
  char path[ITR_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/adapter_config.json", dir);
  itr_err err = read_config(x, path, base);
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
  if (err == ITR_OK && !(access(path, F_OK) == 0)) {
    char bin[ITR_PATH_MAX + 64];
    snprintf(bin, sizeof bin, "%s/adapter_model.bin", dir);
    err = itr_error_set(ITR_ERR_INPUT,
                        "%s is missing%s: iteris-mpi reads MixLoRA weights as safetensors with the reference's tensor "
                        "names (convert with: python3 -c \"import torch, safetensors.torch as s; "
                        "s.save_file(torch.load('%s'), '%s')\")",
                        path, (access(bin, F_OK) == 0) ? " (there is an adapter_model.bin)" : "", bin, path);
  }
  if (err == ITR_OK) err = itr_safetensors_open(path, &x->file);
  const int L = base->num_hidden_layers, E = x->num_experts, M = ITR_MODULE_COUNT;
  x->num_layers = L;
  if (err == ITR_OK) err = itr_calloc((size_t)L * M, sizeof *x->attn_A, "MixLoRA attention", &x->attn_A);
  if (err == ITR_OK) err = itr_calloc((size_t)L * M, sizeof *x->attn_B, "MixLoRA attention", &x->attn_B);
  if (err == ITR_OK) err = itr_calloc((size_t)L, sizeof *x->router, "MixLoRA routers", &x->router);
  if (err == ITR_OK) err = itr_calloc((size_t)L * E * M, sizeof *x->exp_A, "MixLoRA experts", &x->exp_A);
  if (err == ITR_OK) err = itr_calloc((size_t)L * E * M, sizeof *x->exp_B, "MixLoRA experts", &x->exp_B);
  int found = 0;
  for (int l = 0; err == ITR_OK && l < L; l++) {
    char prefix[128];
    snprintf(prefix, sizeof prefix, "mixlora.layers.%d.self_attn", l);
    for (int m = ITR_Q_PROJ; err == ITR_OK && m <= ITR_O_PROJ; m++)
      if (x->target_mask & (1u << m))
        err = pair(x, prefix, (itr_module)m, x->attn_r, &x->attn_A[l * M + m], &x->attn_B[l * M + m], base);
    snprintf(prefix, sizeof prefix, "mixlora.layers.%d.gate.weight", l);
    if (err == ITR_OK) err = find(x, prefix, E, base->hidden_size, &x->router[l]);
    for (int e = 0; err == ITR_OK && x->router[l] && e < E; e++) {
      snprintf(prefix, sizeof prefix, "mixlora.layers.%d.experts.%d", l, e);
      for (int m = ITR_GATE_PROJ; err == ITR_OK && m <= ITR_DOWN_PROJ; m++)
        if (x->target_mask & (1u << m))
          err = pair(x, prefix, (itr_module)m, x->expert_r, &x->exp_A[(l * E + e) * M + m], &x->exp_B[(l * E + e) * M + m],
                     base);
    }
    found += x->router[l] != NULL;
  }
  if (err == ITR_OK && !found)
    err = itr_error_set(ITR_ERR_INPUT, "%s: no router tensor (mixlora.layers.<l>.gate.weight) for any layer of the base model",
                        path);
  if (err != ITR_OK) {
    itr_mixlora_destroy(x);
    return err;
  }
  *out = x;
  return ITR_OK;
}

void itr_mixlora_destroy(itr_mixlora *x) {
  if (!x) return;
  itr_safetensors_destroy(x->file);
  free(x->attn_A);
  free(x->attn_B);
  free(x->router);
  free(x->exp_A);
  free(x->exp_B);
  free(x);
}

/* ---- writing ------------------------------------------------------------------------------------ */

void itr_mixlora_router_name(int layer, char *buf, size_t len) {
  snprintf(buf, len, "mixlora.layers.%d.gate.weight", layer);
}

void itr_mixlora_name(int layer, int expert, itr_module m, char which, char *buf, size_t len) {
  if (expert < 0)
    snprintf(buf, len, "mixlora.layers.%d.self_attn.%s.lora_%c.weight", layer, itr_module_name(m), which);
  else snprintf(buf, len, "mixlora.layers.%d.experts.%d.%s.lora_%c.weight", layer, expert, itr_module_name(m), which);
}

itr_err itr_mixlora_write_config(const char *file, const char *base_model, int num_experts, int top_k, int attn_r,
                                 int expert_r, unsigned target_mask) {
  cJSON *o = cJSON_CreateObject(), *t = cJSON_CreateArray(), *ex = cJSON_CreateObject();
  itr_err e = o && t && ex ? ITR_OK : itr_error_set(ITR_ERR_INTERNAL, "out of memory building %s", file);
  if (e == ITR_OK) {
    for (int m = 0; m < ITR_MODULE_COUNT; m++)
      if (target_mask & (1u << m)) cJSON_AddItemToArray(t, cJSON_CreateString(itr_module_name((itr_module)m)));
    cJSON_AddStringToObject(o, "peft_type", "MIXLORA");
    cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM");
    cJSON_AddStringToObject(o, "base_model_name_or_path", base_model ? base_model : "");
    cJSON_AddStringToObject(o, "bias", "none");
    cJSON_AddNumberToObject(o, "r", attn_r);
    cJSON_AddNumberToObject(o, "lora_alpha", attn_r); /* scaling 1: the factors carry it */
    cJSON_AddNumberToObject(o, "lora_dropout", 0.0);
    cJSON_AddItemToObject(o, "target_modules", t);
    t = NULL;
    cJSON_AddStringToObject(o, "routing_strategy", "mixtral");
    cJSON_AddNumberToObject(o, "num_experts", num_experts);
    cJSON_AddNumberToObject(o, "top_k", top_k);
    cJSON_AddStringToObject(o, "act_fn", "silu");
    cJSON_AddNumberToObject(o, "router_aux_loss_coef", 0.0);
    cJSON_AddNumberToObject(o, "router_init_range", 0.02);
    cJSON_AddNumberToObject(o, "jitter_noise", 0.0);
    cJSON_AddBoolToObject(o, "router_loss", 0);
    cJSON_AddNumberToObject(ex, "r", expert_r);
    cJSON_AddNumberToObject(ex, "lora_alpha", expert_r);
    cJSON_AddNumberToObject(ex, "lora_dropout", 0.0);
    cJSON_AddItemToObject(o, "expert_lora", ex);
    ex = NULL;
  }
  char *text = e == ITR_OK ? cJSON_Print(o) : NULL;
  cJSON_Delete(o);
  cJSON_Delete(t);
  cJSON_Delete(ex);
  ITR_TRY(e);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory printing %s", file);
  e = itr_iofile_write_atomic(file, text, strlen(text));
  cJSON_free(text);
  return e;
}
