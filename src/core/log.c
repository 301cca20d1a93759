/* Line-oriented logging to stderr with a per-process label. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "iteris/core.h"

static itr_log_level level_ = ITR_LOG_INFO;
static char label_[128];
static int quiet_;

void itr_log_set_level(itr_log_level level) { level_ = level; }
void itr_log_set_quiet(int quiet) { quiet_ = quiet; }
void itr_log_set_label(const char *label) {
  snprintf(label_, sizeof label_, "%s", label ? label : "");
}

void itr_log(itr_log_level level, const char *fmt, ...) {
  if (level > level_) return;
  if (quiet_ && level >= ITR_LOG_INFO) return;
  char line[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  static const char *tag[] = {"error: ", "warning: ", "", ""};
  /* one fprintf per line keeps ranks' lines from interleaving mid-line */
  fprintf(stderr, "%s%s%s%s\n", label_, label_[0] ? " " : "", tag[level], line);
  fflush(stderr);
}
