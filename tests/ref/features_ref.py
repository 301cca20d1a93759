"""Reference for `iteris-mpi -features` (docs/FEATURES.md), NumPy float64 + h5py, independent of the C code.

  features_ref.py make DIR [--seed S]
      writes a T5-shaped case: DIR/adapter_{0,1,2}/ (PEFT LoRA, hand-written safetensors: ranks 2/4/3,
      a rank_pattern + alpha_pattern in adapter 1, rsLoRA in adapter 2, one module that adapter 0 does not
      target), DIR/rows.h5 (X, Xt per task and module; task 0 in f32, the others in f64; base/<module> W0),
      DIR/stats.h5 (the same data reduced: gram_x, gram_t, cross, n_rows) and DIR/truth.json (the scaling
      of every factor pair, as the generator chose it, not as a parser reads it).
  features_ref.py bad DIR KIND
      writes DIR/bad_KIND.h5, a copy of rows.h5 (or stats.h5) with one defect, and prints the substring the
      binary's error message must contain.
  features_ref.py check DIR OUT --method M [--alpha_1 --alpha_2 --reg_coef --manual_coef --regmean_alpha
                        --ta_lambda --out_rank --tol]
      recomputes every module's merged update dW* with ALGORITHM.md's dense formulas (IterIS: one solve
      with the given X, Xt; RegMean; task arithmetic), compares with OUT's B A (scaling lora_alpha / r) in
      relative Frobenius norm, and the adaptive weights c_i with OUT/merge_report.json. Exit 1 on failure.
"""
import argparse
import json
import os
import shutil
import struct
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import safetensors_np  # noqa: E402

# module path -> (d_out, d_in); T5 names: nothing here is a Llama module
MODULES = {
    "encoder.block.0.layer.0.SelfAttention.q": (16, 24),
    "encoder.block.0.layer.0.SelfAttention.v": (16, 24),
    "encoder.block.0.layer.1.DenseReluDense.wo": (24, 40),
    "decoder.block.0.layer.1.EncDecAttention.q": (16, 24),
}
ADAPTERS = [  # r, lora_alpha, rslora, rank_pattern, alpha_pattern, modules targeted
    dict(r=2, alpha=4.0, rslora=False, rp={}, ap={}, mods=list(MODULES)[:3]),
    dict(r=4, alpha=8.0, rslora=False, rp={"DenseReluDense.wo": 5}, ap={"DenseReluDense.wo": 7.0}, mods=list(MODULES)),
    dict(r=3, alpha=6.0, rslora=True, rp={}, ap={}, mods=list(MODULES)),
]
ROWS = [50, 60, 45]


