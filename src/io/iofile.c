/* Text files and JSON fields for the io layer: capped whole-file reads, atomic writes (tmp,
 * fsync, rename), path joins, and typed JSON getters whose messages name file and key. */
#include "io/iofile.h"

#include "iteris/io.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

itr_err itr_iofile_read(const char *path, size_t cap, char **out, size_t *len) {
  FILE *f = fopen(path, "rb");
  ITR_CHECK(f, ITR_ERR_INPUT, "cannot open '%s': %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
    fclose(f);
    return itr_error_set(ITR_ERR_INPUT, "'%s' is not a regular file", path);
  }
  if ((uint64_t)sb.st_size > (uint64_t)cap) {
    fclose(f);
    return itr_error_set(ITR_ERR_INPUT, "'%s' is %lld bytes, more than the %zu accepted for this kind of file",
                         path, (long long)sb.st_size, cap);
  }
  size_t n = (size_t)sb.st_size;
  char *buf = NULL;
  itr_err e = itr_calloc(n + 1, 1, path, &buf);
  if (e != ITR_OK) {
    fclose(f);
    return e;
  }
  size_t got = n ? fread(buf, 1, n, f) : 0;
  int err = ferror(f);
  fclose(f);
  if (got != n || err) {
    free(buf);
    return itr_error_set(ITR_ERR_INPUT, "cannot read '%s': got %zu of %zu bytes", path, got, n);
  }
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return ITR_OK;
}

