/* merge_bench: GFLOP/s of the merge layer's two heavy phases against dgemm measured in the same
 * run (same threads, same machine load):
 *   stats  itr_stats_add_x       X^T X by dsyrk on f64-converted blocks      T d (d + 1) flops
 *          itr_stats_add_pair    Xt^T Xt (dsyrk) + X^T Xt (dgemm)           T d (d + 1) + 2 T d^2
 *   solve  dpotrf + dpotrs       Cholesky of T2 and R right-hand sides       d^3 / 3 + 2 d^2 R
 *          itr_system_solve_local (the same + restore T2 + residual check)
 *   dgemm  C (d, d) += X^T Xt with X, Xt (T, d)                              2 T d^2
 * Usage: merge_bench [-d 4096,8192,14336] [-T 2048] [-R 64] [-reps 1]
 * Threads: OPENBLAS_NUM_THREADS. Prints a Markdown table. */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/merge.h"


static void fill(size_t n, float *x, unsigned seed) {
  unsigned s = seed;
  for (size_t i = 0; i < n; i++) {
    s = s * 1664525u + 1013904223u;
    x[i] = (float)((int)(s >> 9) - (1 << 22)) / (float)(1 << 22);
  }
}

int main(int argc, char **argv) {
  char dlist[256] = "4096,8192,14336";
  long T = 2048, R = 64;
  int reps = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "-d")) snprintf(dlist, sizeof dlist, "%s", argv[i + 1]);
    else if (!strcmp(argv[i], "-T")) T = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-R")) R = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-reps")) reps = atoi(argv[i + 1]);
    else {
      fprintf(stderr, "usage: %s [-d 4096,8192,14336] [-T 2048] [-R 64] [-reps 1]\n", argv[0]);
      return 2;
    }
  }
  const char *thr = getenv("OPENBLAS_NUM_THREADS");
  printf("threads %s, T = %ld tokens per block set, R = %ld right-hand sides, best of %d\n\n", thr ? thr : "(default)",
         T, R, reps);
  printf("| d_in | dgemm GFLOP/s | add_x (dsyrk) GFLOP/s | add_pair GFLOP/s | dpotrf+dpotrs GFLOP/s | "
         "solve_local s | stats vs dgemm | solve vs dgemm |\n");
  printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  fflush(stdout);
  char *save = NULL;
  for (char *tok = strtok_r(dlist, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    const long d = atol(tok);
    const size_t td = (size_t)T * (size_t)d, dd = (size_t)d * (size_t)d;
    float *x = malloc(td * sizeof(float)), *xt = malloc(td * sizeof(float));
    double *xd = malloc(td * sizeof(double)), *xtd = malloc(td * sizeof(double)), *C = calloc(dd, sizeof(double));
    if (!x || !xt || !xd || !xtd || !C) {
      fprintf(stderr, "out of memory at d = %ld\n", d);
      return 4;
    }
    fill(td, x, 1), fill(td, xt, 2);
    for (size_t i = 0; i < td; i++) xd[i] = x[i], xtd[i] = xt[i];
    double t_gemm = 1e30, t_x = 1e30, t_pair = 1e30, t_chol = 1e30, t_local = 1e30;
    itr_stats st;
    if (itr_stats_init(&st, d, ITR_STATS_FULL_CROSS) != ITR_OK) {
      fprintf(stderr, "%s\n", itr_error_message());
      return 4;
    }
    for (int r = 0; r < reps; r++) {
      double t0 = itr_wtime();
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)T, 1.0, xd, (int)d, xtd, (int)d, 1.0,
                  C, (int)d);
      double t1 = itr_wtime();
      itr_stats_add_x(&st, T, x);
      double t2 = itr_wtime();
      itr_stats_reset_xt(&st);
      double t3 = itr_wtime();
      itr_stats_add_pair(&st, T, x, xt);
      double t4 = itr_wtime();
      if (t1 - t0 < t_gemm) t_gemm = t1 - t0;
      if (t2 - t1 < t_x) t_x = t2 - t1;
      if (t4 - t3 < t_pair) t_pair = t4 - t3;
    }
    itr_stats_finalize(&st);
    free(xd), free(xtd);
    /* SPD T2 = gram_x + a ||gram_x|| I (T < d makes the gram singular), R random rhs */
    double nrm = 0;
    for (size_t i = 0; i < dd; i++) nrm += st.gram_x[i] * st.gram_x[i];
    double *T2 = malloc(dd * sizeof(double)), *rhs = malloc((size_t)R * (size_t)d * sizeof(double));
    for (int r = 0; r < reps; r++) {
      memcpy(T2, st.gram_x, dd * sizeof(double));
      for (long i = 0; i < d; i++) T2[i * d + i] += 1e-3 * sqrt(nrm);
      for (size_t i = 0; i < (size_t)R * (size_t)d; i++) rhs[i] = (double)x[i % td];
      double t0 = itr_wtime();
      lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', (lapack_int)d, T2, (lapack_int)d);
      if (!info) info = LAPACKE_dpotrs(LAPACK_COL_MAJOR, 'U', (lapack_int)d, (lapack_int)R, T2, (lapack_int)d, rhs, (lapack_int)d);
      double t1 = itr_wtime();
      if (info) fprintf(stderr, "dpotrf/dpotrs info %d\n", (int)info);
      if (t1 - t0 < t_chol) t_chol = t1 - t0;
      itr_system sys = {0};
      sys.d_in = d, sys.nrhs = R, sys.T2 = T2, sys.rhs = rhs, sys.alpha_2 = 1e-3;
      snprintf(sys.label, sizeof sys.label, "bench d=%ld", d);
      memcpy(T2, st.gram_x, dd * sizeof(double));
      for (long i = 0; i < d; i++) T2[i * d + i] += 1e-3 * sqrt(nrm);
      for (size_t i = 0; i < (size_t)R * (size_t)d; i++) rhs[i] = (double)x[i % td];
      t0 = itr_wtime();
      itr_err e = itr_system_solve_local(&sys);
      t1 = itr_wtime();
      if (e != ITR_OK) fprintf(stderr, "%s\n", itr_error_message());
      if (t1 - t0 < t_local) t_local = t1 - t0;
    }
    const double fd = (double)d, fT = (double)T, fR = (double)R;
    const double g_gemm = 2 * fT * fd * fd / t_gemm * 1e-9;
    const double g_x = fT * fd * (fd + 1) / t_x * 1e-9;
    const double g_pair = (fT * fd * (fd + 1) + 2 * fT * fd * fd) / t_pair * 1e-9;
    const double g_chol = (fd * fd * fd / 3 + 2 * fd * fd * fR) / t_chol * 1e-9;
    printf("| %ld | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f |\n", d, g_gemm, g_x, g_pair, g_chol, t_local,
           g_x / g_gemm, g_chol / g_gemm);
    fflush(stdout);
    free(T2), free(rhs), free(x), free(xt), free(C);
    itr_stats_fini(&st);
  }
  return 0;
}
