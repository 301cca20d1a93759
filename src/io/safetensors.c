/* safetensors reader: maps a file and validates all of it before handing out a single tensor.
 * The file is hostile: every length is bounded by the bytes left, integers are checked to be
 * exact non-negative integers, products are checked for overflow, names must be unique, and the
 * tensors must tile the data buffer exactly (no overlap, no gap, no bytes left over). */
#define _DEFAULT_SOURCE /* madvise(MADV_DONTNEED): glibc's posix_madvise ignores POSIX_MADV_DONTNEED */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io/st_internal.h"
#include "iteris/io.h"

struct itr_safetensors {
  char *path;                      /* copy of the path given to open */
  const unsigned char *map;        /* (map_len) bytes, read-only mapping of the whole file */
  size_t map_len;
  int count;                       /* number of tensors */
  itr_tensor_info *tensors;        /* (count) in header order */
  const itr_tensor_info **by_name; /* (count) sorted by name, for find */
  int n_meta;
  const char **meta_key, **meta_val; /* (n_meta) sorted by key */
  char *pool;                        /* names and metadata strings */
};

/* ---- small helpers shared with the other safetensors files -------------------------------- */

void itr_st_format_shape(int ndim, const int64_t *shape, char *buf, size_t len) {
  if (len == 0) return;
  size_t k = 0;
  buf[0] = '\0';
  int n = snprintf(buf, len, "(");
  if (n > 0) k = (size_t)n;
  for (int i = 0; i < ndim && k < len; i++) {
    n = snprintf(buf + k, len - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (n > 0) k += (size_t)n;
  }
  if (k < len) snprintf(buf + k, len - k, ")");
}

itr_err itr_st_strdup(const char *s, const char *what, char **out) {
  size_t n = strlen(s);
  char *p = NULL;
  ITR_TRY(itr_calloc(n + 1, 1, what, &p));
  memcpy(p, s, n);
  *out = p;
  return ITR_OK;
}

/* ---- validation helpers ------------------------------------------------------------------- */

static const char *json_kind(const cJSON *j) {
  if (!j) return "missing";
  if (cJSON_IsNumber(j)) return "a number";
  if (cJSON_IsString(j)) return "a string";
  if (cJSON_IsArray(j)) return "a list";
  if (cJSON_IsObject(j)) return "an object";
  if (cJSON_IsBool(j)) return "a boolean";
  if (cJSON_IsNull(j)) return "null";
  return "invalid";
}

/* An exact non-negative integer no larger than 2^53 (beyond that a double is not exact). */
static int json_uint(const cJSON *j, uint64_t *out) {
  if (!cJSON_IsNumber(j)) return 0;
  double d = j->valuedouble;
  if (!isfinite(d) || d < 0 || d != floor(d) || d > 9007199254740992.0) return 0;
  *out = (uint64_t)d;
  return 1;
}

/* Describes a JSON value for a message: the number itself, or its kind. */
static void json_describe(const cJSON *j, char *buf, size_t len) {
  if (cJSON_IsNumber(j))
    snprintf(buf, len, "%.17g", j->valuedouble);
  else
    snprintf(buf, len, "%s", json_kind(j));
}

static int cmp_info_name(const void *a, const void *b) {
  const itr_tensor_info *x = *(const itr_tensor_info *const *)a, *y = *(const itr_tensor_info *const *)b;
  return strcmp(x->name, y->name);
}

/* Data offsets of a tensor, relative to the buffer, recovered from its data pointer. */
typedef struct {
  const itr_tensor_info *t;
  uint64_t begin, end;
} span;

static int cmp_span(const void *a, const void *b) {
  const span *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return strcmp(x->t->name, y->t->name);
}

typedef struct {
  const char *key, *val;
} meta_pair;

static int cmp_meta(const void *a, const void *b) {
  return strcmp(((const meta_pair *)a)->key, ((const meta_pair *)b)->key);
}

/* ---- mapping ------------------------------------------------------------------------------ */

static itr_err map_file(itr_safetensors *st) {
  int fd = open(st->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return itr_error_set(ITR_ERR_INPUT, "cannot open safetensors file '%s': %s. Check the path.", st->path,
                         strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return itr_error_set(ITR_ERR_INPUT, "cannot stat safetensors file '%s': %s", st->path, strerror(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s' is not a regular file", st->path);
  }
  if (sb.st_size < 8) {
    close(fd);
    return itr_error_set(ITR_ERR_INPUT,
                         "safetensors file '%s' is %lld bytes, shorter than the 8-byte header length "
                         "prefix: truncated, or not a safetensors file",
                         st->path, (long long)sb.st_size);
  }
  if ((uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
    close(fd);
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s' is too large to map (%lld bytes)", st->path,
                         (long long)sb.st_size);
  }
  void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (m == MAP_FAILED)
    return itr_error_set(ITR_ERR_INTERNAL, "cannot map safetensors file '%s' (%lld bytes): %s", st->path,
                         (long long)sb.st_size, strerror(e));
  st->map = m;
  st->map_len = (size_t)sb.st_size;
  return ITR_OK;
}

/* ---- one header entry --------------------------------------------------------------------- */

/* Validates one tensor entry and fills t (name excluded) with begin/end in *b, *e. */
static itr_err parse_entry(const itr_safetensors *st, const char *name, const cJSON *e, uint64_t buf_len,
                           itr_tensor_info *t, uint64_t *b, uint64_t *en) {
  const char *f = st->path;
  char got[64];
  if (!cJSON_IsObject(e))
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': entry is %s, expected an object "
                         "with dtype, shape and data_offsets", f, name, json_kind(e));
  const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
  if (!cJSON_IsString(dt))
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': field \"dtype\" is %s, expected a "
                         "string such as \"F32\"", f, name, json_kind(dt));
  if (!itr_dtype_parse(dt->valuestring, &t->dtype))
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': dtype '%.40s' is not supported "
                         "(iteris-mpi reads F32, F16, BF16 and F64). Convert the file to one of these.",
                         f, name, dt->valuestring);
  const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
  if (!cJSON_IsArray(sh))
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': field \"shape\" is %s, expected a "
                         "list of non-negative integers", f, name, json_kind(sh));
  int ndim = cJSON_GetArraySize(sh);
  if (ndim > ITR_MAX_DIMS)
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': shape has %d dimensions, more "
                         "than the %d supported", f, name, ndim, ITR_MAX_DIMS);
  int d = 0, any_zero = 0;
  for (const cJSON *it = sh->child; it; it = it->next, d++) {
    uint64_t v;
    if (!json_uint(it, &v)) {
      json_describe(it, got, sizeof got);
      return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': shape[%d] is %s, expected a "
                           "non-negative integer", f, name, d, got);
    }
    t->shape[d] = (int64_t)v;
    any_zero |= v == 0;
  }
  t->ndim = ndim;
  /* numel with overflow check (a zero dimension makes it 0 whatever the others are) */
  uint64_t numel = 1;
  int overflow = 0;
  for (d = 0; d < ndim && !any_zero; d++) {
    uint64_t v = (uint64_t)t->shape[d];
    if (numel > (uint64_t)INT64_MAX / v) overflow = 1;
    numel *= v;
  }
  if (any_zero) numel = 0;
  size_t esize = itr_dtype_size(t->dtype), nbytes = 0;
  if (overflow || numel > (uint64_t)SIZE_MAX || !itr_mul_size((size_t)numel, esize, &nbytes)) {
    char shp[256];
    itr_st_format_shape(ndim, t->shape, shp, sizeof shp);
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': shape %s has too many elements: "
                         "its byte count overflows 64 bits", f, name, shp);
  }
  t->numel = (int64_t)numel;
  t->nbytes = nbytes;

  const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
  if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2)
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': field \"data_offsets\" is %s, "
                         "expected a list [begin, end] of two integers", f, name,
                         cJSON_IsArray(off) ? "a list whose length is not 2" : json_kind(off));
  uint64_t begin, end;
  if (!json_uint(off->child, &begin) || !json_uint(off->child->next, &end)) {
    const cJSON *bad = json_uint(off->child, &begin) ? off->child->next : off->child;
    json_describe(bad, got, sizeof got);
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': data_offsets holds %s, expected "
                         "non-negative integers", f, name, got);
  }
  if (begin > end)
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': data_offsets [%llu, %llu] has "
                         "begin > end", f, name, (unsigned long long)begin, (unsigned long long)end);
  if (end > buf_len)
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': data_offsets [%llu, %llu] run past "
                         "the end of the %llu-byte data buffer: file truncated?", f, name,
                         (unsigned long long)begin, (unsigned long long)end, (unsigned long long)buf_len);
  if (end - begin != (uint64_t)nbytes) {
    char shp[256];
    itr_st_format_shape(ndim, t->shape, shp, sizeof shp);
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s': data_offsets [%llu, %llu] span "
                         "%llu bytes, but shape %s of %s needs %zu bytes", f, name, (unsigned long long)begin,
                         (unsigned long long)end, (unsigned long long)(end - begin), shp,
                         itr_dtype_name(t->dtype), nbytes);
  }
  *b = begin;
  *en = end;
  return ITR_OK;
}

