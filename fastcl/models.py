"""SimCLR, MoCo (v2, v3), BYOL and SupCon around any backbone, on fastcl's fused ops.

Each model takes a ``backbone``: an ``nn.Module`` mapping a batch of inputs to (B, F) features,
and ``feature_dim`` = F. Its ``forward(x1, x2)`` takes two augmented views of the same B
samples and returns the scalar training loss; ``step_end(step, total_steps)`` updates the
momentum networks after ``optimizer.step()`` (a no-op for SimCLR and SupCon, so that one loop
trains them all; SupCon's forward also takes the batch's class labels)::

    model = fastcl.models.MoCo(backbone, feature_dim=512)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)  # frozen targets get no grad
    for step, (x1, x2) in enumerate(loader):
        loss = model(x1, x2)
        opt.zero_grad(); loss.backward(); opt.step()
        model.step_end(step, total_steps)

Everything a model holds (weights, momentum networks, MoCo's queue and pointer, the momentum
step) is in its ``state_dict``: a run resumed from a checkpoint continues bitwise identically.
``model.encoder`` is the backbone to keep after pre-training.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastcl import functional as F
from fastcl.nn.momentum import MomentumEncoder, NegativeQueue

__all__ = ["SimCLR", "MoCo", "BYOL", "SupCon", "mlp", "byol_loss"]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
        last_bn: bool = False, bn: bool = True) -> nn.Sequential:
    """Linear → [BN] → ReLU, (num_layers - 1) times, then Linear → optional affine-free BN.

    The projection and prediction heads of SimCLR (2 layers, BN), MoCo v2 (2 layers, no BN),
    MoCo v3 (3-layer projector and 2-layer predictor, last BN without affine on the projector)
    and BYOL (2 layers, BN). Hidden linears have no bias when a BN follows them.
    """
    for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                    ("num_layers", num_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    layers = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(d, hidden_dim, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


byol_loss = F.byol_loss  # BYOL's per-row 2 - 2 cos(p, z), z detached, fused


def _check_backbone(backbone, feature_dim) -> None:
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim <= 0:
        raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")


def _check_views(x1: Tensor, x2: Tensor) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must be two views of the same batch, got shapes "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")


def _check_total(total_steps) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")


class SimCLR(nn.Module):
    """SimCLR (Chen et al., 2020): NT-Xent between the projections of two views.

    Args:
        backbone: (B, ...) → (B, feature_dim) features.
        feature_dim: the backbone's output width.
        projection_dim: the projection head's output (the paper: 128).
        hidden_dim: the head's hidden width; default ``feature_dim`` (the paper: 2048 for
            ResNet-50's 2048 features).
        temperature: NT-Xent's τ. Default 0.5 (the paper's batch-4096 value; its table B.7
            prefers 0.1–0.2 at long schedules). Any positive float.
        distributed: under ``torch.distributed`` (e.g. DDP), every rank's rows are the
            negatives of every row, as in the paper's global batch (``fastcl.distributed``).

    The head is Linear → BN → ReLU → Linear, as in the paper's code. The two views run through
    the backbone as one concatenated batch, so BatchNorm sees both views' statistics (SimCLR's
    global BN on one device). The loss is ``fastcl.nt_xent`` (fused, O(B·D) memory).
    ``step_end`` does nothing: SimCLR has no momentum network.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 128,
                 hidden_dim: Optional[int] = None, temperature: float = 0.5,
                 distributed: bool = False):
        super().__init__()
        _check_backbone(backbone, feature_dim)
        self.temperature = F._check_temperature(temperature)
        self.distributed = bool(distributed)
        self.encoder = backbone
        self.projector = mlp(feature_dim, hidden_dim or feature_dim, projection_dim, 2)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        _check_views(x1, x2)
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        return F.nt_xent(z1, z2, temperature=self.temperature, distributed=self.distributed)

    def step_end(self, step=None, total_steps: Optional[int] = None) -> None:
        """Nothing to update (kept so that one training loop drives every model)."""


