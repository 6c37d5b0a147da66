"""MoCo queue push: fastcl.queue_push_ against the peers' enqueue, K=65536, D=128, B=256, float32.

Providers (each pushes one (B, D) batch of keys and advances the pointer)
    ``fastcl``: ``fastcl.queue_push_(queue, ptr, keys)``: wraps at the end, no host sync.
    ``moco_slice``: MoCo's ``_dequeue_and_enqueue``: ``ptr = int(queue_ptr)`` (a host read),
    ``queue[ptr:ptr + B] = keys``, ``queue_ptr[0] = (ptr + B) % K``. It cannot wrap (MoCo
    asserts ``K % B == 0``): the fastest thing a push can be.
    ``lightly_clone``: lightly's MemoryBankModule: clone the whole bank, then write the batch
    into the clone (and keep it).

pytest-benchmark: ``python -m pytest benchmarks/bench_queue.py --benchmark-only``.
Ratios: ``python benchmarks/bench_queue.py --ratios [--rounds 201]``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import fastcl  # noqa: E402

K, D, B = 65536, 128, 256
PROVIDERS = ("fastcl", "moco_slice", "lightly_clone")


def make_step(provider: str, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    queue = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1).to(device)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)
    keys = torch.randn(B, D, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state = {"bank": queue}
    if provider == "fastcl":
        backend = "triton" if device == "cuda" else "cpp"

        def step():
            with fastcl.use_backend(backend):
                fastcl.queue_push_(queue, ptr, keys)
            sync()
    elif provider == "moco_slice":
        def step():
            p = int(ptr)
            queue[p:p + B] = keys
            ptr[0] = (p + B) % K
            sync()
    elif provider == "lightly_clone":
        def step():
            bank = state["bank"].clone()
            p = int(ptr)
            bank[p:p + B] = keys
            ptr[0] = (p + B) % K
            state["bank"] = bank
            sync()
    else:
        raise ValueError(provider)
    return step


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("provider", PROVIDERS)
def test_queue_push(benchmark, provider, device):
    benchmark.group = f"queue push K={K} D={D} B={B} {device}"
    benchmark.extra_info.update(provider=provider, K=K, D=D, B=B, device=device)
    benchmark.pedantic(make_step(provider, device), rounds=200, warmup_rounds=5)


def ratios(argv=None) -> int:
    import argparse
    import datetime

    p = argparse.ArgumentParser(description="interleaved queue-push medians and ratios")
    p.add_argument("--ratios", action="store_true", required=True)
    p.add_argument("--rounds", type=int, default=201)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = p.parse_args(argv)
    print(f"# fastcl queue ratios, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"device {a.device}, K={K} D={D} B={B}")
    print("# " + ", ".join(f"{k}={v}" for k, v in _common.machine_info().items()))
    print(f"# load average at start: {_common.loadavg()}")
    steps = {prov: make_step(prov, a.device) for prov in PROVIDERS}
    med, _ = _common.interleaved(steps, a.rounds)
    for prov in PROVIDERS:
        print(f"  {prov:<14} {med[prov] * 1e6:9.1f} us   {prov}/fastcl "
              f"{med[prov] / med['fastcl']:6.2f}x")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_queue.py --ratios [--rounds R] [--device cpu|cuda]",
          file=sys.stderr)
    sys.exit(2)