/* ---- the header --------------------------------------------------------------------------- */

static itr_err parse_header(itr_safetensors *st) {
  const char *f = st->path;
  const unsigned char *m = st->map;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | m[i];
  uint64_t avail = (uint64_t)st->map_len - 8;
  if (n > avail)
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': header length %llu exceeds the %llu bytes after the "
                         "8-byte length prefix: truncated, or not a safetensors file",
                         f, (unsigned long long)n, (unsigned long long)avail);
  if (n > ITR_ST_HEADER_CAP)
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': header length %llu exceeds the limit of %llu bytes",
                         f, (unsigned long long)n, (unsigned long long)ITR_ST_HEADER_CAP);
  const char *hdr = (const char *)m + 8;
  const uint64_t buf_len = avail - n;
  const unsigned char *buf = m + 8 + n;

  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(hdr, (size_t)n, &end, 0);
  if (!root) {
    size_t at = end && end >= hdr && end <= hdr + n ? (size_t)(end - hdr) : 0;
    return itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': header is not valid JSON (error near byte %zu of the "
                         "%llu-byte header)", f, at, (unsigned long long)n);
  }
  itr_err err = ITR_OK;
  span *spans = NULL;
  meta_pair *meta = NULL;
  for (const char *p = end; p < hdr + n; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
      err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': unexpected bytes after the JSON header at byte %zu "
                          "of the %llu-byte header (only spaces may pad it)", f, (size_t)(p - hdr),
                          (unsigned long long)n);
      goto done;
    }
  if (!cJSON_IsObject(root)) {
    err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': header is %s, expected a JSON object", f,
                        json_kind(root));
    goto done;
  }

  /* Count entries and the bytes of strings to keep. */
  size_t pool_len = 0;
  long count = 0, n_meta = 0, n_meta_objs = 0;
  for (const cJSON *c = root->child; c; c = c->next) {
    if (strcmp(c->string, "__metadata__") == 0) {
      if (++n_meta_objs > 1) {
        err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': \"__metadata__\" appears twice in the header", f);
        goto done;
      }
      if (!cJSON_IsObject(c)) {
        err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': \"__metadata__\" is %s, expected an object of "
                            "strings", f, json_kind(c));
        goto done;
      }
      for (const cJSON *kv = c->child; kv; kv = kv->next) {
        if (!cJSON_IsString(kv)) {
          err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': __metadata__ value of key '%.200s' is %s, "
                              "expected a string", f, kv->string, json_kind(kv));
          goto done;
        }
        pool_len += strlen(kv->string) + strlen(kv->valuestring) + 2;
        n_meta++;
      }
    } else {
      if (c->string[0] == '\0') {
        err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': a tensor has an empty name", f);
        goto done;
      }
      pool_len += strlen(c->string) + 1;
      count++;
    }
  }
  if (count > 0x7fffffffL || n_meta > 0x7fffffffL) {
    err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': too many header entries (%ld)", f, count + n_meta);
    goto done;
  }

  ITR_TRY_GOTO(itr_calloc((size_t)count, sizeof *st->tensors, "safetensors tensor table", &st->tensors), err, done);
  ITR_TRY_GOTO(itr_calloc((size_t)count, sizeof *st->by_name, "safetensors name index", &st->by_name), err, done);
  ITR_TRY_GOTO(itr_calloc((size_t)count, sizeof *spans, "safetensors offset table", &spans), err, done);
  ITR_TRY_GOTO(itr_calloc((size_t)n_meta, sizeof *meta, "safetensors metadata table", &meta), err, done);
  ITR_TRY_GOTO(itr_calloc((size_t)n_meta, sizeof *st->meta_key, "safetensors metadata keys", &st->meta_key), err,
               done);
  ITR_TRY_GOTO(itr_calloc((size_t)n_meta, sizeof *st->meta_val, "safetensors metadata values", &st->meta_val), err,
               done);
  ITR_TRY_GOTO(itr_calloc(pool_len, 1, "safetensors names", &st->pool), err, done);

  char *pool = st->pool;
  int ti = 0, mi = 0;
  for (const cJSON *c = root->child; c; c = c->next) {
    if (strcmp(c->string, "__metadata__") == 0) {
      for (const cJSON *kv = c->child; kv; kv = kv->next, mi++) {
        size_t lk = strlen(kv->string), lv = strlen(kv->valuestring);
        memcpy(pool, kv->string, lk + 1);
        meta[mi].key = pool;
        pool += lk + 1;
        memcpy(pool, kv->valuestring, lv + 1);
        meta[mi].val = pool;
        pool += lv + 1;
      }
      continue;
    }
    itr_tensor_info *t = &st->tensors[ti];
    uint64_t b = 0, e = 0;
    ITR_TRY_GOTO(parse_entry(st, c->string, c, buf_len, t, &b, &e), err, done);
    size_t ln = strlen(c->string);
    memcpy(pool, c->string, ln + 1);
    t->name = pool;
    pool += ln + 1;
    t->file = st->path;
    t->data = buf + b;
    spans[ti].t = t;
    spans[ti].begin = b;
    spans[ti].end = e;
    st->by_name[ti] = t;
    ti++;
  }
  st->count = (int)count;

  /* Unique names (cJSON keeps duplicate keys). */
  if (count > 1) qsort(st->by_name, (size_t)count, sizeof *st->by_name, cmp_info_name);
  for (long i = 1; i < count; i++)
    if (strcmp(st->by_name[i - 1]->name, st->by_name[i]->name) == 0) {
      err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensor '%.200s' appears twice in the header "
                          "(duplicate names)", f, st->by_name[i]->name);
      goto done;
    }
  if (n_meta > 1) qsort(meta, (size_t)n_meta, sizeof *meta, cmp_meta);
  for (long i = 0; i < n_meta; i++) {
    if (i > 0 && strcmp(meta[i - 1].key, meta[i].key) == 0) {
      err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': __metadata__ key '%.200s' appears twice", f,
                          meta[i].key);
      goto done;
    }
    st->meta_key[i] = meta[i].key;
    st->meta_val[i] = meta[i].val;
  }
  st->n_meta = (int)n_meta;

  /* The tensors tile the buffer: sorted by begin, each starts where the previous ended. */
  if (count > 1) qsort(spans, (size_t)count, sizeof *spans, cmp_span);
  uint64_t pos = 0;
  for (long i = 0; i < count; i++) {
    if (spans[i].begin < pos) {
      err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': tensors '%.200s' [%llu, %llu) and '%.200s' "
                          "[%llu, %llu) overlap", f, spans[i - 1].t->name, (unsigned long long)spans[i - 1].begin,
                          (unsigned long long)spans[i - 1].end, spans[i].t->name,
                          (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end);
      goto done;
    }
    if (spans[i].begin > pos) {
      err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': bytes [%llu, %llu) of the data buffer belong to no "
                          "tensor (gap before tensor '%.200s')", f, (unsigned long long)pos,
                          (unsigned long long)spans[i].begin, spans[i].t->name);
      goto done;
    }
    pos = spans[i].end;
  }
  if (pos != buf_len) {
    err = itr_error_set(ITR_ERR_INPUT, "safetensors file '%s': %llu bytes left over: data buffer bytes [%llu, %llu) "
                        "belong to no tensor", f, (unsigned long long)(buf_len - pos), (unsigned long long)pos,
                        (unsigned long long)buf_len);
    goto done;
  }

