#!/usr/bin/env bash
# A job array over an alpha_2 x max_iter grid: array task i runs one merge into its own folder
#   $ITERIS_SWEEP_OUT/a<alpha_2>-k<max_iter>   (default ITERIS_SWEEP_OUT=sweep-<array job id>)
# with -alpha_2 and -max_iter appended to the job file's options (later options win).
#   sbatch slurm/sweep-array.sh jobs/demo.yaml                      (3 x 3 grid, tasks 0-8)
#   ITERIS_SWEEP_ALPHA2="1e-7 1e-3" ITERIS_SWEEP_MAX_ITER="5" sbatch --array=0-1 slurm/sweep-array.sh demo
#   slurm/collect-sweep.sh sweep-<id>                               (one markdown table)
# --array must cover 0 .. (#alpha_2 x #max_iter - 1); %4 lets 4 tasks run at once. Task i takes
# alpha_2 number i / #max_iter and max_iter number i % #max_iter. Extra arguments after the job file
# go to every merge. Environment: ITERIS_SWEEP_ALPHA2, ITERIS_SWEEP_MAX_ITER, ITERIS_SWEEP_OUT,
# ITERIS_JOB, ITERIS_BIN, ITERIS_HOME (see merge-single-node.sh).
#SBATCH --job-name=iteris-sweep
#SBATCH --array=0-8%4
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=iteris-sweep-%A_%a.out
#SBATCH --error=iteris-sweep-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -uo pipefail
ITERIS_HOME=${ITERIS_HOME:-${SLURM_SUBMIT_DIR:-.}}
# shellcheck source=slurm/common.sh
. "$ITERIS_HOME/slurm/common.sh" || { echo "cannot read $ITERIS_HOME/slurm/common.sh: set ITERIS_HOME" >&2; exit 2; }

itr_begin "$@"

read -r -a alphas <<<"${ITERIS_SWEEP_ALPHA2:-1e-7 1e-5 1e-3}"
read -r -a iters <<<"${ITERIS_SWEEP_MAX_ITER:-1 3 5}"
na=${#alphas[@]} nk=${#iters[@]}
i=${SLURM_ARRAY_TASK_ID:?not an array job: submit with sbatch --array=0-$((na * nk - 1))}
[ "$i" -lt $((na * nk)) ] || itr_die "array task $i is outside the ${na} x ${nk} grid (tasks 0-$((na * nk - 1))): fix --array"
a=${alphas[$((i / nk))]} k=${iters[$((i % nk))]}
root=${ITERIS_SWEEP_OUT:-sweep-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}
out=$root/a$a-k$k
mkdir -p "$root"
restart=$(itr_restart_args)
itr_say "$(date '+%F %T') grid point $i of ${na}x${nk}: alpha_2=$a max_iter=$k -> $out ($ITR_JOB, restart count ${SLURM_RESTART_COUNT:-0})"
# shellcheck disable=SC2086
itr_srun -options_file "$ITR_JOB" "${ITR_ARGS[@]}" -alpha_2 "$a" -max_iter "$k" -out "$out" $restart
itr_say "$(date '+%F %T') srun exited with $ITR_RC"
itr_finish "$ITR_RC"
