/* One input site of one layer in one iteration: every targeted module that reads the site
 * (q/k/v, o, gate/up or down) is assembled and solved.
 *
 * Layout: no rank ever holds a whole d_in x d_in matrix. Task i's rows (this rank's share of
 * its calibration tokens) enter ScaLAPACK's block-cyclic layout as the tall matrices X_i and
 * Xt_i' = (1 - rho) Xt_i + rho X_i (src/dist/gram.c); the Gram G_i = Xt_i'^T Xt_i' is one pdsyrk
 * over the grid of all ranks, its norm and ||X_i^T Xt_i'||_F are local sums plus an all-reduce,
 * and each module's T2 accumulates c_i w_i (G_i + alpha_2 ||G_i|| I) in place. The right-hand
 * sides are small and additive over tokens: (X A_i^T)^T Xt' (r_i x d_in) is formed from this
 * rank's rows and summed with MPI_Allreduce, so every rank holds RHS and, after the solve, Y
 * (R x d_in): the merged LoRA that the next iteration's forward pass applies.
 *
 * Memory per rank: about (1 + modules at the site + 1 during the solve) d_in^2 / P doubles, plus
 * this rank's rows, plus the (n_i, n_i) / P kernels of the cross norm when n_i < d_in.
 *
 * A site whose calibration rows n are fewer than its inputs d_in is solved in token space instead
 * when that is cheaper (-system, docs/ALGORITHM.md): the n x n kernel of the stacked rows once,
 * then one n x n solve per module; no d_in x d_in matrix is formed. */
#include <cblas.h>
#include <math.h>
#include <petscsys.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_internal.h"



static void to_f64(const float *src, size_t n, double *dst) {
  for (size_t k = 0; k < n; k++) dst[k] = src[k];
}

itr_err merge_task_factors(const itr_adapter *a, int l, itr_module m, int64_t d_out, int64_t d_in,
                            itr_merge_task *t, double **A, double **B) {
  const itr_lora_module *lm = itr_adapter_module(a, l, m);
  *A = *B = NULL;
  t->r = 0;
  t->scale = 0;
  if (!lm || !lm->present) return ITR_OK;
  float *tmp = NULL;
  size_t na = (size_t)lm->r * (size_t)d_in, nb = (size_t)d_out * (size_t)lm->r;
  itr_err e = ITR_OK;
  ITR_TRY_GOTO(itr_calloc(na > nb ? na : nb, sizeof(float), "adapter factor", &tmp), e, fail);
  ITR_TRY_GOTO(itr_calloc(na, sizeof(double), "lora_A f64", A), e, fail);
  ITR_TRY_GOTO(itr_calloc(nb, sizeof(double), "lora_B f64", B), e, fail);
  ITR_TRY_GOTO(itr_tensor_read_f32(lm->A, tmp), e, fail);
  to_f64(tmp, na, *A);
  ITR_TRY_GOTO(itr_tensor_read_f32(lm->B, tmp), e, fail);
  to_f64(tmp, nb, *B);
  free(tmp);
  t->r = lm->r;
  t->scale = lm->scaling;
  t->A = *A;
  t->B = *B;
  return ITR_OK;
fail:
  free(tmp);
  free(*A);
  free(*B);
  *A = *B = NULL;
  return e;
}

/* Rows of W0 converted to float64 at a time: the adaptive weights never need the whole of W0 in
 * float64 (0.9 GiB for Llama-3-8B's gate/up site, 3.8 GiB at 70B). */
enum { W_PANEL = 256 };

/* This rank's part of ||W0 + s_i B_i A_i||_F^2 for every task i (the numerators of c_i), in float64
 * from the float32 W0 (d_out, d_in) of the held layer, through
 *   ||W0 + s B A||^2 = ||W0||^2 + 2 s <B^T W0, A> + s^2 <B^T B, A A^T>:
 * W0 is read once for all tasks, a panel of at most W_PANEL rows at a time (panels rank, rank + size,
 * ...: the caller sums over the ranks), and B^T W0 of every task is one GEMM of the stacked B's
 * (R = sum r_i rows) per panel. The last term (r x r Grams) is rank 0's. ww[i] receives task i's part. */
static itr_err weight_norms(int N, int64_t d_in, int64_t d_out, const float *W0, const itr_merge_task *tasks, int rank,
                            int size, double *ww) {
  int64_t R = 0, off[ITR_MAX_TASKS + 1] = {0};
  for (int i = 0; i < N; i++) off[i + 1] = off[i] + tasks[i].r;
  R = off[N];
  int64_t rows = (d_out + size - 1) / size; /* every rank gets panels even when d_out < W_PANEL size */
  if (rows > W_PANEL) rows = W_PANEL;
  if (rows < 1) rows = 1;
  double *wp = NULL, *bp = NULL, *M = NULL, s0 = 0.0;
  itr_err e = itr_calloc((size_t)rows * (size_t)d_in, sizeof(double), "W0 panel f64", &wp);
  if (e == ITR_OK) e = itr_calloc((size_t)(rows * R) + 1, sizeof(double), "stacked B panel", &bp);
  if (e == ITR_OK) e = itr_calloc((size_t)(R * d_in) + 1, sizeof(double), "B^T W0", &M);
  for (int64_t o0 = (int64_t)rank * rows; e == ITR_OK && o0 < d_out; o0 += rows * size) {
    const int64_t no = d_out - o0 < rows ? d_out - o0 : rows;
    to_f64(W0 + o0 * d_in, (size_t)(no * d_in), wp);
    for (int64_t q = 0; q < no * d_in; q++) s0 += wp[q] * wp[q];
    if (R == 0) continue;
    for (int i = 0; i < N; i++) /* bp (no, R): rows o0.. of every B_i side by side */
      for (int64_t o = 0; o < no; o++)
        for (int k = 0; k < tasks[i].r; k++) bp[o * R + off[i] + k] = tasks[i].B[(o0 + o) * tasks[i].r + k];
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)R, (int)d_in, (int)no, 1.0, bp, (int)R, wp, (int)d_in,
                1.0, M, (int)d_in);
  }
  for (int i = 0; i < N && e == ITR_OK; i++) {
    const itr_merge_task *t = &tasks[i];
    double cross = 0.0, sq = 0.0;
    for (int k = 0; k < t->r; k++) cross += cblas_ddot((int)d_in, M + (off[i] + k) * d_in, 1, t->A + k * d_in, 1);
    if (rank == 0) /* <B^T B, A A^T> */
      for (int k = 0; k < t->r; k++)
        for (int m = 0; m < t->r; m++)
          sq += cblas_ddot((int)d_out, t->B + k, t->r, t->B + m, t->r) *
                cblas_ddot((int)d_in, t->A + k * d_in, 1, t->A + m * d_in, 1);
    ww[i] = s0 + 2.0 * t->scale * cross + t->scale * t->scale * sq;
  }
  free(wp);
  free(bp);
  free(M);
  return e;
}

