#!/usr/bin/env bash
# Peak RSS per rank vs rank count on a 1-layer Llama-3-8B-shaped case, -max_iter 1
# (results/memory_scaling_llama3_8b.md). NPS: the rank counts (default "1 2 4"); BUILD: the build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
CASE=/tmp/iteris-bench-l3-1layer
[ -f "$CASE/base/config.json" ] || "$BUILD/bench/make_case" "$CASE" llama3-8b 1 4 16 2 128
A="$CASE/adapter_0,$CASE/adapter_1,$CASE/adapter_2,$CASE/adapter_3"
C="$CASE/calib_0.jsonl,$CASE/calib_1.jsonl,$CASE/calib_2.jsonl,$CASE/calib_3.jsonl"
for np in ${NPS:-1 2 4}; do
  echo "== np $np"
  rm -rf "$CASE/merged"
  mpirun -np $np /usr/bin/time -f "rank peak RSS %M KiB, %e s" env OPENBLAS_NUM_THREADS=1 "$BUILD/bin/iteris-mpi" \
    -base "$CASE/base" -adapters "$A" -calib "$C" -max_iter 1 -out "$CASE/merged" 2>&1 | grep -E "peak RSS|merged 4|layer 1/1"
done
