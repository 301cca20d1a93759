/* Small serial HDF5 files: checkpoints and statistics. Errors name the file and the dataset. */
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iteris/io.h"

struct itr_h5 {
  hid_t file;
  int writable;
  char path[ITR_PATH_MAX];
  char tmp[ITR_PATH_MAX + 32];
};

static void quiet_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

itr_err itr_h5_create(const char *path, itr_h5 **out) {
  quiet_hdf5();
  ITR_CHECK(strlen(path) < ITR_PATH_MAX, ITR_ERR_INPUT, "HDF5 path too long: %s", path);
  itr_h5 *h = NULL;
  ITR_TRY(itr_calloc(1, sizeof *h, "HDF5 file handle", &h));
  snprintf(h->path, sizeof h->path, "%s", path);
  snprintf(h->tmp, sizeof h->tmp, "%s.tmp.%ld", path, (long)getpid());
  h->writable = 1;
  h->file = H5Fcreate(h->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (h->file < 0) {
    free(h);
    return itr_error_set(ITR_ERR_INPUT, "cannot create HDF5 file '%s' (is the folder writable?)", path);
  }
  *out = h;
  return ITR_OK;
}

itr_err itr_h5_open(const char *path, itr_h5 **out) {
  quiet_hdf5();
  ITR_CHECK(strlen(path) < ITR_PATH_MAX, ITR_ERR_INPUT, "HDF5 path too long: %s", path);
  ITR_CHECK(access(path, R_OK) == 0, ITR_ERR_INPUT, "cannot read HDF5 file '%s'", path);
  itr_h5 *h = NULL;
  ITR_TRY(itr_calloc(1, sizeof *h, "HDF5 file handle", &h));
  snprintf(h->path, sizeof h->path, "%s", path);
  h->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (h->file < 0) {
    free(h);
    return itr_error_set(ITR_ERR_INPUT, "'%s' is not a readable HDF5 file", path);
  }
  *out = h;
  return ITR_OK;
}

itr_err itr_h5_close(itr_h5 *h, int commit) {
  if (!h) return ITR_OK;
  itr_err e = ITR_OK;
  if (h->writable && H5Fflush(h->file, H5F_SCOPE_GLOBAL) < 0)
    e = itr_error_set(ITR_ERR_INTERNAL, "cannot flush HDF5 file '%s' (disk full?)", h->path);
  if (H5Fclose(h->file) < 0 && e == ITR_OK)
    e = itr_error_set(ITR_ERR_INTERNAL, "cannot close HDF5 file '%s'", h->path);
  if (h->writable) {
    if (commit && e == ITR_OK) {
      if (rename(h->tmp, h->path) != 0)
        e = itr_error_set(ITR_ERR_INTERNAL, "cannot rename '%s' to '%s'", h->tmp, h->path);
    } else {
      remove(h->tmp);
    }
  }
  free(h);
  return e;
}

itr_err itr_h5_write_f64(itr_h5 *h, const char *name, int ndim, const int64_t *dims, const double *data) {
  ITR_CHECK(h->writable, ITR_ERR_INTERNAL, "HDF5 file '%s' is open read-only", h->path);
  ITR_CHECK(ndim >= 0 && ndim <= ITR_MAX_DIMS, ITR_ERR_INTERNAL, "dataset '%s': %d dimensions", name, ndim);
  hsize_t hd[ITR_MAX_DIMS];
  for (int k = 0; k < ndim; k++) hd[k] = (hsize_t)dims[k];
  hid_t space = H5Screate_simple(ndim, hd, NULL);
  hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  hid_t ds = H5Dcreate2(h->file, name, H5T_IEEE_F64LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
  herr_t st = ds >= 0 ? H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) : -1;
  if (ds >= 0) H5Dclose(ds);
  H5Pclose(lcpl);
  H5Sclose(space);
  ITR_CHECK(st >= 0, ITR_ERR_INTERNAL, "cannot write dataset '%s' to '%s' (disk full?)", name, h->path);
  return ITR_OK;
}

int itr_h5_has(itr_h5 *h, const char *name) {
  /* check each prefix: H5Lexists fails when an intermediate group is missing */
  char buf[512];
  snprintf(buf, sizeof buf, "%s", name);
  for (char *p = buf; (p = strchr(p + 1, '/'));) {
    *p = '\0';
    if (H5Lexists(h->file, buf, H5P_DEFAULT) <= 0) return 0;
    *p = '/';
  }
  return H5Lexists(h->file, buf, H5P_DEFAULT) > 0;
}

itr_err itr_h5_shape(itr_h5 *h, const char *name, int *ndim, int64_t *dims) {
  ITR_CHECK(itr_h5_has(h, name), ITR_ERR_INPUT, "'%s' has no dataset '%s'", h->path, name);
  hid_t ds = H5Dopen2(h->file, name, H5P_DEFAULT);
  ITR_CHECK(ds >= 0, ITR_ERR_INPUT, "'%s': cannot open dataset '%s'", h->path, name);
  hid_t space = H5Dget_space(ds);
  int n = H5Sget_simple_extent_ndims(space);
  hsize_t hd[ITR_MAX_DIMS];
  int ok = n >= 0 && n <= ITR_MAX_DIMS && H5Sget_simple_extent_dims(space, hd, NULL) == n;
  H5Sclose(space);
  H5Dclose(ds);
  ITR_CHECK(ok, ITR_ERR_INPUT, "'%s': dataset '%s' has an unsupported shape", h->path, name);
  *ndim = n;
  for (int k = 0; k < n; k++) dims[k] = (int64_t)hd[k];
  return ITR_OK;
}

itr_err itr_h5_read_f64(itr_h5 *h, const char *name, int ndim, const int64_t *dims, double *data) {
  int n;
  int64_t got[ITR_MAX_DIMS];
  ITR_TRY(itr_h5_shape(h, name, &n, got));
  int same = n == ndim;
  for (int k = 0; same && k < n; k++) same = got[k] == dims[k];
  ITR_CHECK(same, ITR_ERR_INPUT, "'%s': dataset '%s' has %d dimensions (first %lld), expected %d (first %lld)",
            h->path, name, n, n ? (long long)got[0] : 0LL, ndim, ndim ? (long long)dims[0] : 0LL);
  hid_t ds = H5Dopen2(h->file, name, H5P_DEFAULT);
  herr_t st = ds >= 0 ? H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) : -1;
  if (ds >= 0) H5Dclose(ds);
  ITR_CHECK(st >= 0, ITR_ERR_INPUT, "'%s': cannot read dataset '%s'", h->path, name);
  return ITR_OK;
}

