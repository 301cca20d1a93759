#!/usr/bin/env bash
# Training on a real pretrained model: stories260K (../shared/models/stories260K) learns a story template
# from text lines ({"text": ...}, its llama2.c tokenizer): 48 training stories, 12 held-out stories with
# names, pets and colours combined differently. At np 2, 40 steps of LoRA (r 8, all modules) must lower the
# held-out next-token NLL by at least 20% against the base model (scored by -ensemble), and every loss of
# the first five steps must be above the last five's mean (the training loss falls).
# Exit 77 (skipped) when the model is absent.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
PY=/usr/bin/python3
M=../shared/models/stories260K
[ -f "$M/config.json" ] && [ -f "$M/tok512.bin" ] || { echo "stories260K is absent: skipped"; exit 77; }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1
$PY - "$W" <<'PY'
import itertools, json, random, sys
names = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Sue"]
pets = ["cat", "dog", "bird", "fish", "frog", "duck"]
colours = ["red", "blue", "green", "yellow"]
combos = list(itertools.product(names, pets, colours))
random.Random(5).shuffle(combos)
def story(n, p, c):
    return ("Once upon a time, %s had a %s %s. Every morning, %s gave the %s a %s hat. "
            "The %s wore the %s hat all day and %s laughed." % (n, c, p, n, p, c, p, c, n))
with open(sys.argv[1] + "/train.jsonl", "w") as f:
    for n, p, c in combos[:48]:
        f.write(json.dumps({"text": story(n, p, c)}) + "\n")
with open(sys.argv[1] + "/heldout.jsonl", "w") as f:
    for n, p, c in combos[48:60]:
        f.write(json.dumps({"text": story(n, p, c)}) + "\n")
PY
if ! mpirun -np 2 "$BIN" -train -base "$M" -data "$W/train.jsonl" -out "$W/ad" -r 8 -lora_alpha 16 -targets all \
    -steps 40 -batch 8 -lr 3e-3 -warmup 4 -seed 3 -log_every 10 >"$W/train.log" 2>&1; then
  echo "FAILED: training"; cat "$W/train.log"; exit 1
fi
cat "$W/train.log"
if ! mpirun -np 2 "$BIN" -base "$M" -ensemble "$W/ad" -heldout "$W/heldout.jsonl" -eval_out "$W/eval.json" >"$W/eval.log" 2>&1; then
  echo "FAILED: -ensemble"; cat "$W/eval.log"; exit 1
fi
cat "$W/eval.log"
$PY - "$W/eval.json" "$W/ad/train_report.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["models"]
base, tuned = m[0]["token_nll"], m[1]["token_nll"]
loss = json.load(open(sys.argv[2]))["loss"]
first, last = loss[:5], sum(loss[-5:]) / 5
print("held-out NLL per token: base %.4f -> trained %.4f (%.0f%% lower); training loss %.3f ... %.3f" %
      (base, tuned, 100 * (1 - tuned / base), loss[0], last))
ok = tuned <= 0.8 * base and all(l > last for l in first)
print("train_stories: %s" % ("PASSED" if ok else "FAILED"))
sys.exit(0 if ok else 1)
PY
