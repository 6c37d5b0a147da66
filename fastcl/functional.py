"""fastcl's public functions: argument checks, reduction and dtype policy over the fused ops.

Dtype policy: any floating dtype in; similarities, logsumexp and the reduction are computed in
float32 (float64 for float64 inputs); the loss comes back in the input dtype, and gradients in
the dtype of each input.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import _config, ops, reference

_REDUCTIONS = ("mean", "sum", "none")
_NEGATIVE_MODES = ("unpaired", "paired")


# ------------------------------------------------------------------ argument checks -------


def _check_tensor(x, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.dim() != ndim:
        shape = "(N, D)" if ndim == 2 else "(N, M, D)"
        raise ValueError(f"{name} must be {ndim}-dimensional {shape}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has zero features (shape {tuple(x.shape)})")


def _check_same(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}")
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has {x.shape[-1]} features but {ref_name} has {ref.shape[-1]} "
            f"(shapes {tuple(x.shape)} and {tuple(ref.shape)})"
        )


def _check_temperature(temperature) -> float:
    """A positive, finite Python number (symbolic floats under torch.compile pass through)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"temperature must be a Python float, got {type(temperature).__name__}"
        )
    # One chained comparison (False for NaN) rather than math.isfinite, which torch.compile
    # cannot trace for a symbolic float.
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature) if isinstance(temperature, int) else temperature


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _reduce(loss: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(dtype)


# ------------------------------------------------------------------------- losses ---------


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, reduction: str = "mean") -> Tensor:
    """SimCLR's NT-Xent loss, fused: the (2N x 2N) similarity matrix is never stored.

    Args:
        z1, z2: (N, D) embeddings of two views of the same N samples, any floating dtype
            (both the same), any strides. They are L2-normalized inside.
        temperature: a positive Python float; the logits are cosine similarities / temperature.
        reduction: ``"mean"`` (over the 2N rows, as lightly's ``NTXentLoss``), ``"sum"`` or
            ``"none"`` (the 2N per-row losses, ordered [z1 rows; z2 rows]).

    Row i of ``cat([z1, z2])`` has its positive at i + N (mod 2N) and every other row except
    itself as a negative. Memory is O(N*D). The loss is computed in float32 (float64 for float64
    inputs) and returned in the input dtype.
    """
    _check_tensor(z1, "z1", 2)
    _check_tensor(z2, "z2", 2)
    _check_same(z2, "z2", z1, "z1")
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    tau = _check_temperature(temperature)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    if _config.get_backend() == "reference":
        return reference.nt_xent(z1, z2, tau, reduction)

    loss, _ = ops.nt_xent(torch.cat([z1, z2]), ops.temperature_tensor(tau))
    return _reduce(loss, reduction, z1.dtype)


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Optional[Tensor] = None,
    temperature: float = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
) -> Tensor:
    """InfoNCE with the semantics of info-nce-pytorch's ``info_nce``, fused.

    Args:
        query: (N, D).
        positive_key: (N, D); row i is query i's positive.
        negative_keys: one of
            - ``None``: in-batch negatives, one-directional: logits q_i . k_j over all j,
              label i (an N-way classification per row);
            - (M, D) with ``negative_mode="unpaired"``: negatives shared by every query, e.g. a
              MoCo queue. Logits [q_i . k_i, q_i . neg_j], label 0. Fused: no (N, M) matrix is
              stored, and no gradient is computed for negatives that don't require one;
            - (N, M, D) with ``negative_mode="paired"``: row i's own M negatives. Computed
              with a batched matrix product in PyTorch: its (N, M) logits are D times smaller
              than the input itself, so fusing it would save little.
        temperature: a positive Python float.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (N per-row losses).
        negative_mode: ``"unpaired"`` or ``"paired"``; only read when negatives are given.

    All vectors are L2-normalized inside. Computed in float32 (float64 for float64 inputs) and
    returned in the input dtype.
    """
    _check_tensor(query, "query", 2)
    _check_tensor(positive_key, "positive_key", 2)
    _check_same(positive_key, "positive_key", query, "query")
    if positive_key.shape[0] != query.shape[0]:
        raise ValueError(
            f"query and positive_key must have the same number of rows, got "
            f"{query.shape[0]} and {positive_key.shape[0]}"
        )
    tau = _check_temperature(temperature)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    _check_choice(negative_mode, "negative_mode", _NEGATIVE_MODES)
    if negative_keys is not None:
        if negative_mode == "unpaired":
            _check_tensor(negative_keys, "negative_keys", 2)
        else:
            _check_tensor(negative_keys, "negative_keys", 3)
            if negative_keys.shape[0] != query.shape[0]:
                raise ValueError(
                    "negative_keys in paired mode must be (N, M, D) with N = query rows, got "
                    f"shape {tuple(negative_keys.shape)} for {query.shape[0]} queries"
                )
        _check_same(negative_keys, "negative_keys", query, "query")
    if _config.get_backend() == "reference":
        return reference.info_nce(query, positive_key, negative_keys, tau, reduction, negative_mode)

    if negative_keys is not None and negative_mode == "paired":
        return _reduce(_paired_info_nce(query, positive_key, negative_keys, tau), reduction,
                       query.dtype)
    # The rows' gradient is formed in the forward tile pass when it will be needed.
    need_q = query.requires_grad and torch.is_grad_enabled()
    loss, _, _ = ops.info_nce(query, positive_key, negative_keys, ops.temperature_tensor(tau),
                              need_q)
    return _reduce(loss, reduction, query.dtype)


def _paired_info_nce(query: Tensor, positive_key: Tensor, negative_keys: Tensor, tau) -> Tensor:
    """Per-row InfoNCE with per-row negatives (N, M, D): batched products in PyTorch.

    Its (N, M) logits are D times smaller than the input, so a fused kernel would save little.
    """
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_hat = F.normalize(query.to(acc), dim=-1)
    k_hat = F.normalize(positive_key.to(acc), dim=-1)
    neg_hat = F.normalize(negative_keys.to(acc), dim=-1)
    positive = (q_hat * k_hat).sum(dim=1, keepdim=True)
    negative = (neg_hat @ q_hat.unsqueeze(-1)).squeeze(-1)
    logits = torch.cat([positive, negative], dim=1) / tau
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels, reduction="none")
