/* Statistics of tall matrices whose rows are spread over the ranks, formed straight in the
 * block-cyclic layout the solve uses. Rows enter the layout with one MPI_Alltoallv, packed for their
 * owners (itr_dist_rows_create; Grams of those by pdsyrk / pdgemm). The Grams of the merge are formed
 * from the rows where they are (itr_dist_gram_rows: the rows' columns gathered to the Gram's owners,
 * gram_cols, or partial Grams summed by the owners, sum_syrk; itr_dist_kernel_rows: partial kernels).
 * Norms are local sums and one all-reduce. No rank ever holds a whole (d, d) matrix of the layout:
 * memory per rank is d^2 / size per matrix, its share of the rows, and the kept exchange buffers. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "dist/scalapack.h"
#include "iteris/dist.h"

/* Global index of local index l on process p of np (block size mb, source 0). */
static int l2g(int l, int mb, int p, int np) { return ((l / mb) * np + p) * mb + l % mb; }

static itr_err sum_over(MPI_Comm comm, double *v) {
  ITR_CHECK(MPI_Allreduce(MPI_IN_PLACE, v, 1, MPI_DOUBLE, MPI_SUM, comm) == MPI_SUCCESS, ITR_ERR_INTERNAL,
            "MPI_Allreduce of a norm failed");
  return ITR_OK;
}

/* Local index of global index g on its owner (block size mb, np processes, source 0). */
static int64_t g2l(int64_t g, int mb, int np) { return (g / mb) / np * mb + g % mb; }

/* Rows t in [0, T) of the block that starts at global row g0 owned by process row r. */
static int64_t rows_owned(int64_t g0, int64_t T, int mb, int r, int pr) {
  int64_t n = 0;
  for (int64_t t = 0; t < T; t++)
    if (((g0 + t) / mb) % pr == r) n++;
  return n;
}

/* Packs rank p's rows for the process at grid position (r, c) in the order the receiver writes
 * them: the column blocks of c in order, in each the rows of r in order, in each row the block's
 * columns. Filled a row at a time (x is read once, in order): only the last column block can be
 * narrower than mb, so block k of nr rows starts at k mb nr. With y (b != 0) the values are
 * a x + b y in float64 (out64); without, x itself in float32 (out32: half the bytes to move; the
 * receiver scales). */
static void pack_rows(const float *x, double a, const float *y, double b, int64_t T, int64_t d, int64_t g0, int mb,
                      int r, int pr, int c, int pc, double *out64, float *out32) {
  const int64_t nr = rows_owned(g0, T, mb, r, pr);
  int64_t ri = 0;
  for (int64_t t = 0; t < T; t++) {
    if (((g0 + t) / mb) % pr != r) continue;
    const float *xr = x + t * d, *yr = y ? y + t * d : NULL;
    int64_t k = 0;
    for (int64_t j0 = (int64_t)c * mb; j0 < d; j0 += (int64_t)mb * pc, k++) {
      const int64_t wdt = j0 + mb < d ? mb : d - j0, at = k * mb * nr + ri * wdt;
      if (out64)
        for (int64_t j = 0; j < wdt; j++) out64[at + j] = a * (double)xr[j0 + j] + b * (double)yr[j0 + j];
      else
        memcpy(out32 + at, xr + j0, (size_t)wdt * sizeof(float));
    }
    ri++;
  }
}

/* Every rank's row count T (*Ts: size entries, the caller frees them) and their maximum (at least 1).
 * Collective on the grid; ends agreed. */
static itr_err gather_row_counts(const itr_dist_grid *grid, int64_t T, int64_t **Ts, int64_t *tmax, const char *who) {
  *Ts = NULL, *tmax = 1;
  ITR_TRY(itr_dist_agree(grid->comm, itr_calloc((size_t)grid->size, sizeof(int64_t), "row counts", Ts)));
  ITR_CHECK(MPI_Allgather(&T, 1, MPI_INT64_T, *Ts, 1, MPI_INT64_T, grid->comm) == MPI_SUCCESS, ITR_ERR_INTERNAL,
            "%s: MPI_Allgather of the row counts failed", who);
  for (int p = 0; p < grid->size; p++)
    if ((*Ts)[p] > *tmax) *tmax = (*Ts)[p];
  return ITR_OK;
}

/* dst[j ld + t] = a x[t d + j] + b y[t d + j] (y may be NULL) for t < T, j < d: float32 rows into a
 * column-major float64 array, 16 rows at a time, so that each column receives a run of 16 values. */
static void rows_to_columns(const float *x, double a, const float *y, double b, int64_t T, int64_t d, double *dst,
                            int64_t ld) {
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t tn = T - t0 < 16 ? T - t0 : 16;
    for (int64_t j = 0; j < d; j++) {
      double *col = dst + j * ld + t0;
      const float *xr = x + t0 * d + j, *yr = y && b != 0.0 ? y + t0 * d + j : NULL;
      if (yr)
        for (int64_t r = 0; r < tn; r++) col[r] = a * (double)xr[r * d] + b * (double)yr[r * d];
      else
        for (int64_t r = 0; r < tn; r++) col[r] = a * (double)xr[r * d];
    }
  }
}

