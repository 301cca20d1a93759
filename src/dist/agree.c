/* Agreement points: all ranks go on, or all stop with the same error and the same message. */
#include <stdio.h>
#include <string.h>

#include "iteris/dist.h"

/* core keeps messages below 8 KiB; a longer one is cut (the headline comes first). */
#define AGREE_MSG_CAP 8192

itr_err itr_dist_agree(MPI_Comm comm, itr_err local) {
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
  if (size > 1) return itr_error_set(code, "rank %d of %d: %s", worst.rank, size, msg);
  return itr_error_set(code, "%s", msg);
}
