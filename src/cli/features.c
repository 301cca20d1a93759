/* -features FILE.h5: merge from external features (docs/FEATURES.md), for architectures the built-in
 * forward does not cover (T5, BLIP, diffusion UNets, ...). The user supplies, per task and per module,
 * either the input rows X_i and Xt_i or their reduced statistics (X^T X, Xt^T Xt, X^T Xt); this mode
 * makes one solve per module. Adapters are read generically: any PEFT LoRA whose factors are named
 * "base_model.model.<module>.lora_{A,B}.weight" with 2-D factors (linear modules), whatever the
 * architecture; the module path "<module>" keys the HDF5 groups and the output tensors.
 *
 * Collective on comm: rank 0 does all the work (read, assemble, LAPACK solve, write OUT.partial/ and
 * rename it to OUT); the other ranks wait at the agreement point and return the same error. */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "iteris/dist.h"
#include "iteris/io.h"
#include "iteris/merge.h"

#define FEAT_PREFIX "base_model.model."
#define FEAT_MODULE_MAX 400 /* characters of a module path: "task_<i>/<module>/gram_x" fits itr_h5's 512 */
#define FEAT_CONFIG_CAP (1 << 20)

enum { FEAT_ITERIS, FEAT_REGMEAN, FEAT_TA };

/* ---- generic PEFT LoRA adapters --------------------------------------------------------------- */

typedef struct {
  char *key;
  double value;
  int used;
} feat_pattern;

typedef struct {
  char *path;                /* module path, e.g. "encoder.block.0.layer.0.SelfAttention.q" */
  const itr_tensor_info *A;  /* (r, d_in) */
  const itr_tensor_info *B;  /* (d_out, r) */
  int r;
  double scaling;            /* alpha / r or alpha / sqrt(r) */
} feat_lora;

typedef struct {
  const char *dir;
  char config[ITR_PATH_MAX + 32];
  itr_safetensors *file;
  int r, use_rslora;
  double lora_alpha;
  char base_model[512];
  char task_type[64];
  int n_rank, n_alpha;
  feat_pattern *rank_pattern, *alpha_pattern;
  int n_mod;
  feat_lora *mods;
} feat_adapter;

static void feat_adapter_destroy(feat_adapter *a) {
  if (!a) return;
  for (int k = 0; k < a->n_rank; k++) free(a->rank_pattern[k].key);
  for (int k = 0; k < a->n_alpha; k++) free(a->alpha_pattern[k].key);
  free(a->rank_pattern);
  free(a->alpha_pattern);
  for (int k = 0; k < a->n_mod; k++) free(a->mods[k].path);
  free(a->mods);
  itr_safetensors_destroy(a->file);
  free(a);
}

static itr_err read_text(const char *path, char **out) {
  FILE *f = fopen(path, "rb");
  ITR_CHECK(f, ITR_ERR_INPUT, "cannot read '%s': %s (is this a PEFT adapter folder?)", path, strerror(errno));
  char *buf = NULL;
  itr_err e = itr_calloc(FEAT_CONFIG_CAP + 1, 1, "adapter_config.json", &buf);
  size_t n = e == ITR_OK ? fread(buf, 1, FEAT_CONFIG_CAP + 1, f) : 0;
  fclose(f);
  ITR_TRY(e);
  if (n > FEAT_CONFIG_CAP) {
    free(buf);
    return itr_error_set(ITR_ERR_INPUT, "'%s' is larger than %d bytes: not an adapter_config.json", path,
                         FEAT_CONFIG_CAP);
  }
  buf[n] = '\0';
  *out = buf;
  return ITR_OK;
}

static int has_regex_chars(const char *s) { return strpbrk(s, "^$*+?()[]{}|\\") != NULL; }

static itr_err read_patterns(const cJSON *root, const char *key, int integer, const char *file, feat_pattern **out,
                             int *n_out) {
  const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!o || cJSON_IsNull(o)) return ITR_OK;
  ITR_CHECK(cJSON_IsObject(o), ITR_ERR_INPUT, "%s: '%s' must be an object {module: value}", file, key);
  int n = cJSON_GetArraySize(o);
  if (n == 0) return ITR_OK;
  feat_pattern *p = NULL;
  ITR_TRY(itr_calloc((size_t)n, sizeof *p, key, &p));
  *out = p; /* owned by the adapter from here, even when partly filled */
  *n_out = n;
  int i = 0;
  for (const cJSON *v = o->child; v; v = v->next, i++) {
    ITR_CHECK(!has_regex_chars(v->string), ITR_ERR_INPUT,
              "%s: %s key '%s' is a regular expression; keys are matched literally, as a module path or its "
              "dotted suffix",
              file, key, v->string);
    ITR_CHECK(cJSON_IsNumber(v) && isfinite(v->valuedouble) &&
                  (!integer || (v->valuedouble >= 1 && v->valuedouble <= 65536 && v->valuedouble == floor(v->valuedouble))),
              ITR_ERR_INPUT, "%s: %s['%s'] must be %s", file, key, v->string,
              integer ? "an integer rank >= 1" : "a finite number");
    ITR_TRY(itr_calloc(strlen(v->string) + 1, 1, key, &p[i].key));
    memcpy(p[i].key, v->string, strlen(v->string));
    p[i].value = v->valuedouble;
  }
  return ITR_OK;
}

static int json_true(const cJSON *root, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  return v && cJSON_IsTrue(v);
}