/* The system of one module at a site, filled task by task: T2 in the block-cyclic layout (lower
 * triangle), the right-hand sides replicated in sys.rhs (sys.T2 stays NULL). */
typedef struct {
  int m; /* index in c->arch */
  int64_t d_out;
  char label[96];
  itr_merge_task tasks[ITR_MAX_TASKS];
  double *A[ITR_MAX_TASKS], *B[ITR_MAX_TASKS]; /* f64 factors of each task (r_i = 0: NULL) */
  const float *W0f;                            /* (d_out, d_in) f32: the held layer's weight */
  double *W0;                                  /* (d_out, d_in) f64 (with_pretrain only) */
  double *W;                                   /* (d_out, d_in) f64 W0 + dW_i (with_pretrain, one task) */
  double *piece;                               /* (nrhs, d_in) f64: this task's rhs term, summed over ranks */
  itr_dist_matrix T2;                          /* d_in space only */
  itr_system sys;
  int tokens;                                  /* solved in token space (token_solve): no T2, no piece */
  itr_task_terms tt[ITR_MAX_TASKS];            /* each task's coefficients (token space) */
  itr_dist_solve_report rep;                   /* the token-space solve's report */
} module_job;

static void module_job_fini(module_job *j) {
  for (int i = 0; i < ITR_MAX_TASKS; i++) {
    free(j->A[i]);
    free(j->B[i]);
  }
  free(j->W0);
  free(j->W);
  free(j->piece);
  itr_dist_matrix_fini(&j->T2);
  itr_system_fini(&j->sys);
}

static itr_err module_job_init(merge_ctx *c, int l, int q, int64_t d_in, int tokens, module_job *j) {
  const itr_merge_opts *o = c->opt;
  const itr_arch_module *am = &c->arch.module[q];
  const itr_module m = am->id;
  j->m = q;
  j->d_out = am->d_out;
  snprintf(j->label, sizeof j->label, "layers.%d.%s.%s", l, am->block, am->name);
  int64_t R = 0;
  for (int i = 0; i < c->N; i++) {
    ITR_TRY(merge_task_factors(c->ad[i], l, m, j->d_out, d_in, &j->tasks[i], &j->A[i], &j->B[i]));
    j->tasks[i].weight = itr_method_reads(c->method, "manual_coef") ? o->manual_coef[i] : 1.0;
    R += j->tasks[i].r;
  }
  const int dense = itr_method_reads(c->method, "with_pretrain") && o->with_pretrain;
  ITR_CHECK(c->layer && c->layer_index == l, ITR_ERR_INTERNAL, "layer %d is not the one held (%d)", l, c->layer_index);
  j->W0f = itr_model_weight(c->layer, l, m);
  if (dense) { /* with_pretrain: W0 + dW_i enters the right-hand side, and the result is W - W0 */
    ITR_TRY(itr_calloc((size_t)j->d_out * (size_t)d_in, sizeof(double), "W0 f64", &j->W0));
    to_f64(j->W0f, (size_t)j->d_out * (size_t)d_in, j->W0);
  }
  const int64_t nrhs = dense ? j->d_out : R;
  ITR_CHECK(nrhs >= 1, ITR_ERR_INTERNAL, "module %s: no adapter targets it", j->label);
  if (dense) ITR_TRY(itr_calloc((size_t)j->d_out * (size_t)d_in, sizeof(double), "W0 + dW f64", &j->W));
  j->tokens = tokens;
  if (!tokens) {
    ITR_TRY(itr_calloc((size_t)nrhs * (size_t)d_in, sizeof(double), "right-hand side term", &j->piece));
    ITR_TRY(itr_dist_matrix_init(&j->T2, c->grid, (int)d_in, (int)d_in));
  }
  j->sys.d_in = d_in;
  j->sys.nrhs = nrhs;
  j->sys.dense = dense;
  j->sys.N = c->N;
  j->sys.alpha_2 = o->alpha_2;
  memcpy(j->sys.label, j->label, sizeof j->label); /* 96 < 128 bytes, NUL included */
  ITR_TRY(itr_calloc((size_t)nrhs * (size_t)d_in, sizeof(double), "right-hand sides", &j->sys.rhs));
  return itr_calloc((size_t)c->N, sizeof(double), "merge coefficients", &j->sys.coef);
}

/* W = W0 + s B A (d_out, d_in) */
static void full_weight(const module_job *j, const itr_merge_task *t, int64_t d_in, double *W) {
  memcpy(W, j->W0, (size_t)j->d_out * (size_t)d_in * sizeof(double));
  if (t->r > 0)
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)j->d_out, (int)d_in, t->r, t->scale, t->B, t->r, t->A,
                (int)d_in, 1.0, W, (int)d_in);
}

/* This rank's share of the right-hand side term of task i: F X^T Xt' with F = A_i (factored and
 * RegMean, where Xt' = X) or W0 + dW_i (with_pretrain), from the rows x, xt (T, d_in) f32. */
static itr_err rhs_piece_local(const module_job *j, const itr_merge_task *t, int64_t d_in, int64_t T, const float *x,
                               const float *xt, double rho, int k) {
  const int64_t m = j->sys.dense ? j->d_out : t->r;
  memset(j->piece, 0, (size_t)j->sys.nrhs * (size_t)d_in * sizeof(double));
  if (m == 0 || T == 0) return ITR_OK;
  const double *F = j->sys.dense ? j->W : t->A;
  if (k == 1 || rho == 1.0) return itr_stats_cross_add((int)m, d_in, F, T, x, x, j->piece);
  if (rho == 0.0) return itr_stats_cross_add((int)m, d_in, F, T, x, xt, j->piece);
  /* (1 - rho) F X^T Xt + rho F X^T X, each term exact in f64 */
  double *tmp = NULL;
  ITR_TRY(itr_calloc((size_t)m * (size_t)d_in, sizeof(double), "right-hand side term", &tmp));
  itr_err e = itr_stats_cross_add((int)m, d_in, F, T, x, xt, tmp);
  for (int64_t q = 0; q < m * d_in; q++) j->piece[q] = (1.0 - rho) * tmp[q];
  memset(tmp, 0, (size_t)m * (size_t)d_in * sizeof(double));
  if (e == ITR_OK) e = itr_stats_cross_add((int)m, d_in, F, T, x, x, tmp);
  for (int64_t q = 0; q < m * d_in; q++) j->piece[q] += rho * tmp[q];
  free(tmp);
  return e;
}

