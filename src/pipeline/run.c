/* The merge pipeline: `mpirun -np P iteris-mpi -base DIR -adapters ... -calib ... -out OUT`.
 *
 * Phases (each ends at an agreement point, so every rank goes on or every rank stops with the
 * same error):
 *   validate  rank 0 reads every header (config, adapters against the base, token files); then
 *             the other ranks open the same inputs.
 *   load      every rank opens the base model's files and holds the embedding; decoder layers are
 *             read one at a time, when the iteration reaches them.
 *   iterate   for k = 1..max_iter, layer by layer: every rank runs the source model i and (k >= 2)
 *             the merged model of iteration k-1 on its shard of calibration set i, in lockstep,
 *             capturing X_i and Xt_i at every input site; the statistics are formed from the
 *             ranks' rows straight in ScaLAPACK's block-cyclic layout and every module's system is
 *             solved with its Cholesky on a grid over all ranks (site.c, src/dist).
 *             With -stages S the same runs per stage on its own layers and ranks, as a pipeline
 *             (driver_stages.c).
 *   write     rank 0 writes OUT.partial/ (adapter, report) and renames it to OUT.
 *   evaluate  with -heldout: kl_ratio and top-1 per task, on held-out shards, summed over ranks.
 */
#include <errno.h>
#include <math.h>
#include <petscsys.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "iteris/pipeline.h"
#include "pipeline/pipeline_internal.h"

/* ---- inputs --------------------------------------------------------------------------------- */

/* Keeps the first max_tokens tokens of every sequence (in place). */
static void truncate_sequences(itr_token_set *ts, int max_tokens) {
  int64_t w = 0;
  for (int s = 0; s < ts->n_seqs; s++) {
    int64_t b = ts->offsets[s], len = ts->offsets[s + 1] - b;
    if (len > max_tokens) len = max_tokens;
    memmove(ts->ids + w, ts->ids + b, (size_t)len * sizeof(int32_t));
    ts->offsets[s] = w;
    w += len;
  }
  ts->offsets[ts->n_seqs] = w;
  ts->n_tokens = w;
}

