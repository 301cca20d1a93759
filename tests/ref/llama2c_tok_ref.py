#!/usr/bin/env python3
"""An independent reference of llama2.c's tokenizer (karpathy/llama2.c, run.c: build_tokenizer and
encode), written the plain way: after every merge every adjacent pair is scanned again (O(n^2)).
src/io/tokenizer.c gets the same ids with a heap; tests/e2e/tokenize.sh compares the two.
Standard library only.

usage: llama2c_tok_ref.py TOKENIZER.bin VOCAB_SIZE IN.jsonl OUT.jsonl
  Every line of IN.jsonl ({"text": ...}, or {"input_ids": [...]} kept as it is) becomes one
  {"input_ids": [...]} line of OUT.jsonl; text is encoded with BOS, without EOS. The file is read
  with surrogateescape, so raw bytes that are not UTF-8 reach the encoder unchanged.
"""
import json
import struct
import sys

BOS, EOS = 1, 2
FLOOR = struct.unpack("<f", struct.pack("<f", -1e10))[0]  # llama2.c's initial best score, as float32


def load(path, vocab_size):
    data = open(path, "rb").read()
    (max_len,) = struct.unpack_from("<i", data, 0)
    pos, pieces, scores = 4, [], []
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        pieces.append(data[pos:pos + n])
        scores.append(score)
        pos += n
    assert pos == len(data), "%s: %d bytes after %d tokens" % (path, len(data) - pos, vocab_size)
    index = {}
    for i, p in enumerate(pieces):
        index.setdefault(p, i)  # a repeated piece: the lowest id
    return pieces, scores, index


def encode(tok, text, bos=True, eos=False):
    """text: bytes. Returns the ids as llama2.c's encode() makes them."""
    pieces, scores, index = tok
    ids = [BOS] if bos else []
    if text:
        ids.append(index[b" "] if b" " in index else 3 + 0x20)
    i = 0
    while i < len(text):
        j = i + 1  # a code point: its first byte, then continuation bytes (10xxxxxx), 4 bytes at most
        while j < len(text) and (text[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        cp = text[i:j]
        if cp in index:
            ids.append(index[cp])
        else:
            ids.extend(b + 3 for b in cp)  # byte fallback: <0x00> is id 3
        i = j
    while True:
        best, best_id, best_i = FLOOR, -1, -1
        for k in range(len(ids) - 1):
            m = index.get(pieces[ids[k]] + pieces[ids[k + 1]], -1)
            if m != -1 and scores[m] > best:  # strictly: the first pair wins a tie
                best, best_id, best_i = scores[m], m, k
        if best_i == -1:
            break
        ids[best_i:best_i + 2] = [best_id]
    if eos:
        ids.append(EOS)
    return ids


def main():
    tok_path, vocab, src, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tok = load(tok_path, vocab)
    out = []
    with open(src, "r", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "input_ids" in row:
                ids = row["input_ids"]
            else:
                ids = encode(tok, row["text"].encode("utf-8", errors="surrogateescape"))
            out.append('{"input_ids": [%s]}\n' % ", ".join(str(x) for x in ids))
    open(dst, "w").write("".join(out))


if __name__ == "__main__":
    main()
