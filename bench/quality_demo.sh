#!/usr/bin/env bash
# Merge quality on the demo case (issue 17): `iteris-mpi -make_demo` (a tiny synthetic Llama, three adapters, their
# calibration and held-out token files), merged with every method and with IterIS + -refine_steps, then each merge
# scored on each task's held-out sequences against that task's adapter (-ensemble -eval_reference): share kept
# (token NLL), kl_ratio and top-1 agreement. Prints a Markdown table. Env: NP (2), OUT (/tmp/iteris-quality-demo),
# REFINE_STEPS (400), BUILD.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BUILD:-build}/bin/iteris-mpi
NP=${NP:-2} OUT=${OUT:-/tmp/iteris-quality-demo} REFINE_STEPS=${REFINE_STEPS:-400}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
peak=$(/usr/bin/python3 -c "
import numpy as np, time
a = np.random.rand(512, 512).astype(np.float32); b = np.random.rand(512, 512).astype(np.float32); best = 0
for _ in range(5):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 512**3 / (time.perf_counter() - t) / 1e9)
print('%.1f' % best)")
echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $(date -u +%F); same-run sgemm peak (NumPy 512^3, one process) ${peak} GFLOP/s"
rm -rf "$OUT"; mkdir -p "$OUT"
"$BIN" -make_demo "$OUT/demo" >/dev/null
D=$OUT/demo
A="$D/adapter_0,$D/adapter_1,$D/adapter_2" C="$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl"
names=(); dirs=(); secs=()
for spec in iteris regmean "task_arithmetic:-ta_lambda 0.333333" "ties:-out_rank 24" "knots:-out_rank 24" \
            "iteris+refine:-refine_steps $REFINE_STEPS"; do
  method=${spec%%:*}; extra=(); [ "$spec" != "$method" ] && read -r -a extra <<<"${spec#*:}"
  dir=$OUT/$(echo "$method" | tr -c 'a-z0-9_\n' '_')
  cmd=(mpirun -np "$NP" "$BIN" -base "$D/base" -adapters "$A" -calib "$C" -method "${method%+refine}" "${extra[@]}" -plots 0 -out "$dir")
  echo "== ${cmd[*]}"
  t0=$(date +%s.%N); "${cmd[@]}" >"$dir.log" 2>&1 || { echo "$method failed"; tail -n 3 "$dir.log"; continue; }
  secs+=("$(echo "$(date +%s.%N) - $t0" | bc)"); names+=("$method"); dirs+=("$dir")
done
list=$(IFS=,; echo "${dirs[*]}")
for i in 0 1 2; do
  mpirun -np "$NP" "$BIN" -base "$D/base" -ensemble "$D/adapter_$i,$list" -eval_reference "$D/adapter_$i" \
    -heldout "$D/heldout_$i.jsonl" -eval_out "$OUT/eval_$i.json" >/dev/null
done
/usr/bin/python3 - "$OUT" "${names[*]}" "${dirs[*]}" "${secs[*]}" <<'PY'
import json, sys
out, names, dirs, secs = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
ev = [{m["model"]: m for m in json.load(open("%s/eval_%d.json" % (out, i)))["models"]} for i in range(3)]
print("| merge | share kept (task 0, 1, 2) | mean share kept | mean kl_ratio | mean top-1 agreement | seconds |")
print("|---|---|---:|---:|---:|---:|")
for n, d, s in zip(names, dirs, secs):
    sh = [ev[i][d]["share_kept"] for i in range(3)]
    kr = [ev[i][d]["kl_ratio"] for i in range(3)]
    t1 = [ev[i][d]["top1_agreement"] for i in range(3)]
    print("| %s | %s | %.3f | %.4f | %.3f | %.1f |" % (n, ", ".join("%.3f" % x for x in sh), sum(sh) / 3, sum(kr) / 3,
                                                   sum(t1) / 3, float(s)))
PY