itr_err itr_dist_rows_create(const itr_dist_grid *grid, int64_t T, int64_t d, const float *x, double a, const float *y,
                             double b, itr_dist_matrix *Z) {
  itr_err e = ITR_OK;
  const int size = grid->size, mb = grid->mb, pr = grid->nprow, pc = grid->npcol;
  int64_t *Ts = NULL, tmax = 1;
  double *sbuf = NULL, *rbuf = NULL;
  int *scount = NULL, *sdispl = NULL, *rcount = NULL, *rdispl = NULL;
  itr_dist_matrix z;
  memset(&z, 0, sizeof z);
  e = gather_row_counts(grid, T, &Ts, &tmax, "rows_create");
  if (e == ITR_OK) e = itr_dist_agree(grid->comm, itr_calloc((size_t)size * 4, sizeof(int), "exchange counts", &scount));
  if (e != ITR_OK) goto done;
  sdispl = scount + size;
  rcount = sdispl + size;
  rdispl = rcount + size;
  /* what goes to each process, and what comes from each (counts of doubles, which MPI takes as int) */
  int64_t stot = 0, rtot = 0;
  if ((int64_t)size * tmax > INT_MAX || d < 1 || d > INT_MAX || T < 0 || (T > 0 && !x))
    e = itr_error_set(ITR_ERR_INTERNAL, "rows_create: %d ranks x %lld rows of %lld: out of range", size,
                      (long long)tmax, (long long)d);
  const int di = e == ITR_OK ? (int)d : 1, zero = 0;
  const int64_t my_cols = numroc_(&di, &mb, &grid->mycol, &zero, &pc);
  for (int q = 0; q < size && e == ITR_OK; q++) {
    const int r = q / pc, c = q % pc;
    const int64_t cols = numroc_(&di, &mb, &c, &zero, &pc);
    const int64_t ns = rows_owned((int64_t)grid->rank * tmax, T, mb, r, pr) * cols;
    const int64_t nr = rows_owned((int64_t)q * tmax, Ts[q], mb, grid->myrow, pr) * my_cols;
    if (ns > INT_MAX || nr > INT_MAX || stot > INT_MAX - ns || rtot > INT_MAX - nr) {
      e = itr_error_set(ITR_ERR_INTERNAL, "rows_create: %lld rows of %lld on %d ranks: more than 2^31 values "
                        "move between two ranks; run more ranks", (long long)T, (long long)d, size);
      break;
    }
    scount[q] = (int)ns;
    sdispl[q] = (int)stot;
    rcount[q] = (int)nr;
    rdispl[q] = (int)rtot;
    stot += ns;
    rtot += nr;
  }
  if (e == ITR_OK && size == 1) { /* one process: the rows go straight into the layout, 16 at a time */
    e = itr_dist_matrix_init(&z, grid, (int)tmax, (int)d);
    if (e == ITR_OK) rows_to_columns(x, a, y, b, T, d, z.a, z.lld);
    if (e == ITR_OK) *Z = z, memset(&z, 0, sizeof z);
    goto done;
  }
  if (e == ITR_OK) e = itr_calloc((size_t)(stot ? stot : 1), sizeof(double), "rows f64 to send", &sbuf);
  if (e == ITR_OK) e = itr_calloc((size_t)(rtot ? rtot : 1), sizeof(double), "rows f64 received", &rbuf);
  if (e == ITR_OK) e = itr_dist_matrix_init(&z, grid, (int)(size * tmax), (int)d);
  e = itr_dist_agree(grid->comm, e);
  if (e != ITR_OK) goto done;
  const int wide = y && b != 0.0; /* mixed rows travel in float64, plain rows in float32 */
  float *s32 = (float *)sbuf, *r32 = (float *)rbuf;
  for (int q = 0; q < size; q++)
    pack_rows(x, a, y, b, T, d, (int64_t)grid->rank * tmax, mb, q / pc, pr, q % pc, pc,
              wide ? sbuf + sdispl[q] : NULL, wide ? NULL : s32 + sdispl[q]);
  if (MPI_Alltoallv(wide ? (void *)sbuf : (void *)s32, scount, sdispl, wide ? MPI_DOUBLE : MPI_FLOAT,
                    wide ? (void *)rbuf : (void *)r32, rcount, rdispl, wide ? MPI_DOUBLE : MPI_FLOAT,
                    grid->comm) != MPI_SUCCESS) {
    e = itr_error_set(ITR_ERR_INTERNAL, "rows_create: MPI_Alltoallv of the rows failed");
    goto done;
  }
  /* unpack in the packing order: source rank, column block, row, column. The rows of source p that
   * this process owns have consecutive local indices (g2l is increasing and dense over the owned
   * rows), so each column block is one (nr, wdt) row-major tile to transpose into the column-major
   * local array: done 16 rows at a time, so that each column receives a run of 16 values. */
  for (int p = 0; p < size; p++) {
    const int64_t g0 = (int64_t)p * tmax, nr = rows_owned(g0, Ts[p], mb, grid->myrow, pr);
    if (nr == 0) continue;
    int64_t first = g0;
    while ((first / mb) % pr != grid->myrow) first++;
    const int64_t lr0 = g2l(first, mb, pr);
    size_t w = 0;
    for (int64_t j0 = (int64_t)grid->mycol * mb; j0 < d; j0 += (int64_t)mb * pc) {
      const int64_t wdt = j0 + mb < d ? mb : d - j0;
      double *dst = z.a + g2l(j0, mb, pc) * z.lld + lr0;
      for (int64_t r0 = 0; r0 < nr; r0 += 16) {
        const int64_t rn = nr - r0 < 16 ? nr - r0 : 16;
        for (int64_t j = 0; j < wdt; j++) {
          double *col = dst + j * z.lld + r0;
          if (wide) {
            const double *in = rbuf + rdispl[p] + w + j;
            for (int64_t r = 0; r < rn; r++) col[r] = in[r * wdt];
          } else {
            const float *in = r32 + rdispl[p] + w + j;
            for (int64_t r = 0; r < rn; r++) col[r] = a * (double)in[r * wdt];
          }
        }
        w += (size_t)(rn * wdt);
      }
    }
  }
  *Z = z;
  memset(&z, 0, sizeof z);
done:
  free(Ts);
  free(scount);
  free(sbuf);
  free(rbuf);
  itr_dist_matrix_fini(&z);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_dist_gram(double alpha, const itr_dist_matrix *A, const itr_dist_matrix *B, double beta,
                      itr_dist_matrix *C) {
  ITR_CHECK(A->grid == C->grid && B->grid == C->grid && A->m == B->m && A->n == B->n && C->m == A->n &&
                C->n == A->n,
            ITR_ERR_INTERNAL, "gram: shapes do not match: A %d x %d, B %d x %d, C %d x %d (expected n x d, n x d, d x d)",
            A->m, A->n, B->m, B->n, C->m, C->n);
  const int n = A->m, d = A->n, one = 1;
  /* One process: the local arrays are the whole column-major matrices, and OpenBLAS's dsyrk runs at
   * about 1.45x pdsyrk's rate there (50 against 35 GFLOP/s for d 4096, n 1024: pdsyrk repacks the
   * rows for every 64-column panel). */
  if (A->grid->size == 1 && A == B)
    cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, d, n, alpha, A->a, A->lld, beta, C->a, C->lld);
  else if (A->grid->size == 1)
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, d, d, n, alpha, A->a, A->lld, B->a, B->lld, beta, C->a,
                C->lld);
  else if (A == B)
    pdsyrk_("L", "T", &d, &n, &alpha, A->a, &one, &one, A->desc, &beta, C->a, &one, &one, C->desc);
  else
    pdgemm_("T", "N", &d, &d, &n, &alpha, A->a, &one, &one, A->desc, B->a, &one, &one, B->desc, &beta, C->a, &one,
            &one, C->desc);
  return ITR_OK;
}

