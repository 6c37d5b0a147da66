"""Triton kernels of the SigLIP sigmoid epilogue (``sigmoid_forward`` / ``sigmoid_grad`` of the
kernel contract), and their launchers. ``triton_contrastive`` imports this module at its end
and re-exports both launchers; this module imports that one's helpers after its own launchers
are defined, so either may be imported first. Import it only after ``TRITON_INTERPRET`` has
its final value, as ``triton_contrastive``.

Math (x (n, D), y (m, D) used as given): z_ij = scale * (x_i . y_j) + bias, label t_ij = +1 at
j == i + pos_offset (0 <= j < m), else -1 (no positive at all with pos_offset None);
l_ij = softplus(-t_ij z_ij), w_ij = d l_ij / d z_ij = -t_ij sigmoid(-t_ij z_ij).
With u = -t z and e = exp(-|u|) (the one exponential of the pair, never overflowing):
    softplus(u) = max(u, 0) + log1p(e),   sigmoid(u) = 1 / (1 + e) for u >= 0, e / (1 + e) else,
so the positive's weight is -sigmoid(-z) directly (never sigmoid(z) - 1: no cancellation), and
|z| = 100 and beyond is finite. Triton has no portable log1p (libdevice's is CUDA-only and the
interpreter's libdevice coverage varies between versions), so log1p(e) is Goldberg's form
log(1 + e) * e / ((1 + e) - 1) (e where 1 + e rounds to 1): a few ulps, as the C library's.

One kernel, ``_sig_kernel``, serves every pass. Grid (row blocks of A, column splits of B):
program (i, s) owns BLOCK_M rows of A and the columns [s * cols_per_split, ...) of B, walks them
in BLOCK_N tiles and forms each logit tile once over all of D (resident row tile, or D chunks:
``d_tiling``, the contrastive kernels' tiling). Per tile, in float32:
- WITH_STATS (the rows pass): each row's sums of l, w * (x . y) (the raw dot: d loss / d scale)
  and w (d loss / d bias), added to float64 running sums per row (so a long row loses nothing
  to float32 accumulation across tiles). One split: the program writes loss, dscale, dbias
  (float32) itself; several: float64 partials, summed in split order by ``_sig_combine_kernel``
  (a fixed order: deterministic, no atomics).
- WITH_GRAD: OUT[s, a, :] += (scale * w [* g]) @ B_tile, the second product (as ``_grad_kernel``
  in triton_contrastive: a resident BLOCK_M x D accumulator, or the program's own output rows in
  global memory, read-add-write per D chunk). Several splits: partial rows (capped at
  ``PARTIAL_BYTES``) summed in split order by ``_sum_splits_kernel``.
The columns' gradient dy is the same kernel with the roles swapped (A = y, B = x, the positive
of row j at column j - pos_offset, the weights g on the B side): a second pass that recomputes
the logits, column blocks x row splits. A one-pass form (dy from the rows pass's tiles) would
need, without atomics, a partial dy per row block summed in a fixed order: (row blocks x m x D)
float32, O(n m D / BLOCK_M) memory. So:
    sigmoid_forward, with_grads: rows pass (stats + dx) + columns pass (dy): 3 products + 1
        recomputed (4 in all; eager autograd: 3) -- the price of no atomics and O((n + m) D).
    sigmoid_forward, stats only: 1 product.
    sigmoid_grad: rows pass (dx) + columns pass (dy), each recomputing its logits: 4 products.

Tiles and configs follow the contrastive kernels' backward (imported, not copied): every pass
takes ``grad_meta``'s D tiling (so the forward and ``sigmoid_grad`` form the same logits) and
the first config ``prune_configs(..., "grad", ...)`` keeps for its (D, dtype, precision):
64 x 64 tiles, 8 warps, depth 2 (1 for bf16/fp16 at D > 128, where deeper pipelines spilled
in the backward). One config, not a tuned depth: the stats-only pass at the forward's configs
spilled 8 B on sm_80 (bf16, D = 256, depth 2) and sm_89 (TF32, D = 128, depth 3), and every
depth kept would add its compiles to the AOT check (a CI-time budget); with one config the
autotuner (keyed on D and the code path) never benchmarks: no host syncs on a first call.
A GPU run may measure deeper pipelines (``SIG_CONFIGS``). Under the interpreter the tiles are
``INTERPRETER_TILES`` (32 x 32).

scale and bias are each a Python float or a 0-dim tensor on the inputs' device, loaded in the
kernel (``_scale_args`` / ``_load_scale``): no host sync; both forms give the same bits (each
rounded to float32 once). Offsets that multiply a row index by a stride are int64. Launches run
under the inputs' device (``_on_device``).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import triton
import triton.language as tl


SIG_COMBINE_BLOCK = 128


@triton.jit
def _sig_pair(z, is_pos):
    """(l, w) of the pairs: l = softplus(-t z), w = -t sigmoid(-t z), t = +1 where is_pos."""
    u = tl.where(is_pos, -z, z)
    e = tl.exp(-tl.abs(u))
    one_e = 1.0 + e
    # log1p(e) (Goldberg): log(1 + e) corrected by the exact ratio e / ((1 + e) - 1); e itself
    # where 1 + e rounds to 1 (the other branch's denominator made nonzero there: no inf/NaN).
    one_e_m1 = one_e - 1.0
    ratio = e / tl.where(one_e == 1.0, 1.0, one_e_m1)
    log1p_e = tl.where(one_e == 1.0, e, tl.log(one_e) * ratio)
    loss = tl.maximum(u, 0.0) + log1p_e
    r = 1.0 / one_e
    sig_u = tl.where(u >= 0.0, r, e * r)
    w = tl.where(is_pos, -sig_u, sig_u)
    return loss, w


@triton.jit
def _sig_kernel(
    A, B, SCALE, BIAS, G, PART, LOSS, DSCALE, DBIAS, OUT,
    n_a, n_b, d, pos_off, cols_per_split, n_splits,
    stride_am, stride_ad, stride_bm, stride_bd, stride_om,
    scale_val, bias_val,
    SCALE_PTR: tl.constexpr,
    BIAS_PTR: tl.constexpr,
    HAS_POS: tl.constexpr,
    WITH_STATS: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    G_ROWS: tl.constexpr,
    G_COLS: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    CAST_W: tl.constexpr,
    RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SUM_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z_ab = scale * (A_a . B_b) + bias, positive at b == a + pos_off (HAS_POS), over the
    columns of split s = program_id(1). WITH_STATS: the rows' sums of l, w (A_a . B_b) and w
    into LOSS / DSCALE / DBIAS (ONE_SPLIT, float32) or PART (float64 planes loss, dscale, dbias
    of n_splits x n_a each). WITH_GRAD: OUT[s] = scale * (w * g) @ B over the split's columns
    (g = G[a] with G_ROWS, G[b] with G_COLS, else 1)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(n_b, col_start + cols_per_split)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_a
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    _s, scale = _load_scale(SCALE, scale_val, SCALE_PTR, False)
    _b, bias = _load_scale(BIAS, bias_val, BIAS_PTR, False)
    if HAS_POS:
        pos_col = rows + pos_off  # may fall outside [0, n_b): then no column matches
    if WITH_STATS:
        sum_l = tl.zeros([BLOCK_M], tl.float64)
        sum_ds = tl.zeros([BLOCK_M], tl.float64)
        sum_db = tl.zeros([BLOCK_M], tl.float64)
    if WITH_GRAD:
        OUT = OUT + tl.full([], pid_s, tl.int64) * n_a * stride_om  # this split's rows
        wscale = tl.zeros([BLOCK_M], tl.float32) + scale
        if G_ROWS:
            wscale = wscale * tl.load(G + rows, mask=row_ok, other=0.0)
    if RESIDENT:
        a_tile = _load_rows(A, rows64, row_ok, offs_d, d, stride_am, stride_ad, 1.0, False)
        if WITH_GRAD:
            out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    elif WITH_GRAD:
        # This program's output rows accumulate in OUT itself: zero them first.
        for start_d in range(0, d, BLOCK_D):
            dd = start_d + offs_d
            tl.store(OUT + rows64[:, None] * stride_om + dd[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                     mask=row_ok[:, None] & (dd[None, :] < d))
        tl.debug_barrier()

    for start_n in range(col_start, col_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < col_end
        cols64 = cols.to(tl.int64)
        if RESIDENT:
            b_tile = _load_rows(B, cols64, col_ok, offs_d, d, stride_bm, stride_bd, 1.0, False)
            dot = _ldot(a_tile, b_tile, tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                        PRECISION, UPCAST, SUM_DOT)
        else:
            dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for start_d in range(0, d, BLOCK_D):
                dd = start_d + offs_d
                a_part = _load_rows(A, rows64, row_ok, dd, d, stride_am, stride_ad, 1.0, False)
                b_part = _load_rows(B, cols64, col_ok, dd, d, stride_bm, stride_bd, 1.0, False)
                dot = _ldot(a_part, b_part, dot, PRECISION, UPCAST, SUM_DOT)
        z = dot * scale + bias
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_POS:
            is_pos = cols[None, :] == pos_col[:, None]
        else:
            is_pos = tl.zeros([BLOCK_M, BLOCK_N], tl.int1)
        loss, w = _sig_pair(z, is_pos)
        w = tl.where(valid, w, 0.0)
        if WITH_STATS:
            sum_l += tl.sum(tl.where(valid, loss, 0.0), 1).to(tl.float64)
            sum_ds += tl.sum(w * dot, 1).to(tl.float64)
            sum_db += tl.sum(w, 1).to(tl.float64)
        if WITH_GRAD:
            wg = w * wscale[:, None]
            if G_COLS:
                wg = wg * tl.load(G + cols, mask=col_ok, other=0.0)[None, :]
            if RESIDENT:  # the tile loaded for the logits serves the second product too
                out = _wdot(wg, b_tile, out, CAST_W, PRECISION, UPCAST)
            else:
                for start_d in range(0, d, BLOCK_D):
                    dd = start_d + offs_d
                    b_part = _load_rows(B, cols64, col_ok, dd, d, stride_bm, stride_bd, 1.0,
                                        False)
                    o_ptr = OUT + rows64[:, None] * stride_om + dd[None, :]
                    o_mask = row_ok[:, None] & (dd[None, :] < d)
                    o = tl.load(o_ptr, mask=o_mask, other=0.0)
                    tl.store(o_ptr, _wdot(wg, b_part, o, CAST_W, PRECISION, UPCAST),
                             mask=o_mask)
                tl.debug_barrier()  # the next tile reads what this one wrote

    if WITH_STATS:
        if ONE_SPLIT:
            tl.store(LOSS + rows, sum_l.to(tl.float32), mask=row_ok)
            tl.store(DSCALE + rows, sum_ds.to(tl.float32), mask=row_ok)
            tl.store(DBIAS + rows, sum_db.to(tl.float32), mask=row_ok)
        else:
            plane = tl.full([], n_splits, tl.int64) * n_a
            off = tl.full([], pid_s, tl.int64) * n_a + rows64
            tl.store(PART + off, sum_l, mask=row_ok)
            tl.store(PART + plane + off, sum_ds, mask=row_ok)
            tl.store(PART + 2 * plane + off, sum_db, mask=row_ok)
    if WITH_GRAD:
        if RESIDENT:
            tl.store(OUT + rows64[:, None] * stride_om + offs_d[None, :], out,
                     mask=row_ok[:, None] & (offs_d[None, :] < d))


@triton.jit
def _sig_combine_kernel(PART, LOSS, DSCALE, DBIAS, n, n_splits, BLOCK: tl.constexpr):
    """Each row's float64 partial sums (planes loss, dscale, dbias of n_splits x n) added in
    split order (deterministic), written as float32."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    rows64 = rows.to(tl.int64)
    plane = tl.full([], n_splits, tl.int64) * n
    sum_l = tl.zeros([BLOCK], tl.float64)
    sum_ds = tl.zeros([BLOCK], tl.float64)
    sum_db = tl.zeros([BLOCK], tl.float64)
    for sp in range(0, n_splits):
        off = tl.full([], sp, tl.int64) * n + rows64
        sum_l += tl.load(PART + off, mask=ok, other=0.0)
        sum_ds += tl.load(PART + plane + off, mask=ok, other=0.0)
        sum_db += tl.load(PART + 2 * plane + off, mask=ok, other=0.0)
    tl.store(LOSS + rows, sum_l.to(tl.float32), mask=ok)
    tl.store(DSCALE + rows, sum_ds.to(tl.float32), mask=ok)
    tl.store(DBIAS + rows, sum_db.to(tl.float32), mask=ok)


