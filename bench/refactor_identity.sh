#!/usr/bin/env bash
# The adapters a refactoring must leave unchanged (results/refactor_identity.md): the demo merged with every
# method, -features on the generated T5-shaped case, and the Llama-3-8B-shaped bench case (bench/make_case
# llama3-8b 2 4 16 8 128, -max_iter 2) at np 1, 2, 3, np 2 with -stages 2 and np 3 with -solve_groups 2.
# Prints "label sha256" per adapter_model.safetensors and keeps each adapter under KEEP/label/ so two runs
# can be compared (tests/ref/compare_adapters.py) when they differ.
# Env: ITERIS_BIN (binary), MAKE_CASE (bench/make_case binary), KEEP (folder for the adapters),
#      CASE (bench case folder, generated when missing), ONLY (space-separated labels to run; default all).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(readlink -f "${ITERIS_BIN:-build/bin/iteris-mpi}")
MAKE_CASE=${MAKE_CASE:-build/bench/make_case}
KEEP=${KEEP:-/tmp/iteris-identity}
CASE=${CASE:-/tmp/iteris-bench-llama3-8b}
DEMO=${DEMO:-/tmp/iteris-identity-demo}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
mkdir -p "$KEEP"
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
# run LABEL NP ARGS...: one merge into $KEEP/LABEL, its sha256 printed
run() {
  local label=$1 np=$2; shift 2
  want "$label" || return 0
  rm -rf "$KEEP/$label" "$KEEP/$label.partial"
  local t0=$SECONDS
  mpirun -np "$np" "$BIN" "$@" -out "$KEEP/$label" >"$KEEP/$label.log" 2>&1 ||
    { echo "$label: the merge failed (log: $KEEP/$label.log)"; tail -5 "$KEEP/$label.log"; return 1; }
  printf '%-28s %s  %4d s\n' "$label" "$(sha256sum <"$KEEP/$label/adapter_model.safetensors" | cut -d' ' -f1)" \
    $((SECONDS - t0))
}
[ -f "$DEMO/base/config.json" ] || "$BIN" -make_demo "$DEMO" >/dev/null
D=(-base "$DEMO/base" -adapters "$DEMO/adapter_0,$DEMO/adapter_1,$DEMO/adapter_2"
   -calib "$DEMO/calib_0.jsonl,$DEMO/calib_1.jsonl,$DEMO/calib_2.jsonl"
   -heldout "$DEMO/heldout_0.jsonl,$DEMO/heldout_1.jsonl,$DEMO/heldout_2.jsonl")
run demo-iteris 2 "${D[@]}" -max_iter 5
run demo-regmean 2 "${D[@]}" -method regmean
run demo-task_arithmetic 2 "${D[@]}" -method task_arithmetic
run demo-ties 2 "${D[@]}" -method ties -out_rank 8
run demo-dare 2 "${D[@]}" -method dare -seed 3 -out_rank 8
run demo-knots 2 "${D[@]}" -method knots -out_rank 8
run demo-iteris-np3-stages3 3 "${D[@]}" -max_iter 3 -stages 3
if want features-iteris || want features-regmean; then
  F=$KEEP/features-case
  [ -f "$F/rows.h5" ] || /usr/bin/python3 tests/ref/features_ref.py make "$F" >/dev/null
  FA=(-adapters "$F/adapter_0,$F/adapter_1,$F/adapter_2" -out_dtype F64)
  run features-iteris 2 -features "$F/rows.h5" "${FA[@]}"
  run features-regmean 2 -features "$F/rows.h5" "${FA[@]}" -method regmean
fi
if want llama3-np1 || want llama3-np2 || want llama3-np3 || want llama3-np2-stages2 || want llama3-np3-groups2; then
  [ -f "$CASE/base/config.json" ] || "$MAKE_CASE" "$CASE" llama3-8b 2 4 16 8 128 >/dev/null
  L=(-base "$CASE/base" -adapters "$CASE/adapter_0,$CASE/adapter_1,$CASE/adapter_2,$CASE/adapter_3"
     -calib "$CASE/calib_0.jsonl,$CASE/calib_1.jsonl,$CASE/calib_2.jsonl,$CASE/calib_3.jsonl" -max_iter 2)
  run llama3-np1 1 "${L[@]}"
  run llama3-np2 2 "${L[@]}"
  run llama3-np2-stages2 2 "${L[@]}" -stages 2
  run llama3-np3 3 "${L[@]}"
  run llama3-np3-groups2 3 "${L[@]}" -solve_groups 2
fi
