/* Rank 0's output of a training run: the PEFT adapter (or, for -full_rank, -from_scratch and -switch_lora, a
 * model folder with LoRA merged), train_report.json, and -grad_out's gradient; written into OUT.partial/ and
 * renamed to OUT (io's commit). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "train/train_internal.h"

/* ---- output ---------------------------------------------------------------------------------------- */

/* Adds every tensor of m under its Hugging Face name (converted to dtype); a tied head is not repeated. */
static itr_err add_model_tensors(itr_st_writer *w, itr_model *m, const itr_model_config *cfg, itr_dtype dtype) {
  char name[160];
  int64_t D = cfg->hidden_size, V = cfg->vocab_size;
  for (int l = 0; l < cfg->num_hidden_layers; l++) {
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t shape[2];
      itr_module_shape(cfg, (itr_module)k, &shape[0], &shape[1]);
      itr_name_base(l, (itr_module)k, "weight", name, sizeof name);
      ITR_TRY(itr_st_writer_add_f32(w, name, dtype, 2, shape, itr_model_weight(m, l, (itr_module)k)));
      if (itr_model_bias(m, l, (itr_module)k)) {
        itr_name_base(l, (itr_module)k, "bias", name, sizeof name);
        ITR_TRY(itr_st_writer_add_f32(w, name, dtype, 1, shape, itr_model_bias(m, l, (itr_module)k)));
      }
    }
    for (int post = 0; post < 2; post++) {
      itr_name_layer_norm(l, post, name, sizeof name);
      ITR_TRY(itr_st_writer_add_f32(w, name, dtype, 1, &D, itr_model_norm(m, l, post)));
    }
  }
  int64_t vd[2] = {V, D};
  ITR_TRY(itr_st_writer_add_f32(w, ITR_NAME_EMBED, dtype, 2, vd, itr_model_embed_weight(m)));
  ITR_TRY(itr_st_writer_add_f32(w, ITR_NAME_FINAL_NORM, dtype, 1, &D, itr_model_final_norm(m)));
  if (!itr_model_head_is_embed(m)) ITR_TRY(itr_st_writer_add_f32(w, ITR_NAME_LM_HEAD, dtype, 2, vd, itr_model_lm_head(m)));
  return ITR_OK;
}

itr_err train_write_gradient(const trainer *t, const char *path) {
  /* the gradient of the mean loss, in the adapter's (or, -full_rank, the model's) tensor names */
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  itr_err err = ITR_OK;
  if (t->gmodel) {
    size_t ng;
    float *gw = itr_model_params(t->gmodel, &ng);
    for (size_t i = 0; i < ng; i++) gw[i] = (float)(t->gbuf[i] / t->gbuf[t->n + 1]);
    err = add_model_tensors(w, t->gmodel, &t->cfg, ITR_F32);
    if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "format", "iteris-mpi weight gradient of the mean loss");
    if (err == ITR_OK) err = itr_st_writer_write(w, path);
    itr_st_writer_destroy(w);
    return err;
  }
  double count = t->gbuf[t->n + 1];
  size_t off = 0;
  int mix = t->lora->moe != NULL; /* a MixLoRA set: the MixLoRA format's names */
  for (int l = 0; err == ITR_OK && l < t->cfg.num_hidden_layers; l++)
    for (int m = 0; err == ITR_OK && m < ITR_MODULE_COUNT; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(t->lora, l, (itr_module)m);
      if (!sl || sl->n_terms == 0) continue;
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      int r = sl->terms[0].r;
      for (int which = 0; err == ITR_OK && which < 2; which++) {
        int64_t shape[2] = {which ? d_out : r, which ? r : d_in};
        size_t cnt = (size_t)shape[0] * (size_t)shape[1];
        for (size_t i = 0; i < cnt; i++) t->gbuf[off + i] /= count;
        char name[160];
        if (mix) itr_mixlora_name(l, -1, (itr_module)m, which ? 'B' : 'A', name, sizeof name);
        else itr_name_lora(l, (itr_module)m, which ? 'B' : 'A', name, sizeof name);
        err = itr_st_writer_add(w, name, ITR_F64, 2, shape, t->gbuf + off);
        off += cnt;
      }
    }
  /* MixLoRA layers, in the pack order: the router, then each expert's gate, up, down (A, B) */
  for (int l = 0; mix && err == ITR_OK && l < t->cfg.num_hidden_layers; l++) {
    const itr_lora_moe *mo = &t->lora->moe[l];
    if (mo->E == 0) continue;
    int64_t sr[2] = {mo->E, t->cfg.hidden_size};
    char name[160];
    for (size_t i = 0; i < (size_t)(sr[0] * sr[1]); i++) t->gbuf[off + i] /= count;
    itr_mixlora_router_name(l, name, sizeof name);
    err = itr_st_writer_add(w, name, ITR_F64, 2, sr, t->gbuf + off);
    off += (size_t)(sr[0] * sr[1]);
    for (int i = 0; err == ITR_OK && i < 3 * mo->E; i++) {
      int r = mo->experts[i].r;
      if (r == 0) continue;
      itr_module m = (itr_module)(ITR_GATE_PROJ + i % 3);
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, m, &d_out, &d_in);
      for (int which = 0; err == ITR_OK && which < 2; which++) {
        int64_t shape[2] = {which ? d_out : r, which ? r : d_in};
        size_t cnt = (size_t)shape[0] * (size_t)shape[1];
        for (size_t j = 0; j < cnt; j++) t->gbuf[off + j] /= count;
        itr_mixlora_name(l, i / 3, m, which ? 'B' : 'A', name, sizeof name);
        err = itr_st_writer_add(w, name, ITR_F64, 2, shape, t->gbuf + off);
        off += cnt;
      }
    }
  }
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "format", "iteris-mpi LoRA gradient of the mean loss");
  if (err == ITR_OK) err = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  return err;
}

