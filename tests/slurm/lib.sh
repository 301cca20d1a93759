# Helpers for tests/slurm/run.sh (sourced). Every wait is bounded.
# shellcheck shell=bash

pass=0 fail=0 skip=0
skipped=()

ok() { pass=$((pass + 1)); echo "  ok    $*"; }
bad() { fail=$((fail + 1)); echo "  FAIL  $*"; }
skipped_case() { skip=$((skip + 1)); skipped+=("$1"); echo "  skip  $1"; }
# check LABEL CMD...: ok when CMD succeeds
check() { local l=$1; shift; if "$@" >/dev/null 2>&1; then ok "$l"; else bad "$l"; fi; }

# job_field JID KEY: a field of `scontrol show job` (JobState, ExitCode, Restarts, ...); empty when gone
job_field() { timeout 10 scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

# submit ARGS...: sbatch --parsable ARGS, prints the job id (fails when sbatch does)
submit() { timeout 30 sbatch --parsable "$@" | cut -d';' -f1; }

# wait_done JID LIMIT_S: wait until the job is finished for good (not pending, running, requeued,
# completing); prints the final JobState. Returns 1 on timeout (the job is then cancelled).
wait_done() {
  local jid=$1 limit=$2 t=0 st
  while [ "$t" -lt "$limit" ]; do
    st=$(job_field "$jid" JobState)
    case "$st" in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | OUT_OF_MEMORY | NODE_FAIL | PREEMPTED | BOOT_FAIL | DEADLINE)
        echo "$st"; return 0 ;;
    esac
    sleep 1; t=$((t + 1))
  done
  timeout 10 scancel "$jid" 2>/dev/null
  echo "TIMEOUT-IN-TEST(last state '$st')"
  return 1
}

# wait_log FILE PATTERN LIMIT_S: wait until FILE contains PATTERN (grep -E)
wait_log() {
  local t=0
  while [ "$t" -lt $(($3 * 5)) ]; do
    grep -Eq "$2" "$1" 2>/dev/null && return 0
    sleep 0.2; t=$((t + 1))
  done
  return 1
}

# report_get FILE EXPR: a field of a merge_report.json, e.g. report_get r.json 'r["iterations"]'
report_get() { /usr/bin/python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# show_log FILE: the end of a job log, indented (after a failure)
show_log() { [ -f "$1" ] && { echo "  --- tail of $1"; grep -v ' iter [0-9]*/' "$1" | tail -n 15 | sed 's/^/  | /'; }; }
