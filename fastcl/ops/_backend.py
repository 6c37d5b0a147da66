"""Backend choice for fastcl's ops: which implementation module runs a call.

The choice depends on ``fastcl._config.get_backend()`` and the tensors' device and dtype:

- ``auto``: CUDA float16/bfloat16/float32 -> Triton; everything else (CPU, float64) -> chunked.
  On CUDA without an importable Triton it warns once and uses the chunked path.
- ``triton``: Triton, or a ``RuntimeError`` saying why it cannot run (CPU without
  ``TRITON_INTERPRET=1``, float64, Triton missing).
- ``chunked``: the chunked PyTorch path on any device.
- ``cpp``: the C++ CPU path is not built yet; raises.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from fastcl import _config

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_triton_module = None
_triton_error = None
_warned_fallback = False


def _load_triton() -> ModuleType:
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("fastcl.kernels.triton_contrastive")
        except ImportError as exc:  # triton not installed, or broken
            _triton_error = exc
    if _triton_module is None:
        raise RuntimeError(
            f"fastcl's Triton kernels are unavailable ({_triton_error}); "
            "install triton (`pip install triton`)"
        )
    return _triton_module


def _chunked() -> ModuleType:
    from fastcl.kernels import chunked

    return chunked


def _triton_for(t: torch.Tensor) -> ModuleType:
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
    return _load_triton()


def implementation(t: torch.Tensor) -> ModuleType:
    """The kernel module that runs an op whose main input is ``t``."""
    global _warned_fallback
    backend = _config.get_backend()
    if backend == "triton":
        return _triton_for(t)
    if backend == "chunked":
        return _chunked()
    if backend == "cpp":
        raise RuntimeError(
            "FASTCL_BACKEND=cpp: the C++ CPU kernels are not part of this fastcl build yet; "
            "use FASTCL_BACKEND=auto or chunked"
        )
    if backend == "reference":
        # fastcl.functional handles the reference before any op is called.
        raise RuntimeError("FASTCL_BACKEND=reference reached a fastcl op; call fastcl.functional")
    # auto
    if t.device.type == "cuda" and t.dtype in _TRITON_DTYPES:
        try:
            return _load_triton()
        except RuntimeError as exc:
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    f"{exc}. fastcl falls back to its chunked PyTorch path, which is slower; "
                    "`pip install triton` gives the fused CUDA kernels.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _chunked()


def dot_precision() -> str:
    """'ieee' or 'tf32' for float32 products, following torch.get_float32_matmul_precision()."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
