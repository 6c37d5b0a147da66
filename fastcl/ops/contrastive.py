"""The softmax-family custom ops of the engine (``fastcl.engine``): one op pair for every loss.

``fastcl::softmax_rows(rows, cols, others, key, scale, spec, need_row_grad, need_dscale)
-> (loss, lse, dscale, row_grad, probs)``
    The per-row losses l_i = lse_i - s_pos_i of the pass that ``spec`` (``Spec.code()``)
    describes, logits s_ij = scale * rhat_i . chat_j over the columns (``cols``, or the rows
    themselves when ``columns="rows"``) plus ``others`` (other ranks' rows: negatives only),
    the positive chosen by the spec (column i + n/2 of the rows, column i, or ``key[i]``).
    ``lse`` is float64 (saved for backward, no gradient). ``dscale`` (with ``need_dscale``)
    is d l_i / d scale = sum_j (p_ij - y_ij) rhat_i . chat_j, from which the scale's gradient
    is one dot product; empty otherwise. ``row_grad`` (with ``need_row_grad``, columns a
    tensor, no others) is v_i = scale * sum_j P_ij chat_j over the non-positive columns: d l_i
    / d rhat_i up to the factor g_i and the positive's term, formed in the forward tile pass
    (C++ and chunked: one product there instead of two in backward). Empty otherwise.
    ``probs`` (the dense path, below) is the (n x m) matrix of softmax weights P = exp(s - lse)
    with the positives' entries 0, flattened (n * m,), saved for the backward (no gradient).
    Empty otherwise. Its size is left open in the fake (an unbacked size under torch.compile):
    whether the dense path runs depends on the backend in force, which compiled graphs do not
    guard on.
``fastcl::softmax_rows_backward(grad_loss, rows, cols, others, key, loss, lse, scale,
row_grad, spec, need_rows, need_cols, need_others, need_key, probs=None) -> (d_rows, d_cols,
d_others, d_key)``
    The input gradients, each from its own tile pass without atomics (deterministic); one
    that is not needed (e.g. a detached queue) is not computed and comes back empty. With the
    forward's ``probs``, the columns' gradient is one product over them instead of a pass that
    recomputes every logit.

The both-directions epilogue (``epilogue="softmax_rows_cols"``, CLIP): one pass gives the row
and the column statistics (the backends' ``rows_cols_forward``), so loss, lse and dscale have
2n entries, [rows ; columns], and so does ``grad_loss``; row_grad and probs are empty. The
backward is one pass for both gradients (``rows_cols_grad``) plus the positives' term c_i =
scale (g_r_i expm1(-lr_i) + g_c_i expm1(-lc_i)) on both inputs' row i. With
``normalize=False`` (CLIP's features are used as given) the kernels get norms of ones (x / 1
== x exactly) and no normalization backward runs; such specs never take the dense path (its
backward normalizes).

The dense path (in-batch specs, ``positive="index"``, on a backend with ``dense_forward``: the
C++ kernels): when the logits fit the backend's cap (``fastcl.kernels.cpp.DENSE_CAP_BYTES``,
16 MiB: N = M = 2048 in float32), the forward materializes them, keeps P for the backward, and
forward + backward is 3 matrix products, eager's count, instead of the tiled kernels' 4. The
choice depends on the shapes and dtype alone (not on which inputs require grad), so a row's
loss is the same float in training and under ``no_grad``. Beyond the cap the tiled kernels run
and memory stays O((n + m) D).

Other ranks' rows are a second block of columns: each block runs through the backend's fused
kernels, and the row statistics merge exactly (lse = logaddexp(lse_own, lse_other); loss =
loss_own + softplus(lse_other - lse_own)). The backward reuses the kernels with the merged
lse, so each block's softmax weights are the global ones.

The per-row lse is float64 whatever the inputs' dtype: at low temperature it is ~1/tau, and
rounded to a float32 of that size (one ulp ~ 1e-3 at tau = 1e-4) it would shift every softmax
weight of the backward by up to that much; the kernels split it into a float and a remainder and
exponentiate (s - hi) - lo. Logits are recomputed in the backward by the forward's own products,
so that each is the very float the forward's lse saw.

The weight of the positive logit in the gradient is formed here from the exact loss: with the
positive in the denominator, g (exp(-loss) - 1) with ``expm1`` (eager cross-entropy's precision,
no cancellation when the positive dominates); without it (DCL), -g.

``scale`` is a 0-dim tensor, never a float: torch.compile specializes float arguments of custom
ops, which would recompile per value. A CPU scale is read as a double (no device sync); a scale
on the device goes to the kernels as a tensor (Triton loads it; it is never read on the host).
Gradients are always returned row-major (contiguous).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastcl import _config, _cpp, engine
from fastcl.ops._backend import dot_precision, implementation, refuse_double_backward

_EPS = 1e-12  # as F.normalize


def temperature_tensor(temperature) -> Tensor:
    """The 0-dim float64 CPU tensor form of a temperature that the ops take."""
    # Multiplying keeps a symbolic float symbolic under torch.compile; torch.as_tensor,
    # torch.full and torch.scalar_tensor would specialize it (a recompile per value).
    return torch.ones((), dtype=torch.float64, device="cpu") * temperature


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm(x: Tensor) -> Tensor:
    """Row norms clamped at eps, as F.normalize: float32 (float64 for float64 rows). bfloat16
    rows on the CPU, with the C++ kernels loaded: their ``row_norms``, which widens in registers
    (``vector_norm(x, dtype=float32)`` writes a float32 copy of x first: for a 65536 x 128 MoCo
    queue, a quarter of the whole loss step)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _cpp.loaded():
        return torch.ops.fastcl_cpu.row_norms(x, _EPS)
    return torch.linalg.vector_norm(x, dim=1, dtype=_acc_dtype(x)).clamp_min(_EPS)


