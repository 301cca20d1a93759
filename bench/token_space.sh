#!/usr/bin/env bash
# Token-space systems (-system, docs/ALGORITHM.md) against d_in-space ones on a generated real-shaped case, in one
# run: the same-run dgemm rate per rank (merge_bench -d 4096), then the same merge with -system inputs and -system
# auto (which takes token space where n < d_in pays), each with -log_view, wall time and peak RSS per rank, and
# the two adapters compared (tests/ref/compare_adapters.py). Prints the lines results/token_space_*.md quote.
# Env: SHAPE (llama3-8b), LAYERS (1), NP (2), SEQS x LEN per task (8 x 128), N adapters (4) of RANK (16),
#      MAX_ITER (1), SYSTEMS ("inputs auto"), CASE (folder; generated when missing), BUILD (build).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
SHAPE=${SHAPE:-llama3-8b} LAYERS=${LAYERS:-1} NP=${NP:-2} SEQS=${SEQS:-8} LEN=${LEN:-128} N=${N:-4} RANK=${RANK:-16}
CASE=${CASE:-/tmp/iteris-token-$SHAPE-$LAYERS}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB;" \
  "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include || echo ' + uncommitted changes'); $(date -u +%F)"
[ -f "$CASE/base/config.json" ] || "$BUILD/bench/make_case" "$CASE" "$SHAPE" "$LAYERS" "$N" "$RANK" "$SEQS" "$LEN"
A=$(seq -s, -f "$CASE/adapter_%g" 0 $((N - 1)))
C=$(seq -s, -f "$CASE/calib_%g.jsonl" 0 $((N - 1)))
echo "== dgemm rate per rank in this run: mpirun -np $NP merge_bench -d 4096 -T 2048 -R 64"
mpirun -np "$NP" env OPENBLAS_NUM_THREADS=1 "$BUILD/bench/merge_bench" -d 4096 -T 2048 -R 64 -reps 1 | grep -E '^\|'
for sys in ${SYSTEMS:-inputs auto}; do
  echo "== -system $sys"
  rm -rf "$CASE/merged_$sys"
  mpirun -np "$NP" /usr/bin/time -f "rank peak RSS %M KiB, %e s" env OPENBLAS_NUM_THREADS=1 \
    "$BUILD/bin/iteris-mpi" -base "$CASE/base" -adapters "$A" -calib "$C" -max_iter "${MAX_ITER:-1}" -system "$sys" \
    -out_dtype F64 -out "$CASE/merged_$sys" -log_view 2>&1 |
    grep -E 'rank peak RSS|merged [0-9]+ adapters|max scaled residual|^(ItrForward|ItrGram|ItrAssemble|ItrSolve) |^ *[0-9]+: +(load|forward|statistics|reduce|assemble|solve|write):' || true
done
set -- ${SYSTEMS:-inputs auto}
if [ $# -ge 2 ] && [ -d "$CASE/merged_$1" ] && [ -d "$CASE/merged_$2" ]; then
  echo "== -system $1 vs $2: $(/usr/bin/python3 tests/ref/compare_adapters.py "$CASE/merged_$1" "$CASE/merged_$2" 1e-9 2>&1 | tail -n 1)"
fi
