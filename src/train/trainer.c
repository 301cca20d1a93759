/* The training run (include/iteris/train.h): setup on every rank, the step loop (local gradients of
 * this rank's share of the batch, one sum over ranks, the optimizer), and rank 0's atomic write of
 * the adapter and train_report.json. Every phase ends at an agreement point, so all ranks return
 * the same error. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "iteris/dist.h"
#include "iteris/io.h"
#include "iteris/train.h"

void itr_train_opts_defaults(itr_train_opts *o) {
  memset(o, 0, sizeof *o);
  o->r = 8;
  o->lora_alpha = 16;
  o->targets = (1u << ITR_Q_PROJ) | (1u << ITR_V_PROJ);
  o->steps = 100;
  o->batch = 8;
  o->grad_accum = 1;
  o->lr = 2e-4;
  o->min_lr_ratio = 0;
  o->warmup = 0;
  o->beta1 = 0.9;
  o->beta2 = 0.999;
  o->eps = 1e-8;
  o->weight_decay = 0;
  o->max_grad_norm = 1.0;
  o->seed = 0;
  o->log_every = 10;
  o->switch_interval = 40;
  o->switch_descent = 0.1;
  o->switch_warm = 5;
}

typedef struct {
  MPI_Comm comm;
  int rank, size;
  const itr_train_opts *o;
  itr_model_config cfg;
  itr_model *model;
  itr_token_set data;
  int have_data;
  int64_t *use;      /* (n_use) the sequences trained on: all but the unlabelled choices of questions */
  int64_t n_use;
  itr_tokenizer *tok; /* the base folder's, when the data has text lines */
  itr_lora_set *lora, *grad;
  size_t n;          /* trainable floats: n_lora LoRA factors, then (dense) the model's trained tensors */
  size_t n_lora;
  int dense;         /* LoRA pre-training (-from_scratch or -switch_lora without -full_rank): gmodel holds
                        the gradient of every tensor but the -targets projections, which are trained too */
  itr_switch *sw;    /* -switch_lora */
  float *params;     /* (n) f32, packed from lora (and the model); -full_rank: the model's own */
  double *gbuf;      /* (n + 2): gradient, loss sum, target count */
  float *gflat;      /* (n) f32 staging of the packed gradient */
  itr_adamw opt;
  int fold_scaling;  /* started from an adapter: write with scaling 1 */
  itr_model *gmodel; /* -full_rank: the weights' gradient, laid out as the model */
  itr_lora_set **teachers; /* -distil: one set per teacher adapter */
  int32_t *task;           /* -distil: (n_seqs) the teacher of each sequence */
  double *loss_curve; /* (steps) mean loss of each step */
  int step0;          /* first step of this run (> 0 after -restart) */
  double tokens_per_s, wall_s;
} trainer;

/* ---- setup ----------------------------------------------------------------------------------------- */

