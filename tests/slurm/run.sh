#!/usr/bin/env bash
# `make test-slurm`: the sbatch scripts in slurm/ on a real single-node Slurm brought up on localhost
# (scripts/slurm-local.sh, a private cluster in $ITERIS_SLURM_DIR on port $ITERIS_SLURM_PORT), then torn
# down again (only the daemons this run started, by pid). Ends with "N passed, M failed"; exit 1 on failure.
#   1 cluster up          4 job file from ITERIS_JOB + extra options   7 requeue plumbing (stub binary)
#   2 sbatch the demo     5 a missing job file fails with exit 2       8 cancel, then resume with -restart 1
#   3 same adapter as mpirun   6 sweep array (2 x 1) + collect-sweep.sh   9 the time limit (requeue, resume)
#   10 a LoRA ensemble trained as a job array (train-ensemble.sh), scored with -ensemble
# Environment: BUILD (build), KEEP=1 keeps the work folder, ITERIS_SLURM_DIR, ITERIS_SLURM_PORT,
# SLURM_TEST_TIMELIMIT=0 skips case 9 (about 45 s). Takes about 2.5 min on the 2-core dev machine.
set -u
cd "$(dirname "$0")/../.." || exit 1
REPO=$PWD
BUILD=${BUILD:-build}
BIN=$REPO/$BUILD/bin/iteris-mpi
. tests/slurm/lib.sh

export ITERIS_SLURM_DIR=${ITERIS_SLURM_DIR:-/tmp/iteris-slurm-test}
export ITERIS_SLURM_PORT=${ITERIS_SLURM_PORT:-6827}
export SLURM_CONF=$ITERIS_SLURM_DIR/slurm.conf
export ITERIS_BIN=$BIN ITERIS_HOME=$REPO
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
unset SLURM_JOB_ID SLURM_JOBID SLURM_STEP_ID SLURM_RESTART_COUNT ITERIS_JOB

