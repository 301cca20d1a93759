/* -method mixlora: compose N task adapters into one MixLoRA adapter without training (issue 15, item 2).
 *
 *   attention:  the IterIS merge of the adapters (its q/k/v/o factors; computed before, in merged_dir);
 *   experts:    expert i = task i's gate/up/down factors, unchanged (scaling folded in, zero-padded to one rank);
 *   routers:    layer by layer, from the calibration rows: the FFN inputs x of every task's tokens under the
 *               model composed so far (attention merged, layers below routed), a ridge least-squares map from x
 *               to the task's one-hot label, R = ((X^T X + lambda I)^-1 X^T Y)^T (E, D); a token goes to
 *               argmax R x (top_k 1 by default: each token to one expert).
 *
 * Distributed as the merge: each rank runs its share of the calibration sequences; X^T X and X^T Y are
 * summed over ranks (one allreduce per layer); every rank solves the same D x D system (LAPACK) and sets the
 * same router. Rank 0 writes OUT.partial/ (adapter_config.json and adapter_model.safetensors in the reference
 * implementation's format, compose_report.json: routing accuracy on the calibration tokens per layer and task)
 * and renames it to OUT. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <lapacke.h>

#include "iteris/dist.h"
#include "iteris/io.h"
#include "iteris/model.h"
#include "iteris/pipeline.h"

typedef struct {
  const itr_merge_opts *o;
  const char *merged_dir;
  MPI_Comm comm;
  int rank, size, N, L;
  itr_model_config cfg;
  itr_model *model;
  itr_lora_set *set;    /* merged attention, then each layer's MixLoRA feed-forward */
  itr_adapter **tasks;  /* (N) */
  /* this rank's calibration block */
  int32_t *ids;
  int64_t *offsets;
  int n_seqs;
  int64_t T;
  int *label;           /* (T) the task of each token */
  float *h, *X;         /* (T, D): hidden states, the captured FFN input */
  double *acc;          /* (L N 2): per layer and task, tokens routed to their own expert, tokens */
  int expert_r;
} composer;

static itr_err capture(int layer, itr_site site, const float *rows, int64_t T, int64_t d_in, void *ctx) {
  composer *c = ctx;
  (void)layer;
  if (site == ITR_SITE_MLP_IN) memcpy(c->X, rows, (size_t)T * (size_t)d_in * sizeof(float));
  return ITR_OK;
}

/* This rank's sequences: the k-th calibration sequence over all tasks (in order) goes to rank k mod P. */
static itr_err read_block(composer *c) {
  const itr_merge_opts *o = c->o;
  itr_tokenizer *tok = NULL;
  int64_t cap_t = 0, cap_s = 0, k = 0;
  itr_err err = ITR_OK;
  for (int pass = 0; pass < 2 && err == ITR_OK; pass++) {
    if (pass == 1) {
      err = itr_calloc((size_t)(cap_t ? cap_t : 1), sizeof(int32_t), "calibration ids", &c->ids);
      if (err == ITR_OK) err = itr_calloc((size_t)(cap_t ? cap_t : 1), sizeof(int), "calibration labels", &c->label);
      if (err == ITR_OK) err = itr_calloc((size_t)cap_s + 1, sizeof(int64_t), "calibration offsets", &c->offsets);
    }
    k = 0;
    for (int i = 0; i < c->N && err == ITR_OK; i++) {
      itr_token_set ts;
      memset(&ts, 0, sizeof ts);
      err = itr_token_set_read_text(o->calib[i], c->cfg.vocab_size, o->base, &tok, &ts);
      for (int s = 0; err == ITR_OK && s < ts.n_seqs; s++, k++) {
        if (k % c->size != c->rank) continue;
        int64_t n = ts.offsets[s + 1] - ts.offsets[s];
        if (o->max_tokens > 0 && n > o->max_tokens) n = o->max_tokens;
        if (pass == 0) {
          cap_t += n;
          cap_s++;
          continue;
        }
        memcpy(c->ids + c->T, ts.ids + ts.offsets[s], (size_t)n * sizeof(int32_t));
        for (int64_t t = 0; t < n; t++) c->label[c->T + t] = i;
        c->T += n;
        c->offsets[++c->n_seqs] = c->T;
      }
      itr_token_set_fini(&ts);
    }
  }
  itr_tokenizer_destroy(tok);
  return err;
}

