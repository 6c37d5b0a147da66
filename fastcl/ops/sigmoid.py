"""The sigmoid-epilogue custom ops of the engine (``fastcl.engine``, ``epilogue="sigmoid"``:
SigLIP).

``fastcl::sigmoid_pairs(rows, cols, scale, bias, spec, pos_offset, reduce, need_grads, backend)
-> (loss, dscale, dbias, d_rows, d_cols)``
    z_ij = scale * rows_i . cols_j + bias (features as given), label t_ij = +1 for j = i +
    ``pos_offset`` (where that column exists) and -1 elsewhere, pair loss softplus(-t_ij z_ij).
    ``loss`` is each row's sum (n,), or with ``reduce`` the sum over all rows (a 0-dim
    tensor). ``dscale`` and ``dbias`` (n,) are each row's d loss_i / d scale and d loss_i / d
    bias (no gradient; saved for the backward). With ``reduce`` and ``need_grads``, ``d_rows``
    and ``d_cols`` are the gradients of the summed loss with respect to the inputs, formed in
    the forward's tile pass (Liger-Kernel's trick for its fused cross-entropy: the backward only
    multiplies them by the upstream scalar, in place in plain eager mode, so they are never
    held twice; three matrix products in all); else empty. A later backward through the same
    graph (``retain_graph=True``) recomputes them from the saved inputs.
``fastcl::sigmoid_pairs_backward(grad_loss, rows, cols, scale, bias, spec, pos_offset,
need_rows, need_cols, backend) -> (d_rows, d_cols)``
    Per-row losses (``reduce=False``): the upstream gradient weights each row, so the
    columns' gradient needs the logits again: one pass recomputes them (four products in all).

Loss and statistics are float32 (float64 for float64 inputs) whatever the inputs' dtype;
gradients come back in each input's dtype, row-major. ``scale`` and ``bias`` are 0-dim tensors
(never floats: torch.compile would specialize them): a CPU one is read as a double, one on the
device goes to the kernels as a tensor (never read on the host). Their gradients are
sum_i g_i dscale_i and sum_i g_i dbias_i, in float64.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastcl import _config, engine
from fastcl.ops._backend import dot_precision, refuse_double_backward
from fastcl.ops.contrastive import _acc_dtype, _eager_ok, _impl, _no_autocast, _scale_arg


@_no_autocast
def _sigmoid_pairs(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor, spec: str,
                   pos_offset: int, reduce: bool, need_grads: bool, backend: str = ""
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(engine.Spec.parse(spec), rows, None, backend)
    with_grads = reduce and need_grads
    loss, dscale, dbias, d_rows, d_cols = impl.sigmoid_forward(
        rows, cols, _scale_arg(scale), _scale_arg(bias), pos_offset, with_grads,
        dot_precision())
    if reduce:
        # Rows summed in float64 (n terms of up to m pairs each), returned in the loss dtype.
        loss = loss.double().sum().to(loss.dtype)
    if not with_grads:
        d_rows, d_cols = rows.new_empty(0, dtype=loss.dtype), rows.new_empty(0, dtype=loss.dtype)
    return loss, dscale, dbias, d_rows.contiguous(), d_cols.contiguous()


sigmoid_pairs = torch.library.custom_op("fastcl::sigmoid_pairs", _sigmoid_pairs,
                                        mutates_args=())


@sigmoid_pairs.register_fake
def _(rows, cols, scale, bias, spec, pos_offset, reduce, need_grads, backend=""):
    acc = _acc_dtype(rows)
    n = rows.shape[0]
    with_grads = reduce and need_grads
    return (rows.new_empty(() if reduce else (n,), dtype=acc), rows.new_empty(n, dtype=acc),
            rows.new_empty(n, dtype=acc),
            rows.new_empty(rows.shape if with_grads else (0,), dtype=acc),
            rows.new_empty(cols.shape if with_grads else (0,), dtype=acc))


@_no_autocast
def _sigmoid_pairs_backward(grad_loss: Tensor, rows: Tensor, cols: Tensor, scale: Tensor,
                            bias: Tensor, spec: str, pos_offset: int, need_rows: bool,
                            need_cols: bool, backend: str = "") -> Tuple[Tensor, Tensor]:
    impl = _impl(engine.Spec.parse(spec), rows, None, backend)
    g = grad_loss.to(_acc_dtype(rows)).contiguous()
    d_rows, d_cols = impl.sigmoid_grad(rows, cols, _scale_arg(scale), _scale_arg(bias),
                                       pos_offset, g, need_rows, need_cols, dot_precision())
    d_rows = d_rows.to(rows.dtype).contiguous() if need_rows else rows.new_empty(0)
    d_cols = d_cols.to(cols.dtype).contiguous() if need_cols else rows.new_empty(0)
    return d_rows, d_cols


sigmoid_pairs_backward = torch.library.custom_op("fastcl::sigmoid_pairs_backward",
                                                 _sigmoid_pairs_backward, mutates_args=())


@sigmoid_pairs_backward.register_fake
def _(grad_loss, rows, cols, scale, bias, spec, pos_offset, need_rows, need_cols, backend=""):
    return (rows.new_empty(rows.shape) if need_rows else rows.new_empty(0),
            cols.new_empty(cols.shape) if need_cols else rows.new_empty(0))


def _setup(ctx, inputs, output):
    rows, cols, scale, bias, spec, pos_offset, reduce, need_grads, backend = inputs
    loss, dscale, dbias, d_rows, d_cols = output
    ctx.mark_non_differentiable(dscale, dbias, d_rows, d_cols)
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.pos_offset, ctx.reduce = spec, pos_offset, reduce
    ctx.backend = backend or _config.get_backend()
    ctx.dtypes = (rows.dtype, cols.dtype)
    ctx.handed = None
    ctx.eager_reduce = bool(reduce and _eager_ok(rows, cols, d_rows, d_cols))
    if ctx.eager_reduce:
        # Plain eager mode: the forward's gradients are kept on ctx (not saved tensors, which
        # autograd version-checks), so that the first backward can scale them in place and
        # hand them over (see _scaled); the inputs are saved for any later backward through
        # the same graph (retain_graph=True, gradcheck), which recomputes.
        ctx.handed = [d_rows, d_cols]
        ctx.save_for_backward(scale, bias, dscale, dbias, rows, cols)
    elif reduce:
        ctx.save_for_backward(scale, bias, dscale, dbias, d_rows, d_cols)
    else:
        ctx.save_for_backward(scale, bias, dscale, dbias, rows, cols)


def _scaled(grad: Tensor, g: Tensor, dtype: torch.dtype, in_place: bool) -> Tensor:
    """A gradient the forward formed, times the upstream scalar g, in the input's dtype: in
    place when allowed and already in that dtype (Liger-Kernel's way with its fused
    cross-entropy: the forward's buffer becomes the returned gradient, so the step's peak holds
    the two gradients once, not twice: at N = 4096, D = 512 in float32, 16 MiB fewer)."""
    if in_place and grad.dtype == dtype:
        return grad.mul_(g)
    return (grad * g).to(dtype)


def _weighted(g: Tensor, stat: Tensor, like: Tensor) -> Tensor:
    """sum_i g_i stat_i (g a scalar or per row) in float64, as ``like`` (the scale or bias)."""
    return (g.double() * stat.double()).sum().to(like.dtype)


def _backward(ctx, grad_loss, *_unused):
    refuse_double_backward(f"fastcl.siglip_loss (op fastcl::sigmoid_pairs, spec {ctx.spec})")
    need_rows, need_cols, need_scale, need_bias = ctx.needs_input_grad[:4]
    scale, bias, dscale, dbias, a, b = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=dscale.dtype, device=dscale.device)
        if not ctx.reduce:
            grad_loss = grad_loss.expand(dscale.shape[0])
    d_rows = d_cols = None
    handed, ctx.handed = ctx.handed, None
    if need_rows or need_cols:
        if ctx.reduce and handed is not None and handed[0].numel():
            # Plain eager, first backward: the forward's gradients, scaled in place.
            g = grad_loss.to(dscale.dtype)
            in_place = _eager_ok(grad_loss)
            d_rows = _scaled(handed[0], g, ctx.dtypes[0], in_place) if need_rows else None
            d_cols = _scaled(handed[1], g, ctx.dtypes[1], in_place) if need_cols else None
        elif ctx.reduce and not ctx.eager_reduce:
            # Traced (compile, make_fx): the saved gradients, scaled out of place.
            if a.numel() == 0:
                raise RuntimeError("fastcl::sigmoid_pairs: an input requires grad but the "
                                   "forward ran with need_grads=False")
            g = grad_loss.to(a.dtype)
            d_rows = _scaled(a, g, ctx.dtypes[0], False) if need_rows else None
            d_cols = _scaled(b, g, ctx.dtypes[1], False) if need_cols else None
        else:
            # Per-row losses; or a later backward through the same graph (retain_graph=True,
            # gradcheck) after the first took the forward's gradients: recompute.
            g = grad_loss.expand(dscale.shape[0]) if ctx.reduce else grad_loss
            d_rows, d_cols = sigmoid_pairs_backward(g, a, b, scale, bias, ctx.spec,
                                                    ctx.pos_offset, bool(need_rows),
                                                    bool(need_cols), ctx.backend)
    d_scale = _weighted(grad_loss, dscale, scale) if need_scale else None
    d_bias = _weighted(grad_loss, dbias, bias) if need_bias else None
    return (d_rows if need_rows else None, d_cols if need_cols else None, d_scale, d_bias,
            None, None, None, None, None)


sigmoid_pairs.register_autograd(_backward, setup_context=_setup)


def run(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor, spec: str, pos_offset: int,
        reduce: bool, need_grads: bool, backend: str = "") -> Tensor:
    """The loss output of ``fastcl::sigmoid_pairs`` with its autograd (per-row, or the sum
    with ``reduce``)."""
    return sigmoid_pairs(rows, cols, scale, bias, spec, pos_offset, reduce, need_grads,
                         backend)[0]