/* Task i's contribution to module j, with the coefficients of the method table's terms function
 * (itr_task_terms: the one statement of each method's formulas, which the replicated assembly of
 * src/merge uses too): T2 += gram G' (off-diagonal times offdiag) + shift I, and the rows of the rhs
 * = rhs (cross piece + (diag diag(G') + ridge) F). piece holds F X^T Xt' summed over ranks; diag is
 * diag(G') (ITR_METHOD_GRAM_DIAG, else NULL). */
static itr_err assemble_task(merge_ctx *c, module_job *j, int i, int64_t row, double coef, const itr_dist_matrix *G,
                             double n1, double n2, const double *diag) {
  const itr_merge_opts *o = c->opt;
  const itr_merge_task *t = &j->tasks[i];
  const int64_t d = j->sys.d_in;
  const itr_terms_params p = {o->alpha_1, o->alpha_2, o->regmean_alpha, j->sys.dense};
  itr_task_terms tt;
  ITR_CHECK(c->method->terms, ITR_ERR_INTERNAL, "method '%s' has no terms function", c->method->name);
  ITR_TRY(c->method->terms(&p, t, i, coef, n1, n2, j->label, &tt));
  ITR_CHECK(tt.diag == 0.0 || diag, ITR_ERR_INTERNAL, "method '%s' reads diag(G) but has no ITR_METHOD_GRAM_DIAG",
            c->method->name);
  j->sys.coef[i] = tt.weight;
  j->tt[i] = tt;
  if (j->tokens) { /* the system is formed in token space from the rows (token_solve) */
    ITR_CHECK(tt.offdiag == 1.0 && tt.diag == 0.0 && tt.gram > 0 && tt.shift >= 0, ITR_ERR_INTERNAL,
              "module %s, task %d: the system is not a Gram of rows plus a ridge; it cannot be solved in token space",
              j->label, i);
    return ITR_OK;
  }
  itr_dist_matrix_add(&j->T2, tt.gram, G, tt.offdiag, tt.shift, 1);
  /* F: the task's factor A_i (r_i rows from row) or W0 + dW_i (d_out rows, dense, summed over tasks) */
  const int64_t rows = j->sys.dense ? j->d_out : t->r;
  const double *F = j->sys.dense ? j->W : t->A;
  double *out = j->sys.rhs + (j->sys.dense ? 0 : row * d);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t q = 0; q < d; q++) {
      const double f = tt.diag != 0.0 ? tt.diag * diag[q] + tt.ridge : tt.ridge;
      const double v = tt.rhs * (tt.cross * j->piece[r * d + q] + f * F[r * d + q]);
      if (j->sys.dense)
        out[r * d + q] += v;
      else
        out[r * d + q] = v;
    }
  return ITR_OK;
}

/* c_i of ALGORITHM.md step 1 from the numerator ww and the denominator xw (summed over ranks). */
static itr_err adaptive_weight(const module_job *j, int i, double ww, double xw, double *c) {
  ITR_CHECK(xw > 0 && isfinite(xw) && ww > 0 && isfinite(ww), ITR_ERR_NUMERIC,
            "module '%s', task %d: adaptive weight ||W0 + dW||^2 / ||X (W0 + dW)^T||^2 = %g / %g is undefined. Are "
            "the calibration inputs of this task zero?",
            j->label, i, ww, xw);
  *c = ww / xw;
  return ITR_OK;
}

itr_err site_solve_system(const itr_dist_grid *grid, const itr_dist_matrix *T2, itr_system *sys,
                          itr_dist_solve_report *rep, PetscLogEvent ev) {
  const int64_t d = sys->d_in, R = sys->nrhs;
  (void)PetscLogEventBegin(ev, 0, 0, 0, 0);
  itr_dist_matrix B = {0}, Y = {0};
  double *tmp = NULL;
  itr_err e = itr_dist_matrix_init(&B, grid, (int)d, (int)R);
  if (e == ITR_OK) e = itr_dist_matrix_init(&Y, grid, (int)d, (int)R);
  if (e == ITR_OK) e = itr_calloc((size_t)d * (size_t)R, sizeof(double), "right-hand sides (d_in, R)", &tmp);
  e = itr_dist_agree(grid->comm, e);
  if (e == ITR_OK) {
    itr_system_transpose(R, d, sys->rhs, tmp);
    itr_dist_matrix_scatter(&B, tmp);
    e = itr_dist_solve_spd(sys->label, T2, &B, &Y, rep);
  }
  if (e == ITR_OK) e = itr_dist_matrix_gather(&Y, -1, tmp);
  if (e == ITR_OK) {
    itr_system_transpose(d, R, tmp, sys->rhs);
    sys->solved = 1;
    sys->residual = rep->residual;
    sys->passed = rep->passed;
  }
  free(tmp);
  itr_dist_matrix_fini(&B);
  itr_dist_matrix_fini(&Y);
  /* this rank's share of pdpotrf (d^3 / 3), pdpotrs (2 d^2 R) and the residual's pdsymm (2 d^2 R) */
  (void)PetscLogFlops(((double)d * (double)d * (double)d / 3.0 + 4.0 * (double)d * (double)d * (double)R) / grid->size);
  (void)PetscLogEventEnd(ev, 0, 0, 0, 0);
  return e;
}

/* ---- systems in token space (docs/ALGORITHM.md, "Systems in token space") --------------------------
 * T2 = Z^T Z + lambda I with Z the site's rows of every task stacked, task i's scaled by sqrt(gamma_i)
 * (gamma_i = the terms' gram coefficient, lambda = the sum of their shifts), and RHS = P Xt' + Q (P the
 * cross terms, Q the alpha_1 ridge). Then Y = RHS T2^-1 = W Z + Q / lambda with W = L S^-1, where
 * S = lambda I + Z Z^T (n x n) and L = P Gamma^-1/2 - Q Z^T / lambda (R x n): the push-through identity
 * for P (no cancellation), Woodbury for Q. The kernel K0 = Xt' Xt'^T of the unscaled rows is formed once
 * per site (pdsyrk over all ranks); each module scales it by its gamma_i and factors its own S. */

/* Whether site s of iteration k is solved in token space: -system tokens, or auto when the method's
 * system is a Gram plus a ridge and the token-space work (the kernel n^2 d, the norms, an n x n
 * factorisation per module) is below the d_in-space work (the Grams d^2 n, a d x d factorisation per
 * module). The same answer on every rank (global token counts). */