static int train_top_k(const trainer *t) {
  for (int l = 0; t->lora && t->lora->moe && l < t->cfg.num_hidden_layers; l++)
    if (t->lora->moe[l].E) return t->lora->moe[l].top_k;
  return 0;
}

static itr_err write_report(const trainer *t, const char *dir) {
  const itr_train_opts *o = t->o;
  char path[ITR_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/train_report.json", dir);
  size_t cap = 4096 + (size_t)(o->steps > 0 ? o->steps : 1) * 32 + (size_t)t->n_curve * 40 + (size_t)t->n_val * 24, len = 0;
  char *buf = NULL;
  ITR_TRY(itr_calloc(cap, 1, "train report", &buf));
#define PUT(...) len += (size_t)snprintf(buf + len, cap - len, __VA_ARGS__)
  PUT("{\n\t\"base\":\t\"%s\",\n\t\"data\":\t\"%s\",\n\t\"sequences\":\t%d,\n\t\"ranks\":\t%d,\n", o->base, o->data,
      t->data.n_seqs, t->size);
  PUT("\t\"r\":\t%d,\n\t\"lora_alpha\":\t%g,\n\t\"use_rslora\":\t%s,\n\t\"lora_dropout\":\t%g,\n", o->r,
      o->lora_alpha, o->rslora ? "true" : "false", o->dropout);
  PUT("\t\"steps\":\t%d,\n\t\"batch\":\t%d,\n\t\"grad_accum\":\t%d,\n\t\"lr\":\t%g,\n\t\"warmup\":\t%d,\n", o->steps,
      o->batch, o->grad_accum, o->lr, o->warmup);
  PUT("\t\"min_lr_ratio\":\t%g,\n\t\"weight_decay\":\t%g,\n\t\"max_grad_norm\":\t%g,\n\t\"seed\":\t%ld,\n",
      o->min_lr_ratio, o->weight_decay, o->max_grad_norm, o->seed);
  const char *mode = o->full_rank ? "full_rank" : t->sw ? "switch_lora" : t->dense ? "lora_from_scratch" : "lora";
  PUT("\t\"mode\":\t\"%s\",\n\t\"from_scratch\":\t%s,\n", mode, o->from_scratch ? "true" : "false");
  if (t->sw) {
    int64_t sw, held;
    itr_switch_counts(t->sw, &sw, &held);
    PUT("\t\"switch_lora_interval\":\t%d,\n\t\"switch_lora_descent\":\t%g,\n\t\"switch_lora_warm\":\t%d,\n",
        o->switch_interval, o->switch_descent, o->switch_warm);
    PUT("\t\"vectors_switched\":\t%lld,\n\t\"candidates_held\":\t%lld,\n", (long long)sw, (long long)held);
  }
  if (t->moe_E)
    PUT("\t\"mixlora_experts\":\t%d,\n\t\"mixlora_top_k\":\t%d,\n\t\"mixlora_aux_coef\":\t%g,\n", t->moe_E,
        train_top_k(t), t->aux_coef);
  if (o->train_only) {
    static const char *const group[] = {"attention", "routers", "experts"}; /* ITR_LORA_GROUP_* bits */
    PUT("\t\"train_only\":\t[");
    for (int g = 0, k = 0; g < 3; g++)
      if (o->train_only & (1u << g)) PUT("%s\"%s\"", k++ ? ", " : "", group[g]);
    PUT("],\n");
  }
  PUT("\t\"trainable_parameters\":\t%zu,\n\t\"tokens_per_second\":\t%.1f,\n\t\"wall_seconds\":\t%.3f,\n", t->n_trained,
      t->tokens_per_s, t->wall_s);
  if (t->n_val) {
    PUT("\t\"validation\":\t{\"fraction\":\t%g,\t\"sequences\":\t%lld,\t\"best_step\":\t%d,\t\"best_loss\":\t%.9g,\t"
        "\"curve\":\t[", o->val_fraction, (long long)t->n_val, t->best_step, t->best_val);
    for (int i = 0; i < t->n_curve; i++) PUT("%s[%d, %.9g]", i ? ", " : "", (int)t->val_curve[2 * i], t->val_curve[2 * i + 1]);
    PUT("],\t\"held_out\":\t[");
    for (int64_t i = 0; i < t->n_val; i++) PUT("%s%lld", i ? ", " : "", (long long)t->val[i]);
    PUT("]},\n");
  }
  PUT("\t\"loss\":\t[");
  for (int s = 0; s < o->steps; s++) PUT("%s%.9g", s ? ", " : "", t->loss_curve[s]);
  PUT("]\n}\n");
#undef PUT
  itr_err err = len < cap ? itr_iofile_write_atomic(path, buf, len)
                          : itr_error_set(ITR_ERR_INTERNAL, "train report longer than its buffer");
  free(buf);
  return err;
}

/* A MixLoRA set: adapter_model.safetensors in the reference's names (every factor's scaling folded into B, as
 * itr_mixlora_write_config's scaling 1 says) and adapter_config.json. */
static itr_err write_mixlora(const trainer *t, const char *dir) {
  char name[160], path[ITR_PATH_MAX + 64];
  int attn_r = 0, expert_r = 0, E = 0, top_k = 1;
  unsigned mask = 0;
  size_t big = 1;
  for (int l = 0; l < t->cfg.num_hidden_layers; l++) {
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(t->lora, l, (itr_module)m);
      if (!sl || sl->n_terms == 0) continue;
      ITR_CHECK(sl->n_terms == 1 && m < ITR_GATE_PROJ && (!attn_r || attn_r == sl->terms[0].r), ITR_ERR_INTERNAL,
                "MixLoRA output: layer %d %s has %d terms of rank %d (one attention term of one rank expected)", l,
                itr_module_name((itr_module)m), sl->n_terms, sl->terms[0].r);
      attn_r = sl->terms[0].r;
      mask |= 1u << m;
    }
    const itr_lora_moe *mo = &t->lora->moe[l];
    if (mo->E) E = mo->E, top_k = mo->top_k;
    for (int i = 0; i < 3 * mo->E; i++) {
      if (mo->experts[i].r == 0) continue;
      ITR_CHECK(!expert_r || expert_r == mo->experts[i].r, ITR_ERR_INTERNAL,
                "MixLoRA output: experts of ranks %d and %d (one rank expected)", expert_r, mo->experts[i].r);
      expert_r = mo->experts[i].r;
      mask |= 1u << (ITR_GATE_PROJ + i % 3);
    }
  }
  big = (size_t)(t->cfg.intermediate_size > t->cfg.hidden_size ? t->cfg.intermediate_size : t->cfg.hidden_size) *
        (size_t)(attn_r > expert_r ? attn_r : expert_r);
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  float *B = NULL;
  itr_err err = itr_calloc(big > 0 ? big : 1, sizeof(float), "scaled B", &B);
  for (int l = 0; err == ITR_OK && l < t->cfg.num_hidden_layers; l++) {
    for (int m = 0; err == ITR_OK && m < ITR_GATE_PROJ; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(t->lora, l, (itr_module)m);
      if (!sl || sl->n_terms == 0) continue;
      const itr_lora_term *tm = &sl->terms[0];
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      for (int64_t i = 0; i < d_out * tm->r; i++) B[i] = tm->B[i] * tm->scaling;
      int64_t sa[2] = {tm->r, d_in}, sb[2] = {d_out, tm->r};
      itr_mixlora_name(l, -1, (itr_module)m, 'A', name, sizeof name);
      err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sa, tm->A);
      itr_mixlora_name(l, -1, (itr_module)m, 'B', name, sizeof name);
      if (err == ITR_OK) err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sb, B);
    }
    const itr_lora_moe *mo = &t->lora->moe[l];
    if (mo->E == 0) continue;
    for (int i = 0; err == ITR_OK && i < 3 * mo->E; i++) {
      const itr_lora_term *tm = &mo->experts[i];
      if (tm->r == 0) continue;
      itr_module m = (itr_module)(ITR_GATE_PROJ + i % 3);
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, m, &d_out, &d_in);
      for (int64_t j = 0; j < d_out * tm->r; j++) B[j] = tm->B[j] * tm->scaling;
      int64_t sa[2] = {tm->r, d_in}, sb[2] = {d_out, tm->r};
      itr_mixlora_name(l, i / 3, m, 'A', name, sizeof name);
      err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sa, tm->A);
      itr_mixlora_name(l, i / 3, m, 'B', name, sizeof name);
      if (err == ITR_OK) err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sb, B);
    }
    int64_t sr[2] = {mo->E, t->cfg.hidden_size};
    itr_mixlora_router_name(l, name, sizeof name);
    if (err == ITR_OK) err = itr_st_writer_add_f32(w, name, ITR_F32, 2, sr, mo->router);
  }
  free(B);
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "format", "pt");
  if (err == ITR_OK) err = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  snprintf(path, sizeof path, "%s/adapter_config.json", dir);
  if (err == ITR_OK)
    err = itr_mixlora_write_config(path, t->o->base, E, top_k, attn_r ? attn_r : expert_r, expert_r, mask);
  return err;
}

