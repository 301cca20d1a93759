/* merge_bench: the merge's two heavy phases on the path the product runs (src/pipeline/site.c),
 * against dgemm measured in the same run, on a BLACS grid over all ranks:
 *   stats  itr_dist_gram_rows (every rank's T rows of X: their columns gathered to the owners of
 *          the Gram's blocks, or each rank's partial Gram summed by the owners: -gram_exchange,
 *          auto by default) + itr_dist_frob2                                 n d (d + 1) flops, n = P T
 *   solve  itr_dist_solve_spd: pdpotrf, pdpotrs with R right-hand sides and the residual (pdsymm)
 *                                                                        d^3 / 3 + 4 d^2 R flops
 *   dgemm  on every rank at once, C (d, d) += X^T X with X (T, d)         2 T d^2 flops per rank
 *   sgemm  the same in float32 (the forward's precision)                 2 T d^2 flops per rank
 * dgemm and sgemm are timed after one untimed call (OpenBLAS's buffers and C's pages in place), so
 * they are the machine's BLAS peak for the shape, not a first touch.
 * Rates are per rank; "vs dgemm" divides by the dgemm rate per rank measured in this run (the same
 * threads, the same machine load), so the ratio is what the phase keeps of the machine's BLAS.
 * Usage: mpirun -np P merge_bench [-d 4096,8192,14336] [-T 2048] [-R 64] [-reps 1] [-grid_rows 0 (squarest)]
 *                                   [-gram_exchange auto | columns | partial]
 * Threads: OPENBLAS_NUM_THREADS (1 per rank for MPI runs). Prints a Markdown table on rank 0. */
#include <cblas.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/core.h"
#include "iteris/dist.h"

static void fill(size_t n, float *x, unsigned seed) {
  unsigned s = seed;
  for (size_t i = 0; i < n; i++) {
    s = s * 1664525u + 1013904223u;
    x[i] = (float)((int)(s >> 9) - (1 << 22)) / (float)(1 << 22);
  }
}

