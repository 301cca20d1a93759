#!/usr/bin/python3
"""Independent float64 NumPy reference for LoRA training: the loss as iteris-mpi -train defines it
(next-token cross-entropy, mean over every target token of the data), its gradient with respect
to each LoRA factor by central finite differences, and AdamW steps on those gradients. It shares
no code with iteris-mpi; the forward pass is llama_ref.py's (float64, Hugging Face semantics).

Commands:
  grad  MODEL_DIR DATA.jsonl CANDIDATE.safetensors (--adapter DIR | --full) [--samples K] [--tol X]
        [--dropout P --seed S]  (LoRA dropout as -lora_dropout P -seed S, step 0)
        compares the candidate gradient (tensors named as the adapter's, F64) with central
        differences at K random entries of every tensor plus its largest entry; prints the worst
        relative error per tensor kind (module, A or B); exit 1 when one exceeds tol
  adamw MODEL_DIR DATA.jsonl CANDIDATE_DIR --adapter DIR --steps S --lr X [--warmup W]
        [--min-lr-ratio R] [--beta1 B1] [--beta2 B2] [--eps E] [--weight-decay WD] [--max-grad-norm C]
        [--tol X]   full-batch training from the adapter (every entry's gradient by central
        differences; the tiny models only), compared with the candidate adapter's B A products
  ensemble MODEL_DIR HELDOUT.jsonl REPORT.json --adapters DIR... [--bins B]
        the scores of -ensemble (base, each adapter, the probability-averaged ensemble: token NLL
        and top-1, question accuracy, label NLL, ECE) in float64, against iteris-mpi's report
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref as R  # noqa: E402


def read_adapter(adir):
    """{module key: [A, B, scaling]} with key "model.layers.L.block.mod" and the tensor names."""
    with open(os.path.join(adir, "adapter_config.json")) as f:
        ac = json.load(f)
    t = R.st_read(os.path.join(adir, "adapter_model.safetensors"))
    out = {}
    for name, A in t.items():
        if not name.endswith(".lora_A.weight"):
            continue
        path = name[len("base_model.model."):-len(".lora_A.weight")]
        B = t[name.replace("lora_A", "lora_B")]
        r = int(R._pattern(ac.get("rank_pattern"), path, ac["r"]))
        alpha = float(R._pattern(ac.get("alpha_pattern"), path, ac["lora_alpha"]))
        s = alpha / math.sqrt(r) if ac.get("use_rslora") else alpha / r
        out[path] = [A.copy(), B.copy(), s, name, name.replace("lora_A", "lora_B")]
    return out


M64 = (1 << 64) - 1
MODULE_INDEX = {m: i for i, (_, m) in enumerate(R.MODULES)}


def mix64(x):
    """splitmix64's finaliser (the hash behind LoRA dropout's masks)."""
    x = (x + 0x9e3779b97f4a7c15) & M64
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M64
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M64
    return x ^ (x >> 31)


def dropout_keep(p, seed, step, layer, mod, seq_id, n, d_in):
    """keep (n, d_in): 1/(1-p) where the LoRA input entry is kept, 0 where dropped: entry (t, i)
    of sequence seq_id in (layer, module) is kept when mix64(h_t + i) >= p 2^64, h_t a hash chain
    of (seed, step, layer * 7 + module, seq_id, t), as train.h specifies."""
    thresh = int(p * 2.0 ** 64)
    base = mix64(mix64(mix64(seed & M64) ^ step) ^ (layer * 7 + MODULE_INDEX[mod]))
    bs = mix64(base ^ mix64(seq_id))
    keep = np.zeros((n, d_in))
    for t in range(n):
        bt = mix64(bs ^ t)
        for i in range(d_in):
            keep[t, i] = 1.0 / (1.0 - p) if mix64((bt + i) & M64) >= thresh else 0.0
    return keep


def read_train(path):
    """[(ids, first)]: each training sequence and the index of its first target token (the loss
    predicts ids[first:] from what precedes), as train.h defines: "prompt_len" k -> max(k, 1);
    "completion_ids" appended to the prompt; a question's labelled choice only."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            ids = list(o["input_ids"])
            if "prompt_len" in o:
                out.append((ids, max(int(o["prompt_len"]), 1)))
            elif "completion_ids" in o:
                out.append((ids + list(o["completion_ids"]), max(len(ids), 1)))
            elif "choices" in o:
                out.append((ids + list(o["choices"][int(o["label"])]), max(len(ids), 1)))
            else:
                out.append((ids, 1))
    return out


