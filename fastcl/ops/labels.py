"""The label-positive custom ops of the engine (``positive="labels"``: SupCon).

``fastcl::label_rows(rows, cols, row_labels, col_labels, scale, spec, offset, need_dscale,
backend) -> (loss, lse, dscale, count)``
    Logits s_ij = scale * rhat_i . chat_j over the columns (``cols``, or the rows themselves
    for ``engine.SUPCON``, ``columns="rows"``), row i's own column i + ``offset`` excluded
    (``engine.SUPCON_ROWS``: the rows are the columns' block at ``offset``; 0 for
    ``columns="rows"``). The positives of row i are the other columns whose label equals its
    own (``row_labels`` (n,), ``col_labels`` (m,) int64; None for ``columns="rows"``). Per row:
    loss_i = lse_i - mean of its positive logits, 0 for a row without a positive (SupContrast's
    convention); lse (float64) over every column but its own; ``dscale`` (with
    ``need_dscale``) d loss_i / d scale; ``count`` the number of positives (float). All but the
    loss carry no gradient.
``fastcl::label_rows_backward(grad_loss, rows, cols, row_labels, col_labels, lse, count, scale,
spec, offset, need_rows, need_cols, backend) -> (d_rows, d_cols)``
    d loss_i / d s_ij = P_ij - [j positive] / count_i (P the row's softmax over every column
    but its own), times the upstream g_i, 0 for rows without a positive; the kernels take ga =
    g and gp = g / count. ``columns="rows"``: one pass over the tiles on and above the
    diagonal gives the whole gradient (the label mask is symmetric, as NT-Xent's logits are);
    else a rows pass and a columns pass, each without atomics.

Loss and statistics are float32 (float64 for float64 inputs) whatever the inputs' dtype;
gradients come back in each input's dtype, row-major. ``scale`` is a 0-dim tensor (never a
float: torch.compile would specialize it); its gradient is sum_i g_i dscale_i.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastcl import _config, engine
from fastcl.ops._backend import dot_precision, refuse_double_backward
from fastcl.ops.contrastive import (_acc_dtype, _empty_rows, _grad_or_zeros, _impl, _input_grad,
                                    _no_autocast, _norms, _scale_arg)


@_no_autocast
def _label_rows(rows: Tensor, cols: Optional[Tensor], row_labels: Tensor,
                col_labels: Optional[Tensor], scale: Tensor, spec: str, offset: int = 0,
                need_dscale: bool = False, backend: str = ""
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    sp = engine.Spec.parse(spec)
    impl = _impl(sp, rows, None, backend)
    a, precision = _scale_arg(scale), dot_precision()
    acc = _acc_dtype(rows)
    nr = _norms(sp, rows)
    if sp.columns == "rows":
        loss, lse, dscale, count = impl.labels_sym_forward(rows, nr, row_labels, a, precision,
                                                           need_dscale)
    else:
        loss, lse, dscale, count = impl.labels_forward(rows, cols, nr, _norms(sp, cols),
                                                       row_labels, col_labels, a, offset,
                                                       precision, need_dscale)
    return (loss.to(acc), lse.to(torch.float64), dscale.to(acc).contiguous(),
            count.to(acc))


label_rows = torch.library.custom_op("fastcl::label_rows", _label_rows, mutates_args=())


@label_rows.register_fake
def _(rows, cols, row_labels, col_labels, scale, spec, offset=0, need_dscale=False,
      backend=""):
    acc = _acc_dtype(rows)
    n = rows.shape[0]
    return (rows.new_empty(n, dtype=acc), rows.new_empty(n, dtype=torch.float64),
            rows.new_empty(n if need_dscale else 0, dtype=acc), rows.new_empty(n, dtype=acc))


def _weights(g: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    """(ga, gp) = (g, g / count), both 0 where the row has no positive (its loss is 0)."""
    has = count > 0
    zero = torch.zeros_like(g)
    return (torch.where(has, g, zero),
            torch.where(has, g / torch.where(has, count, torch.ones_like(count)), zero))


@_no_autocast
def _label_rows_backward(grad_loss: Tensor, rows: Tensor, cols: Optional[Tensor],
                         row_labels: Tensor, col_labels: Optional[Tensor], lse: Tensor,
                         count: Tensor, scale: Tensor, spec: str, offset: int, need_rows: bool,
                         need_cols: bool, backend: str = "") -> Tuple[Tensor, Tensor]:
    sp = engine.Spec.parse(spec)
    impl = _impl(sp, rows, None, backend)
    a, precision = _scale_arg(scale), dot_precision()
    acc = _acc_dtype(rows)
    ga, gp = _weights(grad_loss.to(acc).contiguous(), count.to(acc))
    lse = lse.to(torch.float64).contiguous()
    nr = _norms(sp, rows)
    d_rows, d_cols = rows.new_empty(0), rows.new_empty(0)
    if sp.columns == "rows":
        if need_rows:
            d_hat = impl.labels_sym_grad(rows, nr, row_labels, lse, ga, gp, a, precision)
            d_rows = _input_grad(sp, rows, nr, d_hat)
        return d_rows, d_cols
    nc = _norms(sp, cols)
    if need_rows:
        d_hat = impl.labels_grad(rows, cols, nr, nc, row_labels, col_labels, lse, ga, gp,
                                 None, None, None, a, offset, precision)
        d_rows = _input_grad(sp, rows, nr, d_hat)
    if need_cols:
        d_hat = impl.labels_grad(cols, rows, nc, nr, col_labels, row_labels, None, None, None,
                                 lse, ga, gp, a, offset, precision)
        d_cols = _input_grad(sp, cols, nc, d_hat)
    return d_rows, d_cols


label_rows_backward = torch.library.custom_op("fastcl::label_rows_backward",
                                              _label_rows_backward, mutates_args=())


@label_rows_backward.register_fake
def _(grad_loss, rows, cols, row_labels, col_labels, lse, count, scale, spec, offset, need_rows,
      need_cols, backend=""):
    return (_empty_rows(rows) if need_rows else rows.new_empty(0),
            _empty_rows(cols) if need_cols and cols is not None else rows.new_empty(0))


def _setup(ctx, inputs, output):
    rows, cols, row_labels, col_labels, scale, spec, offset, _need_dscale, backend = inputs
    _loss, lse, dscale, count = output
    ctx.mark_non_differentiable(lse, dscale, count)
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.offset = spec, offset
    # The backward runs on the forward's backend, whatever is in force when it runs.
    ctx.backend = backend or _config.get_backend()
    ctx.save_for_backward(rows, cols, row_labels, col_labels, lse, count, scale, dscale)


def _backward(ctx, grad_loss, _g_lse, _g_dscale, _g_count):
    refuse_double_backward(f"fastcl.supcon_loss (op fastcl::label_rows, spec {ctx.spec})")
    rows, cols, row_labels, col_labels, lse, count, scale, dscale = ctx.saved_tensors
    need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_scale = ctx.needs_input_grad[4]
    g = _grad_or_zeros(grad_loss, count)
    d_rows, d_cols = label_rows_backward(g, rows, cols, row_labels, col_labels, lse, count,
                                         scale, ctx.spec, ctx.offset, need_rows,
                                         bool(need_cols and cols is not None), ctx.backend)
    d_scale = None
    if need_scale:
        if dscale.numel() == 0:
            raise RuntimeError("fastcl::label_rows: the scale requires grad but the forward "
                               "ran with need_dscale=False")
        d_scale = (g.to(dscale.dtype) * dscale).sum().to(scale.dtype).to(scale.device)
    return (d_rows if need_rows else None, d_cols if need_cols and cols is not None else None,
            None, None, d_scale, None, None, None, None)


label_rows.register_autograd(_backward, setup_context=_setup)
