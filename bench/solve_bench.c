/* The distributed SPD solve as the pipeline runs it (itr_dist_solve_spd: pdpotrf + pdpotrs + the
 * residual) against the block size:
 *   mpirun -np P solve_bench D R MB[,MB...]
 * Builds a diagonally dominant random symmetric T2 (the ranks' partials summed, then scattered into
 * the block-cyclic layout, untimed), times the solve for each block size, and prints GFLOP/s of
 * D^3/3 + 4 D^2 R flops (factorisation, triangular solves, residual) with the scaled residual. */
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
  unsigned s = 12345u + (unsigned)rank;
  /* partial T2: a diagonally dominant random symmetric matrix divided over ranks */
  for (int i = 0; i < d; i++)
    for (int j = 0; j <= i; j++) {
      s = s * 1664525u + 1013904223u;
      double v = ((double)(s >> 8) / 16777216.0 - 0.5) / size;
      t2[(size_t)i * d + j] = t2[(size_t)j * d + i] = v + (i == j ? (double)d / size : 0.0);
    }
  for (size_t k = 0; k < (size_t)d * R; k++) rhs[k] = (double)(k % 7) / size;
  /* the whole system on every rank: the sum of the ranks' partials */
  MPI_Allreduce(MPI_IN_PLACE, t2, d * d, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, rhs, d * R, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  char *list = strdup(argv[3]);
  for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
    int mb = atoi(tok);
    itr_dist_grid *g = NULL;
    if (itr_dist_grid_create(MPI_COMM_WORLD, mb, &g) != ITR_OK) break;
    itr_dist_solve_report rep;
    memset(&rep, 0, sizeof rep);
    itr_dist_matrix T2, B, Y;
    if (itr_dist_matrix_init(&T2, g, d, d) != ITR_OK || itr_dist_matrix_init(&B, g, d, R) != ITR_OK ||
        itr_dist_matrix_init(&Y, g, d, R) != ITR_OK)
      break;
    itr_dist_matrix_scatter(&T2, t2);
    itr_dist_matrix_scatter(&B, rhs);
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    itr_err e = itr_dist_solve_spd("bench", &T2, &B, &Y, &rep);
    double t = MPI_Wtime() - t0;
    double gf = ((double)d * d * d / 3.0 + 4.0 * d * d * R) / t * 1e-9;
    itr_dist_matrix_fini(&T2);
    itr_dist_matrix_fini(&B);
    itr_dist_matrix_fini(&Y);
    if (rank == 0)
      printf("P %d grid %dx%d d %d R %d mb %d: %.2f s, %.1f GFLOP/s, scaled residual %.3g %s\n", size, g->nprow,
             g->npcol, d, R, mb, t, gf, rep.residual, e == ITR_OK && rep.passed ? "PASSED" : "FAILED");
    itr_dist_grid_destroy(g);
  }
  free(list);
  free(t2);
  free(rhs);
  MPI_Finalize();
  return 0;
}
