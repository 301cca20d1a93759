/* Shared by the libFuzzer targets (tests/fuzz/fuzz_*.c): each writes the input to a file in a
 * private temporary folder and calls one reader on it. A reader may refuse any input with an error;
 * it must not crash, leak, hang or read out of bounds (ASan/UBSan watch). tests/fuzz/run.sh runs
 * each target over its seed corpus (tests/fuzz/corpus/<target>/, crashes found kept there as
 * fixtures) and then for FUZZ_SECONDS. */
#ifndef ITERIS_FUZZ_COMMON_H
#define ITERIS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iteris/core.h"

/* The folder (made once per process) and DIR/name with data written to it; returns the path. */
static inline const char *fuzz_dir(void) {
  static char dir[64] = "";
  if (!dir[0]) {
    snprintf(dir, sizeof dir, "/tmp/iteris-fuzz.XXXXXX");
    if (!mkdtemp(dir)) abort();
    itr_log_set_quiet(1);
  }
  return dir;
}

static inline const char *fuzz_file(const char *name, const uint8_t *data, size_t n) {
  static char path[128];
  snprintf(path, sizeof path, "%s/%s", fuzz_dir(), name);
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(data, 1, n, f) != n)) abort();
  fclose(f);
  return path;
}

#endif
