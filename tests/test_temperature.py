"""Extreme temperatures: NT-Xent and InfoNCE (in-batch and with a negatives queue) keep the
suite's 2x-eager rule (``tolerances.assert_within_rule``) for values and gradients down to the
lowest temperature fastcl supports at full accuracy, tau = 1e-4, on every backend.

At such temperatures a logit is ~1/tau = 1e4 and one float32 ulp of it (~1e-3) is the size of
the differences the softmax weights depend on. Two things then decide the gradients' accuracy:

- the backward must see each logit as the very float the forward's logsumexp saw (a row whose
  softmax is ~one-hot has weight exp(s - lse) = 1 only if s and lse come from the same float);
- the logsumexp must not be rounded to a float32 of size 1/tau before the backward subtracts it
  (the kernels keep it in float64: lse = m + log l with log l far below one ulp of m).

Shapes: odd row counts and small tiles, so that edge tiles are thin (one row or column) and the
row and column passes use differently shaped products; the Triton interpreter gets small inputs.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastcl
from fastcl import reference
from conftest import CPU_BACKENDS, tile_patch
from tolerances import assert_within_rule, eager_info_nce, eager_nt_xent

# The lowest temperature at which every backend meets the rule (float32), and one decade above.
EDGE_TEMPERATURES = (1e-4, 1e-3)


def _rows(gen, m, d, dtype=torch.float32):
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    x = x * torch.exp(2 * torch.rand(m, 1, generator=gen, dtype=torch.float64) - 1)
    return x.to(dtype).requires_grad_()


def _check(fast, oracle, eager, tensors, rows, gen, dtype=torch.float32):
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    cot = torch.randn(rows, generator=gen, dtype=torch.float64)
    ref = oracle(*t64)
    ref_g = torch.autograd.grad(ref, t64, cot)
    out = fast(*tensors)
    out_g = torch.autograd.grad(out, tensors, cot.to(out.dtype))
    base = eager(*tensors)
    base_g = torch.autograd.grad(base, tensors, cot.to(base.dtype))
    assert_within_rule(out, ref, base, dtype, "loss")
    for i, (a, r, b) in enumerate(zip(out_g, ref_g, base_g)):
        assert_within_rule(a, r, b, dtype, f"grad of input {i}")


def _shapes(backend):
    """(n, d, tile): n rows per view, odd, with small tiles on the CPU backends."""
    if backend.small:  # the Triton interpreter: 32-row tiles
        return [(17, 16, None), (9, 24, None)]
    return [(64, 32, None), (37, 16, 8), (65, 33, 16)]


def _tile(backend, tile):
    if tile is None or backend.name not in CPU_BACKENDS:
        return contextlib.nullcontext()
    return tile_patch(backend.name, tile)


@pytest.mark.parametrize("temperature", EDGE_TEMPERATURES)
def test_nt_xent_at_low_temperature(backend, temperature):
    for seed, (n, d, tile) in enumerate(_shapes(backend)):
        gen = torch.Generator().manual_seed(seed)
        z1, z2 = _rows(gen, n, d), _rows(gen, n, d)
        with _tile(backend, tile):
            _check(
                lambda a, b: fastcl.nt_xent(a.to(backend.device), b.to(backend.device),
                                            temperature, reduction="none").cpu(),
                lambda a, b: reference.nt_xent(a, b, temperature, reduction="none"),
                lambda a, b: eager_nt_xent(a, b, temperature, reduction="none"),
                [z1, z2], 2 * n, gen,
            )


@pytest.mark.parametrize("temperature", EDGE_TEMPERATURES)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "detached queue"])
def test_info_nce_at_low_temperature(backend, temperature, mode):
    for seed, (n, d, tile) in enumerate(_shapes(backend)):
        gen = torch.Generator().manual_seed(100 + seed)
        q, k = _rows(gen, n, d), _rows(gen, n, d)
        tensors = [q, k]
        queue = None
        if mode == "queue":
            tensors.append(_rows(gen, 3 * n + 1, d))
        elif mode == "detached queue":  # dq then comes from the forward's pass (C++, chunked)
            queue = _rows(gen, 3 * n + 1, d).detach()

        def fast(*t):
            dev = [x.to(backend.device) for x in t]
            neg = dev[2] if len(dev) > 2 else (None if queue is None else queue.to(backend.device))
            return fastcl.info_nce(dev[0], dev[1], neg, temperature, reduction="none").cpu()

        def oracle(*t):
            neg = t[2] if len(t) > 2 else (None if queue is None else queue.double())
            return reference.info_nce(t[0], t[1], neg, temperature, reduction="none")

        def eager(*t):
            neg = t[2] if len(t) > 2 else queue
            return eager_info_nce(t[0], t[1], neg, temperature, reduction="none")

        with _tile(backend, tile):
            _check(fast, oracle, eager, tensors, n, gen)
