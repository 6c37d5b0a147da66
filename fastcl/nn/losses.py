"""Loss modules: thin wrappers over ``fastcl.functional``; arguments are checked there."""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastcl import functional as FC


def _set_temperature(module: nn.Module, temperature) -> None:
    """A float is stored as a float; a tensor (learnable: an ``nn.Parameter`` is registered
    as the module's parameter, so optimizers and ``state_dict`` see it) as given."""
    checked = FC._check_temperature(temperature)
    if isinstance(temperature, torch.Tensor):
        module.temperature = temperature  # a Parameter registers itself
    else:
        module.temperature = float(checked)


def _show(temperature) -> str:
    if isinstance(temperature, torch.Tensor):
        return f"tensor({float(temperature.detach()):g}, requires_grad={temperature.requires_grad})" \
            if temperature.device.type == "cpu" else f"tensor on {temperature.device}"
    return str(temperature)


class NTXentLoss(nn.Module):
    """SimCLR NT-Xent loss; ``NTXentLoss(temperature)(z1, z2)`` = ``fastcl.nt_xent(z1, z2, ...)``.

    A drop-in for lightly's ``NTXentLoss(temperature=0.5, gather_distributed=...)`` (without
    its memory bank); ``distributed=True`` scores each rank's rows against every rank's.
    ``temperature`` may be a one-element tensor: an ``nn.Parameter`` (a learnable temperature)
    is registered as this module's parameter and gets its gradient from the kernels.
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean",
                 distributed: bool = False):
        super().__init__()
        _set_temperature(self, temperature)
        FC._check_choice(reduction, "reduction", FC._REDUCTIONS)
        self.reduction = reduction
        self.distributed = bool(distributed)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return FC.nt_xent(z1, z2, self.temperature, self.reduction, self.distributed)

    def extra_repr(self) -> str:
        return (f"temperature={_show(self.temperature)}, reduction={self.reduction!r}, "
                f"distributed={self.distributed}")


class InfoNCELoss(nn.Module):
    """InfoNCE loss module with info-nce-pytorch's ``InfoNCE`` interface.

    ``InfoNCELoss(temperature=0.1, reduction="mean", negative_mode="unpaired")(query,
    positive_key, negative_keys=None)``; see :func:`fastcl.info_nce` (and its ``distributed``).
    """

    def __init__(
        self, temperature: float = 0.1, reduction: str = "mean", negative_mode: str = "unpaired",
        distributed: bool = False,
    ):
        super().__init__()
        _set_temperature(self, temperature)
        FC._check_choice(reduction, "reduction", FC._REDUCTIONS)
        FC._check_choice(negative_mode, "negative_mode", FC._NEGATIVE_MODES)
        self.reduction = reduction
        self.negative_mode = negative_mode
        self.distributed = bool(distributed)

    def forward(
        self, query: Tensor, positive_key: Tensor, negative_keys: Optional[Tensor] = None
    ) -> Tensor:
        return FC.info_nce(
            query, positive_key, negative_keys, self.temperature, self.reduction,
            self.negative_mode, self.distributed,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={_show(self.temperature)}, reduction={self.reduction!r}, "
            f"negative_mode={self.negative_mode!r}, distributed={self.distributed}"
        )


class DCLLoss(nn.Module):
    """Decoupled contrastive loss, a drop-in for lightly's ``DCLLoss(temperature=0.1,
    weight_fn=None, gather_distributed=False)``: ``DCLLoss(...)(out0, out1)`` =
    :func:`fastcl.dcl_loss` (mean over the 2N rows, one logsumexp over each row's 2N - 2
    negatives).

    ``gather_distributed=True`` scores each rank's rows against every rank's (fastcl's
    ``distributed=True``). It returns the global mean on every rank, where lightly returns each
    rank's local mean: the values differ, the DDP-averaged gradients agree (equal shards).
    ``temperature`` may be a tensor (an ``nn.Parameter`` is registered, learnable).
    """

    def __init__(self, temperature=0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]]
                 = None, gather_distributed: bool = False):
        super().__init__()
        _set_temperature(self, temperature)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got "
                            f"{type(weight_fn).__name__}")
        self.weight_fn = weight_fn
        self.gather_distributed = bool(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return FC.dcl_loss(out0, out1, self.temperature, self.weight_fn, "mean",
                           self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"temperature={_show(self.temperature)}, weighted={self.weight_fn is not None}, "
                f"gather_distributed={self.gather_distributed}")


class DCLWLoss(DCLLoss):
    """Weighted DCL, a drop-in for lightly's ``DCLWLoss(temperature=0.1, sigma=0.5,
    gather_distributed=False)``: DCL with the von Mises-Fisher positive weights
    :func:`fastcl.functional.negative_mises_fisher_weights` (sigma), computed from detached
    similarities (no gradient through them)."""

    def __init__(self, temperature=0.1, sigma: float = 0.5, gather_distributed: bool = False):
        FC.negative_mises_fisher_weights(torch.ones(1, 1), torch.ones(1, 1), sigma)  # checks
        super().__init__(temperature, partial(FC.negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed)
        self.sigma = sigma


def _check_world(world_size, rank) -> None:
    """open_clip's rank and world_size arguments: ints, 0 <= rank < world_size."""
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size - 1] = [0, {world_size - 1}], "
                         f"got {rank}")


