"""fastcl's public functions: argument checks, reduction and dtype policy over the fused ops.

Dtype policy (every loss, every reduction, single- and multi-process):

- inputs of any floating dtype, and they may differ (a bfloat16 query beside a float32 queue
  under autocast): they are promoted to a common dtype (``torch.promote_types``; float32 for
  bfloat16 with float16);
- accumulation is in float64 when any input is float64, otherwise in float32;
- the loss (for ``reduction="none"`` too) comes back in that accumulation dtype, so a bfloat16
  or float16 input gives a float32 loss, inside and outside autocast, as PyTorch's own
  ``cross_entropy`` under autocast does;
- each gradient comes back in its input's dtype.

Higher-order gradients: the fused ops' backward passes are kernels, not differentiable
graphs. A backward with ``create_graph=True`` through them raises a ``RuntimeError`` naming
the op, at the first backward (never a silently wrong second derivative).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import _config, engine, ops, reference

_REDUCTIONS = ("mean", "sum", "none")
_NEGATIVE_MODES = ("unpaired", "paired")


# ------------------------------------------------------------------ argument checks -------


def _check_tensor(x, name: str, ndim: int, shape: str = "", hint: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.dim() != ndim:
        shape = shape or ("(N, D)" if ndim == 2 else "(N, M, D)")
        raise ValueError(f"{name} must be {ndim}-dimensional {shape}, got shape "
                         f"{tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has zero features (shape {tuple(x.shape)})")


def _check_same(x: Tensor, name: str, ref: Tensor, ref_name: str, hint: str = "") -> None:
    """Same device and feature count (dtypes may differ: see the module's dtype policy)."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has {x.shape[-1]} features but {ref_name} has {ref.shape[-1]} "
            f"(shapes {tuple(x.shape)} and {tuple(ref.shape)}){hint}"
        )


def _promote(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """The inputs in one common floating dtype (``torch.promote_types``: a bfloat16 query with
    a float32 queue runs in float32). Inputs already in it pass unchanged (no copy); the casts
    are differentiable, so each gradient comes back in its input's dtype."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _check_temperature(temperature):
    """A positive finite real number (Python or NumPy scalar), or a one-element floating
    tensor that may require grad (a learnable temperature): see
    :func:`fastcl.engine.check_temperature`."""
    return engine.check_temperature(temperature)


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """Per-row losses (in the accumulation dtype) reduced; the dtype is kept."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ------------------------------------------------------------------------- losses ---------


_LABELS_HINT = (
    "nt_xent takes two views, z1 and z2, each (N, D) embeddings of the same N samples (row i "
    "of z1 and row i of z2 are the positive pair). It looks like it was called as "
    "pytorch-metric-learning's loss(embeddings, labels): for two views whose labels are "
    "arange(N) repeated twice (SelfSupervisedLoss), call nt_xent(embeddings[:N], "
    "embeddings[N:]); for labels with several positives per anchor, call "
    "fastcl.supcon_loss(embeddings, labels)"
)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, reduction: str = "mean",
            distributed: bool = False) -> Tensor:
    """SimCLR's NT-Xent loss, fused: the (2N x 2N) similarity matrix is never stored.

    Args:
        z1, z2: (N, D) embeddings of two views of the same N samples, any floating dtype (they
            may differ), any strides. They are L2-normalized inside.
        temperature: a positive real number (Python or NumPy scalar); the logits are cosine
            similarities / temperature.
        reduction: ``"mean"`` (over the 2N rows, as lightly's ``NTXentLoss``), ``"sum"`` or
            ``"none"`` (the 2N per-row losses, ordered [z1 rows; z2 rows]).
        distributed: the global batch is every rank's z1, z2 (``torch.distributed``): each
            rank's rows are scored against all ranks' rows and ``"mean"``/``"sum"`` reduce over
            the global batch; gradients follow DDP's convention (``fastcl.distributed``).

    Row i of ``cat([z1, z2])`` has its positive at i + N (mod 2N) and every other row except
    itself as a negative. Memory is O(N*D). The loss is computed and returned in float32
    (float64 if an input is float64), also for bfloat16 and float16 inputs; gradients come
    back in each input's dtype. Not twice differentiable (``create_graph=True`` raises).
    """
    sizes = None
    if distributed:
        sizes = _dist().check_ranks("fastcl.nt_xent", "z1", z1, z2=z2, temperature=temperature,
                                    reduction=reduction)  # all ranks together, before local errors
    z1, z2, tau = _check_views(z1, z2, temperature, reduction)
    if distributed:
        return _dist().nt_xent(z1, z2, tau, reduction, sizes)
    return _reduce(engine.run(engine.NT_XENT, torch.cat([z1, z2]), temperature=tau), reduction)


def _check_views(z1, z2, temperature, reduction: str):
    """The checked two-view arguments of nt_xent / dcl_loss: (z1, z2) promoted, and tau."""
    _check_tensor(z1, "z1", 2)
    if (isinstance(z2, Tensor) and z2.dim() == 1 and not z2.is_floating_point()
            and isinstance(z1, Tensor) and z2.shape[0] == z1.shape[0]):
        raise TypeError(f"{_LABELS_HINT} (got an integer z2 of shape {tuple(z2.shape)})")
    _check_tensor(z2, "z2", 2)
    _check_same(z2, "z2", z1, "z1")
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    tau = _check_temperature(temperature)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    z1, z2 = _promote(z1, z2)
    return z1, z2, tau


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's positive weights (lightly's function of the same name): 2 - N softmax_i(out0_i .
    out1_i / sigma), from detached inputs (no gradient). lightly passes L2-normalized rows."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0:
        raise ValueError(f"sigma must be a positive real number, got {sigma!r}")
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


