/* `iteris-mpi inspect DIR`: a readable summary of a model folder (config and every tensor) or a
 * PEFT adapter folder (config and, per module type, layers, ranks and scaling). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/iofile.h"
#include "io/peft_internal.h"
#include "iteris/io.h"

static void format_bytes(double b, char *buf, size_t len) {
  const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024.0 && u < 4) {
    b /= 1024.0;
    u++;
  }
  snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", b, units[u]);
}

static void format_shape(const itr_tensor_info *t, char *buf, size_t len) {
  size_t pos = (size_t)snprintf(buf, len, "(");
  for (int d = 0; d < t->ndim && pos < len; d++)
    pos += (size_t)snprintf(buf + pos, len - pos, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
  if (pos < len) snprintf(buf + pos, len - pos, ")");
}

static itr_err inspect_model(const char *dir, FILE *f) {
  itr_model_config c;
  ITR_TRY(itr_model_config_read(dir, &c));
  fprintf(f, "model folder: %s\n", dir);
  fprintf(f, "  model_type %s; D (hidden_size) %d, F (intermediate_size) %d, L (layers) %d\n", c.model_type,
          c.hidden_size, c.intermediate_size, c.num_hidden_layers);
  fprintf(f, "  attention heads %d, key/value heads %d, head_dim %d\n", c.num_attention_heads,
          c.num_key_value_heads, c.head_dim);
  fprintf(f, "  vocab_size %d, max_position_embeddings %d, rms_norm_eps %g, rope_theta %g\n", c.vocab_size,
          c.max_position_embeddings, c.rms_norm_eps, c.rope_theta);
  fprintf(f, "  tie_word_embeddings %s, q/k/v bias %s, o_proj bias %s, mlp bias %s\n",
          c.tie_word_embeddings ? "yes" : "no", c.attention_bias ? "yes" : "no", c.o_bias ? "yes" : "no",
          c.mlp_bias ? "yes" : "no");
  itr_tensor_store *s = NULL;
  ITR_TRY(itr_tensor_store_open(dir, &s));
  int n = itr_tensor_store_count(s);
  double total = 0;
  itr_err e = ITR_OK;
  fprintf(f, "  tensors: %d\n", n);
  for (int i = 0; i < n && e == ITR_OK; i++) {
    const itr_tensor_info *t = NULL;
    e = itr_tensor_store_get(s, itr_tensor_store_name(s, i), &t);
    if (e != ITR_OK) break;
    char shape[160];
    format_shape(t, shape, sizeof shape);
    fprintf(f, "    %-56s %-16s %s\n", t->name, shape, itr_dtype_name(t->dtype));
    total += (double)t->nbytes;
  }
  itr_tensor_store_destroy(s);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  char tb[32];
  format_bytes(total, tb, sizeof tb);
  fprintf(f, "  total: %.0f bytes (%s)\n", total, tb);
  return ITR_OK;
}

/* Per module type: which layers, the range of ranks and scalings, the shapes. */
typedef struct {
  int layers, first, last, r_min, r_max;
  double s_min, s_max;
  int64_t d_out, d_in;
} module_summary;

