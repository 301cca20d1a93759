/* libFuzzer: a model's config.json (architecture, sizes, RoPE scaling, refusals by name). */
#include "fuzz_common.h"
#include "iteris/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const char *path = fuzz_file("config.json", data, n);
  itr_model_config cfg;
  if (itr_model_config_read(path, &cfg) == ITR_OK) {
    int64_t d_out, d_in;
    for (int m = 0; m < ITR_MODULE_COUNT; m++) itr_module_shape(&cfg, (itr_module)m, &d_out, &d_in);
  }
  itr_error_clear();
  return 0;
}
