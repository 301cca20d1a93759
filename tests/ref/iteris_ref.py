#!/usr/bin/python3
"""Independent float64 NumPy reference of the whole merge of /work/shared/ALGORITHM.md (IterIS,
RegMean, task arithmetic), compared with an adapter written by iteris-mpi.

Everything is float64 and dense, with no factorised shortcut: the forward pass folds every update
into the weights (W0 + dW), the statistics are formed as explicit d_in x d_in products of the
stacked inputs, and the solve is numpy.linalg.solve of the d_in x d_in system. It reuses only the
verified float64 Llama pieces of tests/ref/llama_ref.py (config, safetensors parser, RMSNorm, RoPE);
the forward with input capture, the adapter reader and the merge are written here.

Iteration semantics (the same as src/pipeline/driver_data.c, stated independently):
  X_i[m]   inputs of module m when base + adapter i runs on calibration set i (every line of the
           JSONL file is its own sequence, positions restart at 0), all rows stacked; fixed.
  c_i[m]   ||W0 + dW_i||_F^2 / ||X_i (W0 + dW_i)^T||_F^2, fixed across iterations; times w_i.
  k = 1:   Xt_i = X_i.   k >= 2: Xt_i = inputs of module m when base + dW*(k-1) (the merged
           update of the previous iteration, at every module) runs on calibration set i.
  mixing   Xt_i <- (1 - rho) Xt_i + rho X_i
  M_i = X_i^T Xt_i + alpha_1 ||X_i^T Xt_i||_F I,  G_i = Xt_i^T Xt_i + alpha_2 ||Xt_i^T Xt_i||_F I
  T1 = sum_i c_i w_i dW_i M_i,  T2 = sum_i c_i w_i G_i,  dW* = T1 T2^{-1}.

usage:
  iteris_ref.py --base DIR --adapters A,B,C --calib a.jsonl,b.jsonl,c.jsonl --out MERGED_DIR
                [--method iteris|regmean|task_arithmetic] [--max_iter K] [--alpha_1 X] [--alpha_2 X]
                [--reg_coef X] [--with_pretrain 0|1] [--manual_coef a,b,c] [--regmean_alpha X] [--ta_lambda X] [--max_tokens N]
                [--tol 1e-4] [--coef_tol 1e-5] [--label NAME]
Prints the relative Frobenius error ||dW_bin - dW_ref|| / ||dW_ref|| of every module (dW = s B A of
the binary's adapter), and, for iteris, the relative error of the adaptive weights c_i written in
MERGED_DIR/merge_report.json. Exit 1 if any error exceeds its tolerance or the module sets differ.
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_ref import Cfg, load_model_tensors, read_tokens, rmsnorm, rope, st_read  # noqa: E402

MODS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def wkey(l, mod):
    return "model.layers.%d.%s.%s.weight" % (l, BLOCK[mod], mod)


# ---- adapters: {(layer, module): dW (d_out, d_in) float64} ------------------------------------------

def _pat(pat, path, default):
    """PEFT's rule: a key applies when the module path equals it or ends with '.' + key."""
    for k, v in (pat or {}).items():
        if path == k or path.endswith("." + k):
            return v
    return default


def read_adapter(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        ac = json.load(f)
    t = st_read(os.path.join(d, "adapter_model.safetensors"))
    rx = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_A(\.default)?\.weight$")
    out = {}
    for name, A in t.items():
        m = rx.match(name)
        if not m:
            continue
        l, mod = int(m.group(1)), m.group(3)
        B = t[name.replace("lora_A", "lora_B")]
        path = "model.layers.%d.%s.%s" % (l, m.group(2), mod)
        r = int(_pat(ac.get("rank_pattern"), path, ac["r"]))
        alpha = float(_pat(ac.get("alpha_pattern"), path, ac["lora_alpha"]))
        if A.shape[0] != r or B.shape[1] != r:
            raise SystemExit("iteris_ref.py: %s: %s has rank %d, B %s, the config says r = %d" %
                             (d, name, A.shape[0], B.shape, r))
        s = alpha / math.sqrt(r) if ac.get("use_rslora") else alpha / r
        out[(l, mod)] = s * (B @ A)
    if not out:
        raise SystemExit("iteris_ref.py: adapter %s has no lora_A tensors" % d)
    return out


# ---- forward with capture of every target module's inputs -------------------------------------------

def weights_with(W0, delta):
    """A copy of the weight dict with dW folded into the target modules: W0 + dW."""
    W = dict(W0)
    for (l, mod), dW in delta.items():
        W[wkey(l, mod)] = W0[wkey(l, mod)] + dW
    return W


def forward_capture(cfg, W, ids, cap):
    """Runs one sequence (positions 0..n-1) and appends the inputs of every module m of layer l to
    cap[(l, m)] (a list of (n, d_in) blocks). No logits are needed."""
    n = len(ids)
    h = W["model.embed_tokens.weight"][np.asarray(ids)]
    mask = np.triu(np.full((n, n), -np.inf), 1)

    def lin(x, l, mod, bias):
        cap.setdefault((l, mod), []).append(x.copy())
        key = wkey(l, mod)
        y = x @ W[key].T
        return y + W[key[:-len("weight")] + "bias"] if bias else y

    for l in range(cfg.L):
        p = "model.layers.%d." % l
        x = rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps)
        q = lin(x, l, "q_proj", cfg.qkv_bias).reshape(n, cfg.H, cfg.hd)
        k = lin(x, l, "k_proj", cfg.qkv_bias).reshape(n, cfg.Hkv, cfg.hd)
        v = lin(x, l, "v_proj", cfg.qkv_bias).reshape(n, cfg.Hkv, cfg.hd)
        q, k = rope(q, cfg.theta), rope(k, cfg.theta)
        rep = cfg.H // cfg.Hkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(cfg.hd) + mask[None]
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(n, cfg.H * cfg.hd)
        h = h + lin(a, l, "o_proj", cfg.o_bias)
        x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
        g = lin(x, l, "gate_proj", cfg.mlp_bias)
        u = lin(x, l, "up_proj", cfg.mlp_bias)
        h = h + lin(g / (1 + np.exp(-g)) * u, l, "down_proj", cfg.mlp_bias)
    return cap


