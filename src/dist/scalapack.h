/* Private: the BLACS and ScaLAPACK prototypes iteris-mpi calls. Debian's ScaLAPACK 2.2.1
 * (libscalapack-openmpi, LP64: Fortran INTEGER is a C int) ships no C header, so they are
 * declared here, once. Only src/dist includes this file.
 *
 * Descriptor (int desc[9], ScaLAPACK's DLEN_ = 9), entries by index:
 *   0 DTYPE (1 = dense)  1 CTXT  2 M  3 N  4 MB  5 NB  6 RSRC  7 CSRC  8 LLD
 * Local storage is column-major: global (i, j) owned by this process sits at a[li + lj * LLD]. */
#ifndef ITERIS_DIST_SCALAPACK_H
#define ITERIS_DIST_SCALAPACK_H

#include <mpi.h>

enum { ITR_DLEN = 9 };

/* ---- BLACS (C interface) ------------------------------------------------------------------ */
void Cblacs_pinfo(int *mypnum, int *nprocs);
int Csys2blacs_handle(MPI_Comm comm);
void Cfree_blacs_system_handle(int handle);
void Cblacs_gridinit(int *ctxt, const char *order, int nprow, int npcol);
/* usermap column-major (ldumap x npcol): the system process number at each grid position. Called
 * by every process of the system context; one outside the map gets a context it is not in. */
void Cblacs_gridmap(int *ctxt, int *usermap, int ldumap, int nprow, int npcol);
void Cblacs_gridinfo(int ctxt, int *nprow, int *npcol, int *myrow, int *mycol);
void Cblacs_gridexit(int ctxt);

/* ---- tools -------------------------------------------------------------------------------- */
int numroc_(const int *n, const int *nb, const int *iproc, const int *isrcproc, const int *nprocs);
void descinit_(int *desc, const int *m, const int *n, const int *mb, const int *nb, const int *irsrc,
               const int *icsrc, const int *ictxt, const int *lld, int *info);

/* ---- factor / solve ----------------------------------------------------------------------- */
void pdpotrf_(const char *uplo, const int *n, double *a, const int *ia, const int *ja, const int *desca,
              int *info);
void pdpotrs_(const char *uplo, const int *n, const int *nrhs, const double *a, const int *ia,
              const int *ja, const int *desca, double *b, const int *ib, const int *jb, const int *descb,
              int *info);

/* ---- PBLAS and norms (residuals) ---------------------------------------------------------- */
void pdgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k,
             const double *alpha, const double *a, const int *ia, const int *ja, const int *desca,
             const double *b, const int *ib, const int *jb, const int *descb, const double *beta, double *c,
             const int *ic, const int *jc, const int *descc);
void pdsymm_(const char *side, const char *uplo, const int *m, const int *n, const double *alpha,
             const double *a, const int *ia, const int *ja, const int *desca, const double *b, const int *ib,
             const int *jb, const int *descb, const double *beta, double *c, const int *ic, const int *jc,
             const int *descc);
void pdsyrk_(const char *uplo, const char *trans, const int *n, const int *k, const double *alpha,
             const double *a, const int *ia, const int *ja, const int *desca, const double *beta, double *c,
             const int *ic, const int *jc, const int *descc);
double pdlange_(const char *norm, const int *m, const int *n, const double *a, const int *ia, const int *ja,
                const int *desca, double *work);
double pdlansy_(const char *norm, const char *uplo, const int *n, const double *a, const int *ia,
                const int *ja, const int *desca, double *work);

/* ---- redistribution between grids (context ictxt must contain every process of both) ---- */
void pdgemr2d_(const int *m, const int *n, const double *a, const int *ia, const int *ja, const int *desca,
               double *b, const int *ib, const int *jb, const int *descb, const int *ictxt);

#endif
