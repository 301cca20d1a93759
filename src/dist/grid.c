/* BLACS process grids on any communicator (sub-communicators included). */
#include <stdlib.h>

#include "dist/scalapack.h"
#include "iteris/dist.h"

void itr_dist_grid_shape(int size, int *nprow, int *npcol) {
  int r = 1;
  for (int d = 1; (long)d * d <= size; d++)
    if (size % d == 0) r = d;
  *nprow = r;
  *npcol = size / r;
}

itr_err itr_dist_grid_create(MPI_Comm comm, int mb, itr_dist_grid **out) {
  return itr_dist_grid_create_shape(comm, mb, 0, out);
}

itr_err itr_dist_grid_create_shape(MPI_Comm comm, int mb, int rows, itr_dist_grid **out) {
  ITR_CHECK(comm != MPI_COMM_NULL, ITR_ERR_INTERNAL,
            "itr_dist_grid_create: the communicator is MPI_COMM_NULL (a rank outside the process "
            "group called it)");
  int size = 1, rank = 0;
  MPI_Comm_size(comm, &size);
  MPI_Comm_rank(comm, &rank);
  if (mb <= 0) mb = ITR_DIST_MB_DEFAULT;
  ITR_CHECK(rows <= 0 || size % rows == 0, ITR_ERR_INPUT,
            "-grid_rows %d does not divide the %d ranks: give a divisor of the rank count (process rows of the "
            "ScaLAPACK grid), or 0 for the squarest grid",
            rows, size);
  itr_dist_grid *g = NULL;
  itr_err e = itr_calloc(1, sizeof *g, "BLACS grid", &g);
  e = itr_dist_agree(comm, e);
  if (e != ITR_OK) {
    free(g);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  /* Block sizes must agree, or descriptors of different ranks would describe different layouts. */
  int mb_range[2] = {mb, -mb}, mb_all[2];
  MPI_Allreduce(mb_range, mb_all, 2, MPI_INT, MPI_MAX, comm);
  if (mb_all[0] != -mb_all[1]) {
    free(g);
    return itr_error_set(ITR_ERR_INTERNAL,
                         "itr_dist_grid_create: block size mb differs between ranks (from %d to %d); it "
                         "must be the same on all ranks",
                         -mb_all[1], mb_all[0]);
  }

  MPI_Comm_dup(comm, &g->comm);
  g->rank = rank;
  g->size = size;
  g->mb = mb;
  itr_dist_grid_shape(size, &g->nprow, &g->npcol);
  if (rows > 0) g->nprow = rows, g->npcol = size / rows;
  /* The system handle is only needed by gridinit (which builds its own communicators from it),
   * so it is released at once: BLACS compacts its handle table on free, which would renumber
   * handles kept for later. */
  int handle = Csys2blacs_handle(g->comm);
  g->ctxt = handle;
  Cblacs_gridinit(&g->ctxt, "Row", g->nprow, g->npcol);
  Cfree_blacs_system_handle(handle);
  int nprow = 0, npcol = 0;
  Cblacs_gridinfo(g->ctxt, &nprow, &npcol, &g->myrow, &g->mycol);
  itr_err ge = ITR_OK;
  if (nprow != g->nprow || npcol != g->npcol || g->myrow * g->npcol + g->mycol != rank)
    ge = itr_error_set(ITR_ERR_INTERNAL,
                       "BLACS grid: rank %d got position (%d, %d) in a %d x %d grid, expected (%d, %d) in "
                       "%d x %d",
                       rank, g->myrow, g->mycol, nprow, npcol, rank / g->npcol, rank % g->npcol, g->nprow,
                       g->npcol);
  ge = itr_dist_agree(g->comm, ge);
  if (ge != ITR_OK) {
    itr_dist_grid_destroy(g);
    return itr_error_frame(ge, __func__, __FILE__, __LINE__);
  }
  *out = g;
  return ITR_OK;
}

int itr_dist_group_first(int g, int n_groups, int size) {
  int r = 0;
  while (r < size && (int)((long)r * n_groups / size) < g) r++;
  return r;
}

itr_err itr_dist_grid_split(const itr_dist_grid *parent, int n_groups, itr_dist_grid **out, int *group) {
  const int size = parent->size, rank = parent->rank;
  ITR_CHECK(n_groups >= 1 && n_groups <= size, ITR_ERR_INTERNAL, "itr_dist_grid_split: %d groups of %d ranks",
            n_groups, size);
  const int mine = (int)((long)rank * n_groups / size);
  itr_dist_grid *g = NULL;
  int *map = NULL;
  itr_err e = itr_calloc(1, sizeof *g, "BLACS group grid", &g);
  if (e == ITR_OK) e = itr_calloc((size_t)size, sizeof(int), "BLACS group map", &map);
  e = itr_dist_agree(parent->comm, e);
  if (e != ITR_OK) {
    free(g);
    free(map);
    return itr_error_frame(e, __func__, __FILE__, __LINE__);
  }
  MPI_Comm_split(parent->comm, mine, rank, &g->comm);
  MPI_Comm_rank(g->comm, &g->rank);
  MPI_Comm_size(g->comm, &g->size);
  g->mb = parent->mb;
  g->ctxt = -1;
  g->is_sub = 1;
  itr_dist_grid_shape(g->size, &g->nprow, &g->npcol);
  /* Every group's grid is mapped by every rank (gridmap is collective over the system context):
   * the process numbers are the parent's ranks, which is what pdgemr2d needs. */
  int handle = Csys2blacs_handle(parent->comm);
  for (int q = 0; q < n_groups; q++) {
    int first = itr_dist_group_first(q, n_groups, size), n = itr_dist_group_first(q + 1, n_groups, size) - first;
    int pr = 0, pc = 0;
    itr_dist_grid_shape(n, &pr, &pc);
    for (int i = 0; i < pr; i++) /* row-major ranks, column-major map */
      for (int j = 0; j < pc; j++) map[i + j * pr] = first + i * pc + j;
    int ctxt = handle;
    Cblacs_gridmap(&ctxt, map, pr, pr, pc);
    if (q == mine) g->ctxt = ctxt;
  }
  Cfree_blacs_system_handle(handle);
  free(map);
  int nprow = 0, npcol = 0;
  Cblacs_gridinfo(g->ctxt, &nprow, &npcol, &g->myrow, &g->mycol);
  itr_err ge = ITR_OK;
  if (nprow != g->nprow || npcol != g->npcol || g->myrow * g->npcol + g->mycol != g->rank)
    ge = itr_error_set(ITR_ERR_INTERNAL, "BLACS group grid: rank %d of group %d got (%d, %d) in %d x %d", g->rank, mine,
                       g->myrow, g->mycol, nprow, npcol);
  ge = itr_dist_agree(parent->comm, ge);
  if (ge != ITR_OK) {
    itr_dist_grid_destroy(g);
    return itr_error_frame(ge, __func__, __FILE__, __LINE__);
  }
  *out = g;
  *group = mine;
  return ITR_OK;
}

void itr_dist_grid_destroy(itr_dist_grid *grid) {
  itr_dist_scratch_release();
  if (!grid) return;
  if (grid->myrow >= 0) Cblacs_gridexit(grid->ctxt);
  MPI_Comm_free(&grid->comm);
  free(grid);
}