def mean_loss(cfg, W0, lora, seqs, drop=None):
    """drop: None, or (p, seed, step): LoRA dropout; the sequences' global indices are 0, 1, ..."""
    W = dict(W0)
    if drop is None:
        for path, (A, B, s, _, _) in lora.items():
            W[path + ".weight"] = W0[path + ".weight"] + s * (B @ A)
    total, count = 0.0, 0
    for si, (ids, first) in enumerate(seqs):
        if len(ids) <= first:
            continue
        extra = None
        if drop is not None:
            keeps = drop[3].setdefault(si, {})

            def extra(key, x, keeps=keeps, si=si):
                if key not in lora:
                    return 0.0
                A, B, s = lora[key][:3]
                if key not in keeps:
                    layer, mod = int(key.split(".")[2]), key.split(".")[-1]
                    keeps[key] = dropout_keep(drop[0], drop[1], drop[2], layer, mod, si, x.shape[0], x.shape[1])
                return s * ((x * keeps[key]) @ A.T) @ B.T
        z = R.forward(cfg, W, ids, extra)[first - 1:-1]
        mx = z.max(axis=1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1)))
        total += float(np.sum(lse - z[np.arange(len(ids) - first), np.asarray(ids[first:])]))
        count += len(ids) - first
    return total / count


def mean_kl(cfg, W0, lora, seqs, teachers):
    """Distillation: mean over targeted positions of KL(q || p), q the teacher of the sequence's task
    (teachers: per task the folded weights), p the student (W0 + lora)."""
    W = dict(W0)
    for path, (A, B, s, _, _) in lora.items():
        W[path + ".weight"] = W0[path + ".weight"] + s * (B @ A)
    total, count = 0.0, 0
    for (ids, first), task in seqs:
        if len(ids) <= first:
            continue
        lp = log_softmax(R.forward(cfg, W, ids))[first - 1:-1]
        lq = log_softmax(R.forward(cfg, teachers[task], ids))[first - 1:-1]
        total += float(np.sum(np.exp(lq) * (lq - lp)))
        count += len(ids) - first
    return total / count


def central(loss, arr, idx, h=1e-6):
    """(loss() at arr[idx] + h - loss() at arr[idx] - h) / 2h; arr[idx] is restored."""
    old = arr[idx]
    arr[idx] = old + h
    up = loss()
    arr[idx] = old - h
    dn = loss()
    arr[idx] = old
    return (up - dn) / (2 * h)


def fd(cfg, W0, lora, seqs, path, which, idx, h=1e-6, drop=None, teachers=None):
    """d(mean loss)/d lora[path][which][idx]: the distillation loss with teachers, else cross-entropy."""
    if teachers is not None:
        return central(lambda: mean_kl(cfg, W0, lora, seqs, teachers), lora[path][which], idx, h)
    return central(lambda: mean_loss(cfg, W0, lora, seqs, drop), lora[path][which], idx, h)


def cmd_grad_full(a, cfg, W0, seqs):
    """-full_rank: the candidate holds the gradient of every model tensor under its own name."""
    cand = R.st_read(a.candidate)
    rng = np.random.RandomState(0)
    expect = set(W0)
    bad, worst = 0, {}
    if set(cand) != expect:
        print("grad: the candidate's tensors differ from the model's: missing %s, extra %s" %
              (sorted(expect - set(cand))[:5], sorted(set(cand) - expect)[:5]))
        return 1
    for name in sorted(cand):
        g, arr = cand[name], W0[name]
        picks = [np.unravel_index(int(np.argmax(np.abs(g))), g.shape)]
        picks += [tuple(rng.randint(0, n) for n in g.shape) for _ in range(a.samples)]
        ref = np.array([central(lambda: mean_loss(cfg, W0, {}, seqs), arr, ix) for ix in picks])
        got = np.array([g[ix] for ix in picks])
        err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))
        parts = name.split(".")
        kind = ".".join(parts[3:-1]) if parts[1] == "layers" else ".".join(parts[:-1])
        kind += "." + parts[-1] if parts[-1] == "bias" else ""
        worst[kind] = max(worst.get(kind, 0.0), err)
    for kind in sorted(worst):
        flag = "FAIL" if worst[kind] > a.tol else "ok"
        print("%-10s %-32s worst relative error %.3e" % (flag, kind, worst[kind]))
        bad += worst[kind] > a.tol
    return 1 if bad else 0


