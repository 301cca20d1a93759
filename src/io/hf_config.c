/* Hugging Face config.json for the Llama family (llama, mistral, qwen2): reader with the
 * transformers defaults, validation that refuses what the forward pass does not implement
 * (by name), writer, and the (d_out, d_in) of each projection. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/iofile.h"
#include "iteris/io.h"

static const struct {
  const char *model_type;
  const char *causal_lm; /* the architectures entry transformers writes */
  const char *family;    /* prefix of every architectures class of this family */
  int max_pos_default;   /* transformers' default max_position_embeddings */
} archs_[] = {
    [ITR_ARCH_LLAMA] = {"llama", "LlamaForCausalLM", "Llama", 2048},
    [ITR_ARCH_MISTRAL] = {"mistral", "MistralForCausalLM", "Mistral", 131072},
    [ITR_ARCH_QWEN2] = {"qwen2", "Qwen2ForCausalLM", "Qwen2", 32768},
};
#define N_ARCHS ((int)(sizeof archs_ / sizeof archs_[0]))
#define SIZE_LIMIT (1L << 24) /* a sanity bound on every size field */

static int arch_from_model_type(const char *s) {
  for (int a = 0; a < N_ARCHS; a++)
    if (strcmp(s, archs_[a].model_type) == 0) return a;
  return -1;
}

static int arch_from_class(const char *s) {
  for (int a = 0; a < N_ARCHS; a++)
    if (strcmp(s, archs_[a].causal_lm) == 0) return a;
  return -1;
}

/* Checks a filled config for consistency; used by the reader and the writer. */
static itr_err validate(const itr_model_config *c, const char *file) {
  ITR_CHECK((unsigned)c->arch < (unsigned)N_ARCHS, ITR_ERR_INPUT, "%s: unknown architecture code %d", file,
            (int)c->arch);
  const struct {
    const char *key;
    int v;
  } pos[] = {{"hidden_size", c->hidden_size},
             {"intermediate_size", c->intermediate_size},
             {"num_hidden_layers", c->num_hidden_layers},
             {"num_attention_heads", c->num_attention_heads},
             {"num_key_value_heads", c->num_key_value_heads},
             {"head_dim", c->head_dim},
             {"vocab_size", c->vocab_size},
             {"max_position_embeddings", c->max_position_embeddings}};
  for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
    ITR_CHECK(pos[i].v >= 1 && pos[i].v <= (1L << 30), ITR_ERR_INPUT,
              "%s: '%s' must be a positive integer, got %d", file, pos[i].key, pos[i].v);
  ITR_CHECK(c->num_attention_heads % c->num_key_value_heads == 0, ITR_ERR_INPUT,
            "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d (grouped-query "
            "attention needs whole groups)",
            file, c->num_attention_heads, c->num_key_value_heads);
  ITR_CHECK(c->head_dim % 2 == 0, ITR_ERR_INPUT,
            "%s: head_dim %d is odd; rotary embeddings need an even head_dim", file, c->head_dim);
  ITR_CHECK((long)c->num_attention_heads * c->head_dim <= SIZE_LIMIT, ITR_ERR_INPUT,
            "%s: num_attention_heads x head_dim = %ld is implausibly large", file,
            (long)c->num_attention_heads * c->head_dim);
  ITR_CHECK(isfinite(c->rms_norm_eps) && c->rms_norm_eps > 0 && c->rms_norm_eps < 1, ITR_ERR_INPUT,
            "%s: rms_norm_eps must be in (0, 1), got %g", file, c->rms_norm_eps);
  ITR_CHECK(isfinite(c->rope_theta) && c->rope_theta > 0, ITR_ERR_INPUT,
            "%s: rope_theta must be positive, got %g", file, c->rope_theta);
  ITR_CHECK(c->tie_word_embeddings == 0 || c->tie_word_embeddings == 1, ITR_ERR_INPUT,
            "%s: tie_word_embeddings must be 0 or 1, got %d", file, c->tie_word_embeddings);
  switch (c->arch) {
    case ITR_ARCH_LLAMA:
      ITR_CHECK(c->o_bias == c->attention_bias, ITR_ERR_INPUT,
                "%s: llama's attention_bias covers q, k, v and o alike, but o_bias = %d and attention_bias = %d",
                file, c->o_bias, c->attention_bias);
      break;
    case ITR_ARCH_MISTRAL:
      ITR_CHECK(!c->attention_bias && !c->o_bias && !c->mlp_bias, ITR_ERR_INPUT,
                "%s: mistral has no biases in transformers, but the config asks for some", file);
      break;
    case ITR_ARCH_QWEN2:
      ITR_CHECK(c->attention_bias && !c->o_bias && !c->mlp_bias, ITR_ERR_INPUT,
                "%s: qwen2 always has q/k/v biases and no o_proj or MLP biases (attention_bias = %d, "
                "o_bias = %d, mlp_bias = %d)",
                file, c->attention_bias, c->o_bias, c->mlp_bias);
      break;
  }
  return ITR_OK;
}

