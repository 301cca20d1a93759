/* The training checkpoint (OUT.partial/train_checkpoint.safetensors): parameters, AdamW moments and step,
 * the loss so far and the options key; with SwitchLoRA also the model (W changes), the moments' ages and the
 * switch state. Rank 0 writes and reads; restore broadcasts to every rank. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iteris/dist.h"
#include "train/train_internal.h"

/* ---- checkpoint --------------------------------------------------------------------------------------- */

/* The options a checkpoint belongs to: a restart with others is refused (ranks and micro-batches may change). */
static void checkpoint_key(const trainer *t, char *buf, size_t len) {
  const itr_train_opts *o = t->o;
  snprintf(buf, len,
           "base=%s data=%s init=%s r=%d alpha=%.17g rslora=%d targets=%u dropout=%.17g steps=%d batch=%d lr=%.17g "
           "warmup=%d min_lr_ratio=%.17g betas=%.17g,%.17g eps=%.17g wd=%.17g clip=%.17g seed=%ld n=%zu full=%d,%d "
           "teachers=%d,%.17g switch=%d,%d,%.17g,%d val=%.17g,%d mixlora=%d,%d,%.17g only=%u",
           o->base, o->data, o->init_adapter, o->r, o->lora_alpha, o->rslora, o->targets, o->dropout, o->steps,
           o->batch, o->lr, o->warmup, o->min_lr_ratio, o->beta1, o->beta2, o->eps, o->weight_decay,
           o->max_grad_norm, o->seed, t->n, o->full_rank, o->from_scratch, o->n_teachers, o->distil_drop, o->switch_lora,
           o->switch_interval, o->switch_descent, o->switch_warm, o->val_fraction, o->eval_every, o->mixlora_experts,
           o->mixlora_top_k, o->mixlora_aux_coef, o->train_only);
}

/* Rank 0: the state after `done` steps. */
itr_err train_checkpoint_write(const trainer *t, int done) {
  char path[ITR_PATH_MAX + 64], dir[ITR_PATH_MAX + 16], key[ITR_PATH_MAX * 3 + 512], num[64];
  snprintf(dir, sizeof dir, "%s.partial", t->o->out);
  train_checkpoint_path(t, path, sizeof path);
  checkpoint_key(t, key, sizeof key);
  ITR_TRY(itr_iofile_mkdirs(dir));
  itr_st_writer *w = NULL;
  ITR_TRY(itr_st_writer_create(&w));
  int64_t n = (int64_t)t->n, nl = done > 0 ? done : 1;
  double zero = 0;
  itr_err err = itr_st_writer_add(w, "params", ITR_F32, 1, &n, t->params);
  if (err == ITR_OK) err = itr_st_writer_add(w, "adam_m", ITR_F64, 1, &n, t->opt.m);
  if (err == ITR_OK) err = itr_st_writer_add(w, "adam_v", ITR_F64, 1, &n, t->opt.v);
  if (err == ITR_OK) err = itr_st_writer_add(w, "loss", ITR_F64, 1, &nl, done > 0 ? t->loss_curve : &zero);
  double *state = NULL, *age = NULL;
  if (err == ITR_OK && t->sw) { /* SwitchLoRA changes W: the model, the moments' ages and the switch state */
    size_t ns = 0, nm = 0;
    float *mp = itr_model_params(t->model, &nm);
    int64_t nm64 = (int64_t)nm;
    err = itr_switch_serialize(t->sw, &state, &ns);
    int64_t ns64 = (int64_t)ns;
    if (err == ITR_OK) err = itr_calloc(t->n, sizeof(double), "AdamW ages", &age);
    for (size_t i = 0; err == ITR_OK && i < t->n; i++) age[i] = t->opt.age[i];
    if (err == ITR_OK) err = itr_st_writer_add(w, "model", ITR_F32, 1, &nm64, mp);
    if (err == ITR_OK) err = itr_st_writer_add(w, "adam_age", ITR_F64, 1, &n, age);
    if (err == ITR_OK) err = itr_st_writer_add(w, "switch_state", ITR_F64, 1, &ns64, state);
  }
  if (err == ITR_OK && t->n_val && t->n_curve > 0) { /* early stopping: the best so far and the curve */
    int64_t nc = 2 * (int64_t)t->n_curve;
    err = itr_st_writer_add(w, "best_params", ITR_F32, 1, &n, t->best);
    if (err == ITR_OK) err = itr_st_writer_add(w, "val_curve", ITR_F64, 1, &nc, t->val_curve);
    snprintf(num, sizeof num, "%d", t->best_step);
    if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "best_step", num);
    snprintf(num, sizeof num, "%.17g", t->best_val);
    if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "best_val", num);
  }
  snprintf(num, sizeof num, "%d", done);
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "step", num);
  snprintf(num, sizeof num, "%ld", t->opt.t);
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "adam_t", num);
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "options", key);
  if (err == ITR_OK) err = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  free(state);
  free(age);
  return err;
}