static itr_err setup(composer *c) {
  const itr_merge_opts *o = c->o;
  itr_tensor_store *store = NULL;
  ITR_TRY(itr_model_config_read(o->base, &c->cfg));
  c->L = c->cfg.num_hidden_layers;
  ITR_TRY(itr_tensor_store_open(o->base, &store));
  itr_err err = itr_model_load(&c->cfg, store, 0, c->L, 1, 0, &c->model);
  itr_tensor_store_destroy(store);
  ITR_TRY(err);
  ITR_TRY(itr_lora_set_create(&c->cfg, &c->set));
  /* the merged attention only */
  ITR_TRY(itr_lora_set_add_dir(c->set, c->merged_dir, 1.0));
  itr_lora_set_clear_modules(c->set, (1u << ITR_GATE_PROJ) | (1u << ITR_UP_PROJ) | (1u << ITR_DOWN_PROJ));
  ITR_TRY(itr_calloc((size_t)c->N, sizeof *c->tasks, "task adapters", &c->tasks));
  for (int i = 0; i < c->N; i++) {
    ITR_TRY(itr_adapter_open(o->adapters[i], &c->cfg, &c->tasks[i]));
    for (int l = 0; l < c->L; l++)
      for (int m = ITR_GATE_PROJ; m <= ITR_DOWN_PROJ; m++) {
        const itr_lora_module *lm = itr_adapter_module(c->tasks[i], l, (itr_module)m);
        if (lm && lm->present && lm->r > c->expert_r) c->expert_r = lm->r;
      }
  }
  ITR_TRY(read_block(c));
  size_t TD = (size_t)(c->T ? c->T : 1) * (size_t)c->cfg.hidden_size;
  ITR_TRY(itr_calloc(TD, sizeof(float), "hidden states", &c->h));
  ITR_TRY(itr_calloc(TD, sizeof(float), "FFN inputs", &c->X));
  ITR_TRY(itr_calloc((size_t)c->L * c->N * 2, sizeof(double), "routing accuracy", &c->acc));
  if (c->T) ITR_TRY(itr_model_embed(c->model, c->ids, c->T, c->h));
  return ITR_OK;
}

/* Expert e's (task e's) term on module m of layer l into the set; absent modules stay without a term. */
static itr_err set_expert(composer *c, int l, int e, itr_module m) {
  const itr_lora_module *lm = itr_adapter_module(c->tasks[e], l, m);
  if (!lm || !lm->present) return ITR_OK;
  float *A = NULL, *B = NULL;
  itr_err err = itr_calloc((size_t)lm->A->numel, sizeof(float), "expert A", &A);
  if (err == ITR_OK) err = itr_calloc((size_t)lm->B->numel, sizeof(float), "expert B", &B);
  if (err == ITR_OK) err = itr_tensor_read_f32(lm->A, A);
  if (err == ITR_OK) err = itr_tensor_read_f32(lm->B, B);
  if (err == ITR_OK) err = itr_lora_set_set_expert(c->set, l, e, m, lm->r, (float)lm->scaling, A, B);
  free(A);
  free(B);
  return err;
}

