/* iteris-mpi dist: agreement points, BLACS process grids on any communicator, block-cyclic
 * matrices (the one place where ScaLAPACK's column-major local blocks are entered and left),
 * reductions of per-rank partial sums straight into the block-cyclic layout, and the
 * distributed SPD solve T2 Y = RHS with its HPL-style scaled residual.
 *
 * Vocabulary (see core.h): d_in x d_in for T2, d_in x R for the right-hand sides; ScaLAPACK's
 * words for distributed sizes: nprow x npcol grid, (myrow, mycol) this process, mb = nb block
 * size, m_loc x n_loc the local part, lld its leading dimension.
 *
 * Arguments marked [same on all ranks] must have the same value on every rank of the grid's
 * communicator; the solve checks the sizes and reports a mismatch as ITR_ERR_INTERNAL.
 * Every Collective function returns the same error code and the same message on every rank
 * (it ends at an agreement point), unless the MPI library itself aborts. */
#ifndef ITERIS_DIST_H
#define ITERIS_DIST_H

#include <mpi.h>

#include "iteris/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- agreement ---------------------------------------------------------------------------- */

/* Agreement point: every rank passes its local result; returns on every rank the largest error
 * code found (ITR_OK when all succeeded). On failure the message of the lowest rank holding that
 * code, prefixed with "rank k of n: " (k and n in MPI_COMM_WORLD, also for a sub-communicator),
 * becomes the current message of every rank (so all ranks print and return the same thing).
 * Collective on comm. */
itr_err itr_dist_agree(MPI_Comm comm, itr_err local);
/* The same without the prefix: for errors already agreed in a sub-communicator and relayed to
 * other ranks verbatim, whose message names its rank already. Collective on comm. */
itr_err itr_dist_agree_relayed(MPI_Comm comm, itr_err local);

/* ---- grids -------------------------------------------------------------------------------- */

enum { ITR_DIST_MB_DEFAULT = 64 };

typedef struct {
  MPI_Comm comm;    /* owned duplicate of the communicator given to create */
  int rank, size;   /* in comm */
  int ctxt;         /* BLACS context */
  int nprow, npcol; /* nprow * npcol == size; by default nprow <= npcol, as square as size allows */
  int myrow, mycol; /* this process; row-major order: rank == myrow * npcol + mycol */
  int mb;           /* block size, rows and columns (mb == nb) */
  int is_sub;       /* made by itr_dist_grid_split (its process numbers are the parent's ranks) */
} itr_dist_grid;

/* The grid shape used for size processes: nprow = largest divisor of size with
 * nprow * nprow <= size, npcol = size / nprow (3 gives 1 x 3, 12 gives 3 x 4). Not Collective. */
void itr_dist_grid_shape(int size, int *nprow, int *npcol);
/* A BLACS grid over every process of comm (any size, any sub-communicator); mb <= 0 means
 * ITR_DIST_MB_DEFAULT [same on all ranks]. Collective on comm. */
itr_err itr_dist_grid_create(MPI_Comm comm, int mb, itr_dist_grid **out);
/* The same with nprow process rows (npcol = size / nprow; nprow must divide size, ITR_ERR_INPUT if
 * not); nprow <= 0 means itr_dist_grid_shape's [same on all ranks]. Collective on comm. */
itr_err itr_dist_grid_create_shape(MPI_Comm comm, int mb, int nprow, itr_dist_grid **out);
/* Collective on the grid's comm; accepts NULL (then not collective). */
void itr_dist_grid_destroy(itr_dist_grid *grid);
/* Splits the parent's ranks into n_groups contiguous groups (group g holds the ranks r with
 * r * n_groups / size == g, so sizes differ by at most one) and gives this rank the grid of its
 * own group (*group receives its index). The group grids number their processes as the parent
 * does, so matrices move between the parent's grid and any group's with
 * itr_dist_matrix_to_group. 1 <= n_groups <= size [same on all ranks]. Collective on the
 * parent's comm. */