def _normalized(x: Tensor, norm: Tensor) -> Tensor:
    # A division, as F.normalize: rounds like eager (and exactly to +-1 when D = 1).
    return x.to(norm.dtype) / norm[:, None]


def _normalize_backward(x: Tensor, norm: Tensor, grad_hat: Tensor,
                        x_hat: Optional[Tensor] = None) -> Tensor:
    """Gradient through xhat = x / max(|x|, eps), given d/d xhat (a fresh tensor: it is
    overwritten); returned in x's dtype. ``x_hat``: xhat when the caller has it."""
    if x_hat is None:
        x_hat = _normalized(x, norm)
    # Row dot products as a batched product: no (n, D) temporary.
    radial = torch.bmm(x_hat.unsqueeze(1), grad_hat.unsqueeze(2)).view(-1, 1)
    # Where the norm was clamped to eps, xhat = x / eps is linear in x: no projection.
    radial = torch.where(norm[:, None] > _EPS, radial, torch.zeros_like(radial))
    grad_hat.addcmul_(x_hat, radial, value=-1).div_(norm[:, None])
    # Row-major whatever the inputs' strides (elementwise results follow a permuted input).
    return grad_hat.to(x.dtype).contiguous()


def _norms(sp: engine.Spec, x: Tensor) -> Tensor:
    """The norms the kernels divide by: the rows' own (``_norm``), or ones when the spec uses
    its inputs as given (``normalize=False``: x / 1 == x exactly)."""
    if sp.normalize:
        return _norm(x)
    return torch.ones(x.shape[0], dtype=_acc_dtype(x), device=x.device)


def _input_grad(sp: engine.Spec, x: Tensor, norm: Tensor, grad_hat: Tensor,
                x_hat: Optional[Tensor] = None) -> Tensor:
    """d/dx from d/d xhat: through the normalization when the spec normalizes, else d/d xhat
    itself (in x's dtype, row-major)."""
    if sp.normalize:
        return _normalize_backward(x, norm, grad_hat, x_hat)
    return grad_hat.to(x.dtype).contiguous()


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
        # Entering the two contexts costs ~25 us a call: only when autocast is on.
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
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


def _scale_arg(scale: Tensor):
    """The scale as the kernels take it: a double for a CPU tensor, else the device tensor."""
    if scale.device.type == "cpu":
        return float(scale)
    return scale.detach()


def _impl(spec: engine.Spec, x: Tensor, others: Optional[Tensor], backend: str):
    impl = implementation(x, backend=backend)
    engine.require(spec, _BACKEND_NAMES.get(impl.__name__, "chunked"), others is not None)
    return impl


_BACKEND_NAMES = {"fastcl.kernels.cpp": "cpp", "fastcl.kernels.chunked": "chunked",
                  "fastcl.kernels.triton_contrastive": "triton"}


