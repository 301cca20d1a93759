/* PEFT LoRA adapters of any architecture (T5, BLIP, UNets, ...): factors named
 * "base_model.model.<module path>.lora_{A,B}.weight", read and written by module path. The
 * adapter_config.json checks are peft_adapter.c's (itr_peft_config_read, generic); the Llama-family
 * reader there adds the checks against a base model's layers. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/iofile.h"
#include "io/peft_internal.h"
#include "iteris/io.h"

#define LORA_PREFIX "base_model.model."
#define LORA_PATH_MAX 400 /* characters of a module path: "task_<i>/<module>/gram_x" fits itr_h5's 512 */

/* ---- reader ------------------------------------------------------------------------------------ */

void itr_lora_file_destroy(itr_lora_file *a) {
  if (!a) return;
  for (int k = 0; k < a->n_mod; k++) free(a->mods[k].path);
  free(a->mods);
  itr_safetensors_destroy(a->file);
  free(a);
}

const itr_lora_pair *itr_lora_file_find(const itr_lora_file *a, const char *path) {
  for (int k = 0; k < a->n_mod; k++)
    if (strcmp(a->mods[k].path, path) == 0) return &a->mods[k];
  return NULL;
}

/* Splits "base_model.model.<path>.lora_A.weight" into path and 'A' / 'B'. */
static itr_err parse_name(const char *file, const char *name, char *path, size_t len, char *which) {
  const size_t pl = strlen(LORA_PREFIX), nl = strlen(name), sl = strlen(".lora_A.weight");
  int ok = nl > pl + sl && strncmp(name, LORA_PREFIX, pl) == 0 &&
           (strcmp(name + nl - sl, ".lora_A.weight") == 0 || strcmp(name + nl - sl, ".lora_B.weight") == 0);
  ITR_CHECK(ok, ITR_ERR_INPUT,
            "%s: tensor '%s' is not a LoRA factor named 'base_model.model.<module>.lora_A.weight' (or lora_B); "
            "LoRA on embeddings, biases, DoRA vectors and '.default' infixes are not supported",
            file, name);
  size_t n = nl - pl - sl;
  ITR_CHECK(n < len && n <= LORA_PATH_MAX, ITR_ERR_INPUT, "%s: module path of '%s' is longer than %d characters",
            file, name, LORA_PATH_MAX);
  memcpy(path, name + pl, n);
  path[n] = '\0';
  ITR_CHECK(!strchr(path, '/'), ITR_ERR_INPUT, "%s: module path '%s' contains '/', which HDF5 reads as a group",
            file, path);
  *which = name[nl - sl + 6];
  return ITR_OK;
}

