"""BYOL's loss: why ``fastcl.models.byol_loss`` is left to PyTorch instead of a fused kernel.

BYOL's symmetrized normalized MSE is O(B·F) element-wise work with no (B × B) intermediate.
This measures its forward + backward (both directions, as in ``fastcl.models.BYOL``) eagerly
and under ``torch.compile`` (which fuses it into a few loops: the most a hand-fused kernel
could win), at BYOL's projection width F=256.

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

from fastcl.models import byol_loss  # noqa: E402

F = 256
SIZES = (256, 4096)
PROVIDERS = ("eager", "compile")


def _symmetric(p1, p2, z1, z2):
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


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
        print(f"  B={b:<5} eager {med['eager'] * 1e6:8.1f} us   compile "
              f"{med['compile'] * 1e6:8.1f} us   eager/compile "
              f"{med['eager'] / med['compile']:5.2f}x   ({floor_bytes / 2**20:.1f} MiB moved "
              f"at the fused floor)")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_models.py --ratios [--rounds R] [--device cpu|cuda]",
          file=sys.stderr)
    sys.exit(2)
