#!/usr/bin/env bash
# One residual policy in every mode (docs/ALGORITHM.md, "Checking a solve"): a solve whose scaled
# residual FAILS stops the run with exit 3, one message naming the module and the ridge to raise,
# on every rank, and leaves no OUT. ITERIS_FAULT_RESIDUAL=LABEL makes the solver add 1 to that
# module's solution before the check (so the check itself is what is tested): the data-parallel
# driver, -stages 2, -solve_groups 2, RegMean, and -features. Without the fault the same runs pass.
# Env: ITERIS_BIN (the binary; default build/bin/iteris-mpi).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
D=$W/demo
"$BIN" -make_demo "$D" >/dev/null 2>&1 || { echo "cannot write the demo case"; exit 1; }
/usr/bin/python3 tests/ref/features_ref.py make "$W/feat" >/dev/null || { echo "cannot write the features case"; exit 1; }
M=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2"
   -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl")
F=(-features "$W/feat/rows.h5" -adapters "$W/feat/adapter_0,$W/feat/adapter_1,$W/feat/adapter_2")
bad=0 ok=0
# case NAME LABEL ARGS...: fails with the fault on LABEL (exit 3, message, no OUT), passes without
case_() {
  local name=$1 label=$2; shift 2
  local out=$W/out_$name
  ITERIS_FAULT_RESIDUAL=$label timeout -k 5 120 mpirun -np 2 "$BIN" "$@" -out "$out" >"$W/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 3 ]; then echo "$name: FAILED: exit code $rc with a failing residual, expected 3"; bad=$((bad + 1))
  elif ! grep -q "module '$label': the solve's scaled residual is .*FAILED.*Raise -alpha_2" "$W/$name.log"; then
    echo "$name: FAILED: the message does not name '$label' and -alpha_2:"; grep -a error "$W/$name.log" | head -3
    bad=$((bad + 1))
  elif [ -e "$out" ]; then echo "$name: FAILED: $out exists after a failed solve"; bad=$((bad + 1))
  else echo "$name: ok (exit 3, names $label, no OUT)"; ok=$((ok + 1)); fi
  if ! timeout -k 5 120 mpirun -np 2 "$BIN" "$@" -out "$out" >"$W/$name.ok.log" 2>&1; then
    echo "$name: FAILED: the run without the fault failed:"; tail -5 "$W/$name.ok.log"; bad=$((bad + 1))
  else ok=$((ok + 1)); fi
}
case_ data layers.1.mlp.down_proj "${M[@]}" -max_iter 2
case_ stages layers.0.self_attn.o_proj "${M[@]}" -max_iter 2 -stages 2
case_ groups layers.1.self_attn.q_proj "${M[@]}" -max_iter 2 -solve_groups 2
case_ regmean layers.0.mlp.up_proj "${M[@]}" -method regmean
case_ features encoder.block.0.layer.0.SelfAttention.q "${F[@]}"
echo "residual_policy: $ok ok, $bad failed"
[ "$bad" -eq 0 ]
