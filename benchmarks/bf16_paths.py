"""The C++ kernels' three ways with bfloat16 inputs, interleaved in one process: the bf16
products on AMX (VNNI layout), the bf16 products in the plain layout (oneDNN's bf16 GEMM: what a
CPU with AVX512-BF16 but no AMX runs), and the widening path (bf16 rows widened to float32: a
CPU without 16-bit dot products, and fastcl before issue 18).

    python benchmarks/bf16_paths.py [--case info_nce] [--n 256] [--m 65536] [--rounds 9]

Forward + backward of the public loss (``_common.Step``, config bf16); medians and the ratios
plain/amx and widen/amx (> 1: AMX faster). Without AMX only plain and widen run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="info_nce", choices=_common.CASES)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--m", type=int, default=65536, help="queue rows (info_nce)")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args(argv)
    from fastcl.kernels import cpp

    if not cpp.bf16_products():
        print("this build has no bf16 products (no AVX512-BF16): nothing to compare")
        return 0
    modes = (["amx"] if cpp.bf16_amx() else []) + ["plain", "widen"]
    step = _common.make_step(a.case, "fastcl", a.n, "full", config="bf16", m=a.m)
    _common.print_header(f"bf16 paths, {a.case} N={a.n}" + (f" M={a.m}" if a.case == "info_nce"
                                                             else ""))

    def run(mode):
        cpp.bf16_products(mode != "widen")
        cpp.bf16_amx(mode == "amx")
        t = time.perf_counter()
        step()
        return time.perf_counter() - t

    times = {m: [] for m in modes}
    try:
        for m in modes:
            run(m), run(m)
        for r in range(a.rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                times[m].append(run(m))
    finally:
        cpp.bf16_products(True)
        cpp.bf16_amx(True)
    med = {m: statistics.median(t) for m, t in times.items()}
    base = modes[0]
    print("  ".join(f"{m} {_common.fmt_time(med[m])}" for m in modes) + "  |  " +
          "  ".join(f"{m}/{base} {med[m] / med[base]:.2f}x" for m in modes[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
