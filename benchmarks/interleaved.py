"""In-batch InfoNCE (``fastcl.info_nce(q, k)``, q and k requiring grad): fastcl against eager
and torch.compile, interleaved in one process (the figure of issue 13).

    python benchmarks/interleaved.py [--case in_batch] [--n 1024] [--d 128] [--mode full]
                                     [--rounds 15] [--repeats 3] [--threads T]
                                     [--clock wall|cpu] [--providers ...]

Other cases (``_common.CASES``) run the same way; CLIP's figure (issue 14) is
``--case clip --n 4096 --d 512 --providers fastcl,reference,compile``: ``fastcl.clip_loss``
with a learnable scale against open_clip's ClipLoss formulation, eager and compiled.
SupCon's (issue 16) is ``--case supcon --providers fastcl,reference,compile``: ``--n`` samples
(2048 by default) x 2 views, ``--classes`` labels (100 by default), D=128, temperature 0.07,
against SupContrast's SupConLoss formulation, eager and compiled.

``--config`` picks the inputs (``_common.DTYPES``: fp32, tf32, bf16, mixed = bf16 queries and
keys beside a float32 MoCo queue); a provider written ``name@config`` runs on another one, e.g.
``--case info_nce --n 256 --m 65536 --config mixed --providers fastcl,fastcl@fp32``.

Providers: ``fastcl`` (the C++ kernels, the automatic choice: the dense path within
``fastcl.kernels.cpp.DENSE_CAP_BYTES``), ``tiled`` (the C++ kernels with the dense path off:
the cap set to 0), ``reference`` (eager: F.normalize, q @ k.T / tau, cross_entropy) and
``compile`` (``torch.compile`` of the reference). Each repeat runs every provider round-robin
(start rotated every round, after two warm-up calls each) on rotating inputs
(``_common.Step``) and prints the medians and the ratios eager/fastcl, compile/fastcl and
tiled/fastcl (> 1: fastcl faster); the last line gives each ratio's median and range over the
repeats, which is what to quote on a shared machine (with the load average printed beside it).
Without ``fastcl`` among the providers (e.g. ``--providers reference,compile``: the baselines
alone), each repeat prints the medians and the last line each provider's median time over the
repeats.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common  # noqa: E402


class _Tiled:
    """A fastcl step with the dense path switched off (the cap at 0) while it runs."""

    def __init__(self, step):
        from fastcl.kernels import cpp

        self.step, self.cpp = step, cpp
        self.prepare = getattr(step, "prepare", None)
        if self.prepare is not None:
            self.prepare = self._wrap(self.prepare)

    def _wrap(self, fn):
        def run():
            with self._off():
                return fn()
        return run

    @contextlib.contextmanager
    def _off(self):
        before = self.cpp.DENSE_CAP_BYTES
        self.cpp.DENSE_CAP_BYTES = 0
        try:
            yield
        finally:
            self.cpp.DENSE_CAP_BYTES = before

    def __call__(self):
        with self._off():
            return self.step()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="in_batch", choices=_common.CASES)
    p.add_argument("--n", type=int, default=None,
                   help="rows per view (supcon: samples); default 1024, supcon 2048")
    p.add_argument("--classes", type=int, default=_common.SUPCON_CLASSES,
                   help="label range (supcon)")
    p.add_argument("--d", type=int, default=_common.D)
    p.add_argument("--m", type=int, default=_common.MOCO_M, help="queue rows (info_nce)")
    p.add_argument("--config", default="fp32", choices=tuple(_common.DTYPES),
                   help="inputs (_common.DTYPES): fp32, tf32 (TF32 products), bf16, or mixed "
                        "(bf16 activations beside a float32 queue)")
    p.add_argument("--mode", default="full", choices=_common.MODES)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--providers", default="fastcl,tiled,reference,compile")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: perf_counter; cpu: the process's CPU time (time.process_time), "
                        "less sensitive to other processes on a loaded machine; meaningful with "
                        "--threads 1 (with more, idle worker threads may spin)")
    a = p.parse_args(argv)
    if a.n is None:
        a.n = _common.CASE_N.get(a.case, 1024)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [x for x in a.providers.split(",") if x]
    what = (f"B={a.n} x {_common.SUPCON_VIEWS} views, {a.classes} classes"
            if a.case == "supcon" else f"N={a.n}" + (f" M={a.m}" if a.case == "info_nce" else ""))
    _common.print_header(f"interleaved {a.case} {what} D={a.d} {a.config} {a.mode}, "
                         f"{a.clock} clock")
    print("# command: python benchmarks/interleaved.py " +
          " ".join(sys.argv[1:] if argv is None else argv))
    steps = {}
    for name in names:
        # "provider@config": that provider on another input configuration (e.g. fastcl@fp32
        # beside fastcl on --config mixed: the mixed case against the float32 path)
        provider, _, config = name.partition("@")
        provider = "fastcl" if provider == "tiled" else provider
        step = _common.make_step(a.case, provider, a.n, a.mode, d=a.d, classes=a.classes,
                                 config=config or a.config, m=a.m)
        steps[name] = _Tiled(step) if name == "tiled" else step
    if "fastcl" not in names:  # the baselines alone: their times, no ratios
        times = {x: [] for x in names}
        for rep in range(a.repeats):
            med, _ = _common.interleaved(steps, a.rounds, a.clock)
            for x in names:
                times[x].append(med[x])
            print(f"repeat {rep}: " + "  ".join(f"{x} {_common.fmt_time(med[x])}" for x in names)
                  + f"  | load {_common.loadavg()}", flush=True)
        print("medians over repeats (median [min, max]): " + "  ".join(
            f"{x} {_common.fmt_time(_common.median(t))} [{_common.fmt_time(min(t))}, "
            f"{_common.fmt_time(max(t))}]" for x, t in times.items()))
        return 0
    others = [x for x in names if x != "fastcl"]
    ratios = {x: [] for x in others}
    for rep in range(a.repeats):
        med, _ = _common.interleaved(steps, a.rounds, a.clock)
        for x in others:
            ratios[x].append(med[x] / med["fastcl"])
        print(f"repeat {rep}: " + "  ".join(f"{x} {_common.fmt_time(med[x])}" for x in names)
              + "  |  " + "  ".join(f"{x}/fastcl {med[x] / med['fastcl']:.2f}x" for x in others)
              + f"  | load {_common.loadavg()}", flush=True)
    print("ratios over repeats (median [min, max]): " + "  ".join(
        f"{x}/fastcl {_common.median(r):.2f}x [{min(r):.2f}, {max(r):.2f}]"
        for x, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
