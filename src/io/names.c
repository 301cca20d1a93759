/* The one table of Hugging Face / PEFT tensor names. Everything else in iteris-mpi names a
 * weight by (layer, itr_module); only this file spells the strings. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/io.h"

static const struct {
  const char *name;  /* Hugging Face attribute name */
  const char *block; /* the sub-module holding it */
  itr_site site;     /* which input it reads */
} modules_[ITR_MODULE_COUNT] = {
    [ITR_Q_PROJ] = {"q_proj", "self_attn", ITR_SITE_ATTN_IN},
    [ITR_K_PROJ] = {"k_proj", "self_attn", ITR_SITE_ATTN_IN},
    [ITR_V_PROJ] = {"v_proj", "self_attn", ITR_SITE_ATTN_IN},
    [ITR_O_PROJ] = {"o_proj", "self_attn", ITR_SITE_ATTN_OUT},
    [ITR_GATE_PROJ] = {"gate_proj", "mlp", ITR_SITE_MLP_IN},
    [ITR_UP_PROJ] = {"up_proj", "mlp", ITR_SITE_MLP_IN},
    [ITR_DOWN_PROJ] = {"down_proj", "mlp", ITR_SITE_MLP_OUT},
};

const char *const ITR_NAME_EMBED = "model.embed_tokens.weight";
const char *const ITR_NAME_FINAL_NORM = "model.norm.weight";
const char *const ITR_NAME_LM_HEAD = "lm_head.weight";

static const char LORA_PREFIX[] = "base_model.model.model.layers.";

const char *itr_module_name(itr_module m) {
  return (unsigned)m < ITR_MODULE_COUNT ? modules_[m].name : "?";
}
const char *itr_module_block(itr_module m) {
  return (unsigned)m < ITR_MODULE_COUNT ? modules_[m].block : "?";
}
itr_site itr_module_site(itr_module m) {
  return (unsigned)m < ITR_MODULE_COUNT ? modules_[m].site : ITR_SITE_COUNT;
}

int itr_module_parse(const char *s, itr_module *out) {
  for (int m = 0; m < ITR_MODULE_COUNT; m++)
    if (strcmp(s, modules_[m].name) == 0) {
      *out = (itr_module)m;
      return 1;
    }
  return 0;
}

void itr_name_base(int layer, itr_module m, const char *suffix, char *buf, size_t len) {
  snprintf(buf, len, "model.layers.%d.%s.%s.%s", layer, itr_module_block(m), itr_module_name(m), suffix);
}

void itr_name_lora(int layer, itr_module m, char which, char *buf, size_t len) {
  snprintf(buf, len, "%s%d.%s.%s.lora_%c.weight", LORA_PREFIX, layer, itr_module_block(m),
           itr_module_name(m), which);
}

void itr_name_layer_norm(int layer, int post_attention, char *buf, size_t len) {
  snprintf(buf, len, "model.layers.%d.%s.weight", layer,
           post_attention ? "post_attention_layernorm" : "input_layernorm");
}

/* Parses a decimal layer index without sign or leading zeros; advances *p. */
static int parse_index(const char **p, int *out) {
  const char *s = *p;
  if (*s < '0' || *s > '9') return 0;
  if (*s == '0' && s[1] >= '0' && s[1] <= '9') return 0;
  long v = 0;
  while (*s >= '0' && *s <= '9') {
    v = v * 10 + (*s - '0');
    if (v > 1000000) return 0;
    s++;
  }
  *out = (int)v;
  *p = s;
  return 1;
}

int itr_name_parse_lora(const char *name, int *layer, itr_module *m, char *which) {
  size_t np = sizeof LORA_PREFIX - 1;
  if (strncmp(name, LORA_PREFIX, np) != 0) return 0;
  const char *p = name + np;
  int l;
  if (!parse_index(&p, &l) || *p != '.') return 0;
  p++;
  for (int k = 0; k < ITR_MODULE_COUNT; k++) {
    size_t bl = strlen(modules_[k].block), ml = strlen(modules_[k].name);
    if (strncmp(p, modules_[k].block, bl) != 0 || p[bl] != '.') continue;
    const char *q = p + bl + 1;
    if (strncmp(q, modules_[k].name, ml) != 0) continue;
    q += ml;
    if (strncmp(q, ".lora_", 6) != 0) continue;
    q += 6;
    if ((q[0] != 'A' && q[0] != 'B') || strcmp(q + 1, ".weight") != 0) continue;
    *layer = l;
    *m = (itr_module)k;
    *which = q[0];
    return 1;
  }
  return 0;
}