W=$(mktemp -d /tmp/iteris-slurm-test-work.XXXXXX)
finish() {
  local rc=$?
  echo "== tear-down"
  timeout 60 bash "$REPO/scripts/slurm-local.sh" down 2>&1 | sed 's/^/  /'
  if [ "$fail" -eq 0 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; else echo "  work folder kept: $W"; fi
  [ ${#skipped[@]} -gt 0 ] && echo "$skip skipped: ${skipped[*]}"
  echo "$pass passed, $fail failed"
  [ "$fail" -eq 0 ] && [ $rc -eq 0 ] || exit 1
}
trap finish EXIT
trap 'echo "interrupted"; fail=$((fail + 1)); exit 1' INT TERM

echo "== 1 cluster up ($ITERIS_SLURM_DIR, port $ITERIS_SLURM_PORT)"
if ! command -v sbatch >/dev/null || [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; then
  timeout 600 bash scripts/install-deps.sh --slurm || { bad "install slurm-wlm and munge"; exit 1; }
fi
if [ ! -x "$BIN" ]; then
  timeout 900 make BUILD="$BUILD" -j2 "$BUILD/bin/iteris-mpi" >"$W/build.log" 2>&1 || { bad "build $BIN (see $W/build.log)"; exit 1; }
fi
if timeout 120 bash scripts/slurm-local.sh up >"$W/up.log" 2>&1; then
  ok "slurm-local.sh up: node $(timeout 5 sinfo -h -o '%n %T %c CPUs')"
else
  bad "slurm-local.sh up"; sed 's/^/  | /' "$W/up.log"; exit 1
fi

cd "$W" || exit 1
mkdir -p jobs
"$BIN" -make_demo demo >make_demo.log 2>&1 || { bad "make the demo case"; exit 1; }
cp "$REPO/jobs/demo.yaml" jobs/demo.yaml   # its paths (demo/...) are relative to the submit dir, $W

echo "== 2 sbatch slurm/merge-single-node.sh demo (4 tasks on the 4-CPU node)"
jid=$(submit --time=5 --ntasks=4 "$REPO/slurm/merge-single-node.sh" demo)
st=$(wait_done "$jid" 240)
log=iteris-merge-$jid.out
if [ "$st" = COMPLETED ] && [ "$(job_field "$jid" ExitCode)" = 0:0 ]; then ok "job $jid COMPLETED, exit 0"; else bad "job $jid: state $st, exit $(job_field "$jid" ExitCode)"; show_log "$log"; fi
check "adapter written (adapter_model.safetensors, adapter_config.json)" test -s demo/merged-iteris/adapter_model.safetensors -a -s demo/merged-iteris/adapter_config.json
check "no demo/merged-iteris.partial left" test ! -e demo/merged-iteris.partial
if [ -s demo/merged-iteris/merge_report.json ] && [ "$(report_get demo/merged-iteris/merge_report.json 'r["iterations"], r["ranks"]')" = "(5, 4)" ]; then
  ok "merge_report.json: 5 iterations on 4 ranks"
else bad "merge_report.json missing or not 5 iterations on 4 ranks"; fi
n=$(grep -c "^\[job $jid\.0 rank 0/4\] iter [0-9]*/5 layer" "$log" 2>/dev/null)
if [ "${n:-0}" -eq 20 ]; then ok "log lines labelled '[job $jid.0 rank 0/4]' (20 progress lines)"; else bad "expected 20 progress lines labelled '[job $jid.0 rank 0/4]', found ${n:-0}"; show_log "$log"; fi
check "log shows OMPI_MCA_mpi_yield_when_idle=1 (4 tasks on $(nproc --all) cores)" grep -q 'oversubscribed.*yield_when_idle=1' "$log"
check "merged adapter loads (-inspect)" "$BIN" -inspect demo/merged-iteris

echo "== 3 the Slurm run gives the adapter of a plain mpirun -np 2 run"
timeout 300 mpirun -np 2 "$BIN" -options_file jobs/demo.yaml -out demo/merged-mpirun >mpirun.log 2>&1
if /usr/bin/python3 "$REPO/tests/ref/compare_adapters.py" demo/merged-iteris demo/merged-mpirun 1e-5 >cmp.log 2>&1; then
  ok "srun -n 4 vs mpirun -np 2: $(tail -n 1 cmp.log)"
else bad "srun -n 4 vs mpirun -np 2 differ: $(tail -n 3 cmp.log | tr '\n' ' ')"; fi

echo "== 4 job file from ITERIS_JOB, extra options after it"
jid=$(ITERIS_JOB=jobs/demo.yaml submit --time=5 --ntasks=2 "$REPO/slurm/merge-single-node.sh" -max_iter 1 -out demo/merged-k1)
st=$(wait_done "$jid" 180)
if [ "$st" = COMPLETED ] && [ -s demo/merged-k1/merge_report.json ] &&
   [ "$(report_get demo/merged-k1/merge_report.json 'r["iterations"], r["options"]["max_iter"], r["ranks"]')" = "(1, 1, 2)" ]; then
  ok "ITERIS_JOB=jobs/demo.yaml + '-max_iter 1 -out demo/merged-k1': 1 iteration on 2 ranks"
else bad "ITERIS_JOB + extra options: state $st"; show_log "iteris-merge-$jid.out"; fi

echo "== 4b pipeline stages under srun: -stages 2 on 4 tasks"
jid=$(submit --time=5 --ntasks=4 "$REPO/slurm/merge-single-node.sh" demo -stages 2 -out demo/merged-stages)
st=$(wait_done "$jid" 180)
if [ "$st" = COMPLETED ] && [ -s demo/merged-stages/merge_report.json ] &&
   [ "$(report_get demo/merged-stages/merge_report.json 'r["stages"], r["ranks"]')" = "(2, 4)" ] &&
   /usr/bin/python3 "$REPO/tests/ref/compare_adapters.py" demo/merged-iteris demo/merged-stages 1e-5 >cmp-stages.log 2>&1; then
  ok "srun -n 4 -stages 2 gives the adapter of srun -n 4 without stages: $(tail -n 1 cmp-stages.log)"
else bad "srun -n 4 -stages 2: state $st"; show_log "iteris-merge-$jid.out"; fi

echo "== 5 a missing job file"
jid=$(submit --time=2 --ntasks=1 "$REPO/slurm/merge-single-node.sh" jobs/missing.yaml)
st=$(wait_done "$jid" 60)
if [ "$st" = FAILED ] && [ "$(job_field "$jid" ExitCode)" = 2:0 ] && grep -q "cannot read the job file 'jobs/missing.yaml'" "iteris-merge-$jid.out"; then
  ok "job FAILED with exit 2 and names the file"
else bad "missing job file: state $st, exit $(job_field "$jid" ExitCode)"; show_log "iteris-merge-$jid.out"; fi

echo "== 6 sweep array 2 x 1 (alpha_2 1e-7 1e-3, max_iter 2) and collect-sweep.sh"
jid=$(ITERIS_SWEEP_ALPHA2="1e-7 1e-3" ITERIS_SWEEP_MAX_ITER=2 ITERIS_SWEEP_OUT=sweep \
      submit --time=5 --array=0-1 "$REPO/slurm/sweep-array.sh" demo)
st0=$(wait_done "${jid}_0" 240); st1=$(wait_done "${jid}_1" 240)
if [ "$st0 $st1" = "COMPLETED COMPLETED" ]; then ok "array $jid: both tasks COMPLETED"; else bad "array $jid: $st0 $st1"; show_log "iteris-sweep-${jid}_0.out"; show_log "iteris-sweep-${jid}_1.out"; fi
for p in "1e-7 sweep/a1e-7-k2" "1e-3 sweep/a1e-3-k2"; do
  set -- $p
  if [ -s "$2/merge_report.json" ] && [ "$(report_get "$2/merge_report.json" 'r["options"]["alpha_2"], r["options"]["max_iter"]')" = "($(/usr/bin/python3 -c "print(float('$1'))"), 2)" ]; then
    ok "$2/merge_report.json has alpha_2=$1, max_iter=2"
  else bad "$2/merge_report.json missing or with other options"; fi
done
if timeout 60 bash "$REPO/slurm/collect-sweep.sh" sweep >table.md 2>collect.err; then
  rows=$(grep -c '^| [0-9]' table.md)
  if [ "$rows" -eq 2 ] && grep -q '^| 1e-07 | 2 | 0\.[0-9]* | 0\.[0-9]* |' table.md && grep -q '^| 0.001 | 2 |' table.md; then
    ok "collect-sweep.sh: a 2-row markdown table"; sed 's/^/  | /' table.md
  else bad "collect-sweep.sh table: $rows rows"; sed 's/^/  | /' table.md; fi
else bad "collect-sweep.sh failed: $(cat collect.err)"; fi
mkdir -p empty-sweep
check "collect-sweep.sh on a folder without reports exits 1" bash -c "! bash '$REPO/slurm/collect-sweep.sh' empty-sweep"

echo "== 7 requeue plumbing with a stub binary (tests/slurm/stub-merge.sh: exit 5 on TERM, like iteris-mpi)"
# 7a: scancel --signal=TERM JOBID (the tasks), as --signal=TERM@120 does at the time limit
# 7b: scancel --batch --signal=TERM JOBID (the batch shell), as --signal=B:TERM@120 does; the script passes it on
for variant in steps batch; do
  d=$W/stub-$variant; mkdir -p "$d"
  flag=""; [ "$variant" = batch ] && flag=--batch
  jid=$(STUB_DIR=$d ITERIS_BIN=$REPO/tests/slurm/stub-merge.sh submit --time=3 --ntasks=2 "$REPO/slurm/merge-single-node.sh" demo)
  log=iteris-merge-$jid.out
  if wait_log "$log" 'iter 2/' 60; then
    timeout 10 scancel $flag --signal=TERM "$jid"
    st=$(wait_done "$jid" 120)
    if [ "$st" = COMPLETED ] && [ "$(job_field "$jid" Restarts)" = 1 ] && grep -q -- '-restart 1 (SLURM_RESTART_COUNT=1)' "$log" &&
       grep -q 'resumed from iter' "$d/resumed" 2>/dev/null &&
       { [ "$variant" = steps ] || grep -q 'batch shell got SIGTERM: passing it to' "$log"; }; then
      ok "7 ($variant): TERM -> exit 5 -> requeued once -> rerun with -restart 1 -> COMPLETED"
    else bad "7 ($variant): state $st, restarts $(job_field "$jid" Restarts)"; show_log "$log"; fi
  else bad "7 ($variant): the stub never printed 'iter 2/'"; timeout 10 scancel "$jid"; show_log "$log"; fi
done

echo "== 8 cancel, then resume with -restart 1 (the real binary)"
if ! "$BIN" -help 2>&1 | grep -E '^ *-restart' | grep -qiv 'not (yet )?(implemented|supported)'; then
  bad "8 cancel-then-resume: -help does not offer -restart"
else
  # the reference: the same merge, uninterrupted, on the same number of ranks
  jr=$(submit --time=5 --ntasks=2 "$REPO/slurm/merge-single-node.sh" demo -max_iter 30 -out demo/ref30)
  jid=$(ITERIS_REQUEUE=0 submit --time=5 --ntasks=2 "$REPO/slurm/merge-single-node.sh" demo -max_iter 30 -out demo/resumed30)
  log=iteris-merge-$jid.out
  if wait_log "$log" "^\[job $jid\.0 rank 0/2\] iter 2/30" 120; then
    timeout 10 scancel --signal=TERM "$jid"
    st=$(wait_done "$jid" 120); ec=$(job_field "$jid" ExitCode)
    if [ "$ec" != 5:0 ] || [ ! -s demo/resumed30.partial/checkpoint.h5 ]; then
      bad "8 cancel-then-resume: after TERM the job ended $st with exit $ec (want 5:0), checkpoint.h5 $( [ -e demo/resumed30.partial/checkpoint.h5 ] && echo present || echo absent)"
      show_log "$log"
      wait_done "$jr" 300 >/dev/null
    else
      ok "TERM at iteration 2: exit 5 with demo/resumed30.partial/checkpoint.h5"
      check "no adapter written by the stopped run" test ! -e demo/resumed30/adapter_model.safetensors
      j2=$(submit --time=5 --ntasks=2 "$REPO/slurm/merge-single-node.sh" demo -max_iter 30 -out demo/resumed30 -restart 1)
      st2=$(wait_done "$j2" 300); str=$(wait_done "$jr" 300)
      if [ "$st2 $str" = "COMPLETED COMPLETED" ]; then ok "resumed job $j2 and reference job $jr COMPLETED"; else bad "resumed $st2, reference $str"; show_log "iteris-merge-$j2.out"; fi
      check "resumed run did not start over (no 'iter 1/30' in its log)" bash -c "! grep -q 'iter 1/30' iteris-merge-$j2.out"
      if [ -s demo/resumed30/merge_report.json ] && [ "$(report_get demo/resumed30/merge_report.json 'r["iterations"]')" = 30 ]; then ok "resumed report: 30 iterations"; else bad "resumed report missing or not 30 iterations"; fi
      if /usr/bin/python3 "$REPO/tests/ref/compare_adapters.py" demo/ref30 demo/resumed30 1e-6 >cmp30.log 2>&1; then
        ok "stopped + resumed adapter = uninterrupted adapter: $(tail -n 1 cmp30.log)"
      else bad "stopped + resumed adapter differs from the uninterrupted one: $(tail -n 3 cmp30.log | tr '\n' ' ')"; fi
    fi
  else
    bad "8: never saw 'iter 2/30' in $log"; show_log "$log"; timeout 10 scancel "$jid" "$jr"
  fi
fi

echo "== 10 LoRA ensemble: train-ensemble.sh as a 2-task array (stories260K, 5 steps each), then -ensemble"
if [ -f "$REPO/../shared/models/stories260K/tok512.bin" ]; then
  mkdir -p ens-data && cp "$REPO/jobs/train-isear.yaml" jobs/ && head -n 64 "$REPO/bench/data/isear/train.jsonl" >ens-data/train.jsonl
  head -n 20 "$REPO/bench/data/isear/heldout.jsonl" >ens-data/heldout.jsonl
  jid=$(ITERIS_ENSEMBLE_OUT=ens submit --time=5 --array=0-1 "$REPO/slurm/train-ensemble.sh" jobs/train-isear.yaml \
        -base "$REPO/../shared/models/stories260K" -data ens-data/train.jsonl -steps 5 -checkpoint_every 0)
  st0=$(wait_done "${jid}_0" 240); st1=$(wait_done "${jid}_1" 240)
  if [ "$st0 $st1" = "COMPLETED COMPLETED" ] && [ -s ens/member1/adapter_model.safetensors ] &&
     [ -s ens/member2/adapter_model.safetensors ] && ! cmp -s ens/member1/adapter_model.safetensors ens/member2/adapter_model.safetensors &&
     grep -q '"seed":.*1,' ens/member1/train_report.json && grep -q '"seed":.*2,' ens/member2/train_report.json; then
    ok "array $jid: members 1 and 2 trained with -seed 1 and 2 (different adapters)"
  else bad "ensemble array $jid: $st0 $st1"; show_log "iteris-ensemble-${jid}_0.out"; show_log "iteris-ensemble-${jid}_1.out"; fi
  if timeout 120 mpirun -np 2 "$BIN" -base "$REPO/../shared/models/stories260K" -ensemble ens/member1,ens/member2 \
       -heldout ens-data/heldout.jsonl >ens.log 2>&1 && grep -q '^ensemble ' ens.log; then
    ok "-ensemble scores the two members and their ensemble"
  else bad "-ensemble on the members"; cat ens.log; fi
else
  skipped_case "10 ensemble (../shared/models/stories260K is absent)"
fi

echo "== 9 the time limit: --time=2 --signal=TERM@90 -> checkpoint -> requeue -> -restart 1 (SLURM_TEST_TIMELIMIT=0 skips)"
if [ "${SLURM_TEST_TIMELIMIT:-1}" = 0 ]; then
  skipped_case "9 time limit (SLURM_TEST_TIMELIMIT=0)"
else
  # Slurm checks signal times about every 30 s and may signal up to 60 s early: TERM comes 0-30 s in.
  jid=$(ITERIS_MAX_REQUEUE=1 submit --time=2 --signal=TERM@90 --ntasks=2 "$REPO/slurm/merge-single-node.sh" demo -max_iter 100000 -out demo/timelimit)
  log=iteris-merge-$jid.out
  if wait_log "$log" "^\[job $jid\.0 rank 0/2\] -restart: resuming at iteration" 150; then
    if grep -q 'stopped by signal 15 after layer' "$log" && grep -q "requeueing job $jid" "$log" && grep -q 'restart count 1' "$log"; then
      ok "TERM before the time limit -> exit 5 -> requeued -> resumed with -restart 1 from the checkpoint"
    else bad "9: resumed, but the log misses a step"; show_log "$log"; fi
  else bad "9: no resume within 150 s (state $(job_field "$jid" JobState), restarts $(job_field "$jid" Restarts))"; show_log "$log"; fi
  timeout 10 scancel "$jid"
fi