/* SwitchLoRA's part of the checkpoint: the model, the ages, the switch state (its values in *state). */
static itr_err checkpoint_read_switch(trainer *t, itr_safetensors *st, const char *path, double **state, size_t *ns) {
  const itr_tensor_info *mt = itr_safetensors_find(st, "model"), *at = itr_safetensors_find(st, "adam_age"),
                        *ss = itr_safetensors_find(st, "switch_state");
  size_t nm;
  float *mp = itr_model_params(t->model, &nm);
  ITR_CHECK(mt && at && ss && mt->numel == (int64_t)nm && at->numel == (int64_t)t->n, ITR_ERR_INPUT,
            "%s: a -switch_lora checkpoint needs model (%zu), adam_age (%zu) and switch_state", path, nm, t->n);
  double *age = NULL;
  ITR_TRY(itr_calloc(t->n, sizeof(double), "AdamW ages", &age));
  itr_err err = itr_tensor_read_f64(at, age);
  for (size_t i = 0; err == ITR_OK && i < t->n; i++) t->opt.age[i] = (int32_t)age[i];
  free(age);
  if (err == ITR_OK) err = itr_tensor_read_f32(mt, mp);
  if (err == ITR_OK) err = itr_calloc((size_t)ss->numel, sizeof(double), "SwitchLoRA state", state);
  if (err == ITR_OK) err = itr_tensor_read_f64(ss, *state);
  *ns = (size_t)ss->numel;
  return err;
}

/* Early stopping's part: the best parameters, their step and loss, the validation curve. */
static itr_err checkpoint_read_val(trainer *t, itr_safetensors *st, const char *path) {
  const itr_tensor_info *b = itr_safetensors_find(st, "best_params"), *c = itr_safetensors_find(st, "val_curve");
  const char *bs = itr_safetensors_metadata(st, "best_step"), *bv = itr_safetensors_metadata(st, "best_val");
  ITR_CHECK(b && c && bs && bv && b->numel == (int64_t)t->n && c->numel >= 2 && c->numel % 2 == 0, ITR_ERR_INPUT,
            "%s: a -val_fraction checkpoint needs best_params (%zu), val_curve, best_step and best_val", path, t->n);
  ITR_TRY(itr_calloc(t->n, sizeof(float), "best parameters", &t->best));
  t->cap_curve = t->n_curve = (int)(c->numel / 2);
  ITR_TRY(itr_calloc((size_t)c->numel, sizeof(double), "validation curve", &t->val_curve));
  ITR_TRY(itr_tensor_read_f32(b, t->best));
  ITR_TRY(itr_tensor_read_f64(c, t->val_curve));
  t->best_step = atoi(bs);
  t->best_val = atof(bv);
  return ITR_OK;
}

/* Rank 0 reads the checkpoint (*found = 0 when there is none), then every rank receives it. */
static itr_err checkpoint_read_local(trainer *t, int *found, double **state, size_t *ns) {
  char path[ITR_PATH_MAX + 64], key[ITR_PATH_MAX * 3 + 512];
  train_checkpoint_path(t, path, sizeof path);
  *found = 0;
  if (access(path, F_OK) != 0) return ITR_OK;
  itr_safetensors *st = NULL;
  ITR_TRY(itr_safetensors_open(path, &st));
  itr_err err = ITR_OK;
  const char *step = itr_safetensors_metadata(st, "step"), *at = itr_safetensors_metadata(st, "adam_t"),
             *saved = itr_safetensors_metadata(st, "options");
  const itr_tensor_info *p = itr_safetensors_find(st, "params"), *m = itr_safetensors_find(st, "adam_m"),
                        *v = itr_safetensors_find(st, "adam_v"), *l = itr_safetensors_find(st, "loss");
  checkpoint_key(t, key, sizeof key);
  int done = step ? atoi(step) : -1;
  if (!step || !at || !saved || !p || !m || !v || !l)
    err = itr_error_set(ITR_ERR_INPUT, "%s: not a training checkpoint (step, adam_t, options, params, adam_m, adam_v, "
                        "loss); remove it or run without -restart", path);
  else if (strcmp(saved, key) != 0)
    err = itr_error_set(ITR_ERR_INPUT, "%s was written by a run with other options:\n  saved: %s\n  now:   %s\n"
                        "rerun with the saved options, or without -restart to start again", path, saved, key);
  else if (done < 0 || done > t->o->steps || p->numel != (int64_t)t->n || m->numel != (int64_t)t->n ||
           v->numel != (int64_t)t->n || l->numel != (done > 0 ? done : 1))
    err = itr_error_set(ITR_ERR_INPUT, "%s: step %d or tensor sizes do not fit this run (%zu parameters)", path, done, t->n);
  if (err == ITR_OK) err = itr_tensor_read_f32(p, t->params);
  if (err == ITR_OK) err = itr_tensor_read_f64(m, t->opt.m);
  if (err == ITR_OK) err = itr_tensor_read_f64(v, t->opt.v);
  if (err == ITR_OK && done > 0) err = itr_tensor_read_f64(l, t->loss_curve);
  if (err == ITR_OK && t->sw) err = checkpoint_read_switch(t, st, path, state, ns);
  if (err == ITR_OK && t->n_val && done > 0) err = checkpoint_read_val(t, st, path);
  if (err == ITR_OK) {
    t->opt.t = atol(at);
    t->step0 = done;
    *found = 1;
  }
  itr_safetensors_destroy(st);
  return err;
}

