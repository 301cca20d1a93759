#!/usr/bin/env python3
"""Independent float64 NumPy reference for MixLoRA (Li et al. 2024; the format and routing of
github.com/TUDB-Labs/MixLoRA, mixlora/model.py: 'mixtral' routing): the Llama-family forward of
llama_ref.py with, in every layer that has a router, the feed-forward replaced by

    p = softmax(x R^T);  the top_k experts by p (ties: the lower index);  w = p_chosen / sum p_chosen
    out = sum_e w_e [ W_d a_e + b_d + s B_d A_d a_e ],  a_e = silu(g + s B_g A_g x) * (u + s B_u A_u x)

(g, u the base gate and up products with their biases), and LoRA on the attention projections.

  adapter OUT --model DIR [--experts 4 --top-k 2 --rank 4 --alpha 8 --expert-rank R --expert-alpha A
          --router-layers 0,1 --tie --seed S]
        writes a MixLoRA adapter (adapter_config.json in the reference's fields, adapter_model.safetensors
        with its tensor names); --tie makes router rows 0 and 1 of the first routed layer equal
  compare MODEL_DIR TOKENS.jsonl CANDIDATE.safetensors --adapter DIR [--tol 1e-4]
        the logits of base + MixLoRA adapter against the candidate's logits.K
  grad MODEL_DIR DATA.jsonl CANDIDATE.safetensors --adapter DIR [--aux-coef 0.001 --loss L --samples 2 --tol 1e-4]
        training (-train -init_adapter DIR -grad_out CANDIDATE): the gradient of
            mean next-token loss over DATA (train_ref.py's targets) + aux_coef * aux
        with respect to every factor, router and expert, against central differences (h 1e-6) of that
        loss with the selection of the point held fixed (it is piecewise constant; ties: the lower index).
        aux is the reference's 'mixtral' router loss (mlora/mix_lora.py _mixtral_load_balancing_loss_func)
        over all of DATA as one batch: the router probabilities of every routed layer and token
        concatenated (N rows), f_e = (rows with e among their top_k) / N, P_e = mean p_e, aux = E sum f_e P_e;
        --loss: also the candidate's mean loss (printed by -grad_out) against the reference's
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref as R  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def load_mixlora(cfg, adir):
    ac = json.load(open(os.path.join(adir, "adapter_config.json")))
    assert ac["peft_type"] == "MIXLORA" and ac["routing_strategy"] == "mixtral"
    t = R.st_read(os.path.join(adir, "adapter_model.safetensors"))
    def scaling(c, r, alpha):
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
    ex = dict(ac)
    ex.update(ac.get("expert_lora") or {})
    s_att, s_ex = scaling(ac, ac["r"], ac["lora_alpha"]), scaling(ex, ex["r"], ex["lora_alpha"])
    E, k = ac["num_experts"], ac.get("top_k", 2)
    layers = {}
    for l in range(cfg.L):
        p = "mixlora.layers.%d." % l
        att = {m: (t[p + "self_attn.%s.lora_A.weight" % m], t[p + "self_attn.%s.lora_B.weight" % m])
               for m in ATTN if p + "self_attn.%s.lora_A.weight" % m in t}
        router = t.get(p + "gate.weight")
        experts = [{m: (t[p + "experts.%d.%s.lora_A.weight" % (e, m)], t[p + "experts.%d.%s.lora_B.weight" % (e, m)])
                    for m in FFN if p + "experts.%d.%s.lora_A.weight" % (e, m) in t} for e in range(E)]
        layers[l] = (att, router, experts)
    return s_att, s_ex, E, k, layers


def forward(cfg, W, ids, mix, stop_at=None):
    """Logits (n, V); with stop_at = l, the FFN input x of layer l (after the post-attention norm) instead."""
    s_att, s_ex, E, k, layers = mix
    n = len(ids)
    h = W["model.embed_tokens.weight"][np.asarray(ids)]
    mask = np.triu(np.full((n, n), -np.inf), 1)

    def lin(x, key, bias, lora=None, s=0.0):
        y = x @ W[key + ".weight"].T
        if lora is not None:
            A, B = lora
            y = y + s * (x @ A.T) @ B.T
        return y + W[key + ".bias"] if bias else y

    for l in range(cfg.L):
        p = "model.layers.%d." % l
        att, router, experts = layers[l]
        x = R.rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps)
        q = lin(x, p + "self_attn.q_proj", cfg.qkv_bias, att.get("q_proj"), s_att).reshape(n, cfg.H, cfg.hd)
        kk = lin(x, p + "self_attn.k_proj", cfg.qkv_bias, att.get("k_proj"), s_att).reshape(n, cfg.Hkv, cfg.hd)
        v = lin(x, p + "self_attn.v_proj", cfg.qkv_bias, att.get("v_proj"), s_att).reshape(n, cfg.Hkv, cfg.hd)
        q, kk = R.rope(q, cfg.theta), R.rope(kk, cfg.theta)
        rep = cfg.H // cfg.Hkv
        kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
        sc = np.einsum("thd,shd->hts", q, kk) / math.sqrt(cfg.hd) + mask[None]
        sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
        sc /= sc.sum(axis=-1, keepdims=True)
        a = np.einsum("hts,shd->thd", sc, v).reshape(n, cfg.H * cfg.hd)
        h = h + lin(a, p + "self_attn.o_proj", cfg.o_bias, att.get("o_proj"), s_att)
        x = R.rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
        if stop_at == l:
            return x
        if router is None:
            g, u = lin(x, p + "mlp.gate_proj", cfg.mlp_bias), lin(x, p + "mlp.up_proj", cfg.mlp_bias)
            h = h + lin(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj", cfg.mlp_bias)
            continue
        z = x @ router.T
        pr = np.exp(z - z.max(axis=1, keepdims=True))
        pr /= pr.sum(axis=1, keepdims=True)
        out = np.zeros_like(h)
        for t in range(n):
            order = np.argsort(-pr[t], kind="stable")[:k]  # ties: the lower index first
            w = pr[t, order] / pr[t, order].sum()
            xt = x[t:t + 1]
            for wj, e in zip(w, order):
                ex = experts[e]
                g = lin(xt, p + "mlp.gate_proj", cfg.mlp_bias, ex.get("gate_proj"), s_ex)
                u = lin(xt, p + "mlp.up_proj", cfg.mlp_bias, ex.get("up_proj"), s_ex)
                act = g / (1 + np.exp(-g)) * u
                out[t] += wj * lin(act, p + "mlp.down_proj", cfg.mlp_bias, ex.get("down_proj"), s_ex)[0]
        h = h + out
    x = R.rmsnorm(h, W["model.norm.weight"], cfg.eps)
    head = W["model.embed_tokens.weight"] if cfg.tied else W["lm_head.weight"]
    return x @ head.T


def forward_train(cfg, W, ids, mix, frozen=None, probs=None):
    """forward() with a recorded (frozen None: filled in) or given selection, frozen {layer: (n, k) experts};
    probs: a list that gets (layer, p (n, E)) of every routed layer. Vectorised per expert."""
    s_att, s_ex, E, k, layers = mix
    n = len(ids)
    h = W["model.embed_tokens.weight"][np.asarray(ids)]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    sel = {} if frozen is None else frozen

    def lin(x, key, bias, lora=None, s=0.0):
        y = x @ W[key + ".weight"].T
        if lora is not None:
            A, B = lora
            y = y + s * (x @ A.T) @ B.T
        return y + W[key + ".bias"] if bias else y

    for l in range(cfg.L):
        p = "model.layers.%d." % l
        att, router, experts = layers[l]
        x = R.rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps)
        q = lin(x, p + "self_attn.q_proj", cfg.qkv_bias, att.get("q_proj"), s_att).reshape(n, cfg.H, cfg.hd)
        kk = lin(x, p + "self_attn.k_proj", cfg.qkv_bias, att.get("k_proj"), s_att).reshape(n, cfg.Hkv, cfg.hd)
        v = lin(x, p + "self_attn.v_proj", cfg.qkv_bias, att.get("v_proj"), s_att).reshape(n, cfg.Hkv, cfg.hd)
        q, kk = R.rope(q, cfg.theta), R.rope(kk, cfg.theta)
        rep = cfg.H // cfg.Hkv
        kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
        sc = np.einsum("thd,shd->hts", q, kk) / math.sqrt(cfg.hd) + mask[None]
        sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
        sc /= sc.sum(axis=-1, keepdims=True)
        a = np.einsum("hts,shd->thd", sc, v).reshape(n, cfg.H * cfg.hd)
        h = h + lin(a, p + "self_attn.o_proj", cfg.o_bias, att.get("o_proj"), s_att)
        x = R.rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
        if router is None:
            g, u = lin(x, p + "mlp.gate_proj", cfg.mlp_bias), lin(x, p + "mlp.up_proj", cfg.mlp_bias)
            h = h + lin(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj", cfg.mlp_bias)
            continue
        z = x @ router.T
        pr = np.exp(z - z.max(axis=1, keepdims=True))
        pr /= pr.sum(axis=1, keepdims=True)
        if probs is not None:
            probs.append((l, pr))
        if frozen is None:
            sel[l] = np.stack([np.argsort(-pr[t], kind="stable")[:k] for t in range(n)])
        order = sel[l]
        pc = np.take_along_axis(pr, order, axis=1)
        w = pc / pc.sum(axis=1, keepdims=True)
        out = np.zeros_like(h)
        for e in range(E):
            rows, slots = np.nonzero(order == e)
            if len(rows) == 0:
                continue
            xt, ex = x[rows], experts[e]
            g = lin(xt, p + "mlp.gate_proj", cfg.mlp_bias, ex.get("gate_proj"), s_ex)
            u = lin(xt, p + "mlp.up_proj", cfg.mlp_bias, ex.get("up_proj"), s_ex)
            y = lin(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj", cfg.mlp_bias, ex.get("down_proj"), s_ex)
            np.add.at(out, rows, w[rows, slots][:, None] * y)
        h = h + out
    x = R.rmsnorm(h, W["model.norm.weight"], cfg.eps)
    head = W["model.embed_tokens.weight"] if cfg.tied else W["lm_head.weight"]
    return x @ head.T, sel


def train_loss(cfg, W, mix, seqs, coef, frozen):
    """Mean next-token loss over seqs [(ids, first)] + coef * aux (the batch: all of seqs). frozen: a list
    of per-sequence selections (None entries are recorded at this point)."""
    E, k = mix[2], mix[3]
    total, count, probs = 0.0, 0, []
    for si, (ids, first) in enumerate(seqs):
        z, sel = forward_train(cfg, W, ids, mix, frozen[si], probs)
        frozen[si] = sel
        if len(ids) > first:
            z = z[first - 1:-1]
            mx = z.max(axis=1, keepdims=True)
            lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
            total += float(np.sum(lse - z[np.arange(len(ids) - first), np.asarray(ids[first:])]))
            count += len(ids) - first
    aux = 0.0
    if coef:
        P = np.concatenate([p for _, p in probs])  # (N, E): every routed layer and token
        chosen = np.concatenate([frozen[si][l] for si in range(len(seqs)) for l in sorted(frozen[si])])
        f = np.bincount(chosen.ravel(), minlength=E) / P.shape[0]
        aux = E * float(np.sum(f * P.mean(axis=0)))
    return total / count + coef * aux, aux


def cmd_grad(a):
    import train_ref as TR
    cfg, W = R.Cfg(a.model), R.load_model_tensors(a.model)
    mix = load_mixlora(cfg, a.adapter)
    seqs = TR.read_train(a.data)
    frozen = [None] * len(seqs)
    loss0, aux0 = train_loss(cfg, W, mix, seqs, a.aux_coef, frozen)  # records the selection
    print("reference mean loss %.9g (load balancing %.6g)" % (loss0, aux0))
    bad = 0
    if a.loss is not None:
        e = abs(a.loss - loss0) / abs(loss0)
        print("%-10s %-24s relative error %.3e" % ("FAIL" if e > a.tol else "ok", "mean loss", e))
        bad += e > a.tol
    params = {}
    for l, (att, router, experts) in mix[4].items():
        pre = "mixlora.layers.%d." % l
        for m, (A, B) in att.items():
            params[pre + "self_attn.%s.lora_A.weight" % m] = ("attn.%s.A" % m, A)
            params[pre + "self_attn.%s.lora_B.weight" % m] = ("attn.%s.B" % m, B)
        if router is not None:
            params[pre + "gate.weight"] = ("router", router)
        for e, ex in enumerate(experts):
            for m, (A, B) in ex.items():
                params[pre + "experts.%d.%s.lora_A.weight" % (e, m)] = ("expert.%s.A" % m, A)
                params[pre + "experts.%d.%s.lora_B.weight" % (e, m)] = ("expert.%s.B" % m, B)
    cand = R.st_read(a.candidate)
    if set(cand) != set(params):
        print("grad: the candidate's tensors differ from the adapter's: missing %s, extra %s" %
              (sorted(set(params) - set(cand))[:4], sorted(set(cand) - set(params))[:4]))
        return 1
    rng = np.random.RandomState(0)
    worst = {}
    for name in sorted(params):
        kind, arr = params[name]
        g = cand[name]
        if g.shape != arr.shape:
            print("grad: %s has shape %s, the adapter %s" % (name, g.shape, arr.shape))
            bad += 1
            continue
        picks = [np.unravel_index(int(np.argmax(np.abs(g))), g.shape)]
        picks += [tuple(rng.randint(0, n) for n in g.shape) for _ in range(a.samples)]
        ref = []
        for ix in picks:
            old = arr[ix]
            arr[ix] = old + a.h
            up = train_loss(cfg, W, mix, seqs, a.aux_coef, frozen)[0]
            arr[ix] = old - a.h
            dn = train_loss(cfg, W, mix, seqs, a.aux_coef, frozen)[0]
            arr[ix] = old
            ref.append((up - dn) / (2 * a.h))
        ref = np.array(ref)
        got = np.array([g[ix] for ix in picks])
        err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))
        worst[kind] = max(worst.get(kind, 0.0), err)
    for kind in sorted(worst):
        flag = "FAIL" if worst[kind] > a.tol else "ok"
        print("%-10s %-24s worst relative error %.3e" % (flag, kind, worst[kind]))
        bad += worst[kind] > a.tol
    return 1 if bad else 0


def cmd_adapter(a):
    rng = np.random.RandomState(a.seed)
    c = R.Cfg(a.model)
    os.makedirs(a.out, exist_ok=True)
    er, ea = a.expert_rank or a.rank, a.expert_alpha or a.alpha
    routed = [int(x) for x in a.router_layers.split(",")] if a.router_layers else list(range(c.L))
    T = {}
    for l in range(c.L):
        p = "mixlora.layers.%d." % l
        for m in ATTN:
            o, i = R.module_shape(c, m)
            T[p + "self_attn.%s.lora_A.weight" % m] = rng.randn(a.rank, i) / math.sqrt(i)
            T[p + "self_attn.%s.lora_B.weight" % m] = 0.3 * rng.randn(o, a.rank)
        if l not in routed:
            continue
        router = 2.0 * rng.randn(a.experts, c.D)
        if a.tie and l == routed[0]:
            router[1] = router[0]
        T[p + "gate.weight"] = router
        for e in range(a.experts):
            for m in FFN:
                o, i = R.module_shape(c, m)
                T[p + "experts.%d.%s.lora_A.weight" % (e, m)] = rng.randn(er, i) / math.sqrt(i)
                T[p + "experts.%d.%s.lora_B.weight" % (e, m)] = 0.5 * rng.randn(o, er)
    R.st_write(os.path.join(a.out, "adapter_model.safetensors"), T, "F32")
    ac = {"peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic", "bias": "none",
          "r": a.rank, "lora_alpha": a.alpha, "lora_dropout": 0.0, "target_modules": ATTN + FFN,
          "routing_strategy": "mixtral", "num_experts": a.experts, "top_k": a.top_k, "act_fn": "silu",
          "router_aux_loss_coef": 0.01, "router_init_range": 0.02, "jitter_noise": 0.0, "router_loss": True}
    if a.expert_rank or a.expert_alpha:
        ac["expert_lora"] = {"r": er, "lora_alpha": ea, "lora_dropout": 0.0}
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        json.dump(ac, f, indent=1)


def cmd_routers(a):
    """The routers -method mixlora must have written: layer by layer, the FFN inputs of every calibration
    token under the adapter's attention and the routed layers below (the adapter's own routers), then the ridge
    least-squares map to the task's one-hot label, R = ((X^T X + lambda mean(diag) I)^-1 X^T Y)^T."""
    cfg, W = R.Cfg(a.model), R.load_model_tensors(a.model)
    mix = load_mixlora(cfg, a.adapter)
    rows = []
    for i, f in enumerate(a.calib.split(",")):
        rows += [(ids[:a.max_tokens] if a.max_tokens else ids, i) for ids in R.read_tokens(f)]
    worst = 0.0
    for l in range(cfg.L):
        X = np.concatenate([forward(cfg, W, ids, mix, stop_at=l) for ids, _ in rows])
        Y = np.zeros((X.shape[0], mix[2]))
        Y[np.arange(X.shape[0]), np.concatenate([[i] * len(ids) for ids, i in rows])] = 1
        G = X.T @ X
        G += a.ridge * np.trace(G) / G.shape[0] * np.eye(G.shape[0])
        Rt = np.linalg.solve(G, X.T @ Y).T
        got = mix[4][l][1]
        e = np.abs(got - Rt).max() / np.abs(Rt).max()
        worst = max(worst, e)
        print("layer %d: router (%d, %d) relative difference %.2e" % (l, Rt.shape[0], Rt.shape[1], e))
    print("routers: worst relative difference %.3e (tol %.0e): %s" % (worst, a.tol, "PASSED" if worst <= a.tol else "FAILED"))
    return 0 if worst <= a.tol else 1


