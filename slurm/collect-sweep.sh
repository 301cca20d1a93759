#!/usr/bin/env bash
# Collects the merge_report.json files of a sweep (slurm/sweep-array.sh) into one markdown table, sorted
# by alpha_2 then max_iter; runs on the login node (not an sbatch script).
#   slurm/collect-sweep.sh sweep-<id> [> results/sweep.md]
# Columns: alpha_2, max_iter, kl_ratio and top1 (fidelity_mean: kl_ratio 0 = as each task's own adapter,
# 1 = as the base model), seconds_merge, folder. Exit 1 when no report is found; a grid point whose
# report is missing (failed or still running) is listed under the table.
set -euo pipefail
root=${1:?usage: collect-sweep.sh SWEEP_DIR}
[ -d "$root" ] || { echo "collect-sweep: '$root' is not a folder" >&2; exit 2; }
exec /usr/bin/python3 - "$root" <<'PY'
import json, os, sys

root = sys.argv[1]
rows, missing = [], []
for d in sorted(os.listdir(root)):
    path = os.path.join(root, d)
    if not os.path.isdir(path) or d.endswith(".partial"):
        continue
    rep = os.path.join(path, "merge_report.json")
    if not os.path.isfile(rep):
        missing.append(d)
        continue
    try:
        r = json.load(open(rep))
        rows.append((float(r["options"]["alpha_2"]), int(r["options"]["max_iter"]),
                     float(r["fidelity_mean"]["kl_ratio"]), float(r["fidelity_mean"]["top1"]),
                     float(r["seconds_merge"]), d))
    except (ValueError, KeyError, TypeError) as e:
        print(f"collect-sweep: {rep}: unreadable or missing field ({e!r})", file=sys.stderr)
        missing.append(d)
for d in sorted(os.listdir(root)):
    if d.endswith(".partial") and d[:-8] not in [r[5] for r in rows]:
        missing.append(d + " (interrupted: resume with -restart 1)")
if not rows:
    print(f"collect-sweep: no merge_report.json under {root}/*/", file=sys.stderr)
    sys.exit(1)
rows.sort()
print(f"sweep {root}: {len(rows)} merge(s); fidelity_mean on the held-out sequences\n")
print("| alpha_2 | max_iter | kl_ratio | top1 | seconds_merge | folder |")
print("|--------:|---------:|---------:|-----:|--------------:|--------|")
for a, k, kl, t1, s, d in rows:
    print(f"| {a:g} | {k} | {kl:.4f} | {t1:.4f} | {s:.2f} | {d} |")
best = min(rows, key=lambda r: r[2])
print(f"\nlowest kl_ratio: alpha_2={best[0]:g} max_iter={best[1]} (kl_ratio {best[2]:.4f}, top1 {best[3]:.4f})")
if missing:
    print("\nno report: " + ", ".join(missing))
PY
