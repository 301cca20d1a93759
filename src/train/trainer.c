/* The training run (include/iteris/train.h): setup on every rank, the data order, the local
 * gradient of this rank's share of each batch and its sum over ranks, and the step loop (clipping,
 * SwitchLoRA, AdamW). Every phase ends at an agreement point, so all ranks return the same error;
 * writing is in train_output.c, the checkpoint in train_checkpoint.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iteris/dist.h"
#include "train/train_internal.h"

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
  o->mixlora_top_k = 2;
  o->mixlora_aux_coef = 0.001;
}

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
  ITR_CHECK((o->train_only & ~7u) == 0 && (!o->train_only || !(o->full_rank || o->from_scratch || o->switch_lora)),
            ITR_ERR_INPUT, "-train_only freezes groups of a MixLoRA adapter: not with -full_rank, -from_scratch or -switch_lora");
  ITR_CHECK(!o->switch_lora || !o->full_rank, ITR_ERR_INPUT,
            "-switch_lora trains LoRA factors: it does not combine with -full_rank");
  ITR_CHECK(!o->switch_lora || (o->switch_interval >= 1 && o->switch_warm >= 0 && o->switch_descent >= 0), ITR_ERR_INPUT,
            "-switch_lora_interval %d must be >= 1, -switch_lora_warm %d >= 0, -switch_lora_descent %g >= 0",
            o->switch_interval, o->switch_warm, o->switch_descent);
  ITR_CHECK(o->distil_drop >= 0 && o->distil_drop < 1 && (o->distil_drop == 0 || o->n_teachers), ITR_ERR_INPUT,
            "-distil_drop %g must be in [0, 1) and goes with -distil", o->distil_drop);
  ITR_CHECK(o->val_fraction >= 0 && o->val_fraction <= 0.5 && o->eval_every >= 0, ITR_ERR_INPUT,
            "-val_fraction %g must be in [0, 0.5] and -eval_every %d >= 0", o->val_fraction, o->eval_every);
  ITR_CHECK(o->val_fraction == 0 || (!o->switch_lora && !o->grad_out[0]), ITR_ERR_INPUT,
            "-val_fraction does not combine with -switch_lora (the switches change W) or -grad_out");
  ITR_CHECK(o->mixlora_experts >= 0 && o->mixlora_experts <= 1024 && o->mixlora_aux_coef >= 0 &&
                isfinite(o->mixlora_aux_coef),
            ITR_ERR_INPUT, "-mixlora_experts %d must be in 0..1024 and -mixlora_aux_coef %g >= 0", o->mixlora_experts,
            o->mixlora_aux_coef);
  ITR_CHECK(!o->mixlora_experts || (o->mixlora_top_k >= 1 && o->mixlora_top_k <= o->mixlora_experts), ITR_ERR_INPUT,
            "-mixlora_top_k %d must be in 1..%d (-mixlora_experts)", o->mixlora_top_k, o->mixlora_experts);
  ITR_CHECK(!o->mixlora_experts || (o->targets & ((1u << ITR_GATE_PROJ) | (1u << ITR_UP_PROJ) | (1u << ITR_DOWN_PROJ))),
            ITR_ERR_INPUT, "-mixlora_experts: -targets names no feed-forward module (gate_proj, up_proj, down_proj) "
            "for the experts");
  ITR_CHECK(!o->mixlora_experts || (!o->init_adapter[0] && !o->n_teachers && !o->full_rank && !o->from_scratch &&
                                    !o->switch_lora),
            ITR_ERR_INPUT, "-mixlora_experts trains a fresh MixLoRA adapter: it does not combine with -init_adapter "
            "(a MixLoRA -init_adapter brings its own experts), -distil, -full_rank, -from_scratch or -switch_lora");
  ITR_CHECK(o->max_grad_norm >= 0, ITR_ERR_INPUT, "-max_grad_norm %g must be >= 0 (0: no clipping)", o->max_grad_norm);
  return ITR_OK;
}

/* MixLoRA as the reference initialises it: each layer's router (E, D) ~ N(0, 0.02^2) (router_init_range),
 * each expert's gate/up/down of -targets A as PEFT's, B = 0; every (layer, expert, module) its own stream.
 * A, B: scratch of r * (widest module) floats, B zero. */
