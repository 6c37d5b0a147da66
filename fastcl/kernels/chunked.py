"""Row-chunked PyTorch implementation of the similarity + log-softmax kernels.

This is fastcl's CPU path until the C++ kernels land, and the fallback where Triton is missing.
It is *not* the reference: it never forms the full similarity matrix, only a bounded block of
``chunk_rows x n_cols`` at a time (``_CHUNK_ELEMS`` elements), so memory stays O(N*D) plus a
constant. Each block costs the same matrix products as the Triton kernels.

Computation is in float32 (float64 for float64 inputs). See ``fastcl.kernels`` for the contract.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Upper bound on the elements of one similarity block (8 MiB in float32).
_CHUNK_ELEMS = 1 << 21


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(n_cols, 1))


def _pos_columns(start: int, stop: int, pos_offset: int, n_cols: int, device) -> torch.Tensor:
    return (torch.arange(start, stop, device=device) + pos_offset) % n_cols


def _mask_(block, start, exclude_diag, pos_offset, value) -> None:
    """Set the excluded entries of rows start.. of a (rows x n_cols) block to ``value``."""
    n_rows, n_cols = block.shape
    rows = torch.arange(n_rows, device=block.device)
    if exclude_diag:
        keep = rows < n_cols - start
        block[rows[keep], start + rows[keep]] = value
    if pos_offset is not None:
        block[rows, _pos_columns(start, start + n_rows, pos_offset, n_cols, block.device)] = value


def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    positive: Optional[Tuple[torch.Tensor, torch.Tensor]],
    inv_temp: float,
    exclude_diag: bool,
    pos_offset: Optional[int],
    precision: str = "ieee",
) -> Tuple[torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(q)
    qn = q.to(acc) * (rq.to(acc) * inv_temp)[:, None]
    kn_t = (k.to(acc) * rk.to(acc)[:, None]).T
    n_q, n_k = q.shape[0], k.shape[0]
    loss = torch.empty(n_q, dtype=acc, device=q.device)
    lse = torch.empty(n_q, dtype=acc, device=q.device)
    extra = None
    if positive is not None:
        # Row i's positive is positive[0][i], scaled exactly as the columns are.
        k_pos, r_pos = positive
        extra = (qn * (k_pos.to(acc) * r_pos.to(acc)[:, None])).sum(dim=1)
    step = _rows_per_chunk(n_k)
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        s = qn[start:stop] @ kn_t
        if exclude_diag:
            _mask_(s, start, True, None, float("-inf"))
        if pos_offset is not None:
            cols = _pos_columns(start, stop, pos_offset, n_k, s.device)
            s_pos = s.gather(1, cols[:, None]).squeeze(1)
        else:
            s_pos = extra[start:stop]
        m = s.amax(dim=1)
        if extra is not None:
            m = torch.maximum(m, extra[start:stop])
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        l = s.sub_(m_safe[:, None]).exp_().sum(dim=1)
        if extra is not None:
            l += torch.exp(extra[start:stop] - m_safe)
        log_l = torch.log(l)
        loss[start:stop] = (m_safe - s_pos) + log_l
        lse[start:stop] = m_safe + log_l
    return loss, lse


def grad_accumulate(
    a: torch.Tensor,
    b: torch.Tensor,
    ra: torch.Tensor,
    rb: torch.Tensor,
    lse_a: Optional[torch.Tensor],
    g_a: Optional[torch.Tensor],
    lse_b: Optional[torch.Tensor],
    g_b: Optional[torch.Tensor],
    inv_temp: float,
    exclude_diag: bool,
    pos_offset: Optional[int],
    precision: str = "ieee",
) -> torch.Tensor:
    acc = _acc_dtype(a)
    an = a.to(acc) * (ra.to(acc) * inv_temp)[:, None]
    bn = b.to(acc) * rb.to(acc)[:, None]
    bn_t = bn.T
    n_a, n_b = a.shape[0], b.shape[0]
    out = torch.empty(n_a, a.shape[1], dtype=acc, device=a.device)
    if lse_b is not None:
        lse_b_row = lse_b.to(acc)[None, :]
        g_b_row = g_b.to(acc)[None, :]
    step = _rows_per_chunk(n_b)
    for start in range(0, n_a, step):
        stop = min(start + step, n_a)
        s = an[start:stop] @ bn_t
        w = None
        if lse_a is not None:
            w = torch.sub(s, lse_a[start:stop].to(acc)[:, None]).exp_()
            w.mul_(g_a[start:stop].to(acc)[:, None])
        if lse_b is not None:
            wb = s.sub_(lse_b_row).exp_().mul_(g_b_row)
            w = wb if w is None else w.add_(wb)
        _mask_(w, start, exclude_diag, pos_offset, 0.0)
        torch.mm(w, bn, out=out[start:stop])
    return out.mul_(inv_temp)
