#!/usr/bin/env bash
# Compose (-method mixlora) against merging, on the three real tasks of bench/quality.sh (issue 15): the task
# adapters and merges that quality.sh left in QUALITY (run it first), composed into MixLoRA adapters (top-1,
# top-2, all experts), every adapter scored on each task's held-out questions against that task's own adapter
# (-ensemble -eval_reference): share of the adaptation kept (label NLL), kl_ratio, top-1 agreement, accuracy.
# Then compose, then distil (-method mixlora -refine_steps REFINE_STEPS, the -refine_* defaults) at top-1 and
# top-2, training everything or only some groups (-refine_train_only); the last column is the selection
# criterion: the distillation KL on the validation split of the calibration rows (train_report.json's best).
# Prints a Markdown table. Env: QUALITY (/tmp/iteris-quality2), NP (2), OUT (/tmp/iteris-mixlora), BUILD,
# REFINE_STEPS (400; 0: no refinement rows).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BUILD:-build}/bin/iteris-mpi
Q=${QUALITY:-/tmp/iteris-quality2} NP=${NP:-2} OUT=${OUT:-/tmp/iteris-mixlora} REFINE_STEPS=${REFINE_STEPS:-400}
BASE=../shared/models/stories260K
TASKS=(isear emoint emotion-cause)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
[ -d "$Q/ad_isear" ] || { echo "run bench/quality.sh first (OUT=$Q)"; exit 1; }
peak=$(/usr/bin/python3 -c "
import numpy as np, time
a = np.random.rand(512, 512).astype(np.float32); b = np.random.rand(512, 512).astype(np.float32); best = 0
for _ in range(5):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 512**3 / (time.perf_counter() - t) / 1e9)
print('%.1f' % best)")
echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $(date -u +%F); same-run sgemm peak (NumPy 512^3, one process) ${peak} GFLOP/s"
rm -rf "$OUT"; mkdir -p "$OUT"
A="$Q/ad_isear,$Q/ad_emoint,$Q/ad_emotion-cause"
C="bench/data/isear/calib.jsonl,bench/data/emoint/calib.jsonl,bench/data/emotion-cause/calib.jsonl"
names=() dirs=() secs=()
for k in 1 2 3; do
  cmd=(mpirun -np "$NP" "$BIN" -base "$BASE" -adapters "$A" -calib "$C" -method mixlora -mixlora_top_k $k -plots 0
       -out "$OUT/mixlora_top$k")
  echo "== ${cmd[*]}"
  t0=$(date +%s.%N); "${cmd[@]}" >"$OUT/mixlora_top$k.log" 2>&1
  secs+=("$(echo "$(date +%s.%N) - $t0" | bc)"); names+=("MixLoRA compose, top-$k"); dirs+=("$OUT/mixlora_top$k")
done
# compose, then distil: k experts per token, the groups trained (all: attention, routers and experts)
refine_rows=()
[ "$REFINE_STEPS" -gt 0 ] && refine_rows=("1 all" "2 all" "2 routers" "2 routers,attention" "2 attention,experts")
for spec in "${refine_rows[@]}"; do
  k=${spec% *} g=${spec#* } d="$OUT/mixlora_top${k}_refined_${g//,/+}"
  only=(); [ "$g" = all ] || only=(-refine_train_only "$g")
  cmd=(mpirun -np "$NP" "$BIN" -base "$BASE" -adapters "$A" -calib "$C" -method mixlora -mixlora_top_k "$k" -plots 0
       -refine_steps "$REFINE_STEPS" "${only[@]}" -out "$d")
  echo "== ${cmd[*]}"
  t0=$(date +%s.%N); "${cmd[@]}" >"$d.log" 2>&1
  secs+=("$(echo "$(date +%s.%N) - $t0" | bc)"); names+=("MixLoRA compose top-$k + refine $REFINE_STEPS, trains $g"); dirs+=("$d")
done
for spec in "IterIS=merged_iteris" "task arithmetic (mean)=merged_task_arithmetic_lambda_.333333_" \
            "IterIS + -refine_steps 400=merged_iteris_refined"; do
  [ -d "$Q/${spec#*=}" ] && names+=("${spec%%=*}") && dirs+=("$Q/${spec#*=}") && secs+=("")
done
list=$(IFS=,; echo "${dirs[*]}")
for t in "${TASKS[@]}"; do
  mpirun -np "$NP" "$BIN" -base "$BASE" -ensemble "$Q/ad_$t,$list" -eval_reference "$Q/ad_$t" \
    -heldout "bench/data/$t/heldout.jsonl" -eval_out "$OUT/eval_$t.json" >/dev/null
done
/usr/bin/python3 - "$OUT" "$(IFS='|'; echo "${names[*]}")" "$(IFS='|'; echo "${dirs[*]}")" "$(IFS='|'; echo "${secs[*]}")" <<'PY'
import json, sys
out, names, dirs, secs = sys.argv[1], sys.argv[2].split("|"), sys.argv[3].split("|"), sys.argv[4].split("|")
ts = ["isear", "emoint", "emotion-cause"]
ev = {t: {m["model"]: m for m in json.load(open("%s/eval_%s.json" % (out, t)))["models"]} for t in ts}
print("| adapter | share kept (isear, emoint, emotion-cause) | mean share kept | mean kl_ratio | mean top-1 agreement | mean accuracy | routing accuracy, last layer (calibration) | seconds | validation KL (calibration split; step 0 -> best) |")
print("|---|---|---:|---:|---:|---:|---|---:|---|")
for n, d, s in zip(names, dirs, secs):
    sh = [ev[t][d]["share_kept"] for t in ts]; kr = [ev[t][d]["kl_ratio"] for t in ts]
    t1 = [ev[t][d]["top1_agreement"] for t in ts]; ac = [ev[t][d]["accuracy"] for t in ts]
    try:
        r = json.load(open(d + "/compose_report.json"))["routing_accuracy_calibration"][-1]
        route = ", ".join("%.2f" % x for x in r)
    except OSError:
        route = ""
    try:
        v = json.load(open(d + "/train_report.json"))["validation"]
        val = "%.4f -> %.4f (step %d)" % (v["curve"][0][1], v["best_loss"], v["best_step"])
    except OSError:
        val = ""
    print("| %s | %s | %.3f | %.4f | %.3f | %.3f | %s | %s | %s |" % (n, ", ".join("%.3f" % x for x in sh), sum(sh) / 3,
          sum(kr) / 3, sum(t1) / 3, sum(ac) / 3, route, "%.1f" % float(s) if s else "", val))
PY