def _columns(spec: engine.Spec, rows: Tensor, nr: Tensor, cols, key):
    """(columns, their norms, explicit positive (key, norms) or None, positive column offset
    or None) of a columns="tensor" pass."""
    if spec.positive == "key":
        return cols, _norms(spec, cols), (key, _norms(spec, key)), None
    return cols, _norms(spec, cols), None, (0 if spec.positive == "index" else None)


def _use_dense(impl, sp: engine.Spec, rows: Tensor, cols: Optional[Tensor],
               others: Optional[Tensor]) -> bool:
    """Whether this pass runs the dense path (see the module docstring). Shapes only: the
    fake implementation takes the same decision."""
    # Normalizing specs only: the dense backward includes the normalization's backward, and a
    # pass whose backward then recomputed logits by the tiled products would see other floats
    # (at logits of size |x| |y| scale, one rounding moves the softmax weights visibly).
    return (sp.columns == "tensor" and sp.positive == "index" and cols is not None
            and sp.epilogue == "softmax_rows" and sp.normalize
            and (others is None or others.shape[0] == 0) and hasattr(impl, "dense_forward")
            and impl.dense_fits(rows.shape[0], cols.shape[0], _acc_dtype(rows)))


def _merge(loss, lse, dscale, lse_o, dscale_o, a, s_pos=None):
    """Row statistics of the own block merged with those of the other ranks' block.

    ``s_pos``: the positive logits computed apart, given when the positive is not in the
    denominator (DCL): a row whose own block then holds no logit of its denominator (one
    sample on this rank) has lse = loss = -inf there, and its statistics are the other
    block's alone (no host sync: selected elementwise)."""
    delta = torch.nn.functional.softplus(lse_o - lse, threshold=50.0)
    lse_t = lse + delta
    loss_t = loss + delta.to(loss.dtype)
    if dscale.numel():
        # dscale = sum over both blocks of p (d) - d_pos, with each block's weights
        # exp(lse_block - lse) and d_pos = s_pos / scale = (lse - loss) / scale.
        d_pos = ((lse - loss.double()) / a).to(dscale.dtype)
        w_own = torch.exp(lse - lse_t).to(dscale.dtype)
        w_oth = torch.exp(lse_o - lse_t).to(dscale.dtype)
        dscale = w_own * dscale + w_oth * (dscale_o - d_pos)
    if s_pos is not None:
        empty = lse == float("-inf")
        lse_t = torch.where(empty, lse_o, lse_t)
        loss_t = torch.where(empty, (lse_o - s_pos.double()).to(loss.dtype), loss_t)
        if dscale.numel():
            dscale = torch.where(empty, dscale_o - (s_pos / a).to(dscale.dtype), dscale)
    return loss_t, lse_t, dscale


