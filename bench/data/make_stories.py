#!/usr/bin/env python3
"""A pre-training corpus for bench/switchlora.sh: stories sampled from stories260K (../shared/models/stories260K,
Karpathy's TinyStories model for llama2.c), so that models of its shape trained from scratch have an unlimited
supply of text from one fixed distribution (the TinyStories style) and the best reachable loss is the sampler's
own entropy. Sampling: BOS, then temperature 1 over the full vocabulary, batched with a key/value cache, in
float32 NumPy (the forward as tests/ref/llama_ref.py's, positions one at a time). No network, no PyTorch.

usage: make_stories.py MODEL_DIR OUT.jsonl N_STORIES LENGTH SEED
writes N_STORIES lines {"input_ids": [1, ...]} of LENGTH tokens each (BOS included; EOS is not special here)."""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "ref"))
import llama_ref as R  # noqa: E402


def main(argv):
    mdir, out, n, length, seed = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
    cfg = R.Cfg(mdir)
    W = {k: v.astype(np.float32) for k, v in R.load_model_tensors(mdir).items()}
    head = W["model.embed_tokens.weight"] if cfg.tied else W["lm_head.weight"]
    rng = np.random.default_rng(seed)
    hd, H, Hkv, rep = cfg.hd, cfg.H, cfg.Hkv, cfg.H // cfg.Hkv
    inv = cfg.theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    K = np.zeros((cfg.L, n, length, Hkv, hd), np.float32)
    Vc = np.zeros_like(K)
    ids = np.ones((n, length), np.int64)  # BOS = 1

    def rope(x, t):  # x (n, heads, hd), all at position t
        ang = t * inv
        c, s = np.cos(np.concatenate([ang, ang])).astype(np.float32), np.sin(np.concatenate([ang, ang])).astype(np.float32)
        return x * c + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1) * s

    def norm(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.eps))

    for t in range(length - 1):
        h = W["model.embed_tokens.weight"][ids[:, t]]
        for l in range(cfg.L):
            p = "model.layers.%d." % l
            x = norm(h, W[p + "input_layernorm.weight"])
            q = rope((x @ W[p + "self_attn.q_proj.weight"].T).reshape(n, H, hd), t)
            K[l, :, t] = rope((x @ W[p + "self_attn.k_proj.weight"].T).reshape(n, Hkv, hd), t)
            Vc[l, :, t] = (x @ W[p + "self_attn.v_proj.weight"].T).reshape(n, Hkv, hd)
            k, v = np.repeat(K[l, :, :t + 1], rep, axis=2), np.repeat(Vc[l, :, :t + 1], rep, axis=2)
            s = np.einsum("nhd,nshd->nhs", q, k) / math.sqrt(hd)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            a = np.einsum("nhs,nshd->nhd", s, v).reshape(n, H * hd)
            h = h + a @ W[p + "self_attn.o_proj.weight"].T
            x = norm(h, W[p + "post_attention_layernorm.weight"])
            g, u = x @ W[p + "mlp.gate_proj.weight"].T, x @ W[p + "mlp.up_proj.weight"].T
            h = h + (g / (1 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
        z = (norm(h, W["model.norm.weight"]) @ head.T).astype(np.float64)
        pr = np.exp(z - z.max(axis=1, keepdims=True))
        pr /= pr.sum(axis=1, keepdims=True)
        c = pr.cumsum(axis=1)
        ids[:, t + 1] = np.minimum((c < rng.random((n, 1)) * c[:, -1:]).sum(axis=1), cfg.V - 1)
    with open(out, "w") as f:
        for row in ids:
            f.write(json.dumps({"input_ids": [int(x) for x in row]}) + "\n")


if __name__ == "__main__":
    main(sys.argv)
