"""The C++ dense path of in-batch InfoNCE (csrc/dense.cpp): the logits kept when they fit
``fastcl.kernels.cpp.DENSE_CAP_BYTES``, the tiled kernels beyond.

- values and gradients against the tiled kernels and the float64 oracle, over shapes,
  temperatures (1e-3 .. 2) and dtypes: the dense path is never less accurate than the tiled one;
- the kernels' dscale and DCL outputs against their float64 formulas;
- the automatic switch at the cap (and the element size it counts), and memory beyond it: no
  allocation of the size of the logits;
- determinism, and the same loss with and without gradients.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import reference

cpp = pytest.importorskip("fastcl.kernels.cpp")


def _inputs(n, d, dtype, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(m or n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k


def _run(q, k, tau, cap=None):
    """(per-row losses, dq, dk) of fastcl.info_nce on the C++ backend, the cap patched."""
    ctx = mock.patch.object(cpp, "DENSE_CAP_BYTES", cap) if cap is not None else _null()
    with fastcl.use_backend("cpp"), ctx:
        loss = fastcl.info_nce(q, k, temperature=tau, reduction="none")
        w = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)  # a non-uniform g
        dq, dk = torch.autograd.grad((loss * w).sum(), (q, k))
    return loss.detach(), dq, dk, w


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _oracle(q, k, tau, w):
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    loss = reference.info_nce(q64, k64, temperature=tau, reduction="none")
    dq, dk = torch.autograd.grad((loss * w.double()).sum(), (q64, k64))
    return loss.detach(), dq, dk


def _err(x, ref):
    return float((x.double() - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("tau", [1e-3, 0.01, 0.07, 0.5, 2.0])
@pytest.mark.parametrize("n,d", [(1, 4), (2, 3), (7, 5), (64, 33), (130, 128), (300, 17)])
def test_dense_matches_tiled_and_oracle(n, d, tau, dtype):
    q, k = _inputs(n, d, dtype, seed=n * 31 + d)
    with mock.patch.object(cpp, "dense_forward", wraps=cpp.dense_forward) as spy:
        dense = _run(q, k, tau)
    assert spy.call_count == 1  # small: the dense path ran
    tiled = _run(q, k, tau, cap=0)
    ref = _oracle(q, k, tau, dense[3])
    atol = 1e-6 if dtype == torch.float32 else 1e-13
    for name, a, b, r in zip(("loss", "dq", "dk"), dense[:3], tiled[:3], ref):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        # Never less accurate than the tiled kernels (2x their error against float64).
        assert _err(a, r) <= 2 * _err(b, r) + atol * max(1.0, float(r.abs().max())), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("in_denominator", [True, False], ids=["infonce", "dcl"])
def test_dense_forward_kernel_outputs(dtype, in_denominator):
    """loss, lse, dscale, v and P of the kernel against their float64 formulas."""
    n, d, tau = 37, 19, 0.2
    q, k = (t.detach() for t in _inputs(n, d, dtype, seed=5))
    nq = torch.linalg.vector_norm(q, dim=1, dtype=dtype).clamp_min(1e-12)
    nk = torch.linalg.vector_norm(k, dim=1, dtype=dtype).clamp_min(1e-12)
    loss, lse, dscale, v, probs = cpp.dense_forward(q, k, nq, nk, 1 / tau, 0, in_denominator,
                                                    True, True)
    qh, kh = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    cos = qh @ kh.T
    s = cos / tau
    eye = torch.eye(n, dtype=torch.bool)
    s_den = s if in_denominator else s.masked_fill(eye, float("-inf"))
    lse64 = torch.logsumexp(s_den, dim=1)
    p = torch.exp(s_den - lse64[:, None])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(lse, lse64, **tol)
    torch.testing.assert_close(loss.double(), lse64 - s.diagonal(), **tol)
    torch.testing.assert_close(dscale.double(), (p * cos).sum(1) - cos.diagonal(), **tol)
    p0 = p.masked_fill(eye, 0)  # the positive's weight is the op layer's
    torch.testing.assert_close(probs.double(), p0, **tol)
    torch.testing.assert_close(v.double(), (p0 @ kh) / tau, **tol)
    g = torch.linspace(-1, 2, n, dtype=dtype)
    cols = cpp.dense_grad_cols(probs, g, q, nq, 1 / tau)
    torch.testing.assert_close(cols.double(), (p0 * g.double()[:, None]).T @ qh / tau, **tol)


def test_loss_same_with_and_without_grad():
    """The path depends on the shapes alone: training and evaluation give the same floats."""
    q, k = _inputs(96, 24, torch.float32, seed=3)
    with fastcl.use_backend("cpp"):
        a = fastcl.info_nce(q, k, temperature=0.1, reduction="none")
        with torch.no_grad():
            b = fastcl.info_nce(q, k, temperature=0.1, reduction="none")
        c = fastcl.info_nce(q.detach(), k, temperature=0.1, reduction="none")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_dense_is_deterministic():
    q, k = _inputs(200, 64, torch.float32, seed=4)
    first = _run(q, k, 0.05)
    for _ in range(2):
        again = _run(q, k, 0.05)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float64, 8)],
                         ids=["f32", "f64"])
def test_cap_switches_automatically(dtype, size):
    """Dense when n * m * element size <= DENSE_CAP_BYTES, the tiled kernels beyond."""
    n, d = 48, 8
    q, k = _inputs(n, d, dtype, seed=6)
    nbytes = n * n * size
    for cap, dense in ((nbytes, True), (nbytes - 1, False), (cpp.DENSE_CAP_BYTES, True)):
        with mock.patch.object(cpp, "dense_forward", wraps=cpp.dense_forward) as df, \
                mock.patch.object(cpp, "dense_backward", wraps=cpp.dense_backward) as db, \
                mock.patch.object(cpp, "lse_forward_with_grad",
                                  wraps=cpp.lse_forward_with_grad) as tf:
            _run(q, k, 0.1, cap=cap)
        assert (df.call_count, db.call_count, tf.call_count) == ((1, 1, 0) if dense
                                                                 else (0, 0, 1)), cap
    assert cpp.DENSE_CAP_BYTES == 16 * 2**20


def test_other_specs_stay_tiled():
    """The dense path is in-batch only: a queue of negatives runs the tiled kernels."""
    q, k = _inputs(16, 8, torch.float32, seed=7)
    queue = torch.randn(40, 8)
    with fastcl.use_backend("cpp"), \
            mock.patch.object(cpp, "dense_forward", wraps=cpp.dense_forward) as df:
        loss = fastcl.info_nce(q, k, queue, temperature=0.1)
        torch.autograd.grad(loss, (q, k))
    assert df.call_count == 0


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) any op makes while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_memory_beyond_the_cap_is_linear():
    """Beyond the cap no tensor the size of the logits is ever allocated (forward + backward);
    within it, the dense path does allocate them (which shows the probe sees them)."""
    n, d = 1024, 16
    logits = n * n * 4  # 4 MiB
    q, k = _inputs(n, d, torch.float32, seed=8)
    tiled = _largest_allocation(lambda: _run(q, k, 0.1, cap=logits - 1))
    dense = _largest_allocation(lambda: _run(q, k, 0.1))
    assert dense >= logits
    assert tiled < logits // 4, tiled
