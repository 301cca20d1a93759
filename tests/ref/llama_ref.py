#!/usr/bin/python3
"""Independent float64 NumPy reference for the Llama-family forward pass (Llama 2/3, Mistral, Qwen2)
with Hugging Face semantics, plus PEFT LoRA adapters folded into the weights (W + s B A). It shares
no code with iteris-mpi: safetensors files are parsed by hand, config.json and adapter_config.json
are read here. Run with Debian's /usr/bin/python3 (numpy only).

Commands:
  logits  MODEL_DIR TOKENS.jsonl OUT.safetensors [--adapter DIR]...   float64 logits.K (F64)
  compare MODEL_DIR TOKENS.jsonl CANDIDATE.safetensors [--adapter DIR]... [--tol 1e-4]
          prints max|cand - ref| / max|ref| per tensor logits.K; exit 1 if any exceeds tol
  synth   OUT_DIR [--arch llama|mistral|qwen2] [--dtype F32|F16|BF16] [--layers L] [--hidden D]
          [--inter F] [--heads H] [--kv-heads K] [--head-dim hd] [--vocab V] [--tied] [--shards N]
          [--seed S] [--theta X]                                   a random tiny model folder
  adapter OUT_DIR --model MODEL_DIR [--rank r] [--alpha a] [--rslora] [--targets q_proj,v_proj]
          [--rank-pattern KEY=R]... [--alpha-pattern KEY=A]... [--dtype F32|BF16] [--seed S]
  tokens  OUT.jsonl --vocab V --lengths 5,1,9 [--seed S]
"""
import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np

# ---- safetensors, by hand ------------------------------------------------------------------------

