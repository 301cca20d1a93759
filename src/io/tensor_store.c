/* A model folder's tensors: DIR/model.safetensors.index.json ({"metadata": ..., "weight_map":
 * {name: shard file}}) with shards mapped lazily on first access, or, without an index,
 * DIR/model.safetensors. The index is hostile too: shard names must be plain file names inside
 * the folder (no '/', no ".."), names must be unique, and a name whose shard lacks it is an
 * error naming both. */
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/iofile.h"
#include "io/st_internal.h"
#include "iteris/io.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

typedef struct {
  const char *name; /* in pool (index) or in the single file's object */
  int shard;
} store_entry;

struct itr_tensor_store {
  char *dir;
  int n;                 /* number of tensors */
  store_entry *e;        /* (n) sorted by name */
  int n_shards;
  const char **shard_file;  /* (n_shards) file names inside dir, sorted */
  itr_safetensors **shard;  /* (n_shards) NULL until first access */
  int indexed;              /* 1: read from the index file */
  char *pool;               /* tensor and shard names read from the index */
};

static int cmp_entry(const void *a, const void *b) {
  return strcmp(((const store_entry *)a)->name, ((const store_entry *)b)->name);
}
static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static const store_entry *lookup(const itr_tensor_store *s, const char *name) {
  if (!s || !name) return NULL;
  int lo = 0, hi = s->n - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    int c = strcmp(name, s->e[mid].name);
    if (c == 0) return &s->e[mid];
    if (c < 0)
      hi = mid - 1;
    else
      lo = mid + 1;
  }
  return NULL;
}

/* A shard name is a plain file name in the folder: non-empty, no '/', no "..". */
static int plain_file_name(const char *f) { return f[0] && !strchr(f, '/') && !strstr(f, ".."); }

static itr_err open_single(itr_tensor_store *s) {
  char path[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_join(path, sizeof path, s->dir, SINGLE_NAME));
  ITR_TRY(itr_calloc(1, sizeof *s->shard, "tensor store shard table", &s->shard));
  ITR_TRY(itr_calloc(1, sizeof *s->shard_file, "tensor store shard names", &s->shard_file));
  s->n_shards = 1;
  s->shard_file[0] = SINGLE_NAME;
  ITR_TRY(itr_safetensors_open(path, &s->shard[0]));
  int n = itr_safetensors_count(s->shard[0]);
  ITR_TRY(itr_calloc((size_t)n, sizeof *s->e, "tensor store names", &s->e));
  for (int i = 0; i < n; i++) {
    s->e[i].name = itr_safetensors_at(s->shard[0], i)->name;
    s->e[i].shard = 0;
  }
  if (n > 1) qsort(s->e, (size_t)n, sizeof *s->e, cmp_entry);
  s->n = n;
  return ITR_OK;
}

static itr_err parse_index(itr_tensor_store *s, const char *path, const char *text, size_t len) {
  itr_err err = ITR_OK;
  const char **files = NULL;
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
  if (!root) {
    size_t at = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    return itr_error_set(ITR_ERR_INPUT, "index '%s' is not valid JSON (error near byte %zu)", path, at);
  }
  for (const char *p = end; p < text + len; p++)
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
      err = itr_error_set(ITR_ERR_INPUT, "index '%s': unexpected text after the JSON object (byte %zu)", path,
                          (size_t)(p - text));
      goto done;
    }
  if (!cJSON_IsObject(root)) {
    err = itr_error_set(ITR_ERR_INPUT, "index '%s': expected a JSON object at the top level", path);
    goto done;
  }
  const cJSON *wm = NULL;
  for (const cJSON *c = root->child; c; c = c->next)
    if (strcmp(c->string, "weight_map") == 0) {
      if (wm) {
        err = itr_error_set(ITR_ERR_INPUT, "index '%s': \"weight_map\" appears twice", path);
        goto done;
      }
      wm = c;
    }
  if (!cJSON_IsObject(wm)) {
    err = itr_error_set(ITR_ERR_INPUT, "index '%s': \"weight_map\" is %s, expected an object {tensor name: shard "
                        "file}", path, wm ? "not an object" : "missing");
    goto done;
  }
  size_t pool_len = 0;
  long n = 0;
  for (const cJSON *c = wm->child; c; c = c->next) {
    if (!cJSON_IsString(c)) {
      err = itr_error_set(ITR_ERR_INPUT, "index '%s': weight_map entry of tensor '%.200s' is not a string (a shard "
                          "file name)", path, c->string);
      goto done;
    }
    if (!c->string[0]) {
      err = itr_error_set(ITR_ERR_INPUT, "index '%s': weight_map has an empty tensor name", path);
      goto done;
    }
    if (!plain_file_name(c->valuestring)) {
      err = itr_error_set(ITR_ERR_INPUT, "index '%s': tensor '%.200s' maps to shard '%.200s', which is not a plain "
                          "file name in the folder (empty, or holds '/' or '..')", path, c->string, c->valuestring);
      goto done;
    }
    pool_len += strlen(c->string) + strlen(c->valuestring) + 2;
    n++;
  }
  if (n > 0x7fffffffL) {
    err = itr_error_set(ITR_ERR_INPUT, "index '%s': too many tensors (%ld)", path, n);
    goto done;
  }
  ITR_TRY_GOTO(itr_calloc((size_t)n, sizeof *s->e, "tensor store names", &s->e), err, done);
  ITR_TRY_GOTO(itr_calloc((size_t)n, sizeof *files, "tensor store shard list", &files), err, done);
  ITR_TRY_GOTO(itr_calloc(pool_len, 1, "tensor store name pool", &s->pool), err, done);
  char *pool = s->pool;
  int i = 0;
  for (const cJSON *c = wm->child; c; c = c->next, i++) {
    size_t ln = strlen(c->string), lf = strlen(c->valuestring);
    memcpy(pool, c->string, ln + 1);
    s->e[i].name = pool;
    pool += ln + 1;
    memcpy(pool, c->valuestring, lf + 1);
    files[i] = pool;
    pool += lf + 1;
  }
  /* Shards: the distinct file names, sorted. */
  if (n > 1) qsort(files, (size_t)n, sizeof *files, cmp_str);
  int ns = 0;
  for (long k = 0; k < n; k++)
    if (k == 0 || strcmp(files[k], files[ns - 1]) != 0) files[ns++] = files[k];
  ITR_TRY_GOTO(itr_calloc((size_t)ns, sizeof *s->shard_file, "tensor store shard names", &s->shard_file), err,
               done);
  ITR_TRY_GOTO(itr_calloc((size_t)ns, sizeof *s->shard, "tensor store shard table", &s->shard), err, done);
  for (int k = 0; k < ns; k++) s->shard_file[k] = files[k];
  s->n_shards = ns;
  /* Each name's shard, found from the file name stored right after the name in the pool. */
  for (long k = 0; k < n; k++) {
    const char *f = s->e[k].name + strlen(s->e[k].name) + 1;
    const char **hit = bsearch(&f, s->shard_file, (size_t)ns, sizeof *s->shard_file, cmp_str);
    s->e[k].shard = (int)(hit - s->shard_file);
  }
  if (n > 1) qsort(s->e, (size_t)n, sizeof *s->e, cmp_entry);
  for (long k = 1; k < n; k++)
    if (strcmp(s->e[k - 1].name, s->e[k].name) == 0) {
      err = itr_error_set(ITR_ERR_INPUT, "index '%s': tensor '%.200s' appears twice in weight_map", path,
                          s->e[k].name);
      goto done;
    }
  s->n = (int)n;