/* Bytes of one rank's partial Gram panel in itr_dist_gram_rows: d x w doubles, w columns at a time
 * (itr_dist_gram_rows_panel changes it: the tests make several panels of small matrices). */
enum { GRAM_PANEL_DEFAULT = 64 << 20 };
static size_t gram_panel_bytes_ = GRAM_PANEL_DEFAULT;

void itr_dist_gram_rows_panel(size_t bytes) { gram_panel_bytes_ = bytes ? bytes : GRAM_PANEL_DEFAULT; }

/* Buffers of itr_dist_gram_rows kept from call to call (grown, never zeroed on reuse): fresh pages
 * cost a fault each, and on a first touch MPI's single-copy transfers run at a tenth of their
 * speed (measured here: a 64 MB exchange 0.25 s cold, 0.02 s warm). Released with the grids. */
enum { SCR_ROWS, SCR_COLS, SCR_PANEL, SCR_SEND, SCR_RECV, SCR_SUM, SCR_ROWS_SEND, SCR_ROWS_RECV, SCR_N };
static double *scratch_[SCR_N];
static size_t scratch_n_[SCR_N];

static itr_err scratch(int slot, size_t n, double **out) {
  if (n > scratch_n_[slot]) {
    free(scratch_[slot]);
    scratch_[slot] = NULL;
    scratch_n_[slot] = 0;
    ITR_TRY(itr_calloc(n, sizeof(double), "Gram workspace", &scratch_[slot]));
    scratch_n_[slot] = n;
  }
  *out = scratch_[slot];
  return ITR_OK;
}

void itr_dist_scratch_release(void) {
  for (int k = 0; k < SCR_N; k++) free(scratch_[k]), scratch_[k] = NULL, scratch_n_[k] = 0;
}

/* The first global row >= j0 (a multiple of mb) in process row r's blocks: the start of its first block
 * there (n or beyond if none). */
static int64_t first_block_row(int64_t j0, int mb, int r, int pr) {
  int64_t b = j0 / mb; /* the first block at or below j0 */
  b += ((r - b) % pr + pr) % pr;
  return b * mb;
}

/* C (n, n) lower = sum over the ranks of A_p A_p^T, A_p (n, k) column-major (lda) this rank's operand:
 * one dsyrk on one process; else panels of w columns of C, rows [j0, n) of each from A_p (the diagonal
 * block by dsyrk, the rows below by dgemm: n^2 k flops in all), each owner's share packed in the order
 * of its local array (its columns in the panel, in each its rows), sent to it (MPI_Alltoallv:
 * pairwise exchanges, several times faster than Open MPI's MPI_Reduce_scatter for panels this large)
 * and summed there. Collective on the grid. */