class MoCo(nn.Module):
    """MoCo v2 (Chen et al., 2020) or v3 (Chen, Xie and He, 2021).

    Args:
        backbone, feature_dim: as in ``SimCLR``.
        dim: the output width of the heads (both papers: 128 for v2, 256 for v3 — the default
            here is 128 for both).
        queue_size: v2's number of negatives K (the paper: 65536). Any K, divisible by the
            batch or not. Ignored by v3.
        momentum: the key encoder's EMA momentum. Default: 0.999 for v2 (constant, as in the
            paper), 0.99 for v3 (the base of its cosine schedule, rising to 1).
        temperature: τ. Default: 0.07 for v2 (the official code's default, from MoCo v1; the
            v2 paper's recipe sets 0.2), 0.2 for v3 (its ViT value; its code defaults to 1.0,
            which its ResNet-50 recipe uses).
        version: ``"v2"`` or ``"v3"``.
        hidden_dim: the heads' hidden width; default 2048 for v2 (its head: 2048 → 2048 → 128
            on ResNet-50, here ``feature_dim``-wide when that is smaller) and 4096 for v3.
        distributed: under ``torch.distributed``: v2 pushes every rank's keys (in rank order,
            the queues stay identical) and reduces the loss over the global batch; v3 takes
            its in-batch negatives from every rank's keys, as the paper does across GPUs.

    v2: query = MLP head (Linear → ReLU → Linear) on the backbone; the key encoder is a
    ``MomentumEncoder`` copy of both, updated by fused EMA in ``step_end``. The loss is
    ``fastcl.info_nce(q, k, queue)`` with the ``NegativeQueue`` as the (K, dim) negatives:
    no (B × K) logits are stored. The keys are pushed after the loss, in place. One direction
    (queries from ``x1``, keys from ``x2``), as in the paper. Shuffling BN is multi-GPU only in
    the paper and is not done here; the key encoder's BN uses the key batch's statistics.

    v3: no queue. Projector (3 layers, BN, last BN without affine) and predictor (2 layers, BN)
    on the query side; the key encoder is a momentum copy of backbone + projector, with a
    cosine momentum schedule from ``momentum`` to 1 over ``total_steps``. The loss is the
    symmetric in-batch InfoNCE ctr(q1, k2) + ctr(q2, k1), each scaled by 2τ as in the paper's
    code, with ``fastcl.info_nce(q, k)``.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 128,
                 queue_size: int = 65536, momentum: Optional[float] = None,
                 temperature: Optional[float] = None, version: str = "v2",
                 hidden_dim: Optional[int] = None, distributed: bool = False):
        super().__init__()
        _check_backbone(backbone, feature_dim)
        F._check_choice(version, "version", ("v2", "v3"))
        self.version = version
        self.distributed = bool(distributed)
        v2 = version == "v2"
        self.temperature = F._check_temperature(
            temperature if temperature is not None else (0.07 if v2 else 0.2))
        momentum = momentum if momentum is not None else (0.999 if v2 else 0.99)
        F._momentum_tensor(momentum)  # checks it is a number in [0, 1]
        self.base_momentum = float(momentum)
        self.encoder = backbone
        if v2:
            hidden = hidden_dim or min(2048, feature_dim)
            self.projector = mlp(feature_dim, hidden, dim, 2, bn=False)
            self.predictor = None
        else:
            hidden = hidden_dim or 4096
            self.projector = mlp(feature_dim, hidden, dim, 3, last_bn=True)
            self.predictor = mlp(dim, hidden, dim, 2)
        self.key_encoder = MomentumEncoder(nn.Sequential(self.encoder, self.projector),
                                           momentum=self.base_momentum)
        self.queue = NegativeQueue(queue_size, dim) if v2 else None

    def _query(self, x: Tensor) -> Tensor:
        q = self.projector(self.encoder(x))
        return self.predictor(q) if self.predictor is not None else q

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        _check_views(x1, x2)
        tau = self.temperature
        if self.version == "v2":
            q = self._query(x1)
            k = self.key_encoder(x2)
            loss = F.info_nce(q, k, self.queue.negatives(), temperature=tau,
                              distributed=self.distributed)
            # After the loss, before backward: safe (no copy kept). Every rank pushes every
            # rank's keys when distributed: the queues stay identical.
            self.queue.push(k, distributed=self.distributed)
            return loss
        q1, q2 = self._query(torch.cat([x1, x2])).chunk(2)
        k1, k2 = self.key_encoder(torch.cat([x1, x2])).chunk(2)
        d = self.distributed
        return (F.info_nce(q1, k2, temperature=tau, distributed=d)
                + F.info_nce(q2, k1, temperature=tau, distributed=d)) * (2 * tau)

    def momentum_at(self, step, total_steps: Optional[int]):
        """The EMA momentum ``step_end(step, total_steps)`` uses."""
        if self.version == "v2":
            return self.base_momentum
        if total_steps is None:
            raise ValueError("MoCo v3's cosine momentum schedule needs total_steps")
        return F.cosine_momentum(step, total_steps, self.base_momentum)

    def step_end(self, step=None, total_steps: Optional[int] = None) -> None:
        """One fused EMA step of the key encoder (call after ``optimizer.step()``). v3 needs
        ``total_steps`` for its cosine schedule; ``step`` defaults to the key encoder's own
        counter (a tensor in the ``state_dict``: no host sync, no recompiles). v2's momentum
        is constant."""
        if self.version == "v3":
            _check_total(total_steps)
        step = self.key_encoder.step if step is None else step
        self.key_encoder.update(momentum=self.momentum_at(step, total_steps))


class BYOL(nn.Module):
    """BYOL (Grill et al., 2020): an online network predicts a momentum target's projection.

    Args:
        backbone, feature_dim: as in ``SimCLR``.
        projection_dim: 256, hidden_dim: 4096 (the paper's heads: Linear → BN → ReLU → Linear,
            for both the projector and the predictor).
        momentum: the target's EMA momentum τ_base (the paper: 0.996).
        schedule: ``"cosine"`` (the paper: τ rises from ``momentum`` to 1 along a half cosine
            over ``total_steps``) or ``None`` (constant).
        distributed: the loss value is the global batch's mean (BYOL has no negatives, so
            nothing else changes; gradients follow ``fastcl.distributed``'s DDP convention).

    The loss is the paper's symmetrized normalized MSE, averaged over the batch:
    mean(2 - 2 cos(p1, z2') + 2 - 2 cos(p2, z1')), with no gradient into the target, from
    ``fastcl.byol_loss`` (one fused pass forward and one backward). Both views run through each
    network as one concatenated batch (BN statistics over both views; the paper's code runs
    them separately on each device).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 256,
                 hidden_dim: int = 4096, momentum: float = 0.996,
                 schedule: Optional[str] = "cosine", distributed: bool = False):
        super().__init__()
        self.distributed = bool(distributed)
        _check_backbone(backbone, feature_dim)
        F._momentum_tensor(momentum)  # checks it is a number in [0, 1]
        self.base_momentum = float(momentum)
        F._check_choice(schedule, "schedule", ("cosine", None))
        self.schedule = schedule
        self.encoder = backbone
        self.projector = mlp(feature_dim, hidden_dim, projection_dim, 2)
        self.predictor = mlp(projection_dim, hidden_dim, projection_dim, 2)
        self.target = MomentumEncoder(nn.Sequential(self.encoder, self.projector),
                                      momentum=self.base_momentum)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        _check_views(x1, x2)
        p1, p2 = self.predictor(self.projector(self.encoder(torch.cat([x1, x2])))).chunk(2)
        z1, z2 = self.target(torch.cat([x1, x2])).chunk(2)
        rows = byol_loss(p1, z2) + byol_loss(p2, z1)
        if self.distributed:  # no cross-sample terms: only the mean is global
            from fastcl import distributed as dist_mod

            return dist_mod.reduce_value(rows, "mean", rows.dtype)
        return rows.mean()

    def momentum_at(self, step, total_steps: Optional[int]):
        """The EMA momentum ``step_end(step, total_steps)`` uses."""
        if self.schedule is None:
            return self.base_momentum
        if total_steps is None:
            raise ValueError("BYOL's cosine momentum schedule needs total_steps "
                             "(or schedule=None)")
        return F.cosine_momentum(step, total_steps, self.base_momentum)

    def step_end(self, step=None, total_steps: Optional[int] = None) -> None:
        """One fused EMA step of the target network (call after ``optimizer.step()``).
        ``step`` defaults to the target's own counter, as in ``MoCo.step_end``."""
        if self.schedule is not None:
            _check_total(total_steps)
        step = self.target.step if step is None else step
        self.target.update(momentum=self.momentum_at(step, total_steps))