def dcl_loss(z1: Tensor, z2: Tensor, temperature=0.1, weight_fn=None, reduction: str = "mean",
             distributed: bool = False) -> Tensor:
    """Decoupled contrastive loss (DCL, Yeh et al. 2021), fused: NT-Xent without the positive
    in the denominator, as lightly's ``DCLLoss``.

    Row i of ``cat([z1, z2])`` (2N rows) has the loss -w_i s_pos_i + log sum_{j != i, pos}
    exp(s_ij): one logsumexp over its 2N - 2 negatives (the DCL paper's eq. 6; lightly before
    1.5 summed two separate logsumexps), s = cosine similarity / temperature.

    Args:
        z1, z2: (N, D) two views, any floating dtypes (promoted), L2-normalized inside.
        temperature: a positive real number, or a one-element tensor (learnable: it gets its
            gradient from the kernels).
        weight_fn: optional ``weight_fn(out0, out1) -> (N,)`` positive weights, called as
            lightly calls it: with the L2-normalized views, ``(zhat1, zhat2)`` for the first
            view's rows and ``(zhat2, zhat1)`` for the second's; its gradient flows (lightly's
            ``DCLWLoss`` weights, :func:`negative_mises_fisher_weights`, are detached). ``None``:
            all weights 1.
        reduction: ``"mean"`` (over the 2N rows: lightly's 0.5 (loss0 + loss1)), ``"sum"`` or
            ``"none"`` (the 2N rows, [z1 rows; z2 rows]).
        distributed: the global batch is every rank's rows, as ``nt_xent(distributed=True)``:
            each rank's rows are scored against every rank's, and the value is the global
            mean (lightly's ``gather_distributed=True`` returns each rank's local mean instead;
            with equal shards the DDP-averaged gradients are the same). The weights are
            computed per rank, over its own batch, as lightly does.

    Needs N >= 2 (globally): with one sample no row has a negative. Memory is O(N*D); the loss is
    float32 for 16-bit inputs (float64 for float64). Not twice differentiable.
    """
    sizes = None
    if distributed:
        sizes = _dist().check_ranks("fastcl.dcl_loss", "z1", z1, z2=z2, temperature=temperature,
                                    reduction=reduction, weighted=weight_fn is not None)
    z1, z2, tau = _check_views(z1, z2, temperature, reduction)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
    if (sum(sizes) if sizes is not None else z1.shape[0]) < 2:
        raise ValueError("dcl_loss needs at least 2 samples (z1 has 1 row): with one sample no "
                         "row has a negative")
    # The weights first: a bad weight_fn fails before any kernel runs.
    weight_term = None if weight_fn is None else _dcl_weight_term(z1, z2, tau, weight_fn)
    if distributed:
        rows = _dist()._rows_against_all(engine.DCL, z1, z2, tau, sizes)
    else:
        rows = engine.run(engine.DCL, torch.cat([z1, z2]), temperature=tau)
    if weight_term is not None:
        rows = rows + weight_term.to(rows.dtype)
    if distributed:
        return _dist().reduce_value(rows, reduction)
    return _reduce(rows, reduction)


def _dcl_weight_term(z1: Tensor, z2: Tensor, tau, weight_fn) -> Tensor:
    """(1 - w_i) s_pos_i per row: the kernels' rows have weight 1 on the positive."""
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    a, b = F.normalize(z1.to(acc), dim=1), F.normalize(z2.to(acc), dim=1)
    n = a.shape[0]
    w = []
    for x, y, view in ((a, b, "(zhat1, zhat2)"), (b, a, "(zhat2, zhat1)")):
        wi = weight_fn(x, y)
        if not isinstance(wi, Tensor) or wi.shape not in ((n,), (n, 1)):
            raise ValueError(f"weight_fn{view} must return a tensor of shape ({n},), got "
                             f"{tuple(wi.shape) if isinstance(wi, Tensor) else type(wi).__name__}")
        w.append(wi.reshape(n).to(acc))
    s_pos = reference._divide((a * b).sum(dim=1), tau)
    return torch.cat([(1 - w[0]) * s_pos, (1 - w[1]) * s_pos])


