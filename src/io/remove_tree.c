/* Output folders: recursive removal (OUT.partial, a replaced OUT) and the final rename of OUT.partial to OUT. */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

itr_err itr_iofile_commit_dir(const char *partial, const char *out) {
  char old[ITR_PATH_MAX + 32];
  snprintf(old, sizeof old, "%s.old.%ld", out, (long)getpid());
  struct stat sb;
  const int had_old = lstat(out, &sb) == 0;
  if (had_old) ITR_CHECK(rename(out, old) == 0, ITR_ERR_INTERNAL, "cannot move the old '%s' aside: %s", out, strerror(errno));
  ITR_CHECK(rename(partial, out) == 0, ITR_ERR_INTERNAL, "cannot rename '%s' to '%s': %s", partial, out,
            strerror(errno));
  if (had_old) ITR_TRY(itr_iofile_remove_tree(old));
  return ITR_OK;
}
