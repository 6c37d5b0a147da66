"""Thin nn.Module wrappers over fastcl.functional."""
from fastcl.nn.losses import ClipLoss, DCLLoss, DCLWLoss, InfoNCELoss, NTXentLoss  # noqa: F401
from fastcl.nn.momentum import MomentumEncoder, NegativeQueue  # noqa: F401