def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Optional[Tensor] = None,
    temperature: float = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    distributed: bool = False,
) -> Tensor:
    """InfoNCE with the semantics of info-nce-pytorch's ``info_nce``, fused.

    Args:
        query: (N, D); or a single (D,) query with a (D,) positive and (M, D) negatives in
            unpaired mode (the textbook form -log(e^{q.k+/t} / (e^{q.k+/t} + sum_j
            e^{q.k-_j/t}))), which returns that one query's 0-dim loss.
        positive_key: (N, D) (or (D,) with a (D,) query); row i is query i's positive.
        negative_keys: one of
            - ``None``: in-batch negatives, one-directional: logits q_i . k_j over all j,
              label i (an N-way classification per row);
            - (M, D) with ``negative_mode="unpaired"``: negatives shared by every query, e.g. a
              MoCo queue (one key per row; pass ``queue.T`` for a FAIR-style (D, K) buffer).
              Logits [q_i . k_i, q_i . neg_j], label 0. Fused: no (N, M) matrix is stored, and
              no gradient is computed for negatives that don't require one;
            - (N, M, D) with ``negative_mode="paired"``: row i's own M negatives. Computed
              with a batched matrix product in PyTorch: its (N, M) logits are D times smaller
              than the input itself, so fusing it would save little.
        temperature: a positive real number (Python or NumPy scalar).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (N per-row losses).
        negative_mode: ``"unpaired"`` or ``"paired"``; only read when negatives are given.
        distributed: the global batch is every rank's rows (``torch.distributed``). In-batch
            negatives then come from every rank's keys (MoCo v3 across GPUs); with given
            negatives (a queue every rank holds the same) the rows are local and only the
            reduction is global. Gradients follow DDP's convention (``fastcl.distributed``).

    All vectors are L2-normalized inside. The three inputs may have different floating dtypes
    (a bfloat16 query beside a float32 queue under autocast): the loss is computed and returned
    in float32 (float64 if an input is float64), and each gradient comes back in its input's
    dtype. Not twice differentiable (``create_graph=True`` raises), except in paired mode.
    """
    if distributed:
        sizes = _dist().check_ranks(  # all ranks together, before local errors
            "fastcl.info_nce", "query", query, positive_key=positive_key,
            negative_keys=negative_keys, temperature=temperature, reduction=reduction,
            negative_mode=negative_mode)
    single = isinstance(query, Tensor) and query.dim() == 1
    if single:
        query, positive_key = _single_query(query, positive_key, negative_keys, negative_mode,
                                            distributed)
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
            _check_tensor(negative_keys, "negative_keys", 2, "(M, D) in unpaired mode",
                          "; for per-query negatives (N, M, D) pass negative_mode='paired'"
                          if isinstance(negative_keys, Tensor) and negative_keys.dim() == 3
                          else "")
            transposed = (negative_keys.shape[0] == query.shape[1]
                          and negative_keys.shape[1] != query.shape[1])
            _check_same(negative_keys, "negative_keys", query, "query",
                        "; negative_keys is (M, D), one key per row: for a FAIR-style (D, K) "
                        "queue buffer pass its transpose, queue.T (no copy)" if transposed
                        else "")
        else:
            _check_tensor(negative_keys, "negative_keys", 3, "(N, M, D) in paired mode")
            if negative_keys.shape[0] != query.shape[0]:
                raise ValueError(
                    "negative_keys in paired mode must be (N, M, D) with N = query rows, got "
                    f"shape {tuple(negative_keys.shape)} for {query.shape[0]} queries"
                )
            _check_same(negative_keys, "negative_keys", query, "query")
        query, positive_key, negative_keys = _promote(query, positive_key, negative_keys)
    else:
        query, positive_key = _promote(query, positive_key)
    if distributed:
        if negative_keys is None:  # every rank's keys are the columns
            return _dist().info_nce(query, positive_key, tau, reduction, sizes)
        # Given negatives (a queue all ranks share, or paired): the rows are local.
        rows = _info_nce_rows(query, positive_key, negative_keys, tau, negative_mode)
        return _dist().reduce_value(rows, reduction)
    return _reduce(_info_nce_rows(query, positive_key, negative_keys, tau, negative_mode),
                   "sum" if single else reduction)


