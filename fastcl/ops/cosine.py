"""Custom op for BYOL's loss ("fastcl::cosine_loss").

``fastcl::cosine_loss(p, z) -> (loss, stats)``
    loss_i = 2 - 2 cos(p_i, z_i) = ||p̂_i - ẑ_i||², in float32 (float64 for float64), with the
    norms clamped at 1e-12 as ``F.normalize`` clamps them. ``stats`` (B, 3) holds what the
    backward needs (inverse norms and cos; no gradient). Only ``p`` is differentiated: BYOL's
    target projection ``z`` is a constant (``fastcl.models.byol_loss`` detaches it).
``fastcl::cosine_loss_backward(grad_loss, p, z, stats) -> dp``

Backends (``implementation(p, "cosine")``): ``csrc/cosine.cpp`` on CPU, Triton on CUDA,
``fastcl.kernels.torch_cosine`` as the fallback. One pass over p and z forward, one backward,
against about ten element-wise kernels for the same formula in eager PyTorch.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastcl.ops._backend import implementation, refuse_double_backward
from fastcl.ops.contrastive import _acc_dtype


def _forward(p: Tensor, z: Tensor) -> Tuple[Tensor, Tensor]:
    """(loss, stats) from the backend kernel, in the accumulation dtype."""
    loss, stats = implementation(p, "cosine").cosine_forward(p, z)
    return loss.to(_acc_dtype(p)), stats.to(_acc_dtype(p))


def _backward_impl(grad_loss: Tensor, p: Tensor, z: Tensor, stats: Tensor) -> Tensor:
    """dp from the backend kernel, in p's dtype."""
    return implementation(p, "cosine").cosine_backward(grad_loss, p, z, stats).to(p.dtype)


cosine_loss = torch.library.custom_op("fastcl::cosine_loss", mutates_args=())(_forward)


@cosine_loss.register_fake
def _(p, z):
    acc = _acc_dtype(p)
    return p.new_empty(p.shape[0], dtype=acc), p.new_empty((p.shape[0], 3), dtype=acc)


cosine_loss_backward = torch.library.custom_op("fastcl::cosine_loss_backward",
                                               mutates_args=())(_backward_impl)


@cosine_loss_backward.register_fake
def _(grad_loss, p, z, stats):
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    p, z = inputs
    _loss, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(p, z, stats)


_WHAT = "fastcl.byol_loss (op fastcl::cosine_loss)"


def _backward(ctx, grad_loss, _grad_stats):
    refuse_double_backward(_WHAT)
    p, z, stats = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros(p.shape[0], dtype=stats.dtype, device=p.device)
    return cosine_loss_backward(grad_loss.contiguous(), p, z, stats), None


cosine_loss.register_autograd(_backward, setup_context=_setup)


class _EagerCosineLoss(torch.autograd.Function):
    """The same kernels without the custom op's Python dispatch, for eager mode: that dispatch
    (op, autograd wrapper, backward op) cost about 120 us per forward + backward here, ten times
    the kernels' own time at B=256, F=256."""

    @staticmethod
    def forward(ctx, p, z):
        loss, stats = _forward(p, z)
        ctx.save_for_backward(p, z, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward(_WHAT)
        p, z, stats = ctx.saved_tensors
        return _backward_impl(grad_loss.contiguous(), p, z, stats), None


def cosine(p: Tensor, z: Tensor) -> Tensor:
    """Per-row loss: ``fastcl::cosine_loss`` under tracing (torch.compile, export), the same
    backend kernels through a plain autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return cosine_loss(p, z)[0]
    return _EagerCosineLoss.apply(p, z)
