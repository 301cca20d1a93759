#!/usr/bin/env bash
# Issue 12's 16-core measurements in one call of the device tool (its time is 15 minutes a session, every try
# and the machine's start included: this script fits one call of at most 9 minutes and leaves room to rerun).
# Prepare here, from the project root (2 minutes):
#   make WERROR=1 && echo "/.device/" >> .git/info/exclude && ../shared/device/make-bundle.sh &&
#   cp ../shared/device/env.sh .device/ && git rev-parse --short HEAD > .device/commit
# Then one call:  run(command="bash bench/device_issue12.sh", carry=[".device"], timeout_s=580)
# Every step writes its own file under $OUT as it goes (a run cut short keeps what it measured):
#   00_machine.txt   lscpu, the commit, OpenBLAS's kernel
#   01_merge_bench_np{1,16}_{columns,partial}.md   statistics and solve against the same-run dgemm
#   02_scaling.md    bench/scaling.sh at NPS (1 2 4 8 16): wall, stages, speed-up, efficiency
#   03_np16_*.log    np 16 with -gram_exchange partial, -grid_rows 2 and 1, -block_size 128 and 32 (-log_view)
#   04_scaling_2layers.md   two layers at np 1 and 16, if time is left
# Local try (packages installed, no bundle): BUNDLE=0 NPS="1 2" VARIANT_NP=2 OUT=/tmp/dev bash bench/device_issue12.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/iteris-device}
NPS=${NPS:-1 2 4 8 16} VARIANT_NP=${VARIANT_NP:-16}
mkdir -p "$OUT"
if [ "${BUNDLE:-1}" = 1 ]; then
  # shellcheck disable=SC1091
  source .device/env.sh .device/bundle.tar.xz || { echo "no bundle: see the header" >&2; exit 1; }
  B=$(mktemp -d)
  mkdir -p "$B/bin" "$B/bench"
  ln -s /opt/itr/bin/iteris-mpi "$B/bin/"
  for p in merge_bench make_case solve_bench forward_bench; do ln -s "/opt/itr/bin/$p" "$B/bench/"; done
  export BUILD=$B
else
  export BUILD=${BUILD:-build} OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  export OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-}
fi
export COMMIT=$(cat .device/commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
X="-x OPENBLAS_CORETYPE -x OPENBLAS_NUM_THREADS"
{ echo "commit $COMMIT; $(date -u)"; nproc; lscpu; echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-}"; } >"$OUT/00_machine.txt" 2>&1
t0=$(date +%s)
step() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$OUT/progress.txt"; }
# 1. the two heavy phases against the same-run dgemm (d 4096, 1024 rows as one task of the case), at one rank and
#    at the largest count, both Gram exchanges
np_max=${NPS##* }
for np in 1 "$np_max"; do
  for how in columns partial; do
    [ "$np" = 1 ] && [ "$how" = partial ] && continue # one rank: the same dsyrk either way
    step "merge_bench np $np $how"
    timeout 120 mpirun --bind-to none $X -np "$np" "$BUILD/bench/merge_bench" -d 4096 -T $((1024 / np)) -R 64 \
      -reps 3 -gram_exchange "$how" >"$OUT/01_merge_bench_np${np}_$how.md" 2>&1
  done
done
# 2. strong scaling of the issue's case (one Llama-3-8B layer, 4 adapters r16, 8 x 128 tokens per task)
step "scaling NPS=$NPS"
NPS="$NPS" BIND="--bind-to none $X" PNG="$OUT/02_scaling.png" KEEP_LOGS="$OUT" timeout 330 bash bench/scaling.sh \
  >"$OUT/02_scaling.md" 2>&1
# 3. the options at the largest count: Gram exchange, grid shape, block size
CASE=/tmp/iteris-token-llama3-8b-1
A=$(seq -s, -f "$CASE/adapter_%g" 0 3) C=$(seq -s, -f "$CASE/calib_%g.jsonl" 0 3)
for v in "-gram_exchange partial" "-grid_rows 2" "-grid_rows 1" "-block_size 128" "-block_size 32"; do
  [ $(($(date +%s) - t0)) -lt 500 ] || { step "out of time: $v not run"; continue; }
  step "np $VARIANT_NP $v"
  rm -rf "$CASE/merged_variant"
  # shellcheck disable=SC2086
  timeout 60 mpirun --bind-to none $X -np "$VARIANT_NP" "$BUILD/bin/iteris-mpi" -base "$CASE/base" -adapters "$A" \
    -calib "$C" -max_iter 1 -plots 0 -out "$CASE/merged_variant" -log_view $v \
    >"$OUT/03_np${VARIANT_NP}_$(echo "$v" | tr -d ' -').log" 2>&1
done
# 4. the steady state: two layers (the first layer's fresh buffers amortised), np 1 and the largest count
if [ $(($(date +%s) - t0)) -lt 430 ]; then
  step "scaling LAYERS=2 NPS=1 $np_max"
  NPS="1 $np_max" LAYERS=2 BIND="--bind-to none $X" PNG="$OUT/04_scaling_2layers.png" timeout 140 bash bench/scaling.sh \
    >"$OUT/04_scaling_2layers.md" 2>&1
else
  step "out of time: the two-layer run not made"
fi
step "done"
