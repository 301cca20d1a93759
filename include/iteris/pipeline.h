/* The merge pipeline: everything between the libraries (io, model, dist, merge, eval) and the
 * program (src/cli). One call runs a whole merge on a communicator: validation, the forward passes
 * that capture each target module's inputs, the statistics in ScaLAPACK's block-cyclic layout, the
 * solves, checkpoints, evaluation and the atomic write of OUT. Inside (src/pipeline, lowest
 * first): schedule (rank 0's decisions: sequences over ranks, layers over stages, solves over
 * groups), context (stop agreement, progress), forward (capture, held-out evaluation), site
 * (statistics -> systems -> solves of one input site), checkpoint and report, the drivers
 * (data-parallel, staged, direct), run (setup, driver choice, write). */
#ifndef ITERIS_PIPELINE_H
#define ITERIS_PIPELINE_H

#include <mpi.h>

#include "iteris/core.h"

#define ITR_MAX_TASKS 64
#define ITR_OPT_PATH 4096

/* The parameters of one merge (names as in ALGORITHM.md and -help). Identical on every rank. */
typedef struct {
  /* inputs */
  char base[ITR_OPT_PATH];
  int n_adapters;
  char adapters[ITR_MAX_TASKS][ITR_OPT_PATH];
  int n_calib;
  char calib[ITR_MAX_TASKS][ITR_OPT_PATH];
  int n_heldout;
  char heldout[ITR_MAX_TASKS][ITR_OPT_PATH];
  char features[ITR_OPT_PATH]; /* -features FILE.h5: merge from external features (docs/FEATURES.md) */
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
  /* how the run is laid out */
  int restart;
  int max_tokens;   /* cap on tokens per calibration sequence (0: none) */
  char system[16];  /* -system: auto | inputs | tokens: the d_in x d_in system or the n x n one in token space
                       (docs/ALGORITHM.md), per input site; auto chooses by cost */
  int solve_groups; /* process groups solving different modules at once */
  int stages;       /* pipeline stages: process groups holding contiguous ranges of layers */
  int block_size;   /* -block_size: ScaLAPACK's block size mb (0: ITR_DIST_MB_DEFAULT) */
  char gram_exchange[16]; /* -gram_exchange: auto | columns | partial (itr_dist_gram_rows_exchange) */
  int grid_rows;    /* -grid_rows: process rows of the ScaLAPACK grid (0: itr_dist_grid_shape's) */
  int plots;        /* -plots: write convergence.png (gnuplot) beside merge_report.json */
  int fidelity_per_iter; /* -fidelity_per_iter: with -heldout and several iterations, measure the fidelity after
                            every iteration (report and plot), not only at the end */
  int mixlora_top_k;     /* -method mixlora: experts per token (1) */
  double mixlora_ridge;  /* -method mixlora: the routers' ridge, relative to the mean diagonal of X^T X */
  int verbose;
} itr_merge_opts;

/* Collective on comm. Merges opt->adapters into opt->out (a PEFT adapter, merge_report.json,
 * stats.h5; written to OUT.partial/ and renamed when complete). Returns the same error on every
 * rank, its message set on rank 0 at least. ITR_ERR_INTERRUPTED: a stop signal was agreed and the
 * checkpoint is in OUT.partial/ (rerun with restart = 1). */
itr_err itr_pipeline_merge(const itr_merge_opts *opt, MPI_Comm comm);

/* Collective on comm. -features (docs/FEATURES.md): merges opt->adapters (PEFT LoRA of any
 * architecture) from the inputs or statistics in opt->features, one solve per module on all ranks,
 * into opt->out (adapter, merge_report.json; written to OUT.partial/ and renamed). Same error on
 * every rank. */
itr_err itr_pipeline_features(const itr_merge_opts *opt, MPI_Comm comm);

/* -method mixlora (compose.c): composes opt->adapters into one MixLoRA adapter at opt->out: the attention
 * of merged_dir (an IterIS merge of the same adapters), expert i = adapter i's gate/up/down factors, and
 * per layer a router fitted to send each task's calibration tokens to its own expert (ridge least squares
 * on the FFN inputs, layer by layer under the model composed so far). Collective; the same error on every
 * rank; OUT written atomically by rank 0 with compose_report.json (routing accuracy per layer and task). */
itr_err itr_pipeline_compose(const itr_merge_opts *opt, const char *merged_dir, MPI_Comm comm);

/* The graceful stop (SIGTERM / SIGINT / SIGUSR1 -> checkpoint, exit 5) uses dist's itr_signals_*
 * (include/iteris/dist.h). */
#include "iteris/dist.h"

#endif
