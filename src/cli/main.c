/* iteris-mpi: main(). Initialises MPI and PETSc, reads the options, runs one mode, and makes
 * every rank exit with the same code and rank 0 print the same message. */
#include <errno.h>
#include <mpi.h>
#include <petscsys.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/options.h"
#include "iteris/core.h"
#include "iteris/dist.h"
#include "iteris/io.h"
#include "iteris/pipeline.h"

/* Before PETSc starts: -help (ours, not PETSc's 300 lines) and job files PETSc could not read,
 * which it would report with a 3 KB banner on every rank, or hang on. */
static int prescan_args(int argc, char **argv, int rank, int *exit_code) {
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-help") || !strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      if (rank == 0) itr_options_print_help(stdout);
      *exit_code = 0;
      return 1;
    }
    if ((!strcmp(argv[i], "-options_file") || !strcmp(argv[i], "-options_file_yaml"))) {
      if (i + 1 >= argc) {
        if (rank == 0) fprintf(stderr, "error: %s needs a file name; jobs/ holds examples\n", argv[i]);
        *exit_code = 2;
        return 1;
      }
      char msg[512];
      if (itr_job_file_check(argv[i + 1], msg, sizeof msg)) {
        if (rank == 0) fprintf(stderr, "error: %s\n(exit code 2: input error)\n", msg);
        *exit_code = 2;
        return 1;
      }
    }
  }
  return 0;
}

/* -log_view :FILE[:FORMAT] (command line or job file): PETSc writes FILE only in PetscFinalize, after
 * the whole merge, and spins there when it cannot open it. So its folder is checked now, and on
 * failure the option is dropped (PetscFinalize then writes nothing) and the run stops with exit 2. */
static itr_err check_log_view(int rank) {
  char lv[ITR_PATH_MAX] = "";
  PetscBool set = PETSC_FALSE;
  if (PetscOptionsGetString(NULL, NULL, "-log_view", lv, sizeof lv, &set) != 0 || !set || lv[0] != ':') return ITR_OK;
  char file[ITR_PATH_MAX], dir[ITR_PATH_MAX];
  snprintf(file, sizeof file, "%s", lv + 1);
  char *colon = strchr(file, ':');
  if (colon) *colon = 0;
  if (!file[0]) return ITR_OK;
  itr_iofile_parent(file, dir, sizeof dir);
  if (access(dir, W_OK | X_OK) == 0) return ITR_OK;
  (void)PetscOptionsClearValue(NULL, "-log_view");
  (void)rank;
  return itr_error_set(ITR_ERR_INPUT,
                       "-log_view :%s: cannot write into the folder '%s' (%s); give a file in a writable folder, "
                       "e.g. -log_view :log.txt, or -log_view alone for standard output",
                       file, dir, strerror(errno));
}

static void set_log_label(int rank, int size) {
  char label[128];
  const char *job = getenv("SLURM_JOB_ID"), *step = getenv("SLURM_STEP_ID");
  if (job)
    snprintf(label, sizeof label, "[job %s.%s rank %d/%d]", job, step ? step : "?", rank, size);
  else
    snprintf(label, sizeof label, "[rank %d/%d]", rank, size);
  itr_log_set_label(size > 1 || job ? label : "");
  itr_log_set_quiet(rank != 0);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1, code = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  set_log_label(rank, size);
  if (argc == 1) {
    if (rank == 0) itr_options_print_help(stdout);
    MPI_Finalize();
    return 0;
  }
  if (prescan_args(argc, argv, rank, &code)) {
    MPI_Finalize();
    return code;
  }
  if (PetscInitialize(&argc, &argv, NULL, NULL) != 0) {
    if (rank == 0) fprintf(stderr, "error: PETSc failed to start\n");
    MPI_Finalize();
    return 4;
  }
  PetscPushErrorHandler(PetscReturnErrorHandler, NULL);
  itr_signals_install(); /* SIGTERM/SIGINT/SIGUSR1: checkpoint and stop at the next layer */

  /* fault injection for the agreement tests: ITERIS_FAULT_ALLOC="RANK:K" makes the K-th checked
   * allocation of rank RANK fail, so every phase's "error on one rank only" path can be exercised */
  const char *fault = getenv("ITERIS_FAULT_ALLOC");
  int fault_rank = -1;
  long fault_k = 0;
  if (fault && sscanf(fault, "%d:%ld", &fault_rank, &fault_k) == 2 && fault_rank == rank) itr_alloc_fail_after(fault_k);
  /* ITERIS_FAULT_RESIDUAL="layers.0.self_attn.q_proj": that solve's check must FAIL (exit 3) */
  itr_fault_residual_set(getenv("ITERIS_FAULT_RESIDUAL"));

  itr_err lv_err = check_log_view(rank);
  itr_options *opt = calloc(1, sizeof *opt);
  itr_err err = opt ? itr_options_parse(opt) : itr_error_set(ITR_ERR_INTERNAL, "out of memory for the options");
  if (err == ITR_OK) err = lv_err;
  err = itr_dist_agree(MPI_COMM_WORLD, err); /* a failure on one rank only stops every rank */
  if (err == ITR_OK) {
    if (opt->m.verbose >= 2) itr_log_set_level(ITR_LOG_DEBUG);
    switch (opt->mode) {
      case ITR_MODE_INSPECT: err = itr_cli_inspect(opt, MPI_COMM_WORLD); break;
      case ITR_MODE_MAKE_DEMO: err = itr_cli_make_demo(opt, MPI_COMM_WORLD); break;
      case ITR_MODE_LOGITS: err = itr_cli_logits(opt, MPI_COMM_WORLD); break;
      case ITR_MODE_TOKENIZE: err = itr_cli_tokenize(opt, MPI_COMM_WORLD); break;
      case ITR_MODE_MERGE: err = itr_cli_merge(opt, MPI_COMM_WORLD); break;
      case ITR_MODE_FEATURES: err = itr_pipeline_features(&opt->m, MPI_COMM_WORLD); break;
      case ITR_MODE_TRAIN: err = itr_train_run(&opt->t, MPI_COMM_WORLD); break;
      case ITR_MODE_ENSEMBLE: err = itr_evaluate_adapters(&opt->e, MPI_COMM_WORLD); break;
    }
  }
  /* every mode returns the agreed error on all ranks; rank 0 prints it */
  if (err != ITR_OK && rank == 0) {
    /* input errors: the message alone; numerical and internal ones: with the traceback */
    char head[1024];
    itr_error_headline(head, sizeof head);
    int trace = err == ITR_ERR_NUMERIC || err == ITR_ERR_INTERNAL || (opt && opt->m.verbose >= 1);
    fprintf(stderr, "error: %s\n", trace ? itr_error_message() : head);
    fprintf(stderr, "(exit code %d: %s)\n", itr_exit_code(err), itr_err_name(err));
  }
  free(opt);
  PetscFinalize();
  MPI_Finalize();
  return itr_exit_code(err);
}