static int site_uses_tokens(const merge_ctx *c, int s, int n_jobs) {
  const itr_merge_opts *o = c->opt;
  if (!strcmp(o->system, "tokens")) return 1;
  if (strcmp(o->system, "auto") || o->with_pretrain || c->n_groups > 1 || !(o->alpha_2 > 0) ||
      (itr_method_reads(c->method, "regmean_alpha") && o->regmean_alpha != 1.0))
    return 0;
  double n = 0, R = 0;
  for (int i = 0; i < c->N; i++) n += (double)c->calib[i].n_tokens, R += c->ad[i]->r;
  const double d = (double)c->arch.site[s].d_in, J = n_jobs;
  const double inputs = d * d * n + J * (d * d * d / 3.0 + 4.0 * d * d * R);
  const double tokens = 3.0 * n * n * d + J * (n * n * n / 3.0 + 4.0 * n * n * R + 4.0 * n * d * R);
  return tokens < inputs;
}

typedef struct {
  int64_t d, T, T_max, n_pad;        /* inputs; this rank's rows (all tasks); rows per rank in the layout */
  int64_t off[ITR_MAX_TASKS + 1];    /* task i's rows among this rank's: [off[i], off[i + 1]) */
  int *task_of;                      /* [n_pad] the task of each global row, -1 for padding */
  double *zm;                        /* (T, d) f64: this rank's mixed rows Xt', task by task */
  float *x;                          /* (T, d) f32: this rank's source rows X, task by task */
  itr_dist_matrix K0;                /* (n_pad, n_pad) lower: Xt' Xt'^T */
} token_site;

static void token_site_fini(token_site *ts) {
  free(ts->task_of);
  free(ts->zm);
  free(ts->x);
  itr_dist_matrix_fini(&ts->K0);
  memset(ts, 0, sizeof *ts);
}

/* Stacks this rank's rows of every task, lays them out over the grid and forms K0. Collective on
 * c->comm. */
static itr_err token_site_init(merge_ctx *c, int k, int s, double rho, token_site *ts) {
  const int N = c->N, P = c->size;
  const int64_t d = c->arch.site[s].d_in;
  ts->d = d;
  for (int i = 0; i < N; i++) ts->off[i + 1] = ts->off[i] + c->calib_sh[i].T;
  ts->T = ts->off[N];
  int64_t *counts = NULL; /* [P][N] every rank's rows per task */
  float *xc = NULL, *xtc = NULL;
  int in_rows = 0; /* the ItrRows event is open (ended at done: on an error) */
  itr_err e = itr_calloc((size_t)P * (size_t)N, sizeof(int64_t), "row counts", &counts);
  if (e == ITR_OK) e = itr_calloc((size_t)(ts->T * d) + 1, sizeof(double), "token-space rows", &ts->zm);
  if (e == ITR_OK) e = itr_calloc((size_t)(ts->T * d) + 1, sizeof(float), "stacked rows", &xc);
  if (e == ITR_OK && k >= 2) e = itr_calloc((size_t)(ts->T * d) + 1, sizeof(float), "stacked rows", &xtc);
  ITR_TRY_GOTO(itr_dist_agree(c->comm, e), e, done);
  in_rows = 1;
  (void)PetscLogEventBegin(c->ev_rows, 0, 0, 0, 0);
  for (int i = 0; i < N; i++) {
    const size_t n = (size_t)c->calib_sh[i].T * (size_t)d, at = (size_t)ts->off[i] * (size_t)d;
    if (n == 0) continue;
    memcpy(xc + at, c->X[i][s], n * sizeof(float));
    if (xtc) memcpy(xtc + at, c->Xt[i][s], n * sizeof(float));
  }
  /* the same arithmetic as the block-cyclic rows: (1 - rho) xt + rho x in float64 */
  for (size_t q = 0; q < (size_t)(ts->T * d); q++) {
    ts->zm[q] = xtc ? (1.0 - rho) * (double)xtc[q] + rho * (double)xc[q] : (double)xc[q];
  }
  int64_t mine[ITR_MAX_TASKS];
  for (int i = 0; i < N; i++) mine[i] = c->calib_sh[i].T;
  if (MPI_Allgather(mine, N, MPI_INT64_T, counts, N, MPI_INT64_T, c->comm) != MPI_SUCCESS) {
    e = itr_error_set(ITR_ERR_INTERNAL, "MPI_Allgather of the row counts failed");
    goto done;
  }
  ts->T_max = 1;
  for (int p = 0; p < P; p++) {
    int64_t t = 0;
    for (int i = 0; i < N; i++) t += counts[(size_t)p * N + i];
    if (t > ts->T_max) ts->T_max = t;
  }
  ts->n_pad = (int64_t)P * ts->T_max;
  e = itr_calloc((size_t)ts->n_pad, sizeof(int), "task of each row", &ts->task_of);
  if (e == ITR_OK)
    for (int p = 0; p < P; p++) {
      int64_t g = (int64_t)p * ts->T_max;
      for (int64_t q = 0; q < ts->T_max; q++) ts->task_of[g + q] = -1;
      for (int i = 0; i < N; i++)
        for (int64_t t = 0; t < counts[(size_t)p * N + i]; t++) ts->task_of[g++] = i;
    }
  ITR_TRY_GOTO(itr_dist_agree(c->comm, e), e, done);
  (void)PetscLogEventEnd(c->ev_rows, 0, 0, 0, 0);
  in_rows = 0;
  /* K0 from the rows where they are: each rank's slice of the columns of every row, partial kernels
   * summed into the layout (itr_dist_kernel_rows) */
  e = itr_dist_agree(c->comm, itr_dist_matrix_init(&ts->K0, c->grid, (int)ts->n_pad, (int)ts->n_pad));
  if (e == ITR_OK)
    e = itr_dist_agree(c->comm, xtc ? itr_dist_kernel_rows(c->grid, ts->T, d, xtc, 1.0 - rho, xc, rho, &ts->K0)
                                    : itr_dist_kernel_rows(c->grid, ts->T, d, xc, 1.0, NULL, 0.0, &ts->K0));
  /* this rank's share of the kernel: n^2 d */
  (void)PetscLogFlops((double)ts->n_pad * (double)ts->n_pad * (double)d / c->grid->size);
done:
  if (in_rows) (void)PetscLogEventEnd(c->ev_rows, 0, 0, 0, 0);
  free(counts);
  ts->x = xc; /* kept: the source rows (float32) of the P terms */
  free(xtc);
  return e;
}

/* ||K0_ii||_F^2 for every task i, summed over the ranks: the norm of task i's kernel X_i X_i^T, which
 * in iteration 1 (Xt' = X) is the (i, i) block of K0 (lower triangle held: off-diagonal entries
 * count twice). Collective on c->comm. */
