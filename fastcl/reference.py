"""Pure-PyTorch references: the oracle every fastcl op is tested against.

Readable, eager, O(N^2) memory. Computed in float32 for float32/bfloat16/float16 inputs and in
float64 for float64 inputs, and returned in that dtype (fastcl's dtype policy: a 16-bit input
gives a float32 loss; gradients come back in each input's dtype through the casts). Inputs of
one dtype are expected (``fastcl.functional`` promotes mixed ones first). No input checking
here (``fastcl.functional`` does it), and nothing from fastcl's fast paths is imported.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _divide(logits: torch.Tensor, temperature) -> torch.Tensor:
    """logits / temperature (a float, or a tensor with a gradient)."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(logits.dtype)
    return logits / temperature


def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature):
    """(logits, labels) of NT-Xent over the 2N rows of cat([z1, z2]), in the inputs' dtype:
    cosine similarities / temperature, self excluded (-inf), label of row i is i + N mod 2N."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = _divide(z @ z.T, temperature)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return logits, labels


def _multiply(logits: torch.Tensor, scale) -> torch.Tensor:
    """logits * scale (a float, or a tensor with a gradient)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.to(logits.dtype)
    return logits * scale


def _scaler(temperature, scale):
    """The function applying the logits' multiplier: 1 / temperature, or ``scale``."""
    if scale is not None:
        return lambda logits: _multiply(logits, scale)
    return lambda logits: _divide(logits, temperature)


def softmax_rows(spec, rows, cols=None, key=None, others=None, temperature=0.1,
                 scale=None) -> torch.Tensor:
    """The per-row losses of a ``fastcl.engine.Spec`` pass, densely: the oracle of the engine.

    Logits rhat_i . chat_j / temperature (or times ``scale`` when given) over the columns (``cols``, or the rows themselves
    for ``columns="rows"``, the diagonal excluded), then the ``others`` (negatives only);
    the positive is column i + n/2 of the rows (``"offset"``), column i (``"index"``) or the
    explicit ``key[i]`` (``"key"``, placed first), and the row's loss is
    logsumexp(logits) - positive, over all logits, or (``positive_in_denominator=False``)
    over all but the positive. Returned per row in the compute dtype. With
    ``spec.normalize=False`` the rows and columns are used as given (no L2 normalization).
    """
    dtype = _compute_dtype(rows)
    norm = (lambda x: F.normalize(x.to(dtype), dim=1)) if spec.normalize else (
        lambda x: x.to(dtype))
    _scale = _scaler(temperature, scale)
    r = norm(rows)
    n = r.shape[0]
    if spec.columns == "rows":
        c = r
    else:
        c = norm(cols)
    logits = _scale(r @ c.T)
    if spec.exclude_self:
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=r.device),
                                    float("-inf"))
    rows_idx = torch.arange(n, device=r.device)
    if spec.positive == "offset":
        pos_col = (rows_idx + n // 2) % n
    elif spec.positive == "index":
        pos_col = rows_idx
    else:
        pos_col = None
    if others is not None:
        logits = torch.cat([logits, _scale(r @ norm(others).T)], dim=1)
    if spec.positive == "key":
        k = norm(key)
        logits = torch.cat([_scale((r * k).sum(dim=1, keepdim=True)), logits], dim=1)
        pos_col = torch.zeros_like(rows_idx)
    if spec.positive == "none":
        return torch.logsumexp(logits, dim=1)
    if spec.positive_in_denominator:
        return F.cross_entropy(logits, pos_col, reduction="none")
    positive = logits.gather(1, pos_col[:, None])[:, 0]
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, pos_col[:, None], True)
    return torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1) - positive