# ------------------------------------------------------------------------- launchers ----


def _check(x, y):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (n, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature size D, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.dtype not in _PTR:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 rows, got "
                        f"{x.dtype}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device}, y on {y.device}")


def _launch(a, b, scale, bias, pos_off: Optional[int], g, g_rows: bool, stats, grad: bool,
            precision: str):
    """One pass of ``_sig_kernel`` over a's rows against b's columns, plus its split combine.
    ``stats``: (loss, dscale, dbias) float32 (n_a,) to fill, or None. Returns the gradient
    rows (n_a, D) float32 when ``grad``, else None."""
    n_a, d = a.shape
    n_b = b.shape[0]
    dev = a.device
    on_cuda = a.is_cuda
    dummy = stats[0] if stats is not None else torch.empty(1, dtype=torch.float32, device=dev)
    scale_t, scale_val, scale_ptr = _scale_args(scale, dev, dummy)
    bias_t, bias_val, bias_ptr = _scale_args(bias, dev, dummy)
    max_splits = max(1, PARTIAL_BYTES // (4 * n_a * max(d, 1))) if grad else None
    n_splits, cps = split_plan(n_a, n_b, dev, max_splits=max_splits)
    meta = sig_meta(a.dtype, d, on_cuda, precision, has_pos=pos_off is not None,
                    with_stats=stats is not None, with_grad=grad,
                    g_rows=g is not None and g_rows, g_cols=g is not None and not g_rows,
                    one_split=n_splits == 1, scale_ptr=scale_ptr, bias_ptr=bias_ptr)
    out = torch.empty(n_a, d, dtype=torch.float32, device=dev) if grad else None
    part_grad = (torch.empty(n_splits, n_a, d, dtype=torch.float32, device=dev)
                 if grad and n_splits > 1 else out)
    part_stats = (torch.empty(3 * n_splits * n_a, dtype=torch.float64, device=dev)
                  if stats is not None and n_splits > 1 else None)
    loss, dscale, dbias = stats if stats is not None else (dummy, dummy, dummy)
    args = (a, b, scale_t, bias_t, g if g is not None else dummy,
            part_stats if part_stats is not None else dummy, loss, dscale, dbias,
            part_grad if part_grad is not None else dummy,
            n_a, n_b, d, pos_off or 0, cps, n_splits,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), d,
            scale_val, bias_val)
    with _on_device(a):
        if on_cuda:
            grid = lambda META: (triton.cdiv(n_a, META["BLOCK_M"]), n_splits)  # noqa: E731
            _sig_tuned[grid](*args, **meta)
        else:
            _sig_kernel[(triton.cdiv(n_a, meta["BLOCK_M"]), n_splits)](*args, **meta)
        if part_stats is not None:
            block = SIG_COMBINE_BLOCK if on_cuda else 32
            _sig_combine_kernel[(triton.cdiv(n_a, block),)](part_stats, loss, dscale, dbias,
                                                            n_a, n_splits, BLOCK=block)
        if grad and n_splits > 1 and n_a * d > 0:
            block = SUM_BLOCK if on_cuda else 1024
            _sum_splits_kernel[(triton.cdiv(n_a * d, block),)](part_grad, out, n_a * d,
                                                               n_splits, BLOCK=block)
    return out


