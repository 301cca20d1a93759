/* Private helpers shared by the safetensors files of src/io (not part of the public API). */
#ifndef ITERIS_IO_ST_INTERNAL_H
#define ITERIS_IO_ST_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "iteris/io.h"

/* Largest JSON header (or index file) the readers accept: a sane cap against hostile lengths. */
#define ITR_ST_HEADER_CAP ((uint64_t)100 << 20)

/* "(2, 3, 4)" into buf (always terminated; "()" for a scalar). */
void itr_st_format_shape(int ndim, const int64_t *shape, char *buf, size_t len);
/* *out = an itr_calloc'd copy of s ("what" names it for an out-of-memory message). */
itr_err itr_st_strdup(const char *s, const char *what, char **out);

#endif