static itr_err token_block_norms(const merge_ctx *c, const token_site *ts, double *nrm2) {
  const itr_dist_matrix *K = &ts->K0;
  memset(nrm2, 0, sizeof(double) * (size_t)c->N);
  for (int lc = 0; lc < K->n_loc; lc++) {
    const int gc = itr_dist_global_col(K, lc), tc = ts->task_of[gc];
    if (tc < 0) continue;
    const double *col = K->a + (size_t)lc * (size_t)K->lld;
    double sum = 0.0;
    for (int li = 0; li < K->m_loc; li++) {
      const int gr = itr_dist_global_row(K, li);
      if (gr < gc || ts->task_of[gr] != tc) continue;
      sum += (gr == gc ? 1.0 : 2.0) * col[li] * col[li];
    }
    nrm2[tc] += sum;
  }
  return itr_dist_allreduce_sum(nrm2, c->N, c->comm, "the token-space kernel norms");
}

/* Solves module j at the site in token space: sys.rhs receives Y (R x d_in) on every rank, rep the
 * scaled residual of the n x n solve. Collective on c->comm. */
static itr_err token_solve(merge_ctx *c, const token_site *ts, module_job *j) {
  const int N = c->N;
  const int64_t d = ts->d, R = j->sys.nrhs, n = ts->n_pad, Tm = ts->T_max;
  double lambda = 0.0, g[ITR_MAX_TASKS];
  for (int i = 0; i < N; i++) lambda += j->tt[i].shift, g[i] = sqrt(j->tt[i].gram);
  itr_err e = ITR_OK;
  ITR_CHECK(lambda > 0 && isfinite(lambda), ITR_ERR_NUMERIC,
            "module %s: the ridge lambda = %g of the token-space system must be positive: raise -alpha_2", j->label,
            lambda);
  double *Q = NULL, *Lt = NULL, *Lfull = NULL, *Wt = NULL, *Xi = NULL;
  int64_t Tmax_task = 0;
  for (int i = 0; i < N; i++)
    if (ts->off[i + 1] - ts->off[i] > Tmax_task) Tmax_task = ts->off[i + 1] - ts->off[i];
  itr_dist_matrix S = {0}, B = {0}, Yd = {0};
  e = itr_calloc((size_t)(R * d), sizeof(double), "Q", &Q);
  if (e == ITR_OK) e = itr_calloc((size_t)(Tm * R), sizeof(double), "L^T (this rank's rows)", &Lt);
  if (e == ITR_OK) e = itr_calloc((size_t)(n * R), sizeof(double), "L^T", &Lfull);
  if (e == ITR_OK) e = itr_calloc((size_t)(Tmax_task * d) + 1, sizeof(double), "one task's source rows", &Xi);
  if (e == ITR_OK) e = itr_dist_matrix_init(&S, c->grid, (int)n, (int)n);
  if (e == ITR_OK) e = itr_dist_matrix_init(&B, c->grid, (int)n, (int)R);
  if (e == ITR_OK) e = itr_dist_matrix_init(&Yd, c->grid, (int)n, (int)R);
  ITR_TRY_GOTO(itr_dist_agree(c->comm, e), e, done);
  /* Q = stack_i(rhs_i ridge_i A_i) */
  int64_t row = 0;
  for (int i = 0; i < N; i++) {
    const itr_merge_task *t = &j->tasks[i];
    for (int64_t q = 0; q < (int64_t)t->r * d; q++) Q[row * d + q] = j->tt[i].rhs * j->tt[i].ridge * t->A[q];
    row += t->r;
  }
  /* L^T (this rank's rows), task by task (Z's rows are g_i Xt_i'): -g_i Xt_i' Q^T / lambda, and in task i's
   * columns + rhs_i cross_i / g_i X_i A_i^T */
  row = 0;
  for (int i = 0; i < N; i++) {
    const itr_merge_task *t = &j->tasks[i];
    const int64_t Ti = ts->off[i + 1] - ts->off[i];
    if (Ti > 0)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)Ti, (int)R, (int)d, -g[i] / lambda,
                  ts->zm + ts->off[i] * d, (int)d, Q, (int)d, 0.0, Lt + ts->off[i] * R, (int)R);
    if (t->r > 0 && Ti > 0) {
      for (int64_t q = 0; q < Ti * d; q++) Xi[q] = (double)ts->x[ts->off[i] * d + q];
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)Ti, t->r, (int)d, j->tt[i].rhs * j->tt[i].cross / g[i],
                  Xi, (int)d, t->A, (int)d, 1.0, Lt + ts->off[i] * R + row, (int)R);
    }
    row += t->r;
  }
  if (MPI_Allgather(Lt, (int)(Tm * R), MPI_DOUBLE, Lfull, (int)(Tm * R), MPI_DOUBLE, c->comm) != MPI_SUCCESS) {
    e = itr_error_set(ITR_ERR_INTERNAL, "MPI_Allgather of the token-space right-hand sides failed");
    goto done;
  }
  /* S = lambda I + Gamma^1/2 K0 Gamma^1/2 (lower triangle) */
  for (int lc = 0; lc < S.n_loc; lc++) {
    const int gc = itr_dist_global_col(&S, lc), tc = ts->task_of[gc];
    for (int li = 0; li < S.m_loc; li++) {
      const int gr = itr_dist_global_row(&S, li), tr = ts->task_of[gr];
      const size_t at = (size_t)lc * (size_t)S.lld + (size_t)li;
      S.a[at] = tr >= 0 && tc >= 0 ? g[tr] * g[tc] * ts->K0.a[at] : 0.0;
      if (gr == gc) S.a[at] += lambda;
    }
  }
  itr_dist_matrix_scatter(&B, Lfull);
  (void)PetscLogEventBegin(c->ev_solve, 0, 0, 0, 0);
  e = itr_dist_solve_spd(j->label, &S, &B, &Yd, &j->rep);
  /* pdpotrf, pdpotrs and the residual; and this rank's L (Z Q^T, X A^T) and W Z: 4 T d R + 2 T d r */
  (void)PetscLogFlops(((double)n * n * n / 3.0 + 4.0 * (double)n * n * (double)R) / c->grid->size +
                      4.0 * (double)ts->T * (double)d * (double)R + 2.0 * (double)ts->T * (double)d * (double)R / N);
  (void)PetscLogEventEnd(c->ev_solve, 0, 0, 0, 0);
  Wt = Lfull; /* reused: (n, R) W^T on every rank */
  if (e == ITR_OK) e = itr_dist_matrix_gather(&Yd, -1, Wt);
  ITR_TRY_GOTO(e, e, done);
  /* Y = W Z + Q / lambda: this rank's rows' part, summed over the ranks */
  memset(j->sys.rhs, 0, (size_t)(R * d) * sizeof(double));
  for (int i = 0; i < N; i++) { /* sum_i g_i W_i^T Xt_i' over this rank's rows of task i */
    const int64_t Ti = ts->off[i + 1] - ts->off[i];
    if (Ti > 0)
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)R, (int)d, (int)Ti, g[i],
                  Wt + ((int64_t)c->rank * Tm + ts->off[i]) * R, (int)R, ts->zm + ts->off[i] * d, (int)d, 1.0,
                  j->sys.rhs, (int)d);
  }
  e = itr_dist_agree(c->comm, itr_dist_allreduce_sum(j->sys.rhs, R * d, c->comm, "the token-space solution"));
  if (e == ITR_OK)
    for (int64_t q = 0; q < R * d; q++) j->sys.rhs[q] += Q[q] / lambda;
  if (e == ITR_OK) {
    j->sys.solved = 1;
    j->sys.residual = j->rep.residual;
    j->sys.passed = j->rep.passed;
  }