/* The slowest rank's seconds of a phase that every rank runs. */
static double max_time(double t) {
  double m;
  MPI_Allreduce(&t, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

static int fail(int rank, const char *what) {
  if (rank == 0) fprintf(stderr, "merge_bench: %s: %s\n", what, itr_error_message());
  MPI_Abort(MPI_COMM_WORLD, 4);
  return 4;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  itr_log_set_quiet(1);
  char dlist[256] = "4096,8192,14336";
  long T = 2048, R = 64;
  int reps = 1, grid_rows = 0;
  itr_gram_exchange how = ITR_GRAM_AUTO;
  const char *how_name = "auto";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "-d")) snprintf(dlist, sizeof dlist, "%s", argv[i + 1]);
    else if (!strcmp(argv[i], "-T")) T = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-R")) R = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-reps")) reps = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "-grid_rows")) grid_rows = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "-gram_exchange") && itr_dist_gram_exchange_parse(argv[i + 1], &how))
      how_name = argv[i + 1];
    else {
      if (rank == 0) fprintf(stderr, "usage: %s [-d 4096,8192,14336] [-T 2048] [-R 64] [-reps 1] [-grid_rows 0] "
                        "[-gram_exchange auto|columns|partial]\n", argv[0]);
      MPI_Finalize();
      return 2;
    }
  }
  itr_dist_gram_rows_exchange(how);
  itr_dist_grid *grid = NULL;
  if (itr_dist_grid_create_shape(MPI_COMM_WORLD, 0, grid_rows, &grid) != ITR_OK) return fail(rank, "grid");
  const char *thr = getenv("OPENBLAS_NUM_THREADS");
  if (rank == 0) {
    printf("%d rank(s), grid %d x %d, block %d, OPENBLAS_NUM_THREADS %s; T = %ld rows per rank, R = %ld right-hand "
           "sides, best of %d; Gram exchange: %s; GFLOP/s per rank\n\n",
           size, grid->nprow, grid->npcol, grid->mb, thr ? thr : "(default)", T, R, reps, how_name);
    printf("| d_in | dgemm | stats (gram_rows + norm) | stats s | solve (pdpotrf + pdpotrs + residual) | solve s | "
           "stats vs dgemm | solve vs dgemm | sgemm |\n");
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    fflush(stdout);
  }
  char *save = NULL;
  for (char *tok = strtok_r(dlist, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    const long d = atol(tok);
    const size_t td = (size_t)T * (size_t)d;
    float *x = malloc(td * sizeof(float));
    double *xd = malloc(td * sizeof(double)), *C = calloc((size_t)d * (size_t)d, sizeof(double));
    double *rhs = malloc((size_t)d * (size_t)R * sizeof(double));
    if (!x || !xd || !C || !rhs) return fail(rank, "out of memory");
    fill(td, x, 1u + (unsigned)rank);
    for (size_t i = 0; i < td; i++) xd[i] = x[i];
    for (size_t i = 0; i < (size_t)d * (size_t)R; i++) rhs[i] = sin(0.37 * (double)i);
    float *Cs = calloc((size_t)d * (size_t)d, sizeof(float));
    if (!Cs) return fail(rank, "out of memory");
    double best_gemm = 1e300, best_sgemm = 1e300, best_stats = 1e300, best_solve = 1e300;
    /* untimed: OpenBLAS's first call and the first touch of C's pages */
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)T, 1.0, xd, (int)d, xd, (int)d, 0.0, C,
                (int)d);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)T, 1.0f, x, (int)d, x, (int)d, 0.0f, Cs,
                (int)d);
    for (int rep = 0; rep < reps; rep++) {
      /* dgemm on every rank at once: the machine's rate per rank under this run's load */
      MPI_Barrier(MPI_COMM_WORLD);
      double t = itr_wtime();
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)T, 1.0, xd, (int)d, xd, (int)d, 0.0, C,
                  (int)d);
      best_gemm = fmin(best_gemm, max_time(itr_wtime() - t));
      MPI_Barrier(MPI_COMM_WORLD);
      t = itr_wtime();
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)T, 1.0f, x, (int)d, x, (int)d, 0.0f,
                  Cs, (int)d);
      best_sgemm = fmin(best_sgemm, max_time(itr_wtime() - t));
      /* statistics as site.c forms them */
      itr_dist_matrix G = {0}, B = {0}, Y = {0};
      double n2 = 0;
      MPI_Barrier(MPI_COMM_WORLD);
      t = itr_wtime();
      if (itr_dist_matrix_init(&G, grid, (int)d, (int)d) != ITR_OK ||
          itr_dist_gram_rows(grid, T, d, x, 1.0, NULL, 0.0, &G) != ITR_OK || itr_dist_frob2(&G, 1, &n2) != ITR_OK)
        return fail(rank, "statistics");
      best_stats = fmin(best_stats, max_time(itr_wtime() - t));
      /* T2 = G + 1e-7 ||G|| I and R right-hand sides, solved as site.c does */
      itr_dist_matrix_add(&G, 0.0, &G, 1.0, 1e-7 * sqrt(n2), 1);
      if (itr_dist_matrix_init(&B, grid, (int)d, (int)R) != ITR_OK || itr_dist_matrix_init(&Y, grid, (int)d, (int)R) != ITR_OK)
        return fail(rank, "right-hand sides");
      itr_dist_matrix_scatter(&B, rhs);
      itr_dist_solve_report rep_solve;
      MPI_Barrier(MPI_COMM_WORLD);
      t = itr_wtime();
      if (itr_dist_solve_spd("bench", &G, &B, &Y, &rep_solve) != ITR_OK) return fail(rank, "solve");
      best_solve = fmin(best_solve, max_time(itr_wtime() - t));
      if (!rep_solve.passed && rank == 0) fprintf(stderr, "merge_bench: d = %ld: the solve FAILED its residual check\n", d);
      itr_dist_matrix_fini(&G);
      itr_dist_matrix_fini(&B);
      itr_dist_matrix_fini(&Y);
    }
    const double dd = (double)d, n = (double)T * size;
    const double gemm = 2.0 * T * dd * dd / best_gemm * 1e-9, sgemm = 2.0 * T * dd * dd / best_sgemm * 1e-9;
    const double stats = n * dd * (dd + 1) / size / best_stats * 1e-9;
    const double solve = (dd * dd * dd / 3.0 + 4.0 * dd * dd * R) / size / best_solve * 1e-9;
    if (rank == 0) {
      printf("| %ld | %.1f | %.1f | %.2f | %.1f | %.2f | %.2f | %.2f | %.1f |\n", d, gemm, stats, best_stats, solve,
             best_solve, stats / gemm, solve / gemm, sgemm);
      fflush(stdout);
    }
    free(x);
    free(xd);
    free(C);
    free(Cs);
    free(rhs);
  }
  itr_dist_grid_destroy(grid);
  MPI_Finalize();
  return 0;
}
