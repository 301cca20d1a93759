/* Agreement points: all ranks go on, or all stop with the same error and the same message. */
#include <stdio.h>
#include <string.h>

#include "iteris/dist.h"

/* core keeps messages below 8 KiB; a longer one is cut (the headline comes first). */
#define AGREE_MSG_CAP 8192

/* prefix: name the rank that saw the error ("rank r of P", in MPI_COMM_WORLD's numbering, so that
 * a message from a sub-communicator names the process the user sees in the logs). */
static itr_err agree(MPI_Comm comm, itr_err local, int prefix) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  /* MPI_MAXLOC: the largest code and, on ties, the lowest rank holding it. */
  struct {
    int code, rank;
  } mine = {(int)local, rank}, worst;
  MPI_Allreduce(&mine, &worst, 1, MPI_2INT, MPI_MAXLOC, comm);
  if (worst.code == ITR_OK) return ITR_OK;

  /* The chosen rank broadcasts its message: length first, then the bytes. A fixed buffer on
   * every rank, so that no local allocation failure can break the collective sequence. */
  char msg[AGREE_MSG_CAP];
  int len = 0;
  if (rank == worst.rank) {
    const char *own = itr_error_message();
    size_t n = strlen(own);
    len = (int)(n < sizeof msg - 1 ? n : sizeof msg - 1);
    memcpy(msg, own, (size_t)len);
  }
  MPI_Bcast(&len, 1, MPI_INT, worst.rank, comm);
  MPI_Bcast(msg, len, MPI_CHAR, worst.rank, comm);
  msg[len] = '\0';
  itr_err code = (itr_err)worst.code;
  int wrank = worst.rank, wsize = size;
  MPI_Comm_size(MPI_COMM_WORLD, &wsize);
  int r0 = 0, p0 = 0, named = 0;
  /* a message agreed before in a sub-communicator names its rank already */
  if (sscanf(msg, "rank %d of %d: %n", &r0, &p0, &named) == 2 && named > 0) prefix = 0;
  if (!prefix || wsize == 1) return itr_error_set(code, "%s", msg);
  MPI_Group g, wg;
  if (MPI_Comm_group(comm, &g) == MPI_SUCCESS) {
    if (MPI_Comm_group(MPI_COMM_WORLD, &wg) == MPI_SUCCESS) {
      int r = MPI_UNDEFINED;
      if (MPI_Group_translate_ranks(g, 1, &worst.rank, wg, &r) == MPI_SUCCESS && r != MPI_UNDEFINED) wrank = r;
      MPI_Group_free(&wg);
    }
    MPI_Group_free(&g);
  }
  return itr_error_set(code, "rank %d of %d: %s", wrank, wsize, msg);
}

itr_err itr_dist_agree(MPI_Comm comm, itr_err local) { return agree(comm, local, 1); }

itr_err itr_dist_agree_relayed(MPI_Comm comm, itr_err local) { return agree(comm, local, 0); }
