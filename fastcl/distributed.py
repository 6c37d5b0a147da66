"""Contrastive losses across processes, on ``torch.distributed`` (any backend: gloo, NCCL).

Each rank holds its shard of the global batch. The losses here give every rank the loss of the
whole global batch, as one process holding all of it would compute it, without any rank ever
holding a (global × global) or (local × global) similarity matrix:

- ``gather(x)``: all-gather along dim 0 with a correct backward: the gradient reaching a rank's
  shard is the sum, over ranks, of the gradients each rank computed for it. Shards may differ
  in size (a last, smaller batch).
- ``nt_xent(z1, z2, temperature)``: each rank's 2n rows against the global columns. The fused
  kernels run twice per rank: once over the rank's own block (where its self-similarities and
  positives are), once over the other ranks' rows (negatives only); the two row statistics are
  merged exactly (log-sum-exp). Memory per rank: the gathered (2N, D) embeddings plus O(tile²).
- ``info_nce(q, k, temperature)``: in-batch negatives (MoCo v3): the keys of every rank are
  the columns, the positive of local row i is its own key. (With a queue, as in MoCo v2, or
  paired negatives, each row's logits are already local: ``fastcl.info_nce(...,
  distributed=True)`` then only reduces over the global batch, with ``reduce_value``.)
- ``all_gather_rows(x)``: the same gather without autograd (the keys a MoCo queue enqueues).

Reduction and gradients. ``"mean"`` and ``"sum"`` return, on every rank, the value over the
global batch (the mean over all rows of all ranks, or their sum). The gradient each rank gets
for its shard is ``world_size`` times the gradient of that value with respect to the shard:
DistributedDataParallel averages gradients over ranks, so a DDP step then applies exactly the
gradient a single process would compute on the global batch (tested). ``"none"`` returns this
rank's rows; gradients flowing back through them are summed over ranks (``gather``'s rule).

Requires an initialized default process group (``torch.distributed.init_process_group``). Each
call exchanges the shards' sizes first (small all-gathers read on the host) so that uneven
shards work, and so that a rank with an empty batch makes every rank raise the same error
instead of leaving the others waiting; this runs eagerly (torch.compile breaks the graph
here).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather", "all_gather_rows", "nt_xent", "info_nce", "world", "reduce_value",
           "check_shards"]


def world() -> Tuple[int, int]:
    """(world_size, rank) of the default process group, or a clear error without one."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (or pass distributed=False)"
        )
    return dist.get_world_size(), dist.get_rank()


def _sizes(n: int, device: torch.device) -> List[int]:
    """Every rank's number of rows (one tiny all-gather, read on the host)."""
    size, _ = world()
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(out, mine)
    return [int(t) for t in torch.cat(out).tolist()]


