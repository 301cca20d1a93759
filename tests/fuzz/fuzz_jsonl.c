/* libFuzzer: calibration JSONL ({"input_ids": [...]} per line, ids below the vocabulary). */
#include "fuzz_common.h"
#include "iteris/io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const char *path = fuzz_file("calib.jsonl", data, n);
  itr_token_set ts;
  memset(&ts, 0, sizeof ts);
  if (itr_token_set_read(path, 1000, &ts) == ITR_OK) itr_token_set_fini(&ts);
  itr_error_clear();
  return 0;
}
