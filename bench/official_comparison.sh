#!/usr/bin/env bash
# iteris-mpi's merge step against the official one (bench/official_step.py: the PyTorch port of IterIS.py's
# solution_matrix) on the same layer shape, the same tasks and tokens, the same threads, in one run:
#   1. the machine's rates in this run (dgemm per rank under mpirun; torch's float32/float64 matmul),
#   2. iteris-mpi -max_iter 1 -log_view at np NP (one thread per rank) on a generated case of that shape
#      (bench/make_case: 1 layer, N adapters of rank RANK, SEQS x LEN tokens per task),
#   3. the official step with torch.set_num_threads(NP) on random inputs of the same sizes.
# Prints the lines results/official_comparison.md quotes. python3-torch (Debian) is installed here if missing:
# the project itself never needs it.
# Env: SHAPE (llama3-8b), NP (2), N (4), RANK (16), SEQS (8), LEN (128), SYSTEM (auto), CASE, BUILD (build).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
SHAPE=${SHAPE:-llama3-8b} NP=${NP:-2} N=${N:-4} RANK=${RANK:-16} SEQS=${SEQS:-8} LEN=${LEN:-128}
CASE=${CASE:-/tmp/iteris-official-$SHAPE}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "installing python3-torch (Debian) for the official step"
  if [ "$(id -u)" -eq 0 ]; then apt-get install -y python3-torch >/dev/null; else sudo apt-get install -y python3-torch >/dev/null; fi
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB;" \
  "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include || echo ' + uncommitted changes'); $(date -u +%F);" \
  "torch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)')"
[ -f "$CASE/base/config.json" ] || "$BUILD/bench/make_case" "$CASE" "$SHAPE" 1 "$N" "$RANK" "$SEQS" "$LEN"
A=$(seq -s, -f "$CASE/adapter_%g" 0 $((N - 1)))
C=$(seq -s, -f "$CASE/calib_%g.jsonl" 0 $((N - 1)))
echo "== dgemm rate per rank in this run: mpirun -np $NP merge_bench -d 4096 -T 2048 -R 64"
mpirun -np "$NP" env OPENBLAS_NUM_THREADS=1 "$BUILD/bench/merge_bench" -d 4096 -T 2048 -R 64 -reps 1 | grep -E '^\|'
echo "== iteris-mpi: mpirun -np $NP iteris-mpi -max_iter 1 -system ${SYSTEM:-auto} -log_view ($N adapters r $RANK, $SEQS x $LEN tokens per task)"
rm -rf "$CASE/merged"
t0=$(date +%s.%N)
mpirun -np "$NP" env OPENBLAS_NUM_THREADS=1 "$BUILD/bin/iteris-mpi" -base "$CASE/base" -adapters "$A" -calib "$C" \
  -max_iter 1 -system "${SYSTEM:-auto}" -out "$CASE/merged" -log_view >"$CASE/iteris.log" 2>&1
t1=$(date +%s.%N)
grep -E '^ *[0-9]+: +(load|forward|statistics|reduce|assemble|solve|write):' "$CASE/iteris.log" || true
echo "iteris-mpi wall: $(echo "$t1 - $t0" | bc) s"
echo "== official step: official_step.py --shape $SHAPE --tasks $N --tokens $((SEQS * LEN)) --rank $RANK --threads $NP"
OMP_NUM_THREADS=$NP /usr/bin/python3 bench/official_step.py --shape "$SHAPE" --tasks "$N" --tokens $((SEQS * LEN)) \
  --rank "$RANK" --threads "$NP"