itr_err itr_dist_grid_split(const itr_dist_grid *parent, int n_groups, itr_dist_grid **out, int *group);
/* First rank (in the parent) of group g of n_groups over size ranks. Not Collective. */
int itr_dist_group_first(int g, int n_groups, int size);

/* ---- block-cyclic matrices ---------------------------------------------------------------- */

typedef struct {
  const itr_dist_grid *grid; /* not owned */
  int m, n;                  /* global size */
  int m_loc, n_loc;          /* this process's part: numroc_ of m over nprow, n over npcol */
  int lld;                   /* max(1, m_loc) */
  int desc[9];               /* ScaLAPACK descriptor (rsrc = csrc = 0, mb = nb = grid->mb) */
  double *a;                 /* (n_loc, lld) f64: local blocks, column-major, owned */
} itr_dist_matrix;

/* Describes and allocates (zeroed) an m x n block-cyclic matrix; m, n >= 1 [same on all ranks].
 * Not Collective (allocation failures are local: end the phase with itr_dist_agree). */
itr_err itr_dist_matrix_init(itr_dist_matrix *A, const itr_dist_grid *grid, int m, int n);
void itr_dist_matrix_fini(itr_dist_matrix *A); /* accepts a zeroed or finished struct */

/* Copies this process's blocks out of a full matrix that every rank holds (replicated).
 * full: (m, n) f64 row-major. Not Collective. */
void itr_dist_matrix_scatter(itr_dist_matrix *A, const double *full);
/* Gathers the whole matrix into out: (m, n) f64 row-major, written on rank root of the grid's
 * comm, or on every rank when root < 0 [same on all ranks]. Collective on the grid. */
itr_err itr_dist_matrix_gather(const itr_dist_matrix *A, int root, double *out);

/* ---- statistics of tall matrices whose rows are spread over the ranks (gram.c) ------------- */

/* Builds the tall matrix Z (n, d) whose rows are the ranks' rows in rank order, each row
 * a x + b y (in float64; y may be NULL): rank p passes its own T_p rows x, y (T_p, d) f32
 * row-major (T_p may be 0). Z is held as a block-cyclic (size * T_max, d) f64 matrix on the grid:
 * rank p's rows sit at [p T_max, p T_max + T_p), the padding rows are zero, which changes no
 * product Z^T W. The rows move with one MPI_Alltoallv, each packed for its owner. d >= 1
 * [same on all ranks]. Collective on the grid. */
itr_err itr_dist_rows_create(const itr_dist_grid *grid, int64_t T, int64_t d, const float *x, double a, const float *y,
                             double b, itr_dist_matrix *Z);
/* C (d, d) = alpha A^T B + beta C for tall A, B (n, d) on C's grid. A == B forms only the lower
 * triangle (pdsyrk: half the work; the strict upper triangle of C is left as it was); else the
 * whole of C (pdgemm). Collective on the grid. */
itr_err itr_dist_gram(double alpha, const itr_dist_matrix *A, const itr_dist_matrix *B, double beta,
                      itr_dist_matrix *C);
/* buf (n doubles, replicated layout) = its sum over comm's ranks, in place, in chunks of 2^26 (MPI's int
 * counts); what names it in the error message. Collective on comm. */
itr_err itr_dist_allreduce_sum(double *buf, int64_t n, MPI_Comm comm, const char *what);
/* C (d, d) = sum over the ranks of Z_p^T Z_p, Z_p = a x + b y the T rows this rank holds ((T, d) f32
 * row-major, T may be 0; y may be NULL): the Gram of rows spread over the ranks. One process: dsyrk.
 * Several: as itr_dist_gram_rows_exchange says (the columns to their owners by default, or the
 * partial Grams, in panels of columns of at most 64 MiB, summed by their owners). Lower triangle;
 * the strict upper triangle holds no defined values. Collective on the grid. */
itr_err itr_dist_gram_rows(const itr_dist_grid *grid, int64_t T, int64_t d, const float *x, double a, const float *y,
                           double b, itr_dist_matrix *C);
