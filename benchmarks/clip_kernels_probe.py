"""Probe: the C++ CLIP kernels (csrc/clip.cpp) alone against the four matrix products that are
their floor, interleaved in one process, medians.

    PYTHONPATH=. python benchmarks/clip_kernels_probe.py [--n 4096] [--d 512] [--reps 7]
        [--tiles 128,256]

One repetition times, in turn: for each tile, rows_cols_forward(with_dscale=True) +
rows_cols_grad (what a CLIP forward + backward with the scale's gradient runs); and the four
products of that shape: x y^T (forward), x y^T again (the backward's recomputation), W y and
W^T x (the two gradients), by torch.mm, and once more into preallocated outputs. Prints the
medians and each one's ratio to the first products. Not a test: timings only, for choosing
the tile.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastcl.kernels import cpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tiles", default="128,256")
    args = ap.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1)
    ones = torch.ones(args.n)
    scale = 100.0
    gvec = torch.full((2 * args.n,), 0.5 / args.n)

    def kernels(tile):
        cpp._TILE = cpp._TILE_WIDE = tile  # whichever the width picks
        loss, lse, dscale = cpp.rows_cols_forward(x, y, ones, ones, scale, with_dscale=True)
        dx, dy = cpp.rows_cols_grad(x, y, ones, ones, lse, gvec, scale)
        return dx, dy

    w = torch.randn(args.n, args.n, generator=g)

    def products():
        s = torch.mm(x, y.t())
        s2 = torch.mm(x, y.t())
        a = torch.mm(w, y)
        b = torch.mm(w.t(), x)
        return s, s2, a, b

    nn = torch.empty(args.n, args.n)
    nd = torch.empty(args.n, args.d)

    def products_out():  # the same into preallocated outputs (no 64 MiB allocations)
        torch.mm(x, y.t(), out=nn)
        torch.mm(x, y.t(), out=nn)
        torch.mm(w, y, out=nd)
        torch.mm(w.t(), x, out=nd)

    times = {f"kernels tile {t}": [] for t in tiles}
    times["4 products"] = []
    times["4 products, out="] = []
    for t in tiles:  # warm-up
        kernels(t)
    products()
    products_out()
    for _ in range(args.reps):
        for t in tiles:
            t0 = time.perf_counter()
            kernels(t)
            times[f"kernels tile {t}"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        products()
        times["4 products"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        products_out()
        times["4 products, out="].append(time.perf_counter() - t0)
    base = statistics.median(times["4 products"])
    print(f"n={args.n} d={args.d} threads={torch.get_num_threads()} reps={args.reps}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>18}: median {med:.4f} s  (min {min(ts):.4f})  ratio {med / base:.3f}")


if __name__ == "__main__":
    main()
