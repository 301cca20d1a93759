/* safetensors writer: collects tensors and metadata, then writes one file atomically
 * (path.tmp.<pid>, fsync, rename). The JSON header is written by hand so that offsets are plain
 * integers (as the Rust reader demands) and padded with spaces to a multiple of 8 bytes. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/st_internal.h"
#include "iteris/io.h"

typedef struct {
  char *name;
  itr_dtype dtype;
  int ndim;
  int64_t shape[ITR_MAX_DIMS];
  size_t nbytes;
  const void *data; /* caller's, or owned */
  void *owned;      /* converted copy from add_f32, or NULL */
} wtensor;

struct itr_st_writer {
  wtensor *t; /* (cap) */
  int n, cap;
  char **meta_key, **meta_val; /* (meta_cap) */
  int n_meta, meta_cap;
};

itr_err itr_st_writer_create(itr_st_writer **out) {
  ITR_CHECK(out, ITR_ERR_INTERNAL, "itr_st_writer_create: NULL argument");
  itr_st_writer *w = NULL;
  ITR_TRY(itr_calloc(1, sizeof *w, "safetensors writer", &w));
  *out = w;
  return ITR_OK;
}

void itr_st_writer_destroy(itr_st_writer *w) {
  if (!w) return;
  for (int i = 0; i < w->n; i++) {
    free(w->t[i].name);
    free(w->t[i].owned);
  }
  free(w->t);
  for (int i = 0; i < w->n_meta; i++) {
    free(w->meta_key[i]);
    free(w->meta_val[i]);
  }
  free(w->meta_key);
  free(w->meta_val);
  free(w);
}

/* Grows an array of elem-byte items from cap to at least need (doubling). */
static itr_err grow(void **arr, int *cap, int need, size_t elem, const char *what) {
  if (need <= *cap) return ITR_OK;
  ITR_CHECK(need < (1 << 28), ITR_ERR_INPUT, "too many entries in %s (%d)", what, need);
  int nc = *cap ? *cap * 2 : 16;
  while (nc < need) nc *= 2;
  void *p = NULL;
  ITR_TRY(itr_calloc((size_t)nc, elem, what, &p));
  if (*cap) memcpy(p, *arr, (size_t)*cap * elem);
  free(*arr);
  *arr = p;
  *cap = nc;
  return ITR_OK;
}

/* Validates a tensor's name, dtype and shape; *nbytes is its byte count. */
static itr_err check_tensor(const itr_st_writer *w, const char *name, itr_dtype dtype, int ndim,
                            const int64_t *shape, size_t *nbytes) {
  ITR_CHECK(name && name[0], ITR_ERR_INPUT, "safetensors writer: a tensor needs a non-empty name");
  ITR_CHECK(strcmp(name, "__metadata__") != 0, ITR_ERR_INPUT,
            "safetensors writer: '__metadata__' is reserved and cannot name a tensor");
  ITR_CHECK((unsigned)dtype < ITR_DTYPE_COUNT, ITR_ERR_INPUT, "safetensors writer: tensor '%s': unknown dtype %d",
            name, (int)dtype);
  ITR_CHECK(ndim >= 0 && ndim <= ITR_MAX_DIMS && (shape || ndim == 0), ITR_ERR_INPUT,
            "safetensors writer: tensor '%s': %d dimensions, expected 0 to %d", name, ndim, ITR_MAX_DIMS);
  size_t n = itr_dtype_size(dtype);
  for (int d = 0; d < ndim; d++) {
    ITR_CHECK(shape[d] >= 0, ITR_ERR_INPUT, "safetensors writer: tensor '%s': shape[%d] = %lld is negative", name,
              d, (long long)shape[d]);
    ITR_CHECK(itr_mul_size(n, (size_t)shape[d], &n) && n <= (size_t)INT64_MAX, ITR_ERR_INPUT,
              "safetensors writer: tensor '%s': byte count overflows", name);
  }
  for (int i = 0; i < w->n; i++)
    ITR_CHECK(strcmp(w->t[i].name, name) != 0, ITR_ERR_INPUT, "safetensors writer: tensor '%s' added twice", name);
  *nbytes = n;
  return ITR_OK;
}