def _equal_shards(module, what: str, functional: str, image_features, text_features,
                  logit_scale, logit_bias):
    """Every rank's rows (the ranks' agreement checked) of an open_clip loss module on several
    ranks: the process group must match the module's rank and world_size, and every rank's
    batch must be the same size, as open_clip assumes."""
    from fastcl import distributed as D

    name = type(module).__name__
    size, rank = D.world()
    if (size, rank) != (module.world_size, module.rank):
        raise ValueError(f"{name} was built with world_size={module.world_size}, "
                         f"rank={module.rank}, but the process group has world size {size} "
                         f"and this process is rank {rank}")
    sizes = D.check_ranks(f"fastcl.nn.{name}", "image_features", image_features,
                          text_features=text_features, logit_scale=logit_scale,
                          logit_bias=logit_bias)
    if len(set(sizes)) != 1:
        raise ValueError(f"{what} needs the same batch size on every rank, as open_clip "
                         f"assumes, got {sizes} rows per rank; for uneven shards use "
                         f"{functional}(..., distributed=True)")
    return sizes


class ClipLoss(nn.Module):
    """CLIP's symmetric loss, a drop-in for open_clip's ``ClipLoss(local_loss=False,
    gather_with_grad=False, cache_labels=False, rank=0, world_size=1, use_horovod=False)``:
    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` gives open_clip's values and gradients, computed by the fused kernels
    (:func:`fastcl.clip_loss`: both softmax directions from one pass, no N x N logits).

    - ``logit_scale`` is the multiplier, as open_clip's model returns it (``logit_scale.exp()``
      of its parameter): a float or a one-element tensor with a gradient. Clamping the
      parameter (open_clip's training loop: to [0, ln 100]) stays in the training loop.
    - ``logit_bias`` is accepted as open_clip accepts it; it cancels in both softmaxes, so its
      gradient is zero (exactly zero here, zero up to rounding in open_clip).
    - ``output_dict=True`` returns ``{"contrastive_loss": loss}``.
    - One process (``world_size=1``): every flag combination gives open_clip's value (the mean
      over the batch); ``cache_labels`` is accepted and has nothing to cache.
    - Several ranks: ``local_loss=True, gather_with_grad=True`` only (what open_clip's
      maintainers call the option that scales, and what almost every OpenCLIP model was
      trained with), needing an initialized ``torch.distributed`` process group whose size
      and rank match ``world_size`` and ``rank``. Each rank's value is open_clip's: the mean
      over its own pairs of its rows against every rank's columns, both directions; its
      features receive the sum over ranks of their gradients (open_clip's gather backward) and
      the scale its own rank's term; the batch on every rank must be the same size, as open_clip
      assumes. The other combinations raise at construction: their gradients surprise (open_clip
      issue #616); for the global loss with gradients consistent with DDP's averaging, use
      ``fastcl.clip_loss(..., distributed=True)``.
    - ``use_horovod`` is accepted when False (recent open_clip releases removed it).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False):
        super().__init__()
        _check_world(world_size, rank)
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: fastcl runs on "
                             "torch.distributed (open_clip's recent releases removed horovod)")
        if world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError(
                f"fastcl.nn.ClipLoss on several ranks (world_size={world_size}) supports "
                f"local_loss=True, gather_with_grad=True only (open_clip's scalable setting), "
                f"got local_loss={bool(local_loss)}, gather_with_grad={bool(gather_with_grad)}; "
                "for the global loss with gradients consistent with DDP's averaging use "
                "fastcl.clip_loss(image_features, text_features, logit_scale, "
                "distributed=True)")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = False

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size == 1:
            loss = FC.clip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = self._local_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _local_loss(self, image_features, text_features, logit_scale, logit_bias):
        from fastcl import distributed as D

        sizes = _equal_shards(self, "ClipLoss(local_loss=True, gather_with_grad=True)",
                              "fastcl.clip_loss", image_features, text_features, logit_scale,
                              logit_bias)
        image, text, scale, bias = FC._check_clip(image_features, text_features, logit_scale,
                                                  logit_bias, "mean")
        return FC._with_bias(D.clip_local_loss(image, text, scale, sizes), bias)

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"rank={self.rank}, world_size={self.world_size}")


_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss, a drop-in for open_clip's ``SigLipLoss(cache_labels=False,
    rank=0, world_size=1, dist_impl=None)``: ``forward(image_features, text_features,
    logit_scale, logit_bias=None, output_dict=False)`` gives open_clip's values and gradients
    (features, scale and bias), computed by the fused kernels (:func:`fastcl.siglip_loss`: one
    tiled pass, no N x N logits).

    - ``logit_scale`` and ``logit_bias`` as open_clip's model returns them (the scale already
      exponentiated): numbers or one-element tensors with gradients.
    - ``output_dict=True`` returns ``{"contrastive_loss": loss}``.
    - One process (``world_size=1``): open_clip's value, the sum over all pairs divided by the
      batch size. ``cache_labels`` is accepted and has nothing to cache (no label matrix).
    - Several ranks (an initialized ``torch.distributed`` process group whose size and rank
      match ``world_size`` and ``rank``): each rank's value is open_clip's local value, its
      images against every rank's texts (the other ranks' texts negatives only) divided by its
      batch size; its text features receive the sum over ranks of their gradients, and the
      scale and bias this rank's term, as open_clip's exchanges give. The batch on every rank
      must be the same size, as open_clip assumes.
    - ``dist_impl`` (open_clip's ``"bidir"`` default, ``"shift"``, ``"reduce"``, ``"gather"``:
      four ways to move the texts, one math) is accepted and checked; fastcl does the same math
      with one differentiable all-gather of the text features (O(N_global D) per rank, its
      backward a sum over ranks) and a fused pass over the local images against all of them,
      whatever the choice. A ring exchange that would keep only a neighbour's block is future
      work.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        _check_world(world_size, rank)
        if dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_DIST_IMPLS} (open_clip's), got "
                             f"{dist_impl!r}")
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size == 1:
            loss = FC.siglip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = self._local_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _local_loss(self, image_features, text_features, logit_scale, logit_bias):
        from fastcl import distributed as D

        sizes = _equal_shards(self, "SigLipLoss on several ranks", "fastcl.siglip_loss",
                              image_features, text_features, logit_scale, logit_bias)
        image, text, scale, bias = FC._check_siglip(image_features, text_features, logit_scale,
                                                    logit_bias, "mean")
        return D.siglip_local_loss(image, text, scale, bias, sizes)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"


class SupConLoss(nn.Module):
    """SupContrast's ``SupConLoss(temperature=0.07, contrast_mode='all', base_temperature=0.07)``,
    fused: ``forward(features, labels=None)`` gives its value and gradients (features (B, V,
    ...) flattened to (B, V, D) as it does, L2-normalized inside; see
    :func:`fastcl.supcon_loss`) without its (V B)^2 tensors. ``temperature`` may be an
    ``nn.Parameter`` (registered here: learnable). Beyond SupContrast: ``reduction`` and
    ``distributed`` (every rank's samples and labels form the batch).

    pytorch-metric-learning's ``SupConLoss(temperature)(embeddings, labels)`` on (M, D)
    embeddings is ``SupConLoss(temperature, base_temperature=temperature)(embeddings,
    labels)`` when every anchor has a positive (it leaves anchors without one out of the mean).
    """

    def __init__(self, temperature=0.07, contrast_mode: str = "all", base_temperature=0.07,
                 reduction: str = "mean", distributed: bool = False):
        super().__init__()
        _set_temperature(self, temperature)
        if base_temperature is not None:
            FC.engine.check_temperature(base_temperature, "base_temperature")
        FC._check_choice(contrast_mode, "contrast_mode", FC._CONTRAST_MODES)
        FC._check_choice(reduction, "reduction", FC._REDUCTIONS)
        self.base_temperature = base_temperature
        self.contrast_mode = contrast_mode
        self.reduction = reduction
        self.distributed = bool(distributed)

    def forward(self, features: Tensor, labels: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        if mask is not None:
            raise ValueError(
                "SupConLoss: an arbitrary (B, B) mask is not supported: it would bring back the "
                "O(B^2) memory this loss avoids. Pass labels (B,) instead (the positives of "
                "anchor i are the samples with its label); a mask that is an equivalence "
                "relation is labels = mask.float().argmax(dim=1)")
        if isinstance(features, Tensor) and features.dim() > 3:
            features = features.reshape(features.shape[0], features.shape[1], -1)
        return FC.supcon_loss(features, labels, self.temperature, self.base_temperature,
                              self.contrast_mode, self.reduction, self.distributed)

    def extra_repr(self) -> str:
        return (f"temperature={_show(self.temperature)}, contrast_mode={self.contrast_mode!r}, "
                f"base_temperature={_show(self.base_temperature)}, "
                f"reduction={self.reduction!r}, distributed={self.distributed}")
