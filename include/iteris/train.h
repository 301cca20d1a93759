/* iteris-mpi train: LoRA training of a Llama-family model, data parallel over MPI ranks.
 *
 * Every rank holds the whole (frozen) model and the LoRA factors; a step takes the next `batch`
 * sequences of a seeded shuffle of the data (epoch after epoch), rank p works on the sequences
 * j = p, p + P, ... of the batch (in `grad_accum` micro-batches), and one MPI_Allreduce sums the
 * factors' gradients, the loss and the number of target tokens. The step's gradient is the
 * gradient of (sum of the batch's token losses) / (its target tokens), so it does not depend on
 * the number of ranks or micro-batches beyond float reassociation. Then, the same on every rank:
 * clipping of the global gradient norm, AdamW (PyTorch's: decoupled weight decay, bias-corrected
 * moments), learning rate with linear warmup and cosine decay (Hugging Face's
 * get_cosine_schedule_with_warmup). Rank 0 writes the adapter (PEFT, r, lora_alpha, use_rslora)
 * and train_report.json, atomically (OUT.partial/ renamed to OUT).
 *
 * Data: JSONL, one {"input_ids": [...]} or {"text": "..."} per line (itr_token_set_read_text: text
 * through the base folder's tokenizer), optionally with a prompt ("prompt_len": k, or a
 * "completion" / "completion_ids" after the prompt; of a question with "choices", the labelled one
 * only): no loss on predicting the prompt. The loss of a sequence is next-token cross-entropy over
 * positions t whose target ids[t+1] has index >= max(k, 1). */
#ifndef ITERIS_TRAIN_H
#define ITERIS_TRAIN_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "iteris/core.h"
#include "iteris/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ITR_TRAIN_PATH 4096

typedef struct {
  char base[ITR_TRAIN_PATH];         /* Hugging Face model folder */
  char data[ITR_TRAIN_PATH];         /* training JSONL */
  char out[ITR_TRAIN_PATH];          /* output adapter folder */
  char init_adapter[ITR_TRAIN_PATH]; /* start from this PEFT adapter ("" : PEFT's initialisation) */
  char grad_out[ITR_TRAIN_PATH];     /* "" or: write the gradient at the start to this safetensors
                                        file (names of the adapter's tensors, F64) and stop */
  int r;                             /* rank of every target module */
  double lora_alpha;                 /* scaling lora_alpha / r (or / sqrt(r) with rslora) */
  int rslora;
  unsigned targets;                  /* bit m: module m (itr_module) is trained */
  double dropout;                    /* LoRA dropout p */
  int steps;                         /* optimizer steps */
  int batch;                         /* sequences per step (global) */
  int grad_accum;                    /* micro-batches per rank per step */
  double lr, min_lr_ratio;           /* peak learning rate; cosine decays to min_lr_ratio * lr */
  int warmup;                        /* warmup steps */
  double beta1, beta2, eps, weight_decay;
  double max_grad_norm;              /* 0: no clipping */
  long seed;                         /* initialisation, data order, dropout */
  int log_every;                     /* rank 0 prints loss, tokens/s and ETA every N steps */
  int checkpoint_every;              /* write OUT.partial/train_checkpoint.safetensors every N steps (0: only
                                        when stopped by a signal) */
  int restart;                       /* continue from that checkpoint */
  int full_rank;                     /* train every weight of the model instead of LoRA factors; OUT is a
                                        Hugging Face model folder */
  int from_scratch;                  /* start from Hugging Face's random initialisation of base's configuration;
                                        without full_rank: LoRA pre-training (the projections of -targets stay
                                        frozen at their random values and train through LoRA; norms, biases,
                                        embedding, head and the other projections train fully) */
  int switch_lora;                   /* SwitchLoRA (itr_switch_*); with it and from_scratch, OUT is a model
                                        folder (W + s B A); implies the same trainable set as from_scratch */
  int switch_interval;               /* base switch interval (40): r / interval vectors switched per step */
  double switch_descent;             /* the interval grows by 1 / 0.3 every switch_descent * steps steps (0.1) */
  int switch_warm;                   /* steps a switched vector's counterpart stays frozen (5) */
  /* distillation (merge, then distil): the loss is KL(p_i || p) on teacher i's sequences, p_i the
     next-token distribution of base + teacher adapter i; the student starts from init_adapter */
  int n_teachers;
  char teachers[64][ITR_TRAIN_PATH];       /* PEFT adapters */
  int n_teacher_data;
  char teacher_data[64][ITR_TRAIN_PATH];   /* one JSONL per teacher (its calibration sequences) */
  double distil_drop;                      /* > 0: each step, each token but the first of a sequence is left out
                                              with this probability (teacher and student see the same input) */
  /* early stopping: val_fraction of the sequences (of each teacher's, with distil) held out, their loss
     measured every eval_every steps (0: steps / 20) and at the end; the parameters of the best are written */
  double val_fraction;
  int eval_every;
  /* MixLoRA (Li et al. 2024): with mixlora_experts E > 0, the gate/up/down modules of -targets become E
     LoRA experts of rank r per layer behind a router (E, D) that picks mixlora_top_k of them per token
     (src/model/moe.c); the attention modules of -targets get plain LoRA. Initialisation as the reference:
     router N(0, 0.02^2), expert A as PEFT's, B 0. The loss adds mixlora_aux_coef times the load-balancing
     loss over each step's batch (itr_moe_aux). OUT is a MixLoRA adapter. Also with an -init_adapter that
     is a MixLoRA adapter (its experts and top_k; mixlora_experts must then be 0). */
  int mixlora_experts;
  int mixlora_top_k;
  double mixlora_aux_coef;
  /* -train_only: with a MixLoRA adapter, train only these parameter groups (bits ITR_LORA_GROUP_*:
     attention, routers, experts); the others keep their starting values. 0: train everything. */
  unsigned train_only;
  int verbose;
} itr_train_opts;

