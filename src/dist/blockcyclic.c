/* Block-cyclic matrices: the one place where row-major data enters ScaLAPACK's column-major
 * local blocks and leaves them again (scatter, gather; rows enter through gram.c).
 *
 * Layout (rsrc = csrc = 0, mb = nb): global row i is in block row i / mb, owned by process row
 * (i / mb) % nprow, at local row (i / (mb * nprow)) * mb + i % mb; columns likewise over npcol.
 * Process (pr, pc) is rank pr * npcol + pc of the grid's communicator (checked at creation). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "dist/scalapack.h"
#include "iteris/dist.h"

static int local_count(int n, int mb, int p, int np) {
  int zero = 0;
  return numroc_(&n, &mb, &p, &zero, &np);
}

/* Global index of local index l on process p of np. */
static int l2g(int l, int mb, int p, int np) { return ((l / mb) * np + p) * mb + l % mb; }

itr_err itr_dist_matrix_init(itr_dist_matrix *A, const itr_dist_grid *grid, int m, int n) {
  ITR_CHECK(m >= 1 && n >= 1, ITR_ERR_INTERNAL, "block-cyclic matrix of size %d x %d: both must be >= 1", m, n);
  itr_dist_matrix t;
  memset(&t, 0, sizeof t);
  t.grid = grid;
  t.m = m;
  t.n = n;
  t.m_loc = local_count(m, grid->mb, grid->myrow, grid->nprow);
  t.n_loc = local_count(n, grid->mb, grid->mycol, grid->npcol);
  t.lld = t.m_loc > 1 ? t.m_loc : 1;
  int zero = 0, info = 0;
  descinit_(t.desc, &m, &n, &grid->mb, &grid->mb, &zero, &zero, &grid->ctxt, &t.lld, &info);
  ITR_CHECK(info == 0, ITR_ERR_INTERNAL,
            "descinit_ rejected argument %d for a %d x %d matrix (mb %d, lld %d, grid %d x %d); this is a bug",
            -info, m, n, grid->mb, t.lld, grid->nprow, grid->npcol);
  size_t count;
  ITR_CHECK(itr_mul_size((size_t)t.lld, (size_t)t.n_loc, &count), ITR_ERR_INTERNAL,
            "local part of a %d x %d matrix overflows", m, n);
  ITR_TRY(itr_calloc(count, sizeof(double), "local blocks of a block-cyclic matrix", &t.a));
  *A = t;
  return ITR_OK;
}

void itr_dist_matrix_fini(itr_dist_matrix *A) {
  if (!A) return;
  free(A->a);
  memset(A, 0, sizeof *A);
}

void itr_dist_matrix_scatter(itr_dist_matrix *A, const double *full) {
  const itr_dist_grid *g = A->grid;
  for (int lc = 0; lc < A->n_loc; lc++) {
    int gj = l2g(lc, g->mb, g->mycol, g->npcol);
    double *col = A->a + (size_t)lc * A->lld;
    for (int li = 0; li < A->m_loc; li++) col[li] = full[(size_t)l2g(li, g->mb, g->myrow, g->nprow) * A->n + gj];
  }
}

itr_err itr_dist_matrix_gather(const itr_dist_matrix *A, int root, double *out) {
  const itr_dist_grid *g = A->grid;
  const int m = A->m, n = A->n, mb = g->mb, P = g->size;
  const int everyone = root < 0;
  const int receiving = everyone || g->rank == root;
  double *buf = NULL;
  int *counts = NULL, *displs = NULL;
  itr_err e = ITR_OK;
  if (root >= P)
    e = itr_error_set(ITR_ERR_INTERNAL, "gather: root %d is not a rank of a communicator of size %d", root, P);
  else if ((size_t)m * (size_t)n > INT_MAX)
    e = itr_error_set(ITR_ERR_INTERNAL, "gather of a %d x %d matrix exceeds MPI's int counts", m, n);
  if (e == ITR_OK && receiving) e = itr_calloc((size_t)m * (size_t)n, sizeof(double), "gathered matrix", &buf);
  if (e == ITR_OK) e = itr_calloc((size_t)P, sizeof(int), "gather counts", &counts);
  if (e == ITR_OK) e = itr_calloc((size_t)P, sizeof(int), "gather displacements", &displs);
  e = itr_dist_agree(g->comm, e);
  if (e != ITR_OK) goto done;
  for (int p = 0, off = 0; p < P; p++) {
    int ml = local_count(m, mb, p / g->npcol, g->nprow), nl = local_count(n, mb, p % g->npcol, g->npcol);
    counts[p] = ml * nl;
    displs[p] = off;
    off += counts[p];
  }
  /* lld == m_loc whenever m_loc > 0, so the local blocks are contiguous. */
  int mine = A->m_loc * A->n_loc;
  if (everyone)
    MPI_Allgatherv(A->a, mine, MPI_DOUBLE, buf, counts, displs, MPI_DOUBLE, g->comm);
  else
    MPI_Gatherv(A->a, mine, MPI_DOUBLE, buf, counts, displs, MPI_DOUBLE, root, g->comm);
  if (receiving) {
    for (int p = 0; p < P; p++) {
      int pr = p / g->npcol, pc = p % g->npcol;
      int ml = local_count(m, mb, pr, g->nprow), nl = local_count(n, mb, pc, g->npcol);
      const double *src = buf + displs[p];
      for (int lc = 0; lc < nl; lc++) {
        int gj = l2g(lc, mb, pc, g->npcol);
        for (int li = 0; li < ml; li++) out[(size_t)l2g(li, mb, pr, g->nprow) * n + gj] = src[(size_t)lc * ml + li];
      }
    }
  }
done:
  free(buf);
  free(counts);
  free(displs);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}
