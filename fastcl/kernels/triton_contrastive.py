"""Triton kernels for normalized similarity + log-softmax (NT-Xent / InfoNCE), and launchers.

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton reads it when
the ``@triton.jit`` functions below are defined. ``fastcl.ops`` imports it lazily.

Both kernels tile like FlashAttention: a program owns BLOCK_M rows and walks over BLOCK_N-column
tiles, reducing over the feature dimension in BLOCK_D chunks, so D can be anything. Rows are
L2-normalized on the fly: the kernels take raw rows plus one float32 norm per row. float32 rows
are divided by their norms as each tile is loaded (NORM_TILES), which rounds like eager
PyTorch's F.normalize-then-matmul; bf16/fp16 tiles go to the matrix units raw and the float32
products are scaled, s_ij = (q_i . k_j) / (|q_i| |k_j|) / tau, which keeps them as accurate as the
float32 accumulator allows. Logits stay in natural
units (exp/log, not exp2 with a folded log2(e)): one rounding fewer per logit, which matters at
low temperature where one ulp of a logit is the size of a confident row's loss. For the same
reason the row lse is stored in float64 and the backward exponentiates (s - hi) - lo with
lse = hi + lo (hi its nearest float32): rounded to float32, an lse of size 1/tau would move
every softmax weight of its row by up to half an ulp of 1/tau (5e-4 at tau = 1e-4). Each logit
comes from the same tile code in forward and backward (a . b and b . a are the same sum of the
same products).

See ``fastcl.kernels`` for the contract the launchers fulfil.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl



@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the Triton interpreter (3.9) computes bf16 tl.dot wrongly, so under
    it bf16 operands are widened to float32 first (exact: bf16 values are float32 values)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_tile(
    A, B, rows64, cols64, row_ok, col_ok, na, nb, d,
    stride_am, stride_ad, stride_bm, stride_bd, inv_temp,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, NORM_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits s_ab = (A_a / na_a) . (B_b / nb_b) * inv_temp of one tile, D reduced in chunks."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start_d in range(0, d, BLOCK_D):
        dd = start_d + offs_d
        d_ok = dd < d
        a_tile = tl.load(
            A + rows64[:, None] * stride_am + dd[None, :] * stride_ad,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        b_tile = tl.load(
            B + cols64[:, None] * stride_bm + dd[None, :] * stride_bd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if NORM_TILES:
            a_tile = a_tile / na[:, None]
            b_tile = b_tile / nb[:, None]
        acc = _dot(a_tile, tl.trans(b_tile), acc, PRECISION, UPCAST)
    return _scale_logits(acc, na, nb, inv_temp, NORM_TILES)


@triton.jit
def _scale_logits(acc, na, nb, inv_temp, NORM_TILES: tl.constexpr):
    if NORM_TILES:  # the rows were normalized before the product
        s = acc * inv_temp
    else:
        # (1/na_a * 1/nb_b) first: the same product for (a, b) and (b, a).
        s = acc * (((1.0 / na)[:, None] * (1.0 / nb)[None, :]) * inv_temp)
    return s


@triton.jit
def _lse_fwd_kernel(
    Q, K, NQ, NK, KP, NP, LOSS, LSE,
    n_q, n_k, d, pos_offset,
    stride_qm, stride_qd, stride_km, stride_kd, stride_pm, stride_pd,
    inv_temp,
    POS_ROWS: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
    POS_IN_COLUMNS: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NORM_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    # Row norms (clamped at eps, so never 0; 1.0 in padding rows).
    nq = tl.load(NQ + rows, mask=row_ok, other=1.0)
    # Running max m and sum l of exp(s - m); s_pos is the positive logit.
    if POS_ROWS:
        # Row i's positive is KP[i]: its logit joins the logsumexp first, scaled exactly as
        # the tiles are, so a positive equal to a column gives the same float.
        dot_pos = tl.zeros([BLOCK_M], tl.float32)
        n_p = tl.load(NP + rows, mask=row_ok, other=1.0)
        for start_d in range(0, d, BLOCK_D):
            dd = start_d + offs_d
            mask_qd = row_ok[:, None] & (dd[None, :] < d)
            q_part = tl.load(Q + rows64[:, None] * stride_qm + dd[None, :] * stride_qd,
                             mask=mask_qd, other=0.0)
            p_part = tl.load(KP + rows64[:, None] * stride_pm + dd[None, :] * stride_pd,
                             mask=mask_qd, other=0.0)
            if NORM_TILES:
                dot_pos += tl.sum((q_part / nq[:, None]) * (p_part / n_p[:, None]), 1)
            else:
                dot_pos += tl.sum(q_part.to(tl.float32) * p_part.to(tl.float32), 1)
        if NORM_TILES:
            m = dot_pos * inv_temp
        else:
            m = dot_pos * (((1.0 / nq) * (1.0 / n_p)) * inv_temp)
        s_pos = m
        l = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        s_pos = tl.zeros([BLOCK_M], tl.float32)  # stays 0 without a positive: loss = lse
    if POS_IN_COLUMNS:
        pos_col = (rows + pos_offset) % n_k
        s_pos = tl.zeros([BLOCK_M], tl.float32)

    if ONE_D_CHUNK:
        q_tile = tl.load(
            Q + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0,
        )
        if NORM_TILES:
            q_tile = q_tile / nq[:, None]

    for start_n in range(0, n_k, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_k
        cols64 = cols.to(tl.int64)
        nk = tl.load(NK + cols, mask=col_ok, other=1.0)
        if ONE_D_CHUNK:  # the row tile was loaded (and normalized) once, before the loop
            k_tile = tl.load(
                K + cols64[:, None] * stride_km + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < d), other=0.0,
            )
            if NORM_TILES:
                k_tile = k_tile / nk[:, None]
            acc = _dot(q_tile, tl.trans(k_tile), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                       PRECISION, UPCAST)
            s = _scale_logits(acc, nq, nk, inv_temp, NORM_TILES)
        else:
            s = _logit_tile(Q, K, rows64, cols64, row_ok, col_ok, nq, nk, d,
                            stride_qm, stride_qd, stride_km, stride_kd, inv_temp,
                            PRECISION, UPCAST, NORM_TILES, BLOCK_M, BLOCK_N, BLOCK_D)
        if POS_IN_COLUMNS:
            s_pos += tl.sum(tl.where(cols[None, :] == pos_col[:, None], s, 0.0), 1)
        valid = col_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row whose every logit so far is excluded keeps m = -inf; shift by 0 there.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new

    log_l = tl.log(l)
    tl.store(LOSS + rows, (m - s_pos) + log_l, mask=row_ok)
    tl.store(LSE + rows, m.to(tl.float64) + log_l.to(tl.float64), mask=row_ok)


@triton.jit
def _split_lse(lse):
    """A float64 lse as (hi, lo), float32: hi the nearest float, lo the rest."""
    hi = lse.to(tl.float32)
    return hi, (lse - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _grad_kernel(
    A, B, NA, NB, LSE_A, G_A, LSE_B, G_B, OUT,
    n_a, n_b, d, pos_offset,
    stride_am, stride_ad, stride_bm, stride_bd, stride_om,
    inv_temp,
    USE_A: tl.constexpr,
    USE_B: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
    POS_IN_COLUMNS: tl.constexpr,
    CAST_W: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NORM_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """OUT[a, dchunk] = inv_temp * sum_b W_ab * rb_b * B[b, dchunk]; grid (row blocks, D chunks)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_a
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_out_ok = d_out < d

    na = tl.load(NA + rows, mask=row_ok, other=1.0)
    if POS_IN_COLUMNS:
        pos_col = (rows + pos_offset) % n_b
    if USE_A:
        hi_a, lo_a = _split_lse(tl.load(LSE_A + rows, mask=row_ok, other=0.0))
        g_a = tl.load(G_A + rows, mask=row_ok, other=0.0)

    out = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start_n in range(0, n_b, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_b
        cols64 = cols.to(tl.int64)
        nb = tl.load(NB + cols, mask=col_ok, other=1.0)
        s = _logit_tile(A, B, rows64, cols64, row_ok, col_ok, na, nb, d,
                        stride_am, stride_ad, stride_bm, stride_bd, inv_temp,
                        PRECISION, UPCAST, NORM_TILES, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        if POS_IN_COLUMNS:
            valid = valid & (cols[None, :] != pos_col[:, None])
        # Skipped entries get exp(-inf) = 0 (an excluded diagonal logit can exceed its row's
        # lse by ~2/tau, so exponentiating it first would overflow).
        s = tl.where(valid, s, float("-inf"))
        w = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # exp((s - hi) - lo): s - hi is exact wherever the weight is not negligible.
        if USE_A:
            w += g_a[:, None] * tl.exp((s - hi_a[:, None]) - lo_a[:, None])
        if USE_B:
            hi_b, lo_b = _split_lse(tl.load(LSE_B + cols, mask=col_ok, other=0.0))
            g_b = tl.load(G_B + cols, mask=col_ok, other=0.0)
            w += g_b[None, :] * tl.exp((s - hi_b[None, :]) - lo_b[None, :])
        w = w / nb[None, :]
        b_out = tl.load(
            B + cols64[:, None] * stride_bm + d_out[None, :] * stride_bd,
            mask=col_ok[:, None] & d_out_ok[None, :], other=0.0,
        )
        if CAST_W:
            out = _dot(w.to(b_out.dtype), b_out, out, PRECISION, UPCAST)
        else:
            out = tl.dot(w, b_out.to(tl.float32), out, input_precision=PRECISION)

    out = out * inv_temp
    tl.store(
        OUT + rows64[:, None] * stride_om + d_out[None, :],
        out,
        mask=row_ok[:, None] & d_out_ok[None, :],
    )


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _tiles(d: int, on_cuda: bool) -> dict:
    """Tile sizes. The interpreter gets small tiles so tests cross many tile boundaries."""
    if not on_cuda:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=_pow2(d, 16, 32))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=_pow2(d, 16, 64))


