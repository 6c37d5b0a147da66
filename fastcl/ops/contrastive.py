"""Custom ops for the similarity + log-softmax family.

Four ops, one kernel boundary each:

``fastcl::nt_xent_lse(z, temperature) -> lse``
    z (2N, D) raw rows; lse_i = logsumexp_{j != i} (zhat_i . zhat_j) / tau, float32
    (float64 for float64 z). The (2N)^2 matrix is never stored.
``fastcl::nt_xent_lse_backward(grad_lse, z, lse, temperature) -> dz``
    The symmetric form: one pass over tiles gives (G + G^T) zhat / tau, followed by the
    normalization backward.
``fastcl::info_nce_lse(q, k, extra, temperature) -> lse``
    lse_i = logsumexp([extra_i] + [(qhat_i . khat_j) / tau for all j]); extra optional.
``fastcl::info_nce_lse_backward(grad_lse, q, k, extra, lse, temperature, need_q, need_k) -> (dq, dk)``
    dq over row tiles and dk over column tiles, each without atomics (deterministic). A gradient
    that is not needed (e.g. a detached MoCo queue) is not computed and comes back empty.

The positive-pair logits are O(N*D) and are left to ``fastcl.functional``, where autograd sees
them; gradients of ``extra`` are formed in the autograd formula below.

``temperature`` is a 0-dim float64 CPU tensor (see :func:`temperature_tensor`), not a float:
torch.compile specializes float arguments of custom ops, which would recompile per value.
Reading it costs no device sync. Gradients are always returned row-major (contiguous).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastcl.ops._backend import dot_precision, implementation

_EPS = 1e-12  # as F.normalize


def _inv_norm(x: Tensor) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=1, dtype=acc).clamp_min(_EPS).reciprocal()


def _normalize_backward(x: Tensor, r: Tensor, grad_hat: Tensor) -> Tensor:
    """Gradient through xhat = x / max(|x|, eps), given d/d xhat; returned in x's dtype."""
    acc = grad_hat.dtype
    r = r.to(acc)[:, None]
    x_hat = x.to(acc) * r
    radial = (x_hat * grad_hat).sum(dim=1, keepdim=True)
    # Where the norm was clamped to eps, xhat = x / eps is linear in x: no projection.
    radial = torch.where(r < 1.0 / _EPS, radial, torch.zeros_like(radial))
    return ((grad_hat - x_hat * radial) * r).to(x.dtype).contiguous()


def temperature_tensor(temperature) -> Tensor:
    """The 0-dim float64 CPU tensor form of a temperature that the ops take."""
    # Multiplying keeps a symbolic float symbolic under torch.compile; torch.as_tensor,
    # torch.full and torch.scalar_tensor would specialize it (a recompile per value).
    return torch.ones((), dtype=torch.float64, device="cpu") * temperature


def _inv_temp(temperature: Tensor) -> float:
    return 1.0 / float(temperature)


def _empty_rows(x: Tensor) -> Tensor:
    """Fake output: a contiguous tensor shaped like x (the real gradients are row-major)."""
    return x.new_empty(x.shape)


def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- NT-Xent (symmetric) ----


@torch.library.custom_op("fastcl::nt_xent_lse", mutates_args=())
def nt_xent_lse(z: Tensor, temperature: Tensor) -> Tensor:
    impl = implementation(z)
    r = _inv_norm(z)
    lse = impl.lse_forward(z, z, r, r, None, _inv_temp(temperature), True, dot_precision())
    return lse.to(_lse_dtype(z))


@nt_xent_lse.register_fake
def _(z: Tensor, temperature: Tensor) -> Tensor:
    return z.new_empty(z.shape[0], dtype=_lse_dtype(z))


