"""Row-chunked PyTorch implementation of the similarity + log-softmax kernels.

This is fastcl's CPU path until the C++ kernels land, and the fallback where Triton is missing.
It is *not* the reference: it never forms the full similarity matrix, only a bounded block of
``chunk_rows x n_cols`` at a time (``_CHUNK_ELEMS`` floats), so memory stays O(N*D) plus a
constant. Each block costs the same matrix products as the Triton kernels.

Computation is in float32 (float64 for float64 inputs). See ``fastcl.kernels`` for the contract.
"""
from __future__ import annotations

from typing import Optional

import torch

# Upper bound on the elements of one similarity block (8 MiB in float32).
_CHUNK_ELEMS = 1 << 21


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(n_cols, 1))


def _mask_diagonal_(block: torch.Tensor, row_start: int, value: float) -> None:
    """Set block[i, row_start + i] = value wherever that column exists."""
    n_rows, n_cols = block.shape
    stop = min(n_rows, n_cols - row_start)
    if stop > 0:
        idx = torch.arange(stop, device=block.device)
        block[idx, row_start + idx] = value


def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    extra: Optional[torch.Tensor],
    inv_temp: float,
    exclude_diag: bool,
    precision: str = "ieee",
) -> torch.Tensor:
    acc = _acc_dtype(q)
    qn = q.to(acc) * (rq.to(acc) * inv_temp)[:, None]
    kn_t = (k.to(acc) * rk.to(acc)[:, None]).T
    n_q, n_k = q.shape[0], k.shape[0]
    lse = torch.empty(n_q, dtype=acc, device=q.device)
    step = _rows_per_chunk(n_k)
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        s = qn[start:stop] @ kn_t
        if exclude_diag:
            _mask_diagonal_(s, start, float("-inf"))
        torch.logsumexp(s, dim=1, out=lse[start:stop])
    if extra is not None:
        lse = torch.logaddexp(lse, extra.to(acc))
    return lse


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
    precision: str = "ieee",
) -> torch.Tensor:
    acc = _acc_dtype(a)
    an = a.to(acc) * ra.to(acc)[:, None]
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
        s.mul_(inv_temp)
        w = None
        if lse_a is not None:
            w = torch.exp(s - lse_a[start:stop].to(acc)[:, None]).mul_(g_a[start:stop].to(acc)[:, None])
        if lse_b is not None:
            wb = s.sub_(lse_b_row).exp_().mul_(g_b_row)
            w = wb if w is None else w.add_(wb)
        if exclude_diag:
            _mask_diagonal_(w, start, 0.0)
        torch.mm(w, bn, out=out[start:stop])
    return out.mul_(inv_temp)
