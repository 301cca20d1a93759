/* libFuzzer: a PEFT adapter_config.json, read as a Llama-family adapter and as a generic one, then
 * the rank / alpha of a few module paths through rank_pattern / alpha_pattern. */
#include "fuzz_common.h"
#include "io/peft_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const char *path = fuzz_file("adapter_config.json", data, n);
  for (int generic = 0; generic < 2; generic++) {
    itr_peft_config c;
    if (itr_peft_config_read(path, generic, &c) != ITR_OK) continue;
    int r;
    double alpha;
    for (int l = 0; l < 3; l++)
      for (int m = 0; m < ITR_MODULE_COUNT; m++) (void)itr_peft_config_module(&c, l, (itr_module)m, &r, &alpha);
    (void)itr_peft_config_path(&c, "encoder.block.0.layer.0.SelfAttention.q", &r, &alpha);
    (void)itr_peft_config_check_unused(&c);
    (void)itr_peft_config_layer(&c, 1);
    itr_peft_config_fini(&c);
  }
  itr_error_clear();
  return 0;
}