def write_safetensors(path, tensors):
    """tensors: {name: float32 ndarray}; the layout of include/iteris/io.h."""
    hdr, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        hdr[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        blobs.append(a.tobytes())
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def scaling(ad, mod):
    r, alpha = ad["r"], ad["alpha"]
    for k, v in ad["rp"].items():
        if mod.endswith("." + k):
            r = v
    for k, v in ad["ap"].items():
        if mod.endswith("." + k):
            alpha = v
    return r, alpha / (np.sqrt(r) if ad["rslora"] else r)


def make(d, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    truth = {"adapters": []}
    for i, ad in enumerate(ADAPTERS):
        ddir = os.path.join(d, f"adapter_{i}")
        os.makedirs(ddir, exist_ok=True)
        cfg = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": "t5-tiny-test",
               "r": ad["r"], "lora_alpha": ad["alpha"], "use_rslora": ad["rslora"], "bias": "none",
               "target_modules": sorted({m.split(".")[-1] for m in ad["mods"]}),
               "rank_pattern": ad["rp"], "alpha_pattern": ad["ap"], "lora_dropout": 0.0}
        json.dump(cfg, open(os.path.join(ddir, "adapter_config.json"), "w"), indent=1)
        t, sc = {}, {}
        for m in ad["mods"]:
            d_out, d_in = MODULES[m]
            r, s = scaling(ad, m)
            t[f"base_model.model.{m}.lora_A.weight"] = rng.standard_normal((r, d_in)) / np.sqrt(d_in)
            t[f"base_model.model.{m}.lora_B.weight"] = rng.standard_normal((d_out, r)) * 0.3
            sc[m] = s
        write_safetensors(os.path.join(ddir, "adapter_model.safetensors"), t)
        truth["adapters"].append(sc)
    json.dump(truth, open(os.path.join(d, "truth.json"), "w"), indent=1)
    with h5py.File(os.path.join(d, "rows.h5"), "w") as fr, h5py.File(os.path.join(d, "stats.h5"), "w") as fs:
        for m, (d_out, d_in) in MODULES.items():
            W0 = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
            fr[f"base/{m}"] = W0
            fs[f"base/{m}"] = W0
        for i, n in enumerate(ROWS):
            for m, (d_out, d_in) in MODULES.items():
                scale = np.exp(rng.uniform(-1, 1, d_in))  # uneven feature scales
                X = rng.standard_normal((n, d_in)) * scale + 0.3
                Xt = X + 0.2 * rng.standard_normal((n, d_in)) * scale
                if i == 0:  # stored as f32: the reference uses the stored values
                    X, Xt = X.astype(np.float32), Xt.astype(np.float32)
                g = fr.create_group(f"task_{i}/{m}")
                g["X"], g["Xt"] = X, Xt
                # reversed row order: the same sums, rounded differently from the binary's
                X64, Xt64 = X.astype(np.float64)[::-1], Xt.astype(np.float64)[::-1]
                gs = fs.create_group(f"task_{i}/{m}")
                gs["gram_x"], gs["gram_t"], gs["cross"] = X64.T @ X64, Xt64.T @ Xt64, X64.T @ Xt64
                gs["n_rows"] = n


BAD = {  # kind: (source file, substring of the expected message)
    "missing_xt": ("rows.h5", "has no dataset 'task_1/encoder.block.0.layer.0.SelfAttention.v/Xt'"),
    "missing_x": ("rows.h5", "has no dataset 'task_2/decoder.block.0.layer.1.EncDecAttention.q/X' nor"),
    "rows_mismatch": ("rows.h5", "Xt must hold the same tokens"),
    "din_mismatch": ("rows.h5", "dataset 'task_0/encoder.block.0.layer.1.DenseReluDense.wo/X' has shape (50, 39)"),
    "nan": ("rows.h5", "dataset 'task_1/encoder.block.0.layer.0.SelfAttention.q/Xt' holds nan"),
    "no_w0": ("rows.h5", "has no dataset 'base/encoder.block.0.layer.0.SelfAttention.v'"),
    "w0_shape": ("rows.h5", "dataset 'base/encoder.block.0.layer.1.DenseReluDense.wo' has shape (40, 24)"),
    "extra_task": ("rows.h5", "has a group 'task_3'"),
    "stats_asym": ("stats.h5", "dataset 'task_0/encoder.block.0.layer.0.SelfAttention.q/gram_x' is not symmetric"),
    "stats_shape": ("stats.h5", "dataset 'task_2/encoder.block.0.layer.0.SelfAttention.v/cross' has shape (24, 23)"),
    "both": ("stats.h5", "holds both rows X and statistics gram_x"),
}


def bad(d, kind):
    src, msg = BAD[kind]
    path = os.path.join(d, f"bad_{kind}.h5")
    shutil.copy(os.path.join(d, src), path)
    q = "encoder.block.0.layer.0.SelfAttention.q"
    v = "encoder.block.0.layer.0.SelfAttention.v"
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    eq = "decoder.block.0.layer.1.EncDecAttention.q"
    with h5py.File(path, "r+") as f:
        if kind == "missing_xt":
            del f[f"task_1/{v}/Xt"]
        elif kind == "missing_x":
            del f[f"task_2/{eq}/X"]
        elif kind == "rows_mismatch":
            xt = f[f"task_2/{q}/Xt"][()]
            del f[f"task_2/{q}/Xt"]
            f[f"task_2/{q}/Xt"] = xt[:-1]
        elif kind == "din_mismatch":
            x = f[f"task_0/{wo}/X"][()]
            del f[f"task_0/{wo}/X"]
            f[f"task_0/{wo}/X"] = x[:, :-1]
        elif kind == "nan":
            f[f"task_1/{q}/Xt"][3, 5] = np.nan
        elif kind == "no_w0":
            del f[f"base/{v}"]
        elif kind == "w0_shape":
            w = f[f"base/{wo}"][()]
            del f[f"base/{wo}"]
            f[f"base/{wo}"] = w.T
        elif kind == "extra_task":
            f.copy("task_2", "task_3")
        elif kind == "stats_asym":
            f[f"task_0/{q}/gram_x"][0, 1] += 1.0
        elif kind == "stats_shape":
            c = f[f"task_2/{v}/cross"][()]
            del f[f"task_2/{v}/cross"]
            f[f"task_2/{v}/cross"] = c[:, :-1]
        elif kind == "both":
            f[f"task_1/{wo}/X"] = np.ones((3, 40))
    print(msg)


def reference(d, a):
    truth = json.load(open(os.path.join(d, "truth.json")))
    N = len(ADAPTERS)
    w = [float(x) for x in a.manual_coef.split(",")] if a.manual_coef else [1.0] * N
    fac = [safetensors_np.load(os.path.join(d, f"adapter_{i}", "adapter_model.safetensors")) for i in range(N)]
    out, coefs = {}, {}
    with h5py.File(os.path.join(d, "rows.h5"), "r") as f:
        for m, (d_out, d_in) in MODULES.items():
            dW = []
            for i in range(N):
                if m in truth["adapters"][i]:
                    A = fac[i][f"base_model.model.{m}.lora_A.weight"]
                    B = fac[i][f"base_model.model.{m}.lora_B.weight"]
                    dW.append(truth["adapters"][i][m] * B @ A)
                else:
                    dW.append(np.zeros((d_out, d_in)))
            if a.method == "task_arithmetic":
                out[m] = a.ta_lambda * sum(w[i] * dW[i] for i in range(N))
                continue
            W0 = f[f"base/{m}"][()].astype(np.float64)
            T1, T2, cs = np.zeros((d_out, d_in)), np.zeros((d_in, d_in)), []
            I = np.eye(d_in)
            for i in range(N):
                X = f[f"task_{i}/{m}/X"][()].astype(np.float64)
                Xt = f[f"task_{i}/{m}/Xt"][()].astype(np.float64)
                if a.method == "regmean":
                    S = X.T @ X
                    Gr = a.regmean_alpha * S + (1 - a.regmean_alpha) * np.diag(np.diag(S))
                    Gr = Gr + a.alpha_2 * np.linalg.norm(S) * I
                    T1 += dW[i] @ Gr
                    T2 += Gr
                    cs.append(1.0)
                    continue
                W = W0 + dW[i]
                c = np.linalg.norm(W) ** 2 / np.linalg.norm(X @ W.T) ** 2
                cs.append(c)
                Xm = (1 - a.reg_coef) * Xt + a.reg_coef * X
                C = X.T @ Xm
                M = C + a.alpha_1 * np.linalg.norm(C) * I
                G = Xm.T @ Xm
                G = G + a.alpha_2 * np.linalg.norm(G) * I
                T1 += c * w[i] * dW[i] @ M
                T2 += c * w[i] * G
            out[m] = np.linalg.solve(T2, T1.T).T
            coefs[m] = cs
    return out, coefs


def check(d, od, a):
    ref, coefs = reference(d, a)
    cfg = json.load(open(os.path.join(od, "adapter_config.json")))
    t = safetensors_np.load(os.path.join(od, "adapter_model.safetensors"))
    rep = json.load(open(os.path.join(od, "merge_report.json")))
    bad, worst, worst_c = 0, 0.0, 0.0
    r = cfg["r"]
    if cfg.get("lora_alpha") != r or cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        print(f"{a.label}: FAILED: output config is not scaling 1 with one rank: {cfg}")
        bad += 1
    if sorted(cfg["target_modules"]) != sorted(MODULES):
        print(f"{a.label}: FAILED: target_modules {cfg['target_modules']}")
        bad += 1
    names = {f"base_model.model.{m}.lora_{x}.weight" for m in MODULES for x in "AB"}
    if set(t) != names:
        print(f"{a.label}: FAILED: tensors {sorted(set(t) ^ names)}")
        bad += 1
    rmods = {j["module"]: j for j in rep["modules"]}
    for m, dref in ref.items():
        if a.out_rank > 0:
            U, s, Vt = np.linalg.svd(dref, full_matrices=False)
            k = min(a.out_rank, len(s))
            dref = (U[:, :k] * s[:k]) @ Vt[:k]
        A = t[f"base_model.model.{m}.lora_A.weight"]
        B = t[f"base_model.model.{m}.lora_B.weight"]
        if A.shape[0] != r:
            print(f"{a.label}: FAILED: {m}: rank {A.shape[0]} != r = {r}")
            bad += 1
        got = (cfg["lora_alpha"] / r) * B @ A
        err = np.linalg.norm(got - dref) / np.linalg.norm(dref)
        worst = max(worst, err)
        if a.verbose:
            print(f"  {m}: relative error {err:.2e}")
        if not err <= a.tol:
            print(f"{a.label}: FAILED: {m}: relative error {err:.3e} > {a.tol:g}")
            bad += 1
        if a.method == "iteris" and m in coefs:
            cg = np.array(rmods[m].get("adaptive_weight", []), dtype=float)
            ce = (np.max(np.abs(cg - np.array(coefs[m])) / np.abs(np.array(coefs[m])))
                  if cg.shape == np.shape(coefs[m]) else np.inf)
            worst_c = max(worst_c, ce)
            if not ce <= 1e-10:
                print(f"{a.label}: FAILED: {m}: coef {cg} vs reference {coefs[m]}")
                bad += 1
    print(f"{a.label}: {'PASSED' if bad == 0 else 'FAILED'}: worst relative error of dW {worst:.2e} "
          f"(tol {a.tol:g}), of c_i {worst_c:.2e} over {len(ref)} modules")
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make", "bad", "check"])
    p.add_argument("dir")
    p.add_argument("arg", nargs="?")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--method", default="iteris")
    p.add_argument("--alpha_1", type=float, default=1e-7)
    p.add_argument("--alpha_2", type=float, default=1e-7)
    p.add_argument("--reg_coef", type=float, default=0.0)
    p.add_argument("--manual_coef", default="")
    p.add_argument("--regmean_alpha", type=float, default=1.0)
    p.add_argument("--ta_lambda", type=float, default=1.0)
    p.add_argument("--out_rank", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-9)
    p.add_argument("--label", default="features")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    if a.cmd == "make":
        make(a.dir, a.seed)
    elif a.cmd == "bad":
        bad(a.dir, a.arg)
    else:
        return check(a.dir, a.arg, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