static itr_err write_adapter(const trainer *t, const char *dir) {
  const itr_train_opts *o = t->o;
  itr_adapter_writer *w = NULL;
  ITR_TRY(itr_adapter_writer_create(&t->cfg, o->base, ITR_F32, &w));
  itr_err err = ITR_OK;
  if (!t->fold_scaling) err = itr_adapter_writer_set_scaling(w, o->lora_alpha, o->rslora, o->dropout);
  float *B = NULL;
  for (int l = 0; err == ITR_OK && l < t->cfg.num_hidden_layers; l++)
    for (int m = 0; err == ITR_OK && m < ITR_MODULE_COUNT; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(t->lora, l, (itr_module)m);
      if (!sl || sl->n_terms == 0) continue;
      const itr_lora_term *tm = &sl->terms[0];
      if (!t->fold_scaling) {
        err = itr_adapter_writer_add(w, l, (itr_module)m, tm->r, tm->A, tm->B);
        continue;
      }
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      free(B);
      B = NULL;
      err = itr_calloc((size_t)d_out * (size_t)tm->r, sizeof(float), "scaled B", &B);
      for (int64_t i = 0; err == ITR_OK && i < d_out * tm->r; i++) B[i] = tm->B[i] * tm->scaling;
      if (err == ITR_OK) err = itr_adapter_writer_add(w, l, (itr_module)m, tm->r, tm->A, B);
    }
  free(B);
  if (err == ITR_OK) err = itr_adapter_writer_write(w, dir);
  itr_adapter_writer_destroy(w);
  return err;
}

