/* Held-out scores of the base model, of adapters and of their probability-averaged ensemble
 * (include/iteris/train.h, itr_evaluate_adapters). Every rank loads the model and every adapter
 * and scores the sequences s = rank, rank + P, ...; one sum over ranks gathers the token sums and
 * the per-sequence choice scores, and rank 0 turns them into the table. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/dist.h"
#include "iteris/eval.h"
#include "iteris/io.h"
#include "iteris/train.h"

typedef struct {
  const itr_eval_opts *o;
  MPI_Comm comm;
  int rank, size, M, K; /* members; scored models K = 1 + M (+ 1: the ensemble when M >= 2) */
  itr_model_config cfg;
  itr_model *model;
  itr_lora_set **sets; /* (M) */
  itr_token_set data;
  int have_data;
  itr_tokenizer *tok;
  int ref;             /* -eval_reference: index (1..M) of the reference adapter, 0: none */
  /* sums over ranks: per model k, NS values at NS k: token NLL, top-1 hits, tokens (plain sequences), then
     KL(reference || model), top-1 agreement with the reference, positions compared (plain sequences and the
     labelled choice of questions); then the choice scores */
  double *buf;         /* (NS K + K n_seqs) */
} evaluator;

enum { NS = 6 };

static itr_err setup_local(evaluator *e) {
  const itr_eval_opts *o = e->o;
  itr_tensor_store *store = NULL;
  ITR_TRY(itr_model_config_read(o->base, &e->cfg));
  ITR_TRY(itr_tensor_store_open(o->base, &store));
  itr_err err = itr_model_load(&e->cfg, store, 0, e->cfg.num_hidden_layers, 1, 1, &e->model);
  itr_tensor_store_destroy(store);
  ITR_TRY(err);
  ITR_TRY(itr_token_set_read_text(o->heldout, e->cfg.vocab_size, o->base, &e->tok, &e->data));
  e->have_data = 1;
  ITR_TRY(itr_calloc((size_t)e->M, sizeof *e->sets, "adapter sets", &e->sets));
  for (int m = 0; m < e->M; m++) {
    ITR_TRY(itr_lora_set_create(&e->cfg, &e->sets[m]));
    ITR_TRY(itr_lora_set_add_dir(e->sets[m], o->adapters[m], 1.0)); /* PEFT LoRA or MixLoRA */
  }
  size_t n = NS * (size_t)e->K + (size_t)e->K * (size_t)e->data.n_seqs;
  ITR_TRY(itr_calloc(n, sizeof(double), "evaluation sums", &e->buf));
  return ITR_OK;
}

/* Scores sequence s with every model: token sums (plain sequences) or the choice score (questions). */
static int64_t argmax_f(const float *z, int64_t V) {
  int64_t am = 0;
  for (int64_t j = 1; j < V; j++)
    if (z[j] > z[am]) am = j;
  return am;
}

