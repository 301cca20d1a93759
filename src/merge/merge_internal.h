/* Private helpers of the merge layer (defined in update.c). */
#ifndef ITERIS_MERGE_INTERNAL_H
#define ITERIS_MERGE_INTERNAL_H

#include "iteris/merge.h"

/* Thin QR of a (m, n) row-major f64: *q (m, kq), *r (kq, n) upper trapezoidal, kq = min(m, n). */
itr_err itr_thin_qr(int64_t m, int64_t n, const double *a, double **q, double **r);
/* Thin SVD of a (m, n) row-major f64 (a is destroyed): *u (m, p), *s (p), *vt (p, n), p = min(m, n). */
itr_err itr_thin_svd(int64_t m, int64_t n, double *a, double **u, double **s, double **vt);

#endif