/* Layer l: capture its FFN inputs, fit the router (collective), set the MixLoRA feed-forward, advance h. */
static itr_err route_layer(composer *c, int l) {
  const int D = c->cfg.hidden_size, E = c->N;
  const double lambda = c->o->mixlora_ridge;
  itr_seq_layout lay = {c->n_seqs, c->offsets};
  float *tmp = NULL;
  double *S = NULL, *W = NULL;
  float *R = NULL;
  size_t TD = (size_t)c->T * D;
  itr_err err = itr_calloc(TD ? TD : 1, sizeof(float), "layer copy", &tmp);
  if (err == ITR_OK && c->T) {
    memcpy(tmp, c->h, TD * sizeof(float));
    err = itr_model_run_layers(c->model, l, l + 1, tmp, c->T, &lay, c->set, capture, c);
  }
  /* S = [X^T X | X^T Y] (D, D + E), row-major, summed over ranks */
  if (err == ITR_OK) err = itr_calloc((size_t)D * (D + E), sizeof(double), "router statistics", &S);
  if (err == ITR_OK && c->T) {
    double *xd = NULL;
    err = itr_calloc(TD, sizeof(double), "FFN inputs (f64)", &xd);
    for (size_t i = 0; err == ITR_OK && i < TD; i++) xd[i] = c->X[i];
    if (err == ITR_OK) {
      cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, D, (int)c->T, 1.0, xd, D, 0.0, S, D + E);
      for (int64_t t = 0; t < c->T; t++)
        for (int i = 0; i < D; i++) S[(size_t)i * (D + E) + D + c->label[t]] += xd[(size_t)t * D + i];
    }
    free(xd);
  }
  err = itr_dist_agree(c->comm, err);
  if (err == ITR_OK) err = itr_dist_allreduce_sum(S, (int64_t)D * (D + E), c->comm, "router statistics");
  if (err == ITR_OK) {
    double tr = 0;
    for (int i = 0; i < D; i++) tr += S[(size_t)i * (D + E) + i];
    double reg = lambda * (tr > 0 ? tr / D : 1.0);
    for (int i = 0; i < D; i++) {
      S[(size_t)i * (D + E) + i] += reg;
      for (int j = 0; j < i; j++) S[(size_t)i * (D + E) + j] = S[(size_t)j * (D + E) + i];
    }
    err = itr_calloc((size_t)D * E, sizeof(double), "router solution", &W);
    for (int i = 0; err == ITR_OK && i < D; i++)
      for (int e = 0; e < E; e++) W[(size_t)i * E + e] = S[(size_t)i * (D + E) + D + e];
    /* the Gram block in place: D x D with leading dimension D + E */
    lapack_int info = err == ITR_OK ? LAPACKE_dposv(LAPACK_ROW_MAJOR, 'U', D, E, S, D + E, W, E) : 0;
    if (err == ITR_OK && info != 0)
      err = itr_error_set(ITR_ERR_NUMERIC, "-method mixlora: the router system of layer %d is not positive definite "
                          "(dposv info %d); raise -mixlora_ridge", l, (int)info);
  }
  if (err == ITR_OK) err = itr_calloc((size_t)E * D, sizeof(float), "router", &R);
  for (int e = 0; err == ITR_OK && e < E; e++)
    for (int i = 0; i < D; i++) R[(size_t)e * D + i] = (float)W[(size_t)i * E + e];
  /* routing accuracy on this rank's tokens, summed later */
  for (int64_t t = 0; err == ITR_OK && t < c->T; t++) {
    const float *x = c->X + (size_t)t * D;
    int best = 0;
    double bz = -INFINITY;
    for (int e = 0; e < E; e++) {
      double z = 0;
      for (int i = 0; i < D; i++) z += (double)R[(size_t)e * D + i] * x[i];
      if (z > bz) bz = z, best = e;
    }
    double *a = c->acc + ((size_t)l * c->N + c->label[t]) * 2;
    a[0] += best == c->label[t];
    a[1] += 1;
  }
  if (err == ITR_OK) err = itr_lora_set_set_moe(c->set, l, E, c->o->mixlora_top_k, R);
  for (int e = 0; err == ITR_OK && e < E; e++)
    for (int m = ITR_GATE_PROJ; err == ITR_OK && m <= ITR_DOWN_PROJ; m++) err = set_expert(c, l, e, (itr_module)m);
  if (err == ITR_OK && c->T) err = itr_model_run_layers(c->model, l, l + 1, c->h, c->T, &lay, c->set, NULL, NULL);
  free(tmp);
  free(S);
  free(W);
  free(R);
  return itr_dist_agree(c->comm, err);
}

/* (rows, cols) factor src padded with zeros to (rows', cols') into dst, times scale. */
static void pad(float *dst, const float *src, int64_t rows, int64_t cols, int64_t rows2, int64_t cols2, float scale) {
  memset(dst, 0, (size_t)rows2 * (size_t)cols2 * sizeof(float));
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) dst[i * cols2 + j] = scale * src[i * cols + j];
}