done:
  free(Q);
  free(Lt);
  free(Lfull);
  free(Xi);
  itr_dist_matrix_fini(&S);
  itr_dist_matrix_fini(&B);
  itr_dist_matrix_fini(&Yd);
  return e;
}

/* Flops of itr_dist_cross_norm2 on n x d rows (same: A == B): one or two (n, n) kernels when n < d,
 * else the (d, d) Gram. */
static double cross_norm_flops(int64_t n, int64_t d, int same) {
  const double nn = (double)n, dd = (double)d;
  return n < d ? (same ? 1.0 : 2.0) * nn * nn * dd : (same ? 1.0 : 2.0) * nn * dd * dd;
}

/* Assembles every targeted module at site s of layer l (iteration k) into jobs[*nj...]: the
 * statistics of one task at a time, formed in the block-cyclic layout and freed before the next. */
static itr_err assemble_site(merge_ctx *c, int k, int l, int s, module_job *jobs, int *nj_total) {
  const itr_merge_opts *o = c->opt;
  const int N = c->N;
  const itr_arch_site *site = &c->arch.site[s];
  const int64_t d_in = site->d_in;
  const double rho = itr_method_reads(c->method, "reg_coef") ? o->reg_coef : 0.0;
  module_job *site_jobs = jobs + *nj_total;
  int nj = 0, n_targeted = 0;
  itr_err e = ITR_OK;
  for (int a = 0; a < site->n_modules; a++) n_targeted += TARGETED(c, site->modules[a]);
  const int tokens = n_targeted > 0 && site_uses_tokens(c, s, n_targeted);
  if (k == 1 && l == c->layer_lo && n_targeted > 0) { /* the choice is the same for every layer and iteration */
    int64_t n = 0;
    for (int i = 0; i < N; i++) n += c->calib[i].n_tokens;
    itr_log(ITR_LOG_INFO, "site %s (d_in %lld, %lld calibration rows): systems in %s space", site->name,
            (long long)d_in, (long long)n, tokens ? "token" : "input");
  }
  for (int a = 0; a < site->n_modules && e == ITR_OK; a++) {
    const int q = site->modules[a];
    if (TARGETED(c, q)) e = module_job_init(c, l, q, d_in, tokens, &site_jobs[nj++]);
  }
  *nj_total += nj;
  e = itr_dist_agree(c->comm, e);
  if (nj == 0 || e != ITR_OK) return e;

  /* token space: the kernel of the site's rows first; in iteration 1 the tasks' norms are its blocks */
  token_site ts;
  memset(&ts, 0, sizeof ts);
  double kn2[ITR_MAX_TASKS] = {0};
  if (tokens) {
    PetscLogStagePush(c->stage_stats);
    (void)PetscLogEventBegin(c->ev_gram, 0, 0, 0, 0);
    e = token_site_init(c, k, s, k >= 2 ? rho : 0.0, &ts);
    if (e == ITR_OK && k == 1) e = itr_dist_agree(c->comm, token_block_norms(c, &ts, kn2));
    (void)PetscLogEventEnd(c->ev_gram, 0, 0, 0, 0);
    PetscLogStagePop();
  }
  /* input space: one (d_in, d_in) Gram for the site, overwritten by each task's (its lower triangle;
   * the upper one is never read) */
  itr_dist_matrix G = {0};
  if (!tokens && e == ITR_OK) e = itr_dist_agree(c->comm, itr_dist_matrix_init(&G, c->grid, (int)d_in, (int)d_in));
  /* iteration 1: the numerators of every c_i, and the denominators from the source model's forward of
   * this layer, summed over the ranks */
  double wsum[2][ITR_MAX_TASKS][ITR_ARCH_MAX_MODULES] = {{{0}}};
  if (e == ITR_OK && (c->method->flags & ITR_METHOD_ADAPTIVE) && k == 1) {
    PetscLogStagePush(c->stage_stats);
    (void)PetscLogEventBegin(c->ev_weights, 0, 0, 0, 0);
    double part[ITR_MAX_TASKS];
    for (int q = 0; q < nj && e == ITR_OK; q++) {
      const module_job *j = &site_jobs[q];
      e = weight_norms(N, d_in, j->d_out, j->W0f, j->tasks, c->rank, c->size, part);
      int64_t R = 0;
      for (int i = 0; i < N; i++) wsum[0][i][q] = c->ynorm[i][j->m], wsum[1][i][q] = part[i], R += j->tasks[i].r;
      /* this rank's panels: B^T W0 (2 R per entry of W0) and ||W0||^2 (2 per entry) */
      (void)PetscLogFlops((2.0 * (double)R + 2.0) * (double)d_in * (double)j->d_out / c->size);
    }
    e = itr_dist_agree(c->comm, e);
    if (e == ITR_OK && MPI_Allreduce(MPI_IN_PLACE, wsum, 2 * ITR_MAX_TASKS * ITR_ARCH_MAX_MODULES, MPI_DOUBLE, MPI_SUM,
                                     c->comm) != MPI_SUCCESS)
      e = itr_error_set(ITR_ERR_INTERNAL, "MPI_Allreduce of the adaptive weights failed");
    (void)PetscLogEventEnd(c->ev_weights, 0, 0, 0, 0);
    PetscLogStagePop();
  }
  int64_t row[ITR_ARCH_MAX_MODULES] = {0};
  for (int i = 0; i < N && e == ITR_OK; i++) {
    const int64_t T = c->calib_sh[i].T;
    const float *x = c->X[i][s], *xt = k >= 2 ? c->Xt[i][s] : NULL;
    itr_dist_matrix Xd = {0}, Xm = {0};
    double *diag = NULL, n1 = 0.0, n2 = 0.0, xw[ITR_ARCH_MAX_MODULES] = {0}, ww[ITR_ARCH_MAX_MODULES] = {0};
    /* the Gram of the (mixed) merged-model rows and the two norms, in the block-cyclic layout */
    PetscLogStagePush(c->stage_stats);
    (void)PetscLogEventBegin(c->ev_gram, 0, 0, 0, 0);
    (void)PetscLogEventBegin(c->ev_rows, 0, 0, 0, 0);
    if (xt) e = itr_dist_rows_create(c->grid, T, d_in, x, 1.0, NULL, 0.0, &Xd); /* for the cross norm */
    if (e == ITR_OK && xt) e = itr_dist_rows_create(c->grid, T, d_in, xt, 1.0 - rho, x, rho, &Xm);
    (void)PetscLogEventEnd(c->ev_rows, 0, 0, 0, 0);
    if (e == ITR_OK && tokens && !xt) /* iteration 1: the (i, i) block of the site's kernel */
      n2 = kn2[i];
    else if (e == ITR_OK && tokens) { /* no Gram: its norm through the (n_i, n_i) kernel */
      e = itr_dist_cross_norm2(xt ? &Xm : &Xd, xt ? &Xm : &Xd, &n2);
      (void)PetscLogFlops(cross_norm_flops(c->calib[i].n_tokens, d_in, 1) / c->grid->size);
    }
    /* the Gram of the rows where they are (their columns to the Gram's owners, or -gram_exchange partial) */
    if (e == ITR_OK && !tokens)
      e = itr_dist_agree(c->comm, xt ? itr_dist_gram_rows(c->grid, T, d_in, xt, 1.0 - rho, x, rho, &G)
                                     : itr_dist_gram_rows(c->grid, T, d_in, x, 1.0, NULL, 0.0, &G));
    if (e == ITR_OK && !tokens) e = itr_dist_frob2(&G, 1, &n2);
    n2 = sqrt(n2);
    n1 = n2; /* iteration 1: Xt' = X */
    if (e == ITR_OK && xt) {
      e = itr_dist_cross_norm2(&Xd, &Xm, &n1);
      (void)PetscLogFlops(cross_norm_flops(c->calib[i].n_tokens, d_in, 0) / c->grid->size);
    }
    if (xt) n1 = sqrt(n1);
    itr_dist_matrix_fini(&Xd);
    itr_dist_matrix_fini(&Xm);
    /* this rank's share of pdsyrk over all the task's rows: n d (d + 1) */
    if (!tokens) (void)PetscLogFlops((double)c->calib[i].n_tokens * (double)d_in * (double)(d_in + 1) / c->grid->size);
    (void)PetscLogEventEnd(c->ev_gram, 0, 0, 0, 0);
    if (e == ITR_OK && !tokens && (c->method->flags & ITR_METHOD_GRAM_DIAG)) {
      e = itr_dist_agree(c->comm, itr_calloc((size_t)d_in, sizeof(double), "diagonal of X^T X", &diag));
      if (e == ITR_OK) e = itr_dist_matrix_diag(&G, diag);
    }
    if ((c->method->flags & ITR_METHOD_ADAPTIVE) && k == 1)
      for (int q = 0; q < nj; q++) xw[q] = wsum[0][i][q], ww[q] = wsum[1][i][q];
    PetscLogStagePop();
    for (int q = 0; q < nj && e == ITR_OK; q++) {
      module_job *j = &site_jobs[q];
      itr_merge_task *t = &j->tasks[i];
      double *coef = c->coef + SLOT(l, j->m) * (size_t)N;
      PetscLogStagePush(c->stage_assemble);
      (void)PetscLogEventBegin(c->ev_assemble, 0, 0, 0, 0);
      if ((c->method->flags & ITR_METHOD_ADAPTIVE) && k == 1) e = adaptive_weight(j, i, ww[q], xw[q], &coef[i]);
      if (e == ITR_OK && j->sys.dense) full_weight(j, t, d_in, j->W);
      if (e == ITR_OK && !tokens) e = rhs_piece_local(j, t, d_in, T, x, xt, rho, k);
      /* F X^T Xt' for F (m, d_in): 4 T d_in m, twice when mixed */
      const double m_rows = (double)(j->sys.dense ? j->d_out : t->r);
      if (!tokens) (void)PetscLogFlops(4.0 * (double)T * (double)d_in * m_rows * (k >= 2 && rho > 0 && rho < 1 ? 2 : 1));
      (void)PetscLogEventEnd(c->ev_assemble, 0, 0, 0, 0);
      e = itr_dist_agree(c->comm, e);
      PetscLogStagePop();
      PetscLogStagePush(c->stage_reduce);
      if (e == ITR_OK && !tokens) e = itr_dist_agree(c->comm, itr_dist_allreduce_sum(j->piece, j->sys.nrhs * d_in, c->comm, "a right-hand side term"));
      PetscLogStagePop();
      PetscLogStagePush(c->stage_assemble);
      (void)PetscLogEventBegin(c->ev_assemble, 0, 0, 0, 0);
      if (e == ITR_OK) e = itr_dist_agree(c->comm, assemble_task(c, j, i, row[q], coef[i], &G, n1, n2, diag));
      (void)PetscLogEventEnd(c->ev_assemble, 0, 0, 0, 0);
      PetscLogStagePop();
      row[q] += t->r;
    }
    free(diag);
  }
  itr_dist_matrix_fini(&G);
  /* token space: each module's n x n solve (Y in sys.rhs) */
  if (tokens && e == ITR_OK) {
    PetscLogStagePush(c->stage_solve);
    for (int q = 0; q < nj && e == ITR_OK; q++) e = token_solve(c, &ts, &site_jobs[q]);
    PetscLogStagePop();
  }
  token_site_fini(&ts);
  /* assembled: only T2, the rhs and (with_pretrain) W0 are needed from here on */
  for (int q = 0; q < nj; q++) {
    module_job *j = &site_jobs[q];
    free(j->piece);
    free(j->W);
    j->piece = j->W = NULL;
  }
  return e;
}

