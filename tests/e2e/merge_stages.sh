#!/usr/bin/env bash
# Pipeline stages (-stages S) on the generated demo case (4 layers):
#  1. the merge equals the one of -np 1 without stages within 1e-10 relative, for even and uneven
#     stages (np 2, 3, 4, 5 with S = 2, 2, 4, 3), with -solve_groups inside a stage, with RegMean, and
#     with 160-token tasks (both c_i paths); the held-out fidelity through the stages equals -np 1's;
#  2. a run stopped in several places (as by SIGTERM) exits with 5 and resumes with -restart 1 to the
#     same adapter, bit for bit; a checkpoint of a run without stages is refused;
#  3. an allocation failure on one rank of the first or of the last stage ends every rank with exit
#     code 4 and the message of that allocation (no hang, no adapter in -out);
#  4. more stages than ranks or layers is an input error.
set -euo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1
D=$W/demo
base=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2"
      -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl" -out_dtype F64)
args=("${base[@]}" -max_iter 3)
cmp_ad() { /usr/bin/python3 tests/ref/compare_adapters.py "$1" "$2" 1e-10; }

# 1. invariance
mpirun -np 1 "$BIN" "${args[@]}" -out "$W/np1" >/dev/null 2>&1
for run in "2 2" "3 2" "4 4" "5 3" "4 2 -solve_groups 2"; do
  read -r np S extra <<<"$run"
  out="$W/s$np-$S${extra// /}"
  # shellcheck disable=SC2086
  timeout -k 5 120 mpirun -np "$np" "$BIN" "${args[@]}" -stages "$S" $extra -out "$out" >"$out.log" 2>&1 ||
    { echo "np $np -stages $S $extra failed:"; tail -5 "$out.log"; exit 1; }
  grep -q "$S pipeline stages" "$out.log"
  cmp_ad "$W/np1" "$out"
  /usr/bin/python3 - "$out/merge_report.json" "$S" "$np" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); S, P = int(sys.argv[2]), int(sys.argv[3])
assert r["stages"] == S and r["ranks"] == P, (r["stages"], r["ranks"])
st = r["stage_timings"]
assert [s["stage"] for s in st] == list(range(1, S + 1)), st
assert st[0]["first_layer"] == 0 and st[-1]["last_layer"] == 3, st  # the demo's 4 layers, all covered
assert all(st[i]["last_layer"] + 1 == st[i + 1]["first_layer"] for i in range(S - 1)), st
assert st[0]["seconds_waiting"] == 0 and all(0 <= s["seconds_waiting"] <= s["seconds"] for s in st), st
PY
  ls "$out" | grep -q checkpoint && { echo "checkpoint files left in $out"; exit 1; }
done
mpirun -np 1 "$BIN" "${args[@]}" -max_tokens 5 -out "$W/np1t5" >/dev/null 2>&1
timeout -k 5 120 mpirun -np 3 "$BIN" "${args[@]}" -max_tokens 5 -stages 3 -out "$W/s3t5" >/dev/null 2>&1
cmp_ad "$W/np1t5" "$W/s3t5"
mpirun -np 1 "$BIN" "${base[@]}" -method regmean -out "$W/rm1" >/dev/null 2>&1
timeout -k 5 120 mpirun -np 3 "$BIN" "${base[@]}" -method regmean -stages 2 -out "$W/rm3" >/dev/null 2>&1
cmp_ad "$W/rm1" "$W/rm3"

# held-out fidelity through the pipeline (each stage runs only its layers) equals the one of -np 1
H=(-heldout "$D/heldout_0.jsonl,$D/heldout_1.jsonl,$D/heldout_2.jsonl")
mpirun -np 1 "$BIN" "${args[@]}" "${H[@]}" -out "$W/h1" >/dev/null 2>&1
timeout -k 5 120 mpirun -np 4 "$BIN" "${args[@]}" "${H[@]}" -stages 3 -out "$W/h4" >/dev/null 2>&1
cmp_ad "$W/h1" "$W/h4"
/usr/bin/python3 - "$W/h1/merge_report.json" "$W/h4/merge_report.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for ta, tb in zip(a["tasks"], b["tasks"]):
    for key in ("kl_ratio", "top1"):
        x, y = ta[key], tb[key]
        assert x is not None and abs(x - y) <= 1e-9 * max(1.0, abs(x)), (key, x, y)
print("held-out fidelity through 3 stages: equal to -np 1 within 1e-9")
PY