static itr_err init_experts(trainer *t, float scaling, float *A, const float *B) {
  const itr_train_opts *o = t->o;
  const int E = o->mixlora_experts, L = t->cfg.num_hidden_layers;
  const int64_t D = t->cfg.hidden_size;
  float *router = NULL;
  ITR_TRY(itr_calloc((size_t)E * (size_t)D, sizeof(float), "router init", &router));
  itr_err err = ITR_OK;
  for (int l = 0; err == ITR_OK && l < L; l++) {
    itr_rng g;
    itr_rng_init_stream(&g, (uint64_t)o->seed, 0x726f7574ull * 4096 + (uint64_t)l);
    for (int64_t i = 0; i < (int64_t)E * D; i++) router[i] = (float)(0.02 * itr_rng_normal(&g));
    err = itr_lora_set_set_moe(t->lora, l, E, o->mixlora_top_k, router);
    for (int e = 0; err == ITR_OK && e < E; e++)
      for (int m = ITR_GATE_PROJ; err == ITR_OK && m <= ITR_DOWN_PROJ; m++) {
        if (!(o->targets & (1u << m))) continue;
        int64_t d_out, d_in;
        itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
        itr_rng_init_stream(&g, (uint64_t)o->seed, 0x65787074ull * 65536 + ((uint64_t)l * 1024 + (uint64_t)e) * 8 + (uint64_t)m);
        double bound = 1.0 / sqrt((double)d_in);
        for (int64_t i = 0; i < (int64_t)o->r * d_in; i++) A[i] = (float)((2 * itr_rng_uniform(&g) - 1) * bound);
        err = itr_lora_set_set_expert(t->lora, l, e, (itr_module)m, o->r, scaling, A, B);
      }
  }
  free(router);
  return err;
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
      if (o->mixlora_experts && m >= ITR_GATE_PROJ) continue; /* experts, below */
      int64_t d_out, d_in;
      itr_module_shape(&t->cfg, (itr_module)m, &d_out, &d_in);
      itr_rng g;
      itr_rng_init_stream(&g, (uint64_t)o->seed, (uint64_t)(l * ITR_MODULE_COUNT + m));
      double bound = 1.0 / sqrt((double)d_in);
      for (int64_t i = 0; i < (int64_t)o->r * d_in; i++) A[i] = (float)((2 * itr_rng_uniform(&g) - 1) * bound);
      err = itr_lora_set_add(t->lora, l, (itr_module)m, o->r, (float)scaling, A, B);
    }
  if (err == ITR_OK && o->mixlora_experts) err = init_experts(t, (float)scaling, A, B);
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
  ITR_TRY(itr_calloc(t->n + 3, sizeof(double), "weight gradient", &t->gbuf));
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
    ITR_TRY(itr_lora_set_create(&t->cfg, &t->teachers[i]));
    ITR_TRY(itr_lora_set_add_dir(t->teachers[i], o->teachers[i], 1.0));
  }
  return ITR_OK;
}

/* -val_fraction: of each group's sequences (each teacher's with -distil; else all), a seeded choice of
 * round(fraction n_g) (at least 1, at most n_g - 1) leaves the training set for the validation set. */
