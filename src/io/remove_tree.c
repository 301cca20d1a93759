/* Recursive removal of an output folder (OUT.partial, a replaced OUT). */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "iteris/io.h"

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(path) == 0 ? 0 : -1;
}

itr_err itr_iofile_remove_tree(const char *dir) {
  struct stat sb;
  if (lstat(dir, &sb) != 0 && errno == ENOENT) return ITR_OK;
  ITR_CHECK(nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS) == 0, ITR_ERR_INTERNAL,
            "could not remove '%s': %s", dir, strerror(errno));
  return ITR_OK;
}