def _single_query(query: Tensor, positive_key, negative_keys, negative_mode: str,
                  distributed: bool):
    """The (D,) query form: checked, and returned as a batch of one, (1, D) and (1, D)."""
    if negative_keys is None or negative_mode != "unpaired" or distributed:
        raise ValueError(
            f"query has shape {tuple(query.shape)}: a single (D,) query is accepted only with "
            "a (D,) positive_key and (M, D) negative_keys in unpaired mode, without "
            "distributed=True; otherwise query must be (N, D)"
        )
    if not isinstance(positive_key, Tensor) or positive_key.dim() != 1:
        raise ValueError(
            f"query is a single (D,) vector, so positive_key must be (D,) too, got "
            f"{tuple(positive_key.shape) if isinstance(positive_key, Tensor) else type(positive_key).__name__}"
        )
    return query.unsqueeze(0), positive_key.unsqueeze(0)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
              reduction: str = "mean", distributed: bool = False) -> Tensor:
    """CLIP's symmetric loss (open_clip's ``ClipLoss``), fused: both softmax directions from
    one pass over the tiles, no (N x N) logits stored.

    logits = logit_scale * image_features @ text_features^T (+ logit_bias);
    loss = (CE(logits, arange(N)) + CE(logits^T, arange(N))) / 2.

    Args:
        image_features, text_features: (N, D), row i of each a matching pair; any floating
            dtypes (promoted to a common one), same device. Used as given: open_clip's model
            normalizes them, and they are not normalized again here.
        logit_scale: the logits' multiplier, as open_clip passes it (``logit_scale.exp()`` of
            the model's parameter): a positive finite Python float, or a one-element floating
            tensor, possibly requiring grad (its gradient comes from the kernels' ``dscale``
            statistic). The clamp of the learnable parameter stays in the training loop.
        logit_bias: optional, accepted as open_clip accepts it (a number or a one-element
            tensor). A bias added to every logit cancels exactly in both softmaxes: it changes
            neither the value nor any other gradient, and its own gradient is zero (exactly
            zero here, where open_clip's autograd gives zero up to rounding). It stays in the
            graph (as ``0 * logit_bias``), so a NaN or infinite bias still gives a NaN loss, as
            it does in open_clip, and its gradient is a real zero tensor (NaN where the upstream
            gradient is).
        reduction: ``"mean"`` (open_clip's value), ``"sum"``, or ``"none"``: the N per-pair
            values (l_image_i + l_text_i) / 2, l_image_i the loss of row i of the logits,
            l_text_i that of column i.
        distributed: the global batch is every rank's rows (``torch.distributed``), as
            ``nt_xent(distributed=True)``: every rank's images are scored against every rank's
            texts and the other way round, ``"mean"``/``"sum"`` give the global value on every
            rank, and gradients follow DDP's averaging convention (``fastcl.distributed``).
            Shards may differ in size. (open_clip's per-rank ``local_loss=True,
            gather_with_grad=True`` semantics are :class:`fastcl.nn.ClipLoss`'s.)

    The loss is float32 for bfloat16, float16 and float32 inputs (float64 for float64), inside
    and outside autocast; each gradient comes back in its input's dtype. Memory O(N D). Not
    twice differentiable (``create_graph=True`` raises), except on the reference backend.
    """
    sizes = None
    if distributed:
        sizes = _dist().check_ranks("fastcl.clip_loss", "image_features", image_features,
                                    text_features=text_features, logit_scale=logit_scale,
                                    logit_bias=logit_bias, reduction=reduction)
    image, text, scale, bias = _check_clip(image_features, text_features, logit_scale,
                                           logit_bias, reduction)
    if distributed:
        loss = _dist().reduce_value(_dist().clip_rows(image, text, scale, sizes), reduction)
    else:
        loss = _reduce(_clip_rows(image, text, scale), reduction)
    return _with_bias(loss, bias)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                reduction: str = "mean", distributed: bool = False) -> Tensor:
    """SigLIP's sigmoid loss (open_clip's ``SigLipLoss``), fused: one tiled pass, no (N x N)
    logits stored, gradients for the features, the scale and the bias.

    logits = logit_scale * image_features @ text_features^T + logit_bias; labels +1 on the
    diagonal (pair i), -1 elsewhere; loss = -sum_ij log sigmoid(label_ij * logit_ij) / N.

    Args:
        image_features, text_features: (N, D), row i of each a matching pair; any floating
            dtypes (promoted to a common one), same device. Used as given (open_clip's model
            normalizes them).
        logit_scale: the logits' multiplier as open_clip passes it (``logit_scale.exp()`` of
            the model's parameter): a finite Python number, or a one-element floating tensor,
            possibly requiring grad. Any sign (not checked on the host for a tensor).
        logit_bias: the logits' offset (open_clip initializes it at -10): a finite number, a
            one-element floating tensor possibly requiring grad, or None (no bias).
        reduction: ``"mean"`` (open_clip's value: the sum over all N x N pairs divided by N),
            ``"sum"`` (the sum), or ``"none"`` (each image's row sum, (N,)).
        distributed: the global batch is every rank's pairs (``torch.distributed``), as
            ``nt_xent(distributed=True)``: this rank's images are scored against every rank's
            texts (gathered once: O(N_global D) per rank, no block matrix), ``"mean"`` and
            ``"sum"`` give the global value on every rank (the mean divides by the global
            number of pairs) and gradients follow DDP's averaging convention
            (``fastcl.distributed``); ``"none"`` gives this rank's rows. Shards may differ in
            size. (open_clip's per-rank value is :class:`fastcl.nn.SigLipLoss`'s.)

    For ``"mean"`` and ``"sum"`` the forward's tile pass also forms both features' gradients,
    and the backward only scales them by the upstream gradient (three matrix products in all,
    as Liger-Kernel's fused cross-entropy); ``"none"`` recomputes the logits in the backward
    (four). The summed forms hand their precomputed gradients to the backward, scaled in
    place (no second copy); a second backward through the same graph (``retain_graph=True``)
    recomputes them. The loss
    is float32 for bfloat16, float16 and float32 inputs (float64 for float64), inside and
    outside autocast; each gradient comes back in its input's dtype.
    log sigmoid is computed as -softplus, finite for logits of any finite size. Memory
    O(N D). Not twice differentiable (``create_graph=True`` raises), except on the reference
    backend.
    """
    sizes = None
    if distributed:
        sizes = _dist().check_ranks("fastcl.siglip_loss", "image_features", image_features,
                                    text_features=text_features, logit_scale=logit_scale,
                                    logit_bias=logit_bias, reduction=reduction)
    image, text, scale, bias = _check_siglip(image_features, text_features, logit_scale,
                                             logit_bias, reduction)
    if distributed:
        return _dist().siglip(image, text, scale, bias, reduction, sizes)
    if reduction == "none":
        return engine.run_sigmoid(engine.SIGLIP, image, text, scale=scale, bias=bias)
    total = engine.run_sigmoid(engine.SIGLIP, image, text, scale=scale, bias=bias, reduce=True)
    return total / image.shape[0] if reduction == "mean" else total


_CONTRAST_MODES = ("all", "one")


