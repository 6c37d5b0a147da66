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