static itr_err parse_config(feat_adapter *a, const cJSON *root) {
  const char *file = a->config;
  ITR_CHECK(cJSON_IsObject(root), ITR_ERR_INPUT, "%s: not a JSON object", file);
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
  ITR_CHECK(!v || (cJSON_IsString(v) && strcmp(v->valuestring, "LORA") == 0), ITR_ERR_INPUT,
            "%s: peft_type is not \"LORA\": only LoRA adapters can be merged", file);
  ITR_CHECK(!json_true(root, "use_dora"), ITR_ERR_INPUT,
            "%s: DoRA adapters (use_dora true) are not low-rank updates and cannot be merged exactly", file);
  ITR_CHECK(!json_true(root, "fan_in_fan_out"), ITR_ERR_INPUT,
            "%s: fan_in_fan_out true (transposed Conv1D weights) is not supported", file);
  ITR_CHECK(!json_true(root, "lora_bias"), ITR_ERR_INPUT, "%s: lora_bias true cannot be carried by a LoRA merge",
            file);
  v = cJSON_GetObjectItemCaseSensitive(root, "bias");
  ITR_CHECK(!v || cJSON_IsNull(v) || (cJSON_IsString(v) && strcmp(v->valuestring, "none") == 0), ITR_ERR_INPUT,
            "%s: bias must be \"none\": trained biases cannot be carried by a LoRA merge", file);
  v = cJSON_GetObjectItemCaseSensitive(root, "modules_to_save");
  ITR_CHECK(!v || cJSON_IsNull(v) || (cJSON_IsArray(v) && !v->child), ITR_ERR_INPUT,
            "%s: modules_to_save is set: fully fine-tuned modules cannot be merged as low-rank updates", file);
  v = cJSON_GetObjectItemCaseSensitive(root, "r");
  a->r = 8;
  if (v && !cJSON_IsNull(v)) {
    ITR_CHECK(cJSON_IsNumber(v) && v->valuedouble >= 1 && v->valuedouble <= 65536 &&
                  v->valuedouble == floor(v->valuedouble),
              ITR_ERR_INPUT, "%s: 'r' must be an integer >= 1", file);
    a->r = (int)v->valuedouble;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha");
  a->lora_alpha = 8.0;
  if (v && !cJSON_IsNull(v)) {
    ITR_CHECK(cJSON_IsNumber(v) && isfinite(v->valuedouble), ITR_ERR_INPUT, "%s: 'lora_alpha' must be a number",
              file);
    a->lora_alpha = v->valuedouble;
  }
  a->use_rslora = json_true(root, "use_rslora");
  v = cJSON_GetObjectItemCaseSensitive(root, "base_model_name_or_path");
  if (v && cJSON_IsString(v)) snprintf(a->base_model, sizeof a->base_model, "%s", v->valuestring);
  v = cJSON_GetObjectItemCaseSensitive(root, "task_type");
  if (v && cJSON_IsString(v)) snprintf(a->task_type, sizeof a->task_type, "%s", v->valuestring);
  ITR_TRY(read_patterns(root, "rank_pattern", 1, file, &a->rank_pattern, &a->n_rank));
  ITR_TRY(read_patterns(root, "alpha_pattern", 0, file, &a->alpha_pattern, &a->n_alpha));
  return ITR_OK;
}

/* PEFT's rule: a key matches a module path equal to it or ending with "." + key. */
static int key_matches(const char *path, const char *key) {
  size_t pl = strlen(path), kl = strlen(key);
  if (kl > pl || strcmp(path + pl - kl, key) != 0) return 0;
  return kl == pl || path[pl - kl - 1] == '.';
}

static itr_err resolve(feat_pattern *p, int n, const char *path, const char *what, const char *file, double def,
                       double *value) {
  int k0 = -1;
  for (int k = 0; k < n; k++) {
    if (!key_matches(path, p[k].key)) continue;
    p[k].used = 1;
    if (k0 < 0) k0 = k;
    ITR_CHECK(p[k].value == p[k0].value, ITR_ERR_INPUT,
              "%s: %s keys '%s' and '%s' both match %s with different values (%g and %g)", file, what, p[k0].key,
              p[k].key, path, p[k0].value, p[k].value);
  }
  *value = k0 >= 0 ? p[k0].value : def;
  return ITR_OK;
}

static feat_lora *find_module(feat_adapter *a, const char *path) {
  for (int k = 0; k < a->n_mod; k++)
    if (strcmp(a->mods[k].path, path) == 0) return &a->mods[k];
  return NULL;
}

/* Splits "base_model.model.<path>.lora_A.weight" into path and 'A' / 'B'. */
static itr_err parse_name(const char *file, const char *name, char *path, size_t len, char *which) {
  const size_t pl = strlen(FEAT_PREFIX), nl = strlen(name), sl = strlen(".lora_A.weight");
  int ok = nl > pl + sl && strncmp(name, FEAT_PREFIX, pl) == 0 &&
           (strcmp(name + nl - sl, ".lora_A.weight") == 0 || strcmp(name + nl - sl, ".lora_B.weight") == 0);
  ITR_CHECK(ok, ITR_ERR_INPUT,
            "%s: tensor '%s' is not a LoRA factor named 'base_model.model.<module>.lora_A.weight' (or lora_B); "
            "LoRA on embeddings, biases, DoRA vectors and '.default' infixes are not supported",
            file, name);
  size_t n = nl - pl - sl;
  ITR_CHECK(n < len && n <= FEAT_MODULE_MAX, ITR_ERR_INPUT, "%s: module path of '%s' is longer than %d characters",
            file, name, FEAT_MODULE_MAX);
  memcpy(path, name + pl, n);
  path[n] = '\0';
  ITR_CHECK(!strchr(path, '/'), ITR_ERR_INPUT, "%s: module path '%s' contains '/', which HDF5 reads as a group",
            file, path);
  *which = name[nl - sl + 6];
  return ITR_OK;
}

static itr_err open_tensors(feat_adapter *a) {
  char file[ITR_PATH_MAX + 32];
  snprintf(file, sizeof file, "%s/adapter_model.safetensors", a->dir);
  ITR_TRY(itr_safetensors_open(file, &a->file));
  int n = itr_safetensors_count(a->file);
  ITR_CHECK(n > 0, ITR_ERR_INPUT, "%s: holds no tensors", file);
  ITR_TRY(itr_calloc((size_t)n, sizeof *a->mods, "adapter modules", &a->mods));
  char path[FEAT_MODULE_MAX + 2];
  for (int i = 0; i < n; i++) {
    const itr_tensor_info *t = itr_safetensors_at(a->file, i);
    char which = 0;
    ITR_TRY(parse_name(file, t->name, path, sizeof path, &which));
    ITR_CHECK(t->ndim == 2, ITR_ERR_INPUT,
              "%s: tensor '%s' has %d dimensions; only linear modules (2-D LoRA factors) are supported "
              "(convolution LoRA is not)",
              file, t->name, t->ndim);
    feat_lora *m = find_module(a, path);
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
    feat_lora *m = &a->mods[k];
    ITR_CHECK(m->A && m->B, ITR_ERR_INPUT, "%s: module %s has lora_%c but no lora_%c", file, m->path,
              m->A ? 'A' : 'B', m->A ? 'B' : 'A');
    ITR_CHECK(m->A->shape[0] == m->B->shape[1], ITR_ERR_INPUT,
              "%s: module %s: lora_A has shape (%lld, %lld) but lora_B (%lld, %lld): the ranks differ", file,
              m->path, (long long)m->A->shape[0], (long long)m->A->shape[1], (long long)m->B->shape[0],
              (long long)m->B->shape[1]);
    double r, alpha;
    ITR_TRY(resolve(a->rank_pattern, a->n_rank, m->path, "rank_pattern", a->config, a->r, &r));
    ITR_TRY(resolve(a->alpha_pattern, a->n_alpha, m->path, "alpha_pattern", a->config, a->lora_alpha, &alpha));
    ITR_CHECK(m->A->shape[0] == (int64_t)r, ITR_ERR_INPUT,
              "%s: tensor '%s' has rank %lld but adapter_config.json says r = %d for %s (after rank_pattern); "
              "the scaling alpha/r would be wrong",
              file, m->A->name, (long long)m->A->shape[0], (int)r, m->path);
    m->r = (int)r;
    m->scaling = a->use_rslora ? alpha / sqrt(r) : alpha / r;
  }
  for (int pass = 0; pass < 2; pass++) {
    const feat_pattern *p = pass ? a->alpha_pattern : a->rank_pattern;
    for (int k = 0; k < (pass ? a->n_alpha : a->n_rank); k++)
      ITR_CHECK(p[k].used, ITR_ERR_INPUT, "%s: %s key '%s' matches no module of this adapter", a->config,
                pass ? "alpha_pattern" : "rank_pattern", p[k].key);
  }
  return ITR_OK;
}

static itr_err feat_adapter_open(const char *dir, feat_adapter **out) {
  feat_adapter *a = NULL;
  ITR_TRY(itr_calloc(1, sizeof *a, "adapter", &a));
  a->dir = dir;
  snprintf(a->config, sizeof a->config, "%s/adapter_config.json", dir);
  char *text = NULL;
  itr_err e;
  ITR_TRY_GOTO(read_text(a->config, &text), e, fail);
  cJSON *root = cJSON_Parse(text);
  free(text);
  if (!root) {
    e = itr_error_set(ITR_ERR_INPUT, "%s: not valid JSON", a->config);
    goto fail;
  }
  e = parse_config(a, root);
  cJSON_Delete(root);
  if (e != ITR_OK) goto fail;
  ITR_TRY_GOTO(open_tensors(a), e, fail);
  *out = a;
  return ITR_OK;
fail:
  feat_adapter_destroy(a);
  return e;
}

/* ---- the merge ------------------------------------------------------------------------------ */

typedef struct {
  const char *path;      /* owned by an adapter */
  int64_t d_out, d_in;
  itr_update upd;        /* the merged update (factored) */
  double residual;       /* scaled residual of the solve (0: no solve) */
  double coef[ITR_MAX_TASKS];
} feat_module;

typedef struct {
  const itr_merge_opts *opt;
  int method, N;
  feat_adapter *ad[ITR_MAX_TASKS];
  int n_mod;
  feat_module *mods;
  itr_h5 *h5;
  double energy_kept_min;
} feat_ctx;

static itr_err collect_modules(feat_ctx *c) {
  int total = 0;
  for (int i = 0; i < c->N; i++) total += c->ad[i]->n_mod;
  ITR_TRY(itr_calloc((size_t)total, sizeof *c->mods, "module table", &c->mods));
  for (int i = 0; i < c->N; i++)
    for (int k = 0; k < c->ad[i]->n_mod; k++) {
      const feat_lora *l = &c->ad[i]->mods[k];
      const int64_t d_out = l->B->shape[0], d_in = l->A->shape[1];
      feat_module *m = NULL;
      for (int q = 0; q < c->n_mod && !m; q++)
        if (strcmp(c->mods[q].path, l->path) == 0) m = &c->mods[q];
      if (!m) {
        m = &c->mods[c->n_mod++];
        m->path = l->path, m->d_out = d_out, m->d_in = d_in;
        continue;
      }
      ITR_CHECK(m->d_out == d_out && m->d_in == d_in, ITR_ERR_INPUT,
                "adapter '%s': module %s has shape (%lld, %lld) (from lora_B and lora_A) but another adapter's "
                "has (%lld, %lld). Were the adapters trained on the same base model?",
                c->ad[i]->dir, l->path, (long long)d_out, (long long)d_in, (long long)m->d_out, (long long)m->d_in);
    }
  return ITR_OK;
}

/* Task i's factors for module m as f64 (absent: r = 0). */
static itr_err task_factors(feat_ctx *c, int i, const feat_module *m, itr_merge_task *t, double **A, double **B) {
  memset(t, 0, sizeof *t);
  t->weight = c->method == FEAT_REGMEAN ? 1.0 : (c->opt->n_manual_coef ? c->opt->manual_coef[i] : 1.0);
  const feat_lora *l = find_module(c->ad[i], m->path);
  if (!l) return ITR_OK;
  ITR_TRY(itr_calloc((size_t)l->A->numel, sizeof(double), "lora_A f64", A));
  ITR_TRY(itr_calloc((size_t)l->B->numel, sizeof(double), "lora_B f64", B));
  ITR_TRY(itr_tensor_read_f64(l->A, *A));
  ITR_TRY(itr_tensor_read_f64(l->B, *B));
  t->r = l->r, t->scale = l->scaling, t->A = *A, t->B = *B;
  return ITR_OK;
}

/* Reads dataset name (ndim dims) as f64 into a new buffer, rejecting NaN / infinity. */
static itr_err read_dataset(feat_ctx *c, const char *name, int ndim, const int64_t *dims, double **out) {
  size_t n = 1;
  for (int k = 0; k < ndim; k++) ITR_CHECK(itr_mul_size(n, (size_t)dims[k], &n), ITR_ERR_INPUT, "'%s': dataset '%s' is too large", c->opt->features, name);
  double *buf = NULL;
  ITR_TRY(itr_calloc(n ? n : 1, sizeof(double), name, &buf));
  itr_err e = itr_h5_read_f64(c->h5, name, ndim, dims, buf);
  for (size_t k = 0; k < n && e == ITR_OK; k++)
    if (!isfinite(buf[k]))
      e = itr_error_set(ITR_ERR_INPUT, "'%s': dataset '%s' holds %g at element %zu (row %lld); features must be finite",
                        c->opt->features, name, buf[k], k, (long long)(ndim == 2 ? (int64_t)k / dims[1] : 0));
  if (e != ITR_OK) {
    free(buf);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  *out = buf;
  return ITR_OK;
}

/* Dataset name must exist and be 2-D (d0, d1); d0 < 0: any number n >= 1 of rows, returned in rows. */
static itr_err check_2d(feat_ctx *c, const char *name, int64_t d0, int64_t d1, const char *what, int64_t *rows) {
  ITR_CHECK(itr_h5_has(c->h5, name), ITR_ERR_INPUT, "'%s' has no dataset '%s' (%s); see docs/FEATURES.md",
            c->opt->features, name, what);
  int nd;
  int64_t dims[ITR_MAX_DIMS];
  ITR_TRY(itr_h5_shape(c->h5, name, &nd, dims));
  char got[96] = "(", want[64];
  for (int k = 0; k < nd && k < 4; k++)
    snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", k ? ", " : "", (long long)dims[k]);
  snprintf(got + strlen(got), sizeof got - strlen(got), "%s)", nd > 4 ? ", ..." : "");
  if (d0 < 0) snprintf(want, sizeof want, "(n, %lld) with n >= 1", (long long)d1);
  else snprintf(want, sizeof want, "(%lld, %lld)", (long long)d0, (long long)d1);
  ITR_CHECK(nd == 2 && (d0 < 0 ? dims[0] >= 1 : dims[0] == d0) && dims[1] == d1, ITR_ERR_INPUT,
            "'%s': dataset '%s' has shape %s but %s must be %s for this module (d_out, d_in from the adapters' "
            "lora_B and lora_A)",
            c->opt->features, name, got, what, want);
  if (rows) *rows = dims[0];
  return ITR_OK;
}

/* gram (d, d) must be symmetric up to rounding; it is symmetrised exactly. */
static itr_err symmetrise(feat_ctx *c, const char *name, int64_t d, double *g) {
  double asym = 0, nrm = 0;
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = 0; j < d; j++) {
      double x = g[i * d + j] - g[j * d + i];
      asym += x * x;
      nrm += g[i * d + j] * g[i * d + j];
    }
  ITR_CHECK(asym <= 1e-10 * nrm, ITR_ERR_INPUT,
            "'%s': dataset '%s' is not symmetric (||G - G^T||_F / ||G||_F = %.3g): a Gram X^T X is. Is it the "
            "cross term X^T Xt?",
            c->opt->features, name, sqrt(asym / (nrm > 0 ? nrm : 1)));
  for (int64_t i = 0; i < d; i++)
    for (int64_t j = i + 1; j < d; j++) g[i * d + j] = g[j * d + i] = 0.5 * (g[i * d + j] + g[j * d + i]);
  return ITR_OK;
}

/* Statistics of task i at module m: from rows X (and Xt) or from the reduced statistics. need_t: Xt
 * is needed (IterIS); otherwise Xt = X (RegMean reads X^T X only). */
static itr_err load_stats(feat_ctx *c, int i, const feat_module *m, int need_t, itr_stats *out) {
  const char *file = c->opt->features;
  const int64_t d = m->d_in;
  char g[FEAT_MODULE_MAX + 32], nx[FEAT_MODULE_MAX + 48], nt[FEAT_MODULE_MAX + 48], nc[FEAT_MODULE_MAX + 48];
  snprintf(g, sizeof g, "task_%d/%s", i, m->path);
  snprintf(nx, sizeof nx, "%s/X", g);
  char ngx[FEAT_MODULE_MAX + 48];
  snprintf(ngx, sizeof ngx, "%s/gram_x", g);
  const int rows = itr_h5_has(c->h5, nx), stats = itr_h5_has(c->h5, ngx);
  ITR_CHECK(rows || stats, ITR_ERR_INPUT,
            "'%s' has no dataset '%s' nor '%s': task %d (adapter '%s') needs the inputs of module %s (rows X, or "
            "the statistic gram_x); see docs/FEATURES.md",
            file, nx, ngx, i, c->opt->adapters[i], m->path);
  ITR_CHECK(!(rows && stats), ITR_ERR_INPUT,
            "'%s': group '%s' holds both rows X and statistics gram_x: give one of the two", file, g);
  itr_stats st = {0};
  double *X = NULL, *Xt = NULL;
  itr_err e;
  ITR_TRY(itr_stats_init(&st, d, ITR_STATS_FULL_CROSS));
  if (need_t) ITR_TRY_GOTO(itr_stats_reset_xt(&st), e, fail);
  if (rows) {
    int64_t n = 0, nn = 0;
    snprintf(nt, sizeof nt, "%s/Xt", g);
    ITR_TRY_GOTO(check_2d(c, nx, -1, d, "X", &n), e, fail);
    if (need_t) {
      if (!itr_h5_has(c->h5, nt)) {
        e = itr_error_set(ITR_ERR_INPUT,
                          "'%s' has no dataset '%s': -method iteris needs Xt (the merged model's inputs to %s, rows "
                          "in the same order as X) next to X; see docs/FEATURES.md",
                          file, nt, m->path);
        goto fail;
      }
      ITR_TRY_GOTO(check_2d(c, nt, -1, d, "Xt", &nn), e, fail);
      if (nn != n) {
        e = itr_error_set(ITR_ERR_INPUT,
                          "'%s': dataset '%s' has %lld rows but '%s' has %lld: Xt must hold the same tokens, in the "
                          "same order, as X",
                          file, nt, (long long)nn, nx, (long long)n);
        goto fail;
      }
    }
    int64_t dims[2] = {n, d};
    ITR_TRY_GOTO(read_dataset(c, nx, 2, dims, &X), e, fail);
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)n, 1.0, X, (int)d, 0.0, st.gram_x, (int)d);
    st.n_x = n;
    if (need_t) {
      ITR_TRY_GOTO(read_dataset(c, nt, 2, dims, &Xt), e, fail);
      cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)n, 1.0, Xt, (int)d, 0.0, st.gram_t, (int)d);
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)n, 1.0, X, (int)d, Xt, (int)d, 0.0,
                  st.cross, (int)d);
      st.n_t = n;
    }
    itr_stats_finalize(&st); /* mirror the upper triangles */
  } else {
    int64_t dd[2] = {d, d};
    double *buf = NULL;
    ITR_TRY_GOTO(check_2d(c, ngx, d, d, "gram_x", NULL), e, fail);
    ITR_TRY_GOTO(read_dataset(c, ngx, 2, dd, &buf), e, fail);
    memcpy(st.gram_x, buf, (size_t)(d * d) * sizeof(double));
    free(buf);
    ITR_TRY_GOTO(symmetrise(c, ngx, d, st.gram_x), e, fail);
    if (need_t) {
      snprintf(nt, sizeof nt, "%s/gram_t", g);
      snprintf(nc, sizeof nc, "%s/cross", g);
      ITR_TRY_GOTO(check_2d(c, nt, d, d, "gram_t", NULL), e, fail);
      ITR_TRY_GOTO(check_2d(c, nc, d, d, "cross", NULL), e, fail);
      ITR_TRY_GOTO(read_dataset(c, nt, 2, dd, &buf), e, fail);
      memcpy(st.gram_t, buf, (size_t)(d * d) * sizeof(double));
      free(buf);
      ITR_TRY_GOTO(symmetrise(c, nt, d, st.gram_t), e, fail);
      ITR_TRY_GOTO(read_dataset(c, nc, 2, dd, &buf), e, fail);
      memcpy(st.cross, buf, (size_t)(d * d) * sizeof(double));
      free(buf);
    }
    /* n_rows: optional, informational */
    char nr[FEAT_MODULE_MAX + 48];
    snprintf(nr, sizeof nr, "%s/n_rows", g);
    if (itr_h5_has(c->h5, nr)) {
      int nd;
      int64_t dims[ITR_MAX_DIMS];
      ITR_TRY_GOTO(itr_h5_shape(c->h5, nr, &nd, dims), e, fail);
      double v = 0;
      int64_t one = 1;
      if (!(nd == 0 || (nd == 1 && dims[0] == 1))) {
        e = itr_error_set(ITR_ERR_INPUT,
                          "'%s': dataset '%s' must be a scalar (the number of rows the statistics sum over)", file, nr);
        goto fail;
      }
      ITR_TRY_GOTO(itr_h5_read_f64(c->h5, nr, nd, &one, &v), e, fail);
      if (!(v >= 1 && v == floor(v) && v < 9e15)) {
        e = itr_error_set(ITR_ERR_INPUT, "'%s': dataset '%s' is %g; expected an integer >= 1", file, nr, v);
        goto fail;
      }
      st.n_x = (int64_t)v;
      if (need_t) st.n_t = (int64_t)v;
    }
  }
  free(X);
  free(Xt);
  *out = st;
  return ITR_OK;