def supcon_loss(features: Tensor, labels: Optional[Tensor] = None, temperature=0.07,
                base_temperature=None, contrast_mode: str = "all", reduction: str = "mean",
                distributed: bool = False) -> Tensor:
    """Supervised contrastive loss (SupCon, Khosla et al. 2020) and multi-view SimCLR, fused:
    SupContrast's ``SupConLoss`` without its dense (V B)^2 tensors (memory O(V B D)).

    Args:
        features: (B, V, D) embeddings of V views of B samples, or (B, D) for one view (one
            view needs ``labels``: without them no anchor has a positive, a ValueError). Any
            floating dtype, any strides; L2-normalized inside (SupContrast expects unit-norm
            inputs and does not normalize: on those the two agree, and a user's own
            normalization upstream keeps its values and gradients).
        labels: (B,) integer class labels (a (B, 1) column is accepted too), or ``None``: the
            positives of an anchor are then the other views of its own sample (multi-view
            SimCLR; with V = 2 this is :func:`nt_xent` of the two views).
        temperature: tau > 0, a Python float or a one-element tensor that may require grad.
        base_temperature: tau_base > 0 (a float or tensor), or ``None`` for tau itself (no
            extra factor). SupContrast's module default is 0.07.
        contrast_mode: ``"all"`` (every view of every sample is an anchor) or ``"one"``
            (view 0 only), against every view of every sample.
        reduction: ``"mean"`` over the anchors, ``"sum"``, or ``"none"``: (B, V) per anchor
            for ``"all"``, (B,) for ``"one"``.
        distributed: every rank's samples (and labels) form the global batch: its anchors are
            scored against every rank's views, and positives on other ranks count as
            positives; ``"mean"``/``"sum"`` reduce over the global batch, gradients follow
            DDP's convention (``fastcl.distributed``). Shards may differ in size.

    For anchor i: -(tau / tau_base) * mean over its positives p of log(exp(s_ip) / sum_{a != i}
    exp(s_ia)), s = cosine similarity / tau. An anchor without a positive (a class seen once
    in the batch, with one view) contributes 0 and still counts in the mean, as SupContrast
    does since it stopped giving NaN for them. An arbitrary (B, B) positive mask is not
    accepted (it would bring back the O(B^2) memory): express it as ``labels``. The loss is
    float32 (float64 for float64 features); gradients come back in the features' dtype. Not
    twice differentiable (``create_graph=True`` raises).
    """
    sizes = None
    if distributed:
        sizes = _dist().check_ranks("fastcl.supcon_loss", "features", features, labels=labels,
                                    temperature=temperature, base_temperature=base_temperature,
                                    contrast_mode=contrast_mode, reduction=reduction)
    features, labels, tau, factor = _check_supcon(features, labels, temperature,
                                                  base_temperature, contrast_mode, reduction)
    if distributed:
        return _dist().supcon(features, labels, tau, factor, contrast_mode, reduction, sizes)
    b, v, _ = features.shape
    if labels is None:
        labels = torch.arange(b, device=features.device)
    z = _views_major(features)
    all_labels = labels.repeat(v)
    if contrast_mode == "all":
        rows = engine.run_labels(engine.SUPCON, z, row_labels=all_labels, temperature=tau)
    else:
        rows = engine.run_labels(engine.SUPCON_ROWS, features[:, 0], z, row_labels=labels,
                                 col_labels=all_labels, temperature=tau)
    rows = _times(rows, factor)
    if reduction == "none":
        return rows.view(v, b).T if contrast_mode == "all" else rows
    return _reduce(rows, reduction)


def _views_major(features: Tensor) -> Tensor:
    """(B, V, D) -> (V B, D), view 0's B rows first (SupContrast's contrast_feature)."""
    b, v, d = features.shape
    return features[:, 0] if v == 1 else features.transpose(0, 1).reshape(v * b, d)


def _times(rows: Tensor, factor) -> Tensor:
    """rows * (tau / tau_base): nothing for None (tau_base = tau), else through autograd."""
    if factor is None:
        return rows
    if isinstance(factor, Tensor):
        factor = factor.to(device=rows.device, dtype=rows.dtype)
    return rows * factor


