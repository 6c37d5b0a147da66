"""MoCo queue push: fastcl.queue_push_ against the peers' enqueue, K=65536, D=128, B=256, float32.

Providers (each pushes one (B, D) batch of keys and advances the pointer)
    ``fastcl``: ``fastcl.queue_push_(queue, ptr, keys)``: wraps at the end, no host sync. The
    step calls it as a training loop does, under the backend in force; ``make_step`` checks
    once, outside the timed step, that this backend runs the C++ kernels (CPU) or Triton
    (CUDA), so that a missing toolchain fails the case instead of timing the fallback.
    ``moco_slice``: MoCo's ``_dequeue_and_enqueue``: ``ptr = int(queue_ptr)`` (a host read),
    ``queue[ptr:ptr + B] = keys``, ``queue_ptr[0] = (ptr + B) % K``. It cannot wrap (MoCo
    asserts ``K % B == 0``): the fastest thing a push can be.
    ``lightly_clone``: lightly's MemoryBankModule: clone the whole bank, then write the batch
    into the clone (and keep it).

Cold caches (``make_step(..., clone_between=True)``): before each timed push an untimed
``prepare()`` clones a separate 32 MiB bank and keeps the clone (what lightly's step, or any
large operation of a training step, does between two pushes): the push then runs with the
L2 cache and TLB flushed of its code and data. Both fastcl and moco_slice are measured so, in
the same rotation, and compared with each other.

pytest-benchmark: ``python -m pytest benchmarks/bench_queue.py --benchmark-only`` (the
``after_clone`` cases clone in pedantic's untimed ``setup``).
Ratios: ``python benchmarks/bench_queue.py --ratios [--rounds 201]``: fastcl interleaved with
one peer at a time (A B A B, the start rotated each round, medians), three rotations:
``moco_slice`` (both warm), ``lightly_clone`` (fastcl runs after each of lightly's clones, so its
figure there is a cold-cache one; each ratio is taken against its own peer), and
``moco_slice (clone)``: both pushes after a 32 MiB clone. The last line divides fastcl's
figure beside lightly (cold) by MoCo's warm one: it mixes the two states. On a 2-core KVM Xeon
(load 3-5) a cold push costs several times a warm one for both: MoCo's slice write about 20 us
warm and 100-130 us after the clone, fastcl 15 us and 60-65 us (47-53 us beside lightly); before
fastcl's one-call eager path (fastcl.ops.momentum.try_eager_cpu_push) fastcl took 150 us after
the clone, each Python check and version bump of the checked path 30-50 us when cold.
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


CLONE_MIB = 32


class _Step:
    """A timed push; with ``prepare`` (cold-cache mode) an untimed 32 MiB clone before it."""

    def __init__(self, push, prepare=None):
        self.push = push
        if prepare is not None:
            self.prepare = prepare

    def __call__(self):
        self.push()


def _check_fastcl_backend(queue: torch.Tensor, backend: str) -> None:
    """The implementation the ambient backend picks for ``queue`` must be ``backend``'s."""
    from fastcl.ops._backend import implementation

    with fastcl.use_backend(backend):
        forced = implementation(queue, "momentum")  # raises if the backend cannot run
    ambient = implementation(queue, "momentum")
    if ambient is not forced:
        raise RuntimeError(f"fastcl's queue push would run {ambient.__name__}, not "
                           f"{forced.__name__} (FASTCL_BACKEND={fastcl.get_backend()})")


def make_step(provider: str, device: str = "cpu", clone_between: bool = False):
    g = torch.Generator().manual_seed(0)
    queue = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1).to(device)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)
    keys = torch.randn(B, D, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state = {"bank": queue}
    if provider == "fastcl":
        _check_fastcl_backend(queue, "triton" if device == "cuda" else "cpp")

        def step():
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
    if not clone_between:
        return _Step(step)
    other = {"bank": torch.zeros(CLONE_MIB * 2**20 // 4, device=device)}

    def prepare():
        other["bank"] = other["bank"].clone()
        sync()

    return _Step(step, prepare)


@pytest.mark.parametrize("device", _common.devices())
@pytest.mark.parametrize("provider", PROVIDERS)
def test_queue_push(benchmark, provider, device):
    benchmark.group = f"queue push K={K} D={D} B={B} {device}"
    benchmark.extra_info.update(provider=provider, K=K, D=D, B=B, device=device)
    benchmark.pedantic(make_step(provider, device), rounds=200, warmup_rounds=5)


@pytest.mark.parametrize("device", _common.devices())
@pytest.mark.parametrize("provider", ("fastcl", "moco_slice"))
def test_queue_push_after_clone(benchmark, provider, device):
    benchmark.group = f"queue push after a {CLONE_MIB} MiB clone K={K} D={D} B={B} {device}"
    benchmark.extra_info.update(provider=provider, K=K, D=D, B=B, device=device,
                                between=f"clone {CLONE_MIB} MiB")
    step = make_step(provider, device, clone_between=True)
    benchmark.pedantic(step, setup=step.prepare, rounds=200, warmup_rounds=5)


# (label, peer, clone_between): the rotations of --ratios, fastcl against one peer each.
ROTATIONS = (("moco_slice", "moco_slice", False), ("lightly_clone", "lightly_clone", False),
             ("moco_slice (clone)", "moco_slice", True))


def measure(device: str, rounds: int):
    """{label: {provider: median seconds}}: fastcl interleaved with one peer at a time."""
    pairs = {}
    for label, peer, cold in ROTATIONS:
        steps = {prov: make_step(prov, device, clone_between=cold) for prov in ("fastcl", peer)}
        pairs[label], _ = _common.interleaved(steps, rounds)
    return pairs


def ratios(argv=None) -> int:
    a = _common.ratios_args("interleaved queue-push medians and ratios", 201, argv)
    _common.print_header(f"fastcl queue ratios, device {a.device}, K={K} D={D} B={B}")
    pairs = measure(a.device, a.rounds)
    for label, med in pairs.items():
        peer = next(p for p in med if p != "fastcl")
        print(f"  fastcl {med['fastcl'] * 1e6:9.1f} us  vs  {label:<18} "
              f"{med[peer] * 1e6:9.1f} us   {peer}/fastcl {med[peer] / med['fastcl']:6.2f}x")
    cold, warm = pairs["lightly_clone"]["fastcl"], pairs["moco_slice"]["moco_slice"]
    print(f"  (fastcl after lightly's clone / moco_slice warm: {cold / warm:.2f}x, "
          "cold against warm)")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_queue.py --ratios [--rounds R] [--device cpu|cuda]",
          file=sys.stderr)
    sys.exit(2)