def softmax_rows_cols(spec, rows, cols, temperature=None, scale=None) -> torch.Tensor:
    """Both softmax directions of an index-positive pass (``epilogue="softmax_rows_cols"``),
    densely: [row losses ; column losses] (2n,), row i's CE(logits_i, i) and column j's
    CE(logits^T_j, j), logits = rhat @ chat^T times ``scale`` (or / ``temperature``),
    normalized as ``spec.normalize`` says. In the compute dtype; differentiable to any order.
    """
    dtype = _compute_dtype(rows)
    norm = (lambda x: F.normalize(x.to(dtype), dim=1)) if spec.normalize else (
        lambda x: x.to(dtype))
    logits = _scaler(temperature, scale)(norm(rows) @ norm(cols).T)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return torch.cat([F.cross_entropy(logits, labels, reduction="none"),
                      F.cross_entropy(logits.T, labels, reduction="none")])


def clip_loss(image_features, text_features, logit_scale, logit_bias=None,
              reduction: str = "mean") -> torch.Tensor:
    """open_clip's ``ClipLoss`` (one process) as it computes it: logits = logit_scale * image
    @ text^T (+ logit_bias), (CE(logits, arange) + CE(logits^T, arange)) / 2, features used as
    given; ``"none"``: the n per-pair values. In the compute dtype (float32 for 16-bit)."""
    dtype = _compute_dtype(image_features)
    logits = _multiply(image_features.to(dtype) @ text_features.to(dtype).T, logit_scale)
    if logit_bias is not None:
        logits = logits + (logit_bias.to(dtype) if isinstance(logit_bias, torch.Tensor)
                           else logit_bias)
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels, reduction="none")
            + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    return _reduce(loss, reduction)


def sigmoid_labels(n: int, m: int, pos_offset: int = 0, dtype=torch.float32,
                   device=None) -> torch.Tensor:
    """SigLIP's (n x m) labels: +1 at (i, i + pos_offset) where that column exists, else -1."""
    labels = -torch.ones(n, m, dtype=dtype, device=device)
    i = torch.arange(n, device=device)
    j = i + pos_offset
    keep = (j >= 0) & (j < m)
    labels[i[keep], j[keep]] = 1
    return labels


def sigmoid_pairs(rows, cols, scale, bias=0.0, pos_offset: int = 0) -> torch.Tensor:
    """The per-row losses of the sigmoid epilogue, densely: sum_j -log sigmoid(t_ij z_ij),
    z = scale * rows @ cols^T + bias (features as given), t = :func:`sigmoid_labels`. In the
    compute dtype; differentiable to any order."""
    dtype = _compute_dtype(rows)
    logits = _multiply(rows.to(dtype) @ cols.to(dtype).T, scale)
    logits = logits + (bias.to(dtype) if isinstance(bias, torch.Tensor) else bias)
    labels = sigmoid_labels(logits.shape[0], logits.shape[1], pos_offset, dtype, logits.device)
    return -F.logsigmoid(labels * logits).sum(dim=1)


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None,
                reduction: str = "mean") -> torch.Tensor:
    """open_clip's ``SigLipLoss`` (one process): -sum log sigmoid(labels * logits) / N with
    logits = logit_scale * image @ text^T (+ logit_bias), labels +1 on the diagonal and -1
    elsewhere; ``"sum"`` the sum, ``"none"`` each image's row sum. Compute dtype."""
    rows = sigmoid_pairs(image_features, text_features, logit_scale,
                         0.0 if logit_bias is None else logit_bias)
    if reduction == "mean":
        return rows.sum() / rows.shape[0]
    return _reduce(rows, reduction)