_DT = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def st_read(path):
    """Returns {name: float64 array} for every tensor of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DT[info["dtype"]]
        b, e = info["data_offsets"]
        raw = np.frombuffer(data[base + b:base + e], dtype=dt)
        if info["dtype"] == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            arr = raw.astype(np.float64)
        out[name] = arr.reshape(info["shape"])
    return out


def _to_dtype(a, dtype):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    if dtype == "F64":
        return np.asarray(a, dtype="<f8").tobytes()
    if dtype == "BF16":
        u = a.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
        return u.astype("<u2").tobytes()
    raise ValueError(dtype)


def st_write(path, tensors, dtype="F32", metadata=None):
    """tensors: {name: array}; all stored as dtype (or per-tensor (array, dtype) pairs)."""
    names = sorted(tensors)
    header, blobs, off = {}, [], 0
    for name in names:
        v = tensors[name]
        arr, dt = (v if isinstance(v, tuple) else (v, dtype))
        if dt == "F64":
            blob = np.ascontiguousarray(arr, dtype="<f8").tobytes()
        else:
            blob = _to_dtype(arr, dt)
        header[name] = {"dtype": dt, "shape": list(np.shape(arr)), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode("utf-8")
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_model_tensors(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(wm.values())):
            out.update(st_read(os.path.join(d, shard)))
        return out
    return st_read(os.path.join(d, "model.safetensors"))


# ---- configuration ---------------------------------------------------------------------------------

class Cfg:
    def __init__(self, d):
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        self.model_type = c.get("model_type", "llama")
        self.D = c["hidden_size"]
        self.F = c["intermediate_size"]
        self.L = c["num_hidden_layers"]
        self.H = c["num_attention_heads"]
        self.Hkv = c.get("num_key_value_heads") or self.H
        self.hd = c.get("head_dim") or self.D // self.H
        self.V = c["vocab_size"]
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.theta = c.get("rope_theta", 10000.0)
        self.tied = bool(c.get("tie_word_embeddings", False))
        if c.get("rope_scaling"):
            raise SystemExit("llama_ref.py: rope_scaling is not supported")
        if self.model_type == "qwen2":
            self.qkv_bias, self.o_bias, self.mlp_bias = True, False, False
        elif self.model_type == "mistral":
            self.qkv_bias = self.o_bias = self.mlp_bias = False
        else:
            ab = bool(c.get("attention_bias", False))
            self.qkv_bias, self.o_bias, self.mlp_bias = ab, ab, bool(c.get("mlp_bias", False))


MODULES = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


def module_shape(cfg, mod):
    qd, kvd = cfg.H * cfg.hd, cfg.Hkv * cfg.hd
    return {"q_proj": (qd, cfg.D), "k_proj": (kvd, cfg.D), "v_proj": (kvd, cfg.D), "o_proj": (cfg.D, qd),
            "gate_proj": (cfg.F, cfg.D), "up_proj": (cfg.F, cfg.D), "down_proj": (cfg.D, cfg.F)}[mod]


# ---- adapters ----------------------------------------------------------------------------------------

def _pattern(pat, path, default):
    """PEFT: a key applies when the module path equals it or ends with '.' + key."""
    for k, v in (pat or {}).items():
        if path == k or path.endswith("." + k):
            return v
    return default


def fold_adapter(W, cfg, adir):
    with open(os.path.join(adir, "adapter_config.json")) as f:
        ac = json.load(f)
    t = st_read(os.path.join(adir, "adapter_model.safetensors"))
    rx = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_A\.weight$")
    n = 0
    for name, A in t.items():
        m = rx.match(name)
        if not m:
            continue
        layer, block, mod = int(m.group(1)), m.group(2), m.group(3)
        B = t[name.replace("lora_A", "lora_B")]
        path = "model.layers.%d.%s.%s" % (layer, block, mod)
        r = int(_pattern(ac.get("rank_pattern"), path, ac["r"]))
        alpha = float(_pattern(ac.get("alpha_pattern"), path, ac["lora_alpha"]))
        assert A.shape[0] == r and B.shape[1] == r, (name, A.shape, B.shape, r)
        s = alpha / math.sqrt(r) if ac.get("use_rslora") else alpha / r
        key = "model.layers.%d.%s.%s.weight" % (layer, block, mod)
        W[key] = W[key] + s * (B @ A)
        n += 1
    if n == 0:
        raise SystemExit("llama_ref.py: adapter %s has no lora_A tensors" % adir)


# ---- the forward pass, float64 -------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, theta):
    """x (n, heads, hd): Hugging Face rotate-half rotary embedding, positions 0..n-1."""
    n, _, hd = x.shape
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    emb = np.concatenate([ang, ang], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rot * sin


def forward(cfg, W, ids, extra=None):
    """ids: list of ints (one sequence) -> logits (n, V) float64. extra (optional): a function
    (module key "model.layers.L.block.mod", its input x) -> a term added to that module's product."""
    n = len(ids)
    h = W["model.embed_tokens.weight"][np.asarray(ids)]
    mask = np.triu(np.full((n, n), -np.inf), 1)

    def lin(x, key, bias):
        y = x @ W[key + ".weight"].T
        if extra is not None:
            y = y + extra(key, x)
        return y + W[key + ".bias"] if bias else y

    for l in range(cfg.L):
        p = "model.layers.%d." % l
        x = rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps)
        q = lin(x, p + "self_attn.q_proj", cfg.qkv_bias).reshape(n, cfg.H, cfg.hd)
        k = lin(x, p + "self_attn.k_proj", cfg.qkv_bias).reshape(n, cfg.Hkv, cfg.hd)
        v = lin(x, p + "self_attn.v_proj", cfg.qkv_bias).reshape(n, cfg.Hkv, cfg.hd)
        q, k = rope(q, cfg.theta), rope(k, cfg.theta)
        rep = cfg.H // cfg.Hkv  # repeat_kv: head h reads kv head h // rep
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(cfg.hd) + mask[None]
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(n, cfg.H * cfg.hd)
        h = h + lin(a, p + "self_attn.o_proj", cfg.o_bias)
        x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
        g = lin(x, p + "mlp.gate_proj", cfg.mlp_bias)
        u = lin(x, p + "mlp.up_proj", cfg.mlp_bias)
        h = h + lin(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj", cfg.mlp_bias)
    x = rmsnorm(h, W["model.norm.weight"], cfg.eps)
    head = W["model.embed_tokens.weight"] if cfg.tied else W["lm_head.weight"]
    return x @ head.T


def read_tokens(path):
    seqs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                seqs.append(json.loads(line)["input_ids"])
    return seqs


def reference_logits(model_dir, tokens, adapters):
    cfg = Cfg(model_dir)
    W = load_model_tensors(model_dir)
    for a in adapters or []:
        fold_adapter(W, cfg, a)
    return [forward(cfg, W, ids) for ids in read_tokens(tokens)]


# ---- generators -------------------------------------------------------------------------------------------

def cmd_synth(a):
    rng = np.random.RandomState(a.seed)
    os.makedirs(a.out, exist_ok=True)
    hd = a.head_dim or a.hidden // a.heads
    cfg = {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}[a.arch]],
           "model_type": a.arch, "hidden_size": a.hidden, "intermediate_size": a.inter,
           "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
           "head_dim": hd, "vocab_size": a.vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "rope_theta": a.theta, "hidden_act": "silu", "tie_word_embeddings": bool(a.tied),
           "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[a.dtype]}
    if a.arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    c = Cfg(a.out)
    T = {"model.embed_tokens.weight": rng.randn(a.vocab, a.hidden),
         "model.norm.weight": 1 + 0.1 * rng.randn(a.hidden)}
    if not a.tied:
        T["lm_head.weight"] = rng.randn(a.vocab, a.hidden) / math.sqrt(a.hidden)
    for l in range(a.layers):
        p = "model.layers.%d." % l
        T[p + "input_layernorm.weight"] = 1 + 0.1 * rng.randn(a.hidden)
        T[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.randn(a.hidden)
        for block, mod in MODULES:
            o, i = module_shape(c, mod)
            T[p + block + "." + mod + ".weight"] = rng.randn(o, i) / math.sqrt(i)
            if c.qkv_bias and mod in ("q_proj", "k_proj", "v_proj"):
                T[p + block + "." + mod + ".bias"] = 0.2 * rng.randn(o)
    if a.shards <= 1:
        st_write(os.path.join(a.out, "model.safetensors"), T, a.dtype, {"format": "pt"})
        return
    names = sorted(T)
    wm = {}
    for s in range(a.shards):
        part = names[s::a.shards]
        fn = "model-%05d-of-%05d.safetensors" % (s + 1, a.shards)
        st_write(os.path.join(a.out, fn), {k: T[k] for k in part}, a.dtype, {"format": "pt"})
        wm.update({k: fn for k in part})
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f, indent=1)