/* Rank 0: OUT.partial/ with the adapter in the reference's format and compose_report.json, renamed to OUT. */
static itr_err write_out(composer *c) {
  const itr_merge_opts *o = c->o;
  char partial[ITR_OPT_PATH + 16], path[ITR_OPT_PATH + 64], name[192];
  snprintf(partial, sizeof partial, "%s.partial", o->out);
  ITR_TRY(itr_iofile_remove_tree(partial));
  ITR_TRY(itr_iofile_mkdirs(partial));
  int attn_r = 1, Re = c->expert_r > 0 ? c->expert_r : 1;
  unsigned mask = 0;
  for (int l = 0; l < c->L; l++)
    for (int m = ITR_Q_PROJ; m <= ITR_O_PROJ; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(c->set, l, (itr_module)m);
      if (sl && sl->n_terms) {
        mask |= 1u << m;
        int r = 0;
        for (int k = 0; k < sl->n_terms; k++) r += sl->terms[k].r;
        attn_r = r > attn_r ? r : attn_r;
      }
    }
  for (int e = 0; e < c->N; e++)
    for (int m = ITR_GATE_PROJ; m <= ITR_DOWN_PROJ; m++)
      if (c->tasks[e]->target_mask & (1u << m)) mask |= 1u << m;
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  int64_t D = c->cfg.hidden_size, maxd = c->cfg.intermediate_size > D ? c->cfg.intermediate_size : D;
  float *A = NULL, *B = NULL;
  int rmax = attn_r > Re ? attn_r : Re;
  itr_err err = itr_calloc((size_t)rmax * maxd * 2, sizeof(float), "padded A", &A);
  if (err == ITR_OK) err = itr_calloc((size_t)rmax * maxd * 2, sizeof(float), "padded B", &B);
  for (int l = 0; err == ITR_OK && l < c->L; l++) {
    for (int m = 0; err == ITR_OK && m < ITR_MODULE_COUNT; m++) {
      if (!(mask & (1u << m))) continue;
      int64_t d_out, d_in;
      itr_module_shape(&c->cfg, (itr_module)m, &d_out, &d_in);
      if (m <= ITR_O_PROJ) { /* attention: the merged terms side by side, scaling in B, padded to attn_r */
        memset(A, 0, (size_t)attn_r * d_in * sizeof(float));
        memset(B, 0, (size_t)d_out * attn_r * sizeof(float));
        const itr_lora_slot *sl = itr_lora_set_slot(c->set, l, (itr_module)m);
        int off = 0;
        for (int k = 0; sl && k < sl->n_terms; k++) {
          const itr_lora_term *tm = &sl->terms[k];
          memcpy(A + (size_t)off * d_in, tm->A, (size_t)tm->r * d_in * sizeof(float));
          for (int64_t i = 0; i < d_out; i++)
            for (int j = 0; j < tm->r; j++) B[i * attn_r + off + j] = tm->scaling * tm->B[i * tm->r + j];
          off += tm->r;
        }
        int64_t sa[2] = {attn_r, d_in}, sb[2] = {d_out, attn_r};
        itr_mixlora_name(l, -1, (itr_module)m, 'A', name, sizeof name);
        err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sa, A);
        itr_mixlora_name(l, -1, (itr_module)m, 'B', name, sizeof name);
        if (err == ITR_OK) err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sb, B);
        continue;
      }
      for (int e = 0; err == ITR_OK && e < c->N; e++) { /* experts: every one written (zero where the task has none) */
        const itr_lora_term *tm = &c->set->moe[l].experts[3 * e + (m - ITR_GATE_PROJ)];
        memset(A, 0, (size_t)Re * d_in * sizeof(float));
        memset(B, 0, (size_t)d_out * Re * sizeof(float));
        if (tm->r > 0) {
          pad(A, tm->A, tm->r, d_in, Re, d_in, 1.0f);
          pad(B, tm->B, d_out, tm->r, d_out, Re, tm->scaling);
        }
        int64_t sa[2] = {Re, d_in}, sb[2] = {d_out, Re};
        itr_mixlora_name(l, e, (itr_module)m, 'A', name, sizeof name);
        err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sa, A);
        itr_mixlora_name(l, e, (itr_module)m, 'B', name, sizeof name);
        if (err == ITR_OK) err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sb, B);
      }
    }
    int64_t sr[2] = {c->N, D};
    itr_mixlora_router_name(l, name, sizeof name);
    if (err == ITR_OK) err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sr, c->set->moe[l].router);
  }
  free(A);
  free(B);
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", partial);
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "format", "pt");
  if (err == ITR_OK) err = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  snprintf(path, sizeof path, "%s/adapter_config.json", partial);
  if (err == ITR_OK) err = itr_mixlora_write_config(path, o->base, c->N, o->mixlora_top_k, attn_r, Re, mask);
  /* the report: routing accuracy on the calibration tokens, per layer and task */
  size_t cap = 1024 + (size_t)c->L * c->N * 32 + (size_t)c->N * ITR_OPT_PATH, len = 0;
  char *js = NULL;
  if (err == ITR_OK) err = itr_calloc(cap, 1, "compose report", &js);
  if (err == ITR_OK) {
#define PUT(...) len += (size_t)snprintf(js + len, len < cap ? cap - len : 0, __VA_ARGS__)
    PUT("{\n\t\"method\":\t\"mixlora\",\n\t\"experts\":\t%d,\n\t\"top_k\":\t%d,\n\t\"ridge\":\t%g,\n\t\"adapters\":\t[", c->N,
        o->mixlora_top_k, o->mixlora_ridge);
    for (int i = 0; i < c->N; i++) PUT("%s\"%s\"", i ? ", " : "", o->adapters[i]);
    PUT("],\n\t\"routing_accuracy_calibration\":\t[");
    for (int l = 0; l < c->L; l++) {
      PUT("%s[", l ? ", " : "");
      for (int i = 0; i < c->N; i++) {
        const double *a = c->acc + ((size_t)l * c->N + i) * 2;
        PUT("%s%.6f", i ? ", " : "", a[1] > 0 ? a[0] / a[1] : 0);
      }
      PUT("]");
    }
    PUT("]\n}\n");
#undef PUT
    snprintf(path, sizeof path, "%s/compose_report.json", partial);
    err = len < cap ? itr_iofile_write_atomic(path, js, len) : itr_error_set(ITR_ERR_INTERNAL, "compose report too long");
  }
  free(js);
  if (err == ITR_OK) err = itr_iofile_commit_dir(partial, o->out);
  return err;
}