fail:
  free(X);
  free(Xt);
  itr_stats_fini(&st);
  return e;
}

/* One module: assemble task by task (one task's statistics in memory at a time), solve locally. */
static itr_err merge_module(feat_ctx *c, feat_module *m) {
  const itr_merge_opts *o = c->opt;
  const int N = c->N;
  itr_merge_task tasks[ITR_MAX_TASKS];
  double *A[ITR_MAX_TASKS] = {0}, *B[ITR_MAX_TASKS] = {0}, *W0 = NULL;
  itr_system sys = {0};
  int64_t R = 0;
  itr_err e = ITR_OK;
  for (int i = 0; i < N && e == ITR_OK; i++) {
    e = task_factors(c, i, m, &tasks[i], &A[i], &B[i]);
    R += tasks[i].r;
  }
  if (e != ITR_OK) goto done;
  if (c->method == FEAT_TA) {
    e = itr_baseline_task_arithmetic(N, tasks, m->d_out, m->d_in, o->ta_lambda, &m->upd);
    goto done;
  }
  if (c->method == FEAT_ITERIS) {
    char name[FEAT_MODULE_MAX + 16];
    snprintf(name, sizeof name, "base/%s", m->path);
    int64_t dims[2] = {m->d_out, m->d_in};
    if (!itr_h5_has(c->h5, name)) {
      e = itr_error_set(ITR_ERR_INPUT,
                        "'%s' has no dataset '%s': -method iteris needs the base weight W0 (%lld, %lld) of every "
                        "module for the adaptive weights c_i; see docs/FEATURES.md",
                        o->features, name, (long long)m->d_out, (long long)m->d_in);
      goto done;
    }
    ITR_TRY_GOTO(check_2d(c, name, m->d_out, m->d_in, "W0", NULL), e, done);
    ITR_TRY_GOTO(read_dataset(c, name, 2, dims, &W0), e, done);
  }
  ITR_TRY_GOTO(itr_system_create(m->d_in, R, 0, N, o->alpha_2, m->path, &sys), e, done);
  itr_iteris_opts io;
  itr_iteris_opts_default(&io);
  io.alpha_1 = o->alpha_1, io.alpha_2 = o->alpha_2, io.reg_coef = o->reg_coef;
  int64_t row = 0;
  for (int i = 0; i < N && e == ITR_OK; i++) {
    itr_stats st = {0};
    e = load_stats(c, i, m, c->method == FEAT_ITERIS, &st);
    tasks[i].stats = &st;
    if (e == ITR_OK && c->method == FEAT_ITERIS) {
      e = itr_iteris_coef(&tasks[i], m->d_out, m->d_in, W0, m->path, i, &m->coef[i]);
      if (e == ITR_OK) e = itr_iteris_assemble_add(&io, &tasks[i], i, m->d_out, m->d_in, W0, m->coef[i], row, &sys);
    } else if (e == ITR_OK) {
      m->coef[i] = 1.0;
      e = itr_baseline_regmean_assemble_add(&tasks[i], i, o->regmean_alpha, o->alpha_2, row, &sys);
    }
    tasks[i].stats = NULL;
    row += tasks[i].r;
    itr_stats_fini(&st);
  }
  if (e != ITR_OK) goto done;
  ITR_TRY_GOTO(itr_system_solve_local(&sys), e, done);
  m->residual = sys.residual;
  ITR_TRY_GOTO(itr_update_from_system(&sys, N, tasks, m->d_out, W0, &m->upd), e, done);
  itr_log(o->verbose >= 1 ? ITR_LOG_INFO : ITR_LOG_DEBUG, "  %s: R = %lld, scaled residual %.3g %s", m->path,
          (long long)R, sys.residual, sys.passed ? "PASSED" : "FAILED");
done:
  itr_system_fini(&sys);
  free(W0);
  for (int i = 0; i < N; i++) {
    free(A[i]);
    free(B[i]);
  }
  return e;
}