static itr_err sum_syrk(const itr_dist_grid *grid, int64_t n, int64_t k, const double *A, int64_t lda,
                        itr_dist_matrix *C) {
  const int size = grid->size, mb = grid->mb, pr = grid->nprow, pc = grid->npcol, zero = 0, ni = (int)n;
  if (size == 1) { /* one process: the local array is the whole C */
    if (k > 0) cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, ni, (int)k, 1.0, A, (int)lda, 0.0, C->a, C->lld);
    else
      for (int64_t j = 0; j < n; j++) memset(C->a + j * C->lld + j, 0, (size_t)(n - j) * sizeof(double));
    return ITR_OK;
  }
  double *gp = NULL, *sbuf = NULL, *rbuf = NULL, *xbuf = NULL;
  int *counts = NULL;
  int64_t w = (int64_t)(gram_panel_bytes_ / (size_t)(8 * n));
  w = w / mb * mb;
  if (w < mb) w = mb;
  if (w > n) w = n;
  /* my share of a panel: my rows x at most my_cols of its columns; received from every rank */
  const int64_t my_rows = numroc_(&ni, &mb, &grid->myrow, &zero, &pr), my_cols = ((w / mb + pc - 1) / pc + 1) * mb;
  itr_err e = scratch(SCR_PANEL, (size_t)(n * w), &gp);
  if (e == ITR_OK) e = scratch(SCR_SEND, (size_t)(n * w), &sbuf);
  if (e == ITR_OK) e = scratch(SCR_SUM, (size_t)(my_rows * my_cols) + 1, &rbuf);
  if (e == ITR_OK) e = scratch(SCR_RECV, (size_t)size * (size_t)(my_rows * my_cols) + 1, &xbuf);
  if (e == ITR_OK) e = itr_calloc((size_t)size * 4, sizeof(int), "panel counts", &counts);
  e = itr_dist_agree(grid->comm, e);
  int *sdispl = counts ? counts + size : NULL, *rcount = counts ? counts + 2 * size : NULL,
      *rdispl = counts ? counts + 3 * size : NULL;
  for (int64_t j0 = 0; e == ITR_OK && j0 < n; j0 += w) {
    const int64_t wp = n - j0 < w ? n - j0 : w;
    memset(gp, 0, (size_t)(n * wp) * sizeof(double));
    if (k > 0) {
      cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, (int)wp, (int)k, 1.0, A + j0, (int)lda, 0.0, gp + j0, ni);
      if (j0 + wp < n)
        cblas_dgemm(CblasColMajor, CblasNoTrans, CblasTrans, (int)(n - j0 - wp), (int)wp, (int)k, 1.0, A + j0 + wp,
                    (int)lda, A + j0, (int)lda, 0.0, gp + j0 + wp, ni);
    }
    /* only the rows from j0 on (a multiple of mb): the blocks above the panel are zero */
    int64_t at = 0;
    for (int q = 0; q < size; q++) {
      const int r = q / pc, c = q % pc;
      const int64_t start = at, first = first_block_row(j0, mb, r, pr);
      for (int64_t gj = j0; gj < j0 + wp; gj++) {
        if ((gj / mb) % pc != c) continue;
        const double *col = gp + (gj - j0) * n;
        for (int64_t g0 = first; g0 < n; g0 += (int64_t)mb * pr) {
          const int64_t g1 = g0 + mb < n ? g0 + mb : n;
          memcpy(sbuf + at, col + g0, (size_t)(g1 - g0) * sizeof(double));
          at += g1 - g0;
        }
      }
      counts[q] = (int)(at - start);
    }
    const int mine = counts[grid->rank];
    for (int q = 0, o = 0; q < size; q++) sdispl[q] = o, o += counts[q], rcount[q] = mine, rdispl[q] = q * mine;
    if (MPI_Alltoallv(sbuf, counts, sdispl, MPI_DOUBLE, xbuf, rcount, rdispl, MPI_DOUBLE, grid->comm) != MPI_SUCCESS) {
      e = itr_error_set(ITR_ERR_INTERNAL, "MPI_Alltoallv of a Gram panel failed");
      break;
    }
    memcpy(rbuf, xbuf, (size_t)mine * sizeof(double));
    for (int q = 1; q < size; q++)
      for (int t = 0; t < mine; t++) rbuf[t] += xbuf[(size_t)q * (size_t)mine + (size_t)t];
    /* my columns of the panel into the local array, each from local row lr0 (global j0) on */
    const int64_t lr0 = g2l(first_block_row(j0, mb, grid->myrow, pr), mb, pr), len = my_rows - lr0;
    int64_t got = 0;
    for (int64_t gj = j0; len > 0 && gj < j0 + wp; gj++) {
      if ((gj / mb) % pc != grid->mycol) continue;
      memcpy(C->a + g2l(gj, mb, pc) * C->lld + lr0, rbuf + got * len, (size_t)len * sizeof(double));
      got++;
    }
  }
  free(counts);
  return e;
}

/* ---- the Gram from columns gathered to their owners -------------------------------------------- */

static itr_gram_exchange gram_exchange_ = ITR_GRAM_AUTO;

void itr_dist_gram_rows_exchange(itr_gram_exchange how) { gram_exchange_ = how; }

int itr_dist_gram_exchange_parse(const char *name, itr_gram_exchange *out) {
  static const char *const names[] = {"auto", "columns", "partial"}; /* in the enum's order */
  for (int k = 0; k < 3; k++)
    if (name && !strcmp(name, names[k])) return *out = (itr_gram_exchange)k, 1;
  return 0;
}

/* Rows of a rank holding Tp rows in the round that starts at its row t0 (R rows per rank per round). */
static int64_t round_rows(int64_t Tp, int64_t t0, int64_t R) { return Tp - t0 < R ? (Tp - t0 > 0 ? Tp - t0 : 0) : R; }

/* Process row r's column blocks or process column c's: the columns of Z that the owner (r, c) of C's
 * local blocks needs (C's row blocks of r and column blocks of c). */
static int wants_block(int64_t k, int r, int pr, int c, int pc) { return k % pr == r || k % pc == c; }

/* Rows [t0, t0 + R) of each rank (R = rows per rank per round) of Z = a x + b y, as the (n_r, m) and
 * (n_r, n) column-major operands of this process's local C: A_r = Z[:, C's rows here], A_c = Z[:, C's
 * columns here]. Each rank packs, for each process, its rows of the columns that process wants (whole
 * blocks, in global order; x then y, float32) and one MPI_Alltoallv moves them; the receiver writes
 * them 16 rows at a time into A_r and A_c. On the diagonal of a square grid A_c is A_r. */
typedef struct {
  const itr_dist_grid *grid;
  int64_t d, T, R;
  const int64_t *Ts;                 /* every rank's row count */
  const float *x, *y;
  double a, b;
  int wide;                          /* y present: x and y both travel */
  int *cnt;                          /* scount, sdispl, rcount, rdispl (4 size) */
  float *sbuf, *rbuf;
  double *Ar, *Ac;                   /* (n_r, mloc), (n_r, nloc) column-major, ld n_r */
  int64_t mloc, nloc, n_r;
} cols_round;

/* Columns of the union of process (r, c)'s blocks: sum of their widths. */
static int64_t union_width(int64_t d, int mb, int r, int pr, int c, int pc) {
  int64_t w = 0;
  for (int64_t k = 0; k * mb < d; k++)
    if (wants_block(k, r, pr, c, pc)) w += (k + 1) * mb < d ? mb : d - k * mb;
  return w;
}