@torch.library.custom_op("fastcl::nt_xent_lse_backward", mutates_args=())
def nt_xent_lse_backward(grad_lse: Tensor, z: Tensor, lse: Tensor, temperature: Tensor) -> Tensor:
    impl = implementation(z)
    r = _inv_norm(z)
    g = grad_lse.to(lse.dtype).contiguous()
    lse = lse.contiguous()
    d_hat = impl.grad_accumulate(z, z, r, r, lse, g, lse, g, _inv_temp(temperature), True, dot_precision())
    return _normalize_backward(z, r, d_hat)


@nt_xent_lse_backward.register_fake
def _(grad_lse: Tensor, z: Tensor, lse: Tensor, temperature: Tensor) -> Tensor:
    return _empty_rows(z)


def _nt_xent_setup(ctx, inputs, output):
    z, temperature = inputs
    ctx.save_for_backward(z, output, temperature)


def _nt_xent_backward(ctx, grad_lse):
    z, lse, temperature = ctx.saved_tensors
    return nt_xent_lse_backward(grad_lse, z, lse, temperature), None


nt_xent_lse.register_autograd(_nt_xent_backward, setup_context=_nt_xent_setup)


# ------------------------------------------------------------------------- InfoNCE -------


@torch.library.custom_op("fastcl::info_nce_lse", mutates_args=())
def info_nce_lse(q: Tensor, k: Tensor, extra: Optional[Tensor], temperature: Tensor) -> Tensor:
    impl = implementation(q)
    if extra is not None:
        extra = extra.to(_lse_dtype(q)).contiguous()
    lse = impl.lse_forward(
        q, k, _inv_norm(q), _inv_norm(k), extra, _inv_temp(temperature), False, dot_precision()
    )
    return lse.to(_lse_dtype(q))


@info_nce_lse.register_fake
def _(q: Tensor, k: Tensor, extra: Optional[Tensor], temperature: Tensor) -> Tensor:
    return q.new_empty(q.shape[0], dtype=_lse_dtype(q))


@torch.library.custom_op("fastcl::info_nce_lse_backward", mutates_args=())
def info_nce_lse_backward(
    grad_lse: Tensor,
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    temperature: Tensor,
    need_q: bool,
    need_k: bool,
) -> Tuple[Tensor, Tensor]:
    impl = implementation(q)
    rq, rk = _inv_norm(q), _inv_norm(k)
    g = grad_lse.to(lse.dtype).contiguous()
    lse = lse.contiguous()
    inv_temp = _inv_temp(temperature)
    precision = dot_precision()
    dq = q.new_empty(0)
    dk = k.new_empty(0)
    if need_q:
        dq_hat = impl.grad_accumulate(q, k, rq, rk, lse, g, None, None, inv_temp, False, precision)
        dq = _normalize_backward(q, rq, dq_hat)
    if need_k:
        dk_hat = impl.grad_accumulate(k, q, rk, rq, None, None, lse, g, inv_temp, False, precision)
        dk = _normalize_backward(k, rk, dk_hat)
    return dq, dk


@info_nce_lse_backward.register_fake
def _(grad_lse, q, k, lse, temperature, need_q, need_k):
    return (
        _empty_rows(q) if need_q else q.new_empty(0),
        _empty_rows(k) if need_k else k.new_empty(0),
    )


def _info_nce_setup(ctx, inputs, output):
    q, k, extra, temperature = inputs
    ctx.save_for_backward(q, k, extra, output, temperature)


def _info_nce_backward(ctx, grad_lse):
    q, k, extra, lse, temperature = ctx.saved_tensors
    need_q, need_k, need_extra = ctx.needs_input_grad[:3]
    dq, dk = info_nce_lse_backward(grad_lse, q, k, lse, temperature, need_q, need_k)
    d_extra = None
    if extra is not None and need_extra:
        # d lse_i / d extra_i = softmax weight of the extra logit.
        d_extra = (grad_lse * torch.exp(extra.to(lse.dtype) - lse)).to(extra.dtype)
    return (dq if need_q else None), (dk if need_k else None), d_extra, None


info_nce_lse.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)