/* ---- output ------------------------------------------------------------------------------------ */

/* Adds factor data (f64) to the writer in dtype dt, checking that it stays finite. */
static itr_err add_factor(itr_st_writer *w, const char *name, itr_dtype dt, int64_t rows, int64_t cols,
                          const double *src) {
  const size_t n = (size_t)rows * (size_t)cols;
  const int64_t shape[2] = {rows, cols};
  for (size_t k = 0; k < n; k++) {
    ITR_CHECK(isfinite(src[k]) && (dt == ITR_F64 || isfinite((float)src[k])), ITR_ERR_NUMERIC,
              "tensor '%s': element %zu = %g is not finite in %s; the merge produced a non-finite value", name, k,
              src[k], itr_dtype_name(dt));
    ITR_CHECK(dt != ITR_F16 || fabs(src[k]) <= 65504.0, ITR_ERR_NUMERIC,
              "tensor '%s': element %zu = %g does not fit in F16 (largest 65504); write BF16 or F32", name, k, src[k]);
  }
  if (dt == ITR_F64) return itr_st_writer_add(w, name, dt, 2, shape, src);
  float *f = NULL;
  ITR_TRY(itr_calloc(n ? n : 1, sizeof(float), "factor f32", &f));
  for (size_t k = 0; k < n; k++) f[k] = (float)src[k];
  itr_err e = itr_st_writer_add_f32(w, name, dt, 2, shape, f);
  free(f);
  return e;
}

