#!/usr/bin/env bash
# -features FILE.h5 (docs/FEATURES.md) end to end on a generated T5-shaped case (tests/ref/features_ref.py:
# 3 hand-written PEFT adapters with T5 module names, ranks 2/4/3, a rank_pattern + alpha_pattern, rsLoRA,
# one module that adapter 0 does not target; X/Xt rows per task and module, and the same data reduced to
# statistics). Every module's dW = B A of the output must match an independent dense float64 NumPy
# computation of ALGORITHM.md's formulas within TOL (relative Frobenius), the adaptive weights c_i of
# merge_report.json within 1e-10; the statistics-only file must give the same adapter as the rows file;
# every bad file must fail with exit code 2, a message naming the file and the dataset, and no OUT left.
#
# Runs at np 1, 2, 3 and 4 (each rank reduces its share of the rows; ScaLAPACK solves on all ranks).
# Measured (F64 output): worst relative error of dW 2e-16 .. 3e-15 for iteris / regmean / task arithmetic;
# rows vs statistics 9e-16. A wrong setting on this case moves dW by 1e-2 .. 1 (see the sensitivity lines
# printed at the end), so TOL = 1e-9 separates them by many orders of magnitude. F32 output: 3e-8 (TOL32).
# Env: ITERIS_BIN (the binary; default build/bin/iteris-mpi).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
REF=tests/ref/features_ref.py
TOL=1e-9
TOL32=1e-5
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
C=$W/case
$PY $REF make "$C" || { echo "features: cannot generate the case"; exit 1; }
ADS=$C/adapter_0,$C/adapter_1,$C/adapter_2
bad=0 ok=0

# check LABEL NP FILE "BINARY ARGS" "REFERENCE ARGS"
check() {
  local label=$1 np=$2 file=$3 bargs=$4 rargs=$5 out=$W/out_$1
  # shellcheck disable=SC2086
  if ! timeout -k 5 120 mpirun -np "$np" "$BIN" -features "$C/$file" -adapters "$ADS" -out "$out" $bargs \
    >"$W/$label.log" 2>&1; then
    echo "$label: FAILED: the merge failed:"; tail -n 20 "$W/$label.log"; bad=$((bad + 1)); return
  fi
  # shellcheck disable=SC2086
  if $PY $REF check "$C" "$out" --label "$label" $rargs; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
}

check iteris 1 rows.h5 "-out_dtype F64" ""
check iteris_np2 2 rows.h5 "-out_dtype F64" ""
check iteris_stats 1 stats.h5 "-out_dtype F64" ""
check iteris_np3 3 rows.h5 "-out_dtype F64" ""
check regmean_stats_np4 4 stats.h5 "-out_dtype F64 -method regmean" "--method regmean"
check iteris_ridge_reg_manual 1 rows.h5 "-out_dtype F64 -alpha_1 1e-2 -alpha_2 3e-2 -reg_coef 0.3 -manual_coef 1,2,0.5" \
  "--alpha_1 1e-2 --alpha_2 3e-2 --reg_coef 0.3 --manual_coef 1,2,0.5"
check iteris_ridge_reg_manual_stats 1 stats.h5 "-out_dtype F64 -alpha_1 1e-2 -alpha_2 3e-2 -reg_coef 0.3 -manual_coef 1,2,0.5" \
  "--alpha_1 1e-2 --alpha_2 3e-2 --reg_coef 0.3 --manual_coef 1,2,0.5"
check iteris_f32 1 rows.h5 "" "--tol $TOL32"
check iteris_out_rank 1 stats.h5 "-out_dtype F64 -out_rank 3" "--out_rank 3"
check regmean 1 rows.h5 "-out_dtype F64 -method regmean" "--method regmean"
check regmean_stats_ridge 1 stats.h5 "-out_dtype F64 -method regmean -alpha_2 3e-2 -regmean_alpha 0.5" \
  "--method regmean --alpha_2 3e-2 --regmean_alpha 0.5"
check task_arithmetic 1 rows.h5 "-out_dtype F64 -method task_arithmetic -manual_coef 1,2,0.5 -ta_lambda 0.7" \
  "--method task_arithmetic --manual_coef 1,2,0.5 --ta_lambda 0.7"

# statistics-only file == rows file (adapter for adapter, every module)
for pair in "iteris iteris_stats" "iteris_ridge_reg_manual iteris_ridge_reg_manual_stats"; do
  set -- $pair
  if [ -d "$W/out_$1" ] && [ -d "$W/out_$2" ] && $PY tests/ref/compare_adapters.py "$W/out_$1" "$W/out_$2" 1e-12; then
    ok=$((ok + 1)); echo "rows vs statistics ($1): PASSED"
  else
    bad=$((bad + 1)); echo "rows vs statistics ($1): FAILED"
  fi
done

