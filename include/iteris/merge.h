/* iteris-mpi merge: per-site statistics, the IterIS system (assembly, local Cholesky solve,
 * residual check), exact and truncated LoRA outputs, and the baselines of ALGORITHM.md
 * (task_arithmetic, regmean, ties, dare, knots). Pure math on in-memory float64 arrays: nothing
 * here reads files or calls MPI. Not Collective anywhere.
 *
 * Data flow for one module m and N tasks (see src/merge/README.md):
 *   1. itr_stats per (input site, task): fed row blocks (T, d_in) f32 of X_i and (X_i, Xt_i)
 *      pairs, accumulated in f64. Every statistic is ADDITIVE over row blocks: the element-wise
 *      sum of per-rank partial itr_stats (the buffers listed by itr_stats_additive) is the
 *      statistic of all rows. Reduce with MPI_SUM, then itr_stats_finalize.
 *   2. itr_iteris_assemble (or itr_regmean_assemble) builds the SPD system T2 Y = RHS with
 *      nrhs = R = sum r_i right-hand sides (d_out with with_pretrain). A distributed solver takes
 *      sys->T2 and sys->rhs from here; itr_system_solve_local is the one-process LAPACK solve.
 *   3. itr_update_from_system turns the solution into the merged update: B* A* (exact rank R)
 *      or dense; itr_update_truncate makes it rank k.
 *
 * Storage: row-major, outermost first. A system's rhs is (nrhs, d_in) row-major, which is the
 * column-major (d_in, nrhs) matrix LAPACK/ScaLAPACK solve with; T2 is symmetric so its layout
 * does not matter. */
#ifndef ITERIS_MERGE_H
#define ITERIS_MERGE_H

#include <stdint.h>

#include "iteris/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- statistics (stats.c) ------------------------------------------------------------------ */

enum {
  ITR_STATS_FULL_CROSS = 0, /* accumulate cross = X^T Xt (d_in, d_in): needed for reg_coef > 0
                               and with_pretrain; gives exact ||X^T Xt||_F additively */
  ITR_STATS_NO_CROSS = 1    /* memory-light: no cross; each module then supplies P_i
                               (itr_stats_cross_add) and ||X^T Xt||_F^2 itself */
};

/* Statistics of one input site (e.g. layer 3's attention input, shared by q/k/v) for one task.
 * Additive buffers (sum per-rank partials with MPI_SUM): gram_x, gram_t, cross, n_x, n_t. */
typedef struct {
  int64_t d_in;
  int mode;        /* ITR_STATS_FULL_CROSS or ITR_STATS_NO_CROSS */
  int xt_is_x;     /* 1 (iteration 1): Xt = X, gram_t and cross are not stored and read as gram_x */
  int64_t n_x;     /* rows fed to gram_x (additive) */
  int64_t n_t;     /* rows fed to gram_t / cross (additive) */
  double *gram_x;  /* (d_in, d_in) f64 X^T X; upper triangle until finalised, then full */
  double *gram_t;  /* (d_in, d_in) f64 Xt^T Xt; NULL while xt_is_x */
  double *cross;   /* (d_in, d_in) f64 X^T Xt, not symmetric; NULL while xt_is_x or NO_CROSS */
  int64_t chunk;   /* rows converted per BLAS call */
  double *scratch; /* (2 chunk, d_in) f64 conversion buffer (not a statistic) */
} itr_stats;

/* Allocates zeroed statistics for d_in inputs; xt_is_x = 1. Not Collective. */
itr_err itr_stats_init(itr_stats *st, int64_t d_in, int mode);
void itr_stats_fini(itr_stats *st); /* accepts a zeroed struct */
/* gram_x += x^T x.  x: (T, d_in) f32, source-model inputs of this task's calibration set. */
itr_err itr_stats_add_x(itr_stats *st, int64_t T, const float *x);
/* Starts an iteration k >= 2: allocates (once) and zeroes gram_t and cross, xt_is_x = 0. */
itr_err itr_stats_reset_xt(itr_stats *st);
/* gram_t += xt^T xt; cross += x^T xt.  x, xt: (T, d_in) f32, the same T tokens in the same
 * order (x from source model i, xt from the merged model, both on calibration set i). */
