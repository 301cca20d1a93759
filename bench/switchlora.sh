#!/usr/bin/env bash
# SwitchLoRA against plain LoRA and full-rank training, all from scratch at stories260K's shape, at the same token
# budget (issue 14, item 5). Writes results/switchlora.md and results/switchlora_loss.png.
#
#   bash bench/switchlora.sh            (about 20 minutes at np 2 on the 2-core machine)
#   STEPS=200 LRS_FULL=3e-3 LRS_LORA=1e-2 bash bench/switchlora.sh      (a quick look)
#
# Data: stories sampled from stories260K itself (bench/data/make_stories.py; 64 tokens each), so that every step
# sees text it has not seen (one pass: STEPS x BATCH <= the corpus) and the training loss of the last steps is
# an unbiased estimate; the learning rate of each method is chosen on it (mean of the last 10% of steps). The
# held-out NLL is then measured once per chosen run on 512 other sampled stories.
# Methods (each -train -from_scratch 1 -seed 1, the same data order and schedule):
#   full         -full_rank 1: every weight
#   lora         LoRA r on every projection, PEFT's initialisation (B = 0), alpha 2r; the projections frozen at
#                their random values; embedding, norms and head trained fully
#   lora_sw_init the same with SwitchLoRA's initialisation and alpha 1 but no switching (the reference's LoRA
#                baseline, --force_disable_candidates)
#   switchlora   -switch_lora 1 with the reference's defaults (interval 40, descent 0.1, 5 frozen steps), alpha 1
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
M=${MODEL:-../shared/models/stories260K}
NP=${NP:-2}
STEPS=${STEPS:-1000}
BATCH=${BATCH:-32}
R=${R:-16}
LRS_FULL=${LRS_FULL:-"1e-3 3e-3 1e-2"}
LRS_LORA=${LRS_LORA:-"3e-3 1e-2 3e-2"}
LRS_SW=${LRS_SW:-"1e-2 3e-2 6e-2"}  # SwitchLoRA's initialisation with alpha 1 (scaling 1/r) takes larger rates
W=${KEEP:-$(mktemp -d)}
mkdir -p "$W"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
NSTORIES=$((STEPS * BATCH))
[ -s "$W/train.jsonl" ] || $PY bench/data/make_stories.py "$M" "$W/train.jsonl" "$NSTORIES" 64 1
[ -s "$W/heldout.jsonl" ] || $PY bench/data/make_stories.py "$M" "$W/heldout.jsonl" 512 64 2
peak=$($PY - <<'PY'
import numpy as np, time
a = np.random.rand(512, 512).astype(np.float32); b = np.random.rand(512, 512).astype(np.float32)
best = 0
for _ in range(5):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 512**3 / (time.perf_counter() - t) / 1e9)
print("%.1f" % best)
PY
)

common=(-train -base "$M" -data "$W/train.jsonl" -from_scratch 1 -seed 1 -steps "$STEPS" -batch "$BATCH" -warmup $((STEPS / 20))
        -min_lr_ratio 0.1 -log_every $((STEPS / 10)))
declare -A ARGS=(
  [full]="-full_rank 1"
  [lora]="-targets all -r $R -lora_alpha $((2 * R))"
  [lora_sw_init]="-targets all -r $R -lora_alpha 1 -switch_lora 1 -switch_lora_interval 1000000000 -switch_lora_descent 0"
  [switchlora]="-targets all -r $R -lora_alpha 1 -switch_lora 1"
)
for method in full lora lora_sw_init switchlora; do
  lrs=$LRS_LORA; [ $method = full ] && lrs=$LRS_FULL; [ "${method#*sw}" != "$method" ] && lrs=$LRS_SW
  for lr in $lrs; do
    out=$W/$method-$lr
    [ -s "$out/train_report.json" ] && continue
    echo "== $method lr $lr"
    # shellcheck disable=SC2086
    mpirun -np "$NP" /usr/bin/time -f "maxrss_kb %M" "$BIN" "${common[@]}" ${ARGS[$method]} -lr "$lr" -out "$out" \
      >"$out.log" 2>&1 || { tail -n 5 "$out.log"; exit 1; }
    tail -n 2 "$out.log"
  done
done

