"""Per-row losses of one rank's rows against its own block plus the other ranks' rows.

The global logits of a local row split into two blocks: the rank's own block (where the row's
self-similarity and positive are) and the other ranks' rows (negatives only). Each block runs
through the backend's fused kernels (``fastcl.kernels`` contract); their row statistics merge
exactly: lse = logaddexp(lse_own, lse_other), loss = loss_own + softplus(lse_other - lse_own).
The backward reuses the kernels with the merged lse, so each block's softmax weights are the
global ones. No (local × global) matrix exists: only tiles.

``nt_xent_rows(z, others, temperature)``
    z (2n, D) = cat([z1, z2]) of this rank, others (R, D) the other ranks' rows; returns the 2n
    NT-Xent row losses over all 2n + R rows. Gradients for z and others.
``in_batch_rows(q, k, others, temperature)``
    q, k (n, D) this rank's queries and keys (positive of q_i is k_i), others (R, D) the other
    ranks' keys; returns the n InfoNCE row losses over all n + R keys. Gradients for all three.

Eager autograd Functions (the distributed losses exchange shard sizes on the host anyway).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl.ops._backend import dot_precision, implementation, refuse_double_backward
from fastcl.ops.contrastive import _norm, _normalize_backward, _normalized, _positive_weight


def _merge(loss_own: Tensor, lse_own: Tensor, lse_other) -> tuple:
    if lse_other is None:
        return loss_own, lse_own
    delta = torch.nn.functional.softplus(lse_other - lse_own, threshold=50.0)
    return loss_own + delta.to(loss_own.dtype), lse_own + delta


def _other_lse(impl, x: Tensor, nx: Tensor, others: Tensor, inv_temp: float, precision: str):
    """Row logsumexp of x against the other ranks' rows (no positive among them)."""
    if others.shape[0] == 0:
        return None, None
    n_o = _norm(others)
    _, lse = impl.lse_forward(x, others, nx, n_o, None, inv_temp, None, precision)[:2]
    return lse.to(torch.float64), n_o


class _NTXentRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, others: Tensor, temperature: float):
        impl = implementation(z)
        inv_temp, precision = 1.0 / temperature, dot_precision()
        nz = _norm(z)
        loss, lse = impl.nt_xent_forward(z, nz, inv_temp, precision)[:2]
        lse_o, n_o = _other_lse(impl, z, nz, others, inv_temp, precision)
        loss, lse = _merge(loss.to(nz.dtype), lse.to(torch.float64), lse_o)
        ctx.impl, ctx.inv_temp, ctx.precision = impl, inv_temp, precision
        ctx.save_for_backward(z, others, nz, n_o if n_o is not None else nz, loss, lse)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        refuse_double_backward("fastcl.nt_xent(distributed=True)")
        z, others, nz, n_o, loss, lse = ctx.saved_tensors
        impl, inv_temp, precision = ctx.impl, ctx.inv_temp, ctx.precision
        g = grad.to(nz.dtype).contiguous()
        n = z.shape[0] // 2
        # Own block, symmetric: rows and columns are both this rank's rows.
        d_hat = impl.nt_xent_grad(z, nz, lse, g, inv_temp, precision)
        c = _positive_weight(g, loss)
        d_hat += ((c + c.roll(n)) * inv_temp)[:, None] * _normalized(z, nz).roll(n, dims=0)
        d_others = None
        if others.shape[0]:
            d_hat += impl.grad_accumulate(z, others, nz, n_o, lse, g, None, None, inv_temp,
                                          None, precision)
            if ctx.needs_input_grad[1]:
                d_o_hat = impl.grad_accumulate(others, z, n_o, nz, None, None, lse, g, inv_temp,
                                               None, precision)
                d_others = _normalize_backward(others, n_o, d_o_hat)
        elif ctx.needs_input_grad[1]:
            d_others = torch.zeros_like(others)
        return _normalize_backward(z, nz, d_hat), d_others, None


class _InBatchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, others: Tensor, temperature: float):
        impl = implementation(q)
        inv_temp, precision = 1.0 / temperature, dot_precision()
        nq, nk = _norm(q), _norm(k)
        loss, lse = impl.lse_forward(q, k, nq, nk, None, inv_temp, 0, precision)[:2]
        lse_o, n_o = _other_lse(impl, q, nq, others, inv_temp, precision)
        loss, lse = _merge(loss.to(nq.dtype), lse.to(torch.float64), lse_o)
        ctx.impl, ctx.inv_temp, ctx.precision = impl, inv_temp, precision
        ctx.save_for_backward(q, k, others, nq, nk, n_o if n_o is not None else nq, loss, lse)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        refuse_double_backward("fastcl.info_nce(distributed=True)")
        q, k, others, nq, nk, n_o, loss, lse = ctx.saved_tensors
        impl, inv_temp, precision = ctx.impl, ctx.inv_temp, ctx.precision
        need_q, need_k, need_o = ctx.needs_input_grad[:3]
        g = grad.to(nq.dtype).contiguous()
        c = (_positive_weight(g, loss) * inv_temp)[:, None]
        dq = dk = d_others = None
        has_others = others.shape[0] > 0
        if need_q:
            dq_hat = impl.grad_accumulate(q, k, nq, nk, lse, g, None, None, inv_temp, 0,
                                          precision)
            if has_others:
                dq_hat += impl.grad_accumulate(q, others, nq, n_o, lse, g, None, None, inv_temp,
                                               None, precision)
            dq = _normalize_backward(q, nq, dq_hat.add_(c * _normalized(k, nk)))
        if need_k:
            dk_hat = impl.grad_accumulate(k, q, nk, nq, None, None, lse, g, inv_temp, 0,
                                          precision)
            dk = _normalize_backward(k, nk, dk_hat.add_(c * _normalized(q, nq)))
        if need_o:
            if has_others:
                d_o_hat = impl.grad_accumulate(others, q, n_o, nq, None, None, lse, g, inv_temp,
                                               None, precision)
                d_others = _normalize_backward(others, n_o, d_o_hat)
            else:
                d_others = torch.zeros_like(others)
        return dq, dk, d_others, None


def _no_autocast():
    """The kernels pick their own precisions (float32 accumulation): no autocast inside."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def nt_xent_rows(z: Tensor, others: Tensor, temperature: float) -> Tensor:
    with _no_autocast():
        return _NTXentRows.apply(z, others, temperature)


def in_batch_rows(q: Tensor, k: Tensor, others: Tensor, temperature: float) -> Tensor:
    with _no_autocast():
        return _InBatchRows.apply(q, k, others, temperature)