static itr_err cols_exchange(cols_round *s, int64_t t0) {
  const itr_dist_grid *g = s->grid;
  const int size = g->size, mb = g->mb, pr = g->nprow, pc = g->npcol;
  const int64_t d = s->d, nv = s->wide ? 2 : 1;
  int *scount = s->cnt, *sdispl = s->cnt + size, *rcount = s->cnt + 2 * size, *rdispl = s->cnt + 3 * size;
  const int64_t mine = round_rows(s->T, t0, s->R);
  const int64_t uw_me = union_width(d, mb, g->myrow, pr, g->mycol, pc);
  int64_t o = 0;
  for (int q = 0; q < size; q++) { /* to q: my rows of its columns, row by row, x then y */
    const int r = q / pc, c = q % pc;
    const int64_t start = o;
    for (int v = 0; v < nv; v++) {
      const float *src = v ? s->y : s->x;
      for (int64_t t = t0; t < t0 + mine; t++)
        for (int64_t k = 0; k * mb < d; k++)
          if (wants_block(k, r, pr, c, pc)) {
            const int64_t w = (k + 1) * mb < d ? mb : d - k * mb;
            memcpy(s->sbuf + o, src + t * d + k * mb, (size_t)w * sizeof(float));
            o += w;
          }
    }
    scount[q] = (int)(o - start), sdispl[q] = (int)start;
  }
  s->n_r = 0;
  for (int p = 0, ro = 0; p < size; p++) {
    const int64_t rp = round_rows(s->Ts[p], t0, s->R);
    rcount[p] = (int)(rp * uw_me * nv), rdispl[p] = ro, ro += rcount[p];
    s->n_r += rp;
  }
  ITR_CHECK(MPI_Alltoallv(s->sbuf, scount, sdispl, MPI_FLOAT, s->rbuf, rcount, rdispl, MPI_FLOAT, g->comm) ==
                MPI_SUCCESS,
            ITR_ERR_INTERNAL, "gram_rows: MPI_Alltoallv of the rows' columns failed");
  /* unpack: source p's rp rows (consecutive in A_r, A_c), each uw_me values (then the y part) */
  const int64_t ld = s->n_r > 0 ? s->n_r : 1;
  const int same = s->Ac == s->Ar;
  int64_t row0 = 0;
  for (int p = 0; p < size; p++) {
    const int64_t rp = round_rows(s->Ts[p], t0, s->R);
    const float *in = s->rbuf + rdispl[p], *iny = s->wide ? in + rp * uw_me : NULL;
    for (int64_t r0 = 0; r0 < rp; r0 += 16) {
      const int64_t rn = rp - r0 < 16 ? rp - r0 : 16;
      int64_t off = 0;
      for (int64_t k = 0; k * mb < d; k++) {
        const int in_r = k % pr == g->myrow, in_c = k % pc == g->mycol;
        if (!in_r && !in_c) continue;
        const int64_t w = (k + 1) * mb < d ? mb : d - k * mb;
        double *dr = in_r ? s->Ar + ((k / pr) * mb) * ld + row0 + r0 : NULL;
        double *dc = in_c && !same ? s->Ac + ((k / pc) * mb) * ld + row0 + r0 : NULL;
        for (int64_t j = 0; j < w; j++) {
          double col[16];
          const float *ix = in + r0 * uw_me + off + j;
          if (iny) {
            const float *iy = iny + r0 * uw_me + off + j;
            for (int64_t r = 0; r < rn; r++) col[r] = s->a * (double)ix[r * uw_me] + s->b * (double)iy[r * uw_me];
          } else
            for (int64_t r = 0; r < rn; r++) col[r] = s->a * (double)ix[r * uw_me];
          if (dr) memcpy(dr + j * ld, col, (size_t)rn * sizeof(double));
          if (dc) memcpy(dc + j * ld, col, (size_t)rn * sizeof(double));
        }
        off += w;
      }
    }
    row0 += rp;
  }
  return ITR_OK;
}

/* C's local blocks on or below the diagonal (+)= A_r^T A_c: local column block jb (global block
 * jb pc + mycol) needs the local rows from first_lower_row on (global block ib pr + myrow >= its own).
 * Column blocks go four at a time: one dgemm for the rows all four need, one per block for the rest. */
static int64_t first_lower_row(const itr_dist_grid *g, int64_t jb, int64_t mloc) {
  const int64_t J = jb * g->npcol + g->mycol, ib = J <= g->myrow ? 0 : (J - g->myrow + g->nprow - 1) / g->nprow;
  return ib * g->mb < mloc ? ib * g->mb : mloc;
}

static void cols_product(const itr_dist_grid *g, const cols_round *s, double beta, itr_dist_matrix *C) {
  const int mb = g->mb;
  const int64_t ld = s->n_r > 0 ? s->n_r : 1, nbc = (s->nloc + mb - 1) / mb, G = mb >= 256 ? 1 : 256 / mb;
  for (int64_t j0 = 0; j0 < nbc; j0 += G) {
    const int64_t j1 = j0 + G < nbc ? j0 + G : nbc, c0 = j0 * mb, c1 = j1 * mb < s->nloc ? j1 * mb : s->nloc;
    const int64_t rl = first_lower_row(g, j1 - 1, s->mloc);
    if (rl < s->mloc)
      cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)(s->mloc - rl), (int)(c1 - c0), (int)s->n_r, 1.0,
                  s->Ar + rl * ld, (int)ld, s->Ac + c0 * ld, (int)ld, beta, C->a + c0 * C->lld + rl, C->lld);
    for (int64_t jb = j0; jb < j1 - 1; jb++) {
      const int64_t r0 = first_lower_row(g, jb, s->mloc), b0 = jb * mb, b1 = (jb + 1) * mb;
      if (r0 < rl)
        cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)(rl - r0), (int)(b1 - b0), (int)s->n_r, 1.0,
                    s->Ar + r0 * ld, (int)ld, s->Ac + b0 * ld, (int)ld, beta, C->a + b0 * C->lld + r0, C->lld);
    }
  }
}

/* C (d, d) lower = sum over the ranks' rows of z^T z, the columns of the rows gathered to C's owners:
 * process (r, c) receives every rank's rows in the columns of its row and column blocks (float32,
 * n d (1 / pr + 1 / pc) values for n rows: fewer bytes than a (d, d) partial per rank whenever
 * n < d / (1 / pr + 1 / pc) / 2) and forms its blocks by dgemm, in rounds of rows that bound the
 * operands to 4 panels' bytes. Collective on the grid. */
