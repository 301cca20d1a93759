/* The one table of iteris-mpi's options (names as in ALGORITHM.md) and their parsed values. */
#ifndef ITERIS_CLI_OPTIONS_H
#define ITERIS_CLI_OPTIONS_H

#include <stdio.h>

#include "iteris/core.h"

#define ITR_MAX_TASKS 64
#define ITR_OPT_PATH 4096

typedef enum { ITR_MODE_MERGE, ITR_MODE_INSPECT, ITR_MODE_LOGITS, ITR_MODE_MAKE_DEMO, ITR_MODE_FEATURES } itr_mode;

typedef struct {
  itr_mode mode;
  /* inputs */
  char base[ITR_OPT_PATH];
  int n_adapters;
  char adapters[ITR_MAX_TASKS][ITR_OPT_PATH];
  int n_calib;
  char calib[ITR_MAX_TASKS][ITR_OPT_PATH];
  int n_heldout;
  char heldout[ITR_MAX_TASKS][ITR_OPT_PATH];
  char out[ITR_OPT_PATH];
  /* method and its parameters */
  char method[32];
  int max_iter;
  double alpha_1, alpha_2, reg_coef;
  int n_manual_coef;
  double manual_coef[ITR_MAX_TASKS];
  int with_pretrain;
  int out_rank;
  char out_dtype[8];
  double ta_lambda, regmean_alpha, density, dare_p;
  int dare_ties;
  long seed;
  int restart;
  int max_tokens; /* cap on tokens per calibration sequence (0: none) */
  int solve_groups; /* process groups solving different modules at once */
  int stages;       /* pipeline stages: process groups holding contiguous ranges of layers */
  /* other modes */
  char inspect[ITR_OPT_PATH];
  char make_demo[ITR_OPT_PATH];
  char features[ITR_OPT_PATH]; /* -features FILE.h5: merge from external features (docs/FEATURES.md) */
  char logits[ITR_OPT_PATH];
  char logits_out[ITR_OPT_PATH];
  int n_adapter_logits;
  char adapter[ITR_MAX_TASKS][ITR_OPT_PATH];
  int verbose;
} itr_options;

/* Not Collective (reads PETSc's options database, identical on every rank).
 * Fills opt from the database (command line, -options_file, PETSC_OPTIONS); an unknown or
 * unused option, a malformed value or a missing required option is ITR_ERR_INPUT. */
itr_err itr_options_parse(itr_options *opt);
/* Prints the option table with defaults and the exit codes. */
void itr_options_print_help(FILE *f);
/* Writes the options as a JSON object body (for the merge report). */
void itr_options_defaults(itr_options *opt);

#endif
