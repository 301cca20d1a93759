#!/usr/bin/env bash
# make bench: the benchmarks of results/, each printing its own same-run BLAS peak.
#   forward_bench  one Llama-2-7B layer, tokens/s vs sgemm          -> results/forward_bench.md
#   merge_bench    the product's statistics and solve (src/dist, as site.c calls them) GFLOP/s per rank vs
#                  dgemm on every rank in the same run (NP ranks, DS sizes) -> results/merge_bench.md
#   pipeline       the whole merge on a Llama-3-8B-shaped 2-layer case, time, peak memory per rank,
#                  -log_view                                         -> results/pipeline_llama3_8b.md
#   memory         peak memory per rank vs rank count, one such layer -> results/memory_scaling_llama3_8b.md
#   train          a LoRA training step against the forward (tokens/s, ratio, peak RSS) -> results/train_bench.md
# BENCH=forward|merge|pipeline|memory runs one; NP (default 2) ranks for the pipeline (EXTRA: more options, e.g.
# "-stages 2"), NPS (default "1 2 4")
# rank counts for memory.
set -euo pipefail
BUILD=${BUILD:-build}
B=$BUILD/bench
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
which=${BENCH:-all}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}"
if [ "$which" = all ] || [ "$which" = forward ]; then
  echo "== OPENBLAS_NUM_THREADS=1 $B/forward_bench"
  OPENBLAS_NUM_THREADS=1 "$B/forward_bench"
fi
if [ "$which" = all ] || [ "$which" = train ]; then
  for a in "-T 512 -seq 128 -r 16 -targets all" "-T 512 -seq 128 -r 16 -targets qv"; do
    echo "== OPENBLAS_NUM_THREADS=1 $B/train_bench $a"
    OPENBLAS_NUM_THREADS=1 "$B/train_bench" $a
  done
  if [ -f ../shared/models/stories260K/config.json ]; then
    echo "== OPENBLAS_NUM_THREADS=1 $B/train_bench -base ../shared/models/stories260K -T 256 -seq 64 -r 8"
    OPENBLAS_NUM_THREADS=1 "$B/train_bench" -base ../shared/models/stories260K -T 256 -seq 64 -r 8
  fi
fi
if [ "$which" = all ] || [ "$which" = merge ]; then
  NPM=${NP:-2} DS=${DS:-4096,8192,14336}
  echo "== mpirun -np $NPM env OPENBLAS_NUM_THREADS=1 $B/merge_bench -d $DS -T 2048 -R 64 -reps 1"
  mpirun -np "$NPM" env OPENBLAS_NUM_THREADS=1 "$B/merge_bench" -d "$DS" -T 2048 -R 64 -reps 1
fi
if [ "$which" = all ] || [ "$which" = pipeline ]; then
  NP=${NP:-2}
  CASE=${CASE:-/tmp/iteris-bench-llama3-8b}
  [ -f "$CASE/base/config.json" ] || "$B/make_case" "$CASE" llama3-8b 2 4 16 8 128
  A="$CASE/adapter_0,$CASE/adapter_1,$CASE/adapter_2,$CASE/adapter_3"
  C="$CASE/calib_0.jsonl,$CASE/calib_1.jsonl,$CASE/calib_2.jsonl,$CASE/calib_3.jsonl"
  cmd=(mpirun -np "$NP" /usr/bin/time -f "rank peak RSS %M KiB, %e s" env OPENBLAS_NUM_THREADS=1
       "$BUILD/bin/iteris-mpi" -base "$CASE/base" -adapters "$A" -calib "$C" -max_iter "${MAX_ITER:-2}"
       -out "$CASE/merged" -log_view ${EXTRA:-})
  echo "== ${cmd[*]}"
  "${cmd[@]}"
fi
if [ "$which" = all ] || [ "$which" = memory ]; then
  echo "== bench/memory_scaling.sh"
  BUILD=$BUILD bash "$(dirname "$0")/memory_scaling.sh"
fi
