"""Custom ops for the similarity + log-softmax family ("fastcl::...").

Each op returns the per-row loss and the per-row logsumexp (saved for backward; it carries no
gradient). Row i's loss is -log softmax of its positive logit:

``fastcl::nt_xent(z, temperature) -> (loss, lse)``
    z (2N, D) raw rows = cat([z1, z2]); logits (zhat_i . zhat_j) / tau over j != i; the positive
    of row i is row (i + N) mod 2N. The (2N)^2 matrix is never stored.
``fastcl::nt_xent_backward(grad_loss, z, loss, lse, temperature) -> dz``
    The symmetric form: one pass over tiles gives (G + G^T) zhat / tau.
``fastcl::info_nce(q, k, negatives, temperature, need_q=False) -> (loss, lse, q_rows)``
    negatives None: logits qhat_i . khat_j over all j, positive j = i (in-batch, one-directional).
    negatives (M, D): logits [qhat_i . khat_i, qhat_i . neghat_j], positive first (shared
    negatives, e.g. a MoCo queue); no (N, M) matrix is stored. With ``need_q``, ``q_rows`` is
    v_i = (1/tau) sum_j P_ij khat_j over the non-positive columns: d loss_i / d qhat_i up to the
    factor g_i and the positive's term, computed during the forward tile pass (C++ and chunked
    backends: one extra product there instead of two in backward) so that the backward needs no
    pass over the logits for dq. Empty without ``need_q``.
``fastcl::info_nce_backward(grad_loss, q, k, negatives, loss, lse, temperature, need_q, need_k, need_neg, q_rows=None) -> (dq, dk, dneg)``
    dq from ``q_rows`` when given, else from row tiles; dk (or dneg) from column tiles; each
    without atomics (deterministic). A gradient that is not needed (e.g. a detached queue) is
    not computed and comes back empty.

The per-row lse is float64 whatever the inputs' dtype: at low temperature it is ~1/tau, and
rounded to a float32 of that size (one ulp ~ 1e-3 at tau = 1e-4) it would shift every softmax
weight of the backward by up to that much; the kernels split it into a float and a remainder and
exponentiate (s - hi) - lo. Logits are recomputed in the backward by the forward's own products,
so that each is the very float the forward's lse saw.

The weight of the positive logit in the gradient, exp(-loss) - 1, is formed here with
``expm1`` from the exact per-row loss rather than in the tiles: eager cross-entropy's precision,
with no cancellation when the positive dominates (small loss, low temperature).

``temperature`` is a 0-dim float64 CPU tensor (see :func:`temperature_tensor`), not a float:
torch.compile specializes float arguments of custom ops, which would recompile per value.
Reading it costs no device sync. Gradients are always returned row-major (contiguous).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastcl.ops._backend import dot_precision, implementation, refuse_double_backward

_EPS = 1e-12  # as F.normalize


def temperature_tensor(temperature) -> Tensor:
    """The 0-dim float64 CPU tensor form of a temperature that the ops take."""
    # Multiplying keeps a symbolic float symbolic under torch.compile; torch.as_tensor,
    # torch.full and torch.scalar_tensor would specialize it (a recompile per value).
    return torch.ones((), dtype=torch.float64, device="cpu") * temperature


def _inv_temp(temperature: Tensor) -> float:
    return 1.0 / float(temperature)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm(x: Tensor) -> Tensor:
    """Row norms clamped at eps, as F.normalize: float32 (float64 for float64 rows)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=_acc_dtype(x)).clamp_min(_EPS)


def _normalized(x: Tensor, norm: Tensor) -> Tensor:
    # A division, as F.normalize: rounds like eager (and exactly to +-1 when D = 1).
    return x.to(norm.dtype) / norm[:, None]


def _normalize_backward(x: Tensor, norm: Tensor, grad_hat: Tensor) -> Tensor:
    """Gradient through xhat = x / max(|x|, eps), given d/d xhat; returned in x's dtype."""
    x_hat = _normalized(x, norm)
    radial = (x_hat * grad_hat).sum(dim=1, keepdim=True)
    # Where the norm was clamped to eps, xhat = x / eps is linear in x: no projection.
    radial = torch.where(norm[:, None] > _EPS, radial, torch.zeros_like(radial))
    return ((grad_hat - x_hat * radial) / norm[:, None]).to(x.dtype).contiguous()


def _rows_like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return x.new_empty(x.shape[0], dtype=dtype or _acc_dtype(x))


def _lse_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], dtype=torch.float64)


def _empty_rows(x: Tensor) -> Tensor:
    """Fake output: a contiguous tensor shaped like x (the real gradients are row-major)."""
    return x.new_empty(x.shape)