def capture(cfg, W, seqs, modules):
    """{(l, m): X (n_total, d_in)} over all sequences, for the modules asked for."""
    cap = {}
    for ids in seqs:
        forward_capture(cfg, W, ids, cap)
    return {lm: np.concatenate(cap[lm], axis=0) for lm in modules}


# ---- the merges ----------------------------------------------------------------------------------------

def fro(a):
    return float(np.sqrt(np.sum(a * a)))


def solve_right(T1, T2):
    """dW* = T1 T2^{-1}: solve T2 Z = T1^T (T2 symmetric), dW* = Z^T."""
    return np.linalg.solve(T2, T1.T).T


def merge_iteris(cfg, W0, dW, calib, modules, max_iter, alpha_1, alpha_2, rho, w, with_pretrain=False):
    N = len(dW)
    X = []
    for i in range(N):
        X.append(capture(cfg, weights_with(W0, dW[i]), calib[i], modules))
    coef = {}
    for lm in modules:
        W0m = W0[wkey(*lm)]
        cl = []
        for i in range(N):
            Wi = W0m + dW[i].get(lm, 0.0)
            cl.append(fro(Wi) ** 2 / fro(X[i][lm] @ Wi.T) ** 2)
        coef[lm] = cl
    merged = None
    for k in range(1, max_iter + 1):
        if k == 1:
            Xt = X
        else:
            Wm = weights_with(W0, merged)
            Xt = [capture(cfg, Wm, calib[i], modules) for i in range(N)]
        new = {}
        for lm in modules:
            d_out, d_in = W0[wkey(*lm)].shape
            T1 = np.zeros((d_out, d_in))
            T2 = np.zeros((d_in, d_in))
            I = np.eye(d_in)
            for i in range(N):
                x = X[i][lm]
                xt = (1.0 - rho) * Xt[i][lm] + rho * x if k >= 2 else x
                C = x.T @ xt
                M = C + alpha_1 * fro(C) * I
                G0 = xt.T @ xt
                G = G0 + alpha_2 * fro(G0) * I
                cw = coef[lm][i] * w[i]
                if with_pretrain:  # W0 + dW_i in step 5; the result is T1 T2^-1 - W0
                    T1 += cw * ((W0[wkey(*lm)] + dW[i].get(lm, 0.0)) @ M)
                elif lm in dW[i]:
                    T1 += cw * (dW[i][lm] @ M)
                T2 += cw * G
            new[lm] = solve_right(T1, T2) - (W0[wkey(*lm)] if with_pretrain else 0.0)
        merged = new
    return merged, coef


def merge_regmean(cfg, W0, dW, calib, modules, alpha_2, regmean_alpha):
    """docs/ALGORITHM.md, Baselines, regmean: dW = (sum_i dW_i Gr_i)(sum_i Gr_i)^{-1} with
    Gr_i = a X_i^T X_i + (1 - a) diag(X_i^T X_i) + alpha_2 ||X_i^T X_i||_F I, a = regmean_alpha:
    the ridge is per task, relative to the Frobenius norm of the plain Gram, part of Gr_i (so it
    enters both the task's right-hand side and the summed Gram), and there are no weights."""
    N = len(dW)
    X = [capture(cfg, weights_with(W0, dW[i]), calib[i], modules) for i in range(N)]
    out = {}
    for lm in modules:
        d_out, d_in = W0[wkey(*lm)].shape
        T1 = np.zeros((d_out, d_in))
        T2 = np.zeros((d_in, d_in))
        for i in range(N):
            S = X[i][lm].T @ X[i][lm]
            Gr = regmean_alpha * S + (1.0 - regmean_alpha) * np.diag(np.diag(S))
            H = Gr + alpha_2 * fro(S) * np.eye(d_in)
            if lm in dW[i]:
                T1 += dW[i][lm] @ H
            T2 += H
        out[lm] = solve_right(T1, T2)
    return out