/* Reads model_type / architectures into *arch, refusing unknown families by name. */
static itr_err read_arch(const cJSON *root, const char *file, itr_arch *arch) {
  const char *mt = NULL;
  ITR_TRY(itr_json_string(root, "model_type", file, NULL, &mt));
  int a = -1;
  if (mt) {
    a = arch_from_model_type(mt);
    ITR_CHECK(a >= 0, ITR_ERR_INPUT,
              "%s: model_type '%s' is not supported (supported: llama, mistral, qwen2)", file, mt);
  }
  const cJSON *ar = cJSON_GetObjectItemCaseSensitive(root, "architectures");
  if (ar && !cJSON_IsNull(ar)) {
    ITR_CHECK(cJSON_IsArray(ar) && cJSON_GetArraySize(ar) >= 1, ITR_ERR_INPUT,
              "%s: 'architectures' must be a non-empty list of class names", file);
    for (const cJSON *e = ar->child; e; e = e->next) {
      ITR_CHECK(cJSON_IsString(e), ITR_ERR_INPUT, "%s: 'architectures' must hold strings", file);
      int b = arch_from_class(e->valuestring);
      if (b < 0) {
        for (int k = 0; k < N_ARCHS; k++)
          ITR_CHECK(strncmp(e->valuestring, archs_[k].family, strlen(archs_[k].family)) != 0 ||
                        strncmp(e->valuestring + strlen(archs_[k].family), "For", 3) != 0,
                    ITR_ERR_INPUT,
                    "%s: architecture '%s' is not supported: iteris-mpi merges adapters of causal "
                    "language models (%s)",
                    file, e->valuestring, archs_[k].causal_lm);
        return itr_error_set(ITR_ERR_INPUT,
                             "%s: architecture '%s' is not supported (supported: LlamaForCausalLM, "
                             "MistralForCausalLM, Qwen2ForCausalLM)",
                             file, e->valuestring);
      }
      ITR_CHECK(a < 0 || a == b, ITR_ERR_INPUT, "%s: model_type '%s' disagrees with architecture '%s'", file,
                archs_[a].model_type, e->valuestring);
      a = b;
    }
  }
  ITR_CHECK(a >= 0, ITR_ERR_INPUT,
            "%s: neither 'model_type' nor 'architectures' says which model this is; is it a Hugging "
            "Face config.json?",
            file);
  *arch = (itr_arch)a;
  return ITR_OK;
}

