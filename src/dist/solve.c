/* The distributed SPD solve T2 Y = RHS (pdpotrf + pdpotrs, lower triangle) with an HPL-style
 * scaled residual computed on the distributed, unfactorised copies. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <cblas.h>
#include <lapacke.h>
#include <string.h>

#include "dist/scalapack.h"
#include "iteris/dist.h"

/* Names of the arguments of the routines called here, for info < 0 (a bug in our call). ScaLAPACK
 * reports info = -i for argument i, and -(100 i + j) for entry j of descriptor argument i. */
static const char *const potrf_args[] = {"UPLO", "N", "A", "IA", "JA", "DESCA"};
static const char *const potrs_args[] = {"UPLO", "N", "NRHS", "A", "IA", "JA", "DESCA", "B", "IB", "JB", "DESCB"};
static const char *const desc_entries[] = {"DTYPE", "CTXT", "M", "N", "MB", "NB", "RSRC", "CSRC", "LLD"};

static itr_err arg_error(const char *routine, const char *const *names, int nnames, int info, const char *label) {
  int i = -info, j = 0;
  if (i > 100) {
    j = i % 100;
    i /= 100;
  }
  const char *arg = i >= 1 && i <= nnames ? names[i - 1] : "?";
  if (j >= 1 && j <= ITR_DLEN)
    return itr_error_set(ITR_ERR_INTERNAL,
                         "solve of %s: %s rejected entry %d (%s) of argument %d (%s), info = %d; this is a bug in "
                         "iteris-mpi's call, please report it",
                         label, routine, j, desc_entries[j - 1], i, arg, info);
  return itr_error_set(ITR_ERR_INTERNAL,
                       "solve of %s: %s rejected argument %d (%s), info = %d; this is a bug in iteris-mpi's call, "
                       "please report it",
                       label, routine, i, arg, info);
}

/* info agreed over the grid: the most negative (argument error) wins, then the largest positive. */
static int agree_info(MPI_Comm comm, int info) {
  int in[2] = {info < 0 ? -info : 0, info > 0 ? info : 0}, out[2];
  MPI_Allreduce(in, out, 2, MPI_INT, MPI_MAX, comm);
  return out[0] ? -out[0] : out[1];
}

static int same_layout(const itr_dist_matrix *A, const itr_dist_matrix *B) {
  return A->grid == B->grid && A->m == B->m && A->n == B->n && A->a && B->a;
}