# choose each method's learning rate on its last 10% of training loss, then score the chosen run on held-out text
$PY - "$W" "$STEPS" "$LRS_FULL" "$LRS_LORA" "$LRS_SW" >"$W/chosen.txt" <<'PY'
import json, sys
w, steps, lf, ll, ls = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split()
for m in ["full", "lora", "lora_sw_init", "switchlora"]:
    best = None
    for lr in (lf if m == "full" else ls if "sw" in m else ll):
        loss = json.load(open("%s/%s-%s/train_report.json" % (w, m, lr)))["loss"]
        tail = sum(loss[-max(1, steps // 10):]) / max(1, steps // 10)
        if best is None or tail < best[1]: best = (lr, tail)
    print(m, best[0], "%.6f" % best[1])
PY
while read -r method lr tail; do
  "$BIN" -base "$W/$method-$lr" -logits "$W/heldout.jsonl" -logits_out "$W/$method.logits.safetensors" >/dev/null
done <"$W/chosen.txt"

commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include bench || echo "+changes")
$PY - "$W" "$STEPS" "$BATCH" "$R" "$NP" "$peak" "$commit" "$LRS_FULL" "$LRS_LORA" "$LRS_SW" <<'PY'
import json, re, struct, sys, subprocess
import numpy as np
w, steps, batch, r, npr, peak, commit, lf, ll, ls = sys.argv[1:11]
steps, batch = int(steps), int(batch)
def logits(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); o = 8 + n
    return [np.frombuffer(b[o + v["data_offsets"][0]:o + v["data_offsets"][1]], np.float32).reshape(v["shape"]).astype(np.float64)
            for k, v in sorted(h.items(), key=lambda kv: int(kv[0].split(".")[1]) if kv[0] != "__metadata__" else -1)
            if k != "__metadata__"]
held = [json.loads(l)["input_ids"] for l in open(w + "/heldout.jsonl")]
chosen = [l.split() for l in open(w + "/chosen.txt")]
rows, curves = [], {}
for m, lr, tail in chosen:
    rep = json.load(open("%s/%s-%s/train_report.json" % (w, m, lr)))
    log = open("%s/%s-%s.log" % (w, m, lr)).read()
    rss = max(int(x) for x in re.findall(r"maxrss_kb (\d+)", log)) / 1024
    nll, cnt = 0.0, 0
    for z, ids in zip(logits("%s/%s.logits.safetensors" % (w, m)), held):
        z = z[:-1]; t = np.asarray(ids[1:])
        lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
        nll += float((lse - z[np.arange(len(t)), t]).sum()); cnt += len(t)
    nll /= cnt
    curves[m] = rep["loss"]
    rows.append((m, lr, float(tail), nll, np.exp(nll), rep["trainable_parameters"], rep.get("vectors_switched", 0),
                 rep.get("candidates_held", 0), rss, rep["wall_seconds"], rep["tokens_per_second"]))
# every learning rate tried, for the record
tried = []
for m in ["full", "lora", "lora_sw_init", "switchlora"]:
    for lr in (lf if m == "full" else ls if "sw" in m else ll).split():
        loss = json.load(open("%s/%s-%s/train_report.json" % (w, m, lr)))["loss"]
        k = max(1, steps // 10)
        tried.append("%s %s: %.4f" % (m, lr, sum(loss[-k:]) / k))
win = max(1, min(25, steps // 10))
smooth = {m: np.convolve(np.asarray(c), np.ones(win) / win, mode="valid") for m, c in curves.items()}
with open(w + "/curves.dat", "w") as f:
    for s in range(len(next(iter(smooth.values())))):
        f.write("%d %s\n" % (s + win, " ".join("%.6f" % smooth[m][s] for m, *_ in rows)))
plot = """set terminal pngcairo size 900,560
set output 'results/switchlora_loss.png'
set title 'From scratch at stories260K shape: training loss (fresh text every step), %d steps x %d x 64 tokens'
set xlabel 'step'; set ylabel 'next-token loss (nats), %d-step running mean'; set grid; set yrange [*:3.5]
set key top right noenhanced
""" % (steps, batch, win)
cols = ", ".join("'%s/curves.dat' using 1:(column(%d)) with lines lw 2 title '%s (lr %s)'" % (w, i + 2, m, lr)
                 for i, (m, lr, *_) in enumerate(rows))
subprocess.run(["gnuplot"], input=(plot + "plot " + cols + "\n").encode(), check=True)
out = open("results/switchlora.md", "w")
out.write("""# SwitchLoRA vs LoRA vs full-rank training from scratch (issue 14, item 5)

Commit %s. Command: `bash bench/switchlora.sh` (STEPS=%d BATCH=%d R=%s NP=%s), on the 2-core machine, %s ranks,
one BLAS thread each; same-run sgemm peak (NumPy, 512^3, one process): %s GFLOP/s. Model: stories260K's shape
(L 5, D 64, F 172, 8/4 heads, V 512, tied), every run from Hugging Face's random initialisation with seed 1, the same
data order, AdamW, warmup %d steps then cosine to 0.1 x lr, clipping 1.0. Token budget: %d steps x %d sequences
x 64 tokens = %.2f M tokens, the same for every method. Data: stories sampled from the pretrained stories260K
(`bench/data/make_stories.py`, temperature 1), one pass, so the training loss is measured on unseen text; each
method's learning rate is chosen on the mean training loss of its last 10%% of steps (all tried below); held-out:
512 other sampled stories (32,256 predicted tokens).

| method | lr | train loss, last 10%% | held-out NLL | held-out perplexity | trained floats | vectors switched | candidates held | peak RSS per rank | wall s | tokens/s |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
""" % (commit, steps, batch, r, npr, npr, peak, steps // 20, steps, batch, steps * batch * 64 / 1e6))
for m, lr, tail, nll, ppl, n, sw, held_c, rss, wall, tps in rows:
    out.write("| %s | %s | %.4f | %.4f | %.3f | %d | %d | %d | %.1f MiB | %.1f | %.0f |\n" %
              (m, lr, tail, nll, ppl, n, sw, held_c, rss, wall, tps))
out.write("\nEvery learning rate tried (mean training loss of the last 10%% of steps): %s.\n\n" % "; ".join(tried))
out.write("![training loss](switchlora_loss.png)\n")
out.close()
print(open("results/switchlora.md").read())
PY
