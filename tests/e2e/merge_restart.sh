#!/usr/bin/env bash
# A merge stopped mid-iteration (as by SIGTERM; injected with ITERIS_FAULT_STOP_AT) exits with code 5,
# leaves a checkpoint and no OUT; -restart 1 resumes and gives the same adapter as an uninterrupted run,
# bit for bit at the same rank count, with the report's residuals and update changes. Also: stopping at an iteration boundary, resuming on another
# rank count (equal within float32 output rounding), a resume point past -max_iter, a calibration
# file changed in place.
set -euo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1
D=$W/demo
args=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2"
      -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl" -max_iter 4)
mpirun -np 2 "$BIN" "${args[@]}" -out "$W/full" >/dev/null 2>&1
for at in "3 2" "3 0"; do
  rm -rf "$W/int" "$W/int.partial"
  set +e
  ITERIS_FAULT_STOP_AT="$at" mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" >"$W/log" 2>&1
  rc=$?
  set -e
  [ "$rc" -eq 5 ] || { echo "stop at '$at': exit code $rc, want 5"; cat "$W/log"; exit 1; }
  grep -q "restart 1" "$W/log"
  test -f "$W/int.partial/checkpoint.h5"
  test ! -e "$W/int"
  mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" -restart 1 >"$W/log2" 2>&1
  grep -q "resuming at iteration 3" "$W/log2"
  cmp "$W/full/adapter_model.safetensors" "$W/int/adapter_model.safetensors"
  test ! -e "$W/int.partial"
  # the report's per-iteration numbers survive the restart (residuals and the updates' changes, from the checkpoint)
  /usr/bin/python3 - "$W/full/merge_report.json" "$W/int/merge_report.json" <<'PY'
import json, sys
a, b = (json.load(open(f))["modules"] for f in sys.argv[1:3])
for x, y in zip(a, b):
    for key in ("scaled_residual", "update_change"):
        assert x[key] == y[key], (x["module"], key, x[key], y[key])
# none at iteration 1; from 2 on a number (0 exactly where a layer's inputs no longer change: layer 0's q/k/v
# read the embeddings, which the merge does not touch), positive somewhere
assert all(m["update_change"][0] is None and m["update_change"][1] >= 0 for m in b)
assert any(m["update_change"][1] > 0 for m in b)
PY
done
# resume on another rank count, and refuse a checkpoint made with other options
rm -rf "$W/int"
set +e
ITERIS_FAULT_STOP_AT="2 1" mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" >/dev/null 2>&1
mpirun -np 1 "$BIN" "${args[@]}" -alpha_2 1e-3 -out "$W/int" -restart 1 >"$W/log3" 2>&1; rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "other inputs or options" "$W/log3" || { echo "changed options accepted (rc $rc)"; cat "$W/log3"; exit 1; }
mpirun -np 3 "$BIN" "${args[@]}" -out "$W/int" -restart 1 >"$W/log4" 2>&1
grep -q "resuming at iteration 2, layer 2" "$W/log4" || { echo "the cross-rank restart did not resume"; cat "$W/log4"; exit 1; }
/usr/bin/python3 tests/ref/compare_adapters.py "$W/full" "$W/int" 1e-5
# issue 13, defect 2: a resume point past this run's -max_iter is refused; one at its end gives the
# uninterrupted adapter of that -max_iter (and a report that says so); a calibration file changed
# in place under its name is another input
args2=("${args[@]:0:6}" -max_iter 2)
mpirun -np 2 "$BIN" "${args2[@]}" -out "$W/full2" >/dev/null 2>&1
rm -rf "$W/int" "$W/int.partial"
set +e
ITERIS_FAULT_STOP_AT="4 0" mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" >/dev/null 2>&1
mpirun -np 2 "$BIN" "${args2[@]}" -max_iter 1 -out "$W/int" -restart 1 >"$W/log5" 2>&1; rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "has finished 3 iterations, more than this run's -max_iter 1" "$W/log5" ||
  { echo "a resume point past -max_iter was accepted (rc $rc)"; cat "$W/log5"; exit 1; }
rm -rf "$W/int" "$W/int.partial"
set +e
ITERIS_FAULT_STOP_AT="3 0" mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" >/dev/null 2>&1
set -e
mpirun -np 2 "$BIN" "${args2[@]}" -out "$W/int" -restart 1 >/dev/null 2>&1
cmp "$W/full2/adapter_model.safetensors" "$W/int/adapter_model.safetensors"
grep -Eq '"max_iter":[[:space:]]*2,' "$W/int/merge_report.json" || { echo "the report does not say max_iter 2"; exit 1; }
rm -rf "$W/int" "$W/int.partial"
set +e
ITERIS_FAULT_STOP_AT="2 1" mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" >/dev/null 2>&1
head -n 31 "$D/calib_1.jsonl" > "$W/c1" && tail -n 1 "$D/calib_0.jsonl" >> "$W/c1" && cp "$W/c1" "$D/calib_1.jsonl"
mpirun -np 2 "$BIN" "${args[@]}" -out "$W/int" -restart 1 >"$W/log6" 2>&1; rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "other inputs or options" "$W/log6" ||
  { echo "a calibration file changed in place was accepted (rc $rc)"; cat "$W/log6"; exit 1; }
echo "restart: ok"
