#!/usr/bin/env bash
# The README's demo path: generate the demo case, merge it with jobs/demo.yaml on 2 ranks, check the
# PEFT output loads (-inspect) and the report holds the fidelity of every task; the convergence plot is a PNG and
# its numbers are the report's (the update's change shrinks over the 5 iterations); -plots 0 writes none.
set -euo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/jobs"
"$BIN" -make_demo "$W/demo"
sed "s#demo/#$W/demo/#g" jobs/demo.yaml > "$W/jobs/demo.yaml"
mpirun -np 2 "$BIN" -options_file "$W/jobs/demo.yaml" | tee "$W/log"
grep -q "^mean" "$W/log"
"$BIN" -inspect "$W/demo/merged-iteris" | tee "$W/inspect"
grep -q "q_proj" "$W/inspect"
/usr/bin/python3 - "$W/demo/merged-iteris/merge_report.json" <<'PY'
import json, sys, math
r = json.load(open(sys.argv[1]))
assert r["iterations"] == 5, r["iterations"]
for t in r["tasks"]:
    assert 0 <= t["kl_ratio"] < 1, t
    assert 0 <= t["top1"] <= 1, t
print("report ok:", r["fidelity_mean"])
# convergence.dat's first table: per iteration 2..5 and module, the largest update_change over the layers
d = sys.argv[1].rsplit("/", 1)[0]
assert open(d + "/convergence.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n", "convergence.png is not a PNG"
rows = [l.split() for l in open(d + "/convergence.dat").read().split("\n\n\n")[0].splitlines() if l and l[0] != "#"]
names = rows[0][1:]
for row in rows[1:]:
    k = int(row[0])
    for name, v in zip(names, row[1:]):
        want = max(m["update_change"][k - 1] for m in r["modules"] if m["module"].endswith("." + name))
        assert abs(float(v) - want) <= 1e-6 * want, (k, name, v, want)
first, last = max(map(float, rows[1][1:])), max(map(float, rows[-1][1:]))
assert last < 0.1 * first, ("IterIS did not converge on the demo", first, last)
print("convergence plot ok: largest change %.2e at iteration 2, %.2e at iteration 5" % (first, last))
# the third table: the held-out kl_ratio after each iteration, as the report has it; the last is the final one
rows = [l.split() for l in open(d + "/convergence.dat").read().split("\n\n\n")[2].splitlines() if l and l[0] != "#"]
assert len(rows) == 6, rows
for i, t in enumerate(r["tasks"]):
    assert len(t["kl_ratio_per_iteration"]) == 5 and t["kl_ratio_per_iteration"][-1] == t["kl_ratio"], t
    for k in range(5):
        assert abs(float(rows[1 + k][1 + i]) - t["kl_ratio_per_iteration"][k]) <= 1e-6 * t["kl_ratio"], (k, i)
print("fidelity per iteration ok:", [round(x, 4) for x in r["tasks"][0]["kl_ratio_per_iteration"]])
PY
# independent of the per-iteration evaluation: a 2-iteration merge's final fidelity (-fidelity_per_iter 0) is the 5-iteration
# merge's fidelity after iteration 2 (a planted evaluation of the previous iteration's model fails this)
sed -e "s#max_iter: 5#max_iter: 2#" -e "s#merged-iteris#merged-2#" "$W/jobs/demo.yaml" > "$W/jobs/demo2.yaml"
mpirun -np 2 "$BIN" -options_file "$W/jobs/demo2.yaml" -plots 0 -fidelity_per_iter 0 >/dev/null
/usr/bin/python3 - "$W/demo/merged-iteris/merge_report.json" "$W/demo/merged-2/merge_report.json" <<'PY'
import json, sys
r5, r2 = (json.load(open(p)) for p in sys.argv[1:3])
for t5, t2 in zip(r5["tasks"], r2["tasks"]):
    a, b = t5["kl_ratio_per_iteration"][1], t2["kl_ratio"]
    assert abs(a - b) <= 1e-12 * b, ("fidelity after iteration 2 differs from a 2-iteration merge", a, b)
    a, b = t5["top1_per_iteration"][1], t2["top1"]
    assert abs(a - b) <= 1e-12, (a, b)
print("fidelity after iteration 2 = a 2-iteration merge's: ok")
PY
mpirun -np 1 "$BIN" -base "$W/demo/base" -adapters "$W/demo/adapter_0,$W/demo/adapter_1" \
  -calib "$W/demo/calib_0.jsonl,$W/demo/calib_1.jsonl" -max_iter 2 -max_tokens 4 -plots 0 -out "$W/noplot" >/dev/null
[ -f "$W/noplot/merge_report.json" ] && [ ! -e "$W/noplot/convergence.png" ] || { echo "-plots 0 wrote a plot"; exit 1; }
echo "-plots 0: no plot"

# The demo merged from text (jobs/demo-text.yaml): demo/base/tokenizer.json is byte-level BPE with no merges, so
# the ids must be the texts' UTF-8 bytes (checked in Python, independently of the C tokenizer); and the merge from
# the text files must equal, bit for bit, the merge from the ids that -tokenize writes for them.
sed "s#demo/#$W/demo/#g" jobs/demo-text.yaml > "$W/jobs/demo-text.yaml"
mpirun -np 2 "$BIN" -options_file "$W/jobs/demo-text.yaml" -plots 0 >"$W/text.log" 2>&1 || { cat "$W/text.log"; exit 1; }
ids=()
for kind in calib heldout; do
  for i in 0 1 2; do
    "$BIN" -base "$W/demo/base" -tokenize "$W/demo/${kind}_text_$i.jsonl" -tokenize_out "$W/${kind}_ids_$i.jsonl" >/dev/null
  done
done
/usr/bin/python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
n = 0
for kind in ("calib", "heldout"):
    for i in range(3):
        texts = [json.loads(l)["text"] for l in open("%s/demo/%s_text_%d.jsonl" % (w, kind, i))]
        ids = [json.loads(l)["input_ids"] for l in open("%s/%s_ids_%d.jsonl" % (w, kind, i))]
        assert len(texts) == len(ids), (kind, i)
        for t, x in zip(texts, ids):
            assert x == list(t.encode("utf-8")), (t, x)
            n += 1
print("demo tokenizer: %d texts give their UTF-8 bytes" % n)
PY
mpirun -np 2 "$BIN" -options_file "$W/jobs/demo-text.yaml" -plots 0 -out "$W/demo/merged-from-ids" \
  -calib "$W/calib_ids_0.jsonl,$W/calib_ids_1.jsonl,$W/calib_ids_2.jsonl" \
  -heldout "$W/heldout_ids_0.jsonl,$W/heldout_ids_1.jsonl,$W/heldout_ids_2.jsonl" >/dev/null 2>&1
cmp "$W/demo/merged-iteris-text/adapter_model.safetensors" "$W/demo/merged-from-ids/adapter_model.safetensors"
echo "demo from text: the adapter equals the merge from the same ids, bit for bit"