def sigmoid_forward(x, y, scale, bias, pos_offset: Optional[int], with_grads: bool,
                    precision: str = "ieee"):
    """(loss, dscale, dbias, dx, dy) of the contract (fastcl/kernels/__init__.py and the
    module docstring): loss_i = sum_j l_ij, dscale_i = sum_j w_ij (x_i . y_j), dbias_i =
    sum_j w_ij (n,) float32; with ``with_grads`` dx = scale W y (n, D) and dy = scale W^T x
    (m, D) float32, else empty tensors of shape (0,)."""
    _check(x, y)
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    dscale = torch.empty(n, dtype=torch.float32, device=dev)
    dbias = torch.empty(n, dtype=torch.float32, device=dev)
    empty = torch.empty(0, dtype=torch.float32, device=dev)
    if n == 0 or m == 0:  # not called by the op (n, m >= 1); defined anyway: empty sums
        zeros = (loss.zero_(), dscale.zero_(), dbias.zero_())
        if not with_grads:
            return zeros + (empty, empty)
        return zeros + (torch.zeros(n, d, device=dev), torch.zeros(m, d, device=dev))
    dx = _launch(x, y, scale, bias, pos_offset, None, True, (loss, dscale, dbias),
                 bool(with_grads), precision)
    if not with_grads:
        return loss, dscale, dbias, empty, empty
    dy = _launch(y, x, scale, bias, None if pos_offset is None else -int(pos_offset), None,
                 False, None, True, precision)
    return loss, dscale, dbias, dx, dy


