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
  ITR_CHECK(stat(partial, &sb) == 0 && S_ISDIR(sb.st_mode), ITR_ERR_INTERNAL,
            "cannot publish '%s': the finished folder '%s' is not there", out, partial);
  const int had_old = lstat(out, &sb) == 0;
  if (had_old) ITR_CHECK(rename(out, old) == 0, ITR_ERR_INTERNAL, "cannot move the old '%s' aside: %s", out, strerror(errno));
  if (rename(partial, out) != 0) {
    const int err = errno;
    if (had_old) (void)rename(old, out); /* put the old one back: OUT is either old or new, never missing */
    return itr_error_set(ITR_ERR_INTERNAL, "cannot rename '%s' to '%s': %s", partial, out, strerror(err));
  }
  if (had_old) ITR_TRY(itr_iofile_remove_tree(old));
  return ITR_OK;
}