itr_err itr_stats_add_pair(itr_stats *st, int64_t T, const float *x, const float *xt);
/* Frees gram_x (iteration >= 2 only): X^T X is needed only for c_i (iteration 1), -reg_coef > 0
 * and RegMean, so an IterIS iteration >= 2 with reg_coef 0 keeps two d_in^2 matrices, not three.
 * Afterwards gram_x is NULL and add_x is an error. Not Collective. */
itr_err itr_stats_drop_x(itr_stats *st);
/* Copies the upper triangles of gram_x / gram_t into the lower ones. Idempotent; call after the
 * reduction (partial sums may be reduced before or after it). */
void itr_stats_finalize(itr_stats *st);
/* Read access honouring xt_is_x: Xt^T Xt and X^T Xt (both gram_x in iteration 1; cross may be
 * NULL in NO_CROSS mode). */
const double *itr_stats_gram_t(const itr_stats *st);
const double *itr_stats_cross(const itr_stats *st);
/* Lists the additive f64 buffers (at most 3) and their lengths, for an all-reduce. The two
 * counters n_x, n_t are additive int64 fields. Returns the number of buffers. */
int itr_stats_additive(itr_stats *st, double *bufs[3], int64_t counts[3]);

/* P += (x A^T)^T xt: the per-module cross term through the adapter factor, additive over row
 * blocks (NO_CROSS mode). P: (r, d_in) f64; A: (r, d_in) f64; x, xt: (T, d_in) f32. */
itr_err itr_stats_cross_add(int r, int64_t d_in, const double *A, int64_t T, const float *x,
                            const float *xt, double *P);
/* ||X^T Xt||_F^2 = <X X^T, Xt Xt^T> through the (n, n) kernels, for n < d_in. NOT additive over
 * row blocks (it couples every pair of rows): call it on all n rows of the task (gathered).
 * x, xt: (n, d_in) f32. */
itr_err itr_stats_cross_norm2_kernel(int64_t n, int64_t d_in, const float *x, const float *xt,
                                     double *out);
/* ||X W^T||_F^2 = tr(W (X^T X) W^T) from a finalised gram (d_in, d_in) and W (d_out, d_in) f64. */
itr_err itr_stats_xw_norm2(int64_t d_out, int64_t d_in, const double *gram, const double *W,
                           double *out);

/* ---- the system T2 Y = RHS and its local solve (system.c) ----------------------------------- */

typedef struct {
  int64_t d_in;
  int64_t nrhs;      /* R (factored) or d_out (with_pretrain) */
  int dense;         /* 1: rhs is T1 (d_out, d_in) and the solution is dW* + W0 (with_pretrain) */
  double *T2;        /* (d_in, d_in) f64 symmetric, full */
  double *rhs;       /* (nrhs, d_in) f64; replaced by the solution Y by a solve */
  int solved;
  int N;             /* tasks */
  double *coef;      /* [N] c_i w_i used (c_i = 1 when not adaptive) */
  double alpha_2;    /* for messages */
  char label[128];   /* module, for messages (e.g. "layers.3.self_attn.q_proj") */
  double residual;   /* the scaled residual of the solve (itr_scaled_residual, HPL's definition) */
  int passed;        /* residual below ITR_RESIDUAL_THRESHOLD */
} itr_system;


void itr_system_fini(itr_system *sys); /* accepts a zeroed struct */
/* A zeroed system T2 (d_in, d_in), rhs (nrhs, d_in), coef [N], to be filled task by task with
 * itr_iteris_assemble_add / itr_baseline_regmean_assemble_add. Not Collective. */
itr_err itr_system_create(int64_t d_in, int64_t nrhs, int dense, int N, double alpha_2, const char *label,
                          itr_system *sys);
/* One-process solve: LAPACKE_dpotrf + dpotrs with nrhs right-hand sides, in place (rhs becomes
 * Y; T2 is restored bit for bit afterwards), then the scaled residual. A T2 that is not SPD is
 * ITR_ERR_NUMERIC naming the module and suggesting a larger -alpha_2; a residual above the
 * threshold is logged FAILED and returned as ITR_ERR_NUMERIC. Not Collective. */
itr_err itr_system_solve_local(itr_system *sys);
/* The scaled residual check, usable by any solver: residual of T2 Y = rhs0 (rhs0 the original
 * rhs, (nrhs, d_in)); sets sys->residual, scaled, passed and logs PASSED/FAILED. */
itr_err itr_system_check(itr_system *sys, const double *Y, const double *rhs0);

