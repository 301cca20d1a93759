/* Block-cyclic matrices: the one place where row-major data enters ScaLAPACK's column-major
 * local blocks and leaves them again (reduce, scatter, gather).
 *
 * Layout (rsrc = csrc = 0, mb = nb): global row i is in block row i / mb, owned by process row
 * (i / mb) % nprow, at local row (i / (mb * nprow)) * mb + i % mb; columns likewise over npcol.
 * Process (pr, pc) is rank pr * npcol + pc of the grid's communicator (checked at creation). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "dist/scalapack.h"
#include "iteris/dist.h"

/* Temporary memory of a reduction panel (send buffer); the receive buffer is at most as large. */
#define PANEL_BYTES_DEFAULT ((size_t)8 << 20)
static size_t panel_bytes_ = PANEL_BYTES_DEFAULT;

void itr_dist_set_reduce_panel_bytes(size_t bytes) { panel_bytes_ = bytes ? bytes : PANEL_BYTES_DEFAULT; }

static int local_count(int n, int mb, int p, int np) {
  int zero = 0;
  return numroc_(&n, &mb, &p, &zero, &np);
}

/* Global index of local index l on process p of np. */
static int l2g(int l, int mb, int p, int np) { return ((l / mb) * np + p) * mb + l % mb; }

/* First local row of process row pr holding a block row >= bj (ITR_DIST_LOWER), at most m_loc. */
static int first_row(itr_dist_part part, int bj, int pr, int nprow, int mb, int m_loc) {
  if (part == ITR_DIST_ALL || bj <= pr) return 0;
  long lb = (bj - pr + nprow - 1) / nprow; /* first local block row with lb * nprow + pr >= bj */
  long li = lb * mb;
  return li < m_loc ? (int)li : m_loc;
}

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

itr_err itr_dist_matrix_reduce(itr_dist_matrix *A, itr_dist_part part, const double *partial) {
  const itr_dist_grid *g = A->grid;
  const int m = A->m, n = A->n, mb = g->mb, nprow = g->nprow, npcol = g->npcol, P = g->size;
  const int nbc = (n + mb - 1) / mb;              /* global block columns */
  const int ncycles = (nbc + npcol - 1) / npcol; /* local block columns of process column 0 */
  /* A panel is `cyc` cycles of npcol block columns: at most m * cyc * npcol * mb doubles. */
  size_t cycle_doubles = (size_t)m * (size_t)(npcol * mb < n ? npcol * mb : n);
  size_t cyc = panel_bytes_ / sizeof(double) / (cycle_doubles ? cycle_doubles : 1);
  if (cyc < 1) cyc = 1;
  if (cyc > (size_t)ncycles) cyc = (size_t)ncycles;
  size_t panel = cycle_doubles * cyc;
  /* my share of a panel: at most m_loc rows times cyc local block columns */
  size_t mine = (size_t)A->m_loc * ((size_t)A->n_loc < cyc * (size_t)mb ? (size_t)A->n_loc : cyc * (size_t)mb);

  double *send = NULL, *recv = NULL;
  int *counts = NULL, *m_loc = NULL, *n_loc = NULL;
  itr_err e = ITR_OK;
  if (panel > INT_MAX)
    e = itr_error_set(ITR_ERR_INTERNAL, "reduction panel of %zu doubles exceeds MPI's int counts (m = %d)", panel, m);
  if (e == ITR_OK) e = itr_calloc(panel, sizeof(double), "reduction panel (send)", &send);
  if (e == ITR_OK) e = itr_calloc(mine, sizeof(double), "reduction panel (receive)", &recv);
  if (e == ITR_OK) e = itr_calloc((size_t)P, sizeof(int), "reduction counts", &counts);
  if (e == ITR_OK) e = itr_calloc((size_t)nprow, sizeof(int), "reduction row counts", &m_loc);
  if (e == ITR_OK) e = itr_calloc((size_t)npcol, sizeof(int), "reduction column counts", &n_loc);
  e = itr_dist_agree(g->comm, e);
  if (e != ITR_OK) goto done;
  for (int pr = 0; pr < nprow; pr++) m_loc[pr] = local_count(m, mb, pr, nprow);
  for (int pc = 0; pc < npcol; pc++) n_loc[pc] = local_count(n, mb, pc, npcol);
  memset(A->a, 0, sizeof(double) * (size_t)A->lld * (size_t)A->n_loc);

  for (int c0 = 0; c0 < ncycles; c0 += (int)cyc) {
    /* Pack by owner, in rank order, each owner's part in its own column-major local order. */
    size_t k = 0;
    for (int pr = 0; pr < nprow; pr++) {
      for (int pc = 0; pc < npcol; pc++) {
        size_t start = k;
        int lc_end = (c0 + (int)cyc) * mb < n_loc[pc] ? (c0 + (int)cyc) * mb : n_loc[pc];
        for (int lc0 = c0 * mb; lc0 < lc_end; lc0 += mb) { /* one local block column at a time */
          int w = lc_end - lc0 < mb ? lc_end - lc0 : mb;
          int gj0 = l2g(lc0, mb, pc, npcol);
          int li0 = first_row(part, gj0 / mb, pr, nprow, mb, m_loc[pr]);
          size_t rows = (size_t)(m_loc[pr] - li0);
          /* tiled transpose: read w contiguous entries of a source row, write w strided columns */
          for (int li = li0; li < m_loc[pr]; li++) {
            const double *src = partial + (size_t)l2g(li, mb, pr, nprow) * n + gj0;
            double *dst = send + k + (size_t)(li - li0);
            for (int jj = 0; jj < w; jj++) dst[(size_t)jj * rows] = src[jj];
          }
          k += rows * (size_t)w;
        }
        counts[pr * npcol + pc] = (int)(k - start);
      }
    }
    MPI_Reduce_scatter(send, recv, counts, MPI_DOUBLE, MPI_SUM, g->comm);
    /* Unpack my part into the local blocks. */
    size_t r = 0;
    int lc_end = (c0 + (int)cyc) * mb < A->n_loc ? (c0 + (int)cyc) * mb : A->n_loc;
    for (int lc = c0 * mb; lc < lc_end; lc++) {
      int bj = l2g(lc, mb, g->mycol, npcol) / mb;
      int li0 = first_row(part, bj, g->myrow, nprow, mb, A->m_loc);
      size_t rows = (size_t)(A->m_loc - li0);
      memcpy(A->a + (size_t)lc * A->lld + li0, recv + r, rows * sizeof(double));
      r += rows;
    }
  }
done:
  free(send);
  free(recv);
  free(counts);
  free(m_loc);
  free(n_loc);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
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