/* Cost of a solve in flops: Cholesky d^3 / 3, two triangular solves 2 d^2 R, the residual 2 d^2 R. */
static double solve_cost(const module_job *j) {
  const double d = (double)j->sys.d_in, R = (double)j->sys.nrhs;
  return d * d * d / 3.0 + 4.0 * d * d * R;
}

/* Rank 0 plans the solves of a layer over the groups (merge_plan_solves); the plan is broadcast,
 * so every rank acts on rank 0's decision. */
static itr_err plan_solves(merge_ctx *c, int l, const module_job *jobs, int nj, int *group_of) {
  if (c->rank == 0) {
    double cost[ITR_ARCH_MAX_MODULES];
    for (int q = 0; q < nj; q++) cost[q] = solve_cost(&jobs[q]);
    merge_plan_solves(nj, cost, c->n_groups, c->size, group_of);
    if (c->opt->verbose >= 1) {
      char line[512];
      int n = snprintf(line, sizeof line, "layer %d solve plan over %d groups:", l + 1, c->n_groups);
      for (int q = 0; q < nj && n < (int)sizeof line; q++)
        n += snprintf(line + n, sizeof line - (size_t)n, " %s->%d", c->arch.module[jobs[q].m].name, group_of[q]);
      itr_log(ITR_LOG_INFO, "%s", line);
    }
  }
  ITR_CHECK(MPI_Bcast(group_of, nj, MPI_INT, 0, c->comm) == MPI_SUCCESS, ITR_ERR_INTERNAL,
            "MPI_Bcast of the solve plan failed");
  return ITR_OK;
}