static itr_err split_validation(trainer *t) {
  const itr_train_opts *o = t->o;
  if (o->val_fraction <= 0) return ITR_OK;
  int n_groups = t->task ? o->n_teachers : 1;
  int64_t *idx = NULL, *keep = NULL;
  char *is_val = NULL;
  ITR_TRY(itr_calloc((size_t)t->n_use, sizeof(int64_t), "validation split", &idx));
  itr_err err = itr_calloc((size_t)t->n_use, sizeof(int64_t), "training sequences", &keep);
  if (err == ITR_OK) err = itr_calloc((size_t)t->n_use, 1, "validation marks", &is_val);
  if (err == ITR_OK) err = itr_calloc((size_t)t->n_use, sizeof(int64_t), "validation sequences", &t->val);
  for (int g = 0; err == ITR_OK && g < n_groups; g++) {
    int64_t ng = 0;
    for (int64_t i = 0; i < t->n_use; i++)
      if (!t->task || t->task[t->use[i]] == g) idx[ng++] = i;
    itr_rng r;
    itr_rng_init_stream(&r, (uint64_t)o->seed, 0x76616c00ull + (uint64_t)g);
    for (int64_t i = ng - 1; i > 0; i--) {
      int64_t j = (int64_t)itr_rng_below(&r, (uint64_t)(i + 1)), tmp = idx[i];
      idx[i] = idx[j];
      idx[j] = tmp;
    }
    int64_t nv = (int64_t)llround(o->val_fraction * (double)ng);
    if (nv < 1) nv = 1;
    if (nv > ng - 1) nv = ng - 1;
    for (int64_t i = 0; i < nv; i++) is_val[idx[i]] = 1;
  }
  int64_t nk = 0;
  for (int64_t i = 0; err == ITR_OK && i < t->n_use; i++)
    if (is_val[i]) t->val[t->n_val++] = t->use[i];
    else keep[nk++] = t->use[i];
  if (err == ITR_OK) {
    memcpy(t->use, keep, (size_t)nk * sizeof(int64_t));
    t->n_use = nk;
  }
  free(idx);
  free(keep);
  free(is_val);
  ITR_TRY(err);
  ITR_CHECK(t->n_val >= 1 && t->n_use >= 1, ITR_ERR_INPUT,
            "-val_fraction %g: too few sequences to hold some out (%lld)", o->val_fraction, (long long)(t->n_use + t->n_val));
  return ITR_OK;
}

