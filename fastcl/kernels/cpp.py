"""The C++ CPU kernels (``csrc/contrastive.cpp``) behind the backend contract of
``fastcl.kernels``: thin calls into the ``torch.ops.fastcl_cpu`` operators.

``precision`` is accepted for the contract's sake: the tiles' products are ATen matmuls, which
follow torch's own float32 matmul settings on the CPU, as eager PyTorch does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastcl import _cpp

_cpp.load()
_ops = torch.ops.fastcl_cpu

# Tile edge: 128 measured fastest on a 2-core Zen 4 (see csrc/contrastive.cpp). Tests set it
# small so that small inputs cross many tile boundaries.
_TILE = 128


def nt_xent_forward(z, nz, inv_temp: float, precision: str = "ieee",
                    positive_in_denominator: bool = True, with_dscale: bool = False):
    """(loss, lse, dscale); dscale is empty (shape (0,)) unless with_dscale."""
    return _ops.nt_xent_forward(z, nz, inv_temp, _TILE, positive_in_denominator, with_dscale)


def nt_xent_grad(z, nz, lse, g, inv_temp: float, precision: str = "ieee"):
    return _ops.nt_xent_grad(z, nz, lse, g, inv_temp, _TILE)


def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    nq: torch.Tensor,
    nk: torch.Tensor,
    positive: Optional[Tuple[torch.Tensor, torch.Tensor]],
    inv_temp: float,
    pos_offset: Optional[int],
    precision: str = "ieee",
    positive_in_denominator: bool = True,
    with_dscale: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dscale); dscale is empty (shape (0,)) unless with_dscale."""
    loss, lse, _, dscale = _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, False,
                                        positive_in_denominator, with_dscale)
    return loss, lse, dscale


def lse_forward_with_grad(q, k, nq, nk, positive, inv_temp: float, pos_offset: Optional[int],
                          precision: str = "ieee", positive_in_denominator: bool = True,
                          with_dscale: bool = False):
    """(loss, lse, dscale, v)."""
    loss, lse, v, dscale = _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, True,
                                        positive_in_denominator, with_dscale)
    return loss, lse, dscale, v


def _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, with_grad,
                 positive_in_denominator, with_dscale):
    k_pos, n_pos = positive if positive is not None else (None, None)
    return _ops.lse_forward(q, k, nq, nk, k_pos, n_pos, inv_temp, pos_offset, with_grad, _TILE,
                            positive_in_denominator, with_dscale)


def grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp: float,
                    pos_offset: Optional[int], precision: str = "ieee") -> torch.Tensor:
    return _ops.grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, pos_offset,
                                _TILE)


# ----------------------------------------------------------------------- momentum -------------


def ema_(targets, sources, momentum: torch.Tensor) -> None:
    _ops.ema_(targets, sources, momentum.to("cpu", torch.float64))


def queue_push_(queue, ptr, keys) -> None:
    _ops.queue_push_(queue, ptr, keys)


# fastcl.queue_push_'s eager fast path (fastcl.ops.momentum.try_eager_cpu_push): the checks, the
# version-counter bumps and the push in one dispatcher call; False when an argument fails them.
# The overload's C++ callable where torch exposes it (OpOverload.__call__ is one Python frame
# more, about 6 us with cold caches).
_push_eager = _ops.queue_push_eager_.default
queue_push_eager_ = getattr(_push_eager, "_op", _push_eager)


# ----------------------------------------------------------------------- BYOL's cosine loss ----


def cosine_forward(p, z):
    return _ops.cosine_forward(p, z)


def cosine_backward(g, p, z, stats):
    return _ops.cosine_backward(g, p, z, stats)
