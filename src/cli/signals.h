/* Graceful stop on SIGTERM / SIGINT / SIGUSR1: the handlers only record the signal; the merge loop
 * polls it at a layer boundary, agrees on it across ranks, writes its checkpoint and stops with
 * ITR_ERR_INTERRUPTED (exit code 5: not 0, there is no adapter yet; not 128+signal, which means killed
 * without a checkpoint; slurm/merge-*.sh requeue on it). So a Slurm job (sbatch --signal=TERM@120,
 * scancel --signal=TERM) or a user can stop a long merge and resume it with -restart 1. Under mpirun,
 * send SIGUSR1 to mpirun (it forwards USR1; on TERM it kills the ranks itself). */
#ifndef ITERIS_CLI_SIGNALS_H
#define ITERIS_CLI_SIGNALS_H

#include <mpi.h>

/* Installs the handlers (sigaction, SA_RESTART) for SIGTERM, SIGINT and SIGUSR1 and clears the flag.
 * Call once, after PetscInitialize, so they replace any handler PETSc installs (Debian's PETSc 3.18
 * leaves SIGTERM at its default: killed). Not Collective; the handlers are async-signal-safe (they
 * only store the signal number). */
void itr_cli_signals_install(void);

/* The number of the first signal received since itr_cli_signals_install, or 0. Not Collective: ranks
 * can see a signal at different times; use itr_cli_stop_agree to decide together. */
int itr_cli_stop_requested(void);

/* Collective on comm: the largest signal number any rank has seen (0: none), the same on every rank.
 * Call it at the same point on every rank (e.g. the end of each IterIS iteration). */
int itr_cli_stop_agree(MPI_Comm comm);

/* Clears the flag (tests, or a caller that handled the stop). Not Collective. */
void itr_cli_stop_clear(void);

#endif
