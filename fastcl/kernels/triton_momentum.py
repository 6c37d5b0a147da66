"""Triton kernels for the momentum family: a multi-tensor EMA and the MoCo ring-buffer push.

``ema_(targets, sources, momentum)``
    One launch per dtype group, over a table of the tensors' addresses and sizes (the
    multi-tensor-apply pattern): each program updates one BLOCK of one tensor, in float32
    arithmetic. Tables are cached per set of addresses (parameters do not move between steps),
    so a step uploads nothing. ``momentum`` is loaded from device memory when it lives on the
    device (no host sync), else passed as a scalar.
``queue_push_(queue, ptr, keys)``
    One program per written key reads ``ptr`` on the device and writes its row; ``ptr`` is then
    advanced by a stream-ordered tensor op. Nothing is read on the host.

Pairs the kernel does not take (layouts that differ, float64) go to
``fastcl.kernels.torch_momentum.ema_``, in float32 arithmetic (float64 for float64).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List

import numpy
import torch
import triton
import triton.language as tl

from fastcl import _config
from fastcl.kernels import torch_momentum

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE = 16
# Layouts whose storage order is element order for two tensors with equal strides (what the
# kernel walks): row-major, and the channels-last layouts of conv weights.
_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _block() -> int:
    return 1024 if _config.triton_interpret() else 4096


@triton.jit
def _ema_kernel(t_addr, s_addr, sizes, block_tensor, block_start, m_ptr, m_val, om_val,
                M_ON_DEVICE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(block_tensor + pid)
    blk = (pid - tl.load(block_start + i)).to(tl.int64)
    n = tl.load(sizes + i)
    tp = tl.load(t_addr + i).to(tl.pointer_type(DTYPE))
    sp = tl.load(s_addr + i).to(tl.pointer_type(DTYPE))
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # m and 1 - m, the latter formed in float64: in float32, 1 - 0.9999 would keep 3 digits.
    if M_ON_DEVICE:
        m = tl.load(m_ptr).to(tl.float32)
        om = tl.load(m_ptr + 1).to(tl.float32)
    else:
        m = m_val
        om = om_val
    x = tl.load(tp + offs, mask=mask).to(tl.float32)
    y = tl.load(sp + offs, mask=mask).to(tl.float32)
    tl.store(tp + offs, (x * m + y * om).to(DTYPE), mask=mask)


def _table(targets: List[torch.Tensor], sources: List[torch.Tensor], block: int):
    device = targets[0].device
    key = (device, block, tuple(t.data_ptr() for t in targets),
           tuple(s.data_ptr() for s in sources), tuple(t.numel() for t in targets))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    sizes = [t.numel() for t in targets]
    blocks = [triton.cdiv(n, block) for n in sizes]
    starts, owner = [], []
    for i, nb in enumerate(blocks):
        starts.append(len(owner))
        owner.extend([i] * nb)

    def dev(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device)

    table = (dev([t.data_ptr() for t in targets], torch.int64),
             dev([s.data_ptr() for s in sources], torch.int64),
             dev(sizes, torch.int64), dev(owner, torch.int32), dev(starts, torch.int64),
             len(owner))
    _TABLES[key] = table
    while len(_TABLES) > _TABLE_CACHE:
        _TABLES.popitem(last=False)
    return table


def ema_(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: torch.Tensor) -> None:
    on_device = momentum.device == targets[0].device and momentum.device.type != "cpu"
    if on_device:  # [m, 1 - m] on the device, 1 - m formed in float64: no host sync
        m64 = momentum.to(torch.float64).reshape(1)
        m_ptr, m_val, om_val = torch.cat([m64, 1.0 - m64]), 0.0, 0.0
    else:
        # Rounded to float32 here: Triton would make a scalar outside float32's range (1e-308)
        # a float64 argument, and the arithmetic float64 with it.
        m_ptr = targets[0]  # unread
        m_val = float(numpy.float32(float(momentum)))
        om_val = float(numpy.float32(1.0 - float(momentum)))
    groups, rest_t, rest_s = {}, [], []
    for t, s in zip(targets, sources):
        dense = t.stride() == s.stride() and any(
            t.is_contiguous(memory_format=f) for f in _DENSE_FORMATS)
        if t.numel() == 0:
            continue
        if not dense or t.dtype not in _TL_DTYPES:
            rest_t.append(t)
            rest_s.append(s)
            continue
        groups.setdefault(t.dtype, ([], []))
        groups[t.dtype][0].append(t)
        groups[t.dtype][1].append(s)
    block = _block()
    for dtype, (ts, ss) in groups.items():
        t_addr, s_addr, sizes, owner, starts, n_blocks = _table(ts, ss, block)
        _ema_kernel[(n_blocks,)](t_addr, s_addr, sizes, owner, starts, m_ptr, m_val, om_val,
                                 M_ON_DEVICE=on_device, DTYPE=_TL_DTYPES[dtype], BLOCK=block)
    if rest_t:
        torch_momentum.ema_(rest_t, rest_s, momentum)


@triton.jit
def _queue_push_kernel(queue, ptr, keys, K, D, first, BLOCK_D: tl.constexpr):
    # int64 throughout: ptr + i wraps mod K, and row * D passes 2^31 in a queue with K * D > 2^31.
    i = (tl.program_id(0) + first).to(tl.int64)  # the key this program writes
    k = tl.full([], K, tl.int64)
    start = ((tl.load(ptr).to(tl.int64) % k) + k) % k
    row = (start + i) % k
    dst = queue + row * D
    src = keys + i * D
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = offs < D
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def queue_push_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    k, d = queue.shape
    b = keys.shape[0]
    # Cast with PyTorch (round to nearest even, as everywhere else); the kernel only copies.
    keys = keys.to(queue.dtype).contiguous()
    first = max(0, b - k)  # keys before it would be overwritten within this push
    if b > first:
        block_d = min(triton.next_power_of_2(d), 1024)
        _queue_push_kernel[(b - first,)](queue, ptr, keys, k, d, first, BLOCK_D=block_d)
    # After the kernel in stream order: every program has read the old pointer.
    ptr.copy_(((ptr % k) + b) % k)
