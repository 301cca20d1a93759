/* libFuzzer: a YAML job file as `srun iteris-mpi -options_file F.yaml` reads it: the line check
 * (src/cli/job_file.c) and, for a file it accepts, PETSc's reader and the option table
 * (itr_options_parse), as main() does. PETSc starts once (one process, MPI singleton); its options
 * are cleared between inputs. */
#include <petscsys.h>

#include "cli/options.h"
#include "fuzz_common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  static char *args[] = {"fuzz_job_file", NULL};
  int one = 1;
  char **a = args;
  if (PetscInitialize(&one, &a, NULL, NULL) != 0) abort();
  (void)PetscPopSignalHandler(); /* libFuzzer's handlers report crashes */
  (void)PetscPushErrorHandler(PetscReturnErrorHandler, NULL); /* errors are returned, not printed */
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const char *path = fuzz_file("job.yaml", data, n);
  char msg[512];
  if (itr_job_file_check(path, msg, sizeof msg) == 0) {
    (void)PetscOptionsClear(NULL);
    if (PetscOptionsInsertFile(PETSC_COMM_SELF, NULL, path, PETSC_TRUE) == 0) {
      itr_options *opt = calloc(1, sizeof *opt);
      if (!opt) abort();
      (void)itr_options_parse(opt);
      free(opt);
    }
    (void)PetscOptionsClear(NULL);
  }
  itr_error_clear();
  return 0;
}
