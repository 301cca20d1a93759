"""Minimal independent safetensors reader for reference checks (NumPy only; Debian has no
python3-safetensors). load(path) -> {name: float64 ndarray}, metadata(path) -> dict."""
import json
import struct

import numpy as np


def _bf16_to_f32(raw):
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (u16 << 16).view(np.float32)


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def metadata(path):
    return _header(path)[1].get("__metadata__", {})


def load(path):
    n, hdr = _header(path)
    with open(path, "rb") as f:
        f.seek(8 + n)
        buf = f.read()
    out = {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = buf[b:e]
        dt = info["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif dt == "F64":
            a = np.frombuffer(raw, dtype="<f8")
        elif dt == "F16":
            a = np.frombuffer(raw, dtype="<f2")
        elif dt == "BF16":
            a = _bf16_to_f32(raw)
        else:
            raise ValueError(f"{path}: dtype {dt} of {name} not handled")
        out[name] = a.astype(np.float64).reshape(info["shape"])
    return out
