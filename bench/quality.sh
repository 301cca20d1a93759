#!/usr/bin/env bash
# Merge quality on real tasks trained here (issue 17): one LoRA adapter per task (bench/data: ISEAR, EmoInt,
# Emotion-Cause) trained on stories260K, merged into one adapter with every method (calibration: each task's
# calib.jsonl), then every adapter scored on every task's held-out questions (-ensemble). Prints, per method and
# task, the NLL of the label and the accuracy, and the share of each task's adaptation the merge keeps:
#   share_i = (NLL_base,i - NLL_merged,i) / (NLL_base,i - NLL_task i's own adapter,i)
# Env: REFINE_STEPS (400; 0: none), TASKS ("isear emoint emotion-cause"), NP (2), STEPS (300), LR (3e-3), R (8), OUT (/tmp/iteris-quality), BUILD.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build} BIN=${BUILD:-build}/bin/iteris-mpi
read -r -a TASKS <<<"${TASKS:-isear emoint emotion-cause}"
NP=${NP:-2} STEPS=${STEPS:-300} LR=${LR:-3e-3} R=${R:-8} OUT=${OUT:-/tmp/iteris-quality}
BASE=../shared/models/stories260K
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
peak=$(/usr/bin/python3 -c "
import numpy as np, time
a = np.random.rand(512, 512).astype(np.float32); b = np.random.rand(512, 512).astype(np.float32); best = 0
for _ in range(5):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 512**3 / (time.perf_counter() - t) / 1e9)
print('%.1f' % best)")
echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $(date -u +%F); tasks ${TASKS[*]}; same-run sgemm peak (NumPy 512^3, one process) ${peak} GFLOP/s"
rm -rf "$OUT"; mkdir -p "$OUT"
ads=(); cal=()
for t in "${TASKS[@]}"; do
  cmd=(mpirun -np "$NP" "$BIN" -train -base "$BASE" -data "bench/data/$t/train.jsonl" -out "$OUT/ad_$t" -r "$R"
       -lora_alpha $((2 * R)) -targets all -steps "$STEPS" -batch 16 -lr "$LR" -warmup 10 -lora_dropout 0.1 -seed 1 -log_every 0)
  echo "== ${cmd[*]}"; "${cmd[@]}" >"$OUT/train_$t.log" 2>&1
  ads+=("$OUT/ad_$t"); cal+=("bench/data/$t/calib.jsonl")
done
A=$(IFS=,; echo "${ads[*]}") C=$(IFS=,; echo "${cal[*]}")
n=${#TASKS[@]}; lam=$(echo "scale=6; 1 / $n" | bc)
merged=()
for spec in iteris regmean "task_arithmetic:-ta_lambda 1" "task_arithmetic:-ta_lambda $lam" "ties:-out_rank $((n * R))" \
            "dare:-out_rank $((n * R))" "knots:-out_rank $((n * R))"; do
  method=${spec%%:*}; extra=(); [ "$spec" != "$method" ] && read -r -a extra <<<"${spec#*:}"
  name=$method; [ "${extra[0]:-}" = -ta_lambda ] && name="$method(lambda ${extra[1]})"
  dir=$OUT/merged_$(echo "$name" | tr -c 'a-z0-9_.\n' '_')
  cmd=(mpirun -np "$NP" "$BIN" -base "$BASE" -adapters "$A" -calib "$C" -method "$method" "${extra[@]}" -plots 0 -out "$dir")
  echo "== ${cmd[*]}"
  t0=$(date +%s.%N); "${cmd[@]}" >"$dir.log" 2>&1 || { echo "merge $name failed"; tail -n 3 "$dir.log"; continue; }
  echo "merge $name: $(echo "$(date +%s.%N) - $t0" | bc) s"
  merged+=("$name=$dir")
done
# merge, then distil in one command (issue 17, options 1 and 3): the IterIS merge refined by KL(task i's adapter ||
# merged) on task i's calibration rows, with the documented defaults (-refine_lr 2e-3, -refine_weight_decay 0.1,
# -refine_drop 0.2, -refine_val 0.2: 20% of each task's rows held out to choose the step), rank kept at sum r_i
REFINE_STEPS=${REFINE_STEPS:-400}
if [ "$REFINE_STEPS" -gt 0 ]; then
  cmd=(mpirun -np "$NP" "$BIN" -base "$BASE" -adapters "$A" -calib "$C" -method iteris -plots 0 -refine_steps "$REFINE_STEPS"
       -out "$OUT/merged_iteris_refined")
  echo "== ${cmd[*]}"
  t0=$(date +%s.%N); "${cmd[@]}" >"$OUT/refine.log" 2>&1 && merged+=("IterIS + refine ($REFINE_STEPS steps, defaults)=$OUT/merged_iteris_refined")
  echo "merge + refine: $(echo "$(date +%s.%N) - $t0" | bc) s"
fi
for t in "${TASKS[@]}"; do
  list=$A; for m in "${merged[@]}"; do list+=",${m#*=}"; done
  mpirun -np "$NP" "$BIN" -base "$BASE" -ensemble "$list" -heldout "bench/data/$t/heldout.jsonl" -eval_out "$OUT/eval_$t.json" >/dev/null
done
/usr/bin/python3 - "$OUT" "${TASKS[@]}" -- "${merged[@]}" <<'PY'
import json, sys
out = sys.argv[1]; k = sys.argv.index("--"); tasks = sys.argv[2:k]; merged = [m.split("=", 1) for m in sys.argv[k + 1:]]
ev = {t: {m["model"]: m for m in json.load(open("%s/eval_%s.json" % (out, t)))["models"]} for t in tasks}
print("| adapter | " + " | ".join("%s NLL / acc" % t for t in tasks) + " | mean share kept |")
print("|---|" + "---:|" * (len(tasks) + 1))
def row(label, path):
    cells, shares = [], []
    for t in tasks:
        e = ev[t]; base = e["base"]["label_nll"]; own = e["%s/ad_%s" % (out, t)]["label_nll"]; m = e[path]
        shares.append((base - m["label_nll"]) / (base - own))
        cells.append("%.3f / %.3f" % (m["label_nll"], m["accuracy"]))
    print("| %s | %s | %.3f |" % (label, " | ".join(cells), sum(shares) / len(shares)))
print("| base | " + " | ".join("%.3f / %.3f" % (ev[t]["base"]["label_nll"], ev[t]["base"]["accuracy"]) for t in tasks) + " | 0 |")
for t in tasks:
    row("adapter " + t, "%s/ad_%s" % (out, t))
for name, path in merged:
    row(name, path)
PY
