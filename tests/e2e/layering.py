#!/usr/bin/env python3
"""The layering of src/ checked from what the compiler produced, not from what the READMEs say.

usage: layering.py OBJ_DIR SRC_DIR INCLUDE_DIR   (tests/e2e/layering.sh runs it on the build)

1. Calls: `nm` over every object file of src/ gives, per source file, the symbols it defines and
   the ones it uses. File A depends on file B when A uses a symbol B defines. There must be no
   cycle among files (Tarjan's strongly connected components, each of size 1), and a file may
   depend only on files of its own layer or of the layers it may call (ALLOWED below, as the
   folder READMEs and docs say).
2. Includes: every `#include "..."` of src/ and include/ names a header of its own layer or of a
   layer it may call; a private header (src/<layer>/*.h) only from its own layer.
Prints each violation; the last line is "layering: N violation(s)"; exit 1 when N > 0.
"""
import os
import re
import subprocess
import sys

# layer -> the layers it may call (besides itself); lowest first
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "model": {"core", "io"},
    "dist": {"core"},
    "merge": {"core"},
    "eval": {"core"},
    "synth": {"core", "io"},
    "pipeline": {"core", "io", "model", "dist", "merge", "eval"},
    "train": {"core", "io", "model", "dist", "eval"},
    "cli": {"core", "io", "model", "dist", "merge", "eval", "synth", "pipeline", "train"},
}


# inside a layer: files that may call only files listed before them (the drivers never call each other)
ORDER = {
    "pipeline": [["schedule"], ["context"], ["forward"], ["site"], ["checkpoint"], ["report"],
                 ["driver_data", "driver_direct", "driver_stages", "driver_features", "compose"], ["run"]],
    "train": [["optim"], ["switchlora"], ["train_params"], ["train_output"], ["train_checkpoint"], ["trainer", "evaluate"]],
}


def rank_in_layer(f):
    layer, name = layer_of_path(f), os.path.splitext(os.path.basename(f))[0]
    for i, group in enumerate(ORDER.get(layer, [])):
        if name in group:
            return i
    return None


def layer_of_path(p):
    parts = p.split(os.sep)
    return parts[-2]


def nm_symbols(obj):
    out = subprocess.run(["nm", "-P", obj], capture_output=True, text=True, check=True).stdout
    defined, used = set(), set()
    for line in out.splitlines():
        f = line.split()
        if len(f) < 2:
            continue
        name, kind = f[0], f[1]
        if kind == "U":
            used.add(name)
        elif kind in "TDBRCGSV" and kind.isupper():
            defined.add(name)
    return defined, used


def sccs(nodes, edges):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # iterative Tarjan
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    advanced = True
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    obj_dir, src_dir, inc_dir = sys.argv[1:4]
    bad = []
    # ---- calls
    files = {}
    for root, _, names in os.walk(os.path.join(obj_dir, "src")):
        for n in names:
            if n.endswith(".o"):
                rel = os.path.relpath(os.path.join(root, n), obj_dir)[:-2] + ".c"
                files[rel] = nm_symbols(os.path.join(root, n))
    if not files:
        print(f"layering: no object files under {obj_dir}/src (build first)")
        print("layering: 1 violation(s)")
        return 1
    owner = {}
    for f, (defined, _) in files.items():
        for s in defined:
            owner.setdefault(s, f)
    edges = {f: set() for f in files}
    for f, (_, used) in files.items():
        for s in used:
            g = owner.get(s)
            if g and g != f:
                edges[f].add(g)
    for comp in sccs(files.keys(), edges):
        if len(comp) > 1:
            bad.append("call cycle among: " + ", ".join(sorted(comp)))
    for f, deps in edges.items():
        lf = layer_of_path(f)
        for g in deps:
            lg = layer_of_path(g)
            syms = sorted(s for s in files[f][1] if owner.get(s) == g)
            if lg != lf and lg not in ALLOWED.get(lf, set()):
                bad.append(f"{f} ({lf}) calls {g} ({lg}): {', '.join(syms[:4])}")
            elif lg == lf and lf in ORDER:
                rf, rg = rank_in_layer(f), rank_in_layer(g)
                if rf is None or rg is None:
                    bad.append(f"{f} or {g}: not in the file order of layer {lf} (tests/e2e/layering.py ORDER)")
                elif rg >= rf:
                    bad.append(f"{f} calls {g}, which comes after it (or beside it) in layer {lf}'s order: "
                               f"{', '.join(syms[:4])}")
    # ---- includes
    inc_re = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
    for top in (src_dir, inc_dir):
        for root, _, names in os.walk(top):
            for n in names:
                if not n.endswith((".c", ".h")):
                    continue
                p = os.path.join(root, n)
                if top == inc_dir:
                    lf = os.path.splitext(n)[0]  # include/iteris/<layer>.h
                else:
                    lf = layer_of_path(p)
                for h in inc_re.findall(open(p, encoding="utf-8").read()):
                    d, base = os.path.split(h)
                    if d == "iteris":
                        lh, private = os.path.splitext(base)[0], False
                    elif d in ALLOWED:
                        lh, private = d, True
                    else:
                        continue  # a header beside the file
                    if lh == lf:
                        continue
                    if private:
                        bad.append(f"{p} includes {h}: a private header of layer {lh}")
                    elif lh not in ALLOWED.get(lf, set()):
                        bad.append(f"{p} ({lf}) includes {h} ({lh})")
    for b in bad:
        print("layering: " + b)
    n_edges = sum(len(v) for v in edges.values())
    print(f"layering: {len(files)} source files, {n_edges} file dependencies checked")
    print(f"layering: {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