static itr_err check_opts(const itr_train_opts *o) {
  ITR_CHECK(o->base[0], ITR_ERR_INPUT, "-train needs -base DIR (the Hugging Face model folder)");
  ITR_CHECK(o->data[0] || o->n_teachers, ITR_ERR_INPUT, "-train needs -data FILE.jsonl (one {\"input_ids\": [...]} per line)");
  ITR_CHECK(!o->n_teachers || (o->n_teacher_data == o->n_teachers && !o->data[0] && o->init_adapter[0] && !o->full_rank),
            ITR_ERR_INPUT,
            "-distil A1,...,AN needs -distil_data C1,...,CN (one file per teacher; %d given for %d teachers), "
            "-init_adapter (the merged adapter to refine), and no -data or -full_rank",
            o->n_teacher_data, o->n_teachers);
  ITR_CHECK(o->out[0] || o->grad_out[0], ITR_ERR_INPUT, "-train needs -out DIR (the adapter to write)");
  ITR_CHECK(o->init_adapter[0] || (o->r >= 1 && o->r <= 4096), ITR_ERR_INPUT, "-r %d must be in 1..4096", o->r);
  ITR_CHECK(o->lora_alpha > 0 && isfinite(o->lora_alpha), ITR_ERR_INPUT, "-lora_alpha %g must be > 0", o->lora_alpha);
  ITR_CHECK(o->init_adapter[0] || o->targets != 0, ITR_ERR_INPUT, "-targets names no module");
  ITR_CHECK(o->dropout >= 0 && o->dropout < 1, ITR_ERR_INPUT, "-lora_dropout %g must be in [0, 1)", o->dropout);
  ITR_CHECK(o->steps >= 0, ITR_ERR_INPUT, "-steps %d must be >= 0", o->steps);
  ITR_CHECK(o->batch >= 1, ITR_ERR_INPUT, "-batch %d must be >= 1", o->batch);
  ITR_CHECK(o->grad_accum >= 1, ITR_ERR_INPUT, "-grad_accum %d must be >= 1", o->grad_accum);
  ITR_CHECK(o->lr >= 0 && isfinite(o->lr), ITR_ERR_INPUT, "-lr %g must be >= 0", o->lr);
  ITR_CHECK(o->min_lr_ratio >= 0 && o->min_lr_ratio <= 1, ITR_ERR_INPUT, "-min_lr_ratio %g must be in [0, 1]",
            o->min_lr_ratio);
  ITR_CHECK(o->warmup >= 0, ITR_ERR_INPUT, "-warmup %d must be >= 0", o->warmup);
  ITR_CHECK(o->beta1 >= 0 && o->beta1 < 1 && o->beta2 >= 0 && o->beta2 < 1, ITR_ERR_INPUT,
            "-adam_beta1 %g and -adam_beta2 %g must be in [0, 1)", o->beta1, o->beta2);
  ITR_CHECK(o->eps > 0, ITR_ERR_INPUT, "-adam_eps %g must be > 0", o->eps);
  ITR_CHECK(o->weight_decay >= 0, ITR_ERR_INPUT, "-weight_decay %g must be >= 0", o->weight_decay);
  ITR_CHECK(!(o->from_scratch || o->switch_lora) || (!o->init_adapter[0] && !o->n_teachers && !o->grad_out[0]),
            ITR_ERR_INPUT, "-from_scratch and -switch_lora train a model: -init_adapter, -distil and -grad_out do not apply");
  ITR_CHECK(!o->switch_lora || !o->full_rank, ITR_ERR_INPUT,
            "-switch_lora trains LoRA factors: it does not combine with -full_rank");
  ITR_CHECK(!o->switch_lora || (o->switch_interval >= 1 && o->switch_warm >= 0 && o->switch_descent >= 0), ITR_ERR_INPUT,
            "-switch_lora_interval %d must be >= 1, -switch_lora_warm %d >= 0, -switch_lora_descent %g >= 0",
            o->switch_interval, o->switch_warm, o->switch_descent);
  ITR_CHECK(o->max_grad_norm >= 0, ITR_ERR_INPUT, "-max_grad_norm %g must be >= 0 (0: no clipping)", o->max_grad_norm);
  return ITR_OK;
}

/* PEFT's initialisation: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0;
 * each (layer, module) draws from its own stream of the seed, so every rank makes the same A. */
static itr_err init_fresh(trainer *t) {
  const itr_train_opts *o = t->o;
  double scaling = o->rslora ? o->lora_alpha / sqrt((double)o->r) : o->lora_alpha / o->r;
  int64_t max_in = 0, max_out = 0;
  for (int m = 0; m < ITR_MODULE_COUNT; m++) {
    int64_t d_out, d_in;
    itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
    if (d_in > max_in) max_in = d_in;
    if (d_out > max_out) max_out = d_out;
  }
  float *A = NULL, *B = NULL;
  ITR_TRY(itr_calloc((size_t)o->r * (size_t)max_in, sizeof(float), "LoRA A init", &A));
  itr_err err = itr_calloc((size_t)o->r * (size_t)max_out, sizeof(float), "LoRA B init", &B);
  for (int l = 0; err == ITR_OK && l < t->cfg.num_hidden_layers; l++)
    for (int m = 0; err == ITR_OK && m < ITR_MODULE_COUNT; m++) {
      if (!(o->targets & (1u << m))) continue;
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      itr_rng g;
      itr_rng_init_stream(&g, (uint64_t)o->seed, (uint64_t)(l * ITR_MODULE_COUNT + m));
      double bound = 1.0 / sqrt((double)d_in);
      for (int64_t i = 0; i < (int64_t)o->r * d_in; i++) A[i] = (float)((2 * itr_rng_uniform(&g) - 1) * bound);
      err = itr_lora_set_add(t->lora, l, (itr_module)m, o->r, (float)scaling, A, B);
    }
  free(A);
  free(B);
  return err;
}

/* Hugging Face's initialisation of a Llama (initializer_range 0.02): every matrix and the embedding
 * N(0, 0.02^2), norms 1, biases 0; the same on every rank (one stream of the seed). */
static void init_from_scratch(trainer *t) {
  size_t n;
  float *p = itr_model_params(t->model, &n);
  itr_rng g;
  itr_rng_init_stream(&g, (uint64_t)t->o->seed, 0x66726f6dull);
  for (size_t i = 0; i < n; i++) p[i] = (float)(0.02 * itr_rng_normal(&g));
  int D = t->cfg.hidden_size;
  for (int l = 0; l < t->cfg.num_hidden_layers; l++) {
    for (int post = 0; post < 2; post++)
      for (int i = 0; i < D; i++) itr_model_norm(t->model, l, post)[i] = 1.0f;
    for (int m = 0; m < ITR_MODULE_COUNT; m++) {
      float *b = itr_model_bias(t->model, l, (itr_module)m);
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      if (b) memset(b, 0, (size_t)d_out * sizeof(float));
    }
  }
  for (int i = 0; i < D; i++) itr_model_final_norm(t->model)[i] = 1.0f;
}