/* Solves every assembled module of a layer: on the grid of all ranks one after another, or with
 * -solve_groups G > 1 as rank 0 plans: each T2 is copied onto its group's grid, the groups solve
 * at the same time, and every Y is broadcast from its group's first rank. */
static itr_err solve_layer(merge_ctx *c, int k, int l, module_job *jobs, int nj, double *max_resid) {
  const int N = c->N;
  itr_dist_solve_report reps[ITR_ARCH_MAX_MODULES];
  memset(reps, 0, sizeof reps);
  itr_err e = ITR_OK;
  const int grouped = c->n_groups > 1 && nj > 1;
  if (grouped) {
    int group_of[ITR_ARCH_MAX_MODULES];
    itr_dist_matrix T2g[ITR_ARCH_MAX_MODULES];
    memset(T2g, 0, sizeof T2g);
    e = itr_dist_agree(c->comm, plan_solves(c, l, jobs, nj, group_of));
    /* every copy first (each is collective over all ranks), then the groups solve concurrently */
    for (int q = 0; q < nj && e == ITR_OK; q++) {
      const int member = group_of[q] == c->group;
      const int d = (int)jobs[q].sys.d_in;
      if (member) e = itr_dist_matrix_init(&T2g[q], c->group_grid, d, d);
      e = itr_dist_agree(c->comm, e);
      if (e == ITR_OK) e = itr_dist_matrix_to_group(&jobs[q].T2, c->grid, group_of[q], c->n_groups, member ? &T2g[q] : NULL);
      itr_dist_matrix_fini(&jobs[q].T2); /* one d_in^2 / P less while the groups solve */
    }
    for (int q = 0; q < nj && e == ITR_OK; q++)
      if (group_of[q] == c->group) e = site_solve_system(c->group_grid, &T2g[q], &jobs[q].sys, &reps[q], c->ev_solve);
    for (int q = 0; q < nj; q++) itr_dist_matrix_fini(&T2g[q]);
    e = itr_dist_agree(c->comm, e);
    for (int q = 0; q < nj && e == ITR_OK; q++) {
      int root = c->group_root[group_of[q]];
      double rr[2] = {reps[q].residual, (double)reps[q].passed};
      if (MPI_Bcast(jobs[q].sys.rhs, (int)(jobs[q].sys.nrhs * jobs[q].sys.d_in), MPI_DOUBLE, root, c->comm) != 0 ||
          MPI_Bcast(rr, 2, MPI_DOUBLE, root, c->comm) != 0)
        e = itr_error_set(ITR_ERR_INTERNAL, "MPI_Bcast of the solution of %s failed", jobs[q].label);
      reps[q].residual = rr[0];
      reps[q].passed = (int)rr[1];
      jobs[q].sys.solved = 1;
    }
  }
  for (int q = 0; q < nj && e == ITR_OK; q++) {
    module_job *j = &jobs[q];
    itr_update upd = {0};
    itr_dist_solve_report rep = j->tokens ? j->rep : reps[q];
    if (!grouped && !j->tokens) e = site_solve_system(c->grid, &j->T2, &j->sys, &rep, c->ev_solve);
    itr_dist_matrix_fini(&j->T2);
    if (e == ITR_OK) e = itr_dist_agree(c->comm, itr_update_from_system(&j->sys, N, j->tasks, j->d_out, j->W0, &upd));
    if (e != ITR_OK) break;
    itr_update_fini(&c->next[SLOT(l, j->m)]);
    c->next[SLOT(l, j->m)] = upd;
    c->resid[(size_t)(k - 1) * NSLOTS(c) + SLOT(l, j->m)] = rep.residual;
    if (rep.residual > *max_resid || isnan(rep.residual)) *max_resid = rep.residual;
    itr_log(c->opt->verbose >= 1 ? ITR_LOG_INFO : ITR_LOG_DEBUG, "  %s: R = %lld, scaled residual %.3g %s", j->label,
            (long long)j->sys.nrhs, rep.residual, rep.passed ? "PASSED" : "FAILED");
    /* every rank holds the same report (agreed norms; broadcast from the group): stop together */
    if (!rep.passed) e = itr_residual_error(j->label, rep.residual, c->opt->alpha_2);
  }
  return e;
}

itr_err merge_solve_layer(merge_ctx *c, int k, int l, double *max_resid) {
  module_job jobs[ITR_ARCH_MAX_MODULES];
  memset(jobs, 0, sizeof jobs);
  int nj = 0, solved = 0;
  itr_err e = ITR_OK;
  /* One grid: each site is solved as soon as it is assembled, so only its systems are held. With
   * groups: the whole layer is assembled first, so that rank 0 can spread its solves. */
  const int per_site = c->n_groups <= 1;
  for (int s = 0; s < c->arch.n_sites && e == ITR_OK; s++) {
    e = assemble_site(c, k, l, s, jobs, &nj);
    if (e == ITR_OK && (per_site || s == c->arch.n_sites - 1) && nj > solved) {
      PetscLogStagePush(c->stage_solve);
      e = solve_layer(c, k, l, jobs + solved, nj - solved, max_resid);
      PetscLogStagePop();
      for (int q = solved; q < nj; q++) module_job_fini(&jobs[q]);
      solved = nj;
    }
  }
  for (int q = solved; q < nj; q++) module_job_fini(&jobs[q]);
  return e;
}