static itr_err parse_config(const cJSON *root, const char *file, itr_model_config *c) {
  memset(c, 0, sizeof *c);
  ITR_TRY(read_arch(root, file, &c->arch));
  snprintf(c->model_type, sizeof c->model_type, "%s", archs_[c->arch].model_type);

  const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
  ITR_CHECK(!q || cJSON_IsNull(q), ITR_ERR_INPUT,
            "%s: quantized models (quantization_config) are not supported: merge against the "
            "unquantized base model",
            file);
  const char *act = NULL;
  ITR_TRY(itr_json_string(root, "hidden_act", file, "silu", &act));
  ITR_CHECK(strcmp(act, "silu") == 0, ITR_ERR_INPUT,
            "%s: hidden_act '%s' is not supported (only silu, as in Llama, is)", file, act);
  const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
  if (rs && !cJSON_IsNull(rs)) {
    const cJSON *t = cJSON_IsObject(rs) ? cJSON_GetObjectItemCaseSensitive(rs, "rope_type") : NULL;
    if (!t && cJSON_IsObject(rs)) t = cJSON_GetObjectItemCaseSensitive(rs, "type");
    char got[96];
    itr_json_describe(t ? t : rs, got, sizeof got);
    if (t && cJSON_IsString(t) && strcmp(t->valuestring, "default") == 0) {
      /* transformers' "default" rope type is plain RoPE: nothing to do */
    } else {
      return itr_error_set(ITR_ERR_INPUT,
                           "%s: rope_scaling type %s is not supported yet (only rope_scaling null, plain "
                           "RoPE, is)",
                           file, got);
    }
  }

  ITR_TRY(itr_json_int(root, "hidden_size", file, 1, 0, 1, SIZE_LIMIT, &c->hidden_size));
  ITR_TRY(itr_json_int(root, "intermediate_size", file, 1, 0, 1, SIZE_LIMIT, &c->intermediate_size));
  ITR_TRY(itr_json_int(root, "num_hidden_layers", file, 1, 0, 1, 100000, &c->num_hidden_layers));
  ITR_TRY(itr_json_int(root, "num_attention_heads", file, 1, 0, 1, 100000, &c->num_attention_heads));
  ITR_TRY(itr_json_int(root, "num_key_value_heads", file, 0, c->num_attention_heads, 1, 100000,
                       &c->num_key_value_heads));
  ITR_TRY(itr_json_int(root, "vocab_size", file, 1, 0, 1, 1L << 30, &c->vocab_size));
  ITR_TRY(itr_json_int(root, "max_position_embeddings", file, 0, archs_[c->arch].max_pos_default, 1,
                       1L << 30, &c->max_position_embeddings));
  if (cJSON_GetObjectItemCaseSensitive(root, "head_dim") &&
      !cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(root, "head_dim"))) {
    ITR_TRY(itr_json_int(root, "head_dim", file, 1, 0, 1, 1L << 16, &c->head_dim));
  } else {
    ITR_CHECK(c->hidden_size % c->num_attention_heads == 0, ITR_ERR_INPUT,
              "%s: hidden_size %d is not a multiple of num_attention_heads %d and no head_dim is given",
              file, c->hidden_size, c->num_attention_heads);
    c->head_dim = c->hidden_size / c->num_attention_heads;
  }
  ITR_TRY(itr_json_double(root, "rms_norm_eps", file, 0, 1e-6, &c->rms_norm_eps));
  ITR_TRY(itr_json_double(root, "rope_theta", file, 0, 10000.0, &c->rope_theta));
  /* transformers >= 5 groups RoPE settings as rope_parameters {rope_type, rope_theta, ...}. */
  const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
  if (rp && !cJSON_IsNull(rp)) {
    ITR_CHECK(cJSON_IsObject(rp), ITR_ERR_INPUT, "%s: 'rope_parameters' must be an object", file);
    const char *type = NULL;
    ITR_TRY(itr_json_string(rp, "rope_type", file, "default", &type));
    ITR_CHECK(strcmp(type, "default") == 0, ITR_ERR_INPUT,
              "%s: rope_parameters type '%s' is not supported yet (only plain RoPE, rope_type 'default', is)",
              file, type);
    ITR_TRY(itr_json_double(rp, "rope_theta", file, 0, c->rope_theta, &c->rope_theta));
  }
  ITR_TRY(itr_json_bool(root, "tie_word_embeddings", file, 0, &c->tie_word_embeddings));

  switch (c->arch) {
    case ITR_ARCH_LLAMA:
      ITR_TRY(itr_json_bool(root, "attention_bias", file, 0, &c->attention_bias));
      ITR_TRY(itr_json_bool(root, "mlp_bias", file, 0, &c->mlp_bias));
      c->o_bias = c->attention_bias;
      break;
    case ITR_ARCH_MISTRAL:
      break; /* transformers' Mistral has no biases (it ignores attention_bias) */
    case ITR_ARCH_QWEN2:
      c->attention_bias = 1; /* q/k/v always carry a bias in Qwen2; o_proj and the MLP never */
      break;
  }

  if (c->arch == ITR_ARCH_MISTRAL || c->arch == ITR_ARCH_QWEN2) {
    int use_sw = 1;
    if (c->arch == ITR_ARCH_QWEN2) ITR_TRY(itr_json_bool(root, "use_sliding_window", file, 0, &use_sw));
    const cJSON *sw = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
    if (use_sw && sw && !cJSON_IsNull(sw)) {
      int w = 0;
      ITR_TRY(itr_json_int(root, "sliding_window", file, 1, 0, 1, 1L << 30, &w));
      ITR_CHECK(w >= c->max_position_embeddings, ITR_ERR_INPUT,
                "%s: sliding_window %d is smaller than max_position_embeddings %d: sliding-window "
                "attention is not supported yet (sliding_window null or >= max_position_embeddings is)",
                file, w, c->max_position_embeddings);
    }
  }
  ITR_TRY(validate(c, file));
  return ITR_OK;
}

/* file = path/config.json when path is a folder, else path itself. */
static itr_err config_file(const char *path, char file[ITR_PATH_MAX]) {
  if (itr_iofile_is_dir(path)) return itr_iofile_join(file, ITR_PATH_MAX, path, "config.json");
  ITR_CHECK(strlen(path) < ITR_PATH_MAX, ITR_ERR_INPUT, "path too long: '%s'", path);
  snprintf(file, ITR_PATH_MAX, "%s", path);
  return ITR_OK;
}