done:
  free(spans);
  free(meta);
  cJSON_Delete(root);
  return err;
}

/* ---- public API --------------------------------------------------------------------------- */

itr_err itr_safetensors_open(const char *path, itr_safetensors **out) {
  ITR_CHECK(path && out, ITR_ERR_INTERNAL, "itr_safetensors_open: NULL argument");
  itr_safetensors *st = NULL;
  itr_err err;
  ITR_TRY(itr_calloc(1, sizeof *st, "safetensors object", &st));
  ITR_TRY_GOTO(itr_st_strdup(path, "safetensors path", &st->path), err, fail);
  ITR_TRY_GOTO(map_file(st), err, fail);
  ITR_TRY_GOTO(parse_header(st), err, fail);
  *out = st;
  return ITR_OK;
fail:
  itr_safetensors_destroy(st);
  return err;
}

void itr_safetensors_destroy(itr_safetensors *st) {
  if (!st) return;
  if (st->map) munmap((void *)st->map, st->map_len);
  free(st->path);
  free(st->tensors);
  free(st->by_name);
  free(st->meta_key);
  free(st->meta_val);
  free(st->pool);
  free(st);
}

int itr_safetensors_count(const itr_safetensors *st) { return st ? st->count : 0; }

const itr_tensor_info *itr_safetensors_at(const itr_safetensors *st, int i) {
  if (!st || i < 0 || i >= st->count) return NULL;
  return &st->tensors[i];
}

