/* Folder creation, JSON files and normal fills for the generators. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "synth/synth_internal.h"

itr_err itr_synth_join(char *buf, size_t len, const char *dir, const char *name) {
  int n = snprintf(buf, len, "%s/%s", dir, name);
  ITR_CHECK(n >= 0 && (size_t)n < len, ITR_ERR_INPUT, "path too long: '%s/%s'", dir, name);
  return ITR_OK;
}

itr_err itr_synth_write_json(const char *path, const cJSON *value) {
  char *text = cJSON_Print(value);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory printing %s", path);
  char tmp[ITR_PATH_MAX + 32];
  snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    cJSON_free(text);
    return itr_error_set(ITR_ERR_INPUT, "cannot create '%s': %s", tmp, strerror(errno));
  }
  size_t len = strlen(text);
  int ok = fwrite(text, 1, len, f) == len && fputc('\n', f) != EOF;
  ok &= fclose(f) == 0;
  cJSON_free(text);
  if (!ok || rename(tmp, path) != 0) {
    unlink(tmp);
    return itr_error_set(ITR_ERR_INTERNAL, "cannot write '%s' (disk full?)", path);
  }
  return ITR_OK;
}

void itr_synth_fill_normal(float *dst, size_t n, double mean, double std, uint64_t seed, const char *name) {
  itr_rng g;
  itr_rng_init(&g, itr_synth_seed(seed, name));
  for (size_t i = 0; i < n; i++) dst[i] = (float)(mean + std * itr_rng_normal(&g));
}

/* A seed derived from (seed, name): one stream per tensor. */
uint64_t itr_synth_seed(uint64_t seed, const char *name) {
  uint64_t x = seed ^ itr_hash64(name);
  return itr_splitmix64(&x);
}