def cmd_adapter(a):
    rng = np.random.RandomState(a.seed)
    c = Cfg(a.model)
    os.makedirs(a.out, exist_ok=True)
    targets = a.targets.split(",")
    rp = dict(kv.split("=") for kv in a.rank_pattern)
    ap = dict(kv.split("=") for kv in a.alpha_pattern)
    rp = {k: int(v) for k, v in rp.items()}
    ap = {k: float(v) for k, v in ap.items()}
    T = {}
    for l in range(c.L):
        for block, mod in MODULES:
            if mod not in targets:
                continue
            path = "model.layers.%d.%s.%s" % (l, block, mod)
            r = int(_pattern(rp, path, a.rank))
            o, i = module_shape(c, mod)
            pre = "base_model.model." + path
            T[pre + ".lora_A.weight"] = rng.randn(r, i) / math.sqrt(i)
            T[pre + ".lora_B.weight"] = 0.3 * rng.randn(o, r)
    st_write(os.path.join(a.out, "adapter_model.safetensors"), T, a.dtype)
    ac = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic", "r": a.rank,
          "lora_alpha": a.alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
          "fan_in_fan_out": False, "use_rslora": bool(a.rslora), "use_dora": False, "modules_to_save": None,
          "rank_pattern": rp, "alpha_pattern": ap}
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        json.dump(ac, f, indent=1)


def cmd_tokens(a):
    rng = np.random.RandomState(a.seed)
    with open(a.out, "w") as f:
        for n in [int(x) for x in a.lengths.split(",")]:
            f.write(json.dumps({"input_ids": [int(t) for t in rng.randint(0, a.vocab, size=n)]}) + "\n")


def cmd_logits(a):
    ref = reference_logits(a.model, a.tokens, a.adapter)
    st_write(a.out, {"logits.%d" % k: (v, "F64") for k, v in enumerate(ref)})


def cmd_compare(a):
    ref = reference_logits(a.model, a.tokens, a.adapter)
    cand = st_read(a.candidate)
    worst, bad = 0.0, 0
    for k, r in enumerate(ref):
        name = "logits.%d" % k
        if name not in cand:
            print("%s: missing from %s" % (name, a.candidate))
            bad += 1
            continue
        c = cand[name]
        if c.shape != r.shape:
            print("%s: shape %s, expected %s" % (name, c.shape, r.shape))
            bad += 1
            continue
        e = np.max(np.abs(c - r)) / max(np.max(np.abs(r)), 1e-300)
        am = np.mean(np.argmax(c, axis=-1) == np.argmax(r, axis=-1))
        ok = e <= a.tol
        bad += 0 if ok else 1
        worst = max(worst, e)
        print("%s %s: (%d, %d) rel err %.3e  argmax agreement %.3f  %s" %
              (a.label, name, r.shape[0], r.shape[1], e, am, "PASSED" if ok else "FAILED"))
    extra = sorted(set(n for n in cand if n.startswith("logits.")) - set("logits.%d" % k for k in range(len(ref))))
    if extra:
        print("unexpected tensors in candidate: %s" % extra)
        bad += 1
    print("%s: worst rel err %.3e over %d tensors (tol %.1e): %s" %
          (a.label, worst, len(ref), a.tol, "PASSED" if bad == 0 else "FAILED"))
    return 1 if bad else 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits")
    p.add_argument("model"); p.add_argument("tokens"); p.add_argument("out")
    p.add_argument("--adapter", action="append", default=[])
    p = sub.add_parser("compare")
    p.add_argument("model"); p.add_argument("tokens"); p.add_argument("candidate")
    p.add_argument("--adapter", action="append", default=[])
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--label", default="")
    p = sub.add_parser("synth")
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--inter", type=int, default=48)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=0)
    p.add_argument("--vocab", type=int, default=40)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("adapter")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--rank-pattern", action="append", default=[])
    p.add_argument("--alpha-pattern", action="append", default=[])
    p.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("tokens")
    p.add_argument("out")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--lengths", default="5,1,9")
    p.add_argument("--seed", type=int, default=2)
    a = ap.parse_args(argv)
    return {"logits": cmd_logits, "compare": cmd_compare, "synth": cmd_synth, "adapter": cmd_adapter,
            "tokens": cmd_tokens}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
