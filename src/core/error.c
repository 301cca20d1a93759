/* Error messages with a traceback, one per thread. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "iteris/core.h"

#define ITR_MSG_CAP 8192
static _Thread_local char msg_[ITR_MSG_CAP];
static _Thread_local size_t msg_len_;

itr_err itr_error_set(itr_err code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(msg_, sizeof msg_, fmt, ap);
  va_end(ap);
  msg_len_ = n < 0 ? 0 : ((size_t)n >= sizeof msg_ ? sizeof msg_ - 1 : (size_t)n);
  return code;
}

itr_err itr_error_frame(itr_err code, const char *func, const char *file, int line) {
  if (msg_len_ + 1 < sizeof msg_) {
    const char *base = strrchr(file, '/');
    int n = snprintf(msg_ + msg_len_, sizeof msg_ - msg_len_, "\n  in %s (%s:%d)", func,
                     base ? base + 1 : file, line);
    if (n > 0) msg_len_ += (size_t)n;
    if (msg_len_ >= sizeof msg_) msg_len_ = sizeof msg_ - 1;
  }
  return code;
}

const char *itr_error_message(void) { return msg_; }

void itr_error_headline(char *buf, size_t len) {
  if (len == 0) return;
  size_t n = strcspn(msg_, "\n");
  if (n >= len) n = len - 1;
  memcpy(buf, msg_, n);
  buf[n] = '\0';
}

void itr_error_clear(void) {
  msg_[0] = '\0';
  msg_len_ = 0;
}

int itr_exit_code(itr_err code) {
  switch (code) {
    case ITR_OK: return 0;
    case ITR_ERR_INPUT: return 2;
    case ITR_ERR_NUMERIC: return 3;
    case ITR_ERR_INTERRUPTED: return 5;
    default: return 4;
  }
}

const char *itr_err_name(itr_err code) {
  switch (code) {
    case ITR_OK: return "ok";
    case ITR_ERR_INPUT: return "input error";
    case ITR_ERR_NUMERIC: return "numerical error";
    case ITR_ERR_INTERRUPTED: return "interrupted";
    default: return "internal error";
  }
}
