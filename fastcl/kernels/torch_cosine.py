"""BYOL's cosine loss in PyTorch ops: the fallback of ``fastcl::cosine_loss`` (no C++ compiler on
the CPU, no Triton on CUDA, CUDA float64). Same contract as ``csrc/cosine.cpp``:

``cosine_forward(p, z) -> (loss, stats)``
    loss_i = 2 - 2 cos(p_i, z_i); stats (B, 3) = [1 / max(|p_i|, eps), 1 / max(|z_i|, eps),
    cos_i]; float32 (float64 for float64).
``cosine_backward(g, p, z, stats) -> dp``
    -2 g_i ip_i (z_i iz_i - cos_i ip_i p_i), the projection term dropped where |p_i| <= eps (the
    clamp of ``F.normalize``); float32 (float64).
"""
from __future__ import annotations

import torch

EPS = 1e-12


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cosine_forward(p, z):
    acc = _acc(p)
    p, z = p.to(acc), z.to(acc)
    ip = 1.0 / p.norm(dim=1).clamp_min(EPS)
    iz = 1.0 / z.norm(dim=1).clamp_min(EPS)
    cos = (p * z).sum(1) * ip * iz
    return 2 - 2 * cos, torch.stack([ip, iz, cos], dim=1)


def cosine_backward(g, p, z, stats):
    acc = _acc(p)
    ip, iz, cos = stats.to(acc).unbind(1)
    scale = -2 * g.to(acc) * ip
    wp = torch.where(ip < 1.0 / EPS, -scale * cos * ip, torch.zeros_like(ip))
    return (scale * iz)[:, None] * z.to(acc) + wp[:, None] * p.to(acc)