static itr_err setup_local(trainer *t) {
  const itr_train_opts *o = t->o;
  itr_tensor_store *store = NULL;
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
  ITR_TRY(split_validation(t));
  if (o->from_scratch) init_from_scratch(t);
  if (o->full_rank) return setup_full_rank(t);
  t->dense = o->from_scratch || o->switch_lora;
  ITR_TRY(itr_lora_set_create(&t->cfg, &t->lora));
  if (o->init_adapter[0]) {
    ITR_TRY(itr_lora_set_add_dir(t->lora, o->init_adapter, 1.0));
    t->fold_scaling = 1;
  } else {
    ITR_TRY(init_fresh(t));
  }
  if (o->switch_lora) {
    itr_switch_opts so = {o->switch_interval, o->switch_descent, o->switch_warm, o->steps, (uint64_t)o->seed};
    ITR_TRY(itr_switch_create(&so, t->lora, &t->sw));
  }
  for (int l = 0; t->lora->moe && l < t->cfg.num_hidden_layers; l++) {
    int E = t->lora->moe[l].E;
    ITR_CHECK(E == 0 || t->moe_E == 0 || E == t->moe_E, ITR_ERR_INPUT,
              "%s: MixLoRA layers with %d and %d experts: training needs the same number in every layer",
              o->init_adapter, t->moe_E, E);
    if (E) t->moe_E = E;
  }
  if (o->train_only)
    ITR_CHECK(t->moe_E, ITR_ERR_INPUT,
              "-train_only: %s is not a MixLoRA adapter (the groups attention, routers, experts are MixLoRA's)",
              o->init_adapter[0] ? o->init_adapter : "the adapter trained");
  if (t->moe_E) {
    ITR_CHECK(o->dropout == 0, ITR_ERR_INPUT, "-lora_dropout %g: MixLoRA training has no dropout (use 0)", o->dropout);
    t->aux_coef = o->mixlora_aux_coef;
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
  ITR_TRY(itr_calloc(t->n + 3, sizeof(double), "gradient", &t->gbuf));
  ITR_TRY(itr_calloc((size_t)(o->steps > 0 ? o->steps : 1), sizeof(double), "loss curve", &t->loss_curve));
  ITR_TRY(itr_adamw_init(&t->opt, t->n));
  if (t->sw) ITR_TRY(itr_adamw_enable_age(&t->opt));
  itr_lora_set_pack(t->lora, t->params);
  if (t->dense) train_dense_copy(t, t->params + t->n_lora, 0);
  t->n_trained = t->n;
  if (o->train_only) { /* not dense (check_opts): every float is a LoRA one */
    ITR_TRY(itr_calloc(t->n, 1, "frozen mask", &t->frozen));
    ITR_TRY(itr_calloc(t->n, sizeof(float), "frozen parameters", &t->fixed));
    itr_lora_set_groups(t->lora, t->frozen);
    t->n_trained = 0;
    for (size_t i = 0; i < t->n; i++) {
      t->frozen[i] = (t->frozen[i] & o->train_only) == 0;
      t->n_trained += !t->frozen[i];
    }
    memcpy(t->fixed, t->params, t->n * sizeof(float));
    ITR_CHECK(t->n_trained > 0, ITR_ERR_INPUT, "-train_only: %s has no parameter in the groups named",
              o->init_adapter[0] ? o->init_adapter : "the adapter");
  }
  return ITR_OK;
}

static void trainer_fini(trainer *t) {
  itr_model_destroy(t->model);
  if (t->have_data) itr_token_set_fini(&t->data);
  free(t->use);
  free(t->val);
  free(t->best);
  free(t->val_curve);
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
  free(t->frozen);
  free(t->fixed);
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

/* route (MixLoRA's counting pass, not NULL): only the routing, route[0..E) += the counts, route[E] += the routed
 * pairs, route[E + 1] += the targets; aux: the load-balancing term of the training pass (NULL: none). */
static itr_err micro_batch(trainer *t, const int64_t *seqs, int n_seqs, long step, micro_buf *mb, double *loss,
                           int64_t *count, int64_t *tokens, const itr_moe_aux *aux, double *route) {
  const itr_token_set *d = &t->data;
  int64_t T = 0;
  mb->offsets[0] = 0;
  const double drop = t->eval_mode ? 0 : t->o->distil_drop;
  for (int s = 0; s < n_seqs; s++) {
    int64_t b = d->offsets[seqs[s]], n = d->offsets[seqs[s] + 1] - b;
    memcpy(mb->ids + T, d->ids + b, (size_t)n * sizeof(int32_t));
    int64_t first = d->prompt_len && d->prompt_len[seqs[s]] > 1 ? d->prompt_len[seqs[s]] : 1; /* first target */
    if (drop > 0) { /* -distil_drop: each token after the first left out with probability drop (a new input) */
      uint64_t st = ((uint64_t)t->o->seed * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)step << 32) ^ (uint64_t)seqs[s];
      int64_t k = 1;
      for (int64_t i = 1; i < n; i++)
        if ((double)(itr_splitmix64(&st) >> 11) * 0x1.0p-53 >= drop) mb->ids[T + k++] = d->ids[b + i];
      n = k;
      first = 1;
    }
    for (int64_t i = 0; i < n; i++) mb->labels[T + i] = i + 1 < n && i + 1 >= first ? mb->ids[T + i + 1] : -1;
    T += n;
    mb->offsets[s + 1] = T;
    mb->seq_ids[s] = seqs[s];
  }
  itr_seq_layout lay = {n_seqs, mb->offsets};
  if (route) {
    for (int64_t i = 0; i < T; i++) route[t->moe_E + 1] += mb->labels[i] >= 0;
    return itr_model_moe_counts(t->model, mb->ids, T, &lay, t->lora, t->moe_E, route, &route[t->moe_E]);
  }
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
                                       t->o->dropout > 0 && t->lora && !t->eval_mode ? &dr : NULL, teacher, aux,
                                       t->grad, t->gmodel, &l, &c);
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
  /* MixLoRA's load balancing: the routing counts of the whole batch first (a forward pass), summed over ranks */
  double *route = NULL, aux_part = 0;
  itr_moe_aux aux = {0};
  if (t->moe_E && t->aux_coef > 0) { /* every rank enters (the same trainer), so the agreement below pairs up */
    if (err == ITR_OK) err = itr_calloc((size_t)t->moe_E + 2, sizeof(double), "routing counts", &route);
    int64_t unused = 0;
    for (int a = 0; err == ITR_OK && a < K; a++) {
      int lo = (int)((int64_t)n_mine * a / K), hi = (int)((int64_t)n_mine * (a + 1) / K);
      if (hi > lo) err = micro_batch(t, mine + lo, hi - lo, step, &mb, NULL, NULL, &unused, NULL, route);
    }
    err = itr_dist_agree(t->comm, err);
    if (err == ITR_OK) err = itr_dist_allreduce_sum(route, (int64_t)t->moe_E + 2, t->comm, "routing counts");
    /* the trainer divides the loss sum by the batch's targets: weight = coef * targets gives coef * aux */
    if (err == ITR_OK) aux = (itr_moe_aux){t->aux_coef * route[t->moe_E + 1], t->moe_E, route, route[t->moe_E], &aux_part};
  }
  for (int a = 0; err == ITR_OK && a < K; a++) {
    int lo = (int)((int64_t)n_mine * a / K), hi = (int)((int64_t)n_mine * (a + 1) / K);
    if (hi > lo)
      err = micro_batch(t, mine + lo, hi - lo, step, &mb, &loss, &count, tokens, route && aux.n_routed > 0 ? &aux : NULL,
                        NULL);
  }
  free(route);
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
  t->gbuf[t->n + 2] = aux_part;
  ITR_TRY(itr_dist_allreduce_sum(t->gbuf, (int64_t)t->n + 3, t->comm, "LoRA gradient"));
  return ITR_OK;
}

