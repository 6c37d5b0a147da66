"""Backend choice for fastcl's ops: which implementation module runs a call.

The choice depends on ``fastcl._config.get_backend()`` and the tensors' device and dtype:

- ``auto``: CUDA float16/bfloat16/float32 -> Triton; CPU tensors -> the C++ kernels; anything
  else (CUDA float64) -> chunked. Where the fast path cannot run (no Triton on CUDA; no compiler
  or ninja to build the C++ kernels) it warns once, saying how to get it, and uses the chunked
  path.
- ``triton``: Triton, or a ``RuntimeError`` saying why it cannot run (CPU without
  ``TRITON_INTERPRET=1``, float64, Triton missing).
- ``chunked``: the chunked PyTorch path on any device.
- ``cpp``: the C++ kernels for CPU tensors, or a ``RuntimeError`` saying why they cannot run.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from fastcl import _config

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernel modules of each op family: (triton, chunked / PyTorch fallback, C++).
FAMILIES = {
    "contrastive": ("fastcl.kernels.triton_contrastive", "fastcl.kernels.chunked"),
    "momentum": ("fastcl.kernels.triton_momentum", "fastcl.kernels.torch_momentum"),
    "cosine": ("fastcl.kernels.triton_cosine", "fastcl.kernels.torch_cosine"),
}
_triton_modules: dict = {}
_triton_error = None
_cpp_module = None
_warned = set()


def _load_triton(family: str = "contrastive") -> ModuleType:
    global _triton_error
    if family not in _triton_modules and _triton_error is None:
        try:
            _triton_modules[family] = importlib.import_module(FAMILIES[family][0])
        except ImportError as exc:  # triton not installed, or broken
            _triton_error = exc
    if family not in _triton_modules:
        raise RuntimeError(
            f"fastcl's Triton kernels are unavailable ({_triton_error}); "
            "install triton (`pip install triton`)"
        )
    return _triton_modules[family]


def _load_cpp() -> ModuleType:
    """The C++ kernels' backend module; raises fastcl._cpp.CppUnavailable if they can't be built."""
    global _cpp_module
    if _cpp_module is None:
        from fastcl import _cpp

        _cpp.load()
        from fastcl.ops import _cpp_meta

        _cpp_meta.register()
        _cpp_module = importlib.import_module("fastcl.kernels.cpp")
    return _cpp_module


def _cpp_for(t: torch.Tensor) -> ModuleType:
    if t.device.type != "cpu":
        raise RuntimeError(
            f"FASTCL_BACKEND=cpp runs on CPU tensors, got {t.device}; use FASTCL_BACKEND=auto"
        )
    return _load_cpp()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _chunked(family: str = "contrastive") -> ModuleType:
    return importlib.import_module(FAMILIES[family][1])


def _triton_for(t: torch.Tensor, family: str = "contrastive") -> ModuleType:
    if t.dtype not in _TRITON_DTYPES:
        raise RuntimeError(
            f"FASTCL_BACKEND=triton supports float16, bfloat16 and float32, got {t.dtype}; "
            "use FASTCL_BACKEND=auto (float64 runs on the chunked path) or chunked"
        )
    if t.device.type == "cpu" and not _config.triton_interpret():
        raise RuntimeError(
            "FASTCL_BACKEND=triton got CPU tensors, but Triton runs on CPU only in interpreter "
            "mode: set TRITON_INTERPRET=1 before fastcl first runs a kernel, or move the "
            "tensors to CUDA"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"FASTCL_BACKEND=triton does not support device {t.device}")
    return _load_triton(family)


def implementation(t: torch.Tensor, family: str = "contrastive",
                   backend: str = "") -> ModuleType:
    """The kernel module of op ``family`` (see FAMILIES) that runs an op whose main input is ``t``,
    under ``backend`` (default: ``fastcl.get_backend()``).

    The C++ module (``fastcl.kernels.cpp``) serves every family.
    """
    backend = backend or _config.get_backend()
    if backend == "triton":
        return _triton_for(t, family)
    if backend == "chunked":
        return _chunked(family)
    if backend == "cpp":
        return _cpp_for(t)
    if backend == "reference":
        # fastcl.functional handles the reference before any op is called.
        raise RuntimeError("FASTCL_BACKEND=reference reached a fastcl op; call fastcl.functional")
    # auto
    if t.device.type == "cpu":
        try:
            return _load_cpp()
        except RuntimeError as exc:
            _warn_once(
                "cpp",
                f"fastcl could not build its C++ CPU kernels ({exc}). It falls back to its "
                "chunked PyTorch path, which is slower.",
            )
    elif t.device.type == "cuda" and t.dtype in _TRITON_DTYPES:
        try:
            return _load_triton(family)
        except RuntimeError as exc:
            _warn_once(
                "triton",
                f"{exc}. fastcl falls back to its chunked PyTorch path, which is slower; "
                "`pip install triton` gives the fused CUDA kernels.",
            )
    return _chunked(family)


def dot_precision() -> str:
    """'ieee' or 'tf32' for float32 products, following torch.get_float32_matmul_precision()."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def refuse_double_backward(what: str) -> None:
    """Called first in every fused op's backward. The backward passes are kernels, not
    differentiable graphs: a backward with ``create_graph=True`` (the only case in which
    autograd runs a backward with grad mode on) would give a second derivative that is
    silently disconnected or wrong, so it is refused here, at the first backward."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} does not support double backward: its backward is a fused kernel, not a "
            "differentiable graph, so create_graph=True (torch.autograd.grad(..., "
            "create_graph=True), gradient penalties, Hessian-vector products) cannot give its "
            "second derivative. Compute the first gradient without create_graph=True, or "
            "use FASTCL_BACKEND=reference (the plain PyTorch formulas; single process) for "
            "higher-order gradients"
        )
