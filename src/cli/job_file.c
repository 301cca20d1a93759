/* Job files (-options_file F.yaml), checked line by line before PETSc reads them: PETSc's own errors
 * in an options file end in a 3 KB banner and a hang or an improper exit, without the file's name.
 * Job files are flat: in YAML (.yaml, .yml) one "key: value" per line (a value may be a [list] on
 * that line), otherwise PETSc's "-key value" lines; '#' starts a comment. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/options.h"

int itr_job_file_check(const char *path, char *msg, size_t cap) {
  struct stat sb;
  msg[0] = 0;
  FILE *f = NULL;
  if (stat(path, &sb) != 0 || access(path, R_OK) != 0)
    snprintf(msg, cap, "cannot read the job file '%s'. Check the path (jobs/ holds examples)", path);
  else if (!S_ISREG(sb.st_mode))
    snprintf(msg, cap, "the job file '%s' is not a regular file (a folder?): give a .yaml job file", path);
  else if (!(f = fopen(path, "rb")))
    snprintf(msg, cap, "cannot open the job file '%s': %s", path, strerror(errno));
  const size_t n = strlen(path);
  const int yaml = (n > 5 && !strcmp(path + n - 5, ".yaml")) || (n > 4 && !strcmp(path + n - 4, ".yml"));
  char line[8192];
  for (long lineno = 1; f && !msg[0] && fgets(line, sizeof line, f); lineno++) {
    size_t len = strlen(line);
    if (len == sizeof line - 1 && line[len - 1] != '\n') {
      snprintf(msg, cap, "job file '%s', line %ld: longer than %zu bytes", path, lineno, sizeof line - 2);
      break;
    }
    for (size_t q = 0; q < len && !msg[0]; q++) {
      const unsigned char ch = (unsigned char)line[q];
      if (ch < 0x20 && ch != '\t' && ch != '\n' && ch != '\r')
        snprintf(msg, cap, "job file '%s', line %ld, column %zu: byte 0x%02x is not text", path, lineno, q + 1, ch);
    }
    if (msg[0]) break;
    char *hash = strchr(line, '#');
    if (hash && (hash == line || hash[-1] == ' ' || hash[-1] == '\t')) *hash = 0;
    len = strlen(line);
    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
      line[--len] = 0;
    size_t lead = strspn(line, " \t");
    if (lead == len) continue; /* blank or comment */
    if (!yaml) {
      if (line[lead] != '-')
        snprintf(msg, cap, "job file '%s', line %ld: '%.60s' is not an option (PETSc job files hold "
                 "'-key value' lines; YAML job files end in .yaml)", path, lineno, line + lead);
      continue;
    }
    if (lead > 0) {
      snprintf(msg, cap, "job file '%s', line %ld: indented with %s; job files are flat 'key: value' lines",
               path, lineno, strchr(line, '\t') && (size_t)(strchr(line, '\t') - line) < lead ? "a tab" : "spaces");
      continue;
    }
    size_t key = strspn(line, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_");
    if (key == 0 || line[key] != ':' || (line[key + 1] && line[key + 1] != ' ' && line[key + 1] != '\t')) {
      snprintf(msg, cap, "job file '%s', line %ld: '%.60s' is not a 'key: value' line", path, lineno, line);
      continue;
    }
    const char *v = line + key + 1 + strspn(line + key + 1, " \t");
    const size_t vl = strlen(v);
    if ((v[0] == '[') != (vl > 0 && v[vl - 1] == ']') || (v[0] == '{') != (vl > 0 && v[vl - 1] == '}') ||
        ((v[0] == '"' || v[0] == '\'') && (vl < 2 || v[vl - 1] != v[0])))
      snprintf(msg, cap, "job file '%s', line %ld: the value of '%.*s' is not closed ('%.40s')", path, lineno,
               (int)key, line, v);
  }
  if (f) fclose(f);
  return msg[0] != 0;
}