def merge_task_arithmetic(dW, modules, w, lam):
    out = {}
    for lm in modules:
        out[lm] = lam * sum(w[i] * dW[i][lm] for i in range(len(dW)) if lm in dW[i])
    return out


# ---- comparison ----------------------------------------------------------------------------------------

def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--calib", default="")
    ap.add_argument("--out", required=True, help="the binary's output folder (adapter + merge_report.json)")
    ap.add_argument("--method", default="iteris", choices=["iteris", "regmean", "task_arithmetic"])
    ap.add_argument("--max_iter", type=int, default=10)
    ap.add_argument("--alpha_1", type=float, default=1e-7)
    ap.add_argument("--alpha_2", type=float, default=1e-7)
    ap.add_argument("--reg_coef", type=float, default=0.0)
    ap.add_argument("--with_pretrain", type=int, default=0)
    ap.add_argument("--manual_coef", default="")
    ap.add_argument("--regmean_alpha", type=float, default=1.0)
    ap.add_argument("--ta_lambda", type=float, default=1.0)
    ap.add_argument("--max_tokens", type=int, default=0,
                    help="keep the first N tokens of each calibration sequence (0: all); the binary's "
                         "-max_tokens, as its -help describes it")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--coef_tol", type=float, default=1e-5)
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)

    cfg = Cfg(a.base)
    W0 = load_model_tensors(a.base)
    adirs = a.adapters.split(",")
    dW = [read_adapter(d) for d in adirs]
    N = len(dW)
    w = [float(x) for x in a.manual_coef.split(",")] if a.manual_coef else [1.0] * N
    if len(w) != N:
        raise SystemExit("iteris_ref.py: %d manual coefficients for %d adapters" % (len(w), N))
    modules = sorted(set().union(*[set(d) for d in dW]))
    coef = None
    if a.method == "task_arithmetic":
        ref = merge_task_arithmetic(dW, modules, w, a.ta_lambda)
    else:
        calib = [read_tokens(p) for p in a.calib.split(",")]
        if a.max_tokens > 0:
            calib = [[ids[:a.max_tokens] for ids in c] for c in calib]
        if len(calib) != N:
            raise SystemExit("iteris_ref.py: %d calibration files for %d adapters" % (len(calib), N))
        if a.method == "iteris":
            ref, coef = merge_iteris(cfg, W0, dW, calib, modules, a.max_iter, a.alpha_1, a.alpha_2,
                                     a.reg_coef, w, a.with_pretrain != 0)
        else:
            ref = merge_regmean(cfg, W0, dW, calib, modules, a.alpha_2, a.regmean_alpha)

    got = read_adapter(a.out)
    bad = 0
    if set(got) != set(ref):
        print("%s: module sets differ: only in the binary's %s, only in the reference %s" %
              (a.label, sorted(set(got) - set(ref)), sorted(set(ref) - set(got))))
        bad += 1
    worst = 0.0
    for lm in modules:
        if lm not in got:
            continue
        r, g = ref[lm], got[lm]
        if r.shape != g.shape:
            print("%s layers.%d.%s: shape %s, expected %s" % (a.label, lm[0], lm[1], g.shape, r.shape))
            bad += 1
            continue
        e = fro(g - r) / max(fro(r), 1e-300)
        worst = max(worst, e)
        ok = e <= a.tol
        bad += 0 if ok else 1
        print("%s layers.%d.%s: ||dW|| %.4e  rel err %.3e %s" % (a.label, lm[0], lm[1], fro(r), e,
                                                                  "" if ok else "FAILED"))
    if coef is not None:
        rep = json.load(open(os.path.join(a.out, "merge_report.json")))
        cworst = 0.0
        seen = 0
        for mrec in rep.get("modules", []):
            l, blk, mod = mrec["module"].split(".")[1:]
            lm = (int(l), mod)
            if lm not in coef:
                continue
            seen += 1
            for i in range(N):
                c = mrec["adaptive_weight"][i]
                e = abs(c - coef[lm][i]) / coef[lm][i] if c is not None else float("inf")
                cworst = max(cworst, e)
        ok = seen == len(coef) and cworst <= a.coef_tol
        bad += 0 if ok else 1
        print("%s: adaptive weights c_i of %d/%d modules in merge_report.json: worst rel err %.3e (tol %.1e) %s" %
              (a.label, seen, len(coef), cworst, a.coef_tol, "PASSED" if ok else "FAILED"))
    print("%s: %s, %d modules, worst relative Frobenius error of dW %.3e (tol %.1e): %s" %
          (a.label, a.method, len(ref), worst, a.tol, "PASSED" if bad == 0 else "FAILED"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