# bad files: exit 2, the message names the file and the dataset, no OUT nor OUT.partial left
expect() {
  local label=$1 want=$2; shift 2
  local out rc
  out=$(timeout -k 5 120 mpirun -np 2 "$BIN" -adapters "$ADS" -out "$W/bad_out" "$@" 2>&1); rc=$?
  if [ "$rc" -eq 2 ] && grep -qF -- "$want" <<<"$out" && [ ! -e "$W/bad_out" ] && [ ! -e "$W/bad_out.partial" ]; then
    ok=$((ok + 1))
  else
    bad=$((bad + 1)); echo "FAILED: $label: exit $rc (want 2), want '$want', output:"; echo "$out" | head -n 8
  fi
}
for kind in missing_xt missing_x rows_mismatch din_mismatch nan no_w0 w0_shape extra_task stats_asym stats_shape both; do
  want=$($PY $REF bad "$C" "$kind") || { bad=$((bad + 1)); echo "cannot make bad_$kind"; continue; }
  expect "$kind" "$want" -features "$C/bad_$kind.h5"
  expect "$kind (names the file)" "bad_$kind.h5" -features "$C/bad_$kind.h5"
done
# options: unused by this mode or method, unsupported method, missing file, adapter shape disagreement
expect "max_iter" "option -max_iter is not used with -features" -features "$C/rows.h5" -max_iter 3
expect "calib" "option -calib is not used with -features" -features "$C/rows.h5" -calib "$C/x.jsonl"
expect "base" "option -base is not used with -features" -features "$C/rows.h5" -base "$C"
expect "ta_lambda" "option -ta_lambda is not used with -features by -method iteris" -features "$C/rows.h5" -ta_lambda 2
expect "ties" "-features supports -method iteris, regmean and task_arithmetic" -features "$C/rows.h5" -method ties -out_rank 2
expect "missing file" "$C/nope.h5" -features "$C/nope.h5"
cp -r "$C/adapter_2" "$W/adapter_x"
$PY - "$W/adapter_x" <<'PY'
import os, sys
sys.path.insert(0, "tests/ref")
import features_ref, safetensors_np
d = sys.argv[1]
t = safetensors_np.load(os.path.join(d, "adapter_model.safetensors"))
k = "base_model.model.encoder.block.0.layer.0.SelfAttention.v.lora_A.weight"
t[k] = t[k][:, :-1]
features_ref.write_safetensors(os.path.join(d, "adapter_model.safetensors"), t)
PY
out=$(timeout -k 5 120 mpirun -np 2 "$BIN" -features "$C/rows.h5" -adapters "$C/adapter_0,$C/adapter_1,$W/adapter_x" \
  -out "$W/bad_out" 2>&1); rc=$?
if [ "$rc" -eq 2 ] && grep -qF "module encoder.block.0.layer.0.SelfAttention.v has shape (16, 23)" <<<"$out" && [ ! -e "$W/bad_out" ]; then
  ok=$((ok + 1))
else
  bad=$((bad + 1)); echo "FAILED: adapter shape mismatch: exit $rc"; echo "$out" | head -n 5
fi

# the generic adapter reader agrees with the Llama one: task arithmetic on the demo's Llama adapters
# (ranks 4/8/16) from an empty features file == the built-in pipeline's task arithmetic
if "$BIN" -make_demo "$W/demo" >/dev/null 2>&1 && $PY -c "import h5py, sys; h5py.File(sys.argv[1], 'w').close()" "$W/empty.h5" &&
  DA=$W/demo/adapter_0,$W/demo/adapter_1,$W/demo/adapter_2 &&
  "$BIN" -features "$W/empty.h5" -adapters "$DA" -method task_arithmetic -manual_coef 1,2,0.5 -out_dtype F64 \
    -out "$W/ta_feat" >/dev/null 2>&1 &&
  "$BIN" -base "$W/demo/base" -adapters "$DA" -method task_arithmetic -manual_coef 1,2,0.5 -out_dtype F64 \
    -out "$W/ta_llama" >/dev/null 2>&1 &&
  $PY tests/ref/compare_adapters.py "$W/ta_feat" "$W/ta_llama" 1e-12; then
  ok=$((ok + 1)); echo "generic vs Llama adapter reader (demo, task_arithmetic): PASSED"
else
  bad=$((bad + 1)); echo "generic vs Llama adapter reader (demo, task_arithmetic): FAILED"
fi

# sensitivity: the reference with a wrong setting must NOT match (the comparison can fail)
for wrong in "--reg_coef 0" "--manual_coef 1,1,1" "--alpha_1 0" "--alpha_2 0"; do
  # shellcheck disable=SC2086
  if $PY $REF check "$C" "$W/out_iteris_ridge_reg_manual" --label "sensitivity($wrong)" --alpha_1 1e-2 --alpha_2 3e-2 \
    --reg_coef 0.3 --manual_coef 1,2,0.5 $wrong >"$W/sens.log" 2>&1; then
    bad=$((bad + 1)); echo "FAILED: the reference with $wrong still matches"
  else
    ok=$((ok + 1)); tail -n 1 "$W/sens.log"
  fi
done

echo "features: $ok ok, $bad failed"
[ "$bad" -eq 0 ]
