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

/* The folder (made once per process), the names written in it, and their removal when the process
 * exits normally (libFuzzer's end of -max_total_time); after a crash the folder stays, with the input. */
static char fuzz_dir_[64] = "", fuzz_names_[16][48];
static int fuzz_n_names_;

static inline void fuzz_cleanup(void) {
  char path[128];
  for (int i = 0; i < fuzz_n_names_; i++) {
    snprintf(path, sizeof path, "%s/%s", fuzz_dir_, fuzz_names_[i]);
    unlink(path);
  }
  rmdir(fuzz_dir_);
}

static inline const char *fuzz_dir(void) {
  if (!fuzz_dir_[0]) {
    snprintf(fuzz_dir_, sizeof fuzz_dir_, "/tmp/iteris-fuzz.XXXXXX");
    if (!mkdtemp(fuzz_dir_)) abort();
    atexit(fuzz_cleanup);
    itr_log_set_quiet(1);
  }
  return fuzz_dir_;
}

/* DIR/name, remembered for the removal at exit (a target that writes a file itself names it here). */
static inline const char *fuzz_path(const char *name) {
  static char path[128];
  int known = 0;
  for (int i = 0; i < fuzz_n_names_ && !known; i++) known = !strcmp(fuzz_names_[i], name);
  if (!known && fuzz_n_names_ < 16 && strlen(name) < sizeof fuzz_names_[0])
    strcpy(fuzz_names_[fuzz_n_names_++], name);
  snprintf(path, sizeof path, "%s/%s", fuzz_dir(), name);
  return path;
}

/* DIR/name with data written to it; returns the path. */
static inline const char *fuzz_file(const char *name, const uint8_t *data, size_t n) {
  const char *path = fuzz_path(name);
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(data, 1, n, f) != n)) abort();
  fclose(f);
  return path;
}

#endif