/* Pads (B, A) of rank r to rank rmax with zero columns / rows: dW is unchanged. */
static itr_err pad_update(const itr_update *u, int64_t rmax, double **A, double **B) {
  const int64_t r = u->rank, di = u->d_in, dout = u->d_out;
  ITR_TRY(itr_calloc((size_t)(rmax * di), sizeof(double), "padded A", A));
  ITR_TRY(itr_calloc((size_t)(dout * rmax), sizeof(double), "padded B", B));
  memcpy(*A, u->A, (size_t)(r * di) * sizeof(double));
  for (int64_t i = 0; i < dout; i++) memcpy(*B + i * rmax, u->B + i * r, (size_t)r * sizeof(double));
  return ITR_OK;
}

static itr_err write_config(feat_ctx *c, const char *dir, int64_t rmax) {
  cJSON *root = cJSON_CreateObject();
  const feat_adapter *a0 = c->ad[0];
  cJSON_AddStringToObject(root, "peft_type", "LORA");
  cJSON_AddStringToObject(root, "base_model_name_or_path", a0->base_model);
  if (a0->task_type[0]) cJSON_AddStringToObject(root, "task_type", a0->task_type);
  cJSON_AddNumberToObject(root, "r", (double)rmax);
  cJSON_AddNumberToObject(root, "lora_alpha", (double)rmax);
  cJSON_AddNumberToObject(root, "lora_dropout", 0.0);
  cJSON_AddStringToObject(root, "bias", "none");
  cJSON_AddBoolToObject(root, "use_rslora", 0);
  cJSON_AddBoolToObject(root, "use_dora", 0);
  cJSON_AddBoolToObject(root, "fan_in_fan_out", 0);
  cJSON_AddBoolToObject(root, "inference_mode", 1);
  cJSON *tm = cJSON_AddArrayToObject(root, "target_modules");
  for (int q = 0; q < c->n_mod; q++) cJSON_AddItemToArray(tm, cJSON_CreateString(c->mods[q].path));
  char *text = cJSON_Print(root);
  cJSON_Delete(root);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory writing adapter_config.json");
  char path[ITR_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/adapter_config.json", dir);
  itr_err e = itr_iofile_write_atomic(path, text, strlen(text));
  free(text);
  return e;
}

static itr_err write_report(feat_ctx *c, const char *dir) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "tool", "iteris-mpi");
  cJSON_AddStringToObject(root, "mode", "features");
  cJSON_AddStringToObject(root, "features", c->opt->features);
  cJSON_AddStringToObject(root, "method", c->opt->method);
  cJSON_AddNumberToObject(root, "alpha_1", c->opt->alpha_1);
  cJSON_AddNumberToObject(root, "alpha_2", c->opt->alpha_2);
  cJSON_AddNumberToObject(root, "reg_coef", c->opt->reg_coef);
  cJSON_AddNumberToObject(root, "out_rank", c->opt->out_rank);
  if (c->opt->out_rank > 0) cJSON_AddNumberToObject(root, "energy_kept_min", c->energy_kept_min);
  cJSON *ads = cJSON_AddArrayToObject(root, "adapters");
  for (int i = 0; i < c->N; i++) cJSON_AddItemToArray(ads, cJSON_CreateString(c->opt->adapters[i]));
  cJSON *mods = cJSON_AddArrayToObject(root, "modules");
  for (int q = 0; q < c->n_mod; q++) {
    const feat_module *m = &c->mods[q];
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "name", m->path);
    cJSON_AddNumberToObject(j, "d_out", (double)m->d_out);
    cJSON_AddNumberToObject(j, "d_in", (double)m->d_in);
    cJSON_AddNumberToObject(j, "rank", (double)m->upd.rank);
    if (c->method != FEAT_TA) {
      cJSON_AddNumberToObject(j, "scaled_residual", m->residual);
      cJSON *co = cJSON_AddArrayToObject(j, "coef");
      for (int i = 0; i < c->N; i++) cJSON_AddItemToArray(co, cJSON_CreateNumber(m->coef[i]));
    }
    cJSON_AddItemToArray(mods, j);
  }
  char *text = cJSON_Print(root);
  cJSON_Delete(root);
  ITR_CHECK(text, ITR_ERR_INTERNAL, "out of memory writing features_report.json");
  char path[ITR_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/features_report.json", dir);
  itr_err e = itr_iofile_write_atomic(path, text, strlen(text));
  free(text);
  return e;
}