itr_err itr_dist_solve_spd(const char *label, const itr_dist_matrix *T2, const itr_dist_matrix *RHS,
                           itr_dist_matrix *Y, itr_dist_solve_report *report) {
  const double t0 = itr_wtime();
  if (!label) label = "(unnamed system)";
  const itr_dist_grid *g = T2->grid;
  itr_err e = ITR_OK;
  itr_dist_matrix F, Res;
  memset(&F, 0, sizeof F);
  memset(&Res, 0, sizeof Res);
  double *work = NULL;
  /* Sizes that must be the same on all ranks (HPL checks its arguments so): their minimum and maximum. */
  int v[4] = {T2->m, -T2->m, RHS->n, -RHS->n}, vmax[4];
  MPI_Allreduce(v, vmax, 4, MPI_INT, MPI_MAX, g->comm);
  if (vmax[0] != -vmax[1] || vmax[2] != -vmax[3])
    e = itr_error_set(ITR_ERR_INTERNAL,
                      "solve of %s: d_in (%d..%d) or R (%d..%d) differ between ranks; they must be the same on all ranks",
                      label, -vmax[1], vmax[0], -vmax[3], vmax[2]);
  else if (T2->m != T2->n || RHS->m != T2->m || RHS->grid != g || !same_layout(RHS, Y))
    e = itr_error_set(ITR_ERR_INTERNAL,
                      "solve of %s: shapes do not match: T2 is %d x %d, RHS %d x %d, Y %d x %d (expected d_in x d_in, "
                      "d_in x R, d_in x R on one grid)",
                      label, T2->m, T2->n, RHS->m, RHS->n, Y->m, Y->n);
  if (e == ITR_OK) e = itr_dist_matrix_init(&F, g, T2->m, T2->n);
  if (e == ITR_OK) e = itr_dist_matrix_init(&Res, g, RHS->m, RHS->n);
  size_t nwork = 2 * ((size_t)T2->m_loc + (size_t)T2->n_loc) + (size_t)Y->m_loc + (size_t)Y->n_loc + 2 * (size_t)g->mb + 16;
  if (e == ITR_OK) e = itr_calloc(nwork, sizeof(double), "norm workspace", &work);
  e = itr_dist_agree(g->comm, e);
  if (e != ITR_OK) goto done;

  const int d = T2->m, R = RHS->n, one = 1;
  memcpy(F.a, T2->a, sizeof(double) * (size_t)T2->lld * (size_t)T2->n_loc);
  memcpy(Y->a, RHS->a, sizeof(double) * (size_t)RHS->lld * (size_t)RHS->n_loc);
  int info = 0;
  const double t_f = itr_wtime();
  /* One process: the local block is the whole column-major matrix, and LAPACK's dpotrf is about
   * 1.6x faster than pdpotrf on one process (measured: 49 vs 30 GFLOP/s at d = 8192). */
  if (g->size == 1)
    info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', d, F.a, F.lld);
  else
    pdpotrf_("L", &d, F.a, &one, &one, F.desc, &info);
  const double t_potrf = itr_wtime() - t_f;
  info = agree_info(g->comm, info);
  if (info < 0) {
    e = arg_error("pdpotrf", potrf_args, 6, info, label);
    goto done;
  }
  if (info > 0) {
    e = itr_error_set(ITR_ERR_NUMERIC,
                      "module %s: T2 (%d x %d) is not positive definite: its leading minor of order %d is not "
                      "positive (pdpotrf info %d). Raise -alpha_2 (the ridge added to each Gram matrix, e.g. by 10x), "
                      "or check the calibration data of this module for repeated or zero activations",
                      label, d, d, info, info);
    goto done;
  }
  const double t_s = itr_wtime();
  if (g->size == 1)
    info = LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 'L', d, R, F.a, F.lld, Y->a, Y->lld);
  else
    pdpotrs_("L", &d, &R, F.a, &one, &one, F.desc, Y->a, &one, &one, Y->desc, &info);
  const double t_potrs = itr_wtime() - t_s, t_r = itr_wtime();
  if (info == 0 && itr_fault_residual(label)) /* fault injection: a wrong solution must FAIL the check */
    for (size_t q = 0; q < (size_t)Y->lld * (size_t)Y->n_loc; q++) Y->a[q] += 1.0;
  info = agree_info(g->comm, info);
  if (info != 0) {
    e = arg_error("pdpotrs", potrs_args, 11, info, label);
    goto done;
  }

  /* Residual on the unfactorised T2: Res = RHS - T2 Y (pdsymm reads T2's lower triangle). */
  const double minus_one = -1.0, plus_one = 1.0;
  memcpy(Res.a, RHS->a, sizeof(double) * (size_t)RHS->lld * (size_t)RHS->n_loc);
  if (g->size == 1) /* one process: the whole matrices, and OpenBLAS's dsymm */
    cblas_dsymm(CblasColMajor, CblasLeft, CblasLower, d, R, minus_one, T2->a, T2->lld, Y->a, Y->lld, plus_one, Res.a,
                Res.lld);
  else
    pdsymm_("L", "L", &d, &R, &minus_one, T2->a, &one, &one, T2->desc, Y->a, &one, &one, Y->desc, &plus_one, Res.a,
            &one, &one, Res.desc);
  double res_norm = pdlange_("I", &d, &R, Res.a, &one, &one, Res.desc, work);
  double t2_norm = pdlansy_("I", "L", &d, T2->a, &one, &one, T2->desc, work);
  double y_norm = pdlange_("I", &d, &R, Y->a, &one, &one, Y->desc, work);
  double rhs_norm = pdlange_("I", &d, &R, RHS->a, &one, &one, RHS->desc, work);
  /* Every process of the context receives the same norms; agree anyway (bitwise, cheap). */
  double norms[4] = {res_norm, t2_norm, y_norm, rhs_norm}, agreed[4];
  MPI_Allreduce(norms, agreed, 4, MPI_DOUBLE, MPI_MAX, g->comm);
  res_norm = agreed[0];
  t2_norm = agreed[1];
  y_norm = agreed[2];
  rhs_norm = agreed[3];
  if (!isfinite(y_norm) || !isfinite(t2_norm) || !isfinite(rhs_norm)) {
    e = itr_error_set(ITR_ERR_NUMERIC,
                      "module %s: the solve gave a non-finite result (||T2||_inf = %g, ||RHS||_inf = %g, ||Y||_inf = "
                      "%g); check the statistics for NaN or infinity, or raise -alpha_2",
                      label, t2_norm, rhs_norm, y_norm);
    goto done;
  }
  if (g->rank == 0)
    itr_log(ITR_LOG_DEBUG, "solve %s: pdpotrf %.3f s (%.1f GFLOP/s), pdpotrs %.3f s, residual %.3f s", label, t_potrf,
            (double)d * d * d / 3.0 / (t_potrf > 0 ? t_potrf : 1e-9) * 1e-9, t_potrs, itr_wtime() - t_r);
  const double resid = itr_scaled_residual(res_norm, t2_norm, y_norm, rhs_norm, d);
  const int passed = itr_residual_passed(resid);
  if (g->rank == 0)
    itr_log(passed ? ITR_LOG_DEBUG : ITR_LOG_WARN,
            "solve %s: d_in %d, R %d, grid %d x %d: scaled residual %.3g %s (threshold %g)",
            label, d, R, g->nprow, g->npcol, resid, passed ? "PASSED" : "FAILED", ITR_RESIDUAL_THRESHOLD);
  if (report) {
    report->residual = resid;
    report->threshold = ITR_RESIDUAL_THRESHOLD;
    report->passed = passed;
    report->t2_norm = t2_norm;
    report->y_norm = y_norm;
    report->rhs_norm = rhs_norm;
    report->seconds = itr_wtime() - t0;
  }
done:
  itr_dist_matrix_fini(&F);
  itr_dist_matrix_fini(&Res);
  free(work);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}
