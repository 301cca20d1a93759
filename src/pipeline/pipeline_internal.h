/* The pipeline layer's private header: the state of one merge run (merge_ctx) and the entry points
 * of its files, in their order: each file calls only files listed above it (checked by
 * tests/layering.py over the object files).
 *   schedule.c       rank 0's decisions (sequences over ranks, layers over stages, solves over groups)
 *   context.c        the agreed stop, the progress line
 *   forward.c        capture of the target modules' inputs, the merged LoRA set, held-out evaluation
 *   site.c           one input site: statistics -> systems -> solves (ScaLAPACK)
 *   checkpoint.c     checkpoints and stats.h5
 *   report.c         merge_report.json and the printed summary
 *   driver_data.c    the data-parallel iterations
 *   driver_direct.c  the methods without calibration data
 *   driver_stages.c  -stages: the pipeline-parallel iterations
 *   driver_features.c -features: one solve per named module from external inputs (itr_pipeline_features)
 *   run.c            setup, the driver's choice, evaluation, the atomic write (itr_pipeline_merge) */
#ifndef ITERIS_PIPELINE_INTERNAL_H
#define ITERIS_PIPELINE_INTERNAL_H

#include <mpi.h>
#include <petscsys.h>
#include <stdio.h>

#include "iteris/dist.h"
#include "iteris/io.h"
#include "iteris/merge.h"
#include "iteris/model.h"
#include "iteris/pipeline.h"


/* This rank's share of a token set: whole sequences, packed. */
typedef struct {
  int n_seqs;
  int64_t T;        /* tokens */
  int64_t *offsets; /* (n_seqs + 1) */
  int32_t *ids;     /* (T) */
} itr_shard;

void shard_fini(itr_shard *sh);

typedef struct merge_stages merge_stages; /* -stages > 1: the pipeline's state (driver_stages.c) */

typedef struct {
  const itr_merge_opts *opt;
  MPI_Comm world;  /* every rank: validation, the final gather, evaluation and output */
  int wrank, wsize;
  MPI_Comm comm;   /* the ranks that share this rank's layers: world, or this rank's pipeline stage */
  int rank, size;  /* in comm */
  int n_stages, stage;    /* -stages: how many pipeline stages, and this rank's (1, 0 without) */
  int layer_lo, layer_hi; /* the layers this rank's stage runs and merges: [lo, hi) */
  merge_stages *st;       /* NULL without -stages */
  double stage_secs[ITR_MAX_TASKS][2]; /* -stages, per stage: seconds of its iterations, and of those spent
                                          waiting for the previous stage's activations (all ranks, at the end) */
  const itr_method *method; /* the method table's entry (include/iteris/merge.h) */
  int N; /* adapters */
  itr_model_config cfg;
  itr_arch_desc arch; /* modules, input sites, shapes: the layout of every per-module array below */
  uint64_t input_digest; /* the inputs' contents (checkpoint fingerprint): see run.c, inputs_digest */
  itr_tensor_store *store;
  itr_model *model;      /* the embedding (and the head with -heldout): no decoder layer */
  itr_model *layer;      /* the one decoder layer this rank holds now (see load_layer) */
  int layer_index;       /* its index, -1: none */
  float *layer_mem;      /* the block every held layer is loaded into (layer_floats floats) */
  size_t layer_floats;
  itr_adapter *ad[ITR_MAX_TASKS];
  itr_token_set calib[ITR_MAX_TASKS], heldout[ITR_MAX_TASKS];
  itr_shard calib_sh[ITR_MAX_TASKS];
  unsigned module_mask; /* union of the adapters' target modules (bits: itr_module ids) */
  itr_lora_set *lora_task[ITR_MAX_TASKS]; /* source model i: base + adapter i */
  itr_lora_set *lora_merged;              /* base + the merged update of the last iteration */
  float *h_src[ITR_MAX_TASKS], *h_mrg[ITR_MAX_TASKS];                   /* (T_i, D) f32 hidden states */
  float *X[ITR_MAX_TASKS][ITR_ARCH_MAX_SITES], *Xt[ITR_MAX_TASKS][ITR_ARCH_MAX_SITES]; /* (T_i, d_in) f32, one layer */
  double ynorm[ITR_MAX_TASKS][ITR_ARCH_MAX_MODULES]; /* iteration 1, the held layer: ||X_i (W0 + dW_i)^T||^2 over
                                                    this rank's rows, from the source model's forward */
  itr_update *cur, *next; /* [L * n_modules]: merged updates of the last / current iteration */
  double *coef;           /* [L * n_modules * N] adaptive weights c_i (iteration 1) */
  double *resid;          /* [K * L * n_modules] scaled residual of each solve */
  double *change;         /* [K * L * n_modules] ||dW_k - dW_k-1||_F / ||dW_k||_F (NaN: iteration 1, or before a
                             restart) */
  itr_dist_grid *grid;       /* all ranks */
  int n_groups, group;       /* -solve_groups: how many groups, and this rank's */
  int group_root[ITR_MAX_TASKS]; /* first rank (in comm) of each group */
  itr_dist_grid *group_grid; /* the grid of this rank's group (itr_dist_grid_split of grid) */
  int start_iter, start_layer, iters_done;
  double energy_kept_min;
  double *energy_kept;    /* [L * n_modules] ||kept||^2 / ||dW||^2 with -out_rank (1: exact) */
  int evaluated;
  double kl_ratio[ITR_MAX_TASKS], top1[ITR_MAX_TASKS];
  double *kl_iter, *top1_iter; /* [K * N] -fidelity_per_iter: fidelity after each iteration (NaN: not measured) */
  int ev_ready;                /* ev_sh/ev_h hold the base and task models' held-out states */
  itr_shard ev_sh[ITR_MAX_TASKS];
  float *ev_h[ITR_MAX_TASKS][3];
  double seconds_merge;
  PetscLogStage stage_load, stage_forward, stage_stats, stage_reduce, stage_assemble, stage_solve, stage_write, stage_eval;
  PetscLogEvent ev_forward, ev_gram, ev_assemble, ev_solve; /* -log_view: time and flops per phase */
  PetscLogEvent ev_rows, ev_weights;                         /* parts of the statistics */
} merge_ctx;