class SupCon(nn.Module):
    """Supervised contrastive pre-training (SupCon, Khosla et al., 2020): SimCLR's model with
    the batch's class labels, every sample of an anchor's class a positive.

    Args:
        backbone, feature_dim, projection_dim, hidden_dim, distributed: as in ``SimCLR`` (the
            same head: Linear → BN → ReLU → Linear, ``hidden_dim`` default ``feature_dim``).
        temperature: τ. Default 0.1 (the paper's value; SupContrast's code defaults to 0.07).
        base_temperature: τ_base, the loss is scaled by τ / τ_base; default ``None``: τ itself
            (no scaling). SupContrast's code sets 0.07 whatever τ is.

    ``forward(x1, x2, labels)``: two views of the same B samples and their (B,) integer
    labels. The two views run through the backbone as one batch (as in ``SimCLR``); the loss is
    ``fastcl.supcon_loss`` on the (B, 2, projection_dim) projections with ``labels``,
    ``contrast_mode="all"`` (fused, no (2B)² tensor). ``step_end`` does nothing.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 128,
                 hidden_dim: Optional[int] = None, temperature: float = 0.1,
                 base_temperature: Optional[float] = None, distributed: bool = False):
        super().__init__()
        _check_backbone(backbone, feature_dim)
        self.temperature = F._check_temperature(temperature)
        self.base_temperature = (None if base_temperature is None
                                 else F._check_temperature(base_temperature))
        self.distributed = bool(distributed)
        self.encoder = backbone
        self.projector = mlp(feature_dim, hidden_dim or feature_dim, projection_dim, 2)

    def forward(self, x1: Tensor, x2: Tensor, labels: Tensor) -> Tensor:
        _check_views(x1, x2)
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a tensor of the batch's (B,) class labels, got "
                            f"{type(labels).__name__}")
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        return F.supcon_loss(torch.stack([z1, z2], dim=1), labels,
                             temperature=self.temperature,
                             base_temperature=self.base_temperature,
                             distributed=self.distributed)

    def step_end(self, step=None, total_steps: Optional[int] = None) -> None:
        """Nothing to update (kept so that one training loop drives every model)."""
