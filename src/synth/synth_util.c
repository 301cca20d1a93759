/* Folder creation, JSON files and normal fills for the generators. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "synth/synth_internal.h"

itr_err itr_synth_mkdirs(const char *dir) {
  char buf[ITR_PATH_MAX];
  size_t n = strlen(dir);
  ITR_CHECK(n > 0 && n < sizeof buf, ITR_ERR_INPUT, "bad folder name '%s'", dir);
  memcpy(buf, dir, n + 1);
  for (size_t i = 1; i <= n; i++) {
    if (buf[i] != '/' && buf[i] != '\0') continue;
    char c = buf[i];
    buf[i] = '\0';
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
      return itr_error_set(ITR_ERR_INPUT, "cannot create folder '%s': %s", buf, strerror(errno));
    buf[i] = c;
  }
  struct stat sb;
  ITR_CHECK(stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode), ITR_ERR_INPUT, "'%s' exists and is not a folder", dir);
  return ITR_OK;
}

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
