"""Thin nn.Module wrappers over fastcl.functional."""
from fastcl.nn.losses import (  # noqa: F401
    ClipLoss,
    DCLLoss,
    DCLWLoss,
    InfoNCELoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
)
from fastcl.nn.momentum import MomentumEncoder, NegativeQueue  # noqa: F401
