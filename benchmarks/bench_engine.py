"""The engine's newer losses: DCL and a learnable temperature, against their eager formulations.

pytest-benchmark (``python -m pytest benchmarks/bench_engine.py --benchmark-only``)
    ``test_dcl``: forward + backward of ``fastcl.dcl_loss`` (N rows per view, D=128, fp32)
    against lightly's DCLLoss formulation written out eagerly (``eager``) and its
    ``torch.compile`` (``compile``).
    ``test_learnable_temperature``: ``fastcl.nt_xent`` with the temperature a tensor requiring
    grad (``tensor``) against a float temperature (``float``): what d loss / d tau costs; and the
    eager reference with a tensor temperature (``eager``).

Ratios (``python benchmarks/bench_engine.py --ratios``): the providers of each case run
interleaved in one process (round-robin, starting provider rotated every round) after two
warm-up calls each; the table gives each provider's median over the rounds and its ratio to
fastcl (> 1: fastcl faster). Quote those ratios with the machine and date.
"""
from __future__ import annotations

import argparse
import functools

import pytest
import torch
import torch.nn.functional as F

import fastcl

import _common  # benchmarks/ (the script's own folder, or the benchmarks conftest)

D = 128
TAU = 0.1
SIZES = (256, 1024, 4096)


def lightly_dcl(out0, out1, temperature=TAU):
    """lightly's current DCLLoss (one process), from its description: normalize, the positive
    term -s_01[i, i], one logsumexp per row over [s_00 without its diagonal, s_01 without its
    diagonal], both directions averaged."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = out0.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=out0.device)

    def one_way(a, b):
        s_aa = a @ a.T / temperature
        s_ab = a @ b.T / temperature
        positive = -s_ab.diagonal()
        negatives = torch.cat([s_aa[off].view(n, -1), s_ab[off].view(n, -1)], dim=1)
        return (positive + torch.logsumexp(negatives, dim=1)).mean()

    return 0.5 * (one_way(out0, out1) + one_way(out1, out0))


@functools.lru_cache(maxsize=None)
def _compiled_dcl():
    return torch.compile(lightly_dcl)


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, D, generator=g).requires_grad_()
    z2 = torch.randn(n, D, generator=g).requires_grad_()
    return z1, z2


def make_step(case: str, provider: str, n: int):
    """A forward + backward step of ``provider`` on ``case``; returns a callable."""
    z1, z2 = _inputs(n)
    tau = torch.tensor(TAU, requires_grad=True)
    if case == "dcl":
        fn = {"fastcl": lambda: fastcl.dcl_loss(z1, z2, TAU),
              "eager": lambda: lightly_dcl(z1, z2),
              "compile": lambda: _compiled_dcl()(z1, z2)}[provider]
        wrt = (z1, z2)
    elif case == "learnable_tau":
        fn = {"tensor": lambda: fastcl.nt_xent(z1, z2, tau),
              "float": lambda: fastcl.nt_xent(z1, z2, TAU),
              "eager": lambda: fastcl.reference.nt_xent(z1, z2, tau)}[provider]
        wrt = (z1, z2, tau) if provider != "float" else (z1, z2)
    else:
        raise ValueError(case)
    return lambda: torch.autograd.grad(fn(), wrt)


PROVIDERS = {"dcl": ("fastcl", "eager", "compile"), "learnable_tau": ("tensor", "float", "eager")}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS["dcl"])
def test_dcl(benchmark, provider, n):
    benchmark.group = f"dcl full cpu N={n} D={D}"
    step = make_step("dcl", provider, n)
    benchmark.pedantic(step, rounds=3 if n >= 4096 else 8, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS["learnable_tau"])
def test_learnable_temperature(benchmark, provider, n):
    benchmark.group = f"nt_xent learnable tau full cpu N={n} D={D}"
    step = make_step("learnable_tau", provider, n)
    benchmark.pedantic(step, rounds=3 if n >= 4096 else 8, iterations=1, warmup_rounds=1)


def interleaved(case: str, n: int, rounds: int):
    """{provider: median seconds} from round-robin runs with a rotating start."""
    steps = {p: make_step(case, p, n) for p in PROVIDERS[case]}
    return _common.interleaved(steps, rounds)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", action="store_true", required=True)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={D}, tau={TAU}")
    for case in PROVIDERS:
        for n in map(int, args.sizes.split(",")):
            med = interleaved(case, n, args.rounds)
            base = med[PROVIDERS[case][0]]
            cells = ", ".join(f"{q} {t * 1e3:.1f} ms ({t / base:.2f}x)" for q, t in med.items())
            print(f"{case:14s} N={n:5d}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
