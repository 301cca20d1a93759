"""SentencePiece tokenizer.model (protobuf ModelProto) written and read by hand, and a minimal GGUF
metadata reader: the independent side of the tokenizer.model tests (Debian's python3-sentencepiece
ships sentencepiece_model_pb2 but not python3-protobuf, so the wire format is done here).

Schema: google/sentencepiece src/sentencepiece_model.proto (v0.1.97). GGUF: ggml/include/gguf.h of
ggerganov/llama.cpp (magic "GGUF", version, tensor count, kv count, then key/type/value triples)."""
import struct

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


# ---- protobuf wire format --------------------------------------------------------------------------
def varint(v):
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def key(num, wt):
    return varint(num << 3 | wt)


def f_varint(num, v):
    return key(num, 0) + varint(int(v))


def f_bytes(num, b):
    if isinstance(b, str):
        b = b.encode("utf-8")
    return key(num, 2) + varint(len(b)) + b


def f_float(num, x):
    return key(num, 5) + struct.pack("<f", x)


def read_fields(buf):
    """[(field, wire type, value)] of one message: ints, bytes, or raw float bits as int."""
    out, pos = [], 0

    def rv():
        nonlocal pos
        x, s = 0, 0
        while True:
            c = buf[pos]
            pos += 1
            x |= (c & 0x7F) << s
            s += 7
            if not c & 0x80:
                return x
    while pos < len(buf):
        k = rv()
        num, wt = k >> 3, k & 7
        if wt == 0:
            out.append((num, wt, rv()))
        elif wt == 2:
            n = rv()
            out.append((num, wt, buf[pos:pos + n]))
            pos += n
        elif wt == 5:
            out.append((num, wt, struct.unpack("<f", buf[pos:pos + 4])[0]))
            pos += 4
        elif wt == 1:
            out.append((num, wt, buf[pos:pos + 8]))
            pos += 8
        else:
            raise ValueError("wire type %d" % wt)
    return out


def write_model(pieces, model_type=BPE, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=True,
                escape_whitespaces=True, treat_whitespace_as_suffix=False, unk_id=0, bos_id=1, eos_id=2,
                name="identity"):
    """pieces: [(piece str, score float, type int)] -> the bytes of a tokenizer.model."""
    out = bytearray()
    for p, score, t in pieces:
        body = f_bytes(1, p) + f_float(2, score)
        if t != NORMAL:
            body += f_varint(3, t)
        out += f_bytes(1, body)
    trainer = (f_varint(3, model_type) + f_varint(4, len(pieces)) + f_varint(24, treat_whitespace_as_suffix) +
               f_varint(35, byte_fallback) + f_varint(40, unk_id) + f_varint(41, bos_id) + f_varint(42, eos_id) +
               f_varint(43, -1))
    out += f_bytes(2, trainer)
    norm = (f_bytes(1, name) + f_varint(3, add_dummy_prefix) + f_varint(4, remove_extra_whitespaces) +
            f_varint(5, escape_whitespaces))
    out += f_bytes(3, norm)
    return bytes(out)


def read_model(buf):
    """tokenizer.model bytes -> (pieces [(piece, score, type)], trainer {num: value}, normalizer {num: value})"""
    pieces, trainer, normalizer = [], {}, {}
    for num, wt, v in read_fields(buf):
        if num == 1:
            d = {n: x for n, _, x in read_fields(v)}
            pieces.append((d[1].decode("utf-8"), d.get(2, 0.0), d.get(3, NORMAL)))
        elif num == 2:
            trainer.update({n: x for n, _, x in read_fields(v)})
        elif num == 3:
            normalizer.update({n: x for n, _, x in read_fields(v)})
    return pieces, trainer, normalizer


# ---- GGUF metadata ----------------------------------------------------------------------------------
def read_gguf_kv(path):
    """{key: value} of a GGUF file's metadata (arrays as lists); tensors are not read."""
    data = open(path, "rb").read()
    assert data[:4] == b"GGUF", "not a GGUF file"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def value(t):
        nonlocal pos
        if t in scalar:
            v = struct.unpack_from(scalar[t], data, pos)[0]
            pos += struct.calcsize(scalar[t])
            return v
        if t == 8:
            n = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
            s = data[pos:pos + n].decode("utf-8")
            pos += n
            return s
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [value(et) for _ in range(n)]
        raise ValueError("gguf type %d" % t)
    kv = {}
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8
        k = data[pos:pos + n].decode("utf-8")
        pos += n
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        kv[k] = value(t)
    return kv