static int stop_agreed(const trainer *t, int s) {
  int sig = itr_signals_requested();
  const char *at = getenv("ITERIS_FAULT_TRAIN_STOP_AT"); /* the restart tests: a signal before that step */
  if (!sig && at && atoi(at) == s) sig = 10;
  int all = 0;
  MPI_Allreduce(&sig, &all, 1, MPI_INT, MPI_MAX, t->comm);
  return all;
}

/* ---- the run ----------------------------------------------------------------------------------------- */

/* The mean loss over the validation sequences (no dropout), summed over ranks; rank p takes p, p + P, ...
 * in chunks of -batch. Collective. The gradients it leaves behind are cleared by the next gradient(). */
static itr_err validation_loss(trainer *t, double *out) {
  micro_buf mb = {0};
  int64_t max_T = 1, chunk = t->o->batch;
  for (int64_t i = t->rank; i < t->n_val; i += t->size) max_T += t->data.offsets[t->val[i] + 1] - t->data.offsets[t->val[i]];
  double sums[2] = {0, 0};
  int64_t tokens = 0, count = 0, *mine = NULL;
  itr_err err = itr_calloc((size_t)max_T, sizeof(int32_t), "validation ids", &mb.ids);
  if (err == ITR_OK) err = itr_calloc((size_t)max_T, sizeof(int32_t), "validation labels", &mb.labels);
  if (err == ITR_OK) err = itr_calloc((size_t)chunk + 1, sizeof(int64_t), "validation offsets", &mb.offsets);
  if (err == ITR_OK) err = itr_calloc((size_t)chunk + 1, sizeof(int64_t), "validation sequence ids", &mb.seq_ids);
  if (err == ITR_OK) err = itr_calloc((size_t)chunk, sizeof(int64_t), "validation sequences", &mine);
  t->eval_mode = 1;
  int n = 0;
  for (int64_t i = t->rank; err == ITR_OK && i < t->n_val; i += t->size) {
    mine[n++] = t->val[i];
    if (n == chunk || i + t->size >= t->n_val) {
      err = micro_batch(t, mine, n, 0, &mb, &sums[0], &count, &tokens, NULL, NULL);
      n = 0;
    }
  }
  t->eval_mode = 0;
  free(mb.ids);
  free(mb.labels);
  free(mb.offsets);
  free(mb.seq_ids);
  free(mine);
  ITR_TRY(itr_dist_agree(t->comm, err));
  sums[1] = (double)count;
  MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, t->comm);
  *out = sums[1] > 0 ? sums[0] / sums[1] : 0;
  return ITR_OK;
}