/* Fills o with the defaults (r 8, alpha 16, q/v targets, lr 2e-4, batch 8, ...). */
void itr_train_opts_defaults(itr_train_opts *o);

/* ---- the optimizer (optim.c): pure functions, the same on every rank ------------------------ */

/* The learning-rate multiplier of step s (0-based) of `steps`: s / warmup during the warmup, then
 * min_ratio + (1 - min_ratio) * 0.5 (1 + cos(pi (s - warmup) / (steps - warmup))). */
double itr_train_lr_factor(int s, int steps, int warmup, double min_ratio);

typedef struct {
  size_t n;
  long t;          /* steps taken */
  double *m, *v;   /* first and second moments (n), float64 */
  int32_t *age;    /* NULL, or (n) steps since each entry's moments were last reset (SwitchLoRA) */
} itr_adamw;

itr_err itr_adamw_init(itr_adamw *o, size_t n);
void itr_adamw_fini(itr_adamw *o);
/* Gives every entry its own step count (as SwitchLoRA's StepAdamW): the bias corrections of entry i
 * use age[i], which itr_adamw_reset sets to 0 with its moments; every step adds 1. */
itr_err itr_adamw_enable_age(itr_adamw *o);
/* Zeroes the moments (and the age) of the `count` entries first, first + stride, ... */
void itr_adamw_reset(itr_adamw *o, size_t first, size_t count, size_t stride);
/* One AdamW step on params (n) f32 with gradient g (n) f64, as torch.optim.AdamW:
 * p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
 * p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). */
void itr_adamw_step(itr_adamw *o, float *params, const double *g, double lr, double beta1, double beta2,
                    double eps, double weight_decay);
/* Scales g (n) so that its 2-norm is at most max_norm (torch's clip_grad_norm_: factor
 * max_norm / (norm + 1e-6) when below 1). Returns the norm before clipping. */
double itr_clip_grad_norm(double *g, size_t n, double max_norm);

/* ---- SwitchLoRA (switchlora.c) --------------------------------------------------------------------- */

typedef struct {
  int interval;        /* base switch interval */
  double descent_rate; /* interval = base / 0.3^((step + 1) / (descent_rate * steps)); 0: constant */
  int warm;            /* steps a switched vector's counterpart stays frozen, its moments reset */
  int steps;           /* steps of the run */
  uint64_t seed;       /* the candidates' values */
} itr_switch_opts;

typedef struct itr_switch itr_switch;

