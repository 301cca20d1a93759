/* The distributed SPD solve (reduce + pdpotrf + pdpotrs + residual + gather) against the block size:
 *   mpirun -np P solve_bench D R MB[,MB...]
 * Builds T2 = X^T X + ridge from a random X (2 D rows split over the ranks), times
 * itr_dist_spd_solve_partial for each block size, and prints GFLOP/s of the factorisation
 * (D^3/3 + 2 D^2 R flops) with the scaled residual. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iteris/dist.h"

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (argc != 4) {
    if (rank == 0) fprintf(stderr, "usage: solve_bench D R MB[,MB...]\n");
    MPI_Finalize();
    return 2;
  }
  const int d = atoi(argv[1]), R = atoi(argv[2]);
  itr_log_set_level(ITR_LOG_DEBUG);
  itr_log_set_quiet(rank != 0);
  double *t2 = calloc((size_t)d * d, sizeof(double)), *rhs = calloc((size_t)d * R, sizeof(double));
  double *y = calloc((size_t)d * R, sizeof(double));
  unsigned s = 12345u + (unsigned)rank;
  /* partial T2: a diagonally dominant random symmetric matrix divided over ranks */
  for (int i = 0; i < d; i++)
    for (int j = 0; j <= i; j++) {
      s = s * 1664525u + 1013904223u;
      double v = ((double)(s >> 8) / 16777216.0 - 0.5) / size;
      t2[(size_t)i * d + j] = t2[(size_t)j * d + i] = v + (i == j ? (double)d / size : 0.0);
    }
  for (size_t k = 0; k < (size_t)d * R; k++) rhs[k] = (double)(k % 7) / size;
  char *list = strdup(argv[3]);
  for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
    int mb = atoi(tok);
    itr_dist_grid *g = NULL;
    if (itr_dist_grid_create(MPI_COMM_WORLD, mb, &g) != ITR_OK) break;
    itr_dist_solve_report rep;
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    itr_err e = itr_dist_spd_solve_partial(g, "bench", d, R, t2, rhs, 0, y, &rep);
    double t = MPI_Wtime() - t0;
    double gf = ((double)d * d * d / 3.0 + 2.0 * d * d * R) / t * 1e-9;
    if (rank == 0)
      printf("P %d grid %dx%d d %d R %d mb %d: %.2f s, %.1f GFLOP/s, scaled residual %.3g %s\n", size, g->nprow,
             g->npcol, d, R, mb, t, gf, rep.residual, e == ITR_OK && rep.passed ? "PASSED" : "FAILED");
    itr_dist_grid_destroy(g);
  }
  free(list);
  free(t2);
  free(rhs);
  free(y);
  MPI_Finalize();
  return 0;
}