itr_err itr_model_config_read(const char *path, itr_model_config *out) {
  char file[ITR_PATH_MAX];
  ITR_TRY(config_file(path, file));
  cJSON *root = NULL;
  ITR_TRY(itr_json_read_object(file, &root));
  itr_model_config c;
  itr_err e = parse_config(root, file, &c);
  cJSON_Delete(root);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  *out = c;
  return ITR_OK;
}

static itr_err build_json(const itr_model_config *c, cJSON *o) {
  cJSON *ar = cJSON_AddArrayToObject(o, "architectures");
  if (!ar || !cJSON_AddItemToArray(ar, cJSON_CreateString(archs_[c->arch].causal_lm)))
    return itr_error_set(ITR_ERR_INTERNAL, "out of memory building config.json");
  int ok = cJSON_AddStringToObject(o, "model_type", archs_[c->arch].model_type) != NULL;
  ok &= cJSON_AddNumberToObject(o, "hidden_size", c->hidden_size) != NULL;
  ok &= cJSON_AddNumberToObject(o, "intermediate_size", c->intermediate_size) != NULL;
  ok &= cJSON_AddNumberToObject(o, "num_hidden_layers", c->num_hidden_layers) != NULL;
  ok &= cJSON_AddNumberToObject(o, "num_attention_heads", c->num_attention_heads) != NULL;
  ok &= cJSON_AddNumberToObject(o, "num_key_value_heads", c->num_key_value_heads) != NULL;
  ok &= cJSON_AddNumberToObject(o, "head_dim", c->head_dim) != NULL;
  ok &= cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size) != NULL;
  ok &= cJSON_AddNumberToObject(o, "max_position_embeddings", c->max_position_embeddings) != NULL;
  ok &= cJSON_AddNumberToObject(o, "rms_norm_eps", c->rms_norm_eps) != NULL;
  ok &= cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta) != NULL;
  ok &= cJSON_AddNullToObject(o, "rope_scaling") != NULL;
  ok &= cJSON_AddStringToObject(o, "hidden_act", "silu") != NULL;
  ok &= cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tie_word_embeddings) != NULL;
  switch (c->arch) {
    case ITR_ARCH_LLAMA:
      ok &= cJSON_AddBoolToObject(o, "attention_bias", c->attention_bias) != NULL;
      ok &= cJSON_AddBoolToObject(o, "mlp_bias", c->mlp_bias) != NULL;
      break;
    case ITR_ARCH_MISTRAL:
      ok &= cJSON_AddNullToObject(o, "sliding_window") != NULL;
      break;
    case ITR_ARCH_QWEN2:
      ok &= cJSON_AddFalseToObject(o, "use_sliding_window") != NULL;
      ok &= cJSON_AddNullToObject(o, "sliding_window") != NULL;
      break;
  }
  ITR_CHECK(ok, ITR_ERR_INTERNAL, "out of memory building config.json");
  return ITR_OK;
}

itr_err itr_model_config_write(const char *path, const itr_model_config *cfg) {
  char file[ITR_PATH_MAX];
  ITR_TRY(config_file(path, file));
  ITR_TRY(validate(cfg, file));
  cJSON *o = cJSON_CreateObject();
  ITR_CHECK(o, ITR_ERR_INTERNAL, "out of memory building %s", file);
  itr_err e = build_json(cfg, o);
  char *text = e == ITR_OK ? cJSON_Print(o) : NULL;
  cJSON_Delete(o);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory printing %s", file);
  size_t n = strlen(text);
  e = itr_iofile_write_atomic(file, text, n);
  cJSON_free(text);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

void itr_module_shape(const itr_model_config *cfg, itr_module m, int64_t *d_out, int64_t *d_in) {
  int64_t D = cfg->hidden_size, F = cfg->intermediate_size;
  int64_t q = (int64_t)cfg->num_attention_heads * cfg->head_dim;
  int64_t kv = (int64_t)cfg->num_key_value_heads * cfg->head_dim;
  switch (m) {
    case ITR_Q_PROJ: *d_out = q; *d_in = D; break;
    case ITR_K_PROJ:
    case ITR_V_PROJ: *d_out = kv; *d_in = D; break;
    case ITR_O_PROJ: *d_out = D; *d_in = q; break;
    case ITR_GATE_PROJ:
    case ITR_UP_PROJ: *d_out = F; *d_in = D; break;
    case ITR_DOWN_PROJ: *d_out = D; *d_in = F; break;
    default: *d_out = 0; *d_in = 0; break;
  }
}
