/* Private helpers of src/synth. */
#ifndef ITERIS_SYNTH_INTERNAL_H
#define ITERIS_SYNTH_INTERNAL_H

#include <cjson/cJSON.h>

#include "iteris/synth.h"

/* mkdir -p DIR (0755). */
/* Prints the JSON value and writes it to path (path.tmp.<pid>, then rename). */
itr_err itr_synth_write_json(const char *path, const cJSON *value);
/* buf = dir/name; error when it does not fit. */
itr_err itr_synth_join(char *buf, size_t len, const char *dir, const char *name);
/* Fills dst[n] with std * N(0, 1) (+ mean) from the stream itr_synth_seed(seed, name). */
void itr_synth_fill_normal(float *dst, size_t n, double mean, double std, uint64_t seed, const char *name);

/* Writes DIR/adapter_config.json of a PEFT LoRA (rank r, lora_alpha alpha, the modules in mask). */
itr_err itr_synth_adapter_config_write(const char *dir, int r, double alpha, int use_rslora, unsigned mask,
                                       const char *base_model_name);

#endif
