#!/usr/bin/env bash
# Each stage of one merge at one rank against the BLAS peak measured in the same run (issue 12 item 2: every stage
# at >= 70% of it). First dgemm and sgemm per rank (merge_bench: best of REPS, after an untimed call), then the
# merge with -log_view; per -log_view stage: seconds, the flops it logged, GFLOP/s, and the ratio to the peak of its
# precision (sgemm for the float32 forward, dgemm for the float64 statistics, assembly and solves). Stages that log
# no flops (load, write) are listed with their seconds only. Markdown on stdout.
# Env: SHAPE (llama3-8b), LAYERS (1), SEQS x LEN per task (8 x 128), N adapters (4) of RANK (16), MAX_ITER (1),
#      SYSTEM (auto), EXTRA (more options), CASE, BUILD (build), NP (1), REPS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
SHAPE=${SHAPE:-llama3-8b} LAYERS=${LAYERS:-1} SEQS=${SEQS:-8} LEN=${LEN:-128} N=${N:-4} RANK=${RANK:-16} NP=${NP:-1}
CASE=${CASE:-/tmp/iteris-token-$SHAPE-$LAYERS}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include || echo ' + uncommitted changes'); $(date -u +%F)"
[ -f "$CASE/base/config.json" ] || "$BUILD/bench/make_case" "$CASE" "$SHAPE" "$LAYERS" "$N" "$RANK" "$SEQS" "$LEN"
A=$(seq -s, -f "$CASE/adapter_%g" 0 $((N - 1)))
C=$(seq -s, -f "$CASE/calib_%g.jsonl" 0 $((N - 1)))
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mpirun --bind-to none -np "$NP" env OPENBLAS_NUM_THREADS=1 "$BUILD/bench/merge_bench" -d 4096 -T 2048 -R 64 \
  -reps "${REPS:-2}" >"$W/peak.txt"
row=$(grep '^| 4096' "$W/peak.txt")
dgemm=$(awk -F'|' '{gsub(/ /, "", $3); print $3}' <<<"$row")
sgemm=$(awk -F'|' '{gsub(/ /, "", $10); print $10}' <<<"$row")
echo "peak in this run, per rank: dgemm $dgemm GFLOP/s, sgemm $sgemm GFLOP/s (merge_bench -d 4096 -T 2048 at np $NP)"
rm -rf "$CASE/merged_stages"
# shellcheck disable=SC2086
mpirun --bind-to none -np "$NP" env OPENBLAS_NUM_THREADS=1 "$BUILD/bin/iteris-mpi" -base "$CASE/base" -adapters "$A" \
  -calib "$C" -max_iter "${MAX_ITER:-1}" -system "${SYSTEM:-auto}" -plots 0 -out "$CASE/merged_stages" -log_view \
  ${EXTRA:-} >"$W/merge.log" 2>&1
grep -m1 'merged [0-9]* adapters' "$W/merge.log"
echo
echo "| stage | s | GFLOP per rank | GFLOP/s per rank | peak (same run) | of peak |"
echo "|---|---:|---:|---:|---|---:|"
awk -v dg="$dgemm" -v sg="$sgemm" '
  /^Summary of Stages/ {on = 1; next}
  on && /^ *[0-9]+: / {
    name = $2; sub(/:$/, "", name); t = $3 + 0; f = $5 + 0
    if (name == "Main" ) { name = "main"; t = $4 + 0; f = $6 + 0 }
    if (t < 0.005) next
    if (f <= 0) { printf "| %s | %.2f | - | - | - | - |\n", name, t; next }
    pk = name == "forward" || name == "eval" ? sg : dg; pn = name == "forward" || name == "eval" ? "sgemm" : "dgemm"
    printf "| %s | %.2f | %.1f | %.1f | %s %.1f | %.2f |\n", name, t, f / 1e9, f / t / 1e9, pn, pk, f / t / 1e9 / pk
  }
  on && /^$/ && seen {exit}
  on && /^ *[0-9]+: / {seen = 1}' "$W/merge.log"
