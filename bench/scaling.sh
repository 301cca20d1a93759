#!/usr/bin/env bash
# Strong scaling of one merge (issue 12 item 6): the same case at each rank count of NPS, in one run, after the
# same-run dgemm rate per rank. Per run: wall time, the -log_view stages (forward, statistics, solve), speed-up and
# parallel efficiency against the smallest rank count; the table goes to stdout (Markdown) and the plot to
# PNG (gnuplot: speed-up against ideal, and the phases' seconds per rank count).
# Env: NPS ("1 2"; "1 2 4 8 16" on a 16-core machine), SHAPE (llama3-8b), LAYERS (1), SEQS x LEN per task (8 x 128),
#      N adapters (4) of RANK (16), MAX_ITER (1), SYSTEM (auto), EXTRA (more options), CASE, BUILD (build),
#      PNG (where the plot goes; default /tmp/iteris-scaling.png), BIND (mpirun binding, default "--bind-to none"),
#      KEEP_LOGS (a folder to keep each run's log in), COMMIT (printed in place of git's, where there is no git).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
NPS=${NPS:-1 2} SHAPE=${SHAPE:-llama3-8b} LAYERS=${LAYERS:-1} SEQS=${SEQS:-8} LEN=${LEN:-128} N=${N:-4} RANK=${RANK:-16}
CASE=${CASE:-/tmp/iteris-token-$SHAPE-$LAYERS} PNG=${PNG:-/tmp/iteris-scaling.png}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); commit ${COMMIT:-$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include || echo ' + uncommitted changes')}; $(date -u +%F)"
[ -f "$CASE/base/config.json" ] || "$BUILD/bench/make_case" "$CASE" "$SHAPE" "$LAYERS" "$N" "$RANK" "$SEQS" "$LEN"
A=$(seq -s, -f "$CASE/adapter_%g" 0 $((N - 1)))
C=$(seq -s, -f "$CASE/calib_%g.jsonl" 0 $((N - 1)))
np0=${NPS%% *}
rate=$(mpirun -np "$np0" env OPENBLAS_NUM_THREADS=1 "$BUILD/bench/merge_bench" -d 4096 -T 2048 -R 64 -reps 1 |
  awk -F'|' '/^\| 4096/ {gsub(/ /, "", $3); print $3}')
echo "dgemm in this run: $rate GFLOP/s per rank (merge_bench -d 4096 at np $np0)"
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
echo "| ranks | wall s | forward s | statistics s | solve s | speed-up | efficiency |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
t0=""
for np in $NPS; do
  rm -rf "$CASE/merged_scaling"
  # shellcheck disable=SC2086
  mpirun ${BIND:---bind-to none} -np "$np" env OPENBLAS_NUM_THREADS=1 "$BUILD/bin/iteris-mpi" -base "$CASE/base" \
    -adapters "$A" -calib "$C" -max_iter "${MAX_ITER:-1}" -system "${SYSTEM:-auto}" -plots 0 -out "$CASE/merged_scaling" \
    -log_view ${EXTRA:-} >"$W/np$np.log" 2>&1
  [ -z "${KEEP_LOGS:-}" ] || cp "$W/np$np.log" "$KEEP_LOGS/scaling_np$np.log"
  wall=$(awk '/merged [0-9]+ adapters/ {for (i = 1; i <= NF; i++) if ($i == "in") print $(i + 1)}' "$W/np$np.log" | head -n 1)
  ph() { awk -v s="$1:" '$2 == s {print $3 + 0}' "$W/np$np.log" | head -n 1; }
  fw=$(ph forward) st=$(ph statistics) so=$(ph solve)
  [ -n "$t0" ] || t0=$wall
  sp=$(awk -v a="$t0" -v b="$wall" 'BEGIN {printf "%.2f", a / b}')
  ef=$(awk -v s="$sp" -v p="$np" -v q="$np0" 'BEGIN {printf "%.0f%%", 100 * s / (p / q)}')
  printf '| %s | %.1f | %.1f | %.1f | %.1f | %s | %s |\n' "$np" "$wall" "$fw" "$st" "$so" "$sp" "$ef"
  echo "$np $wall $fw $st $so $sp" >>"$W/data"
done
command -v gnuplot >/dev/null || { echo "no gnuplot here: no plot (data: $(tr '\n' ';' <"$W/data"))"; exit 0; }
gnuplot <<GP
set terminal pngcairo size 1000,420 font ',11' noenhanced
set output '$PNG'
set multiplot layout 1,2 title 'iteris-mpi strong scaling: $SHAPE, $LAYERS layer(s), $N x $((SEQS * LEN)) tokens, -max_iter ${MAX_ITER:-1}'
set xlabel 'ranks'; set grid; set key left top
set ylabel 'speed-up'
plot '$W/data' using 1:6 with linespoints lw 2 pt 7 title 'measured', '$W/data' using 1:(\$1/$np0) with lines dt 2 title 'ideal'
set ylabel 'seconds'; set key right top
set style data histogram; set style histogram rowstacked; set style fill solid 0.8; set boxwidth 0.6
plot '$W/data' using 3:xtic(1) title 'forward', '' using 4 title 'statistics', '' using 5 title 'solve'
unset multiplot
GP
echo "plot: $PNG"