void train_checkpoint_path(const trainer *t, char *buf, size_t len) {
  snprintf(buf, len, "%s.partial/train_checkpoint.safetensors", t->o->out);
}

/* -full_rank, -from_scratch, -switch_lora: a Hugging Face model folder (config.json, model.safetensors
 * in F32); LoRA factors are merged first (W += s B A; the model is not used after this). */
static itr_err write_model(const trainer *t, const char *dir) {
  char path[ITR_PATH_MAX + 64];
  for (int l = 0; t->dense && l < t->cfg.num_hidden_layers; l++)
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      const itr_lora_slot *sl = itr_lora_set_slot(t->lora, l, (itr_module)m);
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      for (int k = 0; sl && k < sl->n_terms; k++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)d_in, sl->terms[k].r,
                    sl->terms[k].scaling, sl->terms[k].B, sl->terms[k].r, sl->terms[k].A, (int)d_in, 1.0f,
                    itr_model_weight(t->model, l, (itr_module)m), (int)d_in);
    }
  snprintf(path, sizeof path, "%s/config.json", dir);
  ITR_TRY(itr_model_config_write(path, &t->cfg));
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  itr_err err = add_model_tensors(w, t->model, &t->cfg, ITR_F32);
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "format", "pt");
  if (err == ITR_OK) err = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  return err;
}

itr_err train_remove_partial(const trainer *t) {
  char partial[ITR_PATH_MAX + 16];
  snprintf(partial, sizeof partial, "%s.partial", t->o->out);
  return itr_iofile_remove_tree(partial);
}

itr_err train_write_out(const trainer *t) {
  char partial[ITR_PATH_MAX + 16], ck[ITR_PATH_MAX + 64];
  snprintf(partial, sizeof partial, "%s.partial", t->o->out);
  train_checkpoint_path(t, ck, sizeof ck);
  ITR_TRY(itr_iofile_mkdirs(partial));
  (void)unlink(ck); /* the finished adapter carries no checkpoint */
  if (t->gmodel) ITR_TRY(write_model(t, partial));
  else if (t->lora->moe) ITR_TRY(write_mixlora(t, partial));
  else ITR_TRY(write_adapter(t, partial));
  ITR_TRY(write_report(t, partial));
  return itr_iofile_commit_dir(partial, t->o->out);
}