def _without(logits: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """logits with each row's own entry at -inf; a row with no other entry (one row, one
    column) all 0 instead, so that its (unused) logsumexp and softmax stay finite, and so do
    their gradients."""
    alone = own.all(dim=1, keepdim=True)
    return logits.masked_fill(own & ~alone, float("-inf")).masked_fill(alone, 0.0)


def label_pairs(rows, cols, row_labels, col_labels, scale, offset: int = 0,
                normalize: bool = True):
    """The label-positive pass (SupCon; the kernels' ``labels_forward`` contract), densely:
    (loss, lse, dscale, count) per row, in the compute dtype (lse too).

    Logits s_ij = scale * rhat_i . chat_j (L2-normalized when ``normalize``); row i's own
    column i + ``offset`` is excluded; its positives are the other columns j with
    ``col_labels[j] == row_labels[i]`` (count_i of them); lse_i = logsumexp over every
    column but its own; loss_i = lse_i - mean of its positive logits, 0 when it has none
    (SupContrast's convention); dscale_i = d loss_i / d scale. Differentiable to any order."""
    dtype = _compute_dtype(rows)
    norm = (lambda x: F.normalize(x.to(dtype), dim=1)) if normalize else (lambda x: x.to(dtype))
    r, c = norm(rows), norm(cols)
    n, m = r.shape[0], c.shape[0]
    dots = r @ c.T
    logits = _multiply(dots, scale)
    own = torch.zeros(n, m, dtype=torch.bool, device=r.device)
    own[torch.arange(n, device=r.device), torch.arange(n, device=r.device) + offset] = True
    positive = (row_labels[:, None] == col_labels[None, :]) & ~own
    count = positive.sum(dim=1).to(dtype)
    masked = _without(logits, own)
    lse = torch.logsumexp(masked, dim=1)
    lse = torch.where(own.all(dim=1), float("-inf"), lse)  # no column but its own
    has = count > 0
    safe = torch.where(has, count, torch.ones_like(count))
    pos_mean = (logits * positive).sum(dim=1) / safe
    loss = torch.where(has, lse - pos_mean, torch.zeros_like(lse))
    p = torch.softmax(masked, dim=1)
    d_mean = (dots * positive).sum(dim=1) / safe
    dscale = torch.where(has, (p * dots.masked_fill(own, 0)).sum(dim=1) - d_mean,
                         torch.zeros_like(lse))
    return loss, lse, dscale, count


def supcon_loss(features, labels=None, temperature=0.07, base_temperature=None,
                contrast_mode: str = "all", reduction: str = "mean") -> torch.Tensor:
    """SupContrast's ``SupConLoss`` formula, written out densely (O((V B)^2) memory), with the
    features L2-normalized first: (B, V, D) or (B, D) features, ``labels`` (B,) or None (the
    other views of the same sample are the positives). Anchors: every view (``"all"``) or
    view 0 (``"one"``), against every view of every sample but the anchor itself. Per anchor
    -(tau / base_tau) * mean over its positives of log softmax; an anchor without a positive
    contributes 0 and counts in the mean. ``"none"``: (B, V) for ``"all"``, (B,) for
    ``"one"``. Compute dtype."""
    dtype = _compute_dtype(features)
    if features.dim() == 2:
        features = features[:, None]
    b, v, _ = features.shape
    if labels is None:
        labels = torch.arange(b, device=features.device)
    z = F.normalize(features.to(dtype), dim=2).transpose(0, 1).reshape(v * b, -1)
    all_labels = labels.reshape(-1).repeat(v)
    n_anchor = b if contrast_mode == "one" else v * b
    logits = _divide(z[:n_anchor] @ z.T, temperature)
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(n_anchor), torch.arange(n_anchor)] = True
    positive = (all_labels[:n_anchor, None] == all_labels[None, :]) & ~own
    log_prob = logits - torch.logsumexp(_without(logits, own), dim=1, keepdim=True)
    count = positive.sum(dim=1)
    mean_pos = torch.where(positive, log_prob, 0).sum(dim=1) / count.clamp_min(1)
    factor = 1.0 if base_temperature is None else temperature / base_temperature
    if isinstance(factor, torch.Tensor):
        factor = factor.to(dtype)
    loss = -factor * mean_pos
    if reduction == "none":
        return loss if contrast_mode == "one" else loss.view(v, b).T
    return _reduce(loss, reduction)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature=0.5, reduction: str = "mean"
) -> torch.Tensor:
    """SimCLR NT-Xent over the 2N rows of ``cat([z1, z2])``: positive i <-> i+N, self excluded.

    Row order for ``reduction="none"``: [z1 rows; z2 rows]. Equal to lightly's
    ``NTXentLoss(temperature)`` (mean over the 2N rows).
    """
    dtype = _compute_dtype(z1)
    logits, labels = nt_xent_logits(z1.to(dtype), z2.to(dtype), temperature)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _reduce(loss, reduction)