/* -full_rank: every weight of the model is trained in place (params = the model's one allocation). */
static itr_err setup_full_rank(trainer *t) {
  const itr_train_opts *o = t->o;
  ITR_CHECK(!o->init_adapter[0], ITR_ERR_INPUT, "-full_rank trains the model's weights: -init_adapter does not apply");
  ITR_TRY(itr_model_create(&t->cfg, 0, t->cfg.num_hidden_layers, 1, 1, &t->gmodel));
  size_t ng;
  t->params = itr_model_params(t->model, &t->n);
  (void)itr_model_params(t->gmodel, &ng);
  ITR_CHECK(ng == t->n, ITR_ERR_INTERNAL, "-full_rank: gradient layout (%zu) differs from the model's (%zu)", ng, t->n);
  ITR_TRY(itr_calloc(t->n + 2, sizeof(double), "weight gradient", &t->gbuf));
  ITR_TRY(itr_calloc((size_t)(o->steps > 0 ? o->steps : 1), sizeof(double), "loss curve", &t->loss_curve));
  ITR_TRY(itr_adamw_init(&t->opt, t->n));
  return ITR_OK;
}

/* -distil: the teachers' files, one after the other, as one token set; task[s] = the teacher of s. */
static itr_err read_teacher_data(trainer *t) {
  const itr_train_opts *o = t->o;
  itr_token_set parts[64];
  memset(parts, 0, sizeof parts);
  itr_err err = ITR_OK;
  int64_t ns = 0, nt = 0;
  int got = 0;
  for (; got < o->n_teacher_data && err == ITR_OK; got++) {
    err = itr_token_set_read_text(o->teacher_data[got], t->cfg.vocab_size, o->base, &t->tok, &parts[got]);
    if (err == ITR_OK) ns += parts[got].n_seqs, nt += parts[got].n_tokens;
  }
  itr_token_set *d = &t->data;
  if (err == ITR_OK) err = itr_calloc((size_t)ns + 1, sizeof(int64_t), "distillation offsets", &d->offsets);
  if (err == ITR_OK) err = itr_calloc((size_t)nt, sizeof(int32_t), "distillation tokens", &d->ids);
  if (err == ITR_OK) err = itr_calloc((size_t)ns, sizeof(int64_t), "distillation prompts", &d->prompt_len);
  if (err == ITR_OK) err = itr_calloc((size_t)ns, sizeof(int32_t), "distillation tasks", &t->task);
  for (int i = 0; err == ITR_OK && i < o->n_teacher_data; i++) {
    const itr_token_set *p = &parts[i];
    memcpy(d->ids + d->n_tokens, p->ids, (size_t)p->n_tokens * sizeof(int32_t));
    for (int s = 0; s < p->n_seqs; s++) {
      d->offsets[d->n_seqs + 1] = d->n_tokens + p->offsets[s + 1];
      d->prompt_len[d->n_seqs] = p->prompt_len ? p->prompt_len[s] : 0;
      t->task[d->n_seqs++] = i;
    }
    d->n_tokens += p->n_tokens;
  }
  for (int i = 0; i < got; i++) itr_token_set_fini(&parts[i]);
  if (err != ITR_OK) return err;
  ITR_TRY(itr_calloc((size_t)o->n_teachers, sizeof *t->teachers, "teacher sets", &t->teachers));
  for (int i = 0; i < o->n_teachers; i++) {
    itr_adapter *ad = NULL;
    ITR_TRY(itr_lora_set_create(&t->cfg, &t->teachers[i]));
    ITR_TRY(itr_adapter_open(o->teachers[i], &t->cfg, &ad));
    err = itr_lora_set_add_adapter(t->teachers[i], ad, 0, t->cfg.num_hidden_layers, 1.0);
    itr_adapter_destroy(ad);
    ITR_TRY(err);
  }
  return ITR_OK;
}

/* Dense mode: the model's tensors that gmodel holds (all but the -targets projections), in gmodel's
 * order (layers: projections and biases, the two norms; then embedding, final norm, separate head),
 * to (to_model = 0) or from flat. */