static itr_err gram_cols(const itr_dist_grid *g, int64_t T, const int64_t *Ts, int64_t tmax, int64_t d, const float *x,
                         double a, const float *y, double b, itr_dist_matrix *C) {
  const int size = g->size, mb = g->mb, pr = g->nprow, pc = g->npcol, zero = 0, di = (int)d;
  cols_round s;
  memset(&s, 0, sizeof s);
  s.grid = g, s.d = d, s.T = T, s.Ts = Ts, s.x = x, s.y = y, s.a = a, s.b = b, s.wide = y && b != 0.0;
  s.mloc = numroc_(&di, &mb, &g->myrow, &zero, &pr), s.nloc = numroc_(&di, &mb, &g->mycol, &zero, &pc);
  itr_err e = itr_dist_agree(g->comm, itr_calloc((size_t)size * 4, sizeof(int), "exchange counts", &s.cnt));
  /* rows per rank per round: A_r and A_c within 4 panels' bytes */
  const int same = pr == pc && g->myrow == g->mycol;
  int64_t cols_max = 0; /* the largest A_r + A_c over the processes, so that every rank agrees on R */
  for (int q = 0; q < size; q++) {
    const int r = q / pc, c = q % pc;
    const int64_t m = numroc_(&di, &mb, &r, &zero, &pr) + (pr == pc && r == c ? 0 : numroc_(&di, &mb, &c, &zero, &pc));
    if (m > cols_max) cols_max = m;
  }
  s.R = (int64_t)(4 * gram_panel_bytes_ / (size_t)(8 * cols_max * size));
  if (s.R < 1) s.R = 1;
  if (s.R > tmax) s.R = tmax;
  const int64_t nmax = s.R * size, ws = s.R * d * size * (s.wide ? 2 : 1);
  if (e == ITR_OK && (ws > INT_MAX || nmax * d * (s.wide ? 2 : 1) > INT_MAX))
    e = itr_error_set(ITR_ERR_INTERNAL, "gram_rows: %lld rows of %lld on %d ranks: more than 2^31 values move in one "
                      "exchange", (long long)s.R, (long long)d, size);
  double *sb = NULL, *rb = NULL;
  if (e == ITR_OK) e = scratch(SCR_ROWS_SEND, (size_t)ws / 2 + 1, &sb);
  if (e == ITR_OK) e = scratch(SCR_ROWS_RECV, (size_t)(nmax * d * (s.wide ? 2 : 1)) / 2 + 1, &rb);
  if (e == ITR_OK) e = scratch(SCR_ROWS, (size_t)(nmax * s.mloc) + 1, &s.Ar);
  if (e == ITR_OK && !same) e = scratch(SCR_COLS, (size_t)(nmax * s.nloc) + 1, &s.Ac);
  if (same) s.Ac = s.Ar;
  s.sbuf = (float *)sb, s.rbuf = (float *)rb;
  e = itr_dist_agree(g->comm, e);
  for (int64_t t0 = 0; e == ITR_OK && t0 < tmax; t0 += s.R) {
    e = itr_dist_agree(g->comm, cols_exchange(&s, t0));
    if (e == ITR_OK) cols_product(g, &s, t0 == 0 ? 0.0 : 1.0, C);
  }
  free(s.cnt);
  return e;
}