/* Pairs the factors by module path, checks shapes, ranks against the config and finite weights. */
static itr_err open_tensors(itr_lora_file *a, itr_peft_config *pc) {
  char file[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_join(file, sizeof file, a->dir, "adapter_model.safetensors"));
  ITR_TRY(itr_safetensors_open(file, &a->file));
  const int n = itr_safetensors_count(a->file);
  ITR_CHECK(n > 0, ITR_ERR_INPUT, "%s: holds no tensors", file);
  ITR_TRY(itr_calloc((size_t)n, sizeof *a->mods, "adapter modules", &a->mods));
  char path[LORA_PATH_MAX + 2];
  for (int i = 0; i < n; i++) {
    const itr_tensor_info *t = itr_safetensors_at(a->file, i);
    char which = 0;
    ITR_TRY(parse_name(file, t->name, path, sizeof path, &which));
    ITR_CHECK(t->ndim == 2, ITR_ERR_INPUT,
              "%s: tensor '%s' has %d dimensions; only linear modules (2-D LoRA factors) are supported "
              "(convolution LoRA is not)",
              file, t->name, t->ndim);
    itr_lora_pair *m = (itr_lora_pair *)itr_lora_file_find(a, path);
    if (!m) {
      m = &a->mods[a->n_mod];
      ITR_TRY(itr_calloc(strlen(path) + 1, 1, "module path", &m->path));
      memcpy(m->path, path, strlen(path));
      a->n_mod++;
    }
    ITR_CHECK(!(which == 'A' ? m->A : m->B), ITR_ERR_INPUT, "%s: tensor '%s' appears twice", file, t->name);
    if (which == 'A') m->A = t;
    else m->B = t;
  }
  for (int k = 0; k < a->n_mod; k++) {
    itr_lora_pair *m = &a->mods[k];
    ITR_CHECK(m->A && m->B, ITR_ERR_INPUT, "%s: module %s has lora_%c but no lora_%c", file, m->path,
              m->A ? 'A' : 'B', m->A ? 'B' : 'A');
    ITR_CHECK(m->A->shape[0] == m->B->shape[1], ITR_ERR_INPUT,
              "%s: module %s: lora_A has shape (%lld, %lld) but lora_B (%lld, %lld): the ranks differ", file,
              m->path, (long long)m->A->shape[0], (long long)m->A->shape[1], (long long)m->B->shape[0],
              (long long)m->B->shape[1]);
    ITR_TRY(itr_peft_config_path(pc, m->path, &m->r, &m->alpha));
    ITR_CHECK(m->A->shape[0] == (int64_t)m->r, ITR_ERR_INPUT,
              "%s: tensor '%s' has rank %lld but adapter_config.json says r = %d for %s (after rank_pattern); "
              "the scaling alpha/r would be wrong",
              file, m->A->name, (long long)m->A->shape[0], m->r, m->path);
    m->scaling = itr_peft_scaling(pc->use_rslora, m->r, m->alpha);
    ITR_CHECK(isfinite(m->scaling), ITR_ERR_INPUT, "%s: lora_alpha %g gives the scaling %g for %s", pc->file,
              m->alpha, m->scaling, m->path);
  }
  ITR_TRY(itr_peft_config_check_unused(pc));
  /* every weight finite: itr_tensor_read_f64 refuses NaN / infinity, naming the tensor and the element
   * (the factors are read again, as f64, where they are used) */
  for (int k = 0; k < a->n_mod; k++) {
    const itr_tensor_info *ts[2] = {a->mods[k].A, a->mods[k].B};
    for (int q = 0; q < 2; q++) {
      double *buf = NULL;
      ITR_TRY(itr_calloc((size_t)ts[q]->numel + 1, sizeof(double), "adapter factor", &buf));
      itr_err e = itr_tensor_read_f64(ts[q], buf);
      free(buf);
      ITR_TRY(e);
    }
  }
  return ITR_OK;
}

itr_err itr_lora_file_open(const char *dir, itr_lora_file **out) {
  itr_lora_file *a = NULL;
  itr_peft_config pc;
  memset(&pc, 0, sizeof pc);
  ITR_TRY(itr_calloc(1, sizeof *a, "adapter", &a));
  itr_err e = ITR_OK;
  char file[ITR_PATH_MAX];
  if (strlen(dir) >= sizeof a->dir) {
    e = itr_error_set(ITR_ERR_INPUT, "path too long: '%s'", dir);
    goto fail;
  }
  snprintf(a->dir, sizeof a->dir, "%s", dir);
  ITR_TRY_GOTO(itr_iofile_join(file, sizeof file, dir, "adapter_config.json"), e, fail);
  ITR_TRY_GOTO(itr_peft_config_read(file, 1, &pc), e, fail);
  snprintf(a->base_model, sizeof a->base_model, "%s", pc.base_model);
  snprintf(a->task_type, sizeof a->task_type, "%s", pc.task_type);
  ITR_TRY_GOTO(open_tensors(a, &pc), e, fail);
  itr_peft_config_fini(&pc);
  *out = a;
  return ITR_OK;
fail:
  itr_peft_config_fini(&pc);
  itr_lora_file_destroy(a);
  return e;
}

/* ---- writer ------------------------------------------------------------------------------------ */

typedef struct {
  char *path;
  int64_t d_out, d_in;
  int r;
  double *A, *B; /* (r, d_in), (d_out, r) f64 copies */
} writer_pair;

struct itr_lora_writer {
  char base_model[512], task_type[64];
  itr_dtype dtype;
  int n, cap;
  writer_pair *mods;
};

