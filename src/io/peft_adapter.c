/* PEFT LoRA adapters: adapter_config.json (ranks, alphas, rank/alpha patterns, refusals of what
 * cannot be merged exactly) and adapter_model.safetensors (names, shapes against the base model,
 * ranks against the config, pairing of lora_A / lora_B, finite weights). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/iofile.h"
#include "io/peft_internal.h"
#include "iteris/io.h"

/* ---- adapter_config.json ---------------------------------------------------------------------- */

double itr_peft_scaling(int use_rslora, int r, double alpha) {
  return use_rslora ? alpha / sqrt((double)r) : alpha / (double)r;
}

void itr_peft_config_fini(itr_peft_config *c) {
  if (!c) return;
  for (int i = 0; i < c->n_rank; i++) free(c->rank_pattern[i].key);
  for (int i = 0; i < c->n_alpha; i++) free(c->alpha_pattern[i].key);
  free(c->rank_pattern);
  free(c->alpha_pattern);
  free(c->layers_tf);
  c->rank_pattern = c->alpha_pattern = NULL;
  c->layers_tf = NULL;
  c->n_rank = c->n_alpha = 0;
  c->n_layers_tf = -1;
}

int itr_peft_config_layer(const itr_peft_config *c, int layer) {
  if (c->n_layers_tf < 0) return 1;
  for (int i = 0; i < c->n_layers_tf; i++)
    if (c->layers_tf[i] == layer) return 1;
  return 0;
}

/* layers_to_transform (null, an int or a list of ints: PEFT applies the adapter to those layers
 * only) and layers_pattern (null, or the name of the model's layer list: "layers" in the Llama
 * family). */
static itr_err read_layers(const cJSON *root, const char *file, itr_peft_config *c) {
  c->n_layers_tf = -1;
  const cJSON *pat = cJSON_GetObjectItemCaseSensitive(root, "layers_pattern");
  if (pat && !cJSON_IsNull(pat)) {
    const cJSON *first = cJSON_IsArray(pat) ? pat->child : pat;
    const int ok = cJSON_IsString(first) && !strcmp(first->valuestring, "layers") && (!cJSON_IsArray(pat) || !first->next);
    char got[96];
    itr_json_describe(pat, got, sizeof got);
    ITR_CHECK(ok || (cJSON_IsArray(pat) && !pat->child), ITR_ERR_INPUT,
              "%s: layers_pattern is %s, but this model's decoder layers are 'model.layers' (layers_pattern "
              "\"layers\" or null)", file, got);
  }
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "layers_to_transform");
  if (!v || cJSON_IsNull(v)) return ITR_OK;
  const int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : 1;
  ITR_CHECK(cJSON_IsNumber(v) || (cJSON_IsArray(v) && n >= 1), ITR_ERR_INPUT,
            "%s: layers_to_transform must be a layer index or a non-empty list of them", file);
  ITR_TRY(itr_calloc((size_t)n, sizeof(int), "layers_to_transform", &c->layers_tf));
  c->n_layers_tf = n;
  int k = 0;
  for (const cJSON *x = cJSON_IsArray(v) ? v->child : v; x && k < n; x = cJSON_IsArray(v) ? x->next : NULL, k++) {
    ITR_CHECK(cJSON_IsNumber(x) && x->valuedouble == floor(x->valuedouble) && x->valuedouble >= 0 &&
                  x->valuedouble < 1e6,
              ITR_ERR_INPUT, "%s: layers_to_transform[%d] is not a layer index (an integer >= 0)", file, k);
    c->layers_tf[k] = (int)x->valuedouble;
  }
  return ITR_OK;
}

static int has_regex_chars(const char *s) { return strpbrk(s, "^$*+?()[]{}|\\") != NULL; }

/* A value that must be absent, null, false, or an empty list/object. */
static int is_empty(const cJSON *v) {
  return !v || cJSON_IsNull(v) || cJSON_IsFalse(v) ||
         ((cJSON_IsArray(v) || cJSON_IsObject(v)) && v->child == NULL);
}

