/* Private to src/io: PEFT adapter_config.json parsing, shared by peft_adapter.c (which also
 * checks the tensors against a base model) and inspect.c (which has no base model). */
#ifndef ITERIS_IO_PEFT_INTERNAL_H
#define ITERIS_IO_PEFT_INTERNAL_H

#include "iteris/io.h"

typedef struct {
  char *key;   /* literal module path or suffix, e.g. "q_proj" or "model.layers.3.self_attn.q_proj" */
  double value; /* a rank (integer) or an alpha */
  int used;    /* set when some module of the adapter matched it */
} itr_peft_pattern;

typedef struct {
  char file[ITR_PATH_MAX];     /* path of adapter_config.json, for messages */
  char base_model[512];        /* base_model_name_or_path, "" when absent */
  int r;                       /* default rank */
  double lora_alpha;           /* default alpha */
  int use_rslora;
  unsigned listed_mask;        /* modules named by target_modules (all seven for "all-linear") */
  int n_rank, n_alpha;
  itr_peft_pattern *rank_pattern, *alpha_pattern;
  int n_layers_tf;             /* layers_to_transform: -1 when absent (every layer), else its count */
  int *layers_tf;              /* (n_layers_tf) the layers PEFT applies the adapter to */
  char task_type[64];          /* task_type, "" when absent */
} itr_peft_config;

/* Reads and checks adapter_config.json (refusing DoRA, LoRA biases, modules_to_save,
 * fan_in_fan_out, regex target_modules, ...). generic = 0: a Llama-family adapter (target_modules
 * among the seven projections, layers_to_transform / layers_pattern read); generic = 1: any
 * architecture (module paths are whatever the tensors name; target_modules and the layer keys are
 * not interpreted). *out is filled only on success; fini it. */
itr_err itr_peft_config_read(const char *file, int generic, itr_peft_config *out);
void itr_peft_config_fini(itr_peft_config *c); /* accepts a zeroed struct */
/* r and alpha of (layer, m) after rank_pattern / alpha_pattern (PEFT's rule: a key matches when
 * the module's path "model.layers.<l>.<block>.<m>" equals it or ends with "." + key). Marks the
 * keys used. ITR_ERR_INPUT when two matching keys give different values. */
itr_err itr_peft_config_module(itr_peft_config *c, int layer, itr_module m, int *r, double *alpha);
/* The same for any module path (e.g. "encoder.block.0.layer.0.SelfAttention.q"). */
itr_err itr_peft_config_path(itr_peft_config *c, const char *path, int *r, double *alpha);
/* ITR_ERR_INPUT naming the first rank_pattern / alpha_pattern key that matched no module. */
itr_err itr_peft_config_check_unused(const itr_peft_config *c);
/* Whether PEFT applies the adapter to layer (layers_to_transform; every layer when absent). */
int itr_peft_config_layer(const itr_peft_config *c, int layer);
/* alpha / r, or alpha / sqrt(r) with use_rslora. */
double itr_peft_scaling(int use_rslora, int r, double alpha);

#endif