static itr_err score_sequence(evaluator *e, int s, float *logits, float *reflog, double *ens) {
  const itr_token_set *d = &e->data;
  const int64_t b = d->offsets[s], n = d->offsets[s + 1] - b, V = e->cfg.vocab_size;
  const int64_t first = d->prompt_len && d->prompt_len[s] > 1 ? d->prompt_len[s] : 1;
  const int question = d->group && d->group[s] >= 0;
  if (n <= first) return ITR_OK;
  double *score = e->buf + NS * (size_t)e->K;
  /* fidelity to the reference: plain sequences, and each question once (its labelled choice) */
  const int compare = e->ref && (!question || d->is_label[s]);
  memset(ens, 0, (size_t)n * (size_t)V * sizeof(double));
  if (compare) ITR_TRY(itr_model_forward(e->model, d->ids + b, n, NULL, e->sets[e->ref - 1], NULL, NULL, reflog));
  for (int k = 0; k <= e->M; k++) {
    ITR_TRY(itr_model_forward(e->model, d->ids + b, n, NULL, k == 0 ? NULL : e->sets[k - 1], NULL, NULL, logits));
    double sum = 0;
    for (int64_t t = first; t < n; t++) {
      const float *z = logits + (t - 1) * V;
      double lp = itr_log_softmax_at(z, V, d->ids[b + t]);
      sum += lp;
      if (!question) {
        e->buf[NS * k] -= lp;
        e->buf[NS * k + 1] += argmax_f(z, V) == d->ids[b + t];
        e->buf[NS * k + 2] += 1;
      }
      if (compare) {
        const float *zr = reflog + (t - 1) * V;
        e->buf[NS * k + 3] += itr_kl_logits(zr, z, V);
        e->buf[NS * k + 4] += argmax_f(zr, V) == argmax_f(z, V);
        e->buf[NS * k + 5] += 1;
      }
      if (k > 0 && e->M >= 2 && (!question || compare)) { /* the ensemble's distribution: the mean of the members' */
        double mx = z[0], tot = 0;
        for (int64_t j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
        for (int64_t j = 0; j < V; j++) tot += exp((double)z[j] - mx);
        for (int64_t j = 0; j < V; j++) ens[t * V + j] += exp((double)z[j] - mx) / tot / e->M;
      }
    }
    score[(size_t)k * d->n_seqs + s] = sum;
  }
  if (e->M >= 2 && (!question || compare)) {
    int k = e->M + 1;
    for (int64_t t = first; t < n; t++) {
      const double *p = ens + t * V;
      int64_t am = 0;
      for (int64_t j = 1; j < V; j++)
        if (p[j] > p[am]) am = j;
      if (!question) {
        e->buf[NS * k] -= log(p[d->ids[b + t]]);
        e->buf[NS * k + 1] += am == d->ids[b + t];
        e->buf[NS * k + 2] += 1;
      }
      if (compare) { /* KL(reference || the ensemble's mixture) */
        const float *zr = reflog + (t - 1) * V;
        double mx = zr[0], tot = 0, kl = 0;
        for (int64_t j = 1; j < V; j++) mx = zr[j] > mx ? zr[j] : mx;
        for (int64_t j = 0; j < V; j++) tot += exp((double)zr[j] - mx);
        for (int64_t j = 0; j < V; j++) {
          double q = exp((double)zr[j] - mx) / tot;
          if (q > 0) kl += q * (log(q) - log(p[j] > 0 ? p[j] : 1e-300));
        }
        e->buf[NS * k + 3] += kl;
        e->buf[NS * k + 4] += argmax_f(zr, V) == am;
        e->buf[NS * k + 5] += 1;
      }
    }
  }
  return ITR_OK;
}

static itr_err score_local(evaluator *e) {
  const itr_token_set *d = &e->data;
  int64_t max_n = 1;
  for (int s = 0; s < d->n_seqs; s++)
    if (d->offsets[s + 1] - d->offsets[s] > max_n) max_n = d->offsets[s + 1] - d->offsets[s];
  float *logits = NULL, *reflog = NULL;
  double *ens = NULL;
  ITR_TRY(itr_calloc((size_t)max_n, (size_t)e->cfg.vocab_size * sizeof(float), "logits", &logits));
  itr_err err = itr_calloc((size_t)max_n, (size_t)e->cfg.vocab_size * sizeof(double), "ensemble distribution", &ens);
  if (err == ITR_OK && e->ref)
    err = itr_calloc((size_t)max_n, (size_t)e->cfg.vocab_size * sizeof(float), "reference logits", &reflog);
  for (int s = e->rank; err == ITR_OK && s < d->n_seqs; s += e->size) err = score_sequence(e, s, logits, reflog, ens);
  free(logits);
  free(reflog);
  free(ens);
  return err;
}

/* Question metrics of model k (k = M + 1: the ensemble of the members' class probabilities). */
typedef struct {
  double acc, nll, ece;
  int n;
} question_scores;

static itr_err questions(const evaluator *e, int k, question_scores *q) {
  const itr_token_set *d = &e->data;
  const double *score = e->buf + NS * (size_t)e->K;
  memset(q, 0, sizeof *q);
  if (d->n_groups == 0) return ITR_OK;
  double *conf = NULL, *p = NULL, *pm = NULL;
  int *correct = NULL;
  int max_c = 0;
  for (int s = 0, c = 0; s < d->n_seqs; s++) {
    c = (s > 0 && d->group[s] == d->group[s - 1] && d->group[s] >= 0) ? c + 1 : 1;
    if (c > max_c) max_c = c;
  }
  itr_err err = itr_calloc((size_t)d->n_groups, sizeof(double), "confidences", &conf);
  if (err == ITR_OK) err = itr_calloc((size_t)d->n_groups, sizeof(int), "correct", &correct);
  if (err == ITR_OK) err = itr_calloc((size_t)max_c + 1, sizeof(double), "class probabilities", &p);
  if (err == ITR_OK) err = itr_calloc((size_t)max_c + 1, sizeof(double), "class probabilities", &pm);
  int g = 0;
  for (int s = 0; err == ITR_OK && s < d->n_seqs;) {
    if (d->group[s] < 0) {
      s++;
      continue;
    }
    int s0 = s, c = 0, label = -1;
    while (s < d->n_seqs && d->group[s] == d->group[s0]) {
      if (d->is_label[s]) label = c;
      s++, c++;
    }
    /* p = the model's class probabilities (the ensemble: the mean over members of theirs) */
    int k0 = k <= e->M ? k : 1, k1 = k <= e->M ? k : e->M;
    for (int j = 0; j < c; j++) p[j] = 0;
    for (int kk = k0; kk <= k1; kk++) {
      const double *sc = score + (size_t)kk * d->n_seqs + s0;
      double mx = sc[0], tot = 0;
      for (int j = 1; j < c; j++) mx = sc[j] > mx ? sc[j] : mx;
      for (int j = 0; j < c; j++) tot += (pm[j] = exp(sc[j] - mx));
      for (int j = 0; j < c; j++) p[j] += pm[j] / tot / (k1 - k0 + 1);
    }
    int am = 0;
    for (int j = 1; j < c; j++)
      if (p[j] > p[am]) am = j;
    conf[g] = p[am];
    correct[g] = am == label;
    q->acc += correct[g];
    q->nll -= log(p[label]);
    g++;
  }
  if (err == ITR_OK) {
    q->n = g;
    q->acc /= g;
    q->nll /= g;
    q->ece = itr_ece(conf, correct, g, e->o->bins);
  }
  free(conf);
  free(correct);
  free(p);
  free(pm);
  return err;
}

static const char *model_name(const evaluator *e, int k, char *buf, size_t len) {
  if (k == 0) return "base";
  if (k > e->M) return "ensemble";
  snprintf(buf, len, "%s", e->o->adapters[k - 1]);
  return buf;
}

static itr_err report(const evaluator *e) {
  const itr_eval_opts *o = e->o;
  /* the JSON report is built in memory and written with io's atomic writer */
  size_t cap = (size_t)(e->K + 2) * (3 * ITR_TRAIN_PATH + 512), len = 0;
  char *json = NULL;
  ITR_TRY(itr_calloc(cap, 1, "evaluation report", &json));
#define PUT(...) len += (size_t)snprintf(json + len, len < cap ? cap - len : 0, __VA_ARGS__)
  PUT("{\n\t\"base\":\t\"%s\",\n\t\"heldout\":\t\"%s\",\n\t\"ece_bins\":\t%d,\n", o->base, o->heldout, o->bins);
  if (e->ref) PUT("\t\"reference\":\t\"%s\",\n", o->adapters[e->ref - 1]);
  PUT("\t\"models\":\t[");
  printf("%-40s %10s %8s %8s %9s %9s %9s", "model", "token NLL", "top-1", "questions", "accuracy", "label NLL", "ECE");
  if (e->ref) printf(" %9s %9s %11s", "kl_ratio", "top-1 ref", "share kept");
  printf("\n");
  /* -eval_reference: the share of the reference's adaptation kept, on the label NLL of questions when there are
     any, else on the token NLL: (NLL_base - NLL_model) / (NLL_base - NLL_reference) */
  question_scores qb, qr;
  itr_err err = questions(e, 0, &qb);
  if (err == ITR_OK) err = questions(e, e->ref, &qr);
  const double *B = e->buf, *Rf = e->buf + NS * e->ref;
  double kl_base = B[5] > 0 ? B[3] / B[5] : NAN;
  for (int k = 0; err == ITR_OK && k < e->K; k++) {
    question_scores q;
    err = questions(e, k, &q);
    if (err != ITR_OK) break;
    const double *S = e->buf + NS * k;
    double ntok = S[2], nll = ntok > 0 ? S[0] / ntok : NAN, top1 = ntok > 0 ? S[1] / ntok : NAN;
    double kl = S[5] > 0 ? S[3] / S[5] : NAN, agree = S[5] > 0 ? S[4] / S[5] : NAN, kl_ratio = kl / kl_base;
    double share = q.n ? (qb.nll - q.nll) / (qb.nll - qr.nll)
                       : (B[0] / B[2] - nll) / (B[0] / B[2] - Rf[0] / Rf[2]);
    char buf[ITR_TRAIN_PATH];
    const char *name = model_name(e, k, buf, sizeof buf);
    printf("%-40s %10.4f %8.4f %8d %9.4f %9.4f %9.4f", name, nll, top1, q.n, q.n ? q.acc : NAN, q.n ? q.nll : NAN,
           q.n ? q.ece : NAN);
    if (e->ref) printf(" %9.4f %9.4f %11.4f", kl_ratio, agree, share);
    printf("\n");
    PUT("%s\n\t\t{\"model\":\t\"%s\",\t\"tokens\":\t%.0f,\t\"token_nll\":\t%.9g,\t\"token_top1\":\t%.9g,\t"
        "\"questions\":\t%d,\t\"accuracy\":\t%.9g,\t\"label_nll\":\t%.9g,\t\"ece\":\t%.9g",
        k ? "," : "", name, ntok, ntok > 0 ? nll : 0, ntok > 0 ? top1 : 0, q.n, q.n ? q.acc : 0, q.n ? q.nll : 0,
        q.n ? q.ece : 0);
    if (e->ref)
      PUT(",\t\"kl_to_reference\":\t%.9g,\t\"kl_ratio\":\t%.9g,\t\"top1_agreement\":\t%.9g,\t\"share_kept\":\t%.9g",
          isfinite(kl) ? kl : 0, isfinite(kl_ratio) ? kl_ratio : 0, isfinite(agree) ? agree : 0,
          isfinite(share) ? share : 0);
    PUT("}");
  }
  PUT("\n\t]\n}\n");
#undef PUT
  fflush(stdout);
  if (err == ITR_OK && o->out[0])
    err = len < cap ? itr_iofile_write_atomic(o->out, json, len)
                    : itr_error_set(ITR_ERR_INTERNAL, "evaluation report longer than its buffer");
  free(json);
  return err;
}

itr_err itr_evaluate_adapters(const itr_eval_opts *o, MPI_Comm comm) {
  evaluator e;
  memset(&e, 0, sizeof e);
  e.o = o;
  e.comm = comm;
  MPI_Comm_rank(comm, &e.rank);
  MPI_Comm_size(comm, &e.size);
  e.M = o->n_adapters;
  e.K = 1 + e.M + (e.M >= 2);
  itr_err err = itr_dist_agree(comm, (o->n_adapters >= 1 && o->n_adapters <= ITR_EVAL_MAX && o->heldout[0] &&
                                      o->bins >= 1)
                                         ? ITR_OK
                                         : itr_error_set(ITR_ERR_INPUT, "-ensemble needs 1..%d adapters, -heldout "
                                                                        "FILE.jsonl and -ece_bins >= 1",
                                                         ITR_EVAL_MAX));
  for (int m = 0; err == ITR_OK && o->reference[0] && m < e.M; m++)
    if (strcmp(o->reference, o->adapters[m]) == 0) e.ref = m + 1;
  if (err == ITR_OK && o->reference[0] && !e.ref)
    err = itr_dist_agree(comm, itr_error_set(ITR_ERR_INPUT, "-eval_reference %s is not one of the -ensemble adapters "
                                             "(name it there too, with the same spelling)", o->reference));
  if (err == ITR_OK) err = itr_dist_agree(comm, setup_local(&e));
  if (err == ITR_OK) err = itr_dist_agree(comm, score_local(&e));
  if (err == ITR_OK) {
    size_t n = NS * (size_t)e.K + (size_t)e.K * (size_t)e.data.n_seqs;
    err = itr_dist_allreduce_sum(e.buf, (int64_t)n, comm, "evaluation sums");
  }
  if (err == ITR_OK) err = itr_dist_agree(comm, e.rank == 0 ? report(&e) : ITR_OK);
  itr_model_destroy(e.model);
  for (int m = 0; e.sets && m < e.M; m++) itr_lora_set_destroy(e.sets[m]);
  free(e.sets);
  if (e.have_data) itr_token_set_fini(&e.data);
  itr_tokenizer_destroy(e.tok);
  free(e.buf);
  return err;
}