static itr_err summarize_adapter(itr_peft_config *pc, itr_safetensors *st, FILE *f) {
  module_summary ms[ITR_MODULE_COUNT];
  memset(ms, 0, sizeof ms);
  int n = itr_safetensors_count(st), unknown = 0;
  const char *first_unknown = NULL;
  double total = 0;
  for (int i = 0; i < n; i++) {
    const itr_tensor_info *t = itr_safetensors_at(st, i);
    total += (double)t->nbytes;
    int l;
    itr_module m;
    char which;
    if (!itr_name_parse_lora(t->name, &l, &m, &which) || t->ndim != 2) {
      if (!unknown++) first_unknown = t->name;
      continue;
    }
    if (which == 'B') {
      ms[m].d_out = t->shape[0];
      continue;
    }
    int r;
    double alpha;
    ITR_TRY(itr_peft_config_module(pc, l, m, &r, &alpha));
    double s = itr_peft_scaling(pc->use_rslora, r, alpha);
    module_summary *q = &ms[m];
    if (!q->layers) {
      q->first = q->last = l;
      q->r_min = q->r_max = (int)t->shape[0];
      q->s_min = q->s_max = s;
    }
    q->layers++;
    if (l < q->first) q->first = l;
    if (l > q->last) q->last = l;
    if (t->shape[0] < q->r_min) q->r_min = (int)t->shape[0];
    if (t->shape[0] > q->r_max) q->r_max = (int)t->shape[0];
    if (s < q->s_min) q->s_min = s;
    if (s > q->s_max) q->s_max = s;
    q->d_in = t->shape[1];
  }
  char tb[32];
  format_bytes(total, tb, sizeof tb);
  fprintf(f, "  tensors: %d, %.0f bytes (%s)\n", n, total, tb);
  fprintf(f, "  %-10s %-8s %-8s %-8s %-20s %s\n", "module", "layers", "from-to", "rank", "scaling", "d_out x d_in");
  for (int m = 0; m < ITR_MODULE_COUNT; m++) {
    const module_summary *q = &ms[m];
    if (!q->layers) continue;
    char span[24], rank[24], scal[48];
    snprintf(span, sizeof span, "%d-%d", q->first, q->last);
    if (q->r_min == q->r_max)
      snprintf(rank, sizeof rank, "%d", q->r_min);
    else
      snprintf(rank, sizeof rank, "%d..%d", q->r_min, q->r_max);
    if (q->s_min == q->s_max)
      snprintf(scal, sizeof scal, "%g", q->s_min);
    else
      snprintf(scal, sizeof scal, "%g..%g", q->s_min, q->s_max);
    fprintf(f, "  %-10s %-8d %-8s %-8s %-20s %lld x %lld\n", itr_module_name((itr_module)m), q->layers, span, rank,
            scal, (long long)q->d_out, (long long)q->d_in);
  }
  if (unknown) fprintf(f, "  unrecognised tensors: %d (first: %s)\n", unknown, first_unknown);
  return ITR_OK;
}

static itr_err inspect_adapter(const char *dir, const char *cfg_file, FILE *f) {
  itr_peft_config pc;
  ITR_TRY(itr_peft_config_read(cfg_file, 0, &pc));
  fprintf(f, "adapter folder: %s\n", dir);
  fprintf(f, "  base model: %s\n", pc.base_model[0] ? pc.base_model : "(not given)");
  fprintf(f, "  r %d, lora_alpha %g, use_rslora %s, default scaling %g\n", pc.r, pc.lora_alpha,
          pc.use_rslora ? "yes" : "no", itr_peft_scaling(pc.use_rslora, pc.r, pc.lora_alpha));
  fprintf(f, "  target modules:");
  for (int m = 0; m < ITR_MODULE_COUNT; m++)
    if (pc.listed_mask & (1u << m)) fprintf(f, " %s", itr_module_name((itr_module)m));
  fprintf(f, "\n  rank_pattern: %d keys, alpha_pattern: %d keys\n", pc.n_rank, pc.n_alpha);
  char st_file[ITR_PATH_MAX];
  itr_safetensors *st = NULL;
  itr_err e = itr_iofile_join(st_file, sizeof st_file, dir, "adapter_model.safetensors");
  if (e == ITR_OK) e = itr_safetensors_open(st_file, &st);
  if (e == ITR_OK) e = summarize_adapter(&pc, st, f);
  itr_safetensors_destroy(st);
  itr_peft_config_fini(&pc);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_inspect_dir(const char *dir, FILE *f) {
  ITR_CHECK(itr_iofile_is_dir(dir), ITR_ERR_INPUT, "inspect: '%s' is not a folder", dir);
  char file[ITR_PATH_MAX];
  ITR_TRY(itr_iofile_join(file, sizeof file, dir, "adapter_config.json"));
  if (itr_iofile_is_file(file)) {
    ITR_TRY(inspect_adapter(dir, file, f));
    return ITR_OK;
  }
  ITR_TRY(itr_iofile_join(file, sizeof file, dir, "config.json"));
  ITR_CHECK(itr_iofile_is_file(file), ITR_ERR_INPUT,
            "inspect: '%s' is neither a model folder (config.json) nor an adapter folder (adapter_config.json)", dir);
  ITR_TRY(inspect_model(dir, f));
  return ITR_OK;
}