# 2. stop and restart
rargs=("${base[@]}" -max_iter 4)
mpirun -np 3 "$BIN" "${rargs[@]}" -stages 2 -out "$W/full" >/dev/null 2>&1
for at in "3 2" "3 0" "2 3" "1 1"; do
  rm -rf "$W/int" "$W/int.partial"
  set +e
  ITERIS_FAULT_STOP_AT="$at" timeout -k 5 120 mpirun -np 3 "$BIN" "${rargs[@]}" -stages 2 -out "$W/int" >"$W/log" 2>&1
  rc=$?
  set -e
  [ "$rc" -eq 5 ] || { echo "stop at '$at': exit code $rc, want 5"; tail -5 "$W/log"; exit 1; }
  grep -q "restart 1" "$W/log"
  test ! -e "$W/int"
  timeout -k 5 120 mpirun -np 3 "$BIN" "${rargs[@]}" -stages 2 -out "$W/int" -restart 1 >"$W/log2" 2>&1
  read -r k _ <<<"$at"
  if [ "$k" -gt 1 ]; then grep -q "resuming at iteration $k" "$W/log2"; else grep -q "no checkpoint" "$W/log2"; fi
  cmp "$W/full/adapter_model.safetensors" "$W/int/adapter_model.safetensors"
  test ! -e "$W/int.partial"
done
# four stages, eight iterations: each stage drops the files no restart can need (the last keeps two)
r8=("${base[@]}" -max_iter 8 -stages 4)
mpirun -np 4 "$BIN" "${r8[@]}" -out "$W/full8" >/dev/null 2>&1
rm -rf "$W/int" "$W/int.partial"
set +e
ITERIS_FAULT_STOP_AT="6 3" timeout -k 5 120 mpirun -np 4 "$BIN" "${r8[@]}" -out "$W/int" >/dev/null 2>&1; rc=$?
set -e
[ "$rc" -eq 5 ]
n_last=$(ls "$W/int.partial" | grep -c "stage4of4")
n_all=$(ls "$W/int.partial" | grep -c "checkpoint.stage")
echo "checkpoint files after a stop in iteration 6 of 8: $n_all in all, $n_last of the last stage"
[ "$n_last" -le 2 ] && [ "$n_all" -lt 24 ]
timeout -k 5 120 mpirun -np 4 "$BIN" "${r8[@]}" -out "$W/int" -restart 1 >/dev/null 2>&1
cmp "$W/full8/adapter_model.safetensors" "$W/int/adapter_model.safetensors"
rm -rf "$W/int" "$W/int.partial"
set +e
ITERIS_FAULT_STOP_AT="2 1" mpirun -np 2 "$BIN" "${rargs[@]}" -out "$W/int" >/dev/null 2>&1
timeout -k 5 60 mpirun -np 2 "$BIN" "${rargs[@]}" -stages 2 -out "$W/int" -restart 1 >"$W/log3" 2>&1; rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "without -stages" "$W/log3" || { echo "a checkpoint without stages was accepted (rc $rc)"; exit 1; }

# 3. allocation failures on one rank of stage 1 (rank 0) or stage 2 (rank 3 of 4, its second rank)
fargs=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl"
       -heldout "$D/heldout_0.jsonl,$D/heldout_1.jsonl" -max_iter 2 -stages 2 -out "$W/fo")
bad=0; stopped=0
set +e
for rank in 0 3; do
  for k in $(seq 150 150 2250); do
    rm -rf "$W/fo" "$W/fo.partial"
    out=$(ITERIS_FAULT_ALLOC="$rank:$k" timeout -k 5 120 mpirun -np 4 "$BIN" "${fargs[@]}" 2>&1); rc=$?
    case $rc in
      0) [ -f "$W/fo/adapter_model.safetensors" ] || { echo "rank $rank k $k: exit 0 without an adapter"; bad=$((bad + 1)); } ;;
      4) stopped=$((stopped + 1)); echo "rank $rank k $k: $(grep -m1 'error:' <<<"$out" | cut -c1-110)"
         grep -q "out of memory allocating" <<<"$out" || { echo "rank $rank k $k: no allocation message"; bad=$((bad + 1)); }
         [ ! -e "$W/fo/adapter_model.safetensors" ] || { echo "rank $rank k $k: adapter after a failure"; bad=$((bad + 1)); } ;;
      *) echo "rank $rank k $k: exit code $rc (124 = hang)"; echo "$out" | tail -5; bad=$((bad + 1)) ;;
    esac
  done
done
set -e
echo "stages fault injection: $stopped runs stopped cleanly, $bad problems"
[ "$bad" -eq 0 ] && [ "$stopped" -ge 24 ]

# 4. impossible layouts
set +e
o=$(mpirun -np 2 "$BIN" "${args[@]}" -stages 3 -out "$W/x" 2>&1); rc=$?
[ "$rc" -eq 2 ] && grep -q "needs at least 3 ranks" <<<"$o" || { echo "-stages 3 on 2 ranks: rc $rc"; exit 1; }
o=$(mpirun -np 5 "$BIN" "${args[@]}" -stages 5 -out "$W/x" 2>&1); rc=$?
[ "$rc" -eq 2 ] && grep -q "more than the 4 layers" <<<"$o" || { echo "-stages 5 with 4 layers: rc $rc"; exit 1; }
set -e
test ! -e "$W/x"
echo "stages: ok"