/* Slot of module m (index in c->arch) of layer l in the per-module arrays; their count. */
#define SLOT(l, m) ((size_t)(l) * (size_t)c->arch.n_modules + (size_t)(m))
#define NSLOTS(c) ((size_t)(c)->arch.n_layers * (size_t)(c)->arch.n_modules)
/* Whether some adapter targets module m (index in c->arch). */
#define TARGETED(c, m) (((c)->module_mask >> (c)->arch.module[m].id) & 1u)

/* ---- schedule.c -------------------------------------------------------------------------------- */

/* Owner (0..size-1) of every sequence of ts: longest first, each to the least-loaded rank
 * (lowest on ties); the same on every rank. Not Collective. */
itr_err merge_shard_owners(const itr_token_set *ts, int size, int *owner);
/* This rank's shard from the owners (whole sequences in their order in ts). Not Collective. */
itr_err merge_shard_from_owners(const itr_token_set *ts, const int *owner, int rank, itr_shard *sh);
/* This rank's shard of ts shared out over size ranks (merge_shard_owners). Not Collective. */
itr_err merge_shard_make(const itr_token_set *ts, int rank, int size, itr_shard *sh);
/* Layers [*lo, *hi) of stage g of S over L layers: contiguous, as even as possible. */
void merge_stage_layers(int g, int S, int L, int *lo, int *hi);
/* The solves of one layer over n_groups groups of a communicator of size ranks (group g holds
 * ranks [itr_dist_group_first(g), itr_dist_group_first(g + 1))): costliest first (ties by index),
 * each to the group that would finish it first (its load so far plus the cost over its rank
 * count). cost[nj] in flops; group_of[nj] out. */
void merge_plan_solves(int nj, const double *cost, int n_groups, int size, int *group_of); /* nj <= ITR_ARCH_MAX_MODULES */

/* ---- context.c ----------------------------------------------------------------------------------- */

/* Registers the -log_view stages (load, forward, statistics, reduce, assemble, solve, write,
 * evaluate) and events with flop counts (ItrForward, ItrGram, ItrAssemble, ItrSolve). Not
 * Collective (PETSc's registration is local). */
void merge_log_register(merge_ctx *c);
/* Flops of the held layer's forward over one sequence of T tokens: the seven projections
 * (2 T d_out d_in each) and attention (4 T^2 D: Q K^T and S V); LoRA terms (r << d) not counted. */
double merge_forward_flops(const merge_ctx *c, int64_t T);
/* Makes slot q's update of iteration k (c->next) the current one (c->cur), recording how much it
 * changed (c->change). Not Collective. */