def _common_meta(dtype: torch.dtype, d: int, on_cuda: bool, precision: str) -> dict:
    meta = _tiles(d, on_cuda)
    # bf16/fp16 dots ignore the setting; fp32 follows torch.get_float32_matmul_precision().
    meta["PRECISION"] = precision if dtype == torch.float32 else "tf32"
    # The Triton interpreter (3.9) computes bf16 tl.dot wrongly: widen operands there.
    meta["UPCAST"] = not on_cuda and dtype == torch.bfloat16
    meta["NORM_TILES"] = dtype == torch.float32
    if on_cuda:
        meta.update(num_warps=4, num_stages=2)
    return meta


def lse_meta(dtype, d, on_cuda, positive_rows, exclude_diag, pos_in_columns, precision) -> dict:
    """Compile-time arguments and launch options of ``_lse_fwd_kernel`` for one call."""
    meta = _common_meta(dtype, d, on_cuda, precision)
    meta.update(POS_ROWS=bool(positive_rows), EXCLUDE_DIAG=bool(exclude_diag),
                POS_IN_COLUMNS=bool(pos_in_columns), ONE_D_CHUNK=d <= meta["BLOCK_D"])
    return meta


def grad_meta(dtype, d, on_cuda, use_a, use_b, exclude_diag, pos_in_columns, precision) -> dict:
    """Compile-time arguments and launch options of ``_grad_kernel`` for one call."""
    meta = _common_meta(dtype, d, on_cuda, precision)
    meta.update(USE_A=bool(use_a), USE_B=bool(use_b), EXCLUDE_DIAG=bool(exclude_diag),
                POS_IN_COLUMNS=bool(pos_in_columns), CAST_W=dtype == torch.bfloat16,
                BLOCK_DO=_pow2(d, 16, 128 if on_cuda else 32))
    return meta