/* dst (n, m) = src (m, n)^T, both row-major f64. The dist layer's solver takes RHS as (d_in, R)
 * row-major: hand it the transpose of sys->rhs and transpose its Y back into sys->rhs. */
void itr_system_transpose(int64_t m, int64_t n, const double *src, double *dst);

/* ---- IterIS (iteris.c) ---------------------------------------------------------------------- */

typedef struct {
  double alpha_1;    /* -alpha_1 (default 1e-7) */
  double alpha_2;    /* -alpha_2 (default 1e-7) */
  double reg_coef;   /* -reg_coef rho in [0, 1] (default 0) */
  int with_pretrain; /* -with_pretrain (default 0) */
  int adaptive;      /* 1 (default): c_i of ALGORITHM.md step 1; 0: c_i = 1 (RegMean-like) */
} itr_iteris_opts;

void itr_iteris_opts_default(itr_iteris_opts *o);

/* One task's contribution to one module. */
typedef struct {
  int r;                  /* r_i >= 0 (0: the adapter does not target this module) */
  double scale;           /* s_i = lora_alpha / r (or / sqrt(r) with rsLoRA) */
  double weight;          /* w_i, -manual_coef (> 0) */
  const double *A;        /* (r, d_in) f64 */
  const double *B;        /* (d_out, r) f64 */
  const itr_stats *stats; /* finalised statistics of this task at the module's input site */
  const double *P;        /* (r, d_in) f64 (X A^T)^T Xt, unmixed; NULL: computed as A cross */
  double cross_norm2;     /* ||X^T Xt||_F^2 unmixed; used only when stats has no cross */
  double xw_norm2;        /* ||X (W0 + dW)^T||_F^2 if known (> 0); else from gram_x */
} itr_merge_task;

/* c_i = ||W0 + dW_i||_F^2 / ||X_i (W0 + dW_i)^T||_F^2 (times nothing: w_i is applied by the
 * assembly). W0: (d_out, d_in) f64 or NULL (zero). */
itr_err itr_iteris_coef(const itr_merge_task *t, int64_t d_out, int64_t d_in, const double *W0,
                        const char *label, int task, double *c);
/* Builds T2 = sum c_i w_i G_i and RHS = stack_i(c_i w_i s_i A_i M_i) (R, d_in), or with
 * with_pretrain RHS = T1 = sum c_i w_i (W0 + dW_i) M_i (d_out, d_in), exactly as ALGORITHM.md,
 * reg_coef mixing included. coef: [N] precomputed c_i (fixed across iterations) or NULL to
 * compute them. label names the module in messages. Not Collective. */
itr_err itr_iteris_assemble(const itr_iteris_opts *o, int N, const itr_merge_task *tasks,
                            int64_t d_out, int64_t d_in, const double *W0, const double *coef,
                            const char *label, itr_system *sys);

/* Adds task i's contribution (the sums of step 5 are over tasks, so a system can be assembled one
 * task at a time, each task's statistics freed before the next one's are made):
 * T2 += c w_i (G_i' + alpha_2 ||G_i'|| I); rhs rows [row, row + r_i) = c w_i s_i A_i M_i' (factored;
 * rows of other tasks untouched), or rhs += c w_i (W0 + dW_i) M_i' (with_pretrain). c is c_i.
 * sys comes from itr_system_create (nrhs = R or d_out). Not Collective. */
itr_err itr_iteris_assemble_add(const itr_iteris_opts *o, const itr_merge_task *t, int i, int64_t d_out,
                                int64_t d_in, const double *W0, double c, int64_t row, itr_system *sys);

/* ---- the method table (method.c) ------------------------------------------------------------
 * A merge method is one entry here plus its formula file: what it needs, whether it iterates, the
 * options it reads, and (for methods that solve a system from statistics) the function that gives
 * each task's coefficients in that system. The program's option checks, the pipeline's choice of
 * driver and -help all read this table; docs/METHODS.md says how to add one. */

typedef enum {
  ITR_METHOD_ITERIS,
  ITR_METHOD_REGMEAN,
  ITR_METHOD_TASK_ARITHMETIC,
  ITR_METHOD_TIES,
  ITR_METHOD_DARE,
  ITR_METHOD_KNOTS,
  ITR_METHOD_COUNT
} itr_method_id;