static itr_err write_adapter(feat_ctx *c, const char *dir) {
  itr_dtype dt = ITR_F32;
  (void)itr_dtype_parse(c->opt->out_dtype, &dt);
  /* truncate (-out_rank), then pad every module to the largest rank: one r for the whole adapter,
   * so no rank_pattern (whose key matching differs between PEFT versions) is needed */
  int64_t rmax = 1;
  for (int q = 0; q < c->n_mod; q++) {
    feat_module *m = &c->mods[q];
    if (c->opt->out_rank > 0 && m->upd.rank > c->opt->out_rank) {
      itr_update t = {0};
      ITR_TRY(itr_update_truncate(&m->upd, c->opt->out_rank, &t));
      c->energy_kept_min = fmin(c->energy_kept_min, t.energy_kept);
      itr_update_fini(&m->upd);
      m->upd = t;
    }
    if (m->upd.rank > rmax) rmax = m->upd.rank;
  }
  double **keep = NULL; /* padded factors, alive until the write (F64 data is added by reference) */
  ITR_TRY(itr_calloc((size_t)c->n_mod * 2, sizeof *keep, "padded factors", &keep));
  itr_st_writer *w = NULL;
  itr_err e = itr_st_writer_create(&w);
  for (int q = 0; q < c->n_mod && e == ITR_OK; q++) {
    const feat_module *m = &c->mods[q];
    char na[FEAT_MODULE_MAX + 64], nb[FEAT_MODULE_MAX + 64];
    snprintf(na, sizeof na, FEAT_PREFIX "%s.lora_A.weight", m->path);
    snprintf(nb, sizeof nb, FEAT_PREFIX "%s.lora_B.weight", m->path);
    e = pad_update(&m->upd, rmax, &keep[2 * q], &keep[2 * q + 1]);
    if (e == ITR_OK) e = add_factor(w, na, dt, rmax, m->d_in, keep[2 * q]);
    if (e == ITR_OK) e = add_factor(w, nb, dt, m->d_out, rmax, keep[2 * q + 1]);
  }
  char path[ITR_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
  if (e == ITR_OK) e = itr_st_writer_set_metadata(w, "format", "pt");
  if (e == ITR_OK) e = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  for (int k = 0; k < 2 * c->n_mod; k++) free(keep[k]);
  free(keep);
  ITR_TRY(e);
  ITR_TRY(write_config(c, dir, rmax));
  return ITR_OK;
}

static itr_err write_outputs(feat_ctx *c) {
  const char *out = c->opt->out;
  char partial[ITR_PATH_MAX + 16], old[ITR_PATH_MAX + 32];
  snprintf(partial, sizeof partial, "%s.partial", out);
  snprintf(old, sizeof old, "%s.old.%ld", out, (long)getpid());
  ITR_TRY(itr_iofile_remove_tree(partial));
  ITR_TRY(itr_iofile_mkdirs(partial));
  itr_err e = write_adapter(c, partial);
  if (e == ITR_OK) e = write_report(c, partial);
  if (e != ITR_OK) {
    (void)itr_iofile_remove_tree(partial);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  int had_old = access(out, F_OK) == 0;
  if (had_old)
    ITR_CHECK(rename(out, old) == 0, ITR_ERR_INTERNAL, "cannot move the old '%s' aside: %s", out, strerror(errno));
  ITR_CHECK(rename(partial, out) == 0, ITR_ERR_INTERNAL, "cannot rename '%s' to '%s': %s", partial, out,
            strerror(errno));
  if (had_old) ITR_TRY(itr_iofile_remove_tree(old));
  return ITR_OK;
}

static itr_err run(const itr_merge_opts *o) {
  feat_ctx c;
  memset(&c, 0, sizeof c);
  c.opt = o;
  c.N = o->n_adapters;
  c.energy_kept_min = 1.0;
  c.method = !strcmp(o->method, "iteris") ? FEAT_ITERIS : !strcmp(o->method, "regmean") ? FEAT_REGMEAN : FEAT_TA;
  itr_err e = ITR_OK;
  for (int i = 0; i < c.N && e == ITR_OK; i++) e = feat_adapter_open(o->adapters[i], &c.ad[i]);
  if (e == ITR_OK) e = collect_modules(&c);
  if (e == ITR_OK) e = itr_h5_open(o->features, &c.h5);
  if (e == ITR_OK && c.method != FEAT_TA) {
    char g[32];
    for (int i = 0; i < c.N && e == ITR_OK; i++) {
      snprintf(g, sizeof g, "task_%d", i);
      if (!itr_h5_has(c.h5, g))
        e = itr_error_set(ITR_ERR_INPUT, "'%s' has no group '%s' for adapter %d ('%s'); tasks are numbered from 0 in "
                          "-adapters order (see docs/FEATURES.md)", o->features, g, i, o->adapters[i]);
    }
    snprintf(g, sizeof g, "task_%d", c.N);
    if (e == ITR_OK && itr_h5_has(c.h5, g))
      e = itr_error_set(ITR_ERR_INPUT, "'%s' has a group '%s' but -adapters lists only %d adapter(s): give one adapter "
                        "per task group, in order", o->features, g, c.N);
  }
  if (e == ITR_OK)
    itr_log(ITR_LOG_INFO, "features: %d adapters, %d modules, -method %s, from %s", c.N, c.n_mod, o->method,
            o->features);
  double t0 = itr_wtime();
  for (int q = 0; q < c.n_mod && e == ITR_OK; q++) e = merge_module(&c, &c.mods[q]);
  if (e == ITR_OK) e = write_outputs(&c);
  if (e == ITR_OK)
    itr_log(ITR_LOG_INFO, "features: merged %d modules in %.2f s; adapter written to %s", c.n_mod, itr_wtime() - t0,
            o->out);
  if (c.h5) (void)itr_h5_close(c.h5, 0);
  for (int q = 0; q < c.n_mod; q++) itr_update_fini(&c.mods[q].upd);
  free(c.mods);
  for (int i = 0; i < c.N; i++) feat_adapter_destroy(c.ad[i]);
  return e;
}

itr_err itr_cli_features(const itr_merge_opts *opt, MPI_Comm comm) {
  int rank;
  MPI_Comm_rank(comm, &rank);
  itr_err e = rank == 0 ? run(opt) : ITR_OK;
  return itr_dist_agree(comm, e);
}