def sigmoid_grad(x, y, scale, bias, pos_offset: Optional[int], g, need_rows: bool,
                 need_cols: bool, precision: str = "ieee"):
    """(dx, dy) float32 of the contract: dx_i = scale g_i sum_j w_ij y_j (n, D) and dy_j =
    scale sum_i g_i w_ij x_i (m, D), each an empty (0,) tensor where not needed; the logits
    are recomputed (one pass each, no atomics)."""
    _check(x, y)
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    if not isinstance(g, torch.Tensor) or g.shape != (n,):
        raise ValueError(f"g must have shape ({n},), got {tuple(getattr(g, 'shape', ()))}")
    g = g.to(device=dev, dtype=torch.float32).contiguous()
    empty = torch.empty(0, dtype=torch.float32, device=dev)
    dx = dy = empty
    if need_rows:
        dx = (_launch(x, y, scale, bias, pos_offset, g, True, None, True, precision)
              if n and m else torch.zeros(n, d, device=dev))
    if need_cols:
        dy = (_launch(y, x, scale, bias, None if pos_offset is None else -int(pos_offset), g,
                      False, None, True, precision)
              if n and m else torch.zeros(m, d, device=dev))
    return dx, dy


# ------------------------------------------------------ helpers of triton_contrastive ----
# Imported here, after the launchers: triton_contrastive re-exports sigmoid_forward /
# sigmoid_grad at its end, so whichever of the two modules is imported first, the other finds
# what it needs (the @triton.jit functions above resolve these names when they compile).
from fastcl.kernels.triton_contrastive import (
    GRAD_CONFIGS,
    PARTIAL_BYTES,
    SUM_BLOCK,
    _PTR,
    _ldot,
    _load_rows,
    _load_scale,
    _on_device,
    _scale_args,
    _signature,
    _sum_splits_kernel,
    _variant,
    _wdot,
    grad_meta,
    prune_configs,
    split_plan,
)  # noqa: E402


