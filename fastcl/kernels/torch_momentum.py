"""PyTorch implementation of the momentum kernels: fastcl's fallback where the fast paths can't
run (no compiler or ninja for the C++ kernels on CPU, no Triton on CUDA; CUDA float64).

``ema_(targets, sources, momentum)``
    targets[i] <- momentum * targets[i] + (1 - momentum) * sources[i], in place, in float32
    arithmetic (float64 for float64) whatever the storage dtype; ``momentum`` a Python float.
    Grouped ``torch._foreach_*`` calls, one group per dtype.
``queue_push_(queue, ptr, keys)``
    The ring-buffer write with device-side indices (``index_copy_``): no host sync.
"""
from __future__ import annotations

from typing import List

import torch


def ema_(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: torch.Tensor) -> None:
    on_host = momentum.device.type == "cpu"
    m = float(momentum) if on_host else momentum
    groups = {}
    for t, s in zip(targets, sources):
        groups.setdefault(t.dtype, ([], []))
        groups[t.dtype][0].append(t)
        groups[t.dtype][1].append(s)
    for dtype, (ts, ss) in groups.items():
        wide = dtype in (torch.float32, torch.float64)
        acc = ts if wide else [t.float() for t in ts]  # float32 arithmetic for half / bf16
        src = ss if wide else [s.float() for s in ss]
        torch._foreach_mul_(acc, m)
        if on_host:
            torch._foreach_add_(acc, src, alpha=1.0 - m)
        else:
            # 1 - m formed in float64, as everywhere else (1 - 0.9999 keeps 3 digits in float32)
            one_minus = (1.0 - m.to(torch.float64)).to(acc[0].dtype)
            torch._foreach_add_(acc, torch._foreach_mul(src, one_minus))
        if not wide:
            for t, a in zip(ts, acc):
                t.copy_(a)


def queue_push_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    k, b = queue.shape[0], keys.shape[0]
    first = max(0, b - k)  # keys before it would be overwritten within this push
    start = ptr.reshape(()) % k
    rows = (start + torch.arange(first, b, device=queue.device)) % k
    queue.index_copy_(0, rows, keys[first:].to(queue.dtype))
    ptr.copy_(((start + b) % k).reshape(ptr.shape))
