#!/usr/bin/env bash
# LoRA ensembles: a job array where task i trains member i of the job file's training run with -seed i + 1
# (initialisation, data order and dropout differ; everything else is the job file's), into
#   $ITERIS_ENSEMBLE_OUT/member<i+1>   (default ITERIS_ENSEMBLE_OUT=ensemble-<array job id>)
#   sbatch --array=0-3 slurm/train-ensemble.sh jobs/train-isear.yaml
# then score the members and their ensemble on the login node or in a job:
#   iteris-mpi -base B -ensemble ensemble-<id>/member1,...,member4 -heldout H.jsonl
# A SIGTERM before the time limit leaves a checkpoint; the task requeues itself and resumes with -restart 1
# (see merge-single-node.sh). Environment: ITERIS_ENSEMBLE_OUT, ITERIS_JOB, ITERIS_BIN, ITERIS_HOME.
#SBATCH --job-name=iteris-ensemble
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=iteris-ensemble-%A_%a.out
#SBATCH --error=iteris-ensemble-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -uo pipefail
ITERIS_HOME=${ITERIS_HOME:-${SLURM_SUBMIT_DIR:-.}}
# shellcheck source=slurm/common.sh
. "$ITERIS_HOME/slurm/common.sh" || { echo "cannot read $ITERIS_HOME/slurm/common.sh: set ITERIS_HOME" >&2; exit 2; }

itr_begin "$@"
i=${SLURM_ARRAY_TASK_ID:?not an array job: submit with sbatch --array=0-3 (one task per member)}
root=${ITERIS_ENSEMBLE_OUT:-ensemble-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}
out=$root/member$((i + 1))
mkdir -p "$root"
restart=$(itr_restart_args)
itr_say "$(date '+%F %T') member $((i + 1)): -seed $((i + 1)) -> $out ($ITR_JOB, restart count ${SLURM_RESTART_COUNT:-0})"
# shellcheck disable=SC2086
itr_srun -options_file "$ITR_JOB" "${ITR_ARGS[@]}" -seed $((i + 1)) -out "$out" $restart
itr_say "$(date '+%F %T') srun exited with $ITR_RC"
itr_finish "$ITR_RC"