done:
  free(files);
  cJSON_Delete(root);
  return err;
}

itr_err itr_tensor_store_open(const char *dir, itr_tensor_store **out) {
  ITR_CHECK(dir && out, ITR_ERR_INTERNAL, "itr_tensor_store_open: NULL argument");
  ITR_CHECK(itr_iofile_is_dir(dir), ITR_ERR_INPUT, "model folder '%s' does not exist or is not a folder", dir);
  itr_tensor_store *s = NULL;
  itr_err err = ITR_OK;
  char path[ITR_PATH_MAX], single[ITR_PATH_MAX];
  char *text = NULL;
  size_t len = 0;
  ITR_TRY(itr_iofile_join(path, sizeof path, dir, INDEX_NAME));
  ITR_TRY(itr_iofile_join(single, sizeof single, dir, SINGLE_NAME));
  ITR_TRY(itr_calloc(1, sizeof *s, "tensor store", &s));
  ITR_TRY_GOTO(itr_st_strdup(dir, "tensor store folder", &s->dir), err, fail);
  if (itr_iofile_is_file(path)) {
    s->indexed = 1;
    ITR_TRY_GOTO(itr_iofile_read(path, (size_t)ITR_ST_HEADER_CAP, &text, &len), err, fail);
    ITR_TRY_GOTO(parse_index(s, path, text, len), err, fail);
  } else if (itr_iofile_is_file(single)) {
    ITR_TRY_GOTO(open_single(s), err, fail);
  } else {
    err = itr_error_set(ITR_ERR_INPUT, "model folder '%s' has neither %s nor %s. Is this a Hugging Face model "
                        "folder with safetensors weights?", dir, INDEX_NAME, SINGLE_NAME);
    goto fail;
  }
  free(text);
  *out = s;
  return ITR_OK;
fail:
  free(text);
  itr_tensor_store_destroy(s);
  return err;
}

void itr_tensor_store_destroy(itr_tensor_store *s) {
  if (!s) return;
  for (int i = 0; s->shard && i < s->n_shards; i++) itr_safetensors_destroy(s->shard[i]);
  free(s->shard);
  free(s->shard_file);
  free(s->e);
  free(s->pool);
  free(s->dir);
  free(s);
}

itr_err itr_tensor_store_get(itr_tensor_store *s, const char *name, const itr_tensor_info **out) {
  ITR_CHECK(s && name && out, ITR_ERR_INTERNAL, "itr_tensor_store_get: NULL argument");
  const store_entry *e = lookup(s, name);
  ITR_CHECK(e, ITR_ERR_INPUT, "tensor '%s' is not in model folder '%s' (%d tensors). Is this the right base model?",
            name, s->dir, s->n);
  itr_safetensors **sh = &s->shard[e->shard];
  if (!*sh) {
    char path[ITR_PATH_MAX];
    ITR_TRY(itr_iofile_join(path, sizeof path, s->dir, s->shard_file[e->shard]));
    ITR_TRY(itr_safetensors_open(path, sh));
  }
  const itr_tensor_info *t = itr_safetensors_find(*sh, name);
  ITR_CHECK(t, ITR_ERR_INPUT, "model folder '%s': %s maps tensor '%s' to shard '%s', but that shard does not "
            "contain it. The index and the shards do not match.", s->dir, INDEX_NAME, name,
            s->shard_file[e->shard]);
  *out = t;
  return ITR_OK;
}

int itr_tensor_store_has(const itr_tensor_store *s, const char *name) { return lookup(s, name) != NULL; }
int itr_tensor_store_count(const itr_tensor_store *s) { return s ? s->n : 0; }
const char *itr_tensor_store_name(const itr_tensor_store *s, int i) {
  return s && i >= 0 && i < s->n ? s->e[i].name : NULL;
}
const char *itr_tensor_store_dir(const itr_tensor_store *s) { return s ? s->dir : NULL; }