def cmd_grad(a):
    cfg, W0 = R.Cfg(a.model), R.load_model_tensors(a.model)
    seqs = read_train(a.data) if not a.distil else None
    if a.full:
        return cmd_grad_full(a, cfg, W0, seqs)
    lora = read_adapter(a.adapter)
    teachers = None
    if a.distil:
        teachers = []
        for adir in a.distil:
            Wt = dict(W0)
            R.fold_adapter(Wt, cfg, adir)
            teachers.append(Wt)
        seqs = [(x, i) for i, f in enumerate(a.distil_data) for x in read_train(f)]
    cand = R.st_read(a.candidate)
    rng = np.random.RandomState(0)
    drop = (a.dropout, a.seed, 0, {}) if a.dropout > 0 else None
    worst = {}
    bad = 0
    for path in sorted(lora):
        for which in (0, 1):
            name = lora[path][3 + which]
            if name not in cand:
                print("grad: %s missing from %s" % (name, a.candidate))
                bad += 1
                continue
            g = cand[name]
            if g.shape != lora[path][which].shape:
                print("grad: %s has shape %s, the adapter %s" % (name, g.shape, lora[path][which].shape))
                bad += 1
                continue
            picks = [np.unravel_index(int(np.argmax(np.abs(g))), g.shape)]
            picks += [tuple(rng.randint(0, n) for n in g.shape) for _ in range(a.samples)]
            ref = np.array([fd(cfg, W0, lora, seqs, path, which, ix, drop=drop, teachers=teachers) for ix in picks])
            got = np.array([g[ix] for ix in picks])
            scale = max(np.max(np.abs(ref)), 1e-12)
            err = float(np.max(np.abs(got - ref)) / scale)
            kind = "%s.%s" % (path.split(".")[-1], "AB"[which])
            worst[kind] = max(worst.get(kind, 0.0), err)
    for kind in sorted(worst):
        flag = "FAIL" if worst[kind] > a.tol else "ok"
        print("%-10s %-14s worst relative error %.3e" % (flag, kind, worst[kind]))
        bad += worst[kind] > a.tol
    return 1 if bad else 0


def lr_factor(s, steps, warmup, min_ratio):
    if warmup > 0 and s < warmup:
        return s / warmup
    span = steps - warmup
    p = min((s - warmup) / span, 1.0) if span > 0 else 0.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def cmd_adamw(a):
    cfg, W0 = R.Cfg(a.model), R.load_model_tensors(a.model)
    seqs = read_train(a.data)
    lora = read_adapter(a.adapter)
    keys = [(p, w) for p in sorted(lora) for w in (0, 1)]
    m = {k: np.zeros_like(lora[k[0]][k[1]]) for k in keys}
    v = {k: np.zeros_like(lora[k[0]][k[1]]) for k in keys}
    for t in range(1, a.steps + 1):
        g = {}
        for k in keys:
            arr = lora[k[0]][k[1]]
            g[k] = np.zeros_like(arr)
            for ix in np.ndindex(arr.shape):
                g[k][ix] = fd(cfg, W0, lora, seqs, k[0], k[1], ix)
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        if a.max_grad_norm > 0 and a.max_grad_norm / (norm + 1e-6) < 1:
            for k in keys:
                g[k] *= a.max_grad_norm / (norm + 1e-6)
        lr = a.lr * lr_factor(t - 1, a.steps, a.warmup, a.min_lr_ratio)
        for k in keys:
            p = lora[k[0]][k[1]]
            p *= 1 - lr * a.weight_decay
            m[k] = a.beta1 * m[k] + (1 - a.beta1) * g[k]
            v[k] = a.beta2 * v[k] + (1 - a.beta2) * g[k] ** 2
            p -= lr * (m[k] / (1 - a.beta1 ** t)) / (np.sqrt(v[k] / (1 - a.beta2 ** t)) + a.eps)
        print("step %d: grad norm %.6g, lr %.6g" % (t, norm, lr))
    cand = read_adapter(a.candidate)
    bad = 0
    worst = 0.0
    for path in sorted(lora):
        A, B, s = lora[path][:3]
        if path not in cand:
            print("adamw: %s missing from the candidate" % path)
            bad += 1
            continue
        ref = s * (B @ A)
        got = cand[path][2] * (cand[path][1] @ cand[path][0])
        err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))
        worst = max(worst, err)
        if err > a.tol:
            print("FAIL %s: relative error of s B A %.3e" % (path, err))
            bad += 1
    print("adamw: %d modules after %d steps, worst relative error of s B A %.3e (tol %g)" % (len(lora), a.steps, worst, a.tol))
    return 1 if bad else 0


