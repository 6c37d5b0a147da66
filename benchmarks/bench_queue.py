"""MoCo queue push: fastcl.queue_push_ against the peers' enqueue, K=65536, D=128, B=256, float32.

Providers (each pushes one (B, D) batch of keys and advances the pointer)
    ``fastcl``: ``fastcl.queue_push_(queue, ptr, keys)``: wraps at the end, no host sync.
    ``moco_slice``: MoCo's ``_dequeue_and_enqueue``: ``ptr = int(queue_ptr)`` (a host read),
    ``queue[ptr:ptr + B] = keys``, ``queue_ptr[0] = (ptr + B) % K``. It cannot wrap (MoCo
    asserts ``K % B == 0``): the fastest thing a push can be.
    ``lightly_clone``: lightly's MemoryBankModule: clone the whole bank, then write the batch
    into the clone (and keep it).

pytest-benchmark: ``python -m pytest benchmarks/bench_queue.py --benchmark-only``.
Ratios: ``python benchmarks/bench_queue.py --ratios [--rounds 201]``: fastcl interleaved with
one peer at a time. (Interleaved with lightly's step, which allocates and fills a 32 MiB clone,
every other push runs on flushed caches: fastcl's push measured 33 us beside MoCo's alone and
272 us with lightly's in the same rotation; each ratio is taken against its own peer.)
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


@pytest.mark.parametrize("device", _common.devices())
@pytest.mark.parametrize("provider", PROVIDERS)
def test_queue_push(benchmark, provider, device):
    benchmark.group = f"queue push K={K} D={D} B={B} {device}"
    benchmark.extra_info.update(provider=provider, K=K, D=D, B=B, device=device)
    benchmark.pedantic(make_step(provider, device), rounds=200, warmup_rounds=5)


def measure(device: str, rounds: int):
    """{peer: {provider: median seconds}}: fastcl interleaved with one peer at a time."""
    pairs = {}
    for peer in PROVIDERS[1:]:
        steps = {prov: make_step(prov, device) for prov in ("fastcl", peer)}
        pairs[peer], _ = _common.interleaved(steps, rounds)
    return pairs


def ratios(argv=None) -> int:
    a = _common.ratios_args("interleaved queue-push medians and ratios", 201, argv)
    _common.print_header(f"fastcl queue ratios, device {a.device}, K={K} D={D} B={B}")
    for peer, med in measure(a.device, a.rounds).items():
        print(f"  fastcl {med['fastcl'] * 1e6:9.1f} us  vs  {peer:<14} "
              f"{med[peer] * 1e6:9.1f} us   {peer}/fastcl {med[peer] / med['fastcl']:6.2f}x")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_queue.py --ratios [--rounds R] [--device cpu|cuda]",
          file=sys.stderr)
    sys.exit(2)