def cmd_compare(a):
    cfg, W = R.Cfg(a.model), R.load_model_tensors(a.model)
    mix = load_mixlora(cfg, a.adapter)
    cand = R.st_read(a.candidate)
    worst, bad = 0.0, 0
    for k, ids in enumerate(R.read_tokens(a.tokens)):
        r = forward(cfg, W, ids, mix)
        c = cand.get("logits.%d" % k)
        if c is None or c.shape != r.shape:
            print("logits.%d: missing or shape %s, expected %s" % (k, None if c is None else c.shape, r.shape))
            bad += 1
            continue
        e = np.max(np.abs(c - r)) / max(np.max(np.abs(r)), 1e-300)
        worst = max(worst, e)
        bad += e > a.tol
    print("mixlora: worst relative logit error %.3e over %d sequences (tol %.0e): %s" %
          (worst, len(R.read_tokens(a.tokens)), a.tol, "PASSED" if bad == 0 else "FAILED"))
    return 1 if bad else 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("adapter")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--expert-rank", type=int, default=0)
    p.add_argument("--expert-alpha", type=float, default=0.0)
    p.add_argument("--router-layers", default="")
    p.add_argument("--tie", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("compare")
    p.add_argument("model"); p.add_argument("tokens"); p.add_argument("candidate")
    p.add_argument("--adapter", required=True)
    p.add_argument("--tol", type=float, default=1e-4)
    p = sub.add_parser("routers")
    p.add_argument("model"); p.add_argument("calib"); p.add_argument("adapter")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5)
    p = sub.add_parser("grad")
    p.add_argument("model"); p.add_argument("data"); p.add_argument("candidate")
    p.add_argument("--adapter", required=True)
    p.add_argument("--aux-coef", type=float, default=0.001)
    p.add_argument("--loss", type=float, default=None)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--h", type=float, default=1e-6)
    p.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    return {"adapter": cmd_adapter, "compare": cmd_compare, "routers": cmd_routers, "grad": cmd_grad}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