# --------------------------------------------------------------------- configs, meta ----


def sig_configs(d: int, dtype: torch.dtype, precision: str = "ieee") -> list:
    """The one config of every sigmoid pass at (D, dtype, precision): the first that
    ``prune_configs`` keeps for the contrastive backward (see the module docstring)."""
    return prune_configs(SIG_CONFIGS, "grad", d, dtype, precision)[:1]


def _prune(configs, named_args, **kwargs):
    return sig_configs(int(named_args["d"]), named_args["A"].dtype,
                       kwargs.get("PRECISION", "ieee"))


_KEY = ["d", "HAS_POS", "WITH_STATS", "WITH_GRAD", "G_ROWS", "G_COLS", "ONE_SPLIT", "CAST_W",
        "RESIDENT", "BLOCK_D", "PRECISION", "SCALE_PTR", "BIAS_PTR"]
SIG_CONFIGS = GRAD_CONFIGS
_sig_tuned = triton.autotune(
    configs=SIG_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
)(_sig_kernel)


def sig_meta(dtype: torch.dtype, d: int, on_cuda: bool, precision: str, *, has_pos: bool,
             with_stats: bool, with_grad: bool, g_rows: bool = False, g_cols: bool = False,
             one_split: bool = True, scale_ptr: bool = False, bias_ptr: bool = False) -> dict:
    """Compile-time arguments of ``_sig_kernel`` for one pass (without BLOCK_M / BLOCK_N and
    the launch options on CUDA: the autotuner's). Every pass takes ``grad_meta``'s D tiling
    (the gradient passes for their second product's accumulator, the stats-only pass so that
    its logits are the gradient passes' floats)."""
    base = grad_meta(dtype, d, on_cuda, False, False, False, False, precision)
    keep = ("RESIDENT", "BLOCK_D", "PRECISION", "UPCAST", "SUM_DOT", "BLOCK_M", "BLOCK_N")
    meta = {k: base[k] for k in keep if k in base}
    meta.update(CAST_W=dtype == torch.bfloat16, HAS_POS=bool(has_pos),
                WITH_STATS=bool(with_stats), WITH_GRAD=bool(with_grad), G_ROWS=bool(g_rows),
                G_COLS=bool(g_cols), ONE_SPLIT=bool(one_split), SCALE_PTR=bool(scale_ptr),
                BIAS_PTR=bool(bias_ptr))
    return meta


