#!/usr/bin/env bash
# The README's demo path: generate the demo case, merge it with jobs/demo.yaml on 2 ranks, check the
# PEFT output loads (-inspect) and the report holds the fidelity of every task.
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
PY