enum {
  ITR_METHOD_STATS = 1u << 0,    /* solves a system from statistics of calibration data (needs -calib) */
  ITR_METHOD_ITERATES = 1u << 1, /* -max_iter iterations, the merged model's inputs from iteration 2 */
  ITR_METHOD_ADAPTIVE = 1u << 2, /* adaptive weights c_i from the source model's forward (iteration 1) */
  ITR_METHOD_DENSE = 1u << 3,    /* a full-rank update: written as a LoRA of rank -out_rank */
  ITR_METHOD_FEATURES = 1u << 4, /* also runs from -features files */
  ITR_METHOD_GRAM_DIAG = 1u << 5, /* its terms read diag(G') (itr_task_terms.diag) */
};

/* The parameters that a task's coefficients depend on. */
typedef struct {
  double alpha_1, alpha_2; /* -alpha_1, -alpha_2: ridges relative to a Frobenius norm */
  double regmean_alpha;    /* RegMean: scale of the Grams' off-diagonal entries */
  int dense;               /* the right-hand side is T1 (d_out rows, with_pretrain), not the factors */
} itr_terms_params;

/* Task i's part of a module's system, as numbers that multiply its statistics:
 *   T2  += gram * G'   (G' with its off-diagonal entries times offdiag)  + shift * I
 *   rows = rhs * (cross * P + (diag * diag(G') + ridge) .* F)
 * where G' is the task's (mixed) Gram Xt'^T Xt', P = F X^T Xt' the cross term, F the task's A_i
 * (r_i rows) or W0 + dW_i (d_out rows, dense), and weight the task's coefficient in the solution
 * (itr_system.coef). */
typedef struct {
  double weight, gram, offdiag, shift, rhs, cross, diag, ridge;
} itr_task_terms;

/* Task i's terms from its adaptive weight coef (1 where the method has none), the norms n1 =
 * ||X^T Xt'||_F and n2 = ||G'||_F; label and i name the module and task in messages. */
typedef itr_err (*itr_terms_fn)(const itr_terms_params *p, const itr_merge_task *t, int i, double coef, double n1,
                                double n2, const char *label, itr_task_terms *out);

typedef struct {
  const char *name;    /* -method NAME */
  itr_method_id id;
  unsigned flags;      /* ITR_METHOD_* */
  const char *options; /* the method-specific options it reads, space-separated, without '-' */
  itr_terms_fn terms;  /* ITR_METHOD_STATS: the task's coefficients in the system; else NULL */
  const char *summary; /* one line for -help */
} itr_method;

/* The entry named name, or NULL. Not Collective. */
const itr_method *itr_method_find(const char *name);
/* The entry of id (every id has one). */
const itr_method *itr_method_get(itr_method_id id);
/* Whether method m reads -option (option without '-'). */
int itr_method_reads(const itr_method *m, const char *option);
/* The names of every method, separated by sep, into buf (for messages and -help). */
void itr_method_names(const char *sep, char *buf, size_t len);

/* The coefficient functions of the table: IterIS (iteris.c) and RegMean (baselines.c). */
itr_err itr_iteris_terms(const itr_terms_params *p, const itr_merge_task *t, int i, double coef, double n1, double n2,
                         const char *label, itr_task_terms *out);
itr_err itr_regmean_terms(const itr_terms_params *p, const itr_merge_task *t, int i, double coef, double n1,
                          double n2, const char *label, itr_task_terms *out);

/* ---- the merged update of one module (update.c) -------------------------------------------- */

typedef struct {
  int64_t d_out, d_in;
  int64_t rank;        /* > 0: dW = B A; 0: dense */
  double *B;           /* (d_out, rank) f64 */
  double *A;           /* (rank, d_in) f64 */
  double *dense;       /* (d_out, d_in) f64 when rank == 0 */
  double energy_kept;  /* ||kept||_F^2 / ||dW||_F^2 of the last truncation (1 when exact) */
} itr_update;

void itr_update_fini(itr_update *u); /* accepts a zeroed struct */
/* From a solved system: factored (B* = [B_1 .. B_N], A* = Y) or dense (Y - W0). */
itr_err itr_update_from_system(const itr_system *sys, int N, const itr_merge_task *tasks,
                               int64_t d_out, const double *W0, itr_update *out);
