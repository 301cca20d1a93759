"""Independent TIES-merging (Yadav et al. 2023) and KnOTS-TIES (Stoica et al. 2025) in float64 NumPy,
checked against a merged adapter.
usage: ties_ref.py [--knots] MERGED_DIR DENSITY LAMBDA TOL ADAPTER_DIR...
dW_i = s_i B_i A_i per module; per task keep the ceil(density n) largest magnitudes (ties: lower index first);
elected sign = sign of the sum of the kept entries; merged entry = lambda * mean of the kept entries whose sign
agrees. KnOTS: the dense SVD [dW_1 | ... | dW_N] = U S [V_1^T | ... | V_N^T], TIES on the right factors V_i^T
(k, d_in), dW = U S (merged V^T). The merged adapter must hold the same dW for exactly the modules some
adapter targets (written with -out_rank >= the rank of the result for TIES)."""
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


def knots(dws, density, lam):
    d_in = dws[0].shape[1]
    u, sv, vt = np.linalg.svd(np.concatenate(dws, axis=1), full_matrices=False)
    k = int((sv > sv[0] * max(dws[0].shape) * 1e-13).sum()) if sv.size and sv[0] > 0 else 0
    parts = [vt[:k, i * d_in:(i + 1) * d_in] for i in range(len(dws))]
    return (u[:, :k] * sv[:k]) @ ties(parts, density, lam)


def main():
    args = sys.argv[1:]
    method = ties
    if args and args[0] == "--knots":
        method, args = knots, args[1:]
    merged, density, lam, tol = args[0], float(args[1]), float(args[2]), float(args[3])
    srcs = [updates(d) for d in args[4:]]
    got = updates(merged)
    # the modules: exactly those some adapter targets (an empty or partial adapter must not pass)
    want = set().union(*[set(s) for s in srcs])
    if set(got) != want:
        print(f"{method.__name__}: the merged adapter has {len(got)} modules, the adapters target {len(want)}; "
              f"missing {sorted(want - set(got))[:3]}, extra {sorted(set(got) - want)[:3]}")
        return 1
    worst = 0.0
    for k, dw in got.items():
        shape = next(s[k].shape for s in srcs if k in s)
        ref = method([s[k] if k in s else np.zeros(shape) for s in srcs], density, lam)
        err = np.linalg.norm(dw - ref) / max(np.linalg.norm(ref), 1e-300)
        worst = max(worst, err)
    print(f"{method.__name__}: {len(got)} modules, worst relative difference {worst:.3e} (tolerance {tol:g})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
