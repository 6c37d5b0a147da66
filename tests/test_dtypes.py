"""fastcl's dtype policy (``fastcl.functional``'s module docstring), on every backend:

- inputs of different floating dtypes are accepted (a bfloat16 query beside a float32 MoCo
  queue under autocast) and promoted to a common dtype;
- the loss, for every reduction, comes back in the accumulation dtype: float32 for bfloat16
  and float16 inputs, inside and outside autocast; float64 when any input is float64;
- each gradient comes back in its input's dtype.

16-bit losses are checked against the float64 reference on the same rounded inputs: rounding
the loss to the bfloat16 grid (what fastcl did before) costs about 1e-2 near a loss of 5.5.
"""
from __future__ import annotations

import contextlib
import datetime
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastcl
from fastcl import models, reference

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _randn(*shape, seed, dtype=F32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype).to(device)


def _loss_cases(n, m, d, device):
    """(name, fn, tensors) for every loss, inputs in float64 (cast per test)."""
    z1, z2, q, k = (_randn(n, d, seed=s, dtype=F64, device=device) for s in range(4))
    queue = _randn(m, d, seed=4, dtype=F64, device=device)
    paired = _randn(n, 3, d, seed=5, dtype=F64, device=device)
    return [
        ("nt_xent", lambda a, b, r: fastcl.nt_xent(a, b, 0.1, r), [z1, z2]),
        ("in_batch", lambda a, b, r: fastcl.info_nce(a, b, None, 0.1, r), [q, k]),
        ("queue", lambda a, b, c, r: fastcl.info_nce(a, b, c, 0.07, r), [q, k, queue]),
        ("paired", lambda a, b, c, r: fastcl.info_nce(a, b, c, 0.1, r, "paired"),
         [q, k, paired]),
        ("byol", lambda a, b, r: fastcl.byol_loss(a, b, r), [z1, z2]),
    ]