/* dW as a dense (d_out, d_in) f64 matrix (allocated). */
itr_err itr_update_to_dense(const itr_update *u, double **dense);
/* Rank-k truncation (k >= 1): factored through QR of B and of A^T and the SVD of the small
 * product (dgeqrf/dorgqr/dgesvd); dense through dgesvd. The result is factored, split as
 * B = U sqrt(S), A = sqrt(S) V^T; out->energy_kept = sum_{j<k} s_j^2 / sum_j s_j^2. */
itr_err itr_update_truncate(const itr_update *in, int64_t k, itr_update *out);
/* *rel = ||now - before||_F / ||now||_F (the change of a module's merged update between two IterIS
 * iterations), NaN when before is empty or now is zero. Factored updates with the same B (IterIS's
 * B* = [B_1 | ... | B_N]) are compared through (A_now - A_before), exactly; others through R x R
 * products (absolute rounding about eps ||now||^2 on the square). Not Collective. */
itr_err itr_update_change(const itr_update *now, const itr_update *before, double *rel);
/* dW_i = s B A as a dense (d_out, d_in) f64 matrix written to out. */
void itr_lora_dense(int64_t d_out, int64_t d_in, int r, double s, const double *B,
                    const double *A, double *out);

/* ---- one-process convenience (iteris.c) ---------------------------------------------------- */

/* assemble + itr_system_solve_local + itr_update_from_system. sys_out may be NULL. */
itr_err itr_iteris_solve_local(const itr_iteris_opts *o, int N, const itr_merge_task *tasks,
                               int64_t d_out, int64_t d_in, const double *W0, const double *coef,
                               const char *label, itr_update *out, itr_system *sys_out);

/* ---- baselines (baselines.c) ---------------------------------------------------------------- */

/* task_arithmetic: dW = lambda sum_i w_i s_i B_i A_i, exactly rank R (concatenation). */
itr_err itr_baseline_task_arithmetic(int N, const itr_merge_task *tasks, int64_t d_out,
                                     int64_t d_in, double lambda, itr_update *out);
/* regmean system: T2 = sum_i Gr_i, RHS = stack_i(s_i A_i Gr_i) (R, d_in), with
 * Gr_i = X_i^T X_i, off-diagonals times regmean_alpha, plus ridge ||X_i^T X_i||_F I (ridge 0:
 * the plain method). Solve it like IterIS's and take itr_update_from_system. */
itr_err itr_baseline_regmean_assemble(int N, const itr_merge_task *tasks, int64_t d_in,
                                      double regmean_alpha, double ridge, const char *label,
                                      itr_system *sys);
/* One task of the regmean system (rows [row, row + r_i)), for assembly task by task. */
itr_err itr_baseline_regmean_assemble_add(const itr_merge_task *t, int i, double regmean_alpha, double ridge,
                                          int64_t row, itr_system *sys);
/* ties on n dense entries: dW_i (n) f64 each, times w_i (weights may be NULL: 1), keep the top
 * density fraction of each by magnitude (exactly ceil(density n), ties broken by index), elect
 * the sign of the sum, average the kept entries that agree, times lambda. out: n f64. */
itr_err itr_baseline_ties(int N, int64_t n, const double *const *dW, const double *weights,
                          double density, double lambda, double *out);
/* dare: each entry of w_i dW_i dropped with probability p, survivors times 1/(1-p), then
 * lambda sum (use_ties 0) or ties with density (use_ties 1). Deterministic: task i's entries
 * use the stream (seed, stream + i); pass stream = itr_hash64(module label) so the result does
 * not depend on the order or the rank that merges the modules. */
itr_err itr_baseline_dare(int N, int64_t n, const double *const *dW, const double *weights,
                          double p, int use_ties, double density, double lambda, uint64_t seed,
                          uint64_t stream, double *out);
/* knots: SVD U S [V_1^T .. V_N^T] of [dW_1 | .. | dW_N] (d_out, N d_in), computed through the
 * factors (exact), per-task right factors V_i^T (k, d_in) merged by task arithmetic (use_ties 0:
 * lambda sum w_i V_i^T) or ties (density, lambda), rebuilt as dW = U S V^T: factored, rank k
 * = numerical rank of the concatenation (<= R). */
itr_err itr_baseline_knots(int N, const itr_merge_task *tasks, int64_t d_out, int64_t d_in,
                           int use_ties, double density, double lambda, itr_update *out);

#ifdef __cplusplus
}
#endif
#endif