def _lse(q, k, nq, nk, positive, inv_temp, exclude_diag, pos_offset, precision):
    n_q, d = q.shape
    n_k = k.shape[0]
    meta = lse_meta(q.dtype, d, q.is_cuda, positive is not None, exclude_diag,
                    pos_offset is not None, precision)
    loss = torch.empty(n_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(n_q, dtype=torch.float64, device=q.device)
    grid = (triton.cdiv(n_q, meta["BLOCK_M"]),)
    kp, n_p = positive if positive is not None else (q, nq)
    _lse_fwd_kernel[grid](
        q, k, nq, nk, kp, n_p, loss, lse,
        n_q, n_k, d, pos_offset or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), kp.stride(0), kp.stride(1),
        float(inv_temp),
        **meta,
    )
    return loss, lse


def _grad(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, exclude_diag, pos_offset, precision):
    n_a, d = a.shape
    n_b = b.shape[0]
    meta = grad_meta(a.dtype, d, a.is_cuda, lse_a is not None, lse_b is not None, exclude_diag,
                     pos_offset is not None, precision)
    out = torch.empty(n_a, d, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n_a, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"]))
    dummy = na
    lse_a = lse_a.to(torch.float64).contiguous() if lse_a is not None else dummy
    lse_b = lse_b.to(torch.float64).contiguous() if lse_b is not None else dummy
    _grad_kernel[grid](
        a, b, na, nb,
        lse_a, g_a if g_a is not None else dummy,
        lse_b, g_b if g_b is not None else dummy,
        out,
        n_a, n_b, d, pos_offset or 0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        float(inv_temp),
        **meta,
    )
    return out


# ------------------------------------------------------------ the fastcl.kernels contract ----


def _v1_only(positive_in_denominator: bool, with_dscale: bool, inv_temp) -> None:
    # Interim: the kernels of contract v2 (dscale, DCL, a device scale) land next.
    if with_dscale or not positive_in_denominator or isinstance(inv_temp, torch.Tensor):
        raise NotImplementedError("fastcl's Triton kernels do not compute dscale or DCL, or take "
                                  "a tensor scale, yet")


def nt_xent_forward(z, nz, inv_temp: float, precision: str = "ieee",
                    positive_in_denominator: bool = True, with_dscale: bool = False):
    _v1_only(positive_in_denominator, with_dscale, inv_temp)
    loss, lse = _lse(z, z, nz, nz, None, inv_temp, True, z.shape[0] // 2, precision)
    return loss, lse, loss.new_empty(0)


def nt_xent_grad(z, nz, lse, g, inv_temp: float, precision: str = "ieee"):
    # The symmetric form: W_ij = g_i P_ij + g_j P_ji from one tile, dz = W z / tau, no atomics.
    return _grad(z, z, nz, nz, lse, g, lse, g, inv_temp, True, z.shape[0] // 2, precision)


def lse_forward(q, k, nq, nk, positive: Optional[Tuple[torch.Tensor, torch.Tensor]],
                inv_temp: float, pos_offset: Optional[int], precision: str = "ieee",
                positive_in_denominator: bool = True, with_dscale: bool = False):
    _v1_only(positive_in_denominator, with_dscale, inv_temp)
    loss, lse = _lse(q, k, nq, nk, positive, inv_temp, False, pos_offset, precision)
    return loss, lse, loss.new_empty(0)


def grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp: float,
                    pos_offset: Optional[int], precision: str = "ieee") -> torch.Tensor:
    return _grad(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, False, pos_offset, precision)
