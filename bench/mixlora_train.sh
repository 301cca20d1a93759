#!/usr/bin/env bash
# Trained MixLoRA against plain LoRA of (about) the same parameter count (issue 15, item 3): both trained with
# -train on the multi-task mix of the three real tasks of bench/quality.sh (bench/data: ISEAR, EmoInt,
# Emotion-Cause; their training rows concatenated, the trainer shuffles) on stories260K, with the same steps,
# batch, learning rate, warmup and seed, then scored on each task's held-out questions (-ensemble: label NLL,
# accuracy). MixLoRA: -mixlora_experts E -mixlora_top_k K, every module adapted at rank R (attention LoRA,
# E experts on gate/up/down per layer, a router (E, D) per layer), with and without the load-balancing loss;
# plain LoRA: every module at rank LR_RANK. Prints the parameter counts (train_report.json) and a Markdown table.
# Env: NP (2), STEPS (300), LR (3e-3), E (4), K (2), R (2), LORA_R (6), AUX (0.001), OUT (/tmp/iteris-mixlora-train), BUILD.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BUILD:-build}/bin/iteris-mpi
NP=${NP:-2} STEPS=${STEPS:-300} LR=${LR:-3e-3} E=${E:-4} K=${K:-2} R=${R:-2} LORA_R=${LORA_R:-6} AUX=${AUX:-0.001}
OUT=${OUT:-/tmp/iteris-mixlora-train}
BASE=../shared/models/stories260K
TASKS=(isear emoint emotion-cause)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
peak=$(/usr/bin/python3 -c "
import numpy as np, time
a = np.random.rand(512, 512).astype(np.float32); b = np.random.rand(512, 512).astype(np.float32); best = 0
for _ in range(5):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 512**3 / (time.perf_counter() - t) / 1e9)
print('%.1f' % best)")
echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $(date -u +%F); same-run sgemm peak (NumPy 512^3, one process) ${peak} GFLOP/s"
rm -rf "$OUT"; mkdir -p "$OUT"
cat bench/data/isear/train.jsonl bench/data/emoint/train.jsonl bench/data/emotion-cause/train.jsonl >"$OUT/mix.jsonl"
common=(-train -base "$BASE" -data "$OUT/mix.jsonl" -targets all -steps "$STEPS" -batch 16 -lr "$LR" -warmup 10 -seed 1
        -log_every 0)
names=() dirs=() secs=()
run() { # NAME DIR ARGS...
  local name=$1 dir=$2; shift 2
  local cmd=(mpirun -np "$NP" "$BIN" "${common[@]}" "$@" -out "$dir")
  echo "== ${cmd[*]}"
  local t0; t0=$(date +%s.%N); "${cmd[@]}" >"$dir.log" 2>&1
  secs+=("$(echo "$(date +%s.%N) - $t0" | bc)"); names+=("$name"); dirs+=("$dir")
}
run "MixLoRA $E experts top-$K, rank $R, aux $AUX" "$OUT/mixlora" -r "$R" -lora_alpha $((2 * R)) \
  -mixlora_experts "$E" -mixlora_top_k "$K" -mixlora_aux_coef "$AUX"
run "MixLoRA $E experts top-$K, rank $R, no aux" "$OUT/mixlora_noaux" -r "$R" -lora_alpha $((2 * R)) \
  -mixlora_experts "$E" -mixlora_top_k "$K" -mixlora_aux_coef 0
run "LoRA rank $LORA_R" "$OUT/lora" -r "$LORA_R" -lora_alpha $((2 * LORA_R))
list=$(IFS=,; echo "${dirs[*]}")
for t in "${TASKS[@]}"; do
  mpirun -np "$NP" "$BIN" -base "$BASE" -ensemble "$list" -heldout "bench/data/$t/heldout.jsonl" -eval_out "$OUT/eval_$t.json" >/dev/null
done
/usr/bin/python3 - "$OUT" "$(IFS='|'; echo "${names[*]}")" "$(IFS='|'; echo "${dirs[*]}")" "$(IFS='|'; echo "${secs[*]}")" <<'PY'
import json, sys
out, names, dirs, secs = sys.argv[1], sys.argv[2].split("|"), sys.argv[3].split("|"), sys.argv[4].split("|")
ts = ["isear", "emoint", "emotion-cause"]
ev = {t: {m["model"]: m for m in json.load(open("%s/eval_%s.json" % (out, t)))["models"]} for t in ts}
print("| adapter | trainable parameters | final train loss (mean of last 20 steps) | isear NLL / acc | emoint NLL / acc | emotion-cause NLL / acc | mean label NLL | mean accuracy | seconds (train) |")
print("|---|---:|---:|---|---|---|---:|---:|---:|")
rows = [("base model", "base", None)] + list(zip(names, dirs, secs))
for n, d, s in rows:
    nll = [ev[t][d]["label_nll"] for t in ts]; acc = [ev[t][d]["accuracy"] for t in ts]
    npar, fl = "", ""
    if s is not None:
        rep = json.load(open(d + "/train_report.json"))
        npar = "%d" % rep["trainable_parameters"]; fl = "%.4f" % (sum(rep["loss"][-20:]) / len(rep["loss"][-20:]))
    print("| %s | %s | %s | %s | %.4f | %.3f | %s |" % (n, npar, fl, " | ".join("%.3f / %.3f" % (a, b) for a, b in zip(nll, acc)),
          sum(nll) / 3, sum(acc) / 3, "%.1f" % float(s) if s else ""))
PY
