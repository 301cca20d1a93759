#!/usr/bin/env python3
"""Cost model of an IterIS merge (iteris-mpi): flops per phase, bytes each rank sends, memory per rank,
as functions of the model shape (layers L, hidden D, MLP width F, heads, key/value heads), the
calibration (N tasks, n_i tokens each in sequences of T tokens), the adapters' ranks, the iterations K,
the ranks P and the system space of each input site (docs/ALGORITHM.md: input space d_in x d_in or token
space n x n; `auto` takes the cheaper, as src/pipeline/site.c does).

The flop counts are the ones the pipeline logs with PetscLogFlops (-log_view: ItrForward, ItrGram,
ItrAssemble, ItrSolve), so a measured run checks the model exactly: `--check LOG` compares them with the
flops that -log_view printed for the same case. Times are flops over a rate: the same-run dgemm rate per
rank times the fraction of it each phase reaches (measured: results/merge_bench.md, results/token_space_*.md).

  bench/cost_model.py case --shape llama3-8b --layers 1 --tasks 4 --rank 16 --tokens 1024 --seq 128 --iters 1 --np 2
  bench/cost_model.py case ... --check LOG            # compare with a -log_view log of that run
  bench/cost_model.py project                          # an 80-layer Llama-3-70B merge on 4, 16, 64 nodes
"""
import argparse
import re
import sys

SHAPES = {  # D, F, heads, kv heads (bench/make_case)
    "llama3-8b": (4096, 14336, 32, 8),
    "llama3-70b": (8192, 28672, 64, 8),
    "llama2-7b": (4096, 11008, 32, 32),
    "tiny": (256, 688, 8, 4),
}


def sites(D, F, heads, kv):
    """Input sites: (name, d_in, [(module, d_out)])."""
    hd = D // heads
    return [("attn_in", D, [("q_proj", D), ("k_proj", kv * hd), ("v_proj", kv * hd)]),
            ("attn_out", D, [("o_proj", D)]),
            ("mlp_in", D, [("gate_proj", F), ("up_proj", F)]),
            ("mlp_out", F, [("down_proj", D)])]


def grid_rows(P):
    """The squarest process grid with rows <= columns (itr_dist_grid_shape): its rows."""
    return max(r for r in range(1, int(P ** 0.5) + 1) if P % r == 0)


def layer_params(D, F, heads, kv):
    return sum(d_in * d_out for _, d_in, mods in sites(D, F, heads, kv) for _, d_out in mods)


def tokens_cheaper(n, d, J, R):
    """site.c, site_uses_tokens: token space when its flops are below the input space's."""
    inputs = d * d * n + J * (d ** 3 / 3 + 4 * d * d * R)
    tokens = 3 * n * n * d + J * (n ** 3 / 3 + 4 * n * n * R + 4 * n * d * R)
    return tokens < inputs