/* -val_fraction: measures the validation loss after `done` steps and keeps the best parameters. Collective. */
static itr_err validate(trainer *t, int done) {
  double v = 0;
  ITR_TRY(validation_loss(t, &v));
  if (t->n_curve == t->cap_curve) {
    int cap = t->cap_curve ? 2 * t->cap_curve : 64;
    double *c = realloc(t->val_curve, (size_t)cap * 2 * sizeof(double));
    ITR_CHECK(c, ITR_ERR_INTERNAL, "out of memory growing the validation curve");
    t->val_curve = c;
    t->cap_curve = cap;
  }
  t->val_curve[2 * t->n_curve] = done;
  t->val_curve[2 * t->n_curve + 1] = v;
  t->n_curve++;
  if (!t->best) ITR_TRY(itr_calloc(t->n, sizeof(float), "best parameters", &t->best));
  if (t->n_curve == 1 || v < t->best_val) {
    t->best_val = v;
    t->best_step = done;
    memcpy(t->best, t->params, t->n * sizeof(float));
  }
  if (t->rank == 0 && t->o->log_every > 0)
    itr_log(ITR_LOG_INFO, "after step %d: validation loss %.4f (best %.4f after step %d)", done, v, t->best_val,
            t->best_step);
  return ITR_OK;
}

/* The parameters of the lowest validation loss back into the factors (and the model). */
static void restore_best(trainer *t) {
  memcpy(t->params, t->best, t->n * sizeof(float));
  if (t->lora) itr_lora_set_unpack(t->lora, t->params);
  if (t->dense) train_dense_copy(t, t->params + t->n_lora, 1);
  if (t->rank == 0)
    itr_log(ITR_LOG_INFO, "-val_fraction: writing the parameters after step %d (validation loss %.4f)", t->best_step,
            t->best_val);
}

