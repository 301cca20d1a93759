"""Compares the updates dW = scaling * B A of two PEFT adapters module by module.
usage: compare_adapters.py DIR_A DIR_B TOL   -> prints the worst relative Frobenius difference;
exit 1 when it exceeds TOL or the module sets differ."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_np  # noqa: E402


def updates(d):
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    t = safetensors_np.load(os.path.join(d, "adapter_model.safetensors"))
    out = {}
    for name, a in t.items():
        if ".lora_A." not in name:
            continue
        mod = name.split(".lora_A.")[0]
        b = t[name.replace(".lora_A.", ".lora_B.")]
        key = mod.replace("base_model.model.", "")
        r = a.shape[0]
        alpha = cfg.get("lora_alpha", r)
        for k, v in (cfg.get("alpha_pattern") or {}).items():
            if key.endswith(k):
                alpha = v
        s = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
        out[key] = s * b @ a
    return out


def main():
    da, db, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ua, ub = updates(da), updates(db)
    if set(ua) != set(ub):
        print(f"module sets differ: {sorted(set(ua) ^ set(ub))}")
        return 1
    worst = 0.0
    for k in sorted(ua):
        den = max(np.linalg.norm(ua[k]), 1e-300)
        err = np.linalg.norm(ua[k] - ub[k]) / den
        worst = max(worst, err)
    print(f"{len(ua)} modules, worst relative difference {worst:.3e} (tolerance {tol:g})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