itr_err itr_lora_writer_create(const char *base_model, const char *task_type, itr_dtype dtype,
                               itr_lora_writer **out) {
  ITR_CHECK(dtype == ITR_F32 || dtype == ITR_BF16 || dtype == ITR_F16 || dtype == ITR_F64, ITR_ERR_INPUT,
            "adapter writer: dtype %s is not supported (F32, BF16, F16 or F64)", itr_dtype_name(dtype));
  itr_lora_writer *w = NULL;
  ITR_TRY(itr_calloc(1, sizeof *w, "adapter writer", &w));
  snprintf(w->base_model, sizeof w->base_model, "%s", base_model ? base_model : "");
  snprintf(w->task_type, sizeof w->task_type, "%s", task_type ? task_type : "");
  w->dtype = dtype;
  *out = w;
  return ITR_OK;
}

void itr_lora_writer_destroy(itr_lora_writer *w) {
  if (!w) return;
  for (int k = 0; k < w->n; k++) {
    free(w->mods[k].path);
    free(w->mods[k].A);
    free(w->mods[k].B);
  }
  free(w->mods);
  free(w);
}

itr_err itr_lora_writer_add_f64(itr_lora_writer *w, const char *path, int64_t d_out, int64_t d_in, int r,
                                const double *A, const double *B) {
  ITR_CHECK(r >= 0 && d_out >= 1 && d_in >= 1 && strlen(path) <= LORA_PATH_MAX, ITR_ERR_INPUT,
            "adapter writer: module '%s' has rank %d and shape (%lld, %lld)", path, r, (long long)d_out,
            (long long)d_in);
  if (w->n == w->cap) {
    int cap = w->cap ? 2 * w->cap : 16;
    writer_pair *m = realloc(w->mods, (size_t)cap * sizeof *m);
    ITR_CHECK(m, ITR_ERR_INTERNAL, "adapter writer: out of memory for %d modules", cap);
    w->mods = m, w->cap = cap;
  }
  writer_pair *m = &w->mods[w->n];
  memset(m, 0, sizeof *m);
  m->d_out = d_out, m->d_in = d_in, m->r = r;
  itr_err e = itr_calloc(strlen(path) + 1, 1, "module path", &m->path);
  if (e == ITR_OK) e = itr_calloc((size_t)(r * d_in) + 1, sizeof(double), "lora_A", &m->A);
  if (e == ITR_OK) e = itr_calloc((size_t)(d_out * r) + 1, sizeof(double), "lora_B", &m->B);
  if (e != ITR_OK) {
    free(m->path);
    free(m->A);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  memcpy(m->path, path, strlen(path));
  if (r) memcpy(m->A, A, (size_t)(r * d_in) * sizeof(double));
  if (r) memcpy(m->B, B, (size_t)(d_out * r) * sizeof(double));
  w->n++;
  return ITR_OK;
}

/* Adds factor data (rows, cols) of rank rmax, zero-padded from rank r (A: rows r -> rmax; B:
 * columns r -> rmax), in dtype dt, checking that it stays finite there. */
static itr_err add_factor(itr_st_writer *st, const char *name, itr_dtype dt, const writer_pair *m, int64_t rmax,
                          int is_a, double **keep) {
  const int64_t rows = is_a ? rmax : m->d_out, cols = is_a ? m->d_in : rmax;
  const size_t n = (size_t)rows * (size_t)cols;
  double *p = NULL;
  ITR_TRY(itr_calloc(n ? n : 1, sizeof(double), "padded factor", &p));
  if (is_a) memcpy(p, m->A, (size_t)(m->r * m->d_in) * sizeof(double));
  else
    for (int64_t i = 0; i < m->d_out; i++) memcpy(p + i * rmax, m->B + i * m->r, (size_t)m->r * sizeof(double));
  itr_err e = ITR_OK;
  for (size_t k = 0; k < n && e == ITR_OK; k++) {
    if (!isfinite(p[k]) || (dt != ITR_F64 && !isfinite((float)p[k])))
      e = itr_error_set(ITR_ERR_NUMERIC, "tensor '%s': element %zu = %g is not finite in %s; the merge produced a "
                        "non-finite value", name, k, p[k], itr_dtype_name(dt));
    else if (dt == ITR_F16 && fabs(p[k]) > 65504.0)
      e = itr_error_set(ITR_ERR_NUMERIC, "tensor '%s': element %zu = %g does not fit in F16 (largest 65504); write "
                        "BF16 or F32", name, k, p[k]);
  }
  const int64_t shape[2] = {rows, cols};
  if (e == ITR_OK && dt == ITR_F64) {
    *keep = p; /* added by reference: freed by write_tensors after the write */
    return itr_st_writer_add(st, name, dt, 2, shape, p);
  } else if (e == ITR_OK) {
    float *f = (float *)p; /* narrowed in place, front to back */
    for (size_t k = 0; k < n; k++) f[k] = (float)p[k];
    e = itr_st_writer_add_f32(st, name, dt, 2, shape, f);
  }
  free(p);
  return e;
}

static itr_err write_config(const itr_lora_writer *w, const char *file, int64_t rmax) {
  cJSON *root = cJSON_CreateObject();
  ITR_CHECK(root, ITR_ERR_INTERNAL, "out of memory building %s", file);
  cJSON_AddStringToObject(root, "peft_type", "LORA");
  cJSON_AddStringToObject(root, "base_model_name_or_path", w->base_model);
  if (w->task_type[0]) cJSON_AddStringToObject(root, "task_type", w->task_type);
  cJSON_AddNumberToObject(root, "r", (double)rmax);
  cJSON_AddNumberToObject(root, "lora_alpha", (double)rmax);
  cJSON_AddNumberToObject(root, "lora_dropout", 0.0);
  cJSON_AddStringToObject(root, "bias", "none");
  cJSON_AddBoolToObject(root, "use_rslora", 0);
  cJSON_AddBoolToObject(root, "use_dora", 0);
  cJSON_AddBoolToObject(root, "fan_in_fan_out", 0);
  cJSON_AddBoolToObject(root, "inference_mode", 1);
  cJSON *tm = cJSON_AddArrayToObject(root, "target_modules");
  for (int q = 0; q < w->n; q++) cJSON_AddItemToArray(tm, cJSON_CreateString(w->mods[q].path));
  char *text = cJSON_Print(root);
  cJSON_Delete(root);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory writing %s", file);
  itr_err e = itr_iofile_write_atomic(file, text, strlen(text));
  free(text);
  return e;
}

/* The safetensors file; F64 factors are added by reference: keep[] holds them until it is written. */
static itr_err write_tensors(const itr_lora_writer *w, const char *file, int64_t rmax) {
  itr_st_writer *st = NULL;
  double **keep = NULL;
  ITR_TRY(itr_calloc((size_t)w->n * 2, sizeof *keep, "factor list", &keep));
  itr_err e = itr_st_writer_create(&st);
  for (int q = 0; q < w->n && e == ITR_OK; q++) {
    char na[LORA_PATH_MAX + 64], nb[LORA_PATH_MAX + 64];
    snprintf(na, sizeof na, LORA_PREFIX "%s.lora_A.weight", w->mods[q].path);
    snprintf(nb, sizeof nb, LORA_PREFIX "%s.lora_B.weight", w->mods[q].path);
    e = add_factor(st, na, w->dtype, &w->mods[q], rmax, 1, &keep[2 * q]);
    if (e == ITR_OK) e = add_factor(st, nb, w->dtype, &w->mods[q], rmax, 0, &keep[2 * q + 1]);
  }
  if (e == ITR_OK) e = itr_st_writer_set_metadata(st, "format", "pt");
  if (e == ITR_OK) e = itr_st_writer_write(st, file);
  itr_st_writer_destroy(st);
  for (int k = 0; k < 2 * w->n; k++) free(keep[k]);
  free(keep);
  return e;
}

itr_err itr_lora_writer_write(const itr_lora_writer *w, const char *dir) {
  ITR_CHECK(w->n > 0, ITR_ERR_INPUT, "adapter writer: no module was added; refusing to write an empty adapter to %s",
            dir);
  int64_t rmax = 1;
  for (int q = 0; q < w->n; q++)
    if (w->mods[q].r > rmax) rmax = w->mods[q].r;
  char cfg_file[ITR_PATH_MAX], st_file[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_join(cfg_file, sizeof cfg_file, dir, "adapter_config.json"));
  ITR_TRY(itr_iofile_join(st_file, sizeof st_file, dir, "adapter_model.safetensors"));
  ITR_TRY(itr_iofile_mkdirs(dir));
  ITR_TRY(write_tensors(w, st_file, rmax));
  ITR_TRY(write_config(w, cfg_file, rmax));
  return ITR_OK;
}
