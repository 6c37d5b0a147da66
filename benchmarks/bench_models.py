"""BYOL's loss: ``fastcl.byol_loss`` (fused: one pass forward, one backward) against BYOL's own
formula ``2 - 2 * (F.normalize(p) * F.normalize(z)).sum(1)`` run eagerly and under
``torch.compile``, forward + backward of the symmetrized loss as ``fastcl.models.BYOL`` computes
it, at BYOL's projection width F=256.

pytest-benchmark: ``python -m pytest benchmarks/bench_models.py --benchmark-only``.
Ratios: ``python benchmarks/bench_models.py --ratios [--rounds 101]``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import fastcl  # noqa: E402
from fastcl import reference  # noqa: E402

F = 256
SIZES = (256, 4096)
PROVIDERS = ("fastcl", "eager", "compile")


def _symmetric(p1, p2, z1, z2):
    return (reference.byol_loss(p1, z2) + reference.byol_loss(p2, z1)).mean()


def _fused(p1, p2, z1, z2):
    return (fastcl.byol_loss(p1, z2) + fastcl.byol_loss(p2, z1)).mean()


_compiled = None


def make_step(provider: str, b: int, device: str = "cpu"):
    global _compiled
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(b, F, generator=g).to(device) for _ in range(4))
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    if provider == "compile":
        _compiled = _compiled or torch.compile(_symmetric)
        fn = _compiled
    elif provider == "eager":
        fn = _symmetric
    elif provider == "fastcl":
        fn = _fused
    else:
        raise ValueError(provider)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        p1.grad = p2.grad = None
        fn(p1, p2, z1, z2).backward()
        sync()
    return step


@pytest.mark.parametrize("device", _common.devices())
@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_byol_loss(benchmark, provider, b, device):
    benchmark.group = f"byol loss fwd+bwd B={b} F={F} {device}"
    benchmark.extra_info.update(provider=provider, B=b, F=F, device=device)
    benchmark.pedantic(make_step(provider, b, device), rounds=100, warmup_rounds=3)


def ratios(argv=None) -> int:
    a = _common.ratios_args("interleaved BYOL-loss medians", 101, argv)
    _common.print_header(f"BYOL loss forward + backward, F={F}, device {a.device}")
    for b in SIZES:
        steps = {prov: make_step(prov, b, a.device) for prov in PROVIDERS}
        med, _ = _common.interleaved(steps, a.rounds)
        # Bytes the fused floor must move: read p1, p2, z1, z2, write dp1, dp2 (float32).
        floor_bytes = 6 * b * F * 4
        f = med["fastcl"]
        print(f"  B={b:<5} fastcl {f * 1e6:8.1f} us ({floor_bytes / f / 1e9:5.1f} GB/s of the "
              f"fused floor's {floor_bytes / 2**20:.1f} MiB)   eager {med['eager'] * 1e6:8.1f} us"
              f" ({med['eager'] / f:4.2f}x)   compile {med['compile'] * 1e6:8.1f} us "
              f"({med['compile'] / f:4.2f}x)")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_models.py --ratios [--rounds R] [--device cpu|cuda]",
          file=sys.stderr)
    sys.exit(2)