def dcl_loss(z1, z2, temperature=0.1, weight_fn=None, reduction: str = "mean"):
    """Decoupled contrastive loss (lightly's ``DCLLoss``, the DCL paper's eq. 6) over the 2N
    rows of cat([z1, z2]): -w_i s_pos_i + logsumexp over the row's 2N - 2 negatives (self and
    positive left out), s = cosine / temperature; w_i = 1 without ``weight_fn``, else
    ``weight_fn(zhat1, zhat2)`` for the first view's rows and ``weight_fn(zhat2, zhat1)`` for
    the second's (normalized inputs, as lightly passes them)."""
    dtype = _compute_dtype(z1)
    logits, labels = nt_xent_logits(z1.to(dtype), z2.to(dtype), temperature)
    positive = logits.gather(1, labels[:, None])[:, 0]
    negatives = logits.scatter(1, labels[:, None], float("-inf"))
    if weight_fn is not None:
        a, b = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)
        positive = positive * torch.cat([weight_fn(a, b), weight_fn(b, a)])
    return _reduce(torch.logsumexp(negatives, dim=1) - positive, reduction)


def info_nce_logits(query, positive_key, negative_keys, temperature, negative_mode="unpaired"):
    """(logits, labels) of InfoNCE with info-nce-pytorch's semantics, in the inputs' dtype.

    - ``negative_keys=None``: logits = q @ k^T, label i (in-batch, one-directional N-way).
    - ``(M, D)`` unpaired: logits = [q_i . k_i, q_i . neg_j for all j], label 0.
    - ``(N, M, D)`` paired: logits = [q_i . k_i, q_i . neg_ij for all j], label 0.
    All vectors are L2-normalized first; logits are divided by the temperature.
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(positive_key, dim=-1)
    if negative_keys is None:
        logits = q @ k.T
        labels = torch.arange(q.shape[0], device=q.device)
    else:
        neg = F.normalize(negative_keys, dim=-1)
        positive_logit = (q * k).sum(dim=1, keepdim=True)
        if negative_mode == "unpaired":
            negative_logits = q @ neg.T
        else:
            negative_logits = (q.unsqueeze(1) @ neg.transpose(-2, -1)).squeeze(1)
        logits = torch.cat([positive_logit, negative_logits], dim=1)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return _divide(logits, temperature), labels


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: Optional[torch.Tensor] = None,
    temperature=0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
) -> torch.Tensor:
    """InfoNCE with the semantics of info-nce-pytorch (see :func:`info_nce_logits`)."""
    dtype = _compute_dtype(query)
    logits, labels = info_nce_logits(
        query.to(dtype), positive_key.to(dtype),
        None if negative_keys is None else negative_keys.to(dtype), temperature, negative_mode,
    )
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _reduce(loss, reduction)


# ------------------------------------------------------------------------- momentum -------


def byol_loss(p: torch.Tensor, z: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """BYOL's loss as its code writes it: 2 - 2 (normalize(p) . normalize(z)) per row, z
    detached (equal to ||normalize(p) - normalize(z)||² except at zero rows)."""
    acc = _compute_dtype(p)
    cos = (F.normalize(p.to(acc), dim=1) * F.normalize(z.detach().to(acc), dim=1)).sum(1)
    return _reduce(2 - 2 * cos, reduction)


def ema_(targets, sources, momentum: float) -> None:
    """targets[i] <- momentum * targets[i] + (1 - momentum) * sources[i], one tensor at a time,
    computed in float64 and rounded once to each target's dtype."""
    m = float(momentum)
    with torch.no_grad():
        for t, s in zip(targets, sources):
            t.copy_(t.double() * m + s.double() * (1.0 - m))


def queue_push_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """The ring buffer, key by key: row (ptr + i) mod K <- keys[i]; ptr <- (ptr + B) mod K."""
    k = queue.shape[0]
    p = int(ptr.reshape(-1)[0]) % k
    with torch.no_grad():
        for i in range(keys.shape[0]):
            queue[(p + i) % k] = keys[i].to(queue.dtype)
        ptr.fill_((p + keys.shape[0]) % k)