static void dense_copy(trainer *t, float *flat, int to_model) {
  itr_model *m = t->model, *g = t->gmodel;
  size_t off = 0;
#define SEG(pm, pg, len)                                                                 \
  do {                                                                                   \
    if (pg) {                                                                            \
      if (to_model) memcpy((pm), flat + off, (size_t)(len) * sizeof(float));             \
      else memcpy(flat + off, (pm), (size_t)(len) * sizeof(float));                      \
      off += (size_t)(len);                                                              \
    }                                                                                    \
  } while (0)
  int64_t D = t->cfg.hidden_size, V = t->cfg.vocab_size;
  for (int l = 0; l < t->cfg.num_hidden_layers; l++) {
    for (int k = 0; k < ITR_MODULE_COUNT; k++) {
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)k, &d_out, &d_in);
      SEG(itr_model_weight(m, l, (itr_module)k), itr_model_weight(g, l, (itr_module)k), d_out * d_in);
      SEG(itr_model_bias(m, l, (itr_module)k), itr_model_bias(g, l, (itr_module)k), d_out);
    }
    SEG(itr_model_norm(m, l, 0), itr_model_norm(g, l, 0), D);
    SEG(itr_model_norm(m, l, 1), itr_model_norm(g, l, 1), D);
  }
  SEG(itr_model_embed_weight(m), itr_model_embed_weight(g), V * D);
  SEG(itr_model_final_norm(m), itr_model_final_norm(g), D);
  if (!itr_model_head_is_embed(g)) SEG(itr_model_lm_head(m), itr_model_lm_head(g), V * D);
#undef SEG
  ITR_ASSERT(off == t->n - t->n_lora);
}

static itr_err setup_local(trainer *t) {
  const itr_train_opts *o = t->o;
  itr_tensor_store *store = NULL;
  itr_adapter *ad = NULL;
  itr_err err;
  ITR_TRY(itr_model_config_read(o->base, &t->cfg));
  ITR_TRY(itr_tensor_store_open(o->base, &store));
  err = itr_model_load(&t->cfg, store, 0, t->cfg.num_hidden_layers, 1, 1, &t->model);
  itr_tensor_store_destroy(store);
  if (err != ITR_OK) return itr_error_frame(err, __func__, __FILE__, __LINE__);
  if (o->n_teachers) ITR_TRY(read_teacher_data(t));
  else ITR_TRY(itr_token_set_read_text(o->data, t->cfg.vocab_size, o->base, &t->tok, &t->data));
  t->have_data = 1;
  ITR_TRY(itr_calloc((size_t)t->data.n_seqs, sizeof(int64_t), "training sequences", &t->use));
  for (int s = 0; s < t->data.n_seqs; s++)
    if (!t->data.group || t->data.group[s] < 0 || t->data.is_label[s]) t->use[t->n_use++] = s;
  ITR_CHECK(t->n_use >= 1, ITR_ERR_INPUT, "%s: no sequences to train on", o->data);
  if (o->from_scratch) init_from_scratch(t);
  if (o->full_rank) return setup_full_rank(t);
  t->dense = o->from_scratch || o->switch_lora;
  ITR_TRY(itr_lora_set_create(&t->cfg, &t->lora));
  if (o->init_adapter[0]) {
    ITR_TRY(itr_adapter_open(o->init_adapter, &t->cfg, &ad));
    err = itr_lora_set_add_adapter(t->lora, ad, 0, t->cfg.num_hidden_layers, 1.0);
    itr_adapter_destroy(ad);
    if (err != ITR_OK) return itr_error_frame(err, __func__, __FILE__, __LINE__);
    t->fold_scaling = 1;
  } else {
    ITR_TRY(init_fresh(t));
  }
  if (o->switch_lora) {
    itr_switch_opts so = {o->switch_interval, o->switch_descent, o->switch_warm, o->steps, (uint64_t)o->seed};
    ITR_TRY(itr_switch_create(&so, t->lora, &t->sw));
  }
  ITR_TRY(itr_lora_set_create_like(t->lora, &t->grad));
  t->n_lora = t->n = itr_lora_set_n_params(t->lora);
  ITR_CHECK(t->n > 0, ITR_ERR_INPUT, "-train: nothing to train (no LoRA module)");
  size_t n_dense = 0;
  if (t->dense) {
    ITR_TRY(itr_model_create_except(&t->cfg, o->targets, &t->gmodel));
    (void)itr_model_params(t->gmodel, &n_dense);
    t->n += n_dense;
  }
  ITR_TRY(itr_calloc(t->n, sizeof(float), "trained parameters", &t->params));
  ITR_TRY(itr_calloc(t->n_lora, sizeof(float), "LoRA gradient (f32)", &t->gflat));
  ITR_TRY(itr_calloc(t->n + 2, sizeof(double), "gradient", &t->gbuf));
  ITR_TRY(itr_calloc((size_t)(o->steps > 0 ? o->steps : 1), sizeof(double), "loss curve", &t->loss_curve));
  ITR_TRY(itr_adamw_init(&t->opt, t->n));
  if (t->sw) ITR_TRY(itr_adamw_enable_age(&t->opt));
  itr_lora_set_pack(t->lora, t->params);
  if (t->dense) dense_copy(t, t->params + t->n_lora, 0);
  return ITR_OK;
}