itr_err itr_dist_gram_rows(const itr_dist_grid *grid, int64_t T, int64_t d, const float *x, double a, const float *y,
                           double b, itr_dist_matrix *C) {
  ITR_CHECK(C->grid == grid && C->m == d && C->n == d && T >= 0 && (T == 0 || x), ITR_ERR_INTERNAL,
            "gram_rows: C is %d x %d for rows of %lld (C must be d x d on the grid)", C->m, C->n, (long long)d);
  if (grid->size > 1 && gram_exchange_ != ITR_GRAM_PARTIAL) {
    int64_t *Ts = NULL, tmax = 1, n = 0;
    itr_err e = gather_row_counts(grid, T, &Ts, &tmax, "gram_rows");
    for (int p = 0; e == ITR_OK && p < grid->size; p++) n += Ts[p];
    /* auto: the bytes of each way (itr_gram_exchange) */
    const double u = 1.0 / grid->nprow + 1.0 / grid->npcol - 1.0 / grid->size;
    const int cols = gram_exchange_ == ITR_GRAM_COLUMNS || (y && b != 0.0 ? 4.0 : 2.0) * (double)n * u < (double)d;
    if (e == ITR_OK && cols) e = gram_cols(grid, T, Ts, tmax, d, x, a, y, b, C);
    free(Ts);
    if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
    if (cols) return ITR_OK;
  }
  /* this rank's rows in float64, row-major (T, d): column-major (d, T), whose A A^T is Z^T Z */
  double *z = NULL;
  itr_err e = scratch(SCR_ROWS, (size_t)(T * d) + 1, &z);
  for (int64_t q = 0; e == ITR_OK && q < T * d; q++) z[q] = y && b != 0.0 ? a * (double)x[q] + b * (double)y[q] : a * (double)x[q];
  e = itr_dist_agree(grid->comm, e);
  if (e == ITR_OK) e = sum_syrk(grid, d, T, z, d, C);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

itr_err itr_dist_kernel_rows(const itr_dist_grid *grid, int64_t T, int64_t d, const float *x, double a, const float *y,
                             double b, itr_dist_matrix *K) {
  const int size = grid->size;
  int64_t *Ts = NULL, tmax = 1;
  int *cnt = NULL;
  float *sbuf = NULL, *rbuf = NULL;
  double *zq = NULL;
  itr_err e = gather_row_counts(grid, T, &Ts, &tmax, "kernel_rows");
  if (e == ITR_OK) e = itr_dist_agree(grid->comm, itr_calloc((size_t)size * 4, sizeof(int), "exchange counts", &cnt));
  if (e != ITR_OK) goto done;
  const int64_t n = (int64_t)size * tmax; /* rank p's row t is row p tmax + t; the others are zero */
  /* columns [c0(q), c0(q + 1)) go to rank q: every rank's rows of them, in float32 */
#define C0(q) (d * (int64_t)(q) / size)
  const int64_t dq = C0(grid->rank + 1) - C0(grid->rank);
  if (K->m != n || K->n != n || K->grid != grid || n * (dq > 0 ? dq : 1) > INT_MAX || T * d > INT_MAX)
    e = itr_error_set(ITR_ERR_INTERNAL, "kernel_rows: K is %d x %d for %lld rows (expected %lld x %lld), or more than "
                      "2^31 values move", K->m, K->n, (long long)n, (long long)n, (long long)n);
  if (e == ITR_OK) e = scratch(SCR_ROWS, (size_t)(n * dq) + 1, &zq);
  if (e == ITR_OK && size == 1) { /* one process: the rows straight into zq, 16 at a time */
    rows_to_columns(x, a, y, b, T, d, zq, n);
    if (T == 0) memset(zq, 0, (size_t)(n * dq) * sizeof(double));
    e = sum_syrk(grid, n, dq, zq, n, K);
    goto done;
  }
  const int two = y && b != 0.0; /* then y's rows travel too, into the second half of the receive buffer */
  double *sb = NULL, *rb = NULL; /* float32 buffers in the kept workspace */
  if (e == ITR_OK) e = scratch(SCR_ROWS_SEND, (size_t)(T * d) / 2 + 1, &sb);
  if (e == ITR_OK) e = scratch(SCR_ROWS_RECV, (size_t)(n * dq) * (two ? 2 : 1) / 2 + 1, &rb);
  sbuf = (float *)sb;
  rbuf = (float *)rb;
  e = itr_dist_agree(grid->comm, e);
  if (e != ITR_OK) goto done;
  int *scount = cnt, *sdispl = cnt + size, *rcount = cnt + 2 * size, *rdispl = cnt + 3 * size;
  for (int p = 0, o = 0; p < size; p++) rcount[p] = (int)(Ts[p] * dq), rdispl[p] = o, o += rcount[p];
  for (int v = 0; v <= two; v++) {
    const float *src = v ? y : x;
    for (int q = 0, o = 0; q < size; q++) { /* to q: my T rows of its columns, row by row */
      const int64_t w = C0(q + 1) - C0(q);
      for (int64_t t = 0; t < T; t++) memcpy(sbuf + o + t * w, src + t * d + C0(q), (size_t)w * sizeof(float));
      scount[q] = (int)(T * w), sdispl[q] = o, o += (int)(T * w);
    }
    if (MPI_Alltoallv(sbuf, scount, sdispl, MPI_FLOAT, rbuf + (size_t)v * (size_t)(n * dq), rcount, rdispl, MPI_FLOAT,
                      grid->comm) != MPI_SUCCESS) {
      e = itr_error_set(ITR_ERR_INTERNAL, "kernel_rows: MPI_Alltoallv of the rows failed");
      goto done;
    }
  }
  /* zq (n, dq) column-major: a x (+ b y) of every rank's rows (each source's (T_p, dq) row-major block
   * transposed 16 rows at a time), zero rows between the ranks' */
  for (int p = 0; p < size; p++) {
    const float *in = rbuf + rdispl[p];
    rows_to_columns(in, a, two ? in + n * dq : NULL, b, Ts[p], dq, zq + (int64_t)p * tmax, n);
    if (Ts[p] < tmax)
      for (int64_t j = 0; j < dq; j++)
        memset(zq + j * n + (int64_t)p * tmax + Ts[p], 0, (size_t)(tmax - Ts[p]) * sizeof(double));
  }
#undef C0
  e = sum_syrk(grid, n, dq, zq, n, K);
done:
  free(Ts);
  free(cnt);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  return ITR_OK;
}

/* First local row of A whose global row is >= gj (m_loc if none): local rows map to increasing
 * global rows, so a binary search finds it. */
itr_err itr_dist_allreduce_sum(double *buf, int64_t n, MPI_Comm comm, const char *what) {
  const int64_t chunk = (int64_t)1 << 26;
  for (int64_t off = 0; off < n; off += chunk) {
    const int cnt = (int)(n - off < chunk ? n - off : chunk);
    ITR_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf + off, cnt, MPI_DOUBLE, MPI_SUM, comm) == MPI_SUCCESS, ITR_ERR_INTERNAL,
              "MPI_Allreduce of %s failed", what);
  }
  return ITR_OK;
}

itr_err itr_dist_kernel(double alpha, const itr_dist_matrix *A, double beta, itr_dist_matrix *C) {
  ITR_CHECK(C->m == A->m && C->n == A->m && C->grid == A->grid, ITR_ERR_INTERNAL,
            "kernel: C is %d x %d for A %d x %d (C must be %d x %d on A's grid)", C->m, C->n, A->m, A->n, A->m, A->m);
  const int one = 1, n = A->m, d = A->n;
  if (A->grid->size == 1) /* one process: OpenBLAS's dsyrk on the whole matrix (see itr_dist_gram) */
    cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, n, d, alpha, A->a, A->lld, beta, C->a, C->lld);
  else
    pdsyrk_("L", "N", &n, &d, &alpha, A->a, &one, &one, A->desc, &beta, C->a, &one, &one, C->desc);
  return ITR_OK;
}

