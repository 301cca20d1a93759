#!/usr/bin/python3
"""The official IterIS merge step, ported to PyTorch on the CPU, timed on one decoder layer's shapes.

The official implementation (github.com/HKUST-LongGroup/IterIS-merging, IterIS.py, `solution_matrix`) solves,
per module and iteration, with float32 matrix products and a float64 solve:
    Xt_i   <- (1 - reg) Xt_i + reg X_i
    G_i    =  X_i^T Xt_i + alpha_1 ||X_i^T Xt_i||_F I          (d_in x d_in, float32)
    H_i    =  Xt_i^T Xt_i + alpha_2 ||Xt_i^T Xt_i||_F I        (d_in x d_in, float32)
    T1     =  sum_i c_i W_i G_i                                (d_out x d_in: dense right-hand sides)
    T2     =  sum_i c_i H_i
    W*     =  solve(T2^T, T1^T)^T                              (float64)
This file re-implements those formulas (it copies no code) with the inputs batched over tasks as there
(X: (N, n, d_in)); the residual norm the official function computes afterwards is left out: it is not returned
and its torch.stack([results, results]) only works for N = 2. Inputs are random (time does not depend on the
values); W_i = s_i B_i A_i is formed densely as the official code does (get_lora_matrix).

usage: official_step.py --shape llama3-8b --tasks 4 --tokens 1024 --rank 16 --threads 2
Prints one line per module and a total; the bench/official_comparison.sh script compares it with iteris-mpi.
"""
import argparse
import time

import torch

SHAPES = {"llama3-8b": (4096, 14336, 32, 8), "llama2-7b": (4096, 11008, 32, 32), "tiny": (256, 688, 8, 4)}


def modules(shape):
    D, F, H, Hkv = SHAPES[shape]
    hd = D // H
    return [("q_proj", H * hd, D), ("k_proj", Hkv * hd, D), ("v_proj", Hkv * hd, D), ("o_proj", D, H * hd),
            ("gate_proj", F, D), ("up_proj", F, D), ("down_proj", D, F)]


def reg_eye(term, alpha):
    """term (N, d, d) + alpha_i I per task."""
    eye = torch.eye(term.shape[-1], dtype=term.dtype)
    return term + alpha.view(-1, 1, 1) * eye


def solution_matrix(W, X, Xt, coef, manual, alpha_1=1e-7, alpha_2=1e-7, reg=5e-4):
    N = W.shape[0]
    Xt = (1 - reg) * Xt + reg * X
    XXt = torch.matmul(X.transpose(-1, -2), Xt)
    XXt = reg_eye(XXt, torch.linalg.norm(XXt, ord="fro", dim=(-2, -1)) * alpha_1)
    XtXt = torch.matmul(Xt.transpose(-1, -2), Xt)
    XtXt = reg_eye(XtXt, torch.linalg.norm(XtXt, ord="fro", dim=(-2, -1)) * alpha_2)
    w = (coef * manual).view(N, 1, 1)
    term1 = torch.sum(torch.matmul(W, XXt) * w, dim=0).double()
    term2 = torch.sum(XtXt * w, dim=0).double()
    return torch.linalg.solve(term2.t(), term1.t()).t()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens per task")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    # the machine's rates in this process: float32 and float64 matmul at 4096
    for dt in (torch.float32, torch.float64):
        x = torch.randn(4096, 4096, dtype=dt, generator=g)
        torch.matmul(x, x)
        t0 = time.perf_counter()
        torch.matmul(x, x)
        dtm = time.perf_counter() - t0
        print("torch %s matmul 4096^3: %.1f GFLOP/s (%d threads)" % (str(dt).split(".")[1], 2 * 4096 ** 3 / dtm / 1e9, a.threads))
        del x
    total = 0.0
    N, n = a.tasks, a.tokens
    for name, d_out, d_in in modules(a.shape):
        X = torch.randn(N, n, d_in, generator=g)
        Xt = X + 0.01 * torch.randn(N, n, d_in, generator=g)
        A = torch.randn(N, a.rank, d_in, generator=g) / d_in ** 0.5
        B = torch.randn(N, d_out, a.rank, generator=g) / a.rank
        coef = torch.rand(N, generator=g) + 0.5
        manual = torch.ones(N)
        t0 = time.perf_counter()
        W = torch.matmul(B, A)  # the dense dW_i the official code builds
        sol = solution_matrix(W, X, Xt, coef, manual)
        dt = time.perf_counter() - t0
        total += dt
        print("%-10s d_out %5d d_in %5d: %8.2f s  (|W*| %.3g)" % (name, d_out, d_in, dt, float(sol.norm())))
        del X, Xt, W, sol
    print("official step total: %.2f s (one iteration, %d tasks, %d tokens per task, %s layer)" % (total, N, n, a.shape))


if __name__ == "__main__":
    main()