def _positive_logits(sp: engine.Spec, rows, nr, cols, key, a) -> Tensor:
    """scale * rhat_i . chat_pos(i) for every row, apart from the tiles (O(n D))."""
    r_hat = _normalized(rows, nr)
    if sp.positive == "offset":
        pos_hat = r_hat.roll(-(rows.shape[0] // 2), dims=0)
    elif sp.positive == "key":
        pos_hat = _normalized(key, _norms(sp, key))
    else:
        pos_hat = _normalized(cols, _norms(sp, cols))
    return (r_hat * pos_hat).sum(dim=1) * a


@_no_autocast
def _softmax_rows(
    rows: Tensor, cols: Optional[Tensor], others: Optional[Tensor], key: Optional[Tensor],
    scale: Tensor, spec: str, need_row_grad: bool = False, need_dscale: bool = False,
    backend: str = "",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sp = engine.Spec.parse(spec)
    impl = _impl(sp, rows, others, backend)
    a, precision = _scale_arg(scale), dot_precision()
    in_denominator = sp.positive_in_denominator
    acc = _acc_dtype(rows)
    row_grad = rows.new_empty(0, dtype=acc)
    probs = rows.new_empty(0, dtype=acc)
    if sp.epilogue == "softmax_rows_cols":
        # Both directions from one pass: [rows ; columns] statistics (2n).
        nr = _norms(sp, rows)
        loss, lse, dscale = impl.rows_cols_forward(rows, cols, nr, _norms(sp, cols), a,
                                                   precision, need_dscale)
    elif _use_dense(impl, sp, rows, cols, others):
        # Empty norms: the kernel computes them in its normalization pass (the dense path
        # runs normalized specs only).
        no_norms = rows.new_empty(0, dtype=acc)
        loss, lse, dscale, row_grad, probs = impl.dense_forward(
            rows, cols, no_norms, no_norms, a, 0, in_denominator, need_dscale, need_row_grad)
        probs = probs.view(-1)  # flat: see the fake
        nr = None  # (others, below, never come with the dense path)
    elif sp.columns == "rows":
        nr = _norms(sp, rows)
        loss, lse, dscale = impl.nt_xent_forward(rows, nr, a, precision, in_denominator,
                                                 need_dscale)
    else:
        nr = _norms(sp, rows)
        c, nc, positive, pos_offset = _columns(sp, rows, nr, cols, key)
        if need_row_grad and hasattr(impl, "lse_forward_with_grad"):
            loss, lse, dscale, row_grad = impl.lse_forward_with_grad(
                rows, c, nr, nc, positive, a, pos_offset, precision, in_denominator,
                need_dscale)
        else:
            loss, lse, dscale = impl.lse_forward(rows, c, nr, nc, positive, a, pos_offset,
                                                 precision, in_denominator, need_dscale)
            if need_row_grad:  # the backward's rows pass with g = 1, run now: v is linear in g
                ones = torch.ones_like(lse, dtype=nr.dtype)
                row_grad = impl.grad_accumulate(rows, c, nr, nc, lse, ones, None, None, a,
                                                pos_offset, precision)
    loss, lse, dscale = loss.to(acc), lse.to(torch.float64), dscale.to(acc)
    if others is not None and others.shape[0] > 0:
        _, lse_o, dscale_o = impl.lse_forward(rows, others, nr, _norms(sp, others), None, a,
                                              None, precision, True, need_dscale)
        s_pos = (None if in_denominator else
                 _positive_logits(sp, rows, nr, cols, key, a))
        loss, lse, dscale = _merge(loss, lse, dscale, lse_o.to(torch.float64),
                                   dscale_o.to(nr.dtype), a, s_pos)
    return loss, lse, dscale.contiguous(), row_grad.to(acc).contiguous(), probs


softmax_rows = torch.library.custom_op("fastcl::softmax_rows", _softmax_rows, mutates_args=())


@softmax_rows.register_fake
def _(rows, cols, others, key, scale, spec, need_row_grad=False, need_dscale=False, backend=""):
    acc = _acc_dtype(rows)
    n = rows.shape[0]
    if engine.Spec.parse(spec).epilogue == "softmax_rows_cols":
        n = 2 * n  # [rows ; columns]
    # probs is flat, of a size the fake leaves open (n * m on the dense path, else 0): which
    # path runs depends on the backend in force when the op runs, which a compiled graph does
    # not guard on (a graph traced under one backend may run under another).
    size = torch.library.get_ctx().new_dynamic_size()
    return (rows.new_empty(n, dtype=acc), rows.new_empty(n, dtype=torch.float64),
            rows.new_empty(n if need_dscale else 0, dtype=acc),
            rows.new_empty(rows.shape if need_row_grad else (0,), dtype=acc),
            rows.new_empty(size, dtype=acc))


@_no_autocast
def _softmax_rows_backward(
    grad_loss: Tensor, rows: Tensor, cols: Optional[Tensor], others: Optional[Tensor],
    key: Optional[Tensor], loss: Tensor, lse: Tensor, scale: Tensor,
    row_grad: Optional[Tensor], spec: str, need_rows: bool, need_cols: bool,
    need_others: bool, need_key: bool, backend: str = "", probs: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    sp = engine.Spec.parse(spec)
    impl = _impl(sp, rows, others, backend)
    a, precision = _scale_arg(scale), dot_precision()
    acc = _acc_dtype(rows)
    g = grad_loss.to(acc).contiguous()
    lse = lse.to(torch.float64).contiguous()
    if sp.epilogue == "softmax_rows_cols":
        return _rows_cols_backward(impl, sp, g, rows, cols, _norms(sp, rows), loss, lse, a,
                                   precision, need_rows, need_cols)
    # The positive pair's weight (see the module docstring), times the scale.
    if sp.positive_in_denominator:
        c = _positive_weight(g, loss.to(acc))
    else:
        c = -g
    c = c * a
    has_others = others is not None and others.shape[0] > 0
    dense = _dense_backward_ok(impl, sp, rows, cols, has_others, row_grad, probs, need_rows,
                               need_cols)
    # The dense kernel computes the norms itself (empty ones passed).
    nr = None if dense else _norms(sp, rows)
    n_o = _norms(sp, others) if has_others else None
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    d_rows, d_cols, d_others, d_key = (rows.new_empty(0) for _ in range(4))
    if sp.columns == "rows":
        if need_rows:
            n = rows.shape[0] // 2
            d_hat = impl.nt_xent_grad(rows, nr, lse, g, a, precision)
            if has_others:
                d_hat += impl.grad_accumulate(rows, others, nr, n_o, lse, g, None, None, a,
                                              None, precision)
            # The positive pairs (i, i + N) are symmetric: both rows' weights land on each.
            z_hat = _normalized(rows, nr)
            w = (c + c.roll(n))[:, None]
            d_hat[:n].addcmul_(w[:n], z_hat[n:])
            d_hat[n:].addcmul_(w[n:], z_hat[:n])
            d_rows = _input_grad(sp, rows, nr, d_hat, z_hat)
    elif dense:
        # The dense path: both gradients from the forward's v and P, the positives' terms and
        # the normalizations' backward in one call (csrc/dense.cpp), norms computed there.
        empty = rows.new_empty(0, dtype=acc)
        p = probs.view(rows.shape[0], -1) if need_cols else empty
        d_rows, d_cols = impl.dense_backward(p, row_grad if need_rows else empty, g, c, rows,
                                             cols, empty, empty, a, need_rows, need_cols)
        if not need_rows:
            d_rows = rows.new_empty(0)
        if not need_cols:
            d_cols = rows.new_empty(0)
    else:
        have_v = row_grad is not None and row_grad.numel() > 0
        pos_offset = 0 if sp.positive == "index" else None
        # Columns are read for their own gradient, or for the rows' when the forward did not
        # form it (a MoCo queue that needs neither is not even passed in).
        read_cols = need_cols or (need_rows and not have_v)
        nc = _norms(sp, cols) if read_cols or sp.positive == "index" else None
        pos_vec, n_pos = ((key, _norms(sp, key)) if sp.positive == "key" else
                          (cols, nc) if sp.positive == "index" else (None, None))
        if need_rows:
            if have_v:
                d_hat = row_grad.to(nr.dtype) * g[:, None]
            else:
                d_hat = impl.grad_accumulate(rows, cols, nr, nc, lse, g, None, None, a,
                                             pos_offset, precision)
            if has_others:
                d_hat += impl.grad_accumulate(rows, others, nr, n_o, lse, g, None, None, a,
                                              None, precision)
            if pos_vec is not None:
                d_hat += c[:, None] * _normalized(pos_vec, n_pos)
            d_rows = _input_grad(sp, rows, nr, d_hat)
        if need_cols:
            if probs is not None and probs.numel() > 0:  # the dense path's forward weights
                dc_hat = impl.dense_grad_cols(probs.view(rows.shape[0], -1), g, rows, nr, a)
            else:
                dc_hat = impl.grad_accumulate(cols, rows, nc, nr, None, None, lse, g, a,
                                              pos_offset, precision)
            if sp.positive == "index":
                dc_hat += c[:, None] * _normalized(rows, nr)
            d_cols = _input_grad(sp, cols, nc, dc_hat)
        if need_key and sp.positive == "key":
            d_key = _input_grad(sp, key, n_pos, c[:, None] * _normalized(rows, nr))
    if need_others and has_others:
        do_hat = impl.grad_accumulate(others, rows, n_o, nr, None, None, lse, g, a, None,
                                      precision)
        d_others = _input_grad(sp, others, n_o, do_hat)
    elif need_others and others is not None:
        d_others = torch.zeros_like(others)
    return d_rows, d_cols, d_others, d_key


softmax_rows_backward = torch.library.custom_op("fastcl::softmax_rows_backward",
                                                _softmax_rows_backward, mutates_args=())


def _rows_cols_backward(impl, sp, g, rows, cols, nr, loss, lse, a, precision, need_rows,
                        need_cols):
    """The input gradients of the both-directions epilogue: the kernel's off-diagonal pass,
    then the positives' terms c_i = scale (g_r_i expm1(-lr_i) + g_c_i expm1(-lc_i)) on the
    diagonal pairs, then the normalization's backward when the spec normalizes."""
    n = rows.shape[0]
    empty = (rows.new_empty(0), rows.new_empty(0), rows.new_empty(0), rows.new_empty(0))
    if not (need_rows or need_cols):
        return empty
    nc = _norms(sp, cols)
    dx_hat, dy_hat = impl.rows_cols_grad(rows, cols, nr, nc, lse, g, a, precision)
    loss = loss.to(nr.dtype)
    c = (_positive_weight(g[:n], loss[:n]) + _positive_weight(g[n:], loss[n:])) * a
    x_hat, y_hat = _normalized(rows, nr), _normalized(cols, nc)
    d_rows, d_cols = empty[0], empty[1]
    if need_rows:
        d_rows = _input_grad(sp, rows, nr, dx_hat.addcmul_(c[:, None], y_hat), x_hat)
    if need_cols:
        d_cols = _input_grad(sp, cols, nc, dy_hat.addcmul_(c[:, None], x_hat), y_hat)
    return d_rows, d_cols, empty[2], empty[3]


def _dense_backward_ok(impl, sp, rows, cols, has_others, row_grad, probs, need_rows,
                       need_cols) -> bool:
    """Whether the backward of an in-batch pass can come from the forward's v and P alone
    (``dense_backward`` includes the normalization's backward: normalizing specs only)."""
    if not (need_rows or need_cols) or has_others or sp.positive != "index":
        return False
    if not sp.normalize or sp.epilogue != "softmax_rows":
        return False
    if not hasattr(impl, "dense_backward") or cols is None or cols.shape != rows.shape:
        return False
    have_v = row_grad is not None and row_grad.numel() > 0
    have_p = probs is not None and probs.numel() > 0
    return (have_v or not need_rows) and (have_p or not need_cols)


@softmax_rows_backward.register_fake
def _(grad_loss, rows, cols, others, key, loss, lse, scale, row_grad, spec, need_rows,
      need_cols, need_others, need_key, backend="", probs=None):
    def grad(x, need):
        return _empty_rows(x) if need and x is not None else rows.new_empty(0)

    sp = engine.Spec.parse(spec)
    return (grad(rows, need_rows), grad(cols, need_cols and sp.columns == "tensor"),
            grad(others, need_others), grad(key, need_key and sp.positive == "key"))


def _setup(ctx, inputs, output):
    rows, cols, others, key, scale, spec, _need_v, _need_dscale, backend = inputs
    loss, lse, dscale, row_grad, probs = output
    ctx.mark_non_differentiable(lse, dscale, row_grad, probs)
    # No zero-filled gradients for the outputs nobody differentiates: autograd would otherwise
    # allocate and fill one per output each backward (4 MiB for the dense path's probs at
    # N = 1024). grad_loss may then come as None (handled in _backward).
    ctx.set_materialize_grads(False)
    ctx.spec = spec
    # The backward runs on the forward's backend, whatever is in force when it runs.
    ctx.backend = backend or _config.get_backend()
    ctx.has_cols = cols is not None
    sp = engine.Spec.parse(spec)
    # The backward reads a key-mode pass's columns only for their own gradient, or for the
    # rows' when the forward did not form it. Otherwise no reference is kept: a MoCo queue may
    # be pushed in place between the loss and its backward without tripping autograd's
    # version check.
    keep = cols is not None and (
        sp.positive != "key" or cols.requires_grad or (rows.requires_grad and
                                                       row_grad.numel() == 0))
    # The dense path's weights serve the columns' gradient only. (No test of probs' size here:
    # it is data-dependent under torch.compile; an empty one costs nothing.)
    keep_probs = cols is not None and cols.requires_grad
    ctx.save_for_backward(rows, cols if keep else None, others, key, loss, lse, scale,
                          row_grad, dscale, probs if keep_probs else None)


_NAMES = {engine.NT_XENT: "fastcl.nt_xent", engine.DCL: "fastcl.dcl_loss",
          engine.CLIP: "fastcl.clip_loss", engine.CLIP_ROWS: "fastcl.clip_loss"}


def _backward(ctx, grad_loss, _g_lse, _g_dscale, _g_row_grad, _g_probs):
    sp = engine.Spec.parse(ctx.spec)
    refuse_double_backward(f"{_NAMES.get(sp, 'fastcl.info_nce')} (op fastcl::softmax_rows, "
                           f"spec {ctx.spec})")
    rows, cols, others, key, loss, lse, scale, row_grad, dscale, probs = ctx.saved_tensors
    need_rows, need_cols, need_others, need_key, need_scale = ctx.needs_input_grad[:5]
    need_cols = bool(need_cols and ctx.has_cols)
    if ctx.has_cols and cols is None:  # not kept: its rows are not read
        cols = rows.new_empty((0, rows.shape[1]))
    g = _grad_or_zeros(grad_loss, loss)
    backward_op = _softmax_rows_backward if getattr(ctx, "eager", False) else softmax_rows_backward
    d_rows, d_cols, d_others, d_key = backward_op(
        g, rows, cols, others, key, loss, lse, scale, row_grad, ctx.spec, need_rows,
        need_cols, bool(need_others and others is not None),
        bool(need_key and key is not None), ctx.backend, probs)
    d_scale = None
    if need_scale:
        if dscale.numel() == 0:
            raise RuntimeError("fastcl::softmax_rows: the scale requires grad but the forward "
                               "ran with need_dscale=False")
        d_scale = (g.to(dscale.dtype) * dscale).sum().to(scale.dtype).to(scale.device)
    return (d_rows if need_rows else None, d_cols if need_cols else None,
            d_others if need_others and others is not None else None,
            d_key if need_key and key is not None else None, d_scale, None, None, None, None)


softmax_rows.register_autograd(_backward, setup_context=_setup)


class _EagerSoftmaxRows(torch.autograd.Function):
    """Eager mode's entry to the op pair: the very implementation, setup and backward that the
    custom op registers, called without torch.library's per-call argument handling (its
    Python autograd wrapper fills in the schema's defaults, redispatches and wraps twice: ~55
    us a step of a ~6.5 ms in-batch InfoNCE at N = 1024 on the CPU). :func:`run` picks it
    only for plain tensors outside torch.compile, functorch transforms and dispatch or
    torch-function modes; everything else goes through the custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _softmax_rows(*inputs)
        _setup(ctx, inputs, out)
        ctx.eager = True
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _plain(t: Optional[Tensor]) -> bool:
    return t is None or (type(t) is Tensor and t.device.type in ("cpu", "cuda"))


def _eager_ok(*tensors) -> bool:
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return (not torch.compiler.is_compiling() and functorch_active is not None
            and not functorch_active() and _get_current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled()
            and all(_plain(t) for t in tensors))


def run(rows: Tensor, cols: Optional[Tensor], others: Optional[Tensor], key: Optional[Tensor],
        scale: Tensor, spec: str, need_row_grad: bool = False, need_dscale: bool = False,
        backend: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fastcl::softmax_rows`` with its autograd: the custom op, or, in plain eager mode, the
    same implementation through :class:`_EagerSoftmaxRows` (same numbers, less overhead)."""
    args = (rows, cols, others, key, scale, spec, need_row_grad, need_dscale, backend)
    if _eager_ok(rows, cols, others, key, scale):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (rows, cols, others, key, scale)):
            return _EagerSoftmaxRows.apply(*args)
        return _softmax_rows(*args)
    return softmax_rows(*args)


# ------------------------------------------------------- today's losses as rows of choices ----


def nt_xent(z: Tensor, temperature: Tensor) -> Tuple[Tensor, Tensor]:
    """(loss, lse) of NT-Xent over z = cat([z1, z2]) (temperature: a 0-dim tensor)."""
    out = softmax_rows(z, None, None, None, 1.0 / temperature, engine.NT_XENT.code())
    return out[0], out[1]


def info_nce(q: Tensor, k: Tensor, negatives: Optional[Tensor], temperature: Tensor,
             need_q: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, row_grad) of InfoNCE: in-batch (negatives None) or against shared
    negatives with k the explicit positive key (temperature: a 0-dim tensor)."""
    if negatives is None:
        out = softmax_rows(q, k, None, None, 1.0 / temperature, engine.IN_BATCH.code(), need_q)
    else:
        out = softmax_rows(q, negatives, None, k, 1.0 / temperature, engine.QUEUE.code(),
                           need_q)
    return out[0], out[1], out[3]