itr_err itr_iofile_write_atomic(const char *path, const void *data, size_t len) {
  char tmp[4200];
  int n = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
  ITR_CHECK(n > 0 && (size_t)n < sizeof tmp, ITR_ERR_INPUT, "path too long: '%s'", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ITR_CHECK(fd >= 0, ITR_ERR_INPUT, "cannot create '%s': %s", tmp, strerror(errno));
  const char *p = (const char *)data;
  size_t left = len;
  while (left > 0) {
    ssize_t w = write(fd, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int e = errno;
      close(fd);
      unlink(tmp);
      return itr_error_set(ITR_ERR_INTERNAL, "cannot write '%s': %s (disk full?)", tmp, strerror(e));
    }
    p += w;
    left -= (size_t)w;
  }
  if (fsync(fd) != 0 || close(fd) != 0) {
    int e = errno;
    unlink(tmp);
    return itr_error_set(ITR_ERR_INTERNAL, "cannot sync '%s': %s", tmp, strerror(e));
  }
  if (rename(tmp, path) != 0) {
    int e = errno;
    unlink(tmp);
    return itr_error_set(ITR_ERR_INPUT, "cannot rename '%s' to '%s': %s", tmp, path, strerror(e));
  }
  return ITR_OK;
}

int itr_iofile_is_dir(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int itr_iofile_is_file(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

void itr_iofile_parent(const char *path, char *buf, size_t len) {
  snprintf(buf, len, "%s", path);
  char *slash = strrchr(buf, '/');
  if (slash == buf) buf[1] = 0;
  else if (slash) *slash = 0;
  else snprintf(buf, len, ".");
}

void itr_iofile_digest(const char *path, int safetensors_header, uint64_t *h) {
  FILE *f = fopen(path, "rb");
  if (!f) return;
  struct stat sb;
  uint64_t x = *h;
  if (fstat(fileno(f), &sb) == 0) x = itr_hash64_bytes(x, &sb.st_size, sizeof sb.st_size);
  unsigned char buf[1 << 16];
  uint64_t want = UINT64_MAX; /* bytes still to hash (all of them unless a header) */
  if (safetensors_header) {
    unsigned char len8[8];
    want = 0;
    if (fread(len8, 1, 8, f) == 8) {
      for (int b = 7; b >= 0; b--) want = want << 8 | len8[b];
      x = itr_hash64_bytes(x, len8, 8);
    }
  }
  size_t got;
  while (want > 0 && (got = fread(buf, 1, want < sizeof buf ? (size_t)want : sizeof buf, f)) > 0) {
    x = itr_hash64_bytes(x, buf, got);
    if (want != UINT64_MAX) want -= got;
  }
  fclose(f);
  *h = x;
}

void itr_iofile_digest_model(const char *dir, uint64_t *h) {
  char path[ITR_PATH_MAX + 512]; /* the folder, '/', a file name of up to 255 bytes */
  snprintf(path, sizeof path, "%s/config.json", dir);
  itr_iofile_digest(path, 0, h);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
  itr_iofile_digest(path, 0, h);
  DIR *d = opendir(dir);
  if (!d) return;
  uint64_t sum = 0; /* readdir's order is the file system's: add the files' digests */
  for (struct dirent *de; (de = readdir(d)) != NULL;) {
    const size_t n = strlen(de->d_name);
    if (n < 12 || strcmp(de->d_name + n - 12, ".safetensors") != 0) continue;
    uint64_t fh = itr_hash64(de->d_name);
    snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
    itr_iofile_digest(path, 1, &fh);
    sum += fh;
  }
  closedir(d);
  *h = itr_hash64_bytes(*h, &sum, sizeof sum);
}

itr_err itr_iofile_join(char *buf, size_t len, const char *dir, const char *name) {
  size_t dl = strlen(dir);
  int slash = dl > 0 && dir[dl - 1] != '/';
  int n = snprintf(buf, len, "%s%s%s", dir, slash ? "/" : "", name);
  ITR_CHECK(n >= 0 && (size_t)n < len, ITR_ERR_INPUT, "path too long: '%s/%s' (limit %zu bytes)", dir,
            name, len - 1);
  return ITR_OK;
}

itr_err itr_iofile_mkdirs(const char *dir) {
  char buf[4096];
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
  ITR_CHECK(itr_iofile_is_dir(dir), ITR_ERR_INPUT, "'%s' exists and is not a folder", dir);
  return ITR_OK;
}

/* ---- JSON ------------------------------------------------------------------------------------ */

static int cmp_key(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Rejects duplicate keys in every object (cJSON keeps the first silently). Small objects compare
 * every pair; large ones (a tokenizer.json vocabulary: 10^5 keys) sort the keys. */
static itr_err check_duplicates(const cJSON *v, const char *file) {
  if (cJSON_IsObject(v)) {
    size_t n = 0;
    for (const cJSON *a = v->child; a; a = a->next) n++;
    if (n <= 64) {
      for (const cJSON *a = v->child; a; a = a->next)
        for (const cJSON *b = a->next; b; b = b->next)
          ITR_CHECK(!(a->string && b->string && strcmp(a->string, b->string) == 0), ITR_ERR_INPUT,
                    "%s: key '%s' appears twice in the same object; which one is meant is ambiguous", file,
                    a->string);
    } else {
      const char **keys = NULL;
      ITR_TRY(itr_calloc(n, sizeof *keys, "JSON keys", &keys));
      size_t k = 0;
      for (const cJSON *a = v->child; a; a = a->next) keys[k++] = a->string ? a->string : "";
      qsort(keys, n, sizeof *keys, cmp_key);
      const char *dup = NULL;
      for (size_t i = 1; i < n && !dup; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0) dup = keys[i];
      free(keys);
      ITR_CHECK(!dup, ITR_ERR_INPUT, "%s: key '%.200s' appears twice in the same object; which one is meant is ambiguous",
                file, dup);
    }
  }
  if (cJSON_IsObject(v) || cJSON_IsArray(v))
    for (const cJSON *c = v->child; c; c = c->next) ITR_TRY(check_duplicates(c, file));
  return ITR_OK;
}

itr_err itr_json_parse_object(const char *text, size_t len, const char *file, cJSON **out) {
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
  if (!root) {
    size_t pos = (end && end >= text && end <= text + len) ? (size_t)(end - text) : 0;
    int line = 1, col = 1;
    for (size_t i = 0; i < pos; i++) {
      if (text[i] == '\n') {
        line++;
        col = 1;
      } else {
        col++;
      }
    }
    char snippet[40];
    size_t k = 0;
    for (size_t i = pos; i < len && k + 1 < sizeof snippet && text[i] != '\n'; i++)
      snippet[k++] = (text[i] >= 32 && text[i] < 127) ? text[i] : '?';
    snippet[k] = '\0';
    return itr_error_set(ITR_ERR_INPUT, "%s: not valid JSON (line %d, column %d, near '%s')", file, line,
                         col, snippet);
  }
  if (end) {
    for (const char *p = end; p < text + len; p++) {
      if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
        cJSON_Delete(root);
        return itr_error_set(ITR_ERR_INPUT, "%s: unexpected text after the JSON value (byte %zu)", file,
                             (size_t)(p - text));
      }
    }
  }
  if (!cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return itr_error_set(ITR_ERR_INPUT, "%s: expected a JSON object at the top level", file);
  }
  itr_err e = check_duplicates(root, file);
  if (e != ITR_OK) {
    cJSON_Delete(root);
    return e;
  }
  *out = root;
  return ITR_OK;
}

itr_err itr_json_read_object(const char *file, cJSON **out) {
  char *text = NULL;
  size_t len = 0;
  ITR_TRY(itr_iofile_read(file, ITR_IOFILE_JSON_CAP, &text, &len));
  itr_err e = itr_json_parse_object(text, len, file, out);
  free(text);
  return e;
}

itr_err itr_json_read_beside(const char *file, const char *name, char *path, size_t len, cJSON **out) {
  char dir[ITR_PATH_MAX];
  *out = NULL;
  ITR_CHECK(strlen(file) < sizeof dir, ITR_ERR_INPUT, "path too long: '%s'", file);
  snprintf(dir, sizeof dir, "%s", file);
  char *slash = strrchr(dir, '/');
  if (slash) *slash = '\0';
  else snprintf(dir, sizeof dir, ".");
  ITR_TRY(itr_iofile_join(path, len, dir, name));
  if (!itr_iofile_is_file(path)) return ITR_OK;
  ITR_TRY(itr_json_read_object(path, out));
  return ITR_OK;
}

void itr_json_describe(const cJSON *v, char *buf, size_t len) {
  if (!v) {
    snprintf(buf, len, "nothing");
  } else if (cJSON_IsNull(v)) {
    snprintf(buf, len, "null");
  } else if (cJSON_IsTrue(v)) {
    snprintf(buf, len, "true");
  } else if (cJSON_IsFalse(v)) {
    snprintf(buf, len, "false");
  } else if (cJSON_IsNumber(v)) {
    snprintf(buf, len, "%.17g", v->valuedouble);
  } else if (cJSON_IsString(v)) {
    snprintf(buf, len, "'%.60s%s'", v->valuestring, strlen(v->valuestring) > 60 ? "..." : "");
  } else if (cJSON_IsArray(v)) {
    snprintf(buf, len, "a list");
  } else if (cJSON_IsObject(v)) {
    snprintf(buf, len, "an object");
  } else {
    snprintf(buf, len, "an unknown value");
  }
}

static const cJSON *field(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return (v && cJSON_IsNull(v)) ? NULL : v;
}

itr_err itr_json_int(const cJSON *obj, const char *key, const char *file, int required, int def, long lo,
                     long hi, int *out) {
  const cJSON *v = field(obj, key);
  if (!v) {
    ITR_CHECK(!required, ITR_ERR_INPUT, "%s: missing '%s' (an integer in [%ld, %ld])", file, key, lo, hi);
    *out = def;
    return ITR_OK;
  }
  char got[96];
  itr_json_describe(v, got, sizeof got);
  ITR_CHECK(cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble) &&
                v->valuedouble >= (double)lo && v->valuedouble <= (double)hi,
            ITR_ERR_INPUT, "%s: '%s' must be an integer in [%ld, %ld], got %s", file, key, lo, hi, got);
  *out = (int)v->valuedouble;
  return ITR_OK;
}

itr_err itr_json_double(const cJSON *obj, const char *key, const char *file, int required, double def,
                        double *out) {
  const cJSON *v = field(obj, key);
  if (!v) {
    ITR_CHECK(!required, ITR_ERR_INPUT, "%s: missing '%s' (a number)", file, key);
    *out = def;
    return ITR_OK;
  }
  char got[96];
  itr_json_describe(v, got, sizeof got);
  ITR_CHECK(cJSON_IsNumber(v) && isfinite(v->valuedouble), ITR_ERR_INPUT,
            "%s: '%s' must be a finite number, got %s", file, key, got);
  *out = v->valuedouble;
  return ITR_OK;
}

itr_err itr_json_bool(const cJSON *obj, const char *key, const char *file, int def, int *out) {
  const cJSON *v = field(obj, key);
  if (!v) {
    *out = def;
    return ITR_OK;
  }
  char got[96];
  itr_json_describe(v, got, sizeof got);
  ITR_CHECK(cJSON_IsBool(v), ITR_ERR_INPUT, "%s: '%s' must be true or false, got %s", file, key, got);
  *out = cJSON_IsTrue(v) ? 1 : 0;
  return ITR_OK;
}

itr_err itr_json_string(const cJSON *obj, const char *key, const char *file, const char *def,
                        const char **out) {
  const cJSON *v = field(obj, key);
  if (!v) {
    *out = def;
    return ITR_OK;
  }
  char got[96];
  itr_json_describe(v, got, sizeof got);
  ITR_CHECK(cJSON_IsString(v), ITR_ERR_INPUT, "%s: '%s' must be a string, got %s", file, key, got);
  *out = v->valuestring;
  return ITR_OK;
}