static itr_err read_patterns(const cJSON *root, const char *key, int integer, const char *file,
                             itr_peft_pattern **out, int *n_out) {
  const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, key);
  *out = NULL;
  *n_out = 0;
  if (!o || cJSON_IsNull(o)) return ITR_OK;
  ITR_CHECK(cJSON_IsObject(o), ITR_ERR_INPUT, "%s: '%s' must be an object {module: value}", file, key);
  int n = cJSON_GetArraySize(o);
  if (n == 0) return ITR_OK;
  itr_peft_pattern *p = NULL;
  ITR_TRY(itr_calloc((size_t)n, sizeof *p, key, &p));
  int i = 0;
  itr_err e = ITR_OK;
  for (const cJSON *v = o->child; v; v = v->next, i++) {
    char got[96];
    itr_json_describe(v, got, sizeof got);
    if (has_regex_chars(v->string)) {
      e = itr_error_set(ITR_ERR_INPUT,
                        "%s: %s key '%s' is a regular expression; iteris-mpi matches keys literally, "
                        "as module paths or suffixes such as 'q_proj' or 'model.layers.3.self_attn.q_proj'",
                        file, key, v->string);
      break;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) ||
        (integer && (v->valuedouble < 1 || v->valuedouble > 65536 || v->valuedouble != floor(v->valuedouble)))) {
      e = itr_error_set(ITR_ERR_INPUT, "%s: %s['%s'] must be %s, got %s", file, key, v->string,
                        integer ? "an integer rank >= 1" : "a finite number", got);
      break;
    }
    size_t kl = strlen(v->string);
    e = itr_calloc(kl + 1, 1, key, &p[i].key);
    if (e != ITR_OK) break;
    memcpy(p[i].key, v->string, kl);
    p[i].value = v->valuedouble;
  }
  if (e != ITR_OK) {
    for (int k = 0; k < n; k++) free(p[k].key);
    free(p);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = p;
  *n_out = n;
  return ITR_OK;
}

static itr_err read_targets(const cJSON *root, const char *file, unsigned *mask) {
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "target_modules");
  *mask = 0;
  ITR_CHECK(t && !cJSON_IsNull(t), ITR_ERR_INPUT, "%s: 'target_modules' is missing", file);
  if (cJSON_IsString(t)) {
    if (strcmp(t->valuestring, "all-linear") == 0) {
      *mask = (1u << ITR_MODULE_COUNT) - 1;
      return ITR_OK;
    }
    return itr_error_set(ITR_ERR_INPUT,
                         "%s: target_modules is the regular expression '%s'; iteris-mpi does not "
                         "interpret regular expressions: list the module names instead (e.g. "
                         "[\"q_proj\", \"v_proj\"])",
                         file, t->valuestring);
  }
  ITR_CHECK(cJSON_IsArray(t) && t->child, ITR_ERR_INPUT,
            "%s: 'target_modules' must be a non-empty list of module names", file);
  for (const cJSON *e = t->child; e; e = e->next) {
    ITR_CHECK(cJSON_IsString(e), ITR_ERR_INPUT, "%s: 'target_modules' must hold strings", file);
    /* PEFT matches a list entry as the module's name or a dotted suffix of its path. */
    const char *s = e->valuestring, *dot = strrchr(s, '.');
    const char *leaf = dot ? dot + 1 : s;
    itr_module m;
    ITR_CHECK(itr_module_parse(leaf, &m), ITR_ERR_INPUT,
              "%s: target module '%s' is not supported: iteris-mpi merges LoRA on q_proj, k_proj, v_proj, "
              "o_proj, gate_proj, up_proj and down_proj only",
              file, s);
    ITR_CHECK(!dot || !has_regex_chars(s), ITR_ERR_INPUT,
              "%s: target module '%s' looks like a pattern; list plain module names", file, s);
    *mask |= 1u << m;
  }
  return ITR_OK;
}