def _no_autocast(fn):
    """Run an op's implementation with autocast off: it picks its own precisions (float32
    accumulation), and an autocast region around the call must not turn its products bf16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _positive_weight(grad_loss: Tensor, loss: Tensor) -> Tensor:
    """d(sum g * loss) / d s_pos = g (exp(-loss) - 1), without cancellation."""
    return grad_loss * torch.expm1(-loss)


def _grad_or_zeros(grad_loss: Optional[Tensor], like: Tensor) -> Tensor:
    if grad_loss is None:
        return torch.zeros_like(like)
    return grad_loss.to(like.dtype).contiguous()


# ---------------------------------------------------------------- NT-Xent (symmetric) ----


@torch.library.custom_op("fastcl::nt_xent", mutates_args=())
@_no_autocast
def nt_xent(z: Tensor, temperature: Tensor) -> Tuple[Tensor, Tensor]:
    nz = _norm(z)
    # [:2]: kernel contract v2 backends also return dscale (empty unless requested).
    loss, lse = implementation(z).nt_xent_forward(z, nz, _inv_temp(temperature),
                                                  dot_precision())[:2]
    return loss.to(nz.dtype), lse.to(torch.float64)


@nt_xent.register_fake
def _(z: Tensor, temperature: Tensor) -> Tuple[Tensor, Tensor]:
    return _rows_like(z), _lse_like(z)


@torch.library.custom_op("fastcl::nt_xent_backward", mutates_args=())
@_no_autocast
def nt_xent_backward(
    grad_loss: Tensor, z: Tensor, loss: Tensor, lse: Tensor, temperature: Tensor
) -> Tensor:
    nz = _norm(z)
    inv_temp = _inv_temp(temperature)
    n = z.shape[0] // 2
    g = grad_loss.to(nz.dtype).contiguous()
    lse = lse.to(torch.float64).contiguous()
    d_hat = implementation(z).nt_xent_grad(z, nz, lse, g, inv_temp, dot_precision())
    # The positive pairs (i, i + N) are symmetric: both rows' weights land on each of them.
    c = _positive_weight(g, loss.to(nz.dtype))
    d_hat += ((c + c.roll(n)) * inv_temp)[:, None] * _normalized(z, nz).roll(n, dims=0)
    return _normalize_backward(z, nz, d_hat)


@nt_xent_backward.register_fake
def _(grad_loss, z, loss, lse, temperature):
    return _empty_rows(z)


def _nt_xent_setup(ctx, inputs, output):
    z, temperature = inputs
    loss, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(z, loss, lse, temperature)


def _nt_xent_backward(ctx, grad_loss, _grad_lse):
    refuse_double_backward("fastcl.nt_xent (op fastcl::nt_xent)")
    z, loss, lse, temperature = ctx.saved_tensors
    return nt_xent_backward(_grad_or_zeros(grad_loss, loss), z, loss, lse, temperature), None


nt_xent.register_autograd(_nt_xent_backward, setup_context=_nt_xent_setup)


# ------------------------------------------------------------------------- InfoNCE -------


@torch.library.custom_op("fastcl::info_nce", mutates_args=())
@_no_autocast
def info_nce(
    q: Tensor, k: Tensor, negatives: Optional[Tensor], temperature: Tensor, need_q: bool = False
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = implementation(q)
    inv_temp = _inv_temp(temperature)
    precision = dot_precision()
    nq, nk = _norm(q), _norm(k)
    if negatives is None:
        cols, n_cols, positive, pos_offset = k, nk, None, 0
    else:
        cols, n_cols, positive, pos_offset = negatives, _norm(negatives), (k, nk), None
    q_rows = q.new_empty(0, dtype=nq.dtype)
    if need_q and hasattr(impl, "lse_forward_with_grad"):
        # (loss, lse, v), or (loss, lse, dscale, v) from contract v2 backends
        loss, lse, *_, q_rows = impl.lse_forward_with_grad(
            q, cols, nq, n_cols, positive, inv_temp, pos_offset, precision
        )
    else:
        loss, lse = impl.lse_forward(q, cols, nq, n_cols, positive, inv_temp, pos_offset,
                                     precision)[:2]
        if need_q:  # the backward's dq pass with g = 1, run now: v is linear in g
            ones = torch.ones_like(lse, dtype=nq.dtype)
            q_rows = impl.grad_accumulate(q, cols, nq, n_cols, lse, ones, None, None,
                                          inv_temp, pos_offset, precision)
    return loss.to(nq.dtype), lse.to(torch.float64), q_rows.to(nq.dtype).contiguous()


@info_nce.register_fake
def _(q, k, negatives, temperature, need_q=False):
    acc = _acc_dtype(q)
    q_rows = q.new_empty(q.shape, dtype=acc) if need_q else q.new_empty(0, dtype=acc)
    return _rows_like(q), _lse_like(q), q_rows


@torch.library.custom_op("fastcl::info_nce_backward", mutates_args=())
@_no_autocast
def info_nce_backward(
    grad_loss: Tensor,
    q: Tensor,
    k: Tensor,
    negatives: Optional[Tensor],
    loss: Tensor,
    lse: Tensor,
    temperature: Tensor,
    need_q: bool,
    need_k: bool,
    need_neg: bool,
    q_rows: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = implementation(q)
    inv_temp = _inv_temp(temperature)
    precision = dot_precision()
    nq, nk = _norm(q), _norm(k)
    g = grad_loss.to(nq.dtype).contiguous()
    lse = lse.to(torch.float64).contiguous()
    c = (_positive_weight(g, loss.to(nq.dtype)) * inv_temp)[:, None]
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    dq, dk, dneg = q.new_empty(0), q.new_empty(0), q.new_empty(0)
    have_rows = q_rows is not None and q_rows.numel() > 0
    if negatives is None:
        # Columns are the keys; the positive of row i is column i.
        if need_q:
            if have_rows:
                dq_hat = q_rows.to(nq.dtype) * g[:, None]
            else:
                dq_hat = impl.grad_accumulate(q, k, nq, nk, lse, g, None, None, inv_temp, 0,
                                              precision)
            dq = _normalize_backward(q, nq, dq_hat.add_(c * _normalized(k, nk)))
        if need_k:
            dk_hat = impl.grad_accumulate(k, q, nk, nq, None, None, lse, g, inv_temp, 0,
                                          precision)
            dk = _normalize_backward(k, nk, dk_hat.add_(c * _normalized(q, nq)))
        return dq, dk, dneg
    n_neg = _norm(negatives) if (need_neg or (need_q and not have_rows)) else None
    if need_q:
        if have_rows:
            dq_hat = q_rows.to(nq.dtype) * g[:, None]
        else:
            dq_hat = impl.grad_accumulate(q, negatives, nq, n_neg, lse, g, None, None, inv_temp,
                                          None, precision)
        dq = _normalize_backward(q, nq, dq_hat.add_(c * _normalized(k, nk)))
    if need_k:
        dk = _normalize_backward(k, nk, c * _normalized(q, nq))
    if need_neg:
        dn_hat = impl.grad_accumulate(negatives, q, n_neg, nq, None, None, lse, g, inv_temp, None,
                                      precision)
        dneg = _normalize_backward(negatives, n_neg, dn_hat)
    return dq, dk, dneg


@info_nce_backward.register_fake
def _(grad_loss, q, k, negatives, loss, lse, temperature, need_q, need_k, need_neg, q_rows=None):
    return (
        _empty_rows(q) if need_q else q.new_empty(0),
        _empty_rows(k) if need_k else q.new_empty(0),
        _empty_rows(negatives) if (need_neg and negatives is not None) else q.new_empty(0),
    )


def _info_nce_setup(ctx, inputs, output):
    q, k, negatives, temperature, _need_q = inputs
    loss, lse, q_rows = output
    ctx.mark_non_differentiable(lse, q_rows)
    ctx.has_negatives = negatives is not None
    # The backward reads the negatives only for their own gradient, or for dq when the forward
    # did not form it. Otherwise no reference is kept: a MoCo queue may be pushed in place
    # between the loss and its backward without tripping autograd's version check.
    keep = negatives is not None and (
        negatives.requires_grad or (q.requires_grad and q_rows.numel() == 0)
    )
    ctx.save_for_backward(q, k, negatives if keep else None, loss, lse, temperature, q_rows)


def _info_nce_backward(ctx, grad_loss, _grad_lse, _grad_q_rows):
    refuse_double_backward("fastcl.info_nce (op fastcl::info_nce)")
    q, k, negatives, loss, lse, temperature, q_rows = ctx.saved_tensors
    need_q, need_k, need_neg = ctx.needs_input_grad[:3]
    need_neg = bool(need_neg and ctx.has_negatives)
    if ctx.has_negatives and negatives is None:  # not kept: its rows are not read
        negatives = q.new_empty((0, q.shape[1]))
    dq, dk, dneg = info_nce_backward(
        _grad_or_zeros(grad_loss, loss), q, k, negatives, loss, lse, temperature,
        need_q, need_k, need_neg, q_rows,
    )
    return ((dq if need_q else None), (dk if need_k else None), (dneg if need_neg else None),
            None, None)


info_nce.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)
