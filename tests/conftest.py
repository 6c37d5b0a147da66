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