static itr_err parse_peft(const cJSON *root, int generic, itr_peft_config *c) {
  const char *file = c->file;
  const char *s = NULL;
  ITR_TRY(itr_json_string(root, "peft_type", file, "LORA", &s));
  ITR_CHECK(strcmp(s, "LORA") == 0, ITR_ERR_INPUT,
            "%s: peft_type '%s' is not supported: only LoRA adapters (peft_type LORA) can be merged", file, s);
  int flag = 0;
  ITR_TRY(itr_json_bool(root, "use_dora", file, 0, &flag));
  ITR_CHECK(!flag, ITR_ERR_INPUT,
            "%s: DoRA adapters (use_dora true) cannot be merged exactly: DoRA rescales each column of "
            "W0 + BA by a learned magnitude, which is not a low-rank update",
            file);
  ITR_TRY(itr_json_bool(root, "fan_in_fan_out", file, 0, &flag));
  ITR_CHECK(!flag, ITR_ERR_INPUT,
            "%s: fan_in_fan_out true means transposed (Conv1D, GPT-2 style) weights; Llama-family "
            "models never have them, so this adapter was made for another model",
            file);
  ITR_TRY(itr_json_bool(root, "lora_bias", file, 0, &flag));
  ITR_CHECK(!flag, ITR_ERR_INPUT,
            "%s: lora_bias true adds a trained bias to lora_B, which a LoRA merge cannot carry", file);
  ITR_TRY(itr_json_string(root, "bias", file, "none", &s));
  ITR_CHECK(strcmp(s, "none") == 0, ITR_ERR_INPUT,
            "%s: bias '%s' means bias vectors were trained too; a merge of low-rank updates cannot "
            "carry them exactly (only bias \"none\" is supported)",
            file, s);
  const struct {
    const char *key, *why;
  } empties[] = {
      {"modules_to_save", "those modules are fully fine-tuned copies, not low-rank updates"},
      {"layer_replication", "it changes the model's layer structure"},
      {"trainable_token_indices", "it fine-tunes token embeddings, not a low-rank update"},
      {"target_parameters", "LoRA on raw parameters is not a linear module's update"},
  };
  for (size_t i = 0; i < sizeof empties / sizeof empties[0]; i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, empties[i].key);
    if (is_empty(v)) continue;
    char got[96];
    if (cJSON_IsArray(v) && cJSON_IsString(v->child))
      snprintf(got, sizeof got, "['%.60s'%s]", v->child->valuestring, v->child->next ? ", ..." : "");
    else
      itr_json_describe(v, got, sizeof got);
    return itr_error_set(ITR_ERR_INPUT, "%s: %s is %s: merging it is not supported (%s)", file,
                         empties[i].key, got, empties[i].why);
  }
  ITR_TRY(itr_json_int(root, "r", file, 0, 8, 1, 65536, &c->r));
  ITR_TRY(itr_json_double(root, "lora_alpha", file, 0, 8.0, &c->lora_alpha));
  ITR_TRY(itr_json_bool(root, "use_rslora", file, 0, &c->use_rslora));
  ITR_TRY(itr_json_string(root, "base_model_name_or_path", file, "", &s));
  ITR_CHECK(strlen(s) < sizeof c->base_model, ITR_ERR_INPUT, "%s: base_model_name_or_path is too long", file);
  snprintf(c->base_model, sizeof c->base_model, "%s", s);
  ITR_TRY(itr_json_string(root, "task_type", file, "", &s));
  snprintf(c->task_type, sizeof c->task_type, "%s", s);
  ITR_TRY(read_patterns(root, "rank_pattern", 1, file, &c->rank_pattern, &c->n_rank));
  ITR_TRY(read_patterns(root, "alpha_pattern", 0, file, &c->alpha_pattern, &c->n_alpha));
  if (generic) return ITR_OK; /* module paths come from the tensors; no layer list to check */
  ITR_TRY(read_targets(root, file, &c->listed_mask));
  ITR_TRY(read_layers(root, file, c));
  return ITR_OK;
}