def _check_supcon(features, labels, temperature, base_temperature, contrast_mode: str,
                  reduction: str):
    """(features (B, V, D), labels (B,) int64 or None, tau, tau / tau_base or None)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() == 2:
        if labels is None:
            raise ValueError(
                "supcon_loss: features of shape (B, D) are one view, and without labels no "
                "anchor has a positive; pass labels (B,), or features (B, V, D) with V >= 2 "
                "views for multi-view SimCLR")
        features = features.unsqueeze(1)
    _check_tensor(features, "features", 3, shape="(B, V, D) (or (B, D) with labels)")
    if features.shape[1] == 0:
        raise ValueError(f"features has no views (shape {tuple(features.shape)}): "
                         "(B, V, D) needs V >= 1")
    if features.shape[1] == 1 and labels is None:
        raise ValueError(
            f"supcon_loss: features {tuple(features.shape)} have one view, and without labels "
            "no anchor has a positive; pass labels (B,), or V >= 2 views for multi-view SimCLR")
    if labels is not None:
        labels = _check_labels(labels, features)
    tau = _check_temperature(temperature)
    factor = None
    if base_temperature is not None:
        base = engine.check_temperature(base_temperature, "base_temperature")
        factor = tau / base
    _check_choice(contrast_mode, "contrast_mode", _CONTRAST_MODES)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    return features, labels, tau, factor


def _check_labels(labels, features: Tensor) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer class labels, got "
                        f"{type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype (class indices), got {labels.dtype}")
    b = features.shape[0]
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # SupContrast's labels.view(-1, 1) column
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(f"labels must have shape (B,) = ({b},), one label per sample of "
                         f"features {tuple(features.shape)}, got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels is on {labels.device} but features is on {features.device}")
    return labels.to(torch.int64).contiguous()


def _check_siglip(image_features, text_features, logit_scale, logit_bias, reduction: str):
    """The checked arguments of siglip_loss / SigLipLoss: (image, text) promoted to one dtype,
    the scale and the bias (None, a float or a 0-dim tensor)."""
    _check_pairs(image_features, text_features)
    scale = _check_real(logit_scale, "logit_scale")
    bias = None if logit_bias is None else _check_real(logit_bias, "logit_bias")
    _check_choice(reduction, "reduction", _REDUCTIONS)
    image, text = _promote(image_features, text_features)
    return image, text, scale, bias


def _check_pairs(image_features, text_features) -> None:
    """Two (N, D) floating tensors of matching pairs on one device (CLIP, SigLIP)."""
    _check_tensor(image_features, "image_features", 2)
    _check_tensor(text_features, "text_features", 2)
    _check_same(text_features, "text_features", image_features, "image_features")
    if text_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            f"image_features and text_features must hold the same number of pairs (row i of "
            f"each is a matching image-text pair), got {image_features.shape[0]} and "
            f"{text_features.shape[0]} rows")


def _check_real(value, name: str):
    """A finite real number (returned as a float) or a one-element floating tensor (a 0-dim
    view; its value is not read)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise TypeError(f"{name} must be a number or a one-element floating tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element floating tensor, got "
                        f"{type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_clip(image_features, text_features, logit_scale, logit_bias, reduction: str):
    """The checked arguments of clip_loss / ClipLoss: (image, text) promoted to one dtype, the
    scale (a float or a 0-dim tensor) and the bias (None, a float or a 0-dim tensor)."""
    _check_pairs(image_features, text_features)
    scale = engine.check_temperature(logit_scale, "logit_scale")
    bias = _check_bias(logit_bias)
    _check_choice(reduction, "reduction", _REDUCTIONS)
    image, text = _promote(image_features, text_features)
    return image, text, scale, bias


def _check_bias(logit_bias):
    if logit_bias is None:
        return None
    if isinstance(logit_bias, Tensor):
        if not logit_bias.is_floating_point() or logit_bias.numel() != 1:
            raise TypeError(f"logit_bias must be None, a number or a one-element floating "
                            f"tensor, got a {logit_bias.dtype} tensor of shape "
                            f"{tuple(logit_bias.shape)}")
        return logit_bias.reshape(())
    if isinstance(logit_bias, bool) or not isinstance(logit_bias, numbers.Real):
        raise TypeError(f"logit_bias must be None, a number or a one-element floating tensor, "
                        f"got {type(logit_bias).__name__}")
    return float(logit_bias)


def _with_bias(loss: Tensor, bias) -> Tensor:
    """The loss with the bias's exact contribution, 0 * bias (see clip_loss): the bias stays
    in the graph (NaN / inf propagate, its gradient is a zero tensor) and changes nothing
    else."""
    if bias is None:
        return loss
    if isinstance(bias, Tensor):
        return loss + (bias * 0).to(loss.dtype)
    return loss + 0.0 * bias


def _clip_rows(image: Tensor, text: Tensor, scale) -> Tensor:
    """The N per-pair values (l_image_i + l_text_i) / 2 of checked arguments (one fused pass
    for both directions)."""
    both = engine.run(engine.CLIP, image, text, scale=scale)
    n = image.shape[0]
    return (both[:n] + both[n:]) / 2


def _info_nce_rows(query, positive_key, negative_keys, tau, negative_mode) -> Tensor:
    """Per-row InfoNCE losses (float32, float64 for float64) of checked arguments."""
    if negative_keys is None:
        return engine.run(engine.IN_BATCH, query, positive_key, temperature=tau)
    if negative_mode == "paired":
        if _config.get_backend() == "reference":
            return reference.info_nce(query, positive_key, negative_keys, tau, "none", "paired")
        return _paired_info_nce(query, positive_key, negative_keys, tau)
    return engine.run(engine.QUEUE, query, negative_keys, key=positive_key, temperature=tau)


def _dist():
    from fastcl import distributed

    return distributed


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
    logits = reference._divide(torch.cat([positive, negative], dim=1), tau)
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels, reduction="none")