/* Takes over every LoRA term of lora (one term per slot): C = min(d_in, d_out) candidates per factor
 * with the reference's uniform bounds; A rows and B columns are set to their first candidates. On
 * error *out may hold a partial object: destroy it. Not Collective (same result on every rank). */
itr_err itr_switch_create(const itr_switch_opts *o, itr_lora_set *lora, itr_switch **out);
void itr_switch_destroy(itr_switch *s); /* accepts NULL */
/* The schedule: vectors of each factor to switch at step s, before rounding (r / interval(s)). */
double itr_switch_rate(const itr_switch_opts *o, int r, int step);
/* Step `step`, after the gradient and before the optimizer: switches this step's A rows and B columns
 * of every term (W of model absorbs each switch, so W + s B A is unchanged), resets the AdamW moments
 * and step count of newly frozen counterparts in opt (NULL: none) and zeroes the gradient of every
 * frozen vector in grad (the LoRA set's pack order; NULL: none). The caller repacks the parameters. */
itr_err itr_switch_step(itr_switch *s, int step, itr_lora_set *lora, itr_model *model, double *grad, itr_adamw *opt);
/* Vectors switched so far, candidates held in memory. */
void itr_switch_counts(const itr_switch *s, int64_t *switched, int64_t *stored_candidates);
/* The whole state (positions, selections, frozen steps, held candidates) as float64 values. */
itr_err itr_switch_serialize(const itr_switch *s, double **out, size_t *len);
itr_err itr_switch_deserialize(itr_switch *s, const double *buf, size_t len);

/* ---- the run (trainer.c) ------------------------------------------------------------------------ */

/* Collective on comm: trains as described above and writes opt->out (or opt->grad_out). The same
 * error on every rank. A stop signal (itr_signals_*, or ITERIS_FAULT_TRAIN_STOP_AT=k in the tests:
 * before step k) is agreed at a step boundary: rank 0 writes OUT.partial/train_checkpoint.safetensors
 * (parameters, AdamW moments and step, loss so far, and the options it belongs to) and every rank
 * returns ITR_ERR_INTERRUPTED; opt->restart = 1 continues from it and gives the adapter the
 * uninterrupted run would have given (bit for bit with the same ranks and micro-batches). */
itr_err itr_train_run(const itr_train_opts *opt, MPI_Comm comm);

/* ---- evaluation of adapters and of their ensemble (evaluate.c) ------------------------------------- */

#define ITR_EVAL_MAX 64

typedef struct {
  char base[ITR_TRAIN_PATH];
  int n_adapters;                              /* M >= 1 */
  char adapters[ITR_EVAL_MAX][ITR_TRAIN_PATH];
  char heldout[ITR_TRAIN_PATH];                /* JSONL: plain sequences and/or questions ("choices") */
  char out[ITR_TRAIN_PATH];                    /* "" or a JSON report */
  int bins;                                    /* ECE bins (equal width) */
  char reference[ITR_TRAIN_PATH];              /* "" or one of adapters: fidelity to it (see below) */
} itr_eval_opts;

/* Collective on comm. Scores the base model, each adapter (base + adapter i) and, when M >= 2, their
 * probability-averaged ensemble (LoRA ensembles: p = mean_i p_i) on the held-out file:
 *   plain sequences (beyond any prompt): next-token NLL per token and top-1 accuracy;
 *   questions ({"choices": [...], "label": j}): each choice scored by the log-likelihood of its tokens
 *   given the prompt, class probabilities softmax over the choices (the ensemble averages them over
 *   members), accuracy, NLL of the label, and ECE over `bins` equal-width confidence bins.
 * With a reference adapter (one of the list; typically task i's own adapter when the others are merges), each
 * model m also gets, over the predicted positions of plain sequences and of each question's labelled choice:
 * kl_ratio = mean KL(p_ref || p_m) / mean KL(p_ref || p_base) (0: the reference itself, 1: no better than the
 * base), top-1 agreement with the reference, and the share of the reference's adaptation kept,
 * (NLL_base - NLL_m) / (NLL_base - NLL_ref), on the label NLL of questions (else on the token NLL).
 * Sequences are spread over ranks; rank 0 prints the table and writes opt->out. Same error on every rank. */
itr_err itr_evaluate_adapters(const itr_eval_opts *opt, MPI_Comm comm);

#ifdef __cplusplus
}
#endif
#endif