itr_err itr_peft_config_read(const char *file, int generic, itr_peft_config *out) {
  itr_peft_config c;
  memset(&c, 0, sizeof c);
  c.n_layers_tf = -1;
  ITR_CHECK(strlen(file) < sizeof c.file, ITR_ERR_INPUT, "path too long: '%s'", file);
  snprintf(c.file, sizeof c.file, "%s", file);
  cJSON *root = NULL;
  ITR_TRY(itr_json_read_object(file, &root));
  itr_err e = parse_peft(root, generic, &c);
  cJSON_Delete(root);
  if (e != ITR_OK) {
    itr_peft_config_fini(&c);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = c;
  return ITR_OK;
}

/* PEFT's rule (peft.utils.other.get_pattern_key): key matches the module path when the path
 * equals it or ends with "." + key. Keys are compared literally. */
static int key_matches(const char *path, const char *key) {
  size_t pl = strlen(path), kl = strlen(key);
  if (kl > pl) return 0;
  if (strcmp(path + pl - kl, key) != 0) return 0;
  return kl == pl || path[pl - kl - 1] == '.';
}

static itr_err resolve(itr_peft_pattern *p, int n, const char *path, const char *what, const char *file,
                       int *found, double *value) {
  int k0 = -1;
  for (int k = 0; k < n; k++) {
    if (!key_matches(path, p[k].key)) continue;
    p[k].used = 1;
    if (k0 < 0) {
      k0 = k;
      continue;
    }
    ITR_CHECK(p[k].value == p[k0].value, ITR_ERR_INPUT,
              "%s: %s keys '%s' and '%s' both match %s with different values (%g and %g); PEFT "
              "versions disagree on which wins, so make them agree",
              file, what, p[k0].key, p[k].key, path, p[k0].value, p[k].value);
  }
  *found = k0 >= 0;
  if (k0 >= 0) *value = p[k0].value;
  return ITR_OK;
}

itr_err itr_peft_config_module(itr_peft_config *c, int layer, itr_module m, int *r, double *alpha) {
  char path[128];
  snprintf(path, sizeof path, "model.layers.%d.%s.%s", layer, itr_module_block(m), itr_module_name(m));
  return itr_peft_config_path(c, path, r, alpha);
}

itr_err itr_peft_config_path(itr_peft_config *c, const char *path, int *r, double *alpha) {
  int found;
  double v = 0;
  ITR_TRY(resolve(c->rank_pattern, c->n_rank, path, "rank_pattern", c->file, &found, &v));
  int rr = found ? (int)v : c->r;
  ITR_TRY(resolve(c->alpha_pattern, c->n_alpha, path, "alpha_pattern", c->file, &found, &v));
  *r = rr;
  *alpha = found ? v : c->lora_alpha;
  return ITR_OK;
}

itr_err itr_peft_config_check_unused(const itr_peft_config *c) {
  for (int pass = 0; pass < 2; pass++) {
    const itr_peft_pattern *p = pass ? c->alpha_pattern : c->rank_pattern;
    int n = pass ? c->n_alpha : c->n_rank;
    for (int k = 0; k < n; k++)
      ITR_CHECK(p[k].used, ITR_ERR_INPUT,
                "%s: %s key '%s' matches no module of this adapter (module paths look like "
                "'model.layers.3.self_attn.q_proj'; a key matches a path it equals or ends with after a dot)",
                c->file, pass ? "alpha_pattern" : "rank_pattern", p[k].key);
  }
  return ITR_OK;
}

/* ---- adapter_model.safetensors ---------------------------------------------------------------- */

/* Explains why a tensor name is not a standard PEFT LoRA factor name. */
static itr_err explain_bad_name(const char *file, const char *name) {
  if (strstr(name, ".default.weight") || strstr(name, ".default.bias"))
    return itr_error_set(ITR_ERR_INPUT,
                         "%s: tensor '%s' carries the adapter-name infix '.default'; PEFT's save_pretrained "
                         "writes 'lora_A.weight' / 'lora_B.weight'. Re-save the adapter with save_pretrained "
                         "or rename its tensors",
                         file, name);
  if (strstr(name, "lora_magnitude_vector"))
    return itr_error_set(ITR_ERR_INPUT,
                         "%s: tensor '%s' is a DoRA magnitude vector; DoRA adapters cannot be merged exactly",
                         file, name);
  if (strstr(name, "lora_B") && strstr(name, ".bias"))
    return itr_error_set(ITR_ERR_INPUT,
                         "%s: tensor '%s' is a LoRA bias (lora_bias); a merge of low-rank updates cannot carry it",
                         file, name);
  if (strstr(name, "lora_embedding"))
    return itr_error_set(ITR_ERR_INPUT, "%s: tensor '%s' is a LoRA on an embedding; only the seven linear "
                         "projections of the decoder layers are supported", file, name);
  if (strncmp(name, "base_model.model.model.layers.", 30) == 0 && strstr(name, ".lora_"))
    return itr_error_set(ITR_ERR_INPUT,
                         "%s: tensor '%s' is a LoRA factor of an unknown module; supported: "
                         "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj",
                         file, name);
  return itr_error_set(ITR_ERR_INPUT,
                       "%s: tensor '%s' is not a LoRA factor of a decoder layer (expected names like "
                       "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')",
                       file, name);
}

static itr_err check_module(itr_adapter *a, const itr_model_config *base, const char *file, int l,
                            itr_module m, itr_peft_config *pc) {
  itr_lora_module *mod = &a->modules[(size_t)l * ITR_MODULE_COUNT + m];
  const itr_tensor_info *A = mod->A, *B = mod->B;
  if (!A && !B) return ITR_OK;
  char name[160];
  ITR_CHECK(A && B, ITR_ERR_INPUT,
            "%s: layer %d %s has lora_%c but no lora_%c; both factors are needed (is the file truncated "
            "or edited?)",
            file, l, itr_module_name(m), A ? 'A' : 'B', A ? 'B' : 'A');
  ITR_CHECK(itr_peft_config_layer(pc, l), ITR_ERR_INPUT,
            "%s: tensor '%s' is for layer %d, which layers_to_transform in %s excludes; PEFT would not apply it. "
            "Fix layers_to_transform or remove the layer's tensors",
            file, A->name, l, pc->file);
  int64_t d_out, d_in;
  itr_module_shape(base, m, &d_out, &d_in);
  const itr_tensor_info *ts[2] = {A, B};
  for (int k = 0; k < 2; k++) {
    const itr_tensor_info *t = ts[k];
    ITR_CHECK(t->ndim == 2, ITR_ERR_INPUT, "%s: tensor '%s' has %d dimensions; a LoRA factor has 2", file,
              t->name, t->ndim);
    ITR_CHECK(t->dtype == ITR_F32 || t->dtype == ITR_BF16 || t->dtype == ITR_F16 || t->dtype == ITR_F64,
              ITR_ERR_INPUT, "%s: tensor '%s' has dtype %s; LoRA factors must be F32, BF16 or F16", file,
              t->name, itr_dtype_name(t->dtype));
  }
  ITR_CHECK(A->shape[1] == d_in, ITR_ERR_INPUT,
            "%s: tensor '%s' has shape (%lld, %lld) but the base model's %s takes %lld inputs. Was this "
            "adapter trained on another base model?",
            file, A->name, (long long)A->shape[0], (long long)A->shape[1], itr_module_name(m), (long long)d_in);
  ITR_CHECK(B->shape[0] == d_out, ITR_ERR_INPUT,
            "%s: tensor '%s' has shape (%lld, %lld) but the base model's %s has %lld outputs. Was this "
            "adapter trained on another base model?",
            file, B->name, (long long)B->shape[0], (long long)B->shape[1], itr_module_name(m), (long long)d_out);
  ITR_CHECK(A->shape[0] == B->shape[1], ITR_ERR_INPUT,
            "%s: layer %d %s: lora_A has rank %lld (shape (%lld, %lld)) but lora_B has rank %lld (shape (%lld, "
            "%lld))",
            file, l, itr_module_name(m), (long long)A->shape[0], (long long)A->shape[0], (long long)A->shape[1],
            (long long)B->shape[1], (long long)B->shape[0], (long long)B->shape[1]);
  int r;
  double alpha;
  ITR_TRY(itr_peft_config_module(pc, l, m, &r, &alpha));
  snprintf(name, sizeof name, "%s", A->name);
  ITR_CHECK(A->shape[0] == r, ITR_ERR_INPUT,
            "%s: tensor '%s' has rank %lld but adapter_config.json says r = %d for this module (after "
            "rank_pattern); the scaling alpha/r would be wrong. Fix r or rank_pattern",
            file, name, (long long)A->shape[0], r);
  mod->present = 1;
  mod->r = r;
  mod->alpha = alpha;
  mod->scaling = itr_peft_scaling(pc->use_rslora, r, alpha);
  a->target_mask |= 1u << m;
  return ITR_OK;
}

static itr_err open_tensors(itr_adapter *a, const itr_model_config *base, itr_peft_config *pc) {
  char file[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_join(file, sizeof file, a->dir, "adapter_model.safetensors"));
  if (!itr_iofile_is_file(file)) {
    char bin[ITR_PATH_MAX];
    ITR_TRY(itr_iofile_join(bin, sizeof bin, a->dir, "adapter_model.bin"));
    ITR_CHECK(!itr_iofile_is_file(bin), ITR_ERR_INPUT,
              "%s: only adapter_model.bin (a pickle) is present; iteris-mpi reads safetensors only. "
              "Re-save with save_pretrained(..., safe_serialization=True)",
              a->dir);
    struct stat sb;
    errno = 0;
    if (lstat(file, &sb) == 0 || errno != ENOENT) { /* there is something by that name: say what */
      const int loop = stat(file, &sb) != 0 && errno == ELOOP;
      return itr_error_set(ITR_ERR_INPUT, "%s: is %s, not a safetensors file", file,
                           loop ? "a symbolic link loop" : S_ISDIR(sb.st_mode) ? "a folder" : "not a regular file");
    }
    return itr_error_set(ITR_ERR_INPUT, "%s: no adapter_model.safetensors in this folder", a->dir);
  }
  ITR_TRY(itr_safetensors_open(file, &a->file));
  int L = base->num_hidden_layers, n = itr_safetensors_count(a->file);
  ITR_CHECK(n > 0, ITR_ERR_INPUT, "%s: holds no tensors", file);
  for (int i = 0; i < n; i++) {
    const itr_tensor_info *t = itr_safetensors_at(a->file, i);
    int l;
    itr_module m;
    char which;
    if (!itr_name_parse_lora(t->name, &l, &m, &which)) return explain_bad_name(file, t->name);
    ITR_CHECK(l < L, ITR_ERR_INPUT,
              "%s: tensor '%s' is for layer %d but the base model has %d layers (0..%d). Was this adapter "
              "trained on another base model?",
              file, t->name, l, L, L - 1);
    ITR_CHECK(pc->listed_mask & (1u << m), ITR_ERR_INPUT,
              "%s: tensor '%s' is for module %s, which target_modules in adapter_config.json does not list",
              file, t->name, itr_module_name(m));
    itr_lora_module *mod = &a->modules[(size_t)l * ITR_MODULE_COUNT + m];
    if (which == 'A')
      mod->A = t;
    else
      mod->B = t;
  }
  size_t max_numel = 0;
  for (int l = 0; l < L; l++)
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      ITR_TRY(check_module(a, base, file, l, (itr_module)m, pc));
      const itr_lora_module *mod = &a->modules[(size_t)l * ITR_MODULE_COUNT + m];
      if (mod->present) {
        if ((size_t)mod->A->numel > max_numel) max_numel = (size_t)mod->A->numel;
        if ((size_t)mod->B->numel > max_numel) max_numel = (size_t)mod->B->numel;
      }
    }
  for (int m = 0; m < ITR_MODULE_COUNT; m++)
    ITR_CHECK(!(pc->listed_mask & (1u << m)) || (a->target_mask & (1u << m)), ITR_ERR_INPUT,
              "%s: target_modules lists %s but %s has no tensor for it", pc->file, itr_module_name((itr_module)m),
              file);
  ITR_TRY(itr_peft_config_check_unused(pc));
  /* Every weight must be finite: scan each factor once. */
  float *scratch = NULL;
  ITR_TRY(itr_calloc(max_numel, sizeof(float), "adapter NaN scan buffer", &scratch));
  itr_err e = ITR_OK;
  for (size_t k = 0; k < (size_t)L * ITR_MODULE_COUNT && e == ITR_OK; k++) {
    const itr_lora_module *mod = &a->modules[k];
    if (!mod->present) continue;
    double max_a = 0, max_b = 0;
    e = itr_tensor_read_f32(mod->A, scratch);
    for (int64_t q = 0; e == ITR_OK && q < mod->A->numel; q++) max_a = fmax(max_a, fabs((double)scratch[q]));
    if (e == ITR_OK) e = itr_tensor_read_f32(mod->B, scratch);
    for (int64_t q = 0; e == ITR_OK && q < mod->B->numel; q++) max_b = fmax(max_b, fabs((double)scratch[q]));
    /* |dW_ij| <= |s| r max|A| max|B|: an update that large (lora_alpha 1e300, say) overflows the float32
     * forward and the statistics; name the field, not the calibration data that would show it first */
    const double bound = fabs(mod->scaling) * (double)mod->r * max_a * max_b;
    if (e == ITR_OK && !(isfinite(mod->scaling) && bound <= 1e15))
      e = itr_error_set(ITR_ERR_INPUT,
                        "%s: lora_alpha %g (scaling %g for r = %d) makes the update of layer %d %s as large as %g "
                        "(|scaling| r max|A| max|B|; a LoRA update is of the order of the weights, about 1). Check "
                        "lora_alpha and alpha_pattern in adapter_config.json",
                        pc->file, mod->alpha, mod->scaling, mod->r, (int)(k / ITR_MODULE_COUNT),
                        itr_module_name((itr_module)(k % ITR_MODULE_COUNT)), bound);
  }
  free(scratch);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_adapter_open(const char *dir, const itr_model_config *base, itr_adapter **out) {
  itr_adapter *a = NULL;
  ITR_TRY(itr_calloc(1, sizeof *a, "adapter", &a));
  itr_peft_config pc;
  memset(&pc, 0, sizeof pc);
  itr_err e = ITR_OK;
  char file[ITR_PATH_MAX];
  if (strlen(dir) >= sizeof a->dir) {
    e = itr_error_set(ITR_ERR_INPUT, "path too long: '%s'", dir);
    goto fail;
  }
  snprintf(a->dir, sizeof a->dir, "%s", dir);
  ITR_TRY_GOTO(itr_iofile_join(file, sizeof file, dir, "adapter_config.json"), e, fail);
  ITR_TRY_GOTO(itr_peft_config_read(file, 0, &pc), e, fail);
  a->r = pc.r;
  a->lora_alpha = pc.lora_alpha;
  a->use_rslora = pc.use_rslora;
  a->num_layers = base->num_hidden_layers;
  snprintf(a->base_model, sizeof a->base_model, "%s", pc.base_model);
  ITR_TRY_GOTO(itr_calloc((size_t)base->num_hidden_layers * ITR_MODULE_COUNT, sizeof *a->modules,
                          "adapter module table", &a->modules),
               e, fail);
  ITR_TRY_GOTO(open_tensors(a, base, &pc), e, fail);
  itr_peft_config_fini(&pc);
  *out = a;
  return ITR_OK;
fail:
  itr_peft_config_fini(&pc);
  itr_adapter_destroy(a);
  return e;
}

void itr_adapter_destroy(itr_adapter *a) {
  if (!a) return;
  itr_safetensors_destroy(a->file);
  free(a->modules);
  free(a);
}

const itr_lora_module *itr_adapter_module(const itr_adapter *a, int layer, itr_module m) {
  if (!a || layer < 0 || layer >= a->num_layers || (unsigned)m >= ITR_MODULE_COUNT) return NULL;
  return &a->modules[(size_t)layer * ITR_MODULE_COUNT + m];
}
