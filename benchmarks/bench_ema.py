"""Momentum EMA: fastcl.ema_ against the ways the peers update a target network.

Parameter sets (float32)
    ``resnet50``: the 161 parameter tensors of a torchvision ResNet-50 (25.6M floats), shapes
    generated here (torchvision is not a dependency).
    ``tiny``: 161 tensors of 64 floats: launch / per-tensor overhead only.

Providers (each updates target <- m target + (1 - m) source, m = 0.996, in place)
    ``fastcl``: ``fastcl.ema_(targets, sources, m)`` (C++ on CPU, Triton on CUDA).
    ``loop``: MoCo's / lightly's per-parameter loop, ``t.data = t.data * m + s.data * (1 - m)``.
    ``foreach``: ``torch._foreach_mul_`` + ``torch._foreach_add_(alpha=1 - m)``.
    ``foreach_lerp``: ``torch._foreach_lerp_(targets, sources, 1 - m)`` (timm's ModelEmaV3).
    ``flat_lerp``: one ``lerp_`` over a single flat tensor of the same total size: the
    memory-bandwidth floor (12 bytes per float32 parameter), no per-tensor work at all.

In ``--ratios`` the in-place providers (fastcl, foreach, foreach_lerp) update one shared set of
tensors; ``loop`` (which replaces ``.data``) and ``flat_lerp`` have their own.

pytest-benchmark: ``python -m pytest benchmarks/bench_ema.py --benchmark-only``.
Ratios: ``python benchmarks/bench_ema.py --ratios [--rounds 31]`` (interleaved medians in one
process; ratios > 1 mean fastcl is faster).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import fastcl  # noqa: E402

MOMENTUM = 0.996
PROVIDERS = ("fastcl", "loop", "foreach", "foreach_lerp", "flat_lerp")
SETS = ("resnet50", "tiny")


def resnet50_shapes():
    """Parameter shapes of torchvision's resnet50(), in order: 161 tensors, 25,557,032 floats."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def param_set(name: str, device: str = "cpu"):
    shapes = resnet50_shapes() if name == "resnet50" else [(64,)] * 161
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(s, generator=g).to(device) for s in shapes]
    sources = [torch.randn(s, generator=g).to(device) for s in shapes]
    return targets, sources


def make_step(provider: str, name: str, device: str = "cpu", tensors=None):
    """A step of ``provider``. ``tensors`` (targets, sources) may be shared between providers
    that update in place: where a tensor lands in memory moved single timings by 10-15% here,
    so in-place providers compared in one run should update the same tensors."""
    targets, sources = tensors if tensors is not None else param_set(name, device)
    m = MOMENTUM
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if provider == "fastcl":
        backend = "triton" if device == "cuda" else "cpp"

        def step():
            with fastcl.use_backend(backend):
                fastcl.ema_(targets, sources, m)
            sync()
    elif provider == "loop":
        def step():
            for t, s in zip(targets, sources):
                t.data = t.data * m + s.data * (1.0 - m)
            sync()
    elif provider == "foreach":
        def step():
            torch._foreach_mul_(targets, m)
            torch._foreach_add_(targets, sources, alpha=1.0 - m)
            sync()
    elif provider == "foreach_lerp":
        def step():
            torch._foreach_lerp_(targets, sources, 1.0 - m)
            sync()
    elif provider == "flat_lerp":
        n = sum(t.numel() for t in targets)
        flat_t = torch.cat([t.flatten() for t in targets])
        flat_s = torch.cat([s.flatten() for s in sources])
        assert flat_t.numel() == n

        def step():
            flat_t.lerp_(flat_s, 1.0 - m)
            sync()
    else:
        raise ValueError(provider)
    return step


@pytest.mark.parametrize("device", _common.devices())
@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ema(benchmark, provider, name, device):
    benchmark.group = f"ema {name} {device}"
    step = make_step(provider, name, device)
    n = sum(t.numel() for t in param_set(name, "cpu")[0])
    benchmark.extra_info.update(provider=provider, params=n, tensors=161, device=device,
                                bytes_per_step=12 * n)
    benchmark.pedantic(step, rounds=20 if name == "resnet50" else 200, warmup_rounds=2)


def measure(name: str, device: str, rounds: int):
    """(floats in the set, {provider: median seconds}) from one interleaved run; the in-place
    providers update one shared set of tensors."""
    shared = param_set(name, device)
    steps = {prov: make_step(prov, name, device,
                             None if prov in ("loop", "flat_lerp") else shared)
             for prov in PROVIDERS}
    med, _ = _common.interleaved(steps, rounds)
    return sum(t.numel() for t in shared[0]), med


def ratios(argv=None) -> int:
    a = _common.ratios_args("interleaved EMA medians and ratios", 31, argv)
    _common.print_header(f"fastcl EMA ratios, device {a.device}")
    for name in SETS:
        n, med = measure(name, a.device, a.rounds)
        print(f"{name}: 161 tensors, {n:,} floats, {a.rounds} rounds")
        for prov in PROVIDERS:
            ratio = med[prov] / med["fastcl"]
            gbs = 12 * n / med[prov] / 1e9
            print(f"  {prov:<13} {_common.fmt_time(med[prov]):>10}  {prov}/fastcl {ratio:5.2f}x"
                  f"  {gbs:6.1f} GB/s effective")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_ema.py --ratios [--rounds R] [--device cpu|cuda]",
          file=sys.stderr)
    sys.exit(2)
