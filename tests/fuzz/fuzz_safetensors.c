/* libFuzzer: the safetensors reader (8-byte length, JSON header, tensors tiling the data). Every
 * tensor it accepts is read back as f64 (the bounds it promised must hold). */
#include "fuzz_common.h"
#include "iteris/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const char *path = fuzz_file("t.safetensors", data, n);
  itr_safetensors *st = NULL;
  if (itr_safetensors_open(path, &st) == ITR_OK) {
    for (int i = 0; i < itr_safetensors_count(st); i++) {
      const itr_tensor_info *t = itr_safetensors_at(st, i);
      if (t->numel > (1 << 20)) continue;
      double *buf = malloc(((size_t)t->numel + 1) * sizeof(double));
      if (!buf) abort();
      (void)itr_tensor_read_f64(t, buf);
      free(buf);
    }
  }
  itr_safetensors_destroy(st);
  itr_error_clear();
  return 0;
}