/* MPI_Bcast from rank 0 of n elements, in chunks (MPI counts are int). */
static void bcast_chunks(void *buf, size_t n, MPI_Datatype type, size_t elem, MPI_Comm comm) {
  const size_t chunk = (size_t)1 << 26;
  for (size_t off = 0; off < n; off += chunk)
    MPI_Bcast((char *)buf + off * elem, (int)(n - off < chunk ? n - off : chunk), type, 0, comm);
}

itr_err train_checkpoint_restore(trainer *t) {
  int found = 0;
  double *state = NULL;
  size_t ns = 0;
  itr_err err = itr_dist_agree(t->comm, t->rank == 0 ? checkpoint_read_local(t, &found, &state, &ns) : ITR_OK);
  if (err != ITR_OK) {
    free(state);
    return err;
  }
  MPI_Bcast(&found, 1, MPI_INT, 0, t->comm);
  if (found && t->sw) { /* the model (W changed by the switches), the ages, the switch state */
    size_t nm;
    float *mp = itr_model_params(t->model, &nm);
    bcast_chunks(mp, nm, MPI_FLOAT, sizeof(float), t->comm);
    bcast_chunks(t->opt.age, t->n, MPI_INT32_T, sizeof(int32_t), t->comm);
    unsigned long long ns64 = ns;
    MPI_Bcast(&ns64, 1, MPI_UNSIGNED_LONG_LONG, 0, t->comm);
    ns = (size_t)ns64;
    err = t->rank == 0 ? ITR_OK : itr_calloc(ns ? ns : 1, sizeof(double), "SwitchLoRA state", &state);
    if (itr_dist_agree(t->comm, err) == ITR_OK) {
      bcast_chunks(state, ns, MPI_DOUBLE, sizeof(double), t->comm);
      err = itr_dist_agree(t->comm, itr_switch_deserialize(t->sw, state, ns));
    }
    free(state);
    state = NULL;
    ITR_TRY(itr_dist_agree(t->comm, err));
  }
  free(state);
  if (!found) {
    if (t->rank == 0) itr_log(ITR_LOG_WARN, "-restart: no checkpoint in %s.partial/: starting from the beginning", t->o->out);
    return ITR_OK;
  }
  long at = t->opt.t;
  MPI_Bcast(&t->step0, 1, MPI_INT, 0, t->comm);
  MPI_Bcast(&at, 1, MPI_LONG, 0, t->comm);
  t->opt.t = at;
  /* in chunks: MPI counts are int */
  const size_t chunk = (size_t)1 << 26;
  for (size_t off = 0; off < t->n; off += chunk) {
    int c = (int)(t->n - off < chunk ? t->n - off : chunk);
    MPI_Bcast(t->params + off, c, MPI_FLOAT, 0, t->comm);
    MPI_Bcast(t->opt.m + off, c, MPI_DOUBLE, 0, t->comm);
    MPI_Bcast(t->opt.v + off, c, MPI_DOUBLE, 0, t->comm);
  }
  if (t->step0 > 0) MPI_Bcast(t->loss_curve, t->step0, MPI_DOUBLE, 0, t->comm);
  if (t->n_val && t->step0 > 0) { /* early stopping's state */
    int nc = t->n_curve;
    MPI_Bcast(&nc, 1, MPI_INT, 0, t->comm);
    err = t->rank == 0 ? ITR_OK : itr_calloc(t->n, sizeof(float), "best parameters", &t->best);
    if (err == ITR_OK && t->rank != 0) err = itr_calloc((size_t)nc * 2, sizeof(double), "validation curve", &t->val_curve);
    ITR_TRY(itr_dist_agree(t->comm, err));
    t->n_curve = t->cap_curve = nc;
    bcast_chunks(t->best, t->n, MPI_FLOAT, sizeof(float), t->comm);
    MPI_Bcast(t->val_curve, 2 * nc, MPI_DOUBLE, 0, t->comm);
    MPI_Bcast(&t->best_step, 1, MPI_INT, 0, t->comm);
    MPI_Bcast(&t->best_val, 1, MPI_DOUBLE, 0, t->comm);
  }
  if (t->lora) itr_lora_set_unpack(t->lora, t->params);
  if (t->dense) train_dense_copy(t, t->params + t->n_lora, 1);
  if (t->rank == 0) itr_log(ITR_LOG_INFO, "-restart: continuing after step %d of %d", t->step0, t->o->steps);
  return ITR_OK;
}

/* The signal to stop on before step s, agreed by every rank (0: go on). */