"""Contrastive losses across processes, on ``torch.distributed`` (any backend: gloo, NCCL).

Each rank holds its shard of the global batch. The losses here give every rank the loss of the
whole global batch, as one process holding all of it would compute it, without any rank ever
holding a (global × global) or (local × global) similarity matrix:

- ``gather(x)``: all-gather along dim 0 with a correct backward: the gradient reaching a rank's
  shard is the sum, over ranks, of the gradients each rank computed for it. Shards may differ
  in size (a last, smaller batch).
- ``nt_xent(z1, z2, temperature)``: each rank's 2n rows against the global columns, through
  the engine's ops (``fastcl.engine``) with the other ranks' rows as negatives-only columns:
  the fused kernels run over the rank's own block (where its self-similarities and positives
  are) and over the other ranks' rows; the two row statistics are merged exactly
  (log-sum-exp). Memory per rank: the gathered (2N, D) embeddings plus O(tile²).
- ``info_nce(q, k, temperature)``: in-batch negatives (MoCo v3): the keys of every rank are
  the columns, the positive of local row i is its own key. (With a queue, as in MoCo v2, or
  paired negatives, each row's logits are already local: ``fastcl.info_nce(...,
  distributed=True)`` then only reduces over the global batch, with ``reduce_value``.)
- ``supcon(features, labels, ...)`` (``fastcl.supcon_loss(..., distributed=True)``): each
  rank's anchors against every rank's views (one differentiable all-gather), with every
  rank's labels (gathered): positives on other ranks count as positives.
- ``all_gather_rows(x)``: the same gather without autograd (the keys a MoCo queue enqueues).

Reduction and gradients. ``"mean"`` and ``"sum"`` return, on every rank, the value over the
global batch (the mean over all rows of all ranks, or their sum). The gradient each rank gets
for its shard is ``world_size`` times the gradient of that value with respect to the shard:
DistributedDataParallel averages gradients over ranks, so a DDP step then applies exactly the
gradient a single process would compute on the global batch (tested). ``"none"`` returns this
rank's rows; gradients flowing back through them are summed over ranks (``gather``'s rule).

Requires an initialized default process group (``torch.distributed.init_process_group``).

The ranks' agreement. Each call first exchanges a small descriptor of its arguments (one
all-gather of a few float64 numbers, read on the host: ``check_ranks``): every rank's rows, so
that uneven shards work, and everything else that must be the same on every rank: the call
itself, the feature dimension and dtype of each tensor, the temperature (exactly), the
reduction, whether negatives are given and their shape. When the ranks disagree, or a rank has
an empty batch, every rank raises the same ``ValueError`` naming what differs and each rank's
value, e.g. ``distributed=True: the ranks disagree on features (z1.shape[1]): rank 0 has 128,
rank 1 has 96``, instead of one rank crashing in the backend and the others waiting, or the
ranks silently mixing two temperatures into one loss. This runs eagerly (torch.compile breaks
the graph here).

What this cannot catch: ``distributed=True`` on some ranks only. A rank that passes it waits in
the exchange for ranks that never join it, and nothing tells it so: it blocks until the process
group's timeout (``init_process_group(timeout=...)``; 30 minutes by default on gloo), then fails
with the backend's timeout error. Pass the same ``distributed`` flag on every rank (e.g. derive
it from ``torch.distributed.is_initialized()`` or the world size, never from a per-rank
condition); the same holds for a call that some ranks skip. The local argument checks that
follow the exchange mostly depend only on what it compares, so they raise on every rank or on
none; those that compare a rank's own arguments with each other (``z2``'s rows against
``z1``'s, devices) can still raise on one rank alone, and the others then wait in the gather.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import engine

__all__ = ["gather", "all_gather_rows", "nt_xent", "info_nce", "world", "reduce_value",
           "reduce_sum", "check_ranks", "check_shards", "clip_rows", "clip_local_loss",
           "siglip", "siglip_local_loss", "supcon"]


def world() -> Tuple[int, int]:
    """(world_size, rank) of the default process group, or a clear error without one."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (or pass distributed=False)"
        )
    return dist.get_world_size(), dist.get_rank()


