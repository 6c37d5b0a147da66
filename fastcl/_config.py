"""The one place where fastcl reads environment variables that change its behaviour.

``FASTCL_BACKEND`` picks the implementation behind every op, on every device:

``auto`` (default)
    CUDA tensors run the Triton kernels; CPU tensors run the C++ kernels (``csrc/``, built on
    first use). Where those cannot run (no Triton on CUDA; no compiler or ninja on CPU) fastcl
    warns once and uses the chunked PyTorch path (``fastcl/kernels/chunked.py``).
``triton``
    The Triton kernels, forced. CPU tensors need ``TRITON_INTERPRET=1`` set before fastcl's
    kernels are first used (the interpreter is slow: small shapes only).
``chunked``
    The row-chunked PyTorch implementation: O(N*D) memory, any device.
``cpp``
    The C++ CPU kernels, CPU tensors only; raises if they cannot be built.
``reference``
    ``fastcl.reference``: the plain O(N^2) PyTorch oracle. For debugging and comparisons.

A forced backend that cannot run raises; it never falls back silently.

``FASTCL_CPP_BUILD_DIR`` is where the C++ kernels are built and cached (default:
``$TORCH_EXTENSIONS_DIR/fastcl``, or ``~/.cache/torch_extensions/fastcl``).
"""
from __future__ import annotations

import contextlib
import os

BACKENDS = ("auto", "triton", "chunked", "cpp", "reference")


def _parse(name: str, source: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return value


_backend = _parse(os.environ.get("FASTCL_BACKEND", "auto") or "auto", "FASTCL_BACKEND")


def triton_interpret() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``).

    Triton reads the variable when a module holding ``@triton.jit`` functions is imported;
    fastcl imports its kernel modules lazily, on first use, so setting it any time before the
    first Triton call works.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpp_build_root() -> str:
    """The directory under which the C++ kernels are built and cached."""
    root = os.environ.get("FASTCL_CPP_BUILD_DIR")
    if root:
        return root
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    return os.path.join(base, "fastcl")


def get_backend() -> str:
    """The backend in force: one of ``fastcl._config.BACKENDS``."""
    return _backend


def set_backend(name: str) -> None:
    """Force a backend for every op and device (see the module docstring); ``"auto"`` resets."""
    global _backend
    _backend = _parse(name, "backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)
