#!/usr/bin/env bash
# The data-free baselines through the binary: TIES and KnOTS-TIES against an independent NumPy
# implementation (TIES written at full rank, so the SVD truncation is exact; KnOTS from a dense SVD), DARE's
# determinism (same seed, same adapter; other seed, another one), and the dense methods refuse to run
# without -out_rank.
set -euo pipefail
BIN=${ITERIS_BIN:-build/bin/iteris-mpi}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" -make_demo "$W/demo" >/dev/null 2>&1
D=$W/demo
A=(-base "$D/base" -adapters "$D/adapter_0,$D/adapter_1,$D/adapter_2" -out_dtype F64)
mpirun -np 2 "$BIN" "${A[@]}" -method ties -density 0.3 -ta_lambda 1.5 -out_rank 64 -out "$W/ties" >/dev/null 2>&1
/usr/bin/python3 tests/ref/ties_ref.py "$W/ties" 0.3 1.5 1e-10 "$D/adapter_0" "$D/adapter_1" "$D/adapter_2"
for s in 1 1 2; do
  mpirun -np 2 "$BIN" "${A[@]}" -method dare -dare_p 0.4 -seed $s -out_rank 64 -out "$W/dare_$s" >/dev/null 2>&1
  mv "$W/dare_$s" "$W/dare_${s}_$RANDOM"
done
d1=$(ls -d "$W"/dare_1_* | head -n 1); d1b=$(ls -d "$W"/dare_1_* | tail -n 1); d2=$(ls -d "$W"/dare_2_*)
cmp "$d1/adapter_model.safetensors" "$d1b/adapter_model.safetensors"
! cmp -s "$d1/adapter_model.safetensors" "$d2/adapter_model.safetensors"
mpirun -np 3 "$BIN" "${A[@]}" -method knots -density 0.5 -out "$W/knots" >/dev/null 2>&1
/usr/bin/python3 tests/ref/ties_ref.py --knots "$W/knots" 0.5 1.0 1e-8 "$D/adapter_0" "$D/adapter_1" "$D/adapter_2"
set +e
out=$(mpirun -np 2 "$BIN" "${A[@]}" -method ties -out "$W/x" 2>&1); rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "give -out_rank k" <<<"$out" && [ ! -e "$W/x" ]
# -out_rank: the written update is the best rank-k approximation (SVD) of the exact merged update,
# and the report gives the kept energy of every module
mpirun -np 2 "$BIN" "${A[@]}" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl" -max_iter 2 -out "$W/full" >/dev/null 2>&1
mpirun -np 2 "$BIN" "${A[@]}" -calib "$D/calib_0.jsonl,$D/calib_1.jsonl,$D/calib_2.jsonl" -max_iter 2 -out_rank 5 -out "$W/k5" >/dev/null 2>&1
/usr/bin/python3 - "$W/full" "$W/k5" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, "tests/ref")
from compare_adapters import updates
full, k5 = updates(sys.argv[1]), updates(sys.argv[2])
rep = {m["module"]: m for m in json.load(open(os.path.join(sys.argv[2], "merge_report.json")))["modules"]}
worst = worst_e = 0.0
for name, dw in full.items():
    u, s, vt = np.linalg.svd(dw)
    ref = (u[:, :5] * s[:5]) @ vt[:5]
    worst = max(worst, np.linalg.norm(k5[name] - ref) / np.linalg.norm(ref))
    key = name.replace("model.", "", 1)
    e = (s[:5] ** 2).sum() / (s ** 2).sum()
    worst_e = max(worst_e, abs(rep[key]["energy_kept"] - e))
print(f"out_rank 5: worst relative difference to the SVD truncation {worst:.3e}, kept energy {worst_e:.3e}")
assert worst < 1e-8 and worst_e < 1e-10, (worst, worst_e)
PY
echo "baselines: ok"