def _all_gather_padded(x: Tensor, sizes: List[int]) -> Tensor:
    """All ranks' shards of x, concatenated in rank order (shards may differ in size)."""
    top = max(sizes)
    xp = x.contiguous()
    if x.shape[0] != top:
        xp = torch.cat([xp, xp.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(parts, xp)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# ------------------------------------------------------------ the ranks' agreement check ----
#
# Every host-side exchange of this module is one all-gather of a fixed-length float64
# descriptor: the call, this rank's rows, then one fixed-size record per argument. Fixed length
# so that ranks in different calls still complete the collective (and get a clear error)
# instead of aborting in the backend on mismatched sizes.

_CALLS = ("fastcl.nt_xent", "fastcl.info_nce", "fastcl.distributed.nt_xent",
          "fastcl.distributed.info_nce", "fastcl.distributed.gather",
          "fastcl.distributed.all_gather_rows", "NegativeQueue.push", "fastcl.dcl_loss",
          "fastcl.clip_loss", "fastcl.nn.ClipLoss", "fastcl.siglip_loss",
          "fastcl.nn.SigLipLoss", "fastcl.supcon_loss")
# String arguments are sent as their index in these choices (-1: none of them).
_CHOICES = {"reduction": ("mean", "sum", "none"), "negative_mode": ("unpaired", "paired"),
            "contrast_mode": ("all", "one")}
# dtypes by name (not by torch object) so that the index does not depend on the torch version.
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3fnuz", "float8_e5m2fnuz", "complex32", "complex64", "complex128",
                "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
# A record: [kind, a, b, c, d, e]; for a tensor a = dim(), b = dtype index, c.. = shape[1:4].
_NONE, _NUMBER, _STR, _TENSOR, _BOOL, _OTHER = range(6)
_RECORD = 6
_MAX_FIELDS = 10
_LENGTH = 2 + _RECORD * _MAX_FIELDS


def _record(field: str, value) -> List[float]:
    nan = math.nan
    if value is None:
        return [_NONE, nan, nan, nan, nan, nan]
    if isinstance(value, bool):
        return [_BOOL, float(value), nan, nan, nan, nan]
    if isinstance(value, Tensor):
        name = str(value.dtype).replace("torch.", "")
        dtype = _DTYPE_NAMES.index(name) if name in _DTYPE_NAMES else -1
        dims = [float(s) for s in value.shape[1:4]]
        return [_TENSOR, float(value.dim()), float(dtype)] + dims + [nan] * (3 - len(dims))
    if isinstance(value, numbers.Real):  # Python and NumPy numbers
        try:
            number = float(value)  # a Python float exactly (the descriptor is float64)
        except OverflowError:
            return [_OTHER, nan, nan, nan, nan, nan]
        return [_NUMBER, number, nan, nan, nan, nan]
    if isinstance(value, str):
        choices = _CHOICES.get(field, ())
        return [_STR, float(choices.index(value) if value in choices else -1), nan, nan, nan, nan]
    return [_OTHER, nan, nan, nan, nan, nan]


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN (an unused slot, or a NaN argument) matches NaN


def _show(field: str, kind: float, slot: int, value: float) -> str:
    """One rank's value of one slot of a record, for the error message."""
    if slot == 0:
        return {_NONE: "None", _NUMBER: "a number", _STR: "a string", _TENSOR: "a tensor",
                _BOOL: "a bool", _OTHER: "another type"}[int(kind)]
    if kind == _NUMBER:
        return repr(value)
    if kind == _BOOL:
        return repr(bool(value))
    if kind == _STR:
        choices = _CHOICES.get(field, ())
        return repr(choices[int(value)]) if value >= 0 else f"none of {choices}"
    if slot == 2:  # a tensor's dtype
        return f"torch.{_DTYPE_NAMES[int(value)]}" if value >= 0 else "another dtype"
    return str(int(value))


def _label(field: str, kind: float, slot: int, ndim: int) -> str:
    if kind != _TENSOR or slot == 0:
        return field
    if slot == 1:
        return f"dimensions ({field}.dim())"
    if slot == 2:
        return f"dtype ({field}.dtype)"
    dim = slot - 2
    return f"features ({field}.shape[{dim}])" if dim == ndim - 1 else f"{field}.shape[{dim}]"


def _disagreements(descs: List[List[float]], fields: List[str]) -> List[str]:
    """'what (label): rank 0 has .., rank 1 has ..' for each slot the ranks disagree on; a
    tensor's shape is compared only when the ranks agree on its number of dimensions."""
    out = []

    def differ(slot):
        return any(not _same(d[slot], descs[0][slot]) for d in descs)

    for i, field in enumerate(fields):
        base = 2 + _RECORD * i
        if differ(base):
            slots = [0]
        else:
            kind = descs[0][base]
            slots = [s for s in range(1, _RECORD) if differ(base + s)]
            if kind == _TENSOR and 1 in slots:
                slots = [1] + [s for s in slots if s == 2]
        for s in slots:
            kind = descs[0][base]
            ndim = int(descs[0][base + 1]) if kind == _TENSOR else 0
            values = ", ".join(
                f"rank {r} has {_show(field, d[base], s, d[base + s])}"
                for r, d in enumerate(descs))
            out.append(f"{_label(field, kind, s, ndim)}: {values}")
    return out


def check_ranks(call: str, name: str, x, *, empty_ok: bool = False, **fields) -> List[int]:
    """Every rank calls this first, before any local argument check: one all-gather (read on
    the host) of a small descriptor of the call, of ``x`` (``name``) and of ``fields`` (the
    other arguments: tensors by dim, dtype and shape after the rows; numbers, exactly; strings
    of ``_CHOICES``). Returns every rank's number of rows of ``x``.

    Raises the same ``ValueError`` on every rank when the ranks are in different calls, when
    they disagree on anything but the rows (e.g. ``distributed=True: the ranks disagree on
    features (z1.shape[1]): rank 0 has 128, rank 1 has 96``), or, unless ``empty_ok``, when a
    rank's ``x`` has no rows. Malformed arguments (not tensors, wrong dims) still give a
    descriptor, so no rank raises alone before the collective; identical malformed arguments
    on every rank pass, and the local checks that follow then raise on every rank.
    """
    size, _ = world()
    names = [name] + list(fields)
    if len(names) > _MAX_FIELDS:
        raise ValueError(f"check_ranks takes at most {_MAX_FIELDS} arguments")
    desc = [float(_CALLS.index(call)),
            float(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 0.0]
    desc += _record(name, x)
    for field, value in fields.items():
        desc += _record(field, value)
    desc += [math.nan] * (_LENGTH - len(desc))
    device = next((t.device for t in [x, *fields.values()] if isinstance(t, Tensor)),
                  torch.device("cpu"))
    mine = torch.tensor(desc, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(out, mine)
    descs = torch.stack(out).cpu().tolist()
    if any(d[0] != descs[0][0] for d in descs):
        where = ", ".join(f"rank {r} in {_CALLS[int(d[0])]}" for r, d in enumerate(descs))
        raise ValueError(f"distributed=True: the ranks are in different calls: {where}")
    differ = _disagreements(descs, names)
    if differ:
        raise ValueError("distributed=True: the ranks disagree on " + "; ".join(differ))
    sizes = [int(d[1]) for d in descs]
    empty = [r for r, s in enumerate(sizes) if s == 0]
    if empty and not empty_ok and isinstance(x, Tensor) and x.dim() > 0:
        raise ValueError(f"{name} is empty on rank(s) {empty} (rows per rank: {sizes}); with "
                         "distributed=True every rank needs at least one row")
    return sizes


def check_shards(x, name: str) -> List[int]:
    """``check_ranks`` on ``x`` alone (its rows, dim and dtype); kept for existing callers."""
    return check_ranks("fastcl.distributed.gather", name, x)


def all_gather_rows(x: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """All ranks' rows of ``x`` in rank order, without autograd (e.g. keys for a shared queue).
    ``sizes`` (every rank's rows, from ``check_ranks``) is exchanged here unless given; the
    ranks must agree on everything but the rows (e.g. the features and dtype)."""
    if sizes is None:
        sizes = check_ranks("fastcl.distributed.all_gather_rows", "x", x, empty_ok=True)
    _check_rows_tensor(x, "x")
    with torch.no_grad():
        return _all_gather_padded(x.detach(), sizes)


def _check_rows_tensor(x, name: str) -> None:
    """After ``check_ranks``: the same on every rank, so every rank raises it or none."""
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise TypeError(f"{name} must be a tensor with at least one dimension, got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else 'a 0-dim tensor'}")


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
    sizes = check_ranks("fastcl.distributed.gather", "x", x, empty_ok=True)
    _check_rows_tensor(x, "x")
    return _Gather.apply(x, sizes, world()[1])


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
    return reduce_sum(rows.sum(), rows.numel(), reduction, dtype)


def reduce_sum(local_sum: Tensor, count: int, reduction: str,
               dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`reduce_value` from this rank's sum of ``count`` rows (``"mean"`` or ``"sum"``)."""
    dtype = dtype or local_sum.dtype
    size, _ = world()
    stats = torch.stack([local_sum.detach().to(torch.float64),
                         torch.tensor(float(count), dtype=torch.float64,
                                      device=local_sum.device)])
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
    if sizes is None:
        sizes = check_ranks("fastcl.distributed.nt_xent", "z1", z1, z2=z2,
                            temperature=temperature, reduction=reduction)
    return reduce_value(_rows_against_all(engine.NT_XENT, z1, z2, temperature, sizes),
                        reduction)


def _rows_against_all(spec, z1: Tensor, z2: Tensor, temperature, sizes: List[int]) -> Tensor:
    """The 2n local rows cat([z1, z2]) of a columns="rows" pass (NT-Xent, DCL) against every
    rank's rows: the own block, plus the other ranks' rows as negatives-only columns."""
    z = torch.cat([z1, z2])
    full, start, end = _gather_with_offsets(z, [2 * n for n in sizes])
    return engine.run(spec, z, others=_others(full, start, end), temperature=temperature)


def info_nce(query: Tensor, positive_key: Tensor, temperature: float,
             reduction: str = "mean", sizes: Optional[List[int]] = None) -> Tensor:
    """In-batch InfoNCE over the global batch: every rank's keys are the columns, the positive
    of a local query is its own key (see the module docstring). Arguments are checked by
    ``fastcl.info_nce``, which also handles given negatives (local rows, global reduction);
    ``sizes`` (every rank's rows) is exchanged here unless given."""
    if sizes is None:
        sizes = check_ranks("fastcl.distributed.info_nce", "query", query,
                            positive_key=positive_key, temperature=temperature,
                            reduction=reduction)
    keys, start, end = _gather_with_offsets(positive_key, sizes)
    rows = engine.run(engine.IN_BATCH, query, positive_key, others=_others(keys, start, end),
                      temperature=temperature)
    return reduce_value(rows, reduction)


def _clip_directions(image: Tensor, text: Tensor, scale, sizes: List[int]) -> Tensor:
    """(l_image_i + l_text_i) / 2 for this rank's pairs: its images against every rank's texts,
    its texts against every rank's images. Two row passes of ``engine.CLIP_ROWS``, the own
    block fused with the other ranks' rows as negatives-only columns (merged exactly); one
    all-gather of [image | text] (its backward sums each shard's gradients over ranks)."""
    d = image.shape[1]
    both, start, end = _gather_with_offsets(torch.cat([image, text], dim=1), sizes)
    others = _others(both, start, end)
    l_image = engine.run(engine.CLIP_ROWS, image, text, others=others[:, d:], scale=scale)
    l_text = engine.run(engine.CLIP_ROWS, text, image, others=others[:, :d], scale=scale)
    return (l_image + l_text) / 2


def clip_rows(image: Tensor, text: Tensor, scale, sizes: List[int]) -> Tensor:
    """The per-pair CLIP values of this rank's pairs within the global batch (every rank's
    texts are the columns of its images and the other way round). Arguments are checked by
    ``fastcl.clip_loss``, which reduces them with :func:`reduce_value` (the global value, DDP's
    gradient convention). Shards may differ in size."""
    return _clip_directions(image, text, scale, sizes)


def clip_local_loss(image: Tensor, text: Tensor, scale, sizes: List[int]) -> Tensor:
    """open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` on this rank: the mean
    over its own pairs of (l_image + l_text) / 2 against every rank's columns, with the
    gathered features' gradients summed over ranks (``torch.distributed.nn.all_gather``'s
    backward, as open_clip): each rank's features receive the sum over ranks of the gradients
    of every rank's local loss, and the scale its own rank's term. Equal shards, as open_clip
    assumes (checked by ``fastcl.nn.ClipLoss``)."""
    return _clip_directions(image, text, scale, sizes).mean()


def _siglip_against_all(image: Tensor, text: Tensor, scale, bias, sizes: List[int],
                        reduce: bool) -> Tensor:
    """This rank's images against every rank's texts (one differentiable all-gather: its
    backward sums each shard's gradients over ranks), the positive of local image i at global
    column start + i: per-row losses, or their sum with ``reduce``."""
    texts, start, _ = _gather_with_offsets(text, sizes)
    return engine.run_sigmoid(engine.SIGLIP, image, texts, scale=scale, bias=bias,
                              pos_offset=start, reduce=reduce)


def siglip(image: Tensor, text: Tensor, scale, bias, reduction: str, sizes: List[int]) -> Tensor:
    """SigLIP over the global batch (arguments checked by ``fastcl.siglip_loss``): ``"mean"``
    and ``"sum"`` the global value on every rank (the mean over every rank's pairs), DDP's
    gradient convention; ``"none"`` this rank's rows. Shards may differ in size."""
    if reduction == "none":
        return _siglip_against_all(image, text, scale, bias, sizes, reduce=False)
    return reduce_sum(_siglip_against_all(image, text, scale, bias, sizes, reduce=True),
                      image.shape[0], reduction)


def siglip_local_loss(image: Tensor, text: Tensor, scale, bias, sizes: List[int]) -> Tensor:
    """open_clip's ``SigLipLoss`` on several ranks, on this rank: its images against every
    rank's texts, summed and divided by its own number of images (open_clip's local value);
    the gathered texts' gradients are summed over ranks (as open_clip's neighbour exchanges
    give), the scale and bias get this rank's term."""
    return _siglip_against_all(image, text, scale, bias, sizes, reduce=True) / image.shape[0]


def supcon(features: Tensor, labels: Optional[Tensor], tau, factor, contrast_mode: str,
           reduction: str, sizes: List[int]) -> Tensor:
    """SupCon over the global batch (arguments checked by ``fastcl.supcon_loss``; ``sizes``:
    every rank's samples): this rank's anchors against every rank's views, each rank's (V b_r,
    D) view-major block gathered in rank order (one differentiable all-gather: its backward
    sums each shard's gradients over ranks), labels gathered alongside (without labels, each
    sample's global index, so that only its own views are its positives). ``"mean"`` and
    ``"sum"``: the global value on every rank, DDP's gradient convention; ``"none"``: this
    rank's anchors, (b, V) or (b,)."""
    from fastcl import functional

    b, v, _ = features.shape
    _, rank = world()
    if labels is None:
        labels = torch.arange(b, device=features.device) + sum(sizes[:rank])
    z = functional._views_major(features)
    block_sizes = [v * s for s in sizes]
    full, start, _ = _gather_with_offsets(z, block_sizes)
    z_labels = labels.repeat(v)  # z's rows' labels, view-major as z
    all_labels = all_gather_rows(z_labels, block_sizes)
    if contrast_mode == "all":
        rows = engine.run_labels(engine.SUPCON_ROWS, z, full, row_labels=z_labels,
                                 col_labels=all_labels, offset=start, temperature=tau)
    else:
        rows = engine.run_labels(engine.SUPCON_ROWS, features[:, 0], full, row_labels=labels,
                                 col_labels=all_labels, offset=start, temperature=tau)
    rows = functional._times(rows, factor)
    if reduction == "none":
        return rows.view(v, b).T if contrast_mode == "all" else rows
    return reduce_value(rows, reduction)
