/* The one table of iteris-mpi's options (names as in ALGORITHM.md) and their parsed values. */
#ifndef ITERIS_CLI_OPTIONS_H
#define ITERIS_CLI_OPTIONS_H

#include <stdio.h>

#include "iteris/core.h"
#include "iteris/pipeline.h"
#include "iteris/train.h"

typedef enum {
  ITR_MODE_MERGE,
  ITR_MODE_INSPECT,
  ITR_MODE_LOGITS,
  ITR_MODE_MAKE_DEMO,
  ITR_MODE_FEATURES,
  ITR_MODE_TOKENIZE,
  ITR_MODE_TRAIN,
  ITR_MODE_ENSEMBLE
} itr_mode;

/* The program's options: a mode, the merge's parameters (include/iteris/pipeline.h) and those of
 * the small modes. */
typedef struct {
  itr_mode mode;
  itr_merge_opts m; /* -base, -adapters, ..., -method and its parameters, -stages, -verbose */
  char inspect[ITR_OPT_PATH];
  char make_demo[ITR_OPT_PATH];
  char logits[ITR_OPT_PATH];
  char logits_out[ITR_OPT_PATH];
  char tokenize[ITR_OPT_PATH];
  char tokenize_out[ITR_OPT_PATH];
  int n_adapter_logits;
  char adapter[ITR_MAX_TASKS][ITR_OPT_PATH];
  int train;          /* -train 1: the training mode */
  itr_train_opts t;   /* its parameters (-base, -out, -seed and -verbose are copied from m) */
  char targets[256];  /* -targets q_proj,v_proj,... */
  itr_eval_opts e;    /* -ensemble A1,...: -base and -heldout are copied from m */
  int mixlora;        /* -method mixlora: an IterIS merge of the attention, then the composition (compose.c) */
  int refine_steps;   /* merge, then distil (refine.c): steps (0: no refinement), its lr, batch, weight decay, */
  double refine_lr;   /* and the fraction of each -calib file held out for early stopping */
  int refine_batch;
  double refine_weight_decay, refine_val, refine_drop;
  char train_only[64];        /* -train_only attention,routers,experts (parsed into t.train_only) */
  char refine_train_only[64]; /* -refine_train_only: the same, parsed into refine_only (-method mixlora) */
  unsigned refine_only;       /* bits ITR_LORA_GROUP_*; 0: all */
} itr_options;

/* Not Collective (reads PETSc's options database, identical on every rank).
 * Fills opt from the database (command line, -options_file, PETSC_OPTIONS); an unknown or
 * unused option, a malformed value or a missing required option is ITR_ERR_INPUT. */
itr_err itr_options_parse(itr_options *opt);
/* Checks the job file path (job_file.c); 0 when PETSc may read it, else 1 with msg (naming the file,
 * the line and the column where it applies). Not Collective. */
int itr_job_file_check(const char *path, char *msg, size_t len);
/* Prints the option table with defaults and the exit codes. */
void itr_options_print_help(FILE *f);
/* Writes the options as a JSON object body (for the merge report). */
void itr_options_defaults(itr_options *opt);

#endif
