"""Higher-order gradients: every fused op refuses ``create_graph=True`` clearly, at the first
backward, naming itself; the PyTorch paths (the reference backend, paired InfoNCE) give true
second derivatives.

Before, ``byol_loss``'s second derivative came back disconnected on the C++ path and off by
0.028 on the chunked one, silently; ``nt_xent`` and ``info_nce`` failed only at the second
backward with PyTorch's generic message.
"""
from __future__ import annotations

import pytest
import torch

import fastcl
from test_dtypes import _one_rank_group

REFUSED = "does not support double backward"


def _x(*shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _cases(device, dtype=torch.float32):
    z1, z2 = _x(6, 8, seed=1, device=device, dtype=dtype), _x(6, 8, seed=2, device=device,
                                                              dtype=dtype)
    queue = _x(10, 8, seed=3, device=device, dtype=dtype)
    return [
        ("fastcl.nt_xent", lambda a: fastcl.nt_xent(a, z2, 0.3), z1),
        ("fastcl.info_nce", lambda a: fastcl.info_nce(a, z2, None, 0.3), z1),
        ("fastcl.info_nce", lambda a: fastcl.info_nce(a, z2, queue, 0.3), z1),
        ("fastcl.info_nce", lambda a: fastcl.info_nce(z1, a, queue, 0.3), z2),  # dk only
        ("fastcl.byol_loss", lambda a: fastcl.byol_loss(a, z2).mean(), z1),
    ]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_fused_ops_refuse_create_graph_at_the_first_backward(backend):
    for name, fn, x in _cases(backend.device):
        x = x.clone().requires_grad_()
        loss = fn(x)
        with pytest.raises(RuntimeError, match=REFUSED) as info:
            torch.autograd.grad(loss, x, create_graph=True)
        assert name in str(info.value)
        # Without create_graph the same graph still gives its gradient.
        (g,) = torch.autograd.grad(fn(x), x)
        assert torch.isfinite(g).all()
        # loss.backward(create_graph=True) is refused the same way.
        with pytest.raises(RuntimeError, match=REFUSED):
            fn(x).backward(create_graph=True)


def test_reference_backend_gives_true_second_derivatives():
    """FASTCL_BACKEND=reference (named in the refusal) is plain PyTorch: gradgradcheck passes."""
    with fastcl.use_backend("reference"):
        for _, fn, x in _cases("cpu", torch.float64):
            x = x.clone().requires_grad_()
            assert torch.autograd.gradgradcheck(lambda a: fn(a), (x,))


def test_paired_info_nce_is_twice_differentiable(cpu_backend):
    """Paired negatives run on PyTorch ops in every backend: true second derivatives."""
    q, k = _x(4, 6, seed=1, device="cpu", dtype=torch.float64), _x(4, 6, seed=2, device="cpu",
                                                                   dtype=torch.float64)
    neg = _x(4, 5, 6, seed=3, device="cpu", dtype=torch.float64)
    q.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a: fastcl.info_nce(a, k, neg, 0.5, negative_mode="paired"), (q,))


def test_byol_second_derivative_is_never_silently_wrong(cpu_backend):
    """The issue's example: the second derivative of byol_loss is either correct (it is not
    computed by the fused op) or refused; before, it was None or off by 0.028."""
    p = _x(5, 7, seed=4, device="cpu", dtype=torch.float64).requires_grad_()
    z = _x(5, 7, seed=5, device="cpu", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fastcl.byol_loss.*" + REFUSED):
        torch.autograd.grad(fastcl.byol_loss(p, z).mean(), p, create_graph=True)


def test_compiled_losses_still_differentiate_once(cpu_backend):
    """The refusal reads grad mode inside the backward: torch.compile's traced backward
    (create_graph=False) is not affected."""
    z1, z2 = _x(6, 8, seed=1, device="cpu"), _x(6, 8, seed=2, device="cpu")
    z1.requires_grad_()
    f = torch.compile(lambda a, b: fastcl.nt_xent(a, b, 0.3) + fastcl.byol_loss(a, b).mean(),
                      fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(f(z1, z2), z1)
    (g_eager,) = torch.autograd.grad(fastcl.nt_xent(z1, z2, 0.3)
                                     + fastcl.byol_loss(z1, z2).mean(), z1)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-6)


def test_distributed_losses_refuse_create_graph():
    """The distributed autograd Functions (one gloo rank here) refuse it the same way."""
    z1, z2 = _x(6, 8, seed=1, device="cpu"), _x(6, 8, seed=2, device="cpu")
    z1.requires_grad_()
    with _one_rank_group():
        for name, fn in [("fastcl.nt_xent", lambda: fastcl.nt_xent(z1, z2, distributed=True)),
                         ("fastcl.info_nce", lambda: fastcl.info_nce(z1, z2, distributed=True))]:
            with pytest.raises(RuntimeError, match=name + ".*" + REFUSED):
                torch.autograd.grad(fn(), z1, create_graph=True)