def _all_gather_padded(x: Tensor, sizes: List[int]) -> Tensor:
    """All ranks' shards of x, concatenated in rank order (shards may differ in size)."""
    top = max(sizes)
    xp = x.contiguous()
    if x.shape[0] != top:
        xp = torch.cat([xp, xp.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(parts, xp)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def check_shards(x, name: str) -> List[int]:
    """Every rank calls this first: a rank whose ``name`` has no rows makes every rank raise
    the same error (one rank raising alone would leave the others waiting in a collective).
    Returns every rank's number of rows, for the gathers that follow."""
    _, rank = world()
    n = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else 0
    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    sizes = _sizes(n, device)
    empty = [r for r, s in enumerate(sizes) if s == 0]
    if empty:
        raise ValueError(f"{name} is empty on rank(s) {empty} (rows per rank: {sizes}); with "
                         "distributed=True every rank needs at least one row")
    return sizes


def all_gather_rows(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` in rank order, without autograd (e.g. keys for a shared queue)."""
    world()
    with torch.no_grad():
        return _all_gather_padded(x.detach(), _sizes(x.shape[0], x.device))


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: List[int], rank: int):
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Each rank holds the gradient of its own loss with respect to every shard; the shard's
        # owner needs their sum over ranks: a reduce-scatter on NCCL with equal shards, else an
        # all-reduce (gloo has no reduce-scatter).
        grad = grad.contiguous()
        sizes, rank = ctx.sizes, ctx.rank
        if dist.get_backend() == "nccl" and len(set(sizes)) == 1:
            out = grad.new_empty((sizes[rank],) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out, None, None
        grad = grad.clone()
        dist.all_reduce(grad)
        start = sum(sizes[:rank])
        return grad[start:start + sizes[rank]], None, None


def gather(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` (dim 0) in rank order, differentiable: the gradient that reaches
    each rank's ``x`` is the sum over ranks of the gradients computed for it."""
    _, rank = world()
    return _Gather.apply(x, _sizes(x.shape[0], x.device), rank)


def _gather_with_offsets(x: Tensor, sizes: List[int]) -> Tuple[Tensor, int, int]:
    """(gathered rows, start and end of this rank's block in them); ``sizes``: every rank's
    rows of x."""
    _, rank = world()
    start = sum(sizes[:rank])
    return _Gather.apply(x, sizes, rank), start, start + sizes[rank]


def _others(full: Tensor, start: int, end: int) -> Tensor:
    """The rows of the other ranks (autograd-tracked slices)."""
    return torch.cat([full[:start], full[end:]])


def reduce_value(rows: Tensor, reduction: str, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-row local losses → the global reduction, with DDP's gradient convention (module
    docstring): the value is global; the gradient is world_size × d(value)/d(shard). Returned
    in ``dtype``, by default the rows' own (fastcl's losses: the accumulation dtype)."""
    dtype = dtype or rows.dtype
    if reduction == "none":
        return rows.to(dtype)
    size, _ = world()
    local_sum = rows.sum()
    stats = torch.stack([local_sum.detach().to(torch.float64),
                         torch.tensor(float(rows.numel()), dtype=torch.float64,
                                      device=rows.device)])
    dist.all_reduce(stats)
    total, count = stats[0], stats[1]
    if reduction == "mean":
        scaled = local_sum * (size / count).to(local_sum.dtype)
        value = (total / count).to(local_sum.dtype)
    else:
        scaled = local_sum * size
        value = total.to(local_sum.dtype)
    return (scaled + (value - scaled).detach()).to(dtype)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, reduction: str = "mean",
            sizes: Optional[List[int]] = None) -> Tensor:
    """NT-Xent over the global batch (every rank's z1 and z2 rows); see the module docstring.
    Arguments are checked by ``fastcl.nt_xent``; ``sizes`` (every rank's rows of z1) is
    exchanged here unless given."""
    from fastcl.ops import distributed as dops

    sizes = sizes if sizes is not None else _sizes(z1.shape[0], z1.device)
    z = torch.cat([z1, z2])
    full, start, end = _gather_with_offsets(z, [2 * n for n in sizes])
    rows = dops.nt_xent_rows(z, _others(full, start, end), temperature)
    return reduce_value(rows, reduction)


def info_nce(query: Tensor, positive_key: Tensor, temperature: float,
             reduction: str = "mean", sizes: Optional[List[int]] = None) -> Tensor:
    """In-batch InfoNCE over the global batch: every rank's keys are the columns, the positive
    of a local query is its own key (see the module docstring). Arguments are checked by
    ``fastcl.info_nce``, which also handles given negatives (local rows, global reduction);
    ``sizes`` (every rank's rows) is exchanged here unless given."""
    from fastcl.ops import distributed as dops

    sizes = sizes if sizes is not None else _sizes(query.shape[0], query.device)
    keys, start, end = _gather_with_offsets(positive_key, sizes)
    rows = dops.in_batch_rows(query, positive_key, _others(keys, start, end), temperature)
    return reduce_value(rows, reduction)
