#!/usr/bin/env bash
# One IterIS merge on several nodes: srun iteris-mpi -options_file JOB [extra options]. The submit dir
# (job files, inputs, OUT) must be on a file system all nodes share.
#   sbatch slurm/merge-multi-node.sh jobs/demo.yaml              (or a name: demo)
#   ITERIS_JOB=jobs/demo.yaml sbatch slurm/merge-multi-node.sh
#   sbatch --nodes=4 slurm/merge-multi-node.sh demo -max_iter 30  (options after the job file win)
#   sbatch --nodes=4 slurm/merge-multi-node.sh demo -stages 4     (a pipeline stage per node: each node reads
#                                                                   only its layers; see slurm/README.md)
# Submit from the repository root (or set ITERIS_HOME): paths are relative to the submit dir.
# Stop and resume: Slurm sends TERM 120 s before the time limit (scancel --signal=TERM --full JOBID does
# the same at once); iteris-mpi writes OUT.partial/checkpoint.h5 at the next iteration boundary and exits
# with 5; this script then requeues the job, and the requeued run (SLURM_RESTART_COUNT > 0) gets -restart 1.
# Environment: ITERIS_JOB, ITERIS_BIN, ITERIS_HOME, ITERIS_REQUEUE=0 (no requeue), ITERIS_MAX_REQUEUE (3).
#SBATCH --job-name=iteris-merge-multi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=iteris-merge-multi-%j.out
#SBATCH --error=iteris-merge-multi-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -uo pipefail
ITERIS_HOME=${ITERIS_HOME:-${SLURM_SUBMIT_DIR:-.}}
# shellcheck source=slurm/common.sh
. "$ITERIS_HOME/slurm/common.sh" || { echo "cannot read $ITERIS_HOME/slurm/common.sh: set ITERIS_HOME" >&2; exit 2; }

# the first argument is the job file unless it is an option (then ITERIS_JOB names it)
itr_run_merge "$@"