const itr_tensor_info *itr_safetensors_find(const itr_safetensors *st, const char *name) {
  if (!st || !name) return NULL;
  int lo = 0, hi = st->count - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    int c = strcmp(name, st->by_name[mid]->name);
    if (c == 0) return st->by_name[mid];
    if (c < 0)
      hi = mid - 1;
    else
      lo = mid + 1;
  }
  return NULL;
}

const char *itr_safetensors_metadata(const itr_safetensors *st, const char *key) {
  if (!st || !key) return NULL;
  int lo = 0, hi = st->n_meta - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    int c = strcmp(key, st->meta_key[mid]);
    if (c == 0) return st->meta_val[mid];
    if (c < 0)
      hi = mid - 1;
    else
      lo = mid + 1;
  }
  return NULL;
}

const char *itr_safetensors_path(const itr_safetensors *st) { return st ? st->path : NULL; }

/* ---- element access ----------------------------------------------------------------------- */

/* Index of the first element that is not finite once converted to float (to_f32) or double;
 * -1 when all are. *src_finite says whether the source value itself was finite (an F64 value
 * beyond float's range). */
static int64_t first_bad(const itr_tensor_info *t, int to_f32, int *src_finite) {
  const unsigned char *s = t->data;
  for (int64_t i = 0; i < t->numel; i++) {
    switch (t->dtype) {
      case ITR_F32: {
        uint32_t u;
        memcpy(&u, s + 4 * i, 4);
        if ((u & 0x7f800000u) == 0x7f800000u) return *src_finite = 0, i;
      } break;
      case ITR_F16: {
        uint16_t u;
        memcpy(&u, s + 2 * i, 2);
        if ((u & 0x7c00u) == 0x7c00u) return *src_finite = 0, i;
      } break;
      case ITR_BF16: {
        uint16_t u;
        memcpy(&u, s + 2 * i, 2);
        if ((u & 0x7f80u) == 0x7f80u) return *src_finite = 0, i;
      } break;
      case ITR_F64: {
        double v;
        memcpy(&v, s + 8 * i, 8);
        if (!isfinite(v)) return *src_finite = 0, i;
        if (to_f32 && !isfinite((float)v)) return *src_finite = 1, i;
      } break;
      default: return *src_finite = 0, i;
    }
  }
  return -1;
}