static itr_err open_inputs(merge_ctx *c) {
  const itr_merge_opts *o = c->opt;
  char path[ITR_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/config.json", o->base);
  ITR_TRY(itr_model_config_read(path, &c->cfg));
  ITR_TRY(itr_arch_desc_init(&c->cfg, &c->arch));
  for (int i = 0; i < c->N; i++) {
    itr_err e = itr_adapter_open(o->adapters[i], &c->cfg, &c->ad[i]);
    if (e == ITR_ERR_INPUT && strstr(itr_error_message(), "the base model's")) { /* name the other side too */
      char head[2048];
      itr_error_headline(head, sizeof head);
      const itr_model_config *b = &c->cfg;
      return itr_error_set(e, "%s The base model is %s/config.json: hidden_size %d, intermediate_size %d, %d heads of %d, %d "
                           "key/value heads.", head, o->base, b->hidden_size, b->intermediate_size, b->num_attention_heads,
                           b->head_dim ? b->head_dim : b->hidden_size / b->num_attention_heads, b->num_key_value_heads);
    }
    ITR_TRY(e);
  }
  /* token files: {"input_ids": [...]} lines, or {"text": ...} through the base folder's tokenizer,
   * opened only when a text line comes */
  itr_tokenizer *tok = NULL;
  itr_err e = ITR_OK;
  for (int i = 0; i < o->n_calib && e == ITR_OK; i++) {
    e = itr_token_set_read_text(o->calib[i], c->cfg.vocab_size, o->base, &tok, &c->calib[i]);
    if (e == ITR_OK && o->max_tokens > 0) truncate_sequences(&c->calib[i], o->max_tokens);
  }
  for (int i = 0; i < o->n_heldout && e == ITR_OK; i++)
    e = itr_token_set_read_text(o->heldout[i], c->cfg.vocab_size, o->base, &tok, &c->heldout[i]);
  if (tok) itr_log(ITR_LOG_DEBUG, "text lines tokenized with %s", itr_tokenizer_path(tok));
  itr_tokenizer_destroy(tok);
  ITR_TRY(e);
  for (int i = 1; i < c->N; i++)
    if (strcmp(c->ad[i]->base_model, c->ad[0]->base_model) != 0)
      itr_log(ITR_LOG_WARN, "adapters name different base models: '%s' (%s) and '%s' (%s); shapes match -base, going on",
              c->ad[0]->base_model, o->adapters[0], c->ad[i]->base_model, o->adapters[i]);
  c->module_mask = 0;
  for (int i = 0; i < c->N; i++) c->module_mask |= c->ad[i]->target_mask;
  return ITR_OK;
}

/* This machine's memory in bytes (0: unknown). */
static double phys_bytes(void) {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? (double)pages * (double)page : 0.0;
}

/* Sizes checked against this machine's memory before anything large is allocated, so that an input
 * too large for the run is an input error naming the file, the field and the option to change (not
 * "out of memory" after a long wait): the embedding (config.json's vocab_size x hidden_size, f32),
 * and the forward of the longest calibration and held-out sequence (its attention scores are T^2
 * floats). Not Collective (rank 0 validates). */
static itr_err check_sizes(const merge_ctx *c) {
  const itr_merge_opts *o = c->opt;
  const double mem = phys_bytes(), gb = 1024.0 * 1024.0 * 1024.0;
  if (mem <= 0) return ITR_OK;
  const itr_model_config *cfg = &c->cfg;
  const double emb = 4.0 * (double)cfg->vocab_size * (double)cfg->hidden_size;
  ITR_CHECK(emb <= mem / 2, ITR_ERR_INPUT,
            "%s/config.json: vocab_size %d x hidden_size %d needs %.1f GB for the embedding in float32, more than "
            "half of this machine's %.1f GB. Is vocab_size right?",
            o->base, cfg->vocab_size, cfg->hidden_size, emb / gb, mem / gb);
  const double per_token = 4.0 * (2.0 * cfg->hidden_size + 4.0 * (double)cfg->num_attention_heads *
                                  (cfg->head_dim ? cfg->head_dim : cfg->hidden_size / cfg->num_attention_heads) +
                                  2.0 * cfg->intermediate_size);
  for (int set = 0; set < 2; set++) {
    const int n = set ? o->n_heldout : o->n_calib;
    for (int i = 0; i < n; i++) {
      const itr_token_set *ts = set ? &c->heldout[i] : &c->calib[i];
      int longest = 0;
      for (int q = 1; q < ts->n_seqs; q++)
        if (ts->offsets[q + 1] - ts->offsets[q] > ts->offsets[longest + 1] - ts->offsets[longest]) longest = q;
      const double T = ts->n_seqs ? (double)(ts->offsets[longest + 1] - ts->offsets[longest]) : 0.0;
      const double need = 4.0 * T * T + per_token * T;
      if (need > mem / 2)
        return itr_error_set(ITR_ERR_INPUT,
                             "%s: sequence %d (counting non-blank lines) has %.0f tokens: its forward needs %.1f GB (the "
                             "attention scores alone are T^2 floats), more than half of this machine's %.1f GB. %s",
                             set ? o->heldout[i] : o->calib[i], longest + 1, T, need / gb, mem / gb,
                             set ? "Split the sequence or shorten it" : "Give -max_tokens (e.g. -max_tokens 4096) or "
                                                                         "split the sequence");
    }
  }
  return ITR_OK;
}

/* The contents of what decides the merge, for the checkpoint's fingerprint: the base model's
 * config.json, index and safetensors headers (its data is too large to read twice), every adapter's
 * files whole, and the calibration tokens as read (after -max_tokens). */
static uint64_t inputs_digest(const merge_ctx *c) {
  const itr_merge_opts *o = c->opt;
  uint64_t h = itr_hash64(NULL);
  char path[ITR_PATH_MAX + 64];
  itr_iofile_digest_model(o->base, &h);
  for (int i = 0; i < c->N; i++) {
    snprintf(path, sizeof path, "%s/adapter_config.json", o->adapters[i]);
    itr_iofile_digest(path, 0, &h);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", o->adapters[i]);
    itr_iofile_digest(path, 0, &h);
  }
  for (int i = 0; i < o->n_calib; i++) {
    const itr_token_set *ts = &c->calib[i];
    h = itr_hash64_bytes(h, ts->offsets, (size_t)(ts->n_seqs + 1) * sizeof(int64_t));
    h = itr_hash64_bytes(h, ts->ids, (size_t)ts->n_tokens * sizeof(int32_t));
  }
  return h;
}

static itr_err check_out_dir(const itr_merge_opts *o) {
  struct stat sb;
  char path[ITR_PATH_MAX + 64];
  if (stat(o->out, &sb) == 0) {
    snprintf(path, sizeof path, "%s/merge_report.json", o->out);
    ITR_CHECK(access(path, F_OK) == 0, ITR_ERR_INPUT,
              "-out '%s' exists and is not an iteris-mpi output (no merge_report.json): choose another -out "
              "or remove it",
              o->out);
  }
  /* OUT.partial/ is made beside OUT: its folder must be writable now, not at the first checkpoint */
  char parent[ITR_PATH_MAX];
  itr_iofile_parent(o->out, parent, sizeof parent);
  ITR_CHECK(stat(parent, &sb) == 0 && S_ISDIR(sb.st_mode), ITR_ERR_INPUT,
            "-out '%s': the folder '%s' does not exist; create it first or choose another -out", o->out, parent);
  ITR_CHECK(access(parent, W_OK | X_OK) == 0, ITR_ERR_INPUT,
            "-out '%s': the folder '%s' is not writable (%s); choose another -out", o->out, parent, strerror(errno));
  return ITR_OK;
}

/* ---- output ------------------------------------------------------------------------------------ */

static itr_err write_adapter(merge_ctx *c, const char *dir) {
  itr_dtype dt = ITR_F32;
  (void)itr_dtype_parse(c->opt->out_dtype, &dt);
  itr_adapter_writer *w = NULL;
  ITR_TRY(itr_adapter_writer_create(&c->cfg, c->ad[0]->base_model[0] ? c->ad[0]->base_model : c->opt->base, dt, &w));
  itr_err e = ITR_OK;
  const int L = c->cfg.num_hidden_layers;
  for (int l = 0; l < L && e == ITR_OK; l++)
    for (int m = 0; m < c->arch.n_modules && e == ITR_OK; m++) {
      const itr_update *u = &c->cur[SLOT(l, m)];
      if (!u->A && !u->dense) continue;
      itr_update t = {0};
      const itr_update *use = u;
      if (c->opt->out_rank > 0 && (u->rank == 0 || u->rank > c->opt->out_rank)) {
        e = itr_update_truncate(u, c->opt->out_rank, &t);
        use = &t;
        c->energy_kept_min = fmin(c->energy_kept_min, t.energy_kept);
        c->energy_kept[SLOT(l, m)] = t.energy_kept;
      }
      if (e == ITR_OK) e = itr_adapter_writer_add_f64(w, l, c->arch.module[m].id, (int)use->rank, use->A, use->B);
      itr_update_fini(&t);
    }
  if (e == ITR_OK) e = itr_adapter_writer_write(w, dir);
  itr_adapter_writer_destroy(w);
  return e;
}

static itr_err write_outputs(merge_ctx *c) {
  const itr_merge_opts *o = c->opt;
  char partial[ITR_PATH_MAX + 16];
  snprintf(partial, sizeof partial, "%s.partial", o->out);
  ITR_TRY(itr_iofile_mkdirs(partial));
  /* each file is written atomically; OUT appears only when all are there */
  ITR_TRY(write_adapter(c, partial));
  ITR_TRY(merge_report_write(c, partial));
  merge_report_plot(c, partial);
  ITR_TRY(stats_write(c, partial));
  checkpoint_remove(c, partial);
  return itr_iofile_commit_dir(partial, o->out);
}

/* ---- entry ------------------------------------------------------------------------------------- */

static void ctx_fini(merge_ctx *c) {
  const size_t nslots = NSLOTS(c);
  if (c->cur)
    for (size_t q = 0; q < nslots; q++) itr_update_fini(&c->cur[q]);
  if (c->next)
    for (size_t q = 0; q < nslots; q++) itr_update_fini(&c->next[q]);
  free(c->cur);
  free(c->next);
  free(c->coef);
  free(c->resid);
  free(c->change);
  free(c->energy_kept);
  free(c->kl_iter);
  free(c->top1_iter);
  if (c->ev_ready) merge_eval_free(c, c->ev_sh, c->ev_h);
  for (int i = 0; i < ITR_MAX_TASKS; i++) {
    itr_adapter_destroy(c->ad[i]);
    itr_token_set_fini(&c->calib[i]);
    itr_token_set_fini(&c->heldout[i]);
    shard_fini(&c->calib_sh[i]);
    itr_lora_set_destroy(c->lora_task[i]);
    free(c->h_src[i]);
    free(c->h_mrg[i]);
    for (int s = 0; s < ITR_ARCH_MAX_SITES; s++) {
      free(c->X[i][s]);
      free(c->Xt[i][s]);
    }
  }
  itr_lora_set_destroy(c->lora_merged);
  itr_model_destroy(c->model);
  itr_model_destroy(c->layer);
  free(c->layer_mem);
  itr_tensor_store_destroy(c->store);
  itr_dist_grid_destroy(c->group_grid);
  itr_dist_grid_destroy(c->grid);
  merge_stages_fini(c);
}

static itr_err setup(merge_ctx *c) {
  const itr_merge_opts *o = c->opt;
  /* validate on rank 0 first, so that an input error is reported once, then everywhere */
  itr_err e = c->wrank == 0 ? open_inputs(c) : ITR_OK;
  if (e == ITR_OK && c->wrank == 0) e = check_sizes(c);
  if (e == ITR_OK && c->wrank == 0) e = check_out_dir(o);
  ITR_TRY(itr_dist_agree(c->world, e));
  ITR_TRY(itr_dist_agree(c->world, c->wrank != 0 ? open_inputs(c) : ITR_OK));
  if (c->method->flags & ITR_METHOD_ITERATES) { /* checkpoints carry it: rank 0 reads the files once */
    c->input_digest = c->wrank == 0 ? inputs_digest(c) : 0;
    ITR_CHECK(MPI_Bcast(&c->input_digest, 1, MPI_UINT64_T, 0, c->world) == MPI_SUCCESS, ITR_ERR_INTERNAL,
              "MPI_Bcast of the inputs' digest failed");
  }
  ITR_TRY(merge_stages_setup(c));

  PetscLogStagePush(c->stage_load);
  e = itr_tensor_store_open(o->base, &c->store);
  /* the embedding feeds the first stage; the head gives the last stage the held-out logits */
  const int last = c->stage == c->n_stages - 1;
  if (e == ITR_OK && (c->stage == 0 || (last && o->n_heldout > 0)))
    e = itr_model_load(&c->cfg, c->store, 0, 0, 1, last && o->n_heldout > 0, &c->model);
  PetscLogStagePop();
  ITR_TRY(itr_dist_agree(c->world, e));

  const int L = c->cfg.num_hidden_layers, N = c->N;
  const size_t nslots = NSLOTS(c);
  const int K = merge_n_iters(c);
  e = itr_calloc(nslots, sizeof(itr_update), "updates", &c->cur);
  if (e == ITR_OK) e = itr_calloc(nslots, sizeof(itr_update), "updates", &c->next);
  if (e == ITR_OK) e = itr_calloc(nslots * (size_t)N, sizeof(double), "adaptive weights", &c->coef);
  if (e == ITR_OK) e = itr_calloc(nslots * (size_t)K, sizeof(double), "residuals", &c->resid);
  if (e == ITR_OK) e = itr_calloc(nslots * (size_t)K, sizeof(double), "update changes", &c->change);
  for (size_t q = 0; e == ITR_OK && q < nslots * (size_t)K; q++) c->change[q] = NAN;
  if (e == ITR_OK) e = itr_calloc((size_t)K * (size_t)N, sizeof(double), "fidelity per iteration", &c->kl_iter);
  if (e == ITR_OK) e = itr_calloc((size_t)K * (size_t)N, sizeof(double), "fidelity per iteration", &c->top1_iter);
  for (size_t q = 0; e == ITR_OK && q < (size_t)K * (size_t)N; q++) c->kl_iter[q] = c->top1_iter[q] = NAN;
  if (e == ITR_OK) e = itr_calloc(nslots, sizeof(double), "kept energy", &c->energy_kept);
  for (size_t q = 0; e == ITR_OK && q < nslots; q++) c->energy_kept[q] = 1.0;
  if (e == ITR_OK) e = itr_lora_set_create(&c->cfg, &c->lora_merged);
  for (int i = 0; i < N && e == ITR_OK; i++) {
    e = itr_lora_set_create(&c->cfg, &c->lora_task[i]);
    if (e == ITR_OK) e = itr_lora_set_add_adapter(c->lora_task[i], c->ad[i], 0, L, 1.0);
  }
  if (c->method->flags & ITR_METHOD_STATS) {
    /* the calibration sequences are shared out over the ranks of this rank's stage */
    for (int i = 0; i < N && e == ITR_OK; i++) {
      e = merge_shard_make(&c->calib[i], c->rank, c->size, &c->calib_sh[i]);
      size_t n = (size_t)(c->calib_sh[i].T ? c->calib_sh[i].T : 1) * (size_t)c->cfg.hidden_size;
      if (e == ITR_OK) e = itr_calloc(n, sizeof(float), "hidden states", &c->h_src[i]);
      if (e == ITR_OK) e = itr_calloc(n, sizeof(float), "hidden states", &c->h_mrg[i]);
    }
    if (e == ITR_OK) e = merge_alloc_site_buffers(c);
  }
  ITR_TRY(itr_dist_agree(c->world, e));
  itr_gram_exchange how = ITR_GRAM_AUTO; /* -gram_exchange (checked by the options) */
  (void)itr_dist_gram_exchange_parse(o->gram_exchange, &how);
  itr_dist_gram_rows_exchange(how);
  ITR_TRY(itr_dist_agree(c->world, itr_dist_grid_create_shape(c->comm, o->block_size, o->grid_rows, &c->grid)));
  c->n_groups = o->solve_groups < c->size ? o->solve_groups : c->size;
  if (c->n_groups > 1) {
    for (int g = 0; g < c->n_groups; g++) c->group_root[g] = itr_dist_group_first(g, c->n_groups, c->size);
    ITR_TRY(itr_dist_agree(c->world, itr_dist_grid_split(c->grid, c->n_groups, &c->group_grid, &c->group)));
  }

  char partial[ITR_PATH_MAX + 16];
  snprintf(partial, sizeof partial, "%s.partial", o->out);
  if (o->restart) {
    int found = 0;
    if (c->st)
      ITR_TRY(merge_stages_restart(c, &found));
    else
      ITR_TRY(itr_dist_agree(c->world, checkpoint_read(c, &found)));
    if (found) {
      itr_log(ITR_LOG_INFO, "-restart: resuming at iteration %d, layer %d from %s/", c->start_iter, c->start_layer + 1,
              partial);
      ITR_TRY(itr_dist_agree(c->world, merge_rebuild_lora(c)));
    } else {
      itr_log(ITR_LOG_WARN, "-restart: no checkpoint in %s/: starting from the beginning", partial);
    }
  } else {
    ITR_TRY(itr_dist_agree(c->world, c->wrank == 0 ? itr_iofile_remove_tree(partial) : ITR_OK));
  }
  return ITR_OK;
}

itr_err itr_pipeline_merge(const itr_merge_opts *opt, MPI_Comm comm) {
  merge_ctx *c = NULL;
  ITR_TRY(itr_dist_agree(comm, itr_calloc(1, sizeof *c, "merge context", &c)));
  c->opt = opt;
  c->world = c->comm = comm;
  MPI_Comm_rank(comm, &c->wrank);
  MPI_Comm_size(comm, &c->wsize);
  c->rank = c->wrank;
  c->size = c->wsize;
  c->n_stages = 1;
  c->N = opt->n_adapters;
  c->start_iter = 1;
  c->layer_index = -1;
  c->energy_kept_min = 1.0;
  c->method = itr_method_find(opt->method);
  if (!c->method) { /* the program checks -method; a library caller may not have */
    itr_err e = itr_dist_agree(comm, itr_error_set(ITR_ERR_INPUT, "unknown method '%s'", opt->method));
    free(c);
    return e;
  }
  merge_log_register(c);
  double t0 = itr_wtime();
  itr_err e = setup(c);
  if (e == ITR_OK) {
    itr_log(ITR_LOG_INFO, "merging %d adapters of %s (%d layers, D = %d) with %s on %d rank(s)", c->N, opt->base,
            c->cfg.num_hidden_layers, c->cfg.hidden_size, opt->method, c->wsize);
    e = c->st ? merge_stages_run(c)
        : (c->method->flags & ITR_METHOD_STATS) ? merge_run_data_parallel(c)
                                                                  : merge_run_direct(c);
  }
  c->seconds_merge = itr_wtime() - t0;
  if (e == ITR_OK && opt->n_heldout > 0 && !c->evaluated) {
    PetscLogStagePush(c->stage_eval);
    e = merge_evaluate(c);
    PetscLogStagePop();
  }
  if (e == ITR_OK) {
    PetscLogStagePush(c->stage_write);
    e = itr_dist_agree(comm, c->wrank == 0 ? write_outputs(c) : ITR_OK);
    PetscLogStagePop();
  }
  if (e == ITR_OK && c->wrank == 0) merge_report_print(c, stdout);
  ctx_fini(c);
  free(c);
  return e;
}