itr_err merge_commit_update(merge_ctx *c, int k, size_t q);
/* Iterations of the run: max_iter for IterIS, one for every other method. */
int merge_n_iters(const merge_ctx *c);
/* Whether the data-parallel driver evaluates after every iteration: -fidelity_per_iter, -heldout, and
 * more than one iteration (not with -stages, whose evaluation runs once at the end). */
int merge_fidelity_per_iter(const merge_ctx *c);
/* The signal (or ITERIS_FAULT_STOP_AT="k l" injection) that asks to stop before layer l of
 * iteration k, agreed over c->comm: 0 = go on. Collective on c->comm. */
int merge_stop_agree(merge_ctx *c, int k, int l);
/* Progress line of one finished layer with the ETA of this rank's part of the run. */
void merge_progress(merge_ctx *c, int k, int l, double t_layer, double max_resid, int done, int total,
                    double t0);

/* ---- forward.c ----------------------------------------------------------------------------------- */

/* The capture buffers X, Xt of every task and site for this rank's shards. Not Collective. */
itr_err merge_alloc_site_buffers(merge_ctx *c);
/* Embeds every task's calibration shard into h[i]. Not Collective. */
itr_err merge_embed_all(merge_ctx *c, float **h);
/* Forward of layer l on every task's shard: source model into X, merged model into Xt (k >= 2);
 * loads the layer first. Not Collective (callers agree). */
itr_err merge_forward_layer(merge_ctx *c, int k, int l);
/* Runs layers [0, l0) without capture (a resumed iteration's hidden states). Not Collective. */
itr_err merge_forward_prefix(merge_ctx *c, int k, int l0);
/* Rebuilds the merged model's LoRA set from c->cur. Not Collective. */
itr_err merge_rebuild_lora(merge_ctx *c);

/* Evaluation in parts (-heldout), for the data-parallel run and the stages: this rank's held-out
 * shards over c->comm and their three hidden states per task (base, task, merged; embedded on the
 * first stage) [Not Collective]; one layer of all three [Not Collective]; then, on every rank
 * (have = 0: this rank holds no final states and adds nothing), the logits, the fidelity summed
 * over c->world, after agreeing on e [Collective on c->world]; and the buffers' release. */
itr_err merge_eval_alloc(merge_ctx *c, itr_shard *sh, float *(*h)[3]);
/* merged_only: run only the merged model (h[i][2]); h[i][0..1] are kept from an earlier pass */
itr_err merge_eval_layer(merge_ctx *c, int l, const itr_shard *sh, float *(*h)[3], int merged_only);
itr_err merge_eval_finish(merge_ctx *c, itr_err e, int have, const itr_shard *sh, float *(*h)[3]);
void merge_eval_free(merge_ctx *c, itr_shard *sh, float *(*h)[3]);
/* The whole evaluation on every rank of c->world, layer by layer (without -stages). Collective on
 * c->world. */
itr_err merge_evaluate(merge_ctx *c);
/* -fidelity_per_iter: the evaluation after iteration k (forward.c, merge_evaluate_iter). Collective
 * on c->world (without -stages). */
itr_err merge_evaluate_iter(merge_ctx *c, int k);

/* ---- site.c -------------------------------------------------------------------------------------- */

/* Assembles and solves every targeted module of layer l in iteration k into c->next, from the
 * rows captured in c->X / c->Xt; with -solve_groups, rank 0 plans the solves over the groups by
 * cost (merge_plan_solves). *max_resid: the largest scaled residual so far. A solve that FAILED
 * (itr_residual_passed) stops the run with ITR_ERR_NUMERIC (itr_residual_error) on every rank.
 * Collective on c->comm. */
itr_err merge_solve_layer(merge_ctx *c, int k, int l, double *max_resid);
/* Solves one assembled system on grid with ScaLAPACK (itr_dist_solve_spd): T2 distributed, the
 * right-hand sides sys->rhs (replicated) in; sys->rhs receives Y on every rank of the grid, with
 * solved, residual and passed. ev: the -log_view event. Collective on the grid's comm. */
itr_err site_solve_system(const itr_dist_grid *grid, const itr_dist_matrix *T2, itr_system *sys,
                          itr_dist_solve_report *rep, PetscLogEvent ev);
/* Factors of adapter a for (l, m) in f64 (allocated in *A, *B; r = 0 and NULL when the adapter
 * does not target the module); fills t->r, t->scale, t->A, t->B. Not Collective. */
