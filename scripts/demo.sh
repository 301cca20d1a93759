#!/usr/bin/env bash
# The bundled demo: generate a tiny Llama with three PEFT adapters and calibration data (demo/),
# merge it with IterIS, RegMean and task arithmetic on NP ranks (default 2), print the fidelity table.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/bin/iteris-mpi}
NP=${NP:-2}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
[ -f demo/base/tokenizer.json ] && [ -f demo/calib_text_0.jsonl ] || "$BIN" -make_demo demo
for job in demo demo-regmean demo-task-arithmetic demo-text; do
  echo "== mpirun -np $NP $BIN -options_file jobs/$job.yaml"
  mpirun -np "$NP" "$BIN" -options_file "jobs/$job.yaml"
done
echo
echo "fidelity on held-out sequences (kl_ratio: 0 = as the task's own adapter, 1 = as the base model)"
printf "%-18s %10s %8s\n" method kl_ratio top1
for m in iteris regmean task_arithmetic iteris-text; do
  r=demo/merged-$m/merge_report.json
  kl=$(grep -A3 '"fidelity_mean"' "$r" | sed -n 's/.*"kl_ratio":[[:space:]]*\([^,]*\),*/\1/p')
  t1=$(grep -A3 '"fidelity_mean"' "$r" | sed -n 's/.*"top1":[[:space:]]*\([^,]*\),*/\1/p')
  printf "%-18s %10.4f %8.4f\n" "${m/-text/ (from text)}" "$kl" "$t1"
done
echo "(from text: calibration and held-out files of {\"text\": ...} lines, tokenised by demo/base/tokenizer.json;"
echo " other sequences than the id files' (words, not sampled ids), so its row is not comparable with the others)"
echo "merged adapters: demo/merged-*/ (PEFT format); reports: demo/merged-*/merge_report.json;"
echo "plots: demo/merged-iteris/convergence.png, demo/merged-iteris-text/convergence.png"