/* K (n, n) lower = Z Z^T, the kernel of the rows of every rank stacked (n = size x T_max: rank p's row
 * t is row p T_max + t, the rows between the ranks' are zero, as itr_dist_rows_create lays them
 * out), Z = a x + b y from each rank's T rows ((T, d) f32 row-major, y may be NULL). The rows travel
 * once (MPI_Alltoallv, float32) so that each rank holds every row's slice d / size of the columns;
 * each forms its partial kernel (dsyrk) and the partials are summed into K's owners as in
 * itr_dist_gram_rows. Collective on the grid. */
itr_err itr_dist_kernel_rows(const itr_dist_grid *grid, int64_t T, int64_t d, const float *x, double a, const float *y,
                             double b, itr_dist_matrix *K);
/* How itr_dist_gram_rows moves data between ranks [same on all ranks; not Collective]:
 * ITR_GRAM_COLUMNS: every rank's rows go, in the columns each owner needs (float32), to the owners of
 *   C's blocks, which form them by dgemm: about 4 n d u bytes per rank for n rows (u = 1/nprow +
 *   1/npcol - 1/size, the share of the columns a process needs; twice that with y), shrinking with
 *   the ranks;
 * ITR_GRAM_PARTIAL: each rank forms the partial (d, d) Gram of its own rows and the partials' lower
 *   triangles are summed by their owners: about 4 d^2 bytes per rank at every rank count;
 * ITR_GRAM_AUTO (the default): columns when their bytes are under half the partials' (2 n u < d, or
 *   4 n u < d with y), else partial (measured at 2 ranks: results/scaling.md). */
typedef enum { ITR_GRAM_AUTO = 0, ITR_GRAM_COLUMNS = 1, ITR_GRAM_PARTIAL = 2 } itr_gram_exchange;
void itr_dist_gram_rows_exchange(itr_gram_exchange how);
/* *out = the way named "auto", "columns" or "partial"; returns 0 (out untouched) for any other name. */
int itr_dist_gram_exchange_parse(const char *name, itr_gram_exchange *out);
/* The largest partial panel of itr_dist_gram_rows in bytes (0: the default, 64 MiB) [same on all
 * ranks]; for tests. Not Collective. */
void itr_dist_gram_rows_panel(size_t bytes);
/* Frees the buffers itr_dist_gram_rows keeps between calls (itr_dist_grid_destroy calls it). */
void itr_dist_scratch_release(void);
/* C (n, n) = alpha A A^T + beta C for tall A (n, d) on C's grid: the kernel of A's rows (pdsyrk),
 * lower triangle only (the strict upper triangle of C is left as it was). Collective on the grid. */
itr_err itr_dist_kernel(double alpha, const itr_dist_matrix *A, double beta, itr_dist_matrix *C);
/* *out = ||A||_F^2. lower: A holds the lower triangle of a symmetric matrix (entries below the
 * diagonal count twice, those above not at all). Collective on the grid. */
itr_err itr_dist_frob2(const itr_dist_matrix *A, int lower, double *out);
/* *out = ||A^T B||_F^2 for tall A, B (n, d): through the (n, n) kernels <A A^T, B B^T> when n < d
 * (2 n^2 d flops and n^2 memory instead of 2 n d^2 and d^2), else through A^T B. Collective on
 * the grid. */
itr_err itr_dist_cross_norm2(const itr_dist_matrix *A, const itr_dist_matrix *B, double *out);
/* C += alpha (A with its off-diagonal entries times off) + shift I, on the lower triangle only
 * (lower = 1) or every entry; A and C on one grid with one shape (square). Not Collective. */
