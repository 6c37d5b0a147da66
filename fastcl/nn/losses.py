"""Loss modules: thin wrappers over ``fastcl.functional``; arguments are checked there."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastcl import functional as FC


class NTXentLoss(nn.Module):
    """SimCLR NT-Xent loss; ``NTXentLoss(temperature)(z1, z2)`` = ``fastcl.nt_xent(z1, z2, ...)``.

    A drop-in for lightly's ``NTXentLoss(temperature=0.5, gather_distributed=...)`` (without
    its memory bank); ``distributed=True`` scores each rank's rows against every rank's.
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean",
                 distributed: bool = False):
        super().__init__()
        FC._check_temperature(temperature)
        FC._check_choice(reduction, "reduction", FC._REDUCTIONS)
        self.temperature = float(temperature)
        self.reduction = reduction
        self.distributed = bool(distributed)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return FC.nt_xent(z1, z2, self.temperature, self.reduction, self.distributed)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, "
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
        FC._check_temperature(temperature)
        FC._check_choice(reduction, "reduction", FC._REDUCTIONS)
        FC._check_choice(negative_mode, "negative_mode", FC._NEGATIVE_MODES)
        self.temperature = float(temperature)
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
            f"temperature={self.temperature}, reduction={self.reduction!r}, "
            f"negative_mode={self.negative_mode!r}, distributed={self.distributed}"
        )
