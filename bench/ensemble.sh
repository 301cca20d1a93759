#!/usr/bin/env bash
# LoRA ensembles (issue 14, item 4) on real data: M LoRA adapters of one task trained from different seeds on
# stories260K, scored on the task's held-out questions one by one and as their probability-averaged ensemble
# (-ensemble: accuracy, NLL of the label, ECE with 10 equal-width bins), then merged into one adapter with every
# method (calibration: the task's calib.jsonl for each member) and each merge scored the same way.
# Prints the table results/ensemble.md quotes.
# Env: TASK (isear), M (4), NP (2), STEPS (300), LR (3e-3), DROPOUT (0.1), R (8), OUT (/tmp/iteris-ensemble), BUILD.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build} BIN=${BUILD:-build}/bin/iteris-mpi
TASK=${TASK:-isear} M=${M:-4} NP=${NP:-2} STEPS=${STEPS:-300} LR=${LR:-3e-3} DROPOUT=${DROPOUT:-0.1} R=${R:-8}
OUT=${OUT:-/tmp/iteris-ensemble}/$TASK
BASE=../shared/models/stories260K D=bench/data/$TASK
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $(date -u +%F); task $TASK; $M members"
rm -rf "$OUT"; mkdir -p "$OUT"
members=()
for s in $(seq 1 "$M"); do
  cmd=(mpirun -np "$NP" "$BIN" -train -base "$BASE" -data "$D/train.jsonl" -out "$OUT/member$s" -r "$R" -lora_alpha $((2 * R))
       -targets all -steps "$STEPS" -batch 16 -lr "$LR" -warmup 10 -lora_dropout "$DROPOUT" -seed "$s" -log_every 0)
  [ "$s" -eq 1 ] && echo "== ${cmd[*]}"
  "${cmd[@]}" >"$OUT/train$s.log" 2>&1
  members+=("$OUT/member$s")
done
list=$(IFS=,; echo "${members[*]}")
echo "== mpirun -np $NP iteris-mpi -base $BASE -ensemble $list -heldout $D/heldout.jsonl"
mpirun -np "$NP" "$BIN" -base "$BASE" -ensemble "$list" -heldout "$D/heldout.jsonl" -eval_out "$OUT/ensemble.json"
calib=$(for s in $(seq 1 "$M"); do printf '%s,' "$D/calib.jsonl"; done); calib=${calib%,}
# members of one task: task arithmetic and DARE average them (-ta_lambda 1/M: the "model soup"); TIES and KnOTS
# take their own disjoint mean (-ta_lambda 1); the dense methods are written at rank M r
lam=$(echo "scale=6; 1 / $M" | bc)
for method in iteris regmean task_arithmetic ties dare knots; do
  extra=()
  case $method in task_arithmetic) extra=(-ta_lambda "$lam") ;; dare) extra=(-ta_lambda "$lam" -out_rank $((M * R))) ;;
    ties|knots) extra=(-out_rank $((M * R))) ;; esac
  cmd=(mpirun -np "$NP" "$BIN" -base "$BASE" -adapters "$list" -calib "$calib" -method "$method" "${extra[@]}" -plots 0
       -out "$OUT/merged_$method")
  echo "== ${cmd[*]}"
  t0=$(date +%s.%N); "${cmd[@]}" >"$OUT/merge_$method.log" 2>&1 || { echo "merge $method failed"; tail -n 5 "$OUT/merge_$method.log"; continue; }
  echo "merge $method: $(echo "$(date +%s.%N) - $t0" | bc) s"
  mpirun -np "$NP" "$BIN" -base "$BASE" -ensemble "$OUT/merged_$method" -heldout "$D/heldout.jsonl" | tail -n 1
done
