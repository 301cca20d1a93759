# Sourced by the sbatch scripts in slurm/ (not submitted itself): environment, job-file lookup,
# srun with signal forwarding, and requeue after a checkpointed stop. See slurm/README.md.
# shellcheck shell=bash
# shellcheck disable=SC2034  # ITR_JOB, ITR_ARGS, ITR_RC, ITR_BIN are read by the scripts that source this file

ITR_EXIT_STOPPED=5 # iteris-mpi: stopped by a signal after writing OUT.partial/checkpoint (include/iteris/pipeline.h)

itr_say() { echo "[sbatch ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ array ${SLURM_ARRAY_JOB_ID:-?}_$SLURM_ARRAY_TASK_ID}] $*"; }
itr_die() { itr_say "error: $*" >&2; exit 2; }

# One BLAS/OpenMP thread per CPU given to a rank; yield in MPI waits when ranks outnumber the node's
# real cores (Slurm may claim more CPUs than there are, as the local test node does: without yielding,
# busy-polling ranks run 10-15x slower).
itr_setup_env() {
  local cpt=${SLURM_CPUS_PER_TASK:-1} per_node max=0 cores n
  export OPENBLAS_NUM_THREADS=$cpt OMP_NUM_THREADS=$cpt
  # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  # SLURM_TASKS_PER_NODE looks like "4(x2),3": the largest count on a node
  per_node=${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS:-1}}
  for n in $(echo "$per_node" | tr ',' ' ' | sed 's/(x[0-9]*)//g'); do [ "$n" -gt "$max" ] && max=$n; done
  cores=$(nproc --all 2>/dev/null || echo 1)
  if [ $((max * cpt)) -gt "$cores" ]; then
    export OMPI_MCA_mpi_yield_when_idle=1
    itr_say "oversubscribed: $max task(s) x $cpt CPU(s) on a node with $cores cores: OMPI_MCA_mpi_yield_when_idle=1"
  fi
}

# The executable: $ITERIS_BIN, else iteris-mpi on PATH, else build/bin/iteris-mpi in the submit dir.
itr_find_bin() {
  if [ -n "${ITERIS_BIN:-}" ]; then
    ITR_BIN=$ITERIS_BIN
  elif command -v iteris-mpi >/dev/null 2>&1; then
    ITR_BIN=$(command -v iteris-mpi)
  else
    ITR_BIN=${SLURM_SUBMIT_DIR:-.}/build/bin/iteris-mpi
  fi
  [ -x "$ITR_BIN" ] || itr_die "iteris-mpi not found at '$ITR_BIN': set ITERIS_BIN, put it on PATH or run 'make' in the submit dir"
}

# The job file from the first argument, else $ITERIS_JOB: a path (jobs/demo.yaml) or a name (demo -> jobs/demo.yaml).
itr_find_job() {
  local j=${1:-${ITERIS_JOB:-}}
  [ -n "$j" ] || itr_die "no job file: give it as the first argument (sbatch $0 jobs/NAME.yaml) or set ITERIS_JOB"
  if [ ! -f "$j" ] && [ -f "jobs/$j.yaml" ]; then j=jobs/$j.yaml; fi
  [ -r "$j" ] || itr_die "cannot read the job file '$j' (from $(pwd)): give a path relative to the submit dir, or a name in jobs/"
  ITR_JOB=$j
}

# itr_begin ARGS...: the job file (the first argument unless it is an option; else $ITERIS_JOB), the
# executable and the environment. The arguments after the job file are left in the array ITR_ARGS.
itr_begin() {
  if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then itr_find_job "$1"; shift; else itr_find_job ""; fi
  ITR_ARGS=("$@")
  itr_find_bin
  itr_setup_env
}

# itr_srun ARGS...: srun iteris-mpi ARGS in the background and wait until it really ends (a trapped
# signal interrupts `wait`). Sets ITR_RC to srun's exit code.
# Signals: the ranks must get TERM, srun must not: srun answers TERM by killing the step ("srun: forcing
# job termination"). So `--signal=TERM@120` and `scancel --signal=TERM JOBID` (both: the steps' tasks
# only) are right; a TERM that reaches the batch shell (`--signal=B:TERM@120`, `scancel --batch`) is
# passed on to the tasks with `scancel --signal=TERM JOBID`; avoid `scancel --full`, which also hits srun.
itr_srun() {
  local pid
  trap 'itr_forward TERM' TERM
  trap 'itr_forward INT' INT
  trap 'itr_forward USR1' USR1
  srun --mpi=pmix --kill-on-bad-exit=1 "$ITR_BIN" "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"
  ITR_RC=$?
  trap - TERM INT USR1
}

itr_forward() {
  itr_say "batch shell got SIG$1: passing it to the merge's tasks (checkpoint at the next iteration)"
  scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$pid" 2>/dev/null || true
}

# itr_restart_args: "-restart 1" when this run is a requeue (Slurm counts restarts in SLURM_RESTART_COUNT).
itr_restart_args() {
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo "-restart 1"; fi
}

# itr_finish RC: on a checkpointed stop, requeue this job (at most $ITERIS_MAX_REQUEUE times, default 3;
# ITERIS_REQUEUE=0 turns it off) so it resumes with -restart 1; then exit with RC.
itr_finish() {
  local rc=$1
  if [ "$rc" -eq "$ITR_EXIT_STOPPED" ]; then
    if [ "${ITERIS_REQUEUE:-1}" != 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${ITERIS_MAX_REQUEUE:-3}" ]; then
      itr_say "merge stopped with a checkpoint (exit $rc): requeueing job $SLURM_JOB_ID to resume with -restart 1"
      scontrol requeue "$SLURM_JOB_ID" || itr_say "scontrol requeue failed: resubmit with -restart 1 yourself"
    else
      itr_say "merge stopped with a checkpoint (exit $rc): not requeued; resubmit with -restart 1 to resume"
    fi
  elif [ "$rc" -ne 0 ]; then
    itr_say "iteris-mpi failed with exit code $rc (2 input, 3 numerical, 4 internal, >128 killed by a signal)"
  fi
  exit "$rc"
}

# itr_run_merge ARGS...: the whole of merge-single-node.sh and merge-multi-node.sh: srun the merge of
# the job file (with -restart 1 on a requeue), requeue after a checkpointed stop, exit with its code.
itr_run_merge() {
  local restart
  itr_begin "$@"
  restart=$(itr_restart_args)
  itr_say "$(date '+%F %T') node(s) ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-?} task(s) x ${SLURM_CPUS_PER_TASK:-1} CPU(s), job file $ITR_JOB, restart count ${SLURM_RESTART_COUNT:-0}"
  itr_say "srun $ITR_BIN -options_file $ITR_JOB ${ITR_ARGS[*]} $restart"
  # shellcheck disable=SC2086
  itr_srun -options_file "$ITR_JOB" "${ITR_ARGS[@]}" $restart
  itr_say "$(date '+%F %T') srun exited with $ITR_RC"
  itr_finish "$ITR_RC"
}