def layer_cost(a, k, system="auto"):
    """Flops (total over ranks) of one layer in iteration k, per phase; memory and bytes per rank."""
    D, F, heads, kv = SHAPES[a.shape]
    N, n_i, P, R = a.tasks, a.tokens, a.np, a.tasks * a.rank
    n = N * n_i
    seqs = n_i // a.seq
    fwd_passes = 1 if k == 1 else 2  # the source models' forward; from k = 2 also the merged model's
    f = {"forward": fwd_passes * N * seqs * (2 * a.seq * layer_params(D, F, heads, kv) + 4 * a.seq ** 2 * D),
         "gram": 0.0, "norms": 0.0, "weights": 0.0, "assemble": 0.0, "solve": 0.0}
    mem = 4.0 * layer_params(D, F, heads, kv)  # the held layer, float32, on every rank
    rows = 0.0
    sent = 0.0
    space = {}
    for name, d, mods in sites(D, F, heads, kv):
        J = len(mods)
        if k == 1:  # the adaptive weights' numerators: B^T W0 of the stacked tasks and ||W0||^2 (ItrWeights)
            f["weights"] += sum((2 * R + 2) * d * d_out for _, d_out in mods)
        tok = system == "tokens" or (system == "auto" and tokens_cheaper(n, d, J, R))
        space[name] = "tokens" if tok else "inputs"
        rows += 4.0 * (n / P) * d * (1 if k == 1 else 2)  # captured X (and Xt), float32
        share = (P - 1) / P  # of what a rank holds, the part that goes to the others
        r = a.rank
        if tok:
            npad = n  # padding ignored
            f["gram"] += npad * npad * d  # the kernel (itr_dist_kernel_rows: partial dsyrk per column slice)
            # iteration 1: the tasks' norms are blocks of the kernel; then ||Xt_i'^T Xt_i'|| and ||X_i^T Xt_i'||
            # through kernels of each task's rows (three (n_i, n_i) kernels, logged under ItrGram)
            f["norms"] += 0 if k == 1 else N * 3 * n_i * n_i * d
            sent += share * (4.0 * (n / P) * d * (1 if k == 1 else 2) + 4.0 * npad * npad)  # rows, partial kernel (lower)
            for _ in mods:
                f["solve"] += npad ** 3 / 3 + 4 * npad * npad * R + 4 * npad * d * R + 2 * npad * d * r
            mem_site = 8.0 * 2 * npad * npad / P + 8.0 * 2 * npad * R
        else:
            f["gram"] += N * n_i * d * (d + 1)
            f["norms"] += N * 2 * n_i * n_i * d if k >= 2 else 0  # ||X^T Xt'|| through kernels (logged, ItrGram)
            pr = grid_rows(P)
            u = 1 / pr + 1 / (P // pr) - 1 / P  # the share of the columns a process needs
            how = getattr(a, "gram_exchange", "auto")
            if how == "auto":  # itr_dist_gram_rows: columns when under half the partials' bytes
                how = "columns" if (2 if k == 1 else 4) * n_i * u < d else "partial"
            if how == "partial":  # each task's partial Gram's lower triangle to the owners
                sent += share * N * 4.0 * d * d
            else:  # each task's rows' columns to the Gram's owners, float32 (x, and Xt' from k = 2)
                sent += share * 4.0 * n * d * u * (1 if k == 1 else 2)
            if k >= 2:
                sent += share * 8.0 * (n / P) * d * 2  # X and Xt' into the layout for the cross norm
            for _ in mods:
                f["solve"] += d ** 3 / 3 + 4 * d * d * R
                f["assemble"] += 4 * n * d * r
            mem_site = 8.0 * (1 + J) * d * d / P  # the Gram and each module's T2 (solved per site)
        mem = max(mem, 4.0 * layer_params(D, F, heads, kv) + mem_site)
    # beside them: the BF16 layer file's mapped pages, the hidden states (source, merged, one more) and the
    # runtime (MPI, PETSc, BLAS buffers): about 0.25 GiB measured on the demo
    other = 2.0 * layer_params(D, F, heads, kv) + 3 * 4.0 * (n / P) * D + 0.25 * 2 ** 30
    return f, mem + rows + other, sent, space


def cmd_case(a):
    tot = {"forward": 0.0, "gram": 0.0, "weights": 0.0, "assemble": 0.0, "solve": 0.0}
    for k in range(1, a.iters + 1):
        f, mem, sent, space = layer_cost(a, k, a.system)
        f["gram"] += f.pop("norms")  # the norms are logged under ItrGram
        for key in tot:
            tot[key] += a.layers * f[key]
    print(f"case: {a.shape}, {a.layers} layer(s), N {a.tasks} x {a.tokens} tokens (sequences of {a.seq}), rank "
          f"{a.rank}, {a.iters} iteration(s), np {a.np}, -system {a.system}: sites {space}")
    print("| phase | model GFLOP (all ranks) |" + (" -log_view GFLOP | ratio |" if a.check else ""))
    print("|---|---:|" + ("---:|---:|" if a.check else ""))
    logged = parse_log(a.check, a.np) if a.check else {}
    names = {"forward": "ItrForward", "gram": "ItrGram", "weights": "ItrWeights", "assemble": "ItrAssemble",
             "solve": "ItrSolve"}
    for key, v in tot.items():
        line = f"| {names[key]} | {v / 1e9:.1f} |"
        if a.check:
            got = logged.get(names[key])
            line += f" {got / 1e9:.1f} | {got / v:.3f} |" if got else " - | - |"
        print(line)
    print(f"memory per rank (model, largest phase): {mem / 2 ** 30:.2f} GiB; sent per rank per layer and iteration "
          f"(rows, their columns, partial kernels; -gram_exchange {a.gram_exchange}): {sent / 2 ** 20:.0f} MiB")


def parse_log(path, ranks=1):
    """Total flops per event from PETSc's -log_view (the 'Total' column of each event line, summed over
    the stages: the event table lists an event once per stage)."""
    # -log_view event lines: Event Count(Max Ratio) Time(Max Ratio) Flop(Max Ratio) ...: Flop Max times the
    # number of ranks (each rank logs its share, and the shares are even)
    out = {}
    for line in open(path, errors="replace"):
        m = re.search(r"with (\d+) process", line)
        if m:
            ranks = int(m.group(1))
        f = line.split()
        if f and f[0].startswith("Itr") and len(f) > 6:
            try:
                out[f[0]] = out.get(f[0], 0.0) + float(f[5]) * ranks
            except ValueError:
                pass
    return out


def cmd_project(a):
    """An 80-layer Llama-3-70B merge (N 4 tasks of 1024 tokens in 8 sequences each, rank 16, K iterations) on
    nodes of 64 cores, one rank per core, each at `rate` GFLOP/s dgemm with the phase efficiencies given.
    The forward is data-parallel over sequences (32 here), so beyond 32 ranks it needs -stages S (layers in
    S contiguous groups, each with its own ranks): S = min(80, ranks // 32), and the forward spreads over
    min(ranks, 32 S) ranks; the statistics and solves of a stage's layers use the stage's ranks (all ranks'
    work in parallel)."""
    a.shape, a.tasks, a.rank, a.tokens, a.seq = "llama3-70b", 4, 16, 1024, 128
    L, seqs = 80, a.tasks * a.tokens // a.seq
    print(f"80-layer Llama-3-70B, N 4 x 1024 tokens ({seqs} sequences), rank 16, {a.iters} iterations, -system "
          f"auto; {a.rate} GFLOP/s per core; efficiency forward {a.eff_fwd}, statistics {a.eff_gram}, solve "
          f"{a.eff_solve}; compute time only (no pipeline fill, no communication)")
    print("| nodes | ranks | -stages | total TFLOP | forward h | statistics h | solves h | total h | memory per rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nodes in (4, 16, 64):
        P = nodes * 64
        S = max(1, min(L, P // seqs))
        a.np = P // S  # ranks per stage: the layout the per-layer costs see
        flops = {"forward": 0.0, "gram": 0.0, "norms": 0.0, "weights": 0.0, "assemble": 0.0, "solve": 0.0}
        mem = 0
        for k in range(1, a.iters + 1):
            f, mem, _, _ = layer_cost(a, k, "auto")
            for key in flops:
                flops[key] += L * f[key]
        rate = a.rate * 1e9
        t_fwd = flops["forward"] / (min(P, seqs * S) * rate * a.eff_fwd)
        t_gram = (flops["gram"] + flops["norms"] + flops["weights"] + flops["assemble"]) / (P * rate * a.eff_gram)
        t_solve = flops["solve"] / (P * rate * a.eff_solve)
        tot = t_fwd + t_gram + t_solve
        print(f"| {nodes} | {P} | {S} | {sum(flops.values()) / 1e12:.0f} | {t_fwd / 3600:.2f} | {t_gram / 3600:.3f} | "
              f"{t_solve / 3600:.3f} | {tot / 3600:.2f} | {mem / 2 ** 30:.1f} GiB |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("case")
    c.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    c.add_argument("--layers", type=int, default=1)
    c.add_argument("--tasks", type=int, default=4)
    c.add_argument("--rank", type=int, default=16)
    c.add_argument("--tokens", type=int, default=1024, help="tokens per task")
    c.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    c.add_argument("--iters", type=int, default=1)
    c.add_argument("--np", type=int, default=2)
    c.add_argument("--system", default="auto", choices=["auto", "inputs", "tokens"])
    c.add_argument("--gram_exchange", default="auto", choices=["auto", "columns", "partial"])
    c.add_argument("--check", help="a -log_view log of the same case")
    q = sub.add_parser("project")
    q.add_argument("--iters", type=int, default=10)
    q.add_argument("--rate", type=float, default=64.0, help="dgemm GFLOP/s per core")
    q.add_argument("--eff_fwd", type=float, default=0.5)
    q.add_argument("--eff_gram", type=float, default=0.6)
    q.add_argument("--eff_solve", type=float, default=0.6)
    a = p.parse_args()
    (cmd_case if a.cmd == "case" else cmd_project)(a)


if __name__ == "__main__":
    sys.exit(main())