static itr_err report_bad(const itr_tensor_info *t, int64_t i, int src_finite, const char *to) {
  char idx[256];
  int64_t multi[ITR_MAX_DIMS], r = i;
  for (int d = t->ndim - 1; d >= 0; d--) {
    multi[d] = t->shape[d] ? r % t->shape[d] : 0;
    r = t->shape[d] ? r / t->shape[d] : 0;
  }
  itr_st_format_shape(t->ndim, multi, idx, sizeof idx);
  double v = 0;
  itr_convert_to_f64(t->dtype, (const unsigned char *)t->data + (size_t)i * itr_dtype_size(t->dtype), 1, &v);
  if (src_finite)
    return itr_error_set(ITR_ERR_INPUT, "file '%s': tensor '%s': element %lld at index %s is %g, beyond the range "
                         "of %s", t->file, t->name, (long long)i, idx, v, to);
  return itr_error_set(ITR_ERR_INPUT, "file '%s': tensor '%s': element %lld at index %s is %s: the weights are "
                       "corrupt (a diverged training run?)", t->file, t->name, (long long)i, idx,
                       isnan(v) ? "NaN" : (v > 0 ? "+infinity" : "-infinity"));
}

/* Gives the pages that held a tensor back to the kernel once it is converted. The mapping is
 * read-only and private, so MADV_DONTNEED only unmaps them from this process: a later read faults
 * them in again from the page cache. Without it a rank that streams a 70B-class model layer by
 * layer would keep every layer's bytes resident (and counted against a Slurm memory limit) until
 * the end. Best effort: a failure changes memory use only. */