/* Appends a tensor; takes ownership of owned (freed on failure too). */
static itr_err append(itr_st_writer *w, const char *name, itr_dtype dtype, int ndim, const int64_t *shape,
                      size_t nbytes, const void *data, void *owned) {
  char *nm = NULL;
  itr_err err;
  ITR_TRY_GOTO(grow((void **)&w->t, &w->cap, w->n + 1, sizeof *w->t, "safetensors writer tensor list"), err, fail);
  ITR_TRY_GOTO(itr_st_strdup(name, "safetensors writer tensor name", &nm), err, fail);
  wtensor *t = &w->t[w->n++];
  memset(t, 0, sizeof *t);
  t->name = nm;
  t->dtype = dtype;
  t->ndim = ndim;
  for (int d = 0; d < ndim; d++) t->shape[d] = shape[d];
  t->nbytes = nbytes;
  t->data = data;
  t->owned = owned;
  return ITR_OK;
fail:
  free(owned);
  return err;
}

itr_err itr_st_writer_add(itr_st_writer *w, const char *name, itr_dtype dtype, int ndim, const int64_t *shape,
                          const void *data) {
  ITR_CHECK(w, ITR_ERR_INTERNAL, "itr_st_writer_add: NULL writer");
  size_t nbytes = 0;
  ITR_TRY(check_tensor(w, name, dtype, ndim, shape, &nbytes));
  ITR_CHECK(data || nbytes == 0, ITR_ERR_INTERNAL, "itr_st_writer_add: tensor '%s' has NULL data", name);
  ITR_TRY(append(w, name, dtype, ndim, shape, nbytes, data, NULL));
  return ITR_OK;
}

itr_err itr_st_writer_add_f32(itr_st_writer *w, const char *name, itr_dtype dtype, int ndim, const int64_t *shape,
                              const float *data) {
  ITR_CHECK(w, ITR_ERR_INTERNAL, "itr_st_writer_add_f32: NULL writer");
  size_t nbytes = 0;
  ITR_TRY(check_tensor(w, name, dtype, ndim, shape, &nbytes));
  ITR_CHECK(data || nbytes == 0, ITR_ERR_INTERNAL, "itr_st_writer_add_f32: tensor '%s' has NULL data", name);
  size_t numel = nbytes / itr_dtype_size(dtype);
  void *copy = NULL;
  ITR_TRY(itr_calloc(nbytes, 1, name, &copy));
  if (numel) itr_convert_from_f32(dtype, data, numel, copy);
  ITR_TRY(append(w, name, dtype, ndim, shape, nbytes, copy, copy));
  return ITR_OK;
}

itr_err itr_st_writer_set_metadata(itr_st_writer *w, const char *key, const char *value) {
  ITR_CHECK(w && key && value, ITR_ERR_INTERNAL, "itr_st_writer_set_metadata: NULL argument");
  char *v = NULL;
  ITR_TRY(itr_st_strdup(value, "safetensors metadata value", &v));
  for (int i = 0; i < w->n_meta; i++)
    if (strcmp(w->meta_key[i], key) == 0) {
      free(w->meta_val[i]);
      w->meta_val[i] = v;
      return ITR_OK;
    }
  char *k = NULL;
  itr_err err;
  int kcap = w->meta_cap;
  ITR_TRY_GOTO(grow((void **)&w->meta_key, &kcap, w->n_meta + 1, sizeof *w->meta_key, "safetensors metadata"), err,
               fail);
  ITR_TRY_GOTO(grow((void **)&w->meta_val, &w->meta_cap, w->n_meta + 1, sizeof *w->meta_val,
                    "safetensors metadata"), err, fail);
  ITR_TRY_GOTO(itr_st_strdup(key, "safetensors metadata key", &k), err, fail);
  w->meta_key[w->n_meta] = k;
  w->meta_val[w->n_meta] = v;
  w->n_meta++;
  return ITR_OK;
fail:
  free(v);
  return err;
}

/* ---- header building ---------------------------------------------------------------------- */

typedef struct {
  char *p;
  size_t len, cap; /* cap == 0: only count */
} sbuf;

static void put(sbuf *b, const char *s, size_t n) {
  if (b->cap) memcpy(b->p + b->len, s, n);
  b->len += n;
}
static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }
static void put_json_string(sbuf *b, const char *s) {
  put(b, "\"", 1);
  for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
    char esc[8];
    if (*c == '"' || *c == '\\') {
      esc[0] = '\\';
      esc[1] = (char)*c;
      put(b, esc, 2);
    } else if (*c < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", *c);
      put(b, esc, 6);
    } else {
      put(b, (const char *)c, 1);
    }
  }
  put(b, "\"", 1);
}
static void put_int(sbuf *b, unsigned long long v) {
  char tmp[32];
  int n = snprintf(tmp, sizeof tmp, "%llu", v);
  put(b, tmp, (size_t)n);
}

static int cmp_by_name(const void *a, const void *b) {
  return strcmp((*(const wtensor *const *)a)->name, (*(const wtensor *const *)b)->name);
}