def read_heldout(path):
    """[(ids, first, group, is_label)] as the token-set reader expands a held-out file."""
    out, g = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            ids = list(o["input_ids"])
            if "choices" in o:
                for j, c in enumerate(o["choices"]):
                    out.append((ids + list(c), len(ids), g, j == int(o["label"])))
                g += 1
            elif "completion_ids" in o:
                out.append((ids + list(o["completion_ids"]), len(ids), -1, False))
            else:
                out.append((ids, max(int(o.get("prompt_len", 1)), 1), -1, False))
    return out


def log_softmax(z):
    mx = z.max(axis=-1, keepdims=True)
    return z - mx - np.log(np.exp(z - mx).sum(axis=-1, keepdims=True))


def cmd_ensemble(a):
    """Scores base, each adapter and the ensemble as itr_evaluate_adapters defines, in float64, and
    compares with the candidate JSON report."""
    cfg, W0 = R.Cfg(a.model), R.load_model_tensors(a.model)
    rows = read_heldout(a.data)
    models = [dict(W0)]
    for adir in a.adapters:
        W = dict(W0)
        R.fold_adapter(W, cfg, adir)
        models.append(W)
    M = len(a.adapters)
    K = 1 + M + (M >= 2)
    tok = np.zeros((K, 3))
    fid = np.zeros((K, 3))  # --reference: sum KL(p_ref || p_k), top-1 agreements, positions
    scores = np.zeros((K, len(rows)))
    for s, (ids, first, g, is_label) in enumerate(rows):
        if len(ids) <= first:
            continue
        lps = [log_softmax(R.forward(cfg, W, ids))[first - 1:-1] for W in models]
        tgt = np.asarray(ids[first:])
        if a.reference and (g < 0 or is_label):
            lr = lps[a.reference]
            dists = [np.exp(lp) for lp in lps]
            if M >= 2:
                dists.append(np.mean(dists[1:M + 1], axis=0))
            for k, p in enumerate(dists):
                fid[k] += [float((np.exp(lr) * (lr - np.log(p))).sum()), np.sum(lr.argmax(axis=1) == p.argmax(axis=1)), len(tgt)]
        for k, lp in enumerate(lps):
            scores[k, s] = lp[np.arange(len(tgt)), tgt].sum()
            if g < 0:
                tok[k] += [-lp[np.arange(len(tgt)), tgt].sum(), np.sum(lp.argmax(axis=1) == tgt), len(tgt)]
        if M >= 2 and g < 0:
            p = np.mean([np.exp(lp) for lp in lps[1:]], axis=0)
            tok[K - 1] += [-np.log(p[np.arange(len(tgt)), tgt]).sum(), np.sum(p.argmax(axis=1) == tgt), len(tgt)]
    groups = sorted(set(r[2] for r in rows if r[2] >= 0))
    ref = []
    for k in range(K):
        conf, corr, nll = [], [], []
        for g in groups:
            idx = [s for s, r in enumerate(rows) if r[2] == g]
            label = [i for i, s in enumerate(idx) if rows[s][3]][0]
            ks = [k] if k <= M else list(range(1, M + 1))
            p = np.mean([np.exp(scores[kk, idx] - scores[kk, idx].max()) / np.exp(scores[kk, idx] - scores[kk, idx].max()).sum()
                         for kk in ks], axis=0)
            conf.append(p.max())
            corr.append(int(p.argmax()) == label)
            nll.append(-math.log(p[label]))
        ece = 0.0
        for b in range(a.bins):
            sel = [i for i, c in enumerate(conf) if min(max(math.ceil(c * a.bins) - 1, 0), a.bins - 1) == b]
            if sel:
                ece += abs(sum(corr[i] for i in sel) - sum(conf[i] for i in sel))
        n = len(groups)
        ref.append({"token_nll": tok[k, 0] / tok[k, 2] if tok[k, 2] else 0, "token_top1": tok[k, 1] / tok[k, 2] if tok[k, 2] else 0,
                    "questions": n, "accuracy": sum(corr) / n if n else 0, "label_nll": sum(nll) / n if n else 0,
                    "ece": ece / n if n else 0})
    if a.reference:
        qn = ref[0]["questions"] > 0
        nb, nr = (ref[0]["label_nll"], ref[a.reference]["label_nll"]) if qn else (ref[0]["token_nll"], ref[a.reference]["token_nll"])
        for k in range(K):
            ref[k]["kl_ratio"] = (fid[k, 0] / fid[k, 2]) / (fid[0, 0] / fid[0, 2])
            ref[k]["top1_agreement"] = fid[k, 1] / fid[k, 2]
            ref[k]["share_kept"] = (nb - (ref[k]["label_nll"] if qn else ref[k]["token_nll"])) / (nb - nr)
    got = json.load(open(a.candidate))["models"]
    bad = 0
    if len(got) != K:
        print("ensemble: %d models in the report, expected %d" % (len(got), K))
        return 1
    for k in range(K):
        keys = (("token_nll", 1e-4), ("token_top1", 0), ("questions", 0), ("accuracy", 0), ("label_nll", 1e-4), ("ece", 1e-4))
        if a.reference:
            keys += (("kl_ratio", 1e-4), ("top1_agreement", 1e-8), ("share_kept", 1e-4))
        for key, tol in keys:
            r, c = ref[k][key], got[k][key]
            err = abs(r - c) / max(abs(r), 1.0)
            if err > tol:
                print("FAIL %s %s: got %.9g, NumPy %.9g" % (got[k]["model"], key, c, r))
                bad += 1
    print("ensemble: %d models x %d scores, %d differ from NumPy (NLLs, ECE%s within 1e-4; counts exact)" %
          (K, 9 if a.reference else 6, bad, ", kl_ratio, share kept" if a.reference else ""))
    return 1 if bad else 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grad")
    g.add_argument("model")
    g.add_argument("data")
    g.add_argument("candidate")
    g.add_argument("--adapter")
    g.add_argument("--full", action="store_true", help="the candidate is -full_rank's gradient of every weight")
    g.add_argument("--distil", nargs="+", help="teacher adapters (-distil): the loss is KL(teacher || student)")
    g.add_argument("--distil-data", nargs="+", help="one token file per teacher (-distil_data)")
    g.add_argument("--samples", type=int, default=3)
    g.add_argument("--tol", type=float, default=1e-3)
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p of the candidate's run")
    g.add_argument("--seed", type=int, default=0, help="-seed of the candidate's run (dropout masks)")
    w = sub.add_parser("adamw")
    w.add_argument("model")
    w.add_argument("data")
    w.add_argument("candidate")
    w.add_argument("--adapter", required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--lr", type=float, required=True)
    w.add_argument("--warmup", type=int, default=0)
    w.add_argument("--min-lr-ratio", type=float, default=0.0)
    w.add_argument("--beta1", type=float, default=0.9)
    w.add_argument("--beta2", type=float, default=0.999)
    w.add_argument("--eps", type=float, default=1e-8)
    w.add_argument("--weight-decay", type=float, default=0.0)
    w.add_argument("--max-grad-norm", type=float, default=1.0)
    w.add_argument("--tol", type=float, default=1e-3)
    e = sub.add_parser("ensemble")
    e.add_argument("model")
    e.add_argument("data")
    e.add_argument("candidate")
    e.add_argument("--adapters", nargs="+", required=True)
    e.add_argument("--bins", type=int, default=10)
    e.add_argument("--reference", type=int, default=0, help="1-based index of the -eval_reference adapter")
    a = ap.parse_args(argv)
    return {"grad": cmd_grad, "adamw": cmd_adamw, "ensemble": cmd_ensemble}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
