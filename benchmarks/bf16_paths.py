"""The C++ kernels' three ways with bfloat16 inputs, interleaved in one process: the bf16
products on AMX (VNNI layout), the bf16 products in the plain layout (oneDNN's bf16 GEMM: what a
CPU with AVX512-BF16 but no AMX runs), and the widening path (bf16 rows widened to float32: a
CPU without 16-bit dot products, and fastcl before issue 18).

    python benchmarks/bf16_paths.py [--case info_nce] [--n 256] [--m 65536] [--rounds 9]

Forward + backward of the public loss (``_common.Step``, config bf16), round-robin with the
start rotated (``_common.interleaved``); medians and the ratios plain/amx and widen/amx (> 1:
AMX faster). Without AMX only plain and widen run.
"""
from __future__ import annotations

import argparse
import os
import sys

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

    class Path:
        """The step on one path: its switches set in ``prepare`` (untimed, before each call)."""

        def __init__(self, mode):
            self.mode = mode

        def prepare(self):
            cpp.bf16_products(self.mode != "widen")
            cpp.bf16_amx(self.mode == "amx")

        def __call__(self):
            return step()

    try:
        med, _ = _common.interleaved({m: Path(m) for m in modes}, a.rounds)
    finally:
        cpp.bf16_products(True)
        cpp.bf16_amx(True)
    base = modes[0]
    print("  ".join(f"{m} {_common.fmt_time(med[m])}" for m in modes) + "  |  " +
          "  ".join(f"{m}/{base} {med[m] / med[base]:.2f}x" for m in modes[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