static itr_err train_loop(trainer *t) {
  const itr_train_opts *o = t->o;
  int64_t n = t->n_use, perm_epoch = -1;
  int64_t *perm = NULL, *mine = NULL;
  itr_err err = itr_calloc((size_t)n, sizeof(int64_t), "data order", &perm);
  if (err == ITR_OK) err = itr_calloc((size_t)o->batch, sizeof(int64_t), "this rank's sequences", &mine);
  err = itr_dist_agree(t->comm, err);
  int every = o->eval_every > 0 ? o->eval_every : (o->steps / 20 > 0 ? o->steps / 20 : 1);
  if (err == ITR_OK && t->n_val && t->step0 == 0) err = validate(t, 0);
  double t0 = itr_wtime(), tokens_total = 0;
  for (int s = t->step0; err == ITR_OK && s < o->steps; s++) {
    int sig = stop_agreed(t, s);
    if (sig) {
      err = itr_dist_agree(t->comm, t->rank == 0 ? train_checkpoint_write(t, s) : ITR_OK);
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
    for (size_t i = 0; t->frozen && i < t->n; i++) /* -train_only: no gradient, so no share of the clipping norm */
      if (t->frozen[i]) t->gbuf[i] = 0;
    double loss = count > 0 ? t->gbuf[t->n] / count : 0;
    double gnorm = itr_clip_grad_norm(t->gbuf, t->n, o->max_grad_norm);
    double lr = o->lr * itr_train_lr_factor(s, o->steps, o->warmup, o->min_lr_ratio);
    if (t->sw) { /* switch after clipping, before the optimizer (the reference's order) */
      err = itr_switch_step(t->sw, s, t->lora, t->model, t->gbuf, &t->opt);
      if (err != ITR_OK) break;
      itr_lora_set_pack(t->lora, t->params);
    }
    itr_adamw_step(&t->opt, t->params, t->gbuf, lr, o->beta1, o->beta2, o->eps, o->weight_decay);
    for (size_t i = 0; t->frozen && i < t->n; i++) /* undo the weight decay of the frozen floats */
      if (t->frozen[i]) t->params[i] = t->fixed[i];
    if (t->lora) itr_lora_set_unpack(t->lora, t->params);
    if (t->dense) train_dense_copy(t, t->params + t->n_lora, 1);
    t->loss_curve[s] = loss;
    if (t->n_val && ((s + 1) % every == 0 || s + 1 == o->steps)) {
      err = validate(t, s + 1);
      if (err != ITR_OK) break;
    }
    if (o->checkpoint_every > 0 && (s + 1) % o->checkpoint_every == 0 && s + 1 < o->steps) {
      err = itr_dist_agree(t->comm, t->rank == 0 ? train_checkpoint_write(t, s + 1) : ITR_OK);
      if (err != ITR_OK) break;
    }
    double all_tokens = (double)tokens;
    MPI_Allreduce(MPI_IN_PLACE, &all_tokens, 1, MPI_DOUBLE, MPI_SUM, t->comm);
    tokens_total += all_tokens;
    if (t->rank == 0 && o->log_every > 0 && ((s + 1) % o->log_every == 0 || s + 1 == o->steps || s == 0)) {
      char aux_note[64] = "";
      if (t->moe_E && t->aux_coef > 0) snprintf(aux_note, sizeof aux_note, " (load balancing %.4f)", t->gbuf[t->n + 2]);
      double el = itr_wtime() - t0, per = el / (s + 1 - t->step0);
      itr_log(ITR_LOG_INFO, "step %d/%d  loss %.4f%s  grad norm %.3g  lr %.3g  %.0f tokens/s  ETA %.0f s", s + 1,
              o->steps, loss, aux_note, gnorm, lr, tokens_total / (el > 0 ? el : 1e-9), per * (o->steps - s - 1));
    }
  }
  t->wall_s = itr_wtime() - t0;
  t->tokens_per_s = t->wall_s > 0 ? tokens_total / t->wall_s : 0;
  if (err == ITR_OK && t->n_val) restore_best(t);
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
      err = itr_dist_agree(comm, t.rank == 0 ? train_write_gradient(&t, o->grad_out) : ITR_OK);
    }
    trainer_fini(&t);
    return err;
  }
  if (err == ITR_OK) {
    if (t.rank == 0)
      itr_log(ITR_LOG_INFO, "training %zu %s on %lld sequences (%lld tokens), %d ranks, %d steps of %d", t.n_trained,
              o->full_rank ? "weights (full rank)" : "LoRA parameters", (long long)t.n_use, (long long)t.data.n_tokens,
              t.size, o->steps, o->batch);
    if (o->restart) err = train_checkpoint_restore(&t);
    else err = itr_dist_agree(comm, t.rank == 0 ? train_remove_partial(&t) : ITR_OK);
    if (err == ITR_OK) err = train_loop(&t);
  }
  if (err == ITR_OK) err = itr_dist_agree(comm, t.rank == 0 ? train_write_out(&t) : ITR_OK);
  if (err == ITR_OK && t.rank == 0) itr_log(ITR_LOG_INFO, "%s written to %s", t.gmodel ? "model" : "adapter", o->out);
  trainer_fini(&t);
  return err;
}
