"""Tiled PyTorch implementation of the similarity + log-softmax kernels.

fastcl's fallback: it runs where the fast paths can't (no compiler or ninja for the C++ CPU
kernels, no Triton on CUDA) and for CUDA float64.
It is *not* the reference: it never forms the full similarity matrix, only one tile of at most
``_TILE x _TILE`` similarities at a time (1 MiB in float32, so the elementwise passes over a
tile stay in a core's L2 cache), merging per-row maxima and sums online as FlashAttention does.
Memory stays O(N*D) plus a constant.

NT-Xent uses the symmetry of its similarity matrix: only tiles on and above the diagonal are
computed, and each gives both its rows' and its columns' contributions. Forward + backward then
cost 2 matrix products instead of 3, and half the exponentials.

Computation is in float32 (float64 for float64 inputs); the row lse is returned in float64.
See ``fastcl.kernels`` for the contract.

Low temperatures (logits ~ 1/tau, one float32 ulp ~ 1e-3 at tau = 1e-4) need two things of the
backward: each logit must be the very float the forward's lse saw (the backward's products are
the forward's own calls, same operands in the same order: a BLAS product's rounding may depend
on its shape and operand order), and the lse must not be rounded to a float of size 1/tau
(softmax weights are exp((s - hi) - lo) with lse = hi + lo).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

_TILE = 512
_NEG_INF = float("-inf")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _normalized(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    # Divide, as F.normalize does: eager's rounding, and exactly +-1 when D = 1.
    return x.to(_acc_dtype(x)) / norm.to(_acc_dtype(x))[:, None]


def _logits(a: torch.Tensor, b: torch.Tensor, inv_temp) -> torch.Tensor:
    """inv_temp * a @ b.T: for a float the scale is applied by the matrix product itself (BLAS
    alpha); a 0-dim tensor scale (on the device, never read on the host) multiplies after."""
    out = a.new_empty(a.shape[0], b.shape[0])
    if isinstance(inv_temp, torch.Tensor):
        return torch.mm(a, b.T, out=out).mul_(inv_temp.to(out.dtype))
    return torch.addmm(out, a, b.T, beta=0, alpha=inv_temp, out=out)


def _scaled(out: torch.Tensor, inv_temp) -> torch.Tensor:
    return out.mul_(inv_temp.to(out.dtype) if isinstance(inv_temp, torch.Tensor) else inv_temp)


class _OnlineLSE:
    """Running row maxima m, sums l of exp(s - m) and, with ``with_t``, t = sum exp(s - m) (s -
    m) (the centred first moment the scale's gradient needs), merged tile by tile."""

    def __init__(self, n: int, dtype, device, with_t: bool = False):
        self.m = torch.full((n,), _NEG_INF, dtype=dtype, device=device)
        self.l = torch.zeros(n, dtype=dtype, device=device)
        self.t = torch.zeros(n, dtype=dtype, device=device) if with_t else None

    def add(self, sl: slice, s: torch.Tensor, dim: int) -> None:
        """Merge tile s (logits, -inf where excluded; consumed) into rows sl, reducing ``dim``."""
        m_old = self.m[sl]
        m_new = torch.maximum(m_old, s.amax(dim=dim))
        shift = torch.where(m_new == _NEG_INF, torch.zeros_like(m_new), m_new)
        s.sub_(shift.unsqueeze(dim))
        if self.t is not None:
            # t <- exp(m_old - m_new) (t + (m_old - m_new) l_old) + sum exp(d) d, d = s - m_new;
            # excluded entries (d = -inf, exp = 0) add 0, not 0 * -inf.
            l_old = self.l[sl]
            delta = m_old - shift
            moved = torch.exp(delta) * (self.t[sl] + delta * l_old)
            d = torch.nan_to_num(s, neginf=0.0, posinf=math.inf, nan=math.nan)
            self.t[sl] = torch.where(l_old > 0, moved, torch.zeros_like(moved)) + (
                torch.exp(s) * d).sum(dim=dim)
        s.exp_()
        self.l[sl] = self.l[sl] * torch.exp(m_old - shift) + s.sum(dim=dim)
        self.m[sl] = m_new

    def result(self, s_pos: torch.Tensor, inv_temp) -> Tuple[torch.Tensor, ...]:
        """(loss, lse, dscale) with loss = (m - s_pos) + log l: exact when the positive is the
        max; lse in float64 (see the module doc); dscale = (t / l + (m - s_pos)) / inv_temp, or
        empty without ``with_t``."""
        log_l = torch.log(self.l)
        loss = (self.m - s_pos) + log_l
        if self.t is None:
            dscale = self.m.new_empty(0)
        else:
            dscale = (self.t / self.l + (self.m - s_pos)) / inv_temp
        return loss, self.m.double() + log_l.double(), dscale


def _split(lse: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """lse (float64, or ``dtype``) as hi + lo in ``dtype``, hi the nearest float."""
    hi = lse.to(dtype)
    return hi, (lse.double() - hi.double()).to(dtype)


def _weights(s: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g exp((s - hi) - lo) (broadcasting), consuming s: s - hi is exact where it matters."""
    return s.sub_(hi).sub_(lo).exp_().mul_(g)


def _tiles(n_rows: int, n_cols: int, upper: bool = False):
    """(rows, cols) ranges of the _TILE x _TILE tiles; ``upper``: only those with j >= i."""
    for i in range(0, n_rows, _TILE):
        for j in range(i if upper else 0, n_cols, _TILE):
            yield range(i, min(i + _TILE, n_rows)), range(j, min(j + _TILE, n_cols))


def _pos_in_tile(rows: range, cols: range, pos_offset: int, n: int):
    """(row indices, col indices) within a tile of the pairs (i, (i + pos_offset) mod n)."""
    r = torch.arange(rows.start, rows.stop)
    c = (r + pos_offset) % n
    keep = (c >= cols.start) & (c < cols.stop)
    return r[keep] - rows.start, c[keep] - cols.start


# ------------------------------------------------------------------ NT-Xent (symmetric) ----


def nt_xent_forward(z, nz, inv_temp, precision: str = "ieee", positive_in_denominator: bool = True,
                    with_dscale: bool = False):
    n = z.shape[0]
    zh = _normalized(z, nz)
    state = _OnlineLSE(n, zh.dtype, z.device, with_dscale)
    s_pos = torch.empty(n, dtype=zh.dtype, device=z.device)
    for rows, cols in _tiles(n, n, upper=True):
        i, j = rows.start, cols.start
        s = _logits(zh[i:rows.stop], zh[j:cols.stop], inv_temp)
        # Each row takes its positive from the very float its max and sum see: row-wise
        # from this tile, or column-wise for the rows this tile covers as columns.
        pos = _pos_in_tile(rows, cols, n // 2, n)
        s_pos[pos[0] + i] = s[pos]
        if i != j:
            cpos = _pos_in_tile(cols, rows, n // 2, n)
            s_pos[cpos[0] + j] = s[cpos[1], cpos[0]]
        if not positive_in_denominator:
            # The pair (i, i + N) is symmetric: one entry serves its row and its column.
            s[pos] = _NEG_INF
        if i == j:
            s.fill_diagonal_(_NEG_INF)
            state.add(slice(i, rows.stop), s, dim=1)
            continue
        state.add(slice(i, rows.stop), s.clone(), dim=1)
        state.add(slice(j, cols.stop), s, dim=0)
    return state.result(s_pos, inv_temp)


def nt_xent_grad(z, nz, lse, g, inv_temp, precision: str = "ieee"):
    n = z.shape[0]
    zh = _normalized(z, nz)
    (hi, lo), g = _split(lse, zh.dtype), g.to(zh.dtype)
    out = torch.zeros_like(zh)
    for rows, cols in _tiles(n, n, upper=True):
        i, j = rows.start, cols.start
        r_sl, c_sl = slice(i, rows.stop), slice(j, cols.stop)
        s = _logits(zh[r_sl], zh[c_sl], inv_temp)
        # W_ij = g_i P_ij + g_j P_ji; S is symmetric, so both come from this tile.
        if i == j:
            # The forward took row r's logits from row r of this tile, and a product need not
            # be bitwise symmetric: W = E + E^T with E_rc = g_r P_rc from the rows' own floats.
            # Self-similarity can exceed the lse by ~2/tau: keep exp from overflowing.
            s.fill_diagonal_(_NEG_INF)
            w = _weights(s, hi[r_sl, None], lo[r_sl, None], g[r_sl, None])
            w = w + w.T
        else:
            w = _weights(s.clone(), hi[r_sl, None], lo[r_sl, None], g[r_sl, None])
            w.add_(_weights(s, hi[None, c_sl], lo[None, c_sl], g[None, c_sl]))
        w[_pos_in_tile(rows, cols, n // 2, n)] = 0.0  # positive pairs: added by the caller
        out[i:rows.stop].addmm_(w, zh[j:cols.stop])
        if i != j:
            out[j:cols.stop].addmm_(w.T, zh[i:rows.stop])
    return _scaled(out, inv_temp)


# ---------------------------------------------------------------------------- general ----


def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    nq: torch.Tensor,
    nk: torch.Tensor,
    positive: Optional[Tuple[torch.Tensor, torch.Tensor]],
    inv_temp,
    pos_offset: Optional[int],
    precision: str = "ieee",
    positive_in_denominator: bool = True,
    with_dscale: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, False,
                        positive_in_denominator, with_dscale)[:3]


def lse_forward_with_grad(q, k, nq, nk, positive, inv_temp, pos_offset: Optional[int],
                          precision: str = "ieee", positive_in_denominator: bool = True,
                          with_dscale: bool = False):
    return _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, True,
                        positive_in_denominator, with_dscale)


def _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, with_grad, in_denominator,
                 with_dscale):
    qn = _normalized(q, nq)
    kn = _normalized(k, nk)
    n_q, n_k = q.shape[0], k.shape[0]
    state = _OnlineLSE(n_q, qn.dtype, q.device, with_dscale)
    v = torch.zeros_like(qn) if with_grad else None
    if positive is not None:
        # Row i's positive is positive[0][i], scaled exactly as the columns are.
        k_pos, n_pos = positive
        s_pos = _scaled((qn * _normalized(k_pos, n_pos)).sum(dim=1), inv_temp)
        if in_denominator:
            state.m.copy_(s_pos)
            state.l.fill_(1.0)
    else:
        s_pos = torch.zeros(n_q, dtype=qn.dtype, device=q.device)  # 0 without a positive
    for rows, cols in _tiles(n_q, n_k):
        i, j = rows.start, cols.start
        s = _logits(qn[i:rows.stop], kn[j:cols.stop], inv_temp)
        pos = None
        if pos_offset is not None:
            pos = _pos_in_tile(rows, cols, pos_offset, n_k)
            s_pos[pos[0] + i] = s[pos]
            if not in_denominator:
                s[pos] = _NEG_INF
        m_old = state.m[i:rows.stop].clone()
        state.add(slice(i, rows.stop), s, dim=1)  # s is now exp(s - shift)
        if with_grad:
            # FlashAttention's output accumulation: v_i = sum_j exp(s_ij - m_i) khat_j,
            # rescaled when m_i moves; the positive's weight is added by the caller.
            m_new = state.m[i:rows.stop]
            shift = torch.where(m_new == _NEG_INF, torch.zeros_like(m_new), m_new)
            if pos is not None:
                s[pos] = 0.0
            v[i:rows.stop].mul_(torch.exp(m_old - shift)[:, None]).addmm_(s, kn[j:cols.stop])
    loss, lse, dscale = state.result(s_pos, inv_temp)
    if not with_grad:
        return loss, lse, dscale, None
    return loss, lse, dscale, _scaled(v, inv_temp).div_(state.l[:, None])


def grad_accumulate(
    a: torch.Tensor,
    b: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    lse_a: Optional[torch.Tensor],
    g_a: Optional[torch.Tensor],
    lse_b: Optional[torch.Tensor],
    g_b: Optional[torch.Tensor],
    inv_temp,
    pos_offset: Optional[int],
    precision: str = "ieee",
) -> torch.Tensor:
    an = _normalized(a, na)
    bn = _normalized(b, nb)
    acc = an.dtype
    n_a, n_b = a.shape[0], b.shape[0]
    out = torch.zeros_like(an)
    by_row = lse_a is not None
    hi, lo = _split(lse_a if by_row else lse_b, acc)
    g = (g_a if by_row else g_b).to(acc)
    for rows, cols in _tiles(n_a, n_b):
        i, j = rows.start, cols.start
        r_sl, c_sl = slice(i, rows.stop), slice(j, cols.stop)
        if by_row:  # the tile of lse_forward(a, b)
            s = _logits(an[r_sl], bn[c_sl], inv_temp)
            w = _weights(s, hi[r_sl, None], lo[r_sl, None], g[r_sl, None])
        else:  # the tile of lse_forward(b, a): the very product its lse was taken from
            s = _logits(bn[c_sl], an[r_sl], inv_temp)
            w = _weights(s, hi[c_sl, None], lo[c_sl, None], g[c_sl, None]).T
        if pos_offset is not None:
            w[_pos_in_tile(rows, cols, pos_offset, n_b)] = 0.0
        out[r_sl].addmm_(w, bn[c_sl])
    return _scaled(out, inv_temp)


# ------------------------------------------------------- both directions (CLIP) ----


def rows_cols_forward(x, y, nx, ny, inv_temp, precision: str = "ieee",
                      with_dscale: bool = False):
    """Row and column statistics of s = inv_temp * xhat @ yhat^T (x, y: (n, D), the positive
    of row i and of column i at (i, i)) from one pass over the tiles: each tile feeds the
    running row state and the running column state. (loss, lse, dscale), each of length 2n:
    [rows ; columns] (see ``fastcl.kernels``)."""
    n = x.shape[0]
    xh, yh = _normalized(x, nx), _normalized(y, ny)
    rows_state = _OnlineLSE(n, xh.dtype, x.device, with_dscale)
    cols_state = _OnlineLSE(n, xh.dtype, x.device, with_dscale)
    s_pos = torch.empty(n, dtype=xh.dtype, device=x.device)
    for rows, cols in _tiles(n, n):
        i, j = rows.start, cols.start
        s = _logits(xh[i:rows.stop], yh[j:cols.stop], inv_temp)
        pos = _pos_in_tile(rows, cols, 0, n)
        # Row i and column i take their positive from the very float their max and sum see.
        s_pos[pos[0] + i] = s[pos]
        rows_state.add(slice(i, rows.stop), s.clone(), dim=1)
        cols_state.add(slice(j, cols.stop), s, dim=0)
    loss_r, lse_r, ds_r = rows_state.result(s_pos, inv_temp)
    loss_c, lse_c, ds_c = cols_state.result(s_pos, inv_temp)
    return torch.cat([loss_r, loss_c]), torch.cat([lse_r, lse_c]), torch.cat([ds_r, ds_c])


def rows_cols_grad(x, y, nx, ny, lse, g, inv_temp, precision: str = "ieee"):
    """(dx_hat, dy_hat) of sum_i g_r_i lse_r_i + g_c_i lse_c_i over the off-diagonal pairs:
    W_ij = g_r_i exp(s_ij - lse_r_i) + g_c_j exp(s_ij - lse_c_j) (i != j), dx_hat = inv_temp
    W yhat, dy_hat = inv_temp W^T xhat. ``lse`` and ``g`` are (2n,), [rows ; columns]; the
    positives' terms are the op layer's. Each logit is the forward's own float (same tile,
    same product)."""
    n = x.shape[0]
    xh, yh = _normalized(x, nx), _normalized(y, ny)
    acc = xh.dtype
    hi, lo = _split(lse, acc)
    g = g.to(acc)
    dx, dy = torch.zeros_like(xh), torch.zeros_like(yh)
    for rows, cols in _tiles(n, n):
        i, j = rows.start, cols.start
        r_sl, c_sl = slice(i, rows.stop), slice(j, cols.stop)
        s = _logits(xh[r_sl], yh[c_sl], inv_temp)
        w = _weights(s.clone(), hi[r_sl, None], lo[r_sl, None], g[r_sl, None])
        c_hi, c_lo = hi[n + j:n + cols.stop], lo[n + j:n + cols.stop]
        w.add_(_weights(s, c_hi[None, :], c_lo[None, :], g[n + j:n + cols.stop][None, :]))
        w[_pos_in_tile(rows, cols, 0, n)] = 0.0  # the positives: added by the op layer
        dx[r_sl].addmm_(w, yh[c_sl])
        dy[c_sl].addmm_(w.T, xh[r_sl])
    return _scaled(dx, inv_temp), _scaled(dy, inv_temp)


# --------------------------------------------------------------- sigmoid per pair (SigLIP) ----


def _sigmoid_positives(rows: range, cols: range, pos_offset: Optional[int]):
    """(row indices, col indices) within a tile of the positive pairs (i, i + pos_offset),
    which exist only where i + pos_offset is a column (no wrap-around); none for None."""
    if pos_offset is None:
        return None
    r = torch.arange(rows.start, rows.stop)
    c = r + pos_offset
    keep = (c >= cols.start) & (c < cols.stop)
    if not bool(keep.any()):
        return None
    return r[keep] - rows.start, c[keep] - cols.start


def _sigmoid_tile(xa, yb, scale, bias, pos):
    """(raw dots d, per-pair loss, w = d loss / d z) of one tile, z = scale d + bias, the
    positives' entries as label +1, the rest -1: loss = softplus(-t z), w = -t sigmoid(-t z),
    from u = -t z: softplus(u) = max(u, 0) + log1p(exp(-|u|)), finite for any finite z."""
    d = torch.mm(xa, yb.T)
    s = scale.to(d.dtype) if isinstance(scale, torch.Tensor) else scale
    b = bias.to(d.dtype) if isinstance(bias, torch.Tensor) else bias
    u = d * s + b  # u = z for the negatives (t = -1)
    if pos is not None:
        u[pos] = -u[pos]
    loss = u.clamp_min(0).add_(torch.log1p(torch.exp(-u.abs())))
    w = torch.sigmoid(u)
    if pos is not None:
        w[pos] = -w[pos]
    return d, loss, w


def _sigmoid_scale(out: torch.Tensor, scale) -> torch.Tensor:
    return out.mul_(scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)


def _sigmoid_pass(x, y, scale, bias, pos_offset, g, stats: bool, need_rows: bool,
                  need_cols: bool):
    acc = _acc_dtype(x)
    xa, ya = x.to(acc), y.to(acc)
    n, m = xa.shape[0], ya.shape[0]
    loss = torch.zeros(n, dtype=torch.float64, device=x.device) if stats else None
    dscale = torch.zeros_like(loss) if stats else None
    dbias = torch.zeros_like(loss) if stats else None
    # Row-major whatever the inputs' strides (zeros_like would follow a permuted input).
    dx = xa.new_zeros(xa.shape) if need_rows else xa.new_empty(0)
    dy = ya.new_zeros(ya.shape) if need_cols else ya.new_empty(0)
    for rows, cols in _tiles(n, m):
        r_sl, c_sl = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
        d, l_t, w = _sigmoid_tile(xa[r_sl], ya[c_sl], scale, bias,
                                  _sigmoid_positives(rows, cols, pos_offset))
        if stats:
            # Each tile's row sums in the accumulation dtype, the tiles' sums in float64.
            loss[r_sl] += l_t.sum(dim=1).double()
            dscale[r_sl] += (w * d).sum(dim=1).double()
            dbias[r_sl] += w.sum(dim=1).double()
        if g is not None:
            w.mul_(g[r_sl, None])
        if need_rows:
            dx[r_sl].addmm_(w, ya[c_sl])
        if need_cols:
            dy[c_sl].addmm_(w.T, xa[r_sl])
    if need_rows:
        _sigmoid_scale(dx, scale)
    if need_cols:
        _sigmoid_scale(dy, scale)
    if not stats:
        return dx, dy
    return loss.to(acc), dscale.to(acc), dbias.to(acc), dx, dy


def sigmoid_forward(x, y, scale, bias, pos_offset: Optional[int], with_grads: bool,
                    precision: str = "ieee"):
    """SigLIP's per-pair sigmoid loss over z = scale * x @ y^T + bias (features as given),
    labels +1 at (i, i + pos_offset), -1 elsewhere, tile by tile: (loss, dscale, dbias) per
    row, and with ``with_grads`` the gradients (dx, dy) of their sum (else empty); see
    ``fastcl.kernels``."""
    return _sigmoid_pass(x, y, scale, bias, pos_offset, None, True, with_grads, with_grads)


def sigmoid_grad(x, y, scale, bias, pos_offset: Optional[int], g, need_rows: bool,
                 need_cols: bool, precision: str = "ieee"):
    """(dx, dy) of sum_i g_i loss_i of :func:`sigmoid_forward`, the logits recomputed."""
    return _sigmoid_pass(x, y, scale, bias, pos_offset, g.to(_acc_dtype(x)), False,
                         need_rows, need_cols)


# ------------------------------------------------------------ label positives (SupCon) ----


class _LabelSums:
    """Per row: the sum of its positive logits (float64 across tiles) and their count."""

    def __init__(self, n: int, dtype, device):
        self.sp = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = torch.zeros(n, dtype=dtype, device=device)

    def add(self, sl: slice, s: torch.Tensor, pos: torch.Tensor, dim: int) -> None:
        """Merge the positives ``pos`` (bool) of tile s (logits, before ``_OnlineLSE.add``)."""
        self.sp[sl] += torch.where(pos, s, torch.zeros_like(s)).sum(dim=dim, dtype=torch.float64)
        self.count[sl] += pos.sum(dim=dim).to(self.count.dtype)

    def result(self, state: _OnlineLSE, inv_temp):
        """(loss, lse, dscale, count) of the label pass (``fastcl.kernels``): loss = (m - sp /
        count) + log l, dscale = (t / l + (m - sp / count)) / inv_temp, both 0 without a
        positive."""
        has = self.count > 0
        mean = self.sp / torch.where(has, self.count, torch.ones_like(self.count)).double()
        zero = torch.zeros_like(state.m)
        log_l = torch.log(state.l)
        gap = state.m.double() - mean  # m and the mean: both ~ 1/tau, their gap exact here
        loss = torch.where(has, (gap + log_l.double()).to(zero.dtype), zero)
        dscale = state.m.new_empty(0)
        if state.t is not None:
            dscale = torch.where(has, (state.t / state.l + gap.to(zero.dtype)) / inv_temp, zero)
        return loss, state.m.double() + log_l.double(), dscale, self.count


def _own_in_tile(rows: range, cols: range, offset: int):
    """(row indices, col indices) within a tile of the pairs (i, i + offset)."""
    r = torch.arange(rows.start, rows.stop)
    c = r + offset
    keep = (c >= cols.start) & (c < cols.stop)
    return r[keep] - rows.start, c[keep] - cols.start


def labels_forward(q, k, nq, nk, lq, lk, inv_temp, offset: int, precision: str = "ieee",
                   with_dscale: bool = False):
    """(loss, lse, dscale, count) of the label pass over q against k (``fastcl.kernels``)."""
    qn, kn = _normalized(q, nq), _normalized(k, nk)
    n, m = q.shape[0], k.shape[0]
    state = _OnlineLSE(n, qn.dtype, q.device, with_dscale)
    sums = _LabelSums(n, qn.dtype, q.device)
    for rows, cols in _tiles(n, m):
        r_sl, c_sl = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
        s = _logits(qn[r_sl], kn[c_sl], inv_temp)
        own = _own_in_tile(rows, cols, offset)
        s[own] = _NEG_INF
        pos = lq[r_sl, None] == lk[None, c_sl]
        pos[own] = False
        sums.add(r_sl, s, pos, dim=1)
        state.add(r_sl, s, dim=1)
    return sums.result(state, inv_temp)


def labels_sym_forward(z, nz, labels, inv_temp, precision: str = "ieee",
                       with_dscale: bool = False):
    """``labels_forward(z, z, ..., offset 0)`` from the tiles on and above the diagonal: each
    feeds its rows' and its columns' statistics (the logits and the label mask are
    symmetric)."""
    zh = _normalized(z, nz)
    n = z.shape[0]
    state = _OnlineLSE(n, zh.dtype, z.device, with_dscale)
    sums = _LabelSums(n, zh.dtype, z.device)
    for rows, cols in _tiles(n, n, upper=True):
        r_sl, c_sl = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
        s = _logits(zh[r_sl], zh[c_sl], inv_temp)
        pos = labels[r_sl, None] == labels[None, c_sl]
        if rows.start == cols.start:
            s.fill_diagonal_(_NEG_INF)
            pos.fill_diagonal_(False)
            sums.add(r_sl, s, pos, dim=1)
            state.add(r_sl, s, dim=1)
            continue
        sums.add(r_sl, s, pos, dim=1)
        sums.add(c_sl, s, pos, dim=0)
        state.add(r_sl, s.clone(), dim=1)
        state.add(c_sl, s, dim=0)
    return sums.result(state, inv_temp)


def _label_weights(s, hi, lo, ga, gp, pos):
    """ga exp((s - hi) - lo) - gp [positive] (broadcasting), consuming s."""
    return _weights(s, hi, lo, ga).sub_(gp * pos)


def labels_grad(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b, gp_b, inv_temp,
                offset: int, precision: str = "ieee"):
    """inv_temp * W bhat over the label pass's pairs, the statistics on a's side (the rows'
    gradient) or on b's (the columns'): see ``fastcl.kernels``."""
    an, bn = _normalized(a, na), _normalized(b, nb)
    acc = an.dtype
    by_row = lse_a is not None
    hi, lo = _split(lse_a if by_row else lse_b, acc)
    ga = (ga_a if by_row else ga_b).to(acc)
    gp = (gp_a if by_row else gp_b).to(acc)
    out = torch.zeros_like(an)
    for rows, cols in _tiles(a.shape[0], b.shape[0]):
        r_sl, c_sl = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
        if by_row:  # the tile of labels_forward(a, b)
            s = _logits(an[r_sl], bn[c_sl], inv_temp)
            pos = la[r_sl, None] == lb[None, c_sl]
            w = _label_weights(s, hi[r_sl, None], lo[r_sl, None], ga[r_sl, None],
                               gp[r_sl, None], pos)
            w[_own_in_tile(rows, cols, offset)] = 0.0
        else:  # the tile of labels_forward(b, a): the very product its lse was taken from
            s = _logits(bn[c_sl], an[r_sl], inv_temp)
            pos = lb[c_sl, None] == la[None, r_sl]
            w = _label_weights(s, hi[c_sl, None], lo[c_sl, None], ga[c_sl, None],
                               gp[c_sl, None], pos)
            w[_own_in_tile(cols, rows, offset)] = 0.0
            w = w.T
        out[r_sl].addmm_(w, bn[c_sl])
    return _scaled(out, inv_temp)


def labels_sym_grad(z, nz, labels, lse, ga, gp, inv_temp, precision: str = "ieee"):
    """inv_temp * sum_j (W_ij + W_ji) zhat_j of the symmetric label pass, from the tiles on and
    above the diagonal (each gives its rows' and its columns' terms)."""
    zh = _normalized(z, nz)
    n = z.shape[0]
    hi, lo = _split(lse, zh.dtype)
    ga, gp = ga.to(zh.dtype), gp.to(zh.dtype)
    out = torch.zeros_like(zh)
    for rows, cols in _tiles(n, n, upper=True):
        r_sl, c_sl = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
        s = _logits(zh[r_sl], zh[c_sl], inv_temp)
        pos = labels[r_sl, None] == labels[None, c_sl]
        if rows.start == cols.start:
            # Row r's weights from row r of this tile (the forward's floats; a product need
            # not be bitwise symmetric), then W + W^T.
            s.fill_diagonal_(_NEG_INF)
            w = _label_weights(s, hi[r_sl, None], lo[r_sl, None], ga[r_sl, None],
                               gp[r_sl, None], pos)
            w.fill_diagonal_(0.0)
            w = w + w.T
        else:
            w = _label_weights(s.clone(), hi[r_sl, None], lo[r_sl, None], ga[r_sl, None],
                               gp[r_sl, None], pos)
            w.add_(_label_weights(s, hi[None, c_sl], lo[None, c_sl], ga[None, c_sl],
                                  gp[None, c_sl], pos))
        out[r_sl].addmm_(w, zh[c_sl])
        if rows.start != cols.start:
            out[c_sl].addmm_(w.T, zh[r_sl])
    return _scaled(out, inv_temp)