static void release_pages(const itr_tensor_info *t) {
  if (t->nbytes == 0) return;
  const uintptr_t ps = (uintptr_t)sysconf(_SC_PAGESIZE);
  if (ps == 0 || (ps & (ps - 1)) != 0) return;
  uintptr_t a = (uintptr_t)t->data & ~(ps - 1), b = ((uintptr_t)t->data + t->nbytes + ps - 1) & ~(ps - 1);
  (void)madvise((void *)a, (size_t)(b - a), MADV_DONTNEED);
}

itr_err itr_tensor_read_f32(const itr_tensor_info *t, float *dst) {
  ITR_CHECK(t && (dst || t->numel == 0), ITR_ERR_INTERNAL, "itr_tensor_read_f32: NULL argument");
  int src_finite = 0;
  int64_t bad = first_bad(t, 1, &src_finite);
  if (bad >= 0) return report_bad(t, bad, src_finite, "float32");
  if (t->numel > 0) itr_convert_to_f32(t->dtype, t->data, (size_t)t->numel, dst);
  release_pages(t);
  return ITR_OK;
}

itr_err itr_tensor_read_f64(const itr_tensor_info *t, double *dst) {
  ITR_CHECK(t && (dst || t->numel == 0), ITR_ERR_INTERNAL, "itr_tensor_read_f64: NULL argument");
  int src_finite = 0;
  int64_t bad = first_bad(t, 0, &src_finite);
  if (bad >= 0) return report_bad(t, bad, src_finite, "float64");
  if (t->numel > 0) itr_convert_to_f64(t->dtype, t->data, (size_t)t->numel, dst);
  release_pages(t);
  return ITR_OK;
}

itr_err itr_tensor_check_shape(const itr_tensor_info *t, int ndim, const int64_t *shape, const char *what) {
  ITR_CHECK(t && (shape || ndim == 0) && ndim >= 0, ITR_ERR_INTERNAL, "itr_tensor_check_shape: bad argument");
  int same = t->ndim == ndim;
  for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
  if (same) return ITR_OK;
  char got[256], want[256];
  itr_st_format_shape(t->ndim, t->shape, got, sizeof got);
  itr_st_format_shape(ndim, shape, want, sizeof want);
  return itr_error_set(ITR_ERR_INPUT, "file '%s': tensor '%s' has shape %s, but %s has shape %s. Was this file made "
                       "for another model?", t->file, t->name, got, what ? what : "the caller", want);
}