/* order: (w->n) the tensors sorted by name. */
static void build_header(const itr_st_writer *w, const wtensor *const *order, sbuf *b) {
  puts_(b, "{");
  int first = 1;
  if (w->n_meta) {
    puts_(b, "\"__metadata__\":{");
    for (int i = 0; i < w->n_meta; i++) {
      if (i) puts_(b, ",");
      put_json_string(b, w->meta_key[i]);
      puts_(b, ":");
      put_json_string(b, w->meta_val[i]);
    }
    puts_(b, "}");
    first = 0;
  }
  unsigned long long off = 0;
  for (int k = 0; k < w->n; k++) {
    const wtensor *t = order[k];
    if (!first) puts_(b, ",");
    first = 0;
    put_json_string(b, t->name);
    puts_(b, ":{\"dtype\":\"");
    puts_(b, itr_dtype_name(t->dtype));
    puts_(b, "\",\"shape\":[");
    for (int d = 0; d < t->ndim; d++) {
      if (d) puts_(b, ",");
      put_int(b, (unsigned long long)t->shape[d]);
    }
    puts_(b, "],\"data_offsets\":[");
    put_int(b, off);
    puts_(b, ",");
    off += t->nbytes;
    put_int(b, off);
    puts_(b, "]}");
  }
  puts_(b, "}");
  while ((8 + b->len) % 8) puts_(b, " ");
}

/* ---- writing ------------------------------------------------------------------------------ */

static itr_err write_all(int fd, const void *p, size_t n, const char *tmp) {
  const unsigned char *c = p;
  while (n > 0) {
    size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
    ssize_t k = write(fd, c, chunk);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0)
      return itr_error_set(ITR_ERR_INTERNAL, "cannot write '%s': %s (disk full?)", tmp,
                           k < 0 ? strerror(errno) : "no progress");
    c += k;
    n -= (size_t)k;
  }
  return ITR_OK;
}

itr_err itr_st_writer_write(const itr_st_writer *w, const char *path) {
  ITR_CHECK(w && path, ITR_ERR_INTERNAL, "itr_st_writer_write: NULL argument");
  char tmp[ITR_PATH_MAX];
  int n = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
  ITR_CHECK(n > 0 && (size_t)n < sizeof tmp, ITR_ERR_INPUT, "output path '%s' is too long", path);

  itr_err err = ITR_OK;
  const wtensor **order = NULL;
  sbuf hb = {0};
  int fd = -1;
  ITR_TRY_GOTO(itr_calloc((size_t)w->n, sizeof *order, "safetensors writer order", &order), err, done);
  for (int i = 0; i < w->n; i++) order[i] = &w->t[i];
  if (w->n > 1) qsort(order, (size_t)w->n, sizeof *order, cmp_by_name);

  build_header(w, order, &hb); /* count */
  size_t hlen = hb.len;
  ITR_TRY_GOTO(itr_calloc(hlen + 8, 1, "safetensors header", &hb.p), err, done);
  hb.cap = hlen + 8;
  hb.len = 8;
  build_header(w, order, &hb);
  for (int i = 0; i < 8; i++) hb.p[i] = (char)(unsigned char)(((uint64_t)hlen >> (8 * i)) & 0xffu);

  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    err = itr_error_set(ITR_ERR_INPUT, "cannot create '%s': %s. Does the folder exist and is it writable?", tmp,
                        strerror(errno));
    goto done;
  }
  ITR_TRY_GOTO(write_all(fd, hb.p, hb.len, tmp), err, done);
  for (int k = 0; k < w->n; k++) {
    const wtensor *t = order[k];
    if (t->nbytes) ITR_TRY_GOTO(write_all(fd, t->data, t->nbytes, tmp), err, done);
  }
  if (fsync(fd) != 0) {
    err = itr_error_set(ITR_ERR_INTERNAL, "cannot sync '%s': %s", tmp, strerror(errno));
    goto done;
  }
  int rc = close(fd);
  fd = -1;
  if (rc != 0) {
    err = itr_error_set(ITR_ERR_INTERNAL, "cannot close '%s': %s", tmp, strerror(errno));
    goto done;
  }
  if (rename(tmp, path) != 0) {
    err = itr_error_set(ITR_ERR_INTERNAL, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    goto done;
  }
  /* Make the rename durable: sync the folder (best effort). */
  {
    char dir[ITR_PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
      dir[1] = '\0';
    else if (slash)
      *slash = '\0';
    else
      snprintf(dir, sizeof dir, ".");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)fsync(dfd);
      close(dfd);
    }
  }

done:
  if (fd >= 0) close(fd);
  if (err != ITR_OK) unlink(tmp);
  free(order);
  free(hb.p);
  return err;
}
