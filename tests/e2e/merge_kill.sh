#!/usr/bin/env bash
# kill -9 of one rank in the middle of an iteration (no signal handler runs, no checkpoint is written
# then): the run dies without an OUT, the checkpoint of the last finished iteration survives intact,
# and -restart 1 gives the uninterrupted adapter bit for bit; also with -stages 2 (per-stage files).
# The rank is killed when rank 0 has printed iteration 8's first layer of 30 (a few seconds in).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=$(readlink -f "${ITERIS_BIN:-build/bin/iteris-mpi}")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1 || { echo "cannot make the demo case"; exit 1; }
D=$W/demo
args=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2"
      -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl" -max_iter 30)
bad=0
for layout in "" "-stages 2"; do
  name=${layout:+stages}; name=${name:-data}
  # shellcheck disable=SC2086
  timeout -k 5 300 mpirun -np 2 "$BIN" "${args[@]}" $layout -out "$W/full_$name" >"$W/full_$name.log" 2>&1 ||
    { echo "$name: the uninterrupted run failed"; tail -5 "$W/full_$name.log"; bad=$((bad + 1)); continue; }
  out=$W/killed_$name
  # shellcheck disable=SC2086
  timeout -k 5 300 mpirun -np 2 "$BIN" "${args[@]}" $layout -out "$out" >"$W/$name.log" 2>&1 &
  mp=$!
  for _ in $(seq 1 600); do grep -q "iter 8/30 layer 1/4" "$W/$name.log" && break; sleep 0.1; done
  victim=$(pgrep -f -- "-out $out" | while read -r p; do [ "$(ps -o comm= -p "$p")" = iteris-mpi ] && echo "$p"; done | tail -n 1)
  if [ -z "$victim" ] || ! grep -q "iter 8/30" "$W/$name.log"; then
    echo "$name: FAILED: could not find a rank in iteration 8 to kill"; tail -5 "$W/$name.log"; bad=$((bad + 1))
    wait "$mp"; continue
  fi
  kill -9 "$victim"
  wait "$mp"; rc=$?
  if [ $rc -eq 0 ] || [ -e "$out" ]; then echo "$name: FAILED: the killed run exited $rc and left '$out'"; bad=$((bad + 1)); continue; fi
  ls "$out.partial"/checkpoint* >/dev/null 2>&1 || { echo "$name: FAILED: no checkpoint after the kill"; bad=$((bad + 1)); continue; }
  # shellcheck disable=SC2086
  if ! timeout -k 5 300 mpirun -np 2 "$BIN" "${args[@]}" $layout -out "$out" -restart 1 >"$W/$name.restart.log" 2>&1; then
    echo "$name: FAILED: the restart failed"; tail -5 "$W/$name.restart.log"; bad=$((bad + 1)); continue
  fi
  if ! grep -q "resuming at iteration" "$W/$name.restart.log"; then
    echo "$name: FAILED: the restart did not resume from the checkpoint"; bad=$((bad + 1)); continue
  fi
  if cmp -s "$W/full_$name/adapter_model.safetensors" "$out/adapter_model.safetensors"; then
    echo "$name: killed in iteration $(grep -o 'iter [0-9]*/30' "$W/$name.log" | tail -n 1), $(grep -o 'resuming at iteration [0-9]*' "$W/$name.restart.log"): the same adapter bit for bit"
  else
    echo "$name: FAILED: the restarted adapter differs from the uninterrupted one"; bad=$((bad + 1))
  fi
done
echo "merge_kill: $bad failed"
[ "$bad" -eq 0 ]