static void trainer_fini(trainer *t) {
  itr_model_destroy(t->model);
  if (t->have_data) itr_token_set_fini(&t->data);
  free(t->use);
  itr_tokenizer_destroy(t->tok);
  itr_lora_set_destroy(t->lora);
  itr_lora_set_destroy(t->grad);
  if (!t->o->full_rank) free(t->params); /* -full_rank: params are the model's own */
  itr_switch_destroy(t->sw);
  itr_model_destroy(t->gmodel);
  for (int i = 0; t->teachers && i < t->o->n_teachers; i++) itr_lora_set_destroy(t->teachers[i]);
  free(t->teachers);
  free(t->task);
  free(t->gflat);
  free(t->gbuf);
  free(t->loss_curve);
  itr_adamw_fini(&t->opt);
}

/* ---- data order ------------------------------------------------------------------------------------ */

/* The global index of the k-th sequence of training (k = step * batch + j): epoch e = k / n is a
 * Fisher-Yates shuffle of 0..n-1 seeded by (seed, e). perm (n) caches the current epoch's. */
static int64_t seq_at(int64_t k, const trainer *t, int64_t *perm, int64_t *perm_epoch) {
  int64_t n = t->n_use, e = k / n;
  if (*perm_epoch != e) {
    itr_rng g;
    itr_rng_init_stream(&g, (uint64_t)t->o->seed, 0x7261696eull + (uint64_t)e);
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
      int64_t j = (int64_t)itr_rng_below(&g, (uint64_t)(i + 1)), tmp = perm[i];
      perm[i] = perm[j];
      perm[j] = tmp;
    }
    *perm_epoch = e;
  }
  return t->use[perm[k % n]];
}

/* ---- one micro-batch: pack sequences, labels, run the training pass -------------------------------- */

typedef struct {
  int32_t *ids, *labels; /* (T) */
  int64_t *offsets;      /* (n_seqs + 1) */
  int64_t *seq_ids;      /* (n_seqs) */
} micro_buf;

static itr_err micro_batch(trainer *t, const int64_t *seqs, int n_seqs, long step, micro_buf *mb, double *loss,
                           int64_t *count, int64_t *tokens) {
  const itr_token_set *d = &t->data;
  int64_t T = 0;
  mb->offsets[0] = 0;
  for (int s = 0; s < n_seqs; s++) {
    int64_t b = d->offsets[seqs[s]], n = d->offsets[seqs[s] + 1] - b;
    memcpy(mb->ids + T, d->ids + b, (size_t)n * sizeof(int32_t));
    int64_t first = d->prompt_len && d->prompt_len[seqs[s]] > 1 ? d->prompt_len[seqs[s]] : 1; /* first target */
    for (int64_t i = 0; i < n; i++) mb->labels[T + i] = i + 1 < n && i + 1 >= first ? d->ids[b + i + 1] : -1;
    T += n;
    mb->offsets[s + 1] = T;
    mb->seq_ids[s] = seqs[s];
  }
  itr_seq_layout lay = {n_seqs, mb->offsets};
  float *teacher = NULL;
  if (t->teachers) { /* each sequence's teacher logits, (T, V) */
    const int64_t V = t->cfg.vocab_size;
    ITR_TRY(itr_calloc((size_t)T, (size_t)V * sizeof(float), "teacher logits", &teacher));
    itr_err e = ITR_OK;
    for (int s = 0; e == ITR_OK && s < n_seqs; s++)
      e = itr_model_forward(t->model, mb->ids + mb->offsets[s], mb->offsets[s + 1] - mb->offsets[s], NULL,
                            t->teachers[t->task[seqs[s]]], NULL, NULL, teacher + mb->offsets[s] * V);
    if (e != ITR_OK) {
      free(teacher);
      return e;
    }
  }
  itr_lora_dropout dr = {t->o->dropout, (uint64_t)t->o->seed, (uint64_t)step, mb->seq_ids};
  double l = 0;
  int64_t c = 0;
  itr_err e = itr_model_loss_grad_full(t->model, mb->ids, mb->labels, T, &lay, t->lora,
                                       t->o->dropout > 0 && t->lora ? &dr : NULL, teacher, t->grad, t->gmodel, &l, &c);
  free(teacher);
  ITR_TRY(e);
  *loss += l;
  *count += c;
  *tokens += T;
  return ITR_OK;
}