static int first_row_at_or_below(const itr_dist_matrix *A, int gj) {
  const itr_dist_grid *g = A->grid;
  int lo = 0, hi = A->m_loc;
  while (lo < hi) {
    int mid = lo + (hi - lo) / 2;
    if (l2g(mid, g->mb, g->myrow, g->nprow) < gj)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Local part of sum_ij w_ij A_ij B_ij (B may be NULL: A_ij^2); lower: w = 2 below the diagonal,
 * 1 on it, 0 above; else w = 1. Column by column, the rows below the diagonal are contiguous. */
static double local_dot(const itr_dist_matrix *A, const itr_dist_matrix *B, int lower) {
  const itr_dist_grid *g = A->grid;
  double s = 0.0;
  for (int lc = 0; lc < A->n_loc; lc++) {
    const double *a = A->a + (size_t)lc * A->lld, *b = B ? B->a + (size_t)lc * B->lld : a;
    int li = 0;
    if (lower) {
      const int gj = l2g(lc, g->mb, g->mycol, g->npcol);
      li = first_row_at_or_below(A, gj);
      if (li < A->m_loc && l2g(li, g->mb, g->myrow, g->nprow) == gj) {
        s += a[li] * b[li];
        li++;
      }
    }
    double t = 0.0;
    for (int k = li; k < A->m_loc; k++) t += a[k] * b[k];
    s += lower ? 2.0 * t : t;
  }
  return s;
}

itr_err itr_dist_frob2(const itr_dist_matrix *A, int lower, double *out) {
  double s = local_dot(A, NULL, lower);
  ITR_TRY(sum_over(A->grid->comm, &s));
  *out = s;
  return ITR_OK;
}

itr_err itr_dist_cross_norm2(const itr_dist_matrix *A, const itr_dist_matrix *B, double *out) {
  const itr_dist_grid *g = A->grid;
  ITR_CHECK(A->grid == B->grid && A->m == B->m && A->n == B->n, ITR_ERR_INTERNAL,
            "cross_norm2: A is %d x %d, B %d x %d (expected one shape on one grid)", A->m, A->n, B->m, B->n);
  const int n = A->m, d = A->n;
  itr_dist_matrix K1, K2;
  memset(&K1, 0, sizeof K1);
  memset(&K2, 0, sizeof K2);
  const int kernel = n < d, k = kernel ? n : d;
  itr_err e = itr_dist_matrix_init(&K1, g, k, k);
  if (e == ITR_OK && kernel && A != B) e = itr_dist_matrix_init(&K2, g, k, k);
  e = itr_dist_agree(g->comm, e);
  double s = 0.0;
  if (e == ITR_OK && kernel) { /* ||A^T B||^2 = tr(A^T B B^T A) = <A A^T, B B^T>; A == B: ||A A^T||^2 */
    e = itr_dist_kernel(1.0, A, 0.0, &K1);
    if (e == ITR_OK && A != B) e = itr_dist_kernel(1.0, B, 0.0, &K2);
    if (e == ITR_OK) s = local_dot(&K1, A != B ? &K2 : NULL, 1);
  } else if (e == ITR_OK) {
    e = itr_dist_gram(1.0, A, B, 0.0, &K1);
    s = local_dot(&K1, NULL, A == B); /* A == B: pdsyrk formed the lower triangle only */
  }
  if (e == ITR_OK) e = sum_over(g->comm, &s);
  itr_dist_matrix_fini(&K1);
  itr_dist_matrix_fini(&K2);
  ITR_TRY(e);
  *out = s;
  return ITR_OK;
}

void itr_dist_matrix_add(itr_dist_matrix *C, double alpha, const itr_dist_matrix *A, double off, double shift,
                         int lower) {
  const itr_dist_grid *g = C->grid;
  const double f = alpha * off;
  for (int lc = 0; lc < C->n_loc; lc++) {
    const int gj = l2g(lc, g->mb, g->mycol, g->npcol);
    double *c = C->a + (size_t)lc * C->lld;
    const double *a = A->a + (size_t)lc * A->lld;
    const int li0 = first_row_at_or_below(C, gj); /* rows [0, li0) are above the diagonal */
    if (!lower)
      for (int li = 0; li < li0; li++) c[li] += f * a[li];
    int li = li0;
    if (li < C->m_loc && l2g(li, g->mb, g->myrow, g->nprow) == gj) {
      c[li] += alpha * a[li] + shift;
      li++;
    }
    for (; li < C->m_loc; li++) c[li] += f * a[li];
  }
}

itr_err itr_dist_matrix_diag(const itr_dist_matrix *A, double *diag) {
  const itr_dist_grid *g = A->grid;
  const int d = A->m < A->n ? A->m : A->n;
  memset(diag, 0, sizeof(double) * (size_t)d);
  for (int lc = 0; lc < A->n_loc; lc++) {
    const int gj = l2g(lc, g->mb, g->mycol, g->npcol);
    for (int li = 0; li < A->m_loc; li++)
      if (l2g(li, g->mb, g->myrow, g->nprow) == gj) diag[gj] = A->a[(size_t)lc * A->lld + li];
  }
  ITR_CHECK(MPI_Allreduce(MPI_IN_PLACE, diag, d, MPI_DOUBLE, MPI_SUM, g->comm) == MPI_SUCCESS, ITR_ERR_INTERNAL,
            "MPI_Allreduce of a diagonal failed");
  return ITR_OK;
}

itr_err itr_dist_matrix_to_group(const itr_dist_matrix *A, const itr_dist_grid *parent, int g, int n_groups,
                                 itr_dist_matrix *B) {
  itr_err e = ITR_OK;
  if (A->grid != parent || g < 0 || g >= n_groups)
    e = itr_error_set(ITR_ERR_INTERNAL, "to_group: A is not on the parent grid, or group %d of %d", g, n_groups);
  else if (B && (B->m != A->m || B->n != A->n || !B->grid->is_sub))
    e = itr_error_set(ITR_ERR_INTERNAL, "to_group: B is %d x %d, A %d x %d (B must be on a group grid)", B->m, B->n,
                      A->m, A->n);
  e = itr_dist_agree(parent->comm, e);
  if (e != ITR_OK) return itr_error_frame(e, __func__, __FILE__, __LINE__);
  /* a rank outside group g describes B with context -1, as pdgemr2d asks */
  int none[ITR_DLEN] = {1, -1, A->m, A->n, parent->mb, parent->mb, 0, 0, 1};
  double dummy = 0.0;
  const int one = 1;
  pdgemr2d_(&A->m, &A->n, A->a, &one, &one, A->desc, B ? B->a : &dummy, &one, &one, B ? B->desc : none,
            &parent->ctxt);
  return ITR_OK;
}

int itr_dist_global_row(const itr_dist_matrix *A, int li) { return l2g(li, A->grid->mb, A->grid->myrow, A->grid->nprow); }
int itr_dist_global_col(const itr_dist_matrix *A, int lc) { return l2g(lc, A->grid->mb, A->grid->mycol, A->grid->npcol); }
