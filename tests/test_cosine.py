"""``fastcl.byol_loss`` (op ``fastcl::cosine_loss``): BYOL's normalized MSE, fused, on every
backend (C++, the PyTorch fallback, Triton under its interpreter here), against the eager
``F.normalize`` formula of ``fastcl.reference.byol_loss`` in float64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastcl
from fastcl import ops, reference

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6),
       torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def _inputs(b, f, dtype, device, seed, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(b, f, generator=g, dtype=torch.float64)
    z = torch.randn(b, f, generator=g, dtype=torch.float64)
    for r in zero_rows:
        p[r % b] = 0
    return p.to(dtype).to(device), z.to(dtype).to(device)


@given(b=st.integers(1, 40), f=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       reduction=st.sampled_from(["none", "mean", "sum"]))
def test_values_and_gradient_match_eager(backend, b, f, seed, dtype, reduction):
    """Loss and dp against the float64 eager formula (F.normalize), across tile edges of the
    feature axis (F up to 300 > Triton's 256-wide chunks) and row blocks."""
    if backend.name == "triton" and dtype == torch.float64:
        dtype = torch.float32  # float64 runs on the PyTorch path under auto
    p, z = _inputs(b, f, dtype, backend.device, seed)
    p.requires_grad_(True)
    loss = fastcl.byol_loss(p, z, reduction=reduction)
    # The loss in the accumulation dtype (float32 for 16-bit inputs), dp in p's dtype.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc
    w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    (loss.double() * w.to(loss.device)).sum().backward()

    p64 = p.detach().double().cpu().requires_grad_(True)
    ref = reference.byol_loss(p64, z.double().cpu(), reduction)
    (ref * w).sum().backward()
    # The loss is computed from the rounded inputs and never rounded to 16 bits: float32's
    # tolerance (the float64 reference runs on the same rounded inputs).
    rtol, atol = TOL[acc]
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=rtol, atol=atol * 4)
    rtol, atol = TOL[dtype]
    assert p.grad.dtype == dtype
    # dp = -2 g ip (z iz - cos ip p): its two terms cancel (exactly when F = 1), so the error
    # is bounded by the terms' size, not the result's.
    x, y = p64.detach(), z.double().cpu()
    ip, iz = 1 / x.norm(dim=1, keepdim=True), 1 / y.norm(dim=1, keepdim=True)
    gw = ref.new_ones(ref.shape) * w if reduction == "none" else w * (
        1 / b if reduction == "mean" else 1.0)
    terms = 2 * gw.abs().reshape(-1, 1) * ip * (y.abs() * iz + x.abs() * ip)
    err = (p.grad.double().cpu() - p64.grad).abs()
    assert bool((err <= rtol * 4 * terms + atol).all()), float((err / (terms + 1e-300)).max())


def test_zero_rows_and_stop_gradient(backend):
    """A zero row of p (the clamp of F.normalize: no projection term) and of z stay finite and
    match eager; z never gets a gradient, even when it requires one."""
    p, z = _inputs(6, 10, torch.float32, backend.device, 3, zero_rows=(1, 4))
    z[2] = 0
    p.requires_grad_(True)
    z.requires_grad_(True)
    fastcl.byol_loss(p, z).sum().backward()
    assert z.grad is None
    p64 = p.detach().double().cpu().requires_grad_(True)
    ref = reference.byol_loss(p64, z.detach().double().cpu())
    ref.sum().backward()
    assert torch.isfinite(p.grad).all()
    torch.testing.assert_close(fastcl.byol_loss(p, z).double().cpu(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.grad.double().cpu(), p64.grad, rtol=1e-5, atol=1e-3)


def test_strided_inputs(backend):
    p, z = _inputs(9, 12, torch.float32, backend.device, 5)
    pt = p.T.contiguous().T  # column-major
    zs = torch.cat([z, z], 1)[:, ::2]  # non-unit column stride
    torch.testing.assert_close(fastcl.byol_loss(pt, zs), reference.byol_loss(p, zs),
                               rtol=1e-6, atol=1e-6)


def test_opcheck(backend):
    p, z = _inputs(5, 7, torch.float32, backend.device, 7)
    p.requires_grad_(True)
    torch.library.opcheck(ops.cosine_loss, (p, z))
    loss, stats = ops.cosine_loss(p, z)
    torch.library.opcheck(ops.cosine_loss_backward, (torch.ones_like(loss), p.detach(), z, stats))


def test_compiled_matches_eager(cpu_backend):
    p, z = _inputs(16, 32, torch.float32, "cpu", 9)
    pe = p.clone().requires_grad_(True)
    pc = p.clone().requires_grad_(True)
    fn = torch.compile(lambda a, b: fastcl.byol_loss(a, b, "mean"), fullgraph=True)
    le, lc = fastcl.byol_loss(pe, z, "mean"), fn(pc, z)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(pc.grad, pe.grad)


def test_errors_name_the_argument():
    p = torch.randn(4, 8)
    with pytest.raises(ValueError, match="z has 9 features but p has 8"):
        fastcl.byol_loss(p, torch.randn(4, 9))
    with pytest.raises(ValueError, match="p and z must have the same shape"):
        fastcl.byol_loss(p, torch.randn(5, 8))
    with pytest.raises(TypeError, match="z must have a floating-point dtype"):
        fastcl.byol_loss(p, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction"):
        fastcl.byol_loss(p, p, reduction="avg")
    with pytest.raises(ValueError, match="p must be 2-dimensional"):
        fastcl.byol_loss(torch.randn(8), torch.randn(8))