/* Gradient of this rank's sequences (a list of global indices) into t->gbuf, summed over ranks:
 * gbuf[0..n) the gradient of the summed loss, gbuf[n] the loss sum, gbuf[n+1] the target count.
 * Collective on t->comm. */
static itr_err gradient(trainer *t, const int64_t *mine, int n_mine, long step, int64_t *tokens) {
  micro_buf mb = {0};
  int64_t max_T = 0;
  for (int s = 0; s < n_mine; s++) max_T += t->data.offsets[mine[s] + 1] - t->data.offsets[mine[s]];
  double loss = 0;
  int64_t count = 0;
  size_t ng = 0;
  float *gw = t->gmodel ? itr_model_params(t->gmodel, &ng) : NULL;
  if (t->grad) itr_lora_set_zero(t->grad);
  if (gw) memset(gw, 0, ng * sizeof(float));
  itr_err err = itr_calloc((size_t)(max_T > 0 ? max_T : 1), sizeof(int32_t), "batch ids", &mb.ids);
  if (err == ITR_OK) err = itr_calloc((size_t)(max_T > 0 ? max_T : 1), sizeof(int32_t), "batch labels", &mb.labels);
  if (err == ITR_OK) err = itr_calloc((size_t)n_mine + 1, sizeof(int64_t), "batch offsets", &mb.offsets);
  if (err == ITR_OK) err = itr_calloc((size_t)n_mine + 1, sizeof(int64_t), "batch sequence ids", &mb.seq_ids);
  int K = t->o->grad_accum;
  for (int a = 0; err == ITR_OK && a < K; a++) {
    int lo = (int)((int64_t)n_mine * a / K), hi = (int)((int64_t)n_mine * (a + 1) / K);
    if (hi > lo) err = micro_batch(t, mine + lo, hi - lo, step, &mb, &loss, &count, tokens);
  }
  free(mb.ids);
  free(mb.labels);
  free(mb.offsets);
  free(mb.seq_ids);
  ITR_TRY(itr_dist_agree(t->comm, err));
  if (t->grad) itr_lora_set_pack(t->grad, t->gflat);
  for (size_t i = 0; i < t->n_lora; i++) t->gbuf[i] = t->gflat[i];
  for (size_t i = 0; i < ng; i++) t->gbuf[t->n_lora + i] = gw[i];
  t->gbuf[t->n] = loss;
  t->gbuf[t->n + 1] = (double)count;
  ITR_TRY(itr_dist_allreduce_sum(t->gbuf, (int64_t)t->n + 2, t->comm, "LoRA gradient"));
  return ITR_OK;
}

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

static itr_err write_gradient(const trainer *t, const char *path) {
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
        itr_name_lora(l, (itr_module)m, which ? 'B' : 'A', name, sizeof name);
        err = itr_st_writer_add(w, name, ITR_F64, 2, shape, t->gbuf + off);
        off += cnt;
      }
    }
  if (err == ITR_OK) err = itr_st_writer_set_metadata(w, "format", "iteris-mpi LoRA gradient of the mean loss");
  if (err == ITR_OK) err = itr_st_writer_write(w, path);
  itr_st_writer_destroy(w);
  return err;
}