# ------------------------------------------------------------------- ahead-of-time list ----


def aot_variants(ds=(128, 512), dtypes=(torch.float32, torch.bfloat16),
                 precisions=("ieee",), every_config: bool = True) -> Iterator[dict]:
    """What can run on a GPU, in ``triton_contrastive.aot_variants``'s form (dicts: kernel,
    label, signature, constexprs, options), for tests/triton_aot.py. The heaviest form of each
    pass, which the lighter ones are subsets of (fewer loads, no splits' partial writes):
      rows/stats       the stats-only rows pass, several splits, scale and bias as device
                       pointers;
      rows/stats+grad  the forward-with-grads rows pass (stats and dx), several splits,
                       pointers;
      grad/g           a gradient-only pass with the upstream g (sigmoid_grad's columns pass,
                       g indexed by column; also the forward's dy pass minus the g load),
                       several splits, pointers;
    each with its one config (``sig_configs``; ``every_config`` is accepted for the interface
    of ``triton_contrastive.aot_variants`` and changes nothing); plus the combine kernel."""
    for dtype in dtypes:
        for d in ds:
            for precision in (precisions if dtype == torch.float32 else ("ieee",)):
                for name, stats, grad, g_cols in (("rows/stats", True, False, False),
                                                  ("rows/stats+grad", True, True, False),
                                                  ("grad/g", False, True, True)):
                    meta = sig_meta(dtype, d, True, precision, has_pos=True, with_stats=stats,
                                    with_grad=grad, g_cols=g_cols, one_split=False,
                                    scale_ptr=True, bias_ptr=True)
                    for cfg in sig_configs(d, dtype, precision):
                        v = _variant(_sig_kernel, f"sigmoid/{name}", dtype, d, precision, meta,
                                     cfg, True, "splits=n scale_ptr=True bias_ptr=True")
                        sig = v["signature"]
                        sig["BIAS"] = sig["SCALE"]
                        sig["bias_val"] = "fp32"
                        if stats:
                            sig["PART"] = "*fp64"
                        yield v
    constexprs = dict(BLOCK=SIG_COMBINE_BLOCK)
    sig = _signature(_sig_combine_kernel, torch.float32, constexprs, "*fp32")
    sig["PART"] = "*fp64"
    yield dict(kernel=_sig_combine_kernel, signature=sig, constexprs=constexprs,
               options=dict(num_warps=4, num_stages=1), label="sigmoid/combine")