def _oracle(name, tensors, reduction):
    """The float64 reference on the given (already rounded) inputs."""
    t = [x.detach().double() for x in tensors]
    if name == "nt_xent":
        return reference.nt_xent(t[0], t[1], 0.1, reduction)
    if name == "in_batch":
        return reference.info_nce(t[0], t[1], None, 0.1, reduction)
    if name == "queue":
        return reference.info_nce(t[0], t[1], t[2], 0.07, reduction)
    if name == "paired":
        return reference.info_nce(t[0], t[1], t[2], 0.1, reduction, "paired")
    return reference.byol_loss(t[0], t[1], reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_16bit_inputs_give_a_float32_loss_at_float32_precision(backend, dtype, reduction):
    """Every loss and reduction: a float32 result within float32 accuracy of the float64
    reference on the same 16-bit inputs (a loss rounded to bfloat16 near 5.5 is off by ~1e-2;
    the bound here is 2e-5 relative); gradients in the input dtype."""
    n, m, d = (6, 20, 16) if backend.small else (40, 300, 64)
    for name, fn, tensors in _loss_cases(n, m, d, backend.device):
        xs = [t.to(dtype).requires_grad_() for t in tensors]
        loss = fn(*xs, reduction)
        assert loss.dtype == F32, (name, loss.dtype)
        oracle = _oracle(name, xs, reduction)
        scale = max(1.0, oracle.abs().max().item())
        err = (loss.detach().double() - oracle).abs().max().item()
        assert err <= 2e-5 * scale, (name, err)
        grads = torch.autograd.grad(loss.sum(), xs, allow_unused=True)
        for x, g in zip(xs, grads):
            if g is not None:  # byol's z gets none (stop-gradient)
                assert g.dtype == dtype and g.shape == x.shape, name


@pytest.mark.parametrize("autocast_dtype", [BF16, F16])
def test_losses_under_autocast_return_float32(backend, autocast_dtype):
    """Inside an autocast region too (16-bit activations from a Linear): float32 losses."""
    n, d = (6, 16) if backend.small else (32, 48)
    lin = nn.Linear(d, d).to(backend.device)
    x1, x2 = (_randn(n, d, seed=s, device=backend.device) for s in (7, 8))
    queue = _randn(50, d, seed=9, device=backend.device)  # float32 buffer
    with torch.autocast(backend.device.type, dtype=autocast_dtype):
        z1, z2 = lin(x1), lin(x2)
        assert z1.dtype == autocast_dtype
        losses = [fastcl.nt_xent(z1, z2), fastcl.info_nce(z1, z2),
                  fastcl.info_nce(z1, z2, queue), fastcl.byol_loss(z1, z2).mean(),
                  fastcl.nt_xent(z1, z2, reduction="none")]
    for loss in losses:
        assert loss.dtype == F32
    sum(loss.sum() for loss in losses).backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_a_float32_queue_beside_bfloat16_queries(backend):
    """info_nce(bf16 q, bf16 k, fp32 queue): the same loss as with every input widened to
    float32 (the promotion the docs state), and each gradient in its own input's dtype, equal
    to the float32 call's gradient rounded to that dtype."""
    n, m, d = (5, 24, 16) if backend.small else (33, 200, 40)
    q, k = (_randn(n, d, seed=s, dtype=BF16, device=backend.device) for s in (1, 2))
    queue = _randn(m, d, seed=3, device=backend.device)
    mixed = [q.clone().requires_grad_(), k.clone().requires_grad_(),
             queue.clone().requires_grad_()]
    wide = [t.detach().float().requires_grad_() for t in mixed]
    loss = fastcl.info_nce(*mixed, temperature=0.07)
    expect = fastcl.info_nce(*wide, temperature=0.07)
    assert loss.dtype == F32
    torch.testing.assert_close(loss, expect, rtol=0, atol=0)
    g_mixed = torch.autograd.grad(loss, mixed)
    g_wide = torch.autograd.grad(expect, wide)
    for x, gm, gw in zip(mixed, g_mixed, g_wide):
        assert gm.dtype == x.dtype
        torch.testing.assert_close(gm, gw.to(x.dtype), rtol=0, atol=0)
    # The positive key may differ from the query as well, and so may the two NT-Xent views.
    assert fastcl.info_nce(q, k.float(), queue.half()).dtype == F32
    assert fastcl.nt_xent(q, k.half()).dtype == F32  # bfloat16 with float16: float32


def test_any_float64_input_gives_float64(cpu_backend):
    """(float64 is not a Triton dtype: CUDA float64 runs on the chunked path.)"""
    q, k = _randn(4, 8, seed=1, dtype=BF16), _randn(4, 8, seed=2)
    queue = _randn(12, 8, seed=3, dtype=F64)
    loss = fastcl.info_nce(q, k, queue)
    assert loss.dtype == F64
    torch.testing.assert_close(loss, reference.info_nce(q.double(), k.double(), queue, 0.1),
                               rtol=1e-12, atol=1e-12)
    assert fastcl.nt_xent(q.float(), k.double()).dtype == F64
    assert fastcl.byol_loss(q, queue[:4]).dtype == F64


def test_reference_backend_follows_the_same_policy():
    q, k = _randn(4, 8, seed=1, dtype=BF16), _randn(4, 8, seed=2, dtype=BF16)
    queue = _randn(12, 8, seed=3)
    with fastcl.use_backend("reference"):
        assert fastcl.info_nce(q, k, queue).dtype == F32
        assert fastcl.nt_xent(q, k, reduction="none").dtype == F32
        assert fastcl.byol_loss(q, k).dtype == F32
        assert fastcl.info_nce(q, k, queue.double()).dtype == F64


def test_moco_trains_under_autocast_with_its_float32_queue():
    """The issue's case: MoCo v2 under CPU autocast (bf16 activations, float32 queue) used to
    raise a TypeError about negative_keys' dtype. Now it trains: the loss is float32, the
    queue stays float32 and receives the keys, and the backbone gets gradients."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    m = models.MoCo(backbone, 8, queue_size=64)
    x1, x2 = torch.randn(4, 16), torch.randn(4, 16)
    before = m.queue.negatives().clone()
    with torch.autocast("cpu", dtype=BF16):
        loss = m(x1, x2)
    assert loss.dtype == F32 and torch.isfinite(loss)
    loss.backward()
    assert m.queue.negatives().dtype == F32
    assert not torch.equal(m.queue.negatives()[:4], before[:4])
    assert backbone[1].weight.grad is not None
    for version in ("v3",):
        mv = models.MoCo(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), 8, version=version)
        with torch.autocast("cpu", dtype=BF16):
            assert mv(x1, x2).dtype == F32


@contextlib.contextmanager
def _one_rank_group():
    """A gloo process group of one rank in this process (torch.distributed's global state)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_distributed_reductions_follow_the_policy():
    """distributed=True (one gloo rank): bf16 inputs give float32 losses for every reduction,
    equal to the single-process ones."""
    z1, z2 = (_randn(6, 8, seed=s, dtype=BF16) for s in (1, 2))
    queue = _randn(20, 8, seed=3)
    with _one_rank_group():
        for reduction in ("mean", "sum", "none"):
            for got, expect in [
                (fastcl.nt_xent(z1, z2, 0.2, reduction, distributed=True),
                 fastcl.nt_xent(z1, z2, 0.2, reduction)),
                (fastcl.info_nce(z1, z2, None, 0.2, reduction, distributed=True),
                 fastcl.info_nce(z1, z2, None, 0.2, reduction)),
                (fastcl.info_nce(z1, z2, queue, 0.2, reduction, distributed=True),
                 fastcl.info_nce(z1, z2, queue, 0.2, reduction)),
            ]:
                assert got.dtype == F32
                torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
