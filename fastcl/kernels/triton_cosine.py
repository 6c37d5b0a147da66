"""Triton kernels for BYOL's cosine loss (contract: ``fastcl.kernels.torch_cosine``).

One program per BLOCK_M rows; the feature axis is walked in BLOCK_F chunks, so any width works.
Forward: one pass over p and z for the three row sums. Backward: one pass writing dp. Float32
arithmetic for every storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcl.kernels.torch_cosine import EPS

_BLOCK_M = 16


def _block_f(f: int) -> int:
    return min(256, max(16, triton.next_power_of_2(f)))


@triton.jit
def _cosine_fwd_kernel(p_ptr, z_ptr, loss_ptr, stats_ptr, B, F, stride_p, stride_z,
                       EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        m = rmask[:, None] & (cols[None, :] < F)
        x = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=m, other=0.0)
        y = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=m, other=0.0)
        x = x.to(tl.float32)
        y = y.to(tl.float32)
        dot += tl.sum(x * y, axis=1)
        pp += tl.sum(x * x, axis=1)
        zz += tl.sum(y * y, axis=1)
    ip = 1.0 / tl.maximum(tl.sqrt(pp), EPS_)
    iz = 1.0 / tl.maximum(tl.sqrt(zz), EPS_)
    cos = dot * ip * iz
    tl.store(loss_ptr + rows, 2.0 - 2.0 * cos, mask=rmask)
    tl.store(stats_ptr + rows64 * 3, ip, mask=rmask)
    tl.store(stats_ptr + rows64 * 3 + 1, iz, mask=rmask)
    tl.store(stats_ptr + rows64 * 3 + 2, cos, mask=rmask)


@triton.jit
def _cosine_bwd_kernel(g_ptr, p_ptr, z_ptr, stats_ptr, dp_ptr, B, F, stride_p, stride_z,
                       INV_EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    ip = tl.load(stats_ptr + rows64 * 3, mask=rmask, other=0.0)
    iz = tl.load(stats_ptr + rows64 * 3 + 1, mask=rmask, other=0.0)
    cos = tl.load(stats_ptr + rows64 * 3 + 2, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    scale = -2.0 * g * ip
    wz = scale * iz
    wp = tl.where(ip < INV_EPS, -scale * cos * ip, 0.0)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        m = rmask[:, None] & (cols[None, :] < F)
        x = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=m, other=0.0)
        y = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=m, other=0.0)
        d = wz[:, None] * y.to(tl.float32) + wp[:, None] * x.to(tl.float32)
        tl.store(dp_ptr + rows64[:, None] * F + cols[None, :], d, mask=m)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def cosine_forward(p, z):
    p, z = _rows_contiguous(p), _rows_contiguous(z)
    b, f = p.shape
    loss = torch.empty(b, dtype=torch.float32, device=p.device)
    stats = torch.empty((b, 3), dtype=torch.float32, device=p.device)
    if b:
        _cosine_fwd_kernel[(triton.cdiv(b, _BLOCK_M),)](
            p, z, loss, stats, b, f, p.stride(0), z.stride(0), EPS_=EPS, BLOCK_M=_BLOCK_M,
            BLOCK_F=_block_f(f))
    return loss, stats


def cosine_backward(g, p, z, stats):
    p, z = _rows_contiguous(p), _rows_contiguous(z)
    b, f = p.shape
    dp = torch.empty((b, f), dtype=torch.float32, device=p.device)
    if b:
        _cosine_bwd_kernel[(triton.cdiv(b, _BLOCK_M),)](
            g.float().contiguous(), p, z, stats.float().contiguous(), dp, b, f, p.stride(0),
            z.stride(0), INV_EPS=1.0 / EPS, BLOCK_M=_BLOCK_M, BLOCK_F=_block_f(f))
    return dp
