/* Internal to src/train: the trainer's state, shared by the step loop (trainer.c), the output
 * (train_output.c) and the checkpoint (train_checkpoint.c). */
#ifndef ITERIS_TRAIN_INTERNAL_H
#define ITERIS_TRAIN_INTERNAL_H

#include <mpi.h>

#include "iteris/io.h"
#include "iteris/train.h"

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
  double *gbuf;      /* (n + 3): gradient, loss sum (with the load-balancing term), target count, that term */
  int moe_E;         /* MixLoRA: experts per layer (0: no MixLoRA layer) */
  double aux_coef;   /* MixLoRA: the load-balancing coefficient (0: none) */
  float *gflat;      /* (n) f32 staging of the packed gradient */
  unsigned char *frozen; /* -train_only: (n) 1 where a float is not trained; NULL: all are */
  float *fixed;          /* -train_only: (n) the starting parameters, the frozen floats' values */
  size_t n_trained;      /* floats the optimizer moves (n, or fewer with -train_only) */
  itr_adamw opt;
  int fold_scaling;  /* started from an adapter: write with scaling 1 */
  itr_model *gmodel; /* -full_rank: the weights' gradient, laid out as the model */
  itr_lora_set **teachers; /* -distil: one set per teacher adapter */
  int32_t *task;           /* -distil: (n_seqs) the teacher of each sequence */
  double *loss_curve; /* (steps) mean loss of each step */
  int step0;          /* first step of this run (> 0 after -restart) */
  double tokens_per_s, wall_s;
  /* -val_fraction: held-out sequences, the best parameters and the validation curve */
  int64_t *val;
  int64_t n_val;
  int eval_mode;      /* measuring the validation loss: no dropout */
  float *best;        /* (n) the parameters of the lowest validation loss */
  double best_val;
  int best_step;      /* steps taken when it was measured */
  double *val_curve;  /* (2 n_curve): step, loss */
  int n_curve, cap_curve;
} trainer;

/* Dense mode: the model's tensors that gmodel holds, to (to_model = 0) or from flat (trainer.c). */
void train_dense_copy(trainer *t, float *flat, int to_model);
/* train_output.c (rank 0) */
void train_checkpoint_path(const trainer *t, char *buf, size_t len);
itr_err train_write_gradient(const trainer *t, const char *path);
itr_err train_remove_partial(const trainer *t);
itr_err train_write_out(const trainer *t);
/* train_checkpoint.c: the state after `done` steps (rank 0); restore is collective */
itr_err train_checkpoint_write(const trainer *t, int done);
itr_err train_checkpoint_restore(trainer *t);

#endif