def byol_loss(p: Tensor, z: Tensor, reduction: str = "none") -> Tensor:
    """BYOL's normalized MSE, fused: 2 - 2 cos(p_i, z_i) = ||p̂_i - ẑ_i||² per row.

    Args:
        p: (B, F) predictions of the online network.
        z: (B, F) projections of the target network, on p's device (its floating dtype may
            differ: both are promoted to a common one). Treated as a constant: it gets no
            gradient (BYOL's stop-gradient), whether or not it requires one.
        reduction: ``"none"`` (default: the B per-row losses), ``"mean"`` or ``"sum"``.

    As BYOL's code computes it, ``2 - 2 * (F.normalize(p) * F.normalize(z)).sum(1)``: norms
    clamped at 1e-12, so a zero row gives 2 and a finite gradient. One pass over
    p and z forward and one backward (C++ on CPU, Triton on CUDA), in float32 (float64 if an
    input is float64), and returned in that dtype (float32 for bfloat16 and float16 inputs);
    p's gradient comes back in p's dtype. Not twice differentiable (``create_graph=True``
    raises).
    """
    _check_tensor(p, "p", 2)
    _check_tensor(z, "z", 2)
    _check_same(z, "z", p, "p")
    if z.shape != p.shape:
        raise ValueError(f"p and z must have the same shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    _check_choice(reduction, "reduction", _REDUCTIONS)
    p, z = _promote(p, z.detach())
    if _config.get_backend() == "reference":
        return reference.byol_loss(p, z, reduction)
    return _reduce(ops.cosine(p, z), reduction)


# ------------------------------------------------------------------------- momentum -------

_BUFFER_MODES = ("average", "copy", "none")


def _momentum_tensor(momentum) -> Tensor:
    """The 0-dim tensor form of ``momentum`` the op takes, checked."""
    if isinstance(momentum, Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(
                f"momentum must be a float or a one-element floating tensor, got "
                f"{momentum.dtype} tensor of shape {tuple(momentum.shape)}"
            )
        return momentum.detach().reshape(())
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float or a tensor, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    # A product keeps a symbolic float symbolic under torch.compile (see temperature_tensor).
    return torch.ones((), dtype=torch.float64) * momentum


def _ema_pairs(target, source, buffers: str):
    """(targets, sources) to average and (targets, sources) to copy, checked.

    The checks compare whole lists at once and name the offending tensor only on failure:
    per-tensor Python checks would cost more than the update itself for 161 small tensors.
    """
    if isinstance(target, torch.nn.Module) != isinstance(source, torch.nn.Module):
        raise TypeError("target and source must both be nn.Modules or both sequences of tensors")
    if isinstance(target, torch.nn.Module):
        _check_choice(buffers, "buffers", _BUFFER_MODES)
        tp, sp = dict(target.named_parameters()), dict(source.named_parameters())
        if list(tp) != list(sp):
            raise ValueError(
                "target and source have different parameters: "
                f"{sorted(set(tp) ^ set(sp))[:5] or 'same names in another order'}"
            )
        names = [f"parameter {n}" for n in tp]
        avg_t, avg_s = list(tp.values()), list(sp.values())
        copy_t, copy_s = [], []
        if buffers != "none":
            tb, sb = dict(target.named_buffers()), dict(source.named_buffers())
            if list(tb) != list(sb):
                raise ValueError("target and source have different buffers: "
                                 f"{sorted(set(tb) ^ set(sb))[:5]}")
            for n in tb:
                if buffers == "average" and tb[n].is_floating_point():
                    names.append(f"buffer {n}")
                    avg_t.append(tb[n])
                    avg_s.append(sb[n])
                else:
                    copy_t.append(tb[n])
                    copy_s.append(sb[n])
    else:
        if isinstance(target, Tensor) or isinstance(source, Tensor):
            raise TypeError("target and source must be nn.Modules or sequences of tensors, "
                            "not single tensors (wrap them in a list)")
        avg_t, avg_s = list(target), list(source)
        if len(avg_t) != len(avg_s):
            raise ValueError(f"target has {len(avg_t)} tensors but source has {len(avg_s)}")
        names = None
        copy_t, copy_s = [], []
        for what, xs in (("target", avg_t), ("source", avg_s)):
            if not all(map(torch.is_tensor, xs)):
                i = next(i for i, x in enumerate(xs) if not isinstance(x, Tensor))
                raise TypeError(f"{what} tensor {i} is a {type(xs[i]).__name__}, not a tensor")

    def name(i):
        return names[i] if names is not None else f"tensor {i}"

    def first_bad(a, b):
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)

    for ts, ss in ((avg_t, avg_s), (copy_t, copy_s)):
        for attr, error in (("shape", ValueError), ("dtype", TypeError)):
            got_t, got_s = [getattr(t, attr) for t in ts], [getattr(s, attr) for s in ss]
            if got_t != got_s:
                i = first_bad(got_t, got_s)
                label = name(i) if ts is avg_t else "a buffer"
                show = tuple if attr == "shape" else str
                raise error(f"{label}: target {attr} {show(got_t[i])} != source {attr} "
                            f"{show(got_s[i])}")
    if avg_t:
        if not all(map(Tensor.is_floating_point, avg_t)):
            i = next(i for i, t in enumerate(avg_t) if not t.is_floating_point())
            raise TypeError(f"{name(i)} has dtype {avg_t[i].dtype}: only floating tensors are "
                            "averaged")
        device = avg_t[0].device
        devices = [t.device for t in avg_t] + [s.device for s in avg_s]
        if devices.count(device) != len(devices):
            i = next(i for i, d in enumerate(devices) if d != device) % len(avg_t)
            raise ValueError(f"{name(i)} is on {devices[i]} or its source on "
                             f"{avg_s[i].device}, but {name(0)} is on {device}: one device "
                             "per call")
    return (avg_t, avg_s), (copy_t, copy_s)


def ema_(target, source, momentum, buffers: str = "average") -> None:
    """In-place exponential moving average: target <- momentum * target + (1 - momentum) * source.

    Args:
        target, source: two ``nn.Module``s of the same structure (the target is updated), or two
            equal-length sequences of tensors. Mixed dtypes and sizes are fine: the C++ (CPU)
            and Triton (CUDA) kernels update a whole dtype group per launch. Arithmetic is
            float32 (float64 for float64) whatever the storage dtype.
        momentum: a Python float in [0, 1], or a one-element floating tensor (use a tensor when
            it changes every step, e.g. a cosine schedule: no recompilation under torch.compile,
            and a tensor on the GPU is never read on the host; its value is not checked).
        buffers: modules only. ``"average"`` (default, as timm's ModelEma) averages
            floating-point buffers like parameters and copies the others (e.g.
            ``num_batches_tracked``); ``"copy"`` copies every buffer from the source;
            ``"none"`` leaves the target's buffers alone (as MoCo does: its key encoder's
            BatchNorm keeps its own statistics).

    Parameters are matched by name; a structural mismatch raises ``ValueError``.
    """
    m = _momentum_tensor(momentum)
    (targets, sources), (copy_t, copy_s) = _ema_pairs(target, source, buffers)
    _ema_checked(targets, sources, m, copy_t, copy_s)


def _ema_checked(targets, sources, m: Tensor, copy_t, copy_s) -> None:
    """ema_ on lists that ``_ema_pairs`` has checked."""
    with torch.no_grad():
        if targets:
            if torch.compiler.is_compiling():
                # Detached aliases for the traced op (same storage and version counter): the
                # update is not differentiated. Eager mode runs under no_grad without them.
                targets = [t.detach() for t in targets]
                sources = [s.detach() for s in sources]
            if _config.get_backend() == "reference":
                reference.ema_(targets, sources, m)
            else:
                ops.ema(targets, sources, m)
        for t, s in zip(copy_t, copy_s):
            t.copy_(s)


def cosine_momentum(step, total_steps: int, base: float, final: float = 1.0):
    """The BYOL / MoCo v3 momentum schedule: ``base`` at step 0, rising to ``final`` at
    ``total_steps`` along a half cosine: final - (final - base) * (cos(pi * step / total) + 1) / 2.

    ``step`` may be an int (returns a float) or a tensor (returns a tensor, with no host sync:
    pass it to ``ema_`` as is). Steps beyond ``total_steps`` stay at ``final``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    for name, v in (("base", base), ("final", final)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not 0.0 <= base <= 1.0 or not 0.0 <= final <= 1.0:
        raise ValueError(f"base and final must be in [0, 1], got {base} and {final}")
    if isinstance(step, Tensor):
        frac = step.to(torch.float64).clamp(0, total_steps) / total_steps
        return final - (final - base) * (torch.cos(math.pi * frac) + 1) / 2
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"step must be an int or a tensor, got {type(step).__name__}")
    frac = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * frac) + 1) / 2


def queue_push_(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """Push ``keys`` into the ring buffer ``queue`` in place (MoCo's negatives queue).

    Args:
        queue: (K, D) floating tensor, contiguous.
        ptr: one-element int64 tensor on queue's device: the row the next key goes to.
        keys: (B, D) tensor on queue's device; cast to queue's dtype, never differentiated.

    Key i goes to row (ptr + i) mod K: a batch that crosses the end wraps to the start, any B
    works (no ``K % B == 0``), and when B > K the last K keys remain. Then ptr <- (ptr + B) mod K.
    ``ptr`` is never read on the host (no ``.item()``): works under torch.compile(fullgraph=True)
    and CUDA graphs.
    """
    if ops.try_eager_cpu_push(queue, ptr, keys):  # checks and push in one C++ call
        return
    if not isinstance(queue, Tensor) or not queue.is_floating_point() or queue.dim() != 2:
        raise ValueError(f"queue must be a 2-D floating tensor (K, D), got "
                         f"{getattr(queue, 'dtype', type(queue).__name__)} "
                         f"{tuple(getattr(queue, 'shape', ()))}")
    if queue.shape[0] == 0:
        raise ValueError("queue has no rows (K = 0)")
    if not queue.is_contiguous():
        raise ValueError("queue must be contiguous")
    if not isinstance(ptr, Tensor) or ptr.numel() != 1 or ptr.dtype != torch.int64:
        raise ValueError(f"ptr must be a one-element int64 tensor, got "
                         f"{getattr(ptr, 'dtype', type(ptr).__name__)} "
                         f"{tuple(getattr(ptr, 'shape', ()))}")
    if not isinstance(keys, Tensor) or keys.dim() != 2:
        raise ValueError(f"keys must be a 2-D tensor (B, D), got shape "
                         f"{tuple(getattr(keys, 'shape', ()))}")
    if keys.shape[1] != queue.shape[1]:
        hint = ("; the queue is (K, D), one key per row: store a FAIR-style (D, K) buffer "
                "transposed (queue = buffer.T.contiguous()) and pass queue.T where a (D, K) "
                "view is wanted" if keys.shape[1] == queue.shape[0] else "")
        raise ValueError(f"keys have {keys.shape[1]} features but the queue has "
                         f"{queue.shape[1]} (queue {tuple(queue.shape)}, keys "
                         f"{tuple(keys.shape)}){hint}")
    for name, x in (("ptr", ptr), ("keys", keys)):
        if x.device != queue.device:
            raise ValueError(f"{name} is on {x.device} but queue is on {queue.device}")
    keys = keys.detach()
    if _config.get_backend() == "reference":
        reference.queue_push_(queue, ptr, keys)
    else:
        ops.queue_push(queue, ptr, keys)
