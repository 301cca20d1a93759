"""Independent TIES-merging (Yadav et al. 2023) in float64 NumPy, checked against a merged adapter.
usage: ties_ref.py MERGED_DIR DENSITY LAMBDA TOL ADAPTER_DIR...
dW_i = s_i B_i A_i per module; per task keep the ceil(density n) largest magnitudes (ties: lower index first);
elected sign = sign of the sum of the kept entries; merged entry = lambda * mean of the kept entries whose sign
agrees. The merged adapter must hold the same dW (written with -out_rank >= the rank of the result)."""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from compare_adapters import updates  # noqa: E402


def ties(dws, density, lam):
    n = dws[0].size
    keep = math.ceil(density * n - 1e-9)
    kept = []
    for dw in dws:
        v = dw.ravel()
        order = np.lexsort((np.arange(n), -np.abs(v)))  # by magnitude desc, then index asc
        m = np.zeros(n, dtype=bool)
        m[order[:keep]] = True
        kept.append(np.where(m, v, 0.0))
    kept = np.array(kept)
    sign = np.sign(kept.sum(axis=0))
    agree = (kept != 0) & (np.sign(kept) == sign) & (sign != 0)
    cnt = agree.sum(axis=0)
    out = np.where(cnt > 0, (kept * agree).sum(axis=0) / np.maximum(cnt, 1), 0.0)
    return lam * out.reshape(dws[0].shape)


def main():
    merged, density, lam, tol = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    srcs = [updates(d) for d in sys.argv[5:]]
    got = updates(merged)
    worst = 0.0
    for k, dw in got.items():
        ref = ties([s[k] for s in srcs], density, lam)
        err = np.linalg.norm(dw - ref) / max(np.linalg.norm(ref), 1e-300)
        worst = max(worst, err)
    print(f"ties: {len(got)} modules, worst relative difference {worst:.3e} (tolerance {tol:g})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