static itr_err write_report(const trainer *t, const char *dir) {
  const itr_train_opts *o = t->o;
  char path[ITR_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/train_report.json", dir);
  size_t cap = 4096 + (size_t)(o->steps > 0 ? o->steps : 1) * 32, len = 0;
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
  PUT("\t\"trainable_parameters\":\t%zu,\n\t\"tokens_per_second\":\t%.1f,\n\t\"wall_seconds\":\t%.3f,\n", t->n,
      t->tokens_per_s, t->wall_s);
  PUT("\t\"loss\":\t[");
  for (int s = 0; s < o->steps; s++) PUT("%s%.9g", s ? ", " : "", t->loss_curve[s]);
  PUT("]\n}\n");
#undef PUT
  itr_err err = len < cap ? itr_iofile_write_atomic(path, buf, len)
                          : itr_error_set(ITR_ERR_INTERNAL, "train report longer than its buffer");
  free(buf);
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

static void checkpoint_path(const trainer *t, char *buf, size_t len) {
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

static itr_err remove_partial(const trainer *t) {
  char partial[ITR_PATH_MAX + 16];
  snprintf(partial, sizeof partial, "%s.partial", t->o->out);
  return itr_iofile_remove_tree(partial);
}

static itr_err write_out(const trainer *t) {
  char partial[ITR_PATH_MAX + 16], ck[ITR_PATH_MAX + 64];
  snprintf(partial, sizeof partial, "%s.partial", t->o->out);
  checkpoint_path(t, ck, sizeof ck);
  ITR_TRY(itr_iofile_mkdirs(partial));
  (void)unlink(ck); /* the finished adapter carries no checkpoint */
  if (t->gmodel) ITR_TRY(write_model(t, partial));
  else ITR_TRY(write_adapter(t, partial));
  ITR_TRY(write_report(t, partial));
  return itr_iofile_commit_dir(partial, t->o->out);
}

/* ---- checkpoint --------------------------------------------------------------------------------------- */

/* The options a checkpoint belongs to: a restart with others is refused (ranks and micro-batches may change). */
static void checkpoint_key(const trainer *t, char *buf, size_t len) {
  const itr_train_opts *o = t->o;
  snprintf(buf, len,
           "base=%s data=%s init=%s r=%d alpha=%.17g rslora=%d targets=%u dropout=%.17g steps=%d batch=%d lr=%.17g "
           "warmup=%d min_lr_ratio=%.17g betas=%.17g,%.17g eps=%.17g wd=%.17g clip=%.17g seed=%ld n=%zu full=%d,%d "
           "teachers=%d switch=%d,%d,%.17g,%d",
           o->base, o->data, o->init_adapter, o->r, o->lora_alpha, o->rslora, o->targets, o->dropout, o->steps,
           o->batch, o->lr, o->warmup, o->min_lr_ratio, o->beta1, o->beta2, o->eps, o->weight_decay,
           o->max_grad_norm, o->seed, t->n, o->full_rank, o->from_scratch, o->n_teachers, o->switch_lora,
           o->switch_interval, o->switch_descent, o->switch_warm);
}

/* Rank 0: the state after `done` steps. */
static itr_err checkpoint_write(const trainer *t, int done) {
  char path[ITR_PATH_MAX + 64], dir[ITR_PATH_MAX + 16], key[ITR_PATH_MAX * 3 + 512], num[64];
  snprintf(dir, sizeof dir, "%s.partial", t->o->out);
  checkpoint_path(t, path, sizeof path);
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

/* Rank 0 reads the checkpoint (*found = 0 when there is none), then every rank receives it. */
static itr_err checkpoint_read_local(trainer *t, int *found, double **state, size_t *ns) {
  char path[ITR_PATH_MAX + 64], key[ITR_PATH_MAX * 3 + 512];
  checkpoint_path(t, path, sizeof path);
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

static itr_err checkpoint_restore(trainer *t) {
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
  if (t->lora) itr_lora_set_unpack(t->lora, t->params);
  if (t->dense) dense_copy(t, t->params + t->n_lora, 1);
  if (t->rank == 0) itr_log(ITR_LOG_INFO, "-restart: continuing after step %d of %d", t->step0, t->o->steps);
  return ITR_OK;
}

/* The signal to stop on before step s, agreed by every rank (0: go on). */
static int stop_agreed(const trainer *t, int s) {
  int sig = itr_signals_requested();
  const char *at = getenv("ITERIS_FAULT_TRAIN_STOP_AT"); /* the restart tests: a signal before that step */
  if (!sig && at && atoi(at) == s) sig = 10;
  int all = 0;
  MPI_Allreduce(&sig, &all, 1, MPI_INT, MPI_MAX, t->comm);
  return all;
}

/* ---- the run ----------------------------------------------------------------------------------------- */

static itr_err train_loop(trainer *t) {
  const itr_train_opts *o = t->o;
  int64_t n = t->n_use, perm_epoch = -1;
  int64_t *perm = NULL, *mine = NULL;
  itr_err err = itr_calloc((size_t)n, sizeof(int64_t), "data order", &perm);
  if (err == ITR_OK) err = itr_calloc((size_t)o->batch, sizeof(int64_t), "this rank's sequences", &mine);
  err = itr_dist_agree(t->comm, err);
  double t0 = itr_wtime(), tokens_total = 0;
  for (int s = t->step0; err == ITR_OK && s < o->steps; s++) {
    int sig = stop_agreed(t, s);
    if (sig) {
      err = itr_dist_agree(t->comm, t->rank == 0 ? checkpoint_write(t, s) : ITR_OK);
      if (err == ITR_OK)
        err = itr_error_set(ITR_ERR_INTERRUPTED,
                            "stopped by signal %d before step %d of %d: the state is in %s.partial/; rerun the same "
                            "command with -restart 1 to continue",
                            sig, s + 1, o->steps, o->out);
      break;
    }
    int n_mine = 0;
    for (int j = t->rank; j < o->batch; j += t->size)
      mine[n_mine++] = seq_at((int64_t)s * o->batch + j, t, perm, &perm_epoch);
    int64_t tokens = 0;
    err = gradient(t, mine, n_mine, s, &tokens);
    if (err != ITR_OK) break;
    double count = t->gbuf[t->n + 1];
    for (size_t i = 0; i < t->n; i++) t->gbuf[i] /= count > 0 ? count : 1;
    double loss = count > 0 ? t->gbuf[t->n] / count : 0;
    double gnorm = itr_clip_grad_norm(t->gbuf, t->n, o->max_grad_norm);
    double lr = o->lr * itr_train_lr_factor(s, o->steps, o->warmup, o->min_lr_ratio);
    if (t->sw) { /* switch after clipping, before the optimizer (the reference's order) */
      err = itr_switch_step(t->sw, s, t->lora, t->model, t->gbuf, &t->opt);
      if (err != ITR_OK) break;
      itr_lora_set_pack(t->lora, t->params);
    }
    itr_adamw_step(&t->opt, t->params, t->gbuf, lr, o->beta1, o->beta2, o->eps, o->weight_decay);
    if (t->lora) itr_lora_set_unpack(t->lora, t->params);
    if (t->dense) dense_copy(t, t->params + t->n_lora, 1);
    t->loss_curve[s] = loss;
    if (o->checkpoint_every > 0 && (s + 1) % o->checkpoint_every == 0 && s + 1 < o->steps) {
      err = itr_dist_agree(t->comm, t->rank == 0 ? checkpoint_write(t, s + 1) : ITR_OK);
      if (err != ITR_OK) break;
    }
    double all_tokens = (double)tokens;
    MPI_Allreduce(MPI_IN_PLACE, &all_tokens, 1, MPI_DOUBLE, MPI_SUM, t->comm);
    tokens_total += all_tokens;
    if (t->rank == 0 && o->log_every > 0 && ((s + 1) % o->log_every == 0 || s + 1 == o->steps || s == 0)) {
      double el = itr_wtime() - t0, per = el / (s + 1 - t->step0);
      itr_log(ITR_LOG_INFO, "step %d/%d  loss %.4f  grad norm %.3g  lr %.3g  %.0f tokens/s  ETA %.0f s", s + 1,
              o->steps, loss, gnorm, lr, tokens_total / (el > 0 ? el : 1e-9), per * (o->steps - s - 1));
    }
  }
  t->wall_s = itr_wtime() - t0;
  t->tokens_per_s = t->wall_s > 0 ? tokens_total / t->wall_s : 0;
  free(perm);
  free(mine);
  return err;
}

itr_err itr_train_run(const itr_train_opts *o, MPI_Comm comm) {
  trainer t;
  memset(&t, 0, sizeof t);
  t.o = o;
  t.comm = comm;
  MPI_Comm_rank(comm, &t.rank);
  MPI_Comm_size(comm, &t.size);
  itr_err err = itr_dist_agree(comm, check_opts(o));
  if (err == ITR_OK) err = itr_dist_agree(comm, setup_local(&t));
  if (err == ITR_OK && o->grad_out[0]) {
    /* the gradient of the mean loss over all the data at the starting point, then stop */
    int64_t *all = NULL;
    err = itr_dist_agree(comm, itr_calloc((size_t)t.n_use, sizeof(int64_t), "sequence list", &all));
    int n_mine = 0;
    for (int64_t s = t.rank; err == ITR_OK && s < t.n_use; s += t.size) all[n_mine++] = t.use[s];
    int64_t tokens = 0;
    if (err == ITR_OK) err = gradient(&t, all, n_mine, 0, &tokens);
    free(all);
    if (err == ITR_OK) {
      if (t.rank == 0)
        itr_log(ITR_LOG_INFO, "mean loss %.9g over %.0f targets; gradient written to %s",
                t.gbuf[t.n] / t.gbuf[t.n + 1], t.gbuf[t.n + 1], o->grad_out);
      err = itr_dist_agree(comm, t.rank == 0 ? write_gradient(&t, o->grad_out) : ITR_OK);
    }
    trainer_fini(&t);
    return err;
  }
  if (err == ITR_OK) {
    if (t.rank == 0)
      itr_log(ITR_LOG_INFO, "training %zu %s on %lld sequences (%lld tokens), %d ranks, %d steps of %d", t.n,
              o->full_rank ? "weights (full rank)" : "LoRA parameters", (long long)t.n_use, (long long)t.data.n_tokens,
              t.size, o->steps, o->batch);
    if (o->restart) err = checkpoint_restore(&t);
    else err = itr_dist_agree(comm, t.rank == 0 ? remove_partial(&t) : ITR_OK);
    if (err == ITR_OK) err = train_loop(&t);
  }
  if (err == ITR_OK) err = itr_dist_agree(comm, t.rank == 0 ? write_out(&t) : ITR_OK);
  if (err == ITR_OK && t.rank == 0) itr_log(ITR_LOG_INFO, "%s written to %s", t.gmodel ? "model" : "adapter", o->out);
  trainer_fini(&t);
  return err;
}