void itr_dist_matrix_add(itr_dist_matrix *C, double alpha, const itr_dist_matrix *A, double off, double shift, int lower);
/* diag (d) receives the diagonal of the square A on every rank. Collective on the grid. */
itr_err itr_dist_matrix_diag(const itr_dist_matrix *A, double *diag);
/* Global row / column of local row li / local column lc of A (ScaLAPACK's indxl2g). Not Collective. */
int itr_dist_global_row(const itr_dist_matrix *A, int li);
int itr_dist_global_col(const itr_dist_matrix *A, int lc);
/* B = A for A on parent's grid and B on the grid of group g made by itr_dist_grid_split
 * (B is initialised with A's shape on the members of group g; pass NULL elsewhere). Every rank
 * of the parent calls it. Collective on the parent's comm. */
itr_err itr_dist_matrix_to_group(const itr_dist_matrix *A, const itr_dist_grid *parent, int g, int n_groups,
                                 itr_dist_matrix *B);

/* ---- SPD solve ---------------------------------------------------------------------------- */


typedef struct {
  double residual;  /* itr_scaled_residual (core.h, HPL's): ||T2 Y - RHS||_inf / ((||T2||_inf ||Y||_inf + ||RHS||_inf) d eps) */
  double threshold; /* ITR_RESIDUAL_THRESHOLD */
  int passed;       /* residual < threshold (0 for NaN) */
  double t2_norm, y_norm, rhs_norm; /* the infinity norms above */
  double seconds;                   /* wall time of reduce + factor + solve + residual + gather */
} itr_dist_solve_report;

/* Solves T2 Y = RHS on already distributed matrices with pdpotrf + pdpotrs ('L'); T2 (d_in, d_in)
 * symmetric positive definite, only its lower triangle read; RHS (d_in, R). T2 and RHS are left
 * unchanged; Y must be initialised with the same shape as RHS and receives the solution (its
 * contents are unspecified after an error).
 * label names the system in messages (e.g. "layers.3.self_attn.q_proj") [same on all ranks].
 * Errors: ITR_ERR_NUMERIC on every rank when T2 is not positive definite (message names label
 * and the failing leading minor, and suggests a larger -alpha_2) or when Y is not finite;
 * ITR_ERR_INTERNAL for a ScaLAPACK argument error (a bug: names the argument). A residual
 * above the threshold is not an error: it is reported (and logged as a warning).
 * Collective on the grid. */
itr_err itr_dist_solve_spd(const char *label, const itr_dist_matrix *T2, const itr_dist_matrix *RHS,
                           itr_dist_matrix *Y, itr_dist_solve_report *report);


#ifdef __cplusplus
}
#endif
/* ---- graceful stop ------------------------------------------------------------------------------
 * SIGTERM / SIGINT / SIGUSR1: the handlers only record the signal; a merge polls it at a layer
 * boundary, training at a step boundary, agrees on it across ranks, writes its checkpoint and stops with ITR_ERR_INTERRUPTED
 * (exit code 5: not 0, there is no adapter yet; not 128+signal, which means killed without a
 * checkpoint; slurm/merge-*.sh requeue on it). So a Slurm job (sbatch --signal=TERM@120, scancel
 * --signal=TERM) or a user can stop a long merge and resume it with -restart 1. Under mpirun, send
 * SIGUSR1 to mpirun (it forwards USR1; on TERM it kills the ranks itself). */

/* Installs the handlers (sigaction, SA_RESTART) for SIGTERM, SIGINT and SIGUSR1 and clears the
 * flag. Call once, after PetscInitialize, so they replace any handler PETSc installs (Debian's
 * PETSc 3.18 leaves SIGTERM at its default: killed). Not Collective; the handlers are
 * async-signal-safe (they only store the signal number). */
void itr_signals_install(void);
/* The number of the first signal received since itr_signals_install, or 0. Not Collective: ranks
 * can see a signal at different times; use itr_signals_agree to decide together. */
int itr_signals_requested(void);
/* Collective on comm: the largest signal number any rank has seen (0: none), the same on every
 * rank. Call it at the same point on every rank. */
int itr_signals_agree(MPI_Comm comm);
/* Clears the flag (tests, or a caller that handled the stop). Not Collective. */
void itr_signals_clear(void);

#endif