itr_err merge_task_factors(const itr_adapter *a, int l, itr_module m, int64_t d_out, int64_t d_in, itr_merge_task *t,
                           double **A, double **B);

/* ---- checkpoint.c -------------------------------------------------------------------------------- */

/* Checkpoint in OUT.partial/checkpoint.h5: resume at iteration k_next, layer l_next. Not
 * Collective (rank 0 writes). */
itr_err checkpoint_write(const merge_ctx *c, int k_next, int l_next);
/* Reads the checkpoint if there is one (*found = 1): fills cur, next, coef, resid, start_iter,
 * start_layer. A checkpoint of other options is an input error. Not Collective. */
itr_err checkpoint_read(merge_ctx *c, int *found);
/* With -stages: OUT.partial/checkpoint.stage<g>of<S>.iter<k>.h5, the updates of this stage's
 * layers after its iteration k, with the weights and residuals so far. Not Collective (the
 * stage's first rank writes). */
itr_err checkpoint_write_stage(const merge_ctx *c, int k);
/* Removes this stage's file of iteration k (no restart can need it any more). Not Collective. */
void checkpoint_remove_stage(const merge_ctx *c, int k);
/* The last iteration this stage has a checkpoint file of (0: none). Not Collective. */
int checkpoint_stage_latest(const merge_ctx *c);
/* Reads this stage's file of iteration k into cur (its layers), coef and resid. Not Collective. */
itr_err checkpoint_read_stage(merge_ctx *c, int k);
/* Removes the checkpoint files of this run's layout from DIR (before DIR becomes OUT). */
void checkpoint_remove(const merge_ctx *c, const char *dir);
/* Whether OUT.partial/checkpoint.h5 (a run without -stages) exists. Not Collective. */
int checkpoint_exists(const merge_ctx *c);
/* DIR/stats.h5: adaptive weights (L, 7, N) and scaled residuals (K, L, 7). Not Collective. */
itr_err stats_write(const merge_ctx *c, const char *dir);

/* ---- report.c ------------------------------------------------------------------------------------ */

/* Writes DIR/merge_report.json (options, per-iteration residuals, weights, fidelity, timings).
 * Not Collective (rank 0). */
itr_err merge_report_write(const merge_ctx *c, const char *dir);
/* The same report for a merge of named modules without layers or calibration data (-features): one
 * solve per module, its scaled residual, adaptive weights and energy kept. Not Collective. */
typedef struct {
  const char *name;
  int64_t d_out, d_in, rank;
  double residual, energy_kept;
  const double *coef; /* (N) adaptive weights c_i */
} report_module;
itr_err merge_report_write_modules(const itr_merge_opts *o, const itr_method *method, int ranks, double seconds,
                                  double energy_kept_min, int n, const report_module *mods, const char *dir);
/* DIR/convergence.dat and, through gnuplot, DIR/convergence.png: the scaled residuals per iteration
 * (per layer for one iteration), one line per module, largest over the layers; -plots 0 or a method
 * without solves writes none. A missing or failing gnuplot is a warning. Not Collective (rank 0). */
void merge_report_plot(const merge_ctx *c, const char *dir);
/* Prints the fidelity table (when evaluated) and a one-line summary. Not Collective. */
void merge_report_print(const merge_ctx *c, FILE *f);

/* ---- the drivers: each runs the iterations of a whole run; none calls another ------------------ */

/* driver_data.c: every rank of c->comm runs every layer (from start_iter / start_layer).
 * Collective on c->comm. */
itr_err merge_run_data_parallel(merge_ctx *c);
/* driver_direct.c: task arithmetic, TIES, DARE, KnOTS, every module on every rank. Collective on
 * c->comm. */
itr_err merge_run_direct(merge_ctx *c);
/* driver_stages.c: splits the ranks into -stages pipeline stages: sets comm, rank, size, layer_lo,
 * layer_hi (all ranks and all layers without -stages). Collective on c->world. */
itr_err merge_stages_setup(merge_ctx *c);
/* -restart with -stages: every stage resumes after the last iteration that every stage finished
 * (its per-stage checkpoint files). Collective on c->world. */
itr_err merge_stages_restart(merge_ctx *c, int *found);
/* Runs the iterations as a pipeline (stage g starts iteration k+1 once its own layers of
 * iteration k are solved), then gathers every layer's updates, weights and residuals on every
 * rank and makes comm = world. Collective on c->world. */
itr_err merge_stages_run(merge_ctx *c);
void merge_stages_fini(merge_ctx *c);

#endif
