"""Probe: the C++ SigLIP kernels (csrc/sigmoid.cpp) alone against the three matrix products
that are their floor, interleaved in one process, medians (benchmarks/_common.interleaved).

    PYTHONPATH=. python benchmarks/siglip_kernels_probe.py [--n 4096] [--m N] [--d 512]
        [--rounds 7] [--threads 1,2] [--clock wall|cpu]

For each thread count, one round times in turn (start rotated per round): sigmoid_forward with
grads (the whole forward of reduction "mean"/"sum": loss, dscale, dbias, dx, dy), without
grads, sigmoid_grad (reduction "none"'s backward: recompute + two products); the three
products of that shape by torch.mm into preallocated outputs: x y^T (n x m x D), W y and W^T x;
and eager float32 PyTorch (-F.logsigmoid of the logits, backward through autograd). Prints the
medians and each one's ratio to the three products. Not a test: timings only.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved  # noqa: E402

from fastcl.kernels import cpp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, default=None)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--no-eager", action="store_true")
    args = ap.parse_args()
    n, m, d = args.n, args.m or args.n, args.d
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = F.normalize(torch.randn(m, d, generator=g), dim=1)
    scale, bias = 10.0, -10.0  # SigLIP's initial values
    gvec = torch.full((n,), 1.0 / n)
    w = torch.randn(n, m, generator=g)
    nm, nd, md = torch.empty(n, m), torch.empty(n, d), torch.empty(m, d)
    labels = 2 * torch.eye(n, m) - 1

    def products():
        torch.mm(x, y.t(), out=nm)
        torch.mm(w, y, out=nd)
        torch.mm(w.t(), x, out=md)

    def eager():
        xa, ya = x.detach().requires_grad_(), y.detach().requires_grad_()
        z = scale * (xa @ ya.t()) + bias
        (-F.logsigmoid(labels * z)).sum().backward()

    steps = {
        "3 products (x y^T, W y, W^T x)": products,
        "sigmoid_forward with grads": lambda: cpp.sigmoid_forward(x, y, scale, bias, 0, True),
        "sigmoid_forward no grads": lambda: cpp.sigmoid_forward(x, y, scale, bias, 0, False),
        "sigmoid_grad (rows + cols)": lambda: cpp.sigmoid_grad(x, y, scale, bias, 0, gvec, True,
                                                               True),
    }
    if not args.no_eager:
        steps["eager f32 forward+backward"] = eager
    before = torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            med, _ = interleaved(steps, args.rounds, clock=args.clock)
            base = med["3 products (x y^T, W y, W^T x)"]
            print(f"n={n} m={m} D={d} float32 threads={threads} rounds={args.rounds} "
                  f"clock={args.clock}")
            for name, t in med.items():
                print(f"  {name:34s} {t * 1e3:9.1f} ms  {t / base:5.2f}x")
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