itr_err itr_h5_read_rows_f64(itr_h5 *h, const char *name, int64_t row0, int64_t nrows, int64_t ncols,
                             double *data) {
  int n;
  int64_t got[ITR_MAX_DIMS];
  ITR_TRY(itr_h5_shape(h, name, &n, got));
  ITR_CHECK(n == 2 && got[1] == ncols && row0 >= 0 && nrows >= 0 && row0 + nrows <= got[0], ITR_ERR_INPUT,
            "'%s': dataset '%s' has no rows [%lld, %lld) of %lld columns", h->path, name, (long long)row0,
            (long long)(row0 + nrows), (long long)ncols);
  if (nrows == 0) return ITR_OK;
  hid_t ds = H5Dopen2(h->file, name, H5P_DEFAULT);
  hid_t fs = ds >= 0 ? H5Dget_space(ds) : -1;
  hsize_t start[2] = {(hsize_t)row0, 0}, count[2] = {(hsize_t)nrows, (hsize_t)ncols};
  hid_t ms = H5Screate_simple(2, count, NULL);
  herr_t st = fs >= 0 ? H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
  if (st >= 0) st = H5Dread(ds, H5T_NATIVE_DOUBLE, ms, fs, H5P_DEFAULT, data);
  if (ms >= 0) H5Sclose(ms);
  if (fs >= 0) H5Sclose(fs);
  if (ds >= 0) H5Dclose(ds);
  ITR_CHECK(st >= 0, ITR_ERR_INPUT, "'%s': cannot read rows [%lld, %lld) of dataset '%s'", h->path, (long long)row0,
            (long long)(row0 + nrows), name);
  return ITR_OK;
}

itr_err itr_h5_set_attr(itr_h5 *h, const char *key, const char *value) {
  hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, strlen(value) + 1);
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t at = H5Acreate2(h->file, key, type, space, H5P_DEFAULT, H5P_DEFAULT);
  herr_t st = at >= 0 ? H5Awrite(at, type, value) : -1;
  if (at >= 0) H5Aclose(at);
  H5Sclose(space);
  H5Tclose(type);
  ITR_CHECK(st >= 0, ITR_ERR_INTERNAL, "cannot write attribute '%s' to '%s'", key, h->path);
  return ITR_OK;
}

itr_err itr_h5_get_attr(itr_h5 *h, const char *key, char *buf, size_t len) {
  ITR_CHECK(H5Aexists(h->file, key) > 0, ITR_ERR_INPUT, "'%s' has no attribute '%s'", h->path, key);
  hid_t at = H5Aopen(h->file, key, H5P_DEFAULT);
  hid_t type = H5Aget_type(at);
  size_t sz = H5Tget_size(type);
  int ok = H5Tget_class(type) == H5T_STRING && sz < len;
  herr_t st = -1;
  if (ok) {
    hid_t mem = H5Tcopy(H5T_C_S1);
    H5Tset_size(mem, sz);
    st = H5Aread(at, mem, buf);
    H5Tclose(mem);
    buf[sz] = '\0';
  }
  H5Tclose(type);
  H5Aclose(at);
  ITR_CHECK(ok && st >= 0, ITR_ERR_INPUT, "'%s': attribute '%s' is not a string of fewer than %zu bytes", h->path, key,
            len);
  return ITR_OK;
}
