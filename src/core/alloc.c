/* Checked allocation with overflow checks and fault injection (fail the k-th allocation). */
#include <stdlib.h>

#include "iteris/core.h"

static long fail_after_; /* 0: off; k: the k-th allocation from now fails */

void itr_alloc_fail_after(long k) { fail_after_ = k; }

int itr_mul_size(size_t a, size_t b, size_t *out) {
  if (a != 0 && b > SIZE_MAX / a) return 0;
  *out = a * b;
  return 1;
}

itr_err itr_calloc(size_t n, size_t size, const char *what, void *out) {
  size_t bytes;
  if (!itr_mul_size(n, size, &bytes))
    return itr_error_set(ITR_ERR_INPUT, "allocation of %s overflows: %zu x %zu bytes", what, n, size);
  if (fail_after_ > 0 && --fail_after_ == 0)
    return itr_error_set(ITR_ERR_INTERNAL, "out of memory allocating %s (%zu bytes; injected fault)",
                         what, bytes);
  void *p = calloc(bytes ? bytes : 1, 1);
  if (!p) return itr_error_set(ITR_ERR_INTERNAL, "out of memory allocating %s (%zu bytes)", what, bytes);
  *(void **)out = p;
  return ITR_OK;
}
