"""Shared test set-up.

- Without CUDA, the Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here,
  before fastcl (and so Triton's kernel modules) are imported.
- ``backend`` parametrizes a test over fastcl's backends: ``cpp`` (the C++ CPU kernels, the
  default on CPU), ``chunked`` (tiled PyTorch, the fallback) and ``triton`` (interpreter on CPU,
  real kernels on CUDA). Each comes with the device it runs on.
- ``tile_patch(name, tile)`` sets the tile edge of the chunked or C++ backend, so that small
  inputs cross many tile boundaries.
- Hypothesis profiles: ``ci`` (bounded, used when CI is set) and ``dev``; choose with
  HYPOTHESIS_PROFILE. Deadlines are off: first calls compile.
"""
from __future__ import annotations

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import fastcl  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

HAS_CUDA = _HAS_CUDA
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


class Backend:
    """A fastcl backend and the device its tests use."""

    def __init__(self, name: str, device: str):
        self.name = name
        self.device = torch.device(device)
        # The Triton interpreter is numpy-speed: keep its shapes small.
        self.small = name == "triton" and device == "cpu"

    def __repr__(self) -> str:
        return f"{self.name}-{self.device.type}"


BACKENDS = [Backend("cpp", "cpu"), Backend("chunked", "cpu"), Backend("triton", TRITON_DEVICE)]
CPU_BACKENDS = ("cpp", "chunked")  # the CPU paths that run at full speed


def kernel_module(name: str):
    """The backend module of ``cpp`` or ``chunked`` (importing cpp builds it if needed)."""
    if name == "cpp":
        from fastcl.kernels import cpp

        return cpp
    if name == "chunked":
        from fastcl.kernels import chunked

        return chunked
    raise ValueError(f"no tile size to patch on backend {name!r}")


def thread_runs(run):
    """(one, many, again): ``run()``'s outputs with 1 thread, then twice with 2 (or torch's
    count, if more); torch's thread count restored after."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many, again = run(), run()
    finally:
        torch.set_num_threads(threads)
    return one, many, again


def assert_thread_runs_agree(one, many, again):
    """Bitwise the same from run to run at a fixed thread count; across thread counts equal to
    float32 rounding (MKL's own products may round otherwise with more threads: on an Intel
    AVX-512 VM, 2026-12-02, they did). The bound is relative to each output's largest entry:
    logits of size 1/tau = 100 carry one ulp of ~8e-6, which moves every softmax weight by
    that much relatively, so an output of size 33 (the rows' gradient at tau = 0.01) moved by
    8e-5 between 1 and 2 threads there; 1e-5 x its size bounds that, and a schedule that
    summed in another order would still show as bitwise differences in MKL_CBWR's test."""
    for a, b, c in zip(one, many, again):
        assert torch.equal(b, c)
        size = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-5 * size)


_BITWISE = """
import sys
sys.path.insert(0, {tests!r})
import torch
import {module}
one, many, again = {module}._thread_runs()
assert all(torch.equal(a, b) for a, b in zip(one, many)), "thread count changed a result"
assert all(torch.equal(a, b) for a, b in zip(many, again)), "a rerun changed a result"
print("bitwise")
"""


def assert_bitwise_across_threads(module: str):
    """Runs ``module._thread_runs()`` in a fresh process with MKL's conditional numerical
    reproducibility (MKL_CBWR=COMPATIBLE: products that are themselves thread-count
    independent) and asserts 1 and several threads give bitwise the same outputs."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, MKL_CBWR="COMPATIBLE")
    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", _BITWISE.format(tests=tests, module=module)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tests)
    assert proc.returncode == 0 and "bitwise" in proc.stdout, proc.stderr[-3000:]


def tile_patch(name: str, tile: int):
    """Context manager: the ``cpp`` or ``chunked`` backend runs with tile edge ``tile``."""
    from unittest import mock

    return mock.patch.object(kernel_module(name), "_TILE", tile)
if HAS_CUDA:
    BACKENDS.append(Backend("chunked", "cuda"))


@pytest.fixture(params=BACKENDS, ids=repr)
def backend(request):
    """Runs the test with fastcl forced to one backend; yields the Backend (name, device)."""
    with fastcl.use_backend(request.param.name):
        yield request.param


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Runs the test with fastcl forced to one of its full-speed CPU backends; yields its name."""
    with fastcl.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fastcl.get_backend()
    yield
    fastcl.set_backend(before)
