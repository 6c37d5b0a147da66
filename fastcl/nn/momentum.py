"""Modules for momentum encoders and MoCo's negatives queue, over fastcl's fused ops."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from fastcl import functional as F

Schedule = Callable[[Union[int, Tensor]], Union[float, Tensor]]


class MomentumEncoder(nn.Module):
    """A frozen EMA copy of ``module`` (MoCo's key encoder, BYOL's target network).

    Args:
        module: the online module. It is deep-copied once; the copy (``.target``) has
            ``requires_grad=False`` everywhere. The online module is referenced, not
            registered: it is not part of this module's parameters or ``state_dict``.
        momentum: the EMA momentum used when there is no schedule.
        schedule: optional ``step -> momentum``, e.g.
            ``functools.partial(fastcl.cosine_momentum, total_steps=T, base=0.996)``. It gets
            the step as a tensor (the ``step`` buffer), so a tensor-valued schedule such as
            ``cosine_momentum`` runs without host syncs or recompiles.
        buffers: how ``update`` treats buffers (see ``fastcl.ema_``); default ``"none"``: the
            target's BatchNorm statistics come from its own forward passes, as in MoCo.

    ``forward`` runs the target under ``torch.no_grad()``. ``update(step=None, momentum=None)``
    applies one fused EMA step (``fastcl.ema_``) from the online module and then advances the
    ``step`` buffer; an explicit ``step`` is used instead of the buffer for the schedule, and an
    explicit ``momentum`` instead of both. The target's
    weights and ``step`` are in ``state_dict``: a run resumed from a checkpoint continues
    bitwise identically.
    """

    def __init__(self, module: nn.Module, momentum: float = 0.99,
                 schedule: Optional[Schedule] = None, buffers: str = "none"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        F._momentum_tensor(momentum)  # validates
        F._check_choice(buffers, "buffers", F._BUFFER_MODES)
        object.__setattr__(self, "online", module)  # referenced, not a submodule
        self.target = copy.deepcopy(module)
        self.target.requires_grad_(False)
        self.momentum = float(momentum)
        self.schedule = schedule
        self.buffers_mode = buffers
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._pairs = None

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.target(*args, **kwargs)

    def current_momentum(self, step=None):
        """The momentum ``update(step)`` would use."""
        if self.schedule is None:
            return self.momentum
        return self.schedule(self.step if step is None else step)

    @torch.no_grad()
    def update(self, step=None, momentum=None) -> None:
        """One fused EMA step from the online module, then ``step += 1``. ``momentum`` (a
        float or a 0-dim tensor) overrides both the constant and the schedule."""
        m = self.current_momentum(step) if momentum is None else momentum
        if torch.compiler.is_compiling():
            F.ema_(self.target, self.online, m, buffers=self.buffers_mode)
        else:
            # The tensor lists are matched and checked once (fastcl.ema_ re-checks 161 tensors
            # on every call, as much time as a small model's update itself); parameters keep
            # their identity through .to(), load_state_dict and optimizers.
            if self._pairs is None:
                self._pairs = F._ema_pairs(self.target, self.online, self.buffers_mode)
            (targets, sources), (copy_t, copy_s) = self._pairs
            F._ema_checked(targets, sources, F._momentum_tensor(m), copy_t, copy_s)
        self.step.add_(1)


class NegativeQueue(nn.Module):
    """MoCo's queue of negative keys: a (size, dim) ring buffer with an on-device pointer.

    Buffers ``queue`` (initialized to random unit vectors, as in MoCo) and ``ptr`` (int64, one
    element) are in ``state_dict``: contents and position survive a checkpoint exactly.

    ``push(keys)`` writes a (B, dim) batch in place with ``fastcl.queue_push_``: any B, wrapping
    at the end, no host sync. ``negatives()`` returns the queue detached, for
    ``fastcl.info_nce(q, k, queue.negatives())``: no copy. Pushing after computing the loss and
    before its backward is safe, as MoCo does it: fastcl's InfoNCE keeps no reference to a
    queue that needs no gradient.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        queue = torch.nn.functional.normalize(torch.randn(size, dim, device=device), dim=1)
        self.register_buffer("queue", queue.to(dtype))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.int64, device=device))

    def push(self, keys: Tensor, distributed: bool = False) -> None:
        """Enqueue ``keys`` (B, dim). With ``distributed=True`` every rank enqueues the keys of
        all ranks in rank order (``torch.distributed`` all-gather), so that the queues of all
        ranks stay identical. If the ranks' keys, or their queues, differ in features or dtype,
        every rank raises the same ``ValueError``."""
        if distributed:
            from fastcl import distributed as dist_mod

            sizes = dist_mod.check_ranks("NegativeQueue.push", "keys", keys, empty_ok=True,
                                         queue=self.queue)
            keys = dist_mod.all_gather_rows(keys, sizes)
        F.queue_push_(self.queue, self.ptr, keys)

    def negatives(self) -> Tensor:
        return self.queue.detach()

    def extra_repr(self) -> str:
        return f"size={self.queue.shape[0]}, dim={self.queue.shape[1]}, dtype={self.queue.dtype}"