itr_err itr_pipeline_compose(const itr_merge_opts *o, const char *merged_dir, MPI_Comm comm) {
  composer c;
  memset(&c, 0, sizeof c);
  c.o = o;
  c.merged_dir = merged_dir;
  c.comm = comm;
  c.N = o->n_adapters;
  MPI_Comm_rank(comm, &c.rank);
  MPI_Comm_size(comm, &c.size);
  itr_err err = itr_dist_agree(comm, o->mixlora_top_k >= 1 && o->mixlora_top_k <= o->n_adapters && o->mixlora_ridge > 0
                                          ? ITR_OK
                                          : itr_error_set(ITR_ERR_INPUT, "-mixlora_top_k %d must be in 1..%d (the "
                                                          "adapters) and -mixlora_ridge %g > 0",
                                                          o->mixlora_top_k, o->n_adapters, o->mixlora_ridge));
  if (err == ITR_OK) err = itr_dist_agree(comm, setup(&c));
  for (int l = 0; err == ITR_OK && l < c.L; l++) {
    err = route_layer(&c, l);
    if (c.rank == 0 && err == ITR_OK) itr_log(ITR_LOG_INFO, "-method mixlora: layer %d of %d routed", l + 1, c.L);
  }
  if (err == ITR_OK) err = itr_dist_allreduce_sum(c.acc, (int64_t)c.L * c.N * 2, comm, "routing accuracy");
  if (err == ITR_OK) err = itr_dist_agree(comm, c.rank == 0 ? write_out(&c) : ITR_OK);
  if (err == ITR_OK && c.rank == 0) {
    double a = 0, n = 0;
    for (int i = 0; i < c.N; i++) a += c.acc[((size_t)(c.L - 1) * c.N + i) * 2], n += c.acc[((size_t)(c.L - 1) * c.N + i) * 2 + 1];
    itr_log(ITR_LOG_INFO, "MixLoRA adapter written to %s (%d experts; last layer routes %.1f%% of calibration tokens to "
            "their task's expert)", o->out, c.N, n > 0 ? 100 * a / n : 0);
  }
  itr_model_destroy(c.model);
  itr_lora_set_destroy(c.set);
  for (int i = 0; c.tasks && i < c.N; i++) itr_adapter_destroy(c.tasks[i]);
  free(c.tasks);
  free(c.ids);
  free(c.offsets);
  free(c.label);
  free(c.h);
  free(c.X);
  free(c.acc);
  return err;
}
