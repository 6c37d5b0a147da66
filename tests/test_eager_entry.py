"""The eager entry of the engine's op pair (``fastcl.ops.contrastive.run``).

In plain eager mode the losses call the op's implementation, setup and backward through a
plain ``autograd.Function`` (``_EagerSoftmaxRows``) instead of the ``fastcl::softmax_rows``
custom op, whose per-call wrapping costs more than the rest of a small step's Python. These
tests pin down that the two entries give bitwise the same losses and gradients, that plain eager
calls take the short entry, and that everything that needs the custom op (dispatch and
torch-function modes, tensor subclasses, torch.compile) still gets it.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl
from fastcl.ops import contrastive


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _SeenOps(TorchDispatchMode):
    """Records the overloads the dispatcher runs (passes every call through)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _losses(call, backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(24, 19, generator=g, requires_grad=True)
    z2 = torch.randn(24, 19, generator=g, requires_grad=True)
    tau = torch.tensor(0.2, requires_grad=True)
    with fastcl.use_backend(backend):
        loss = call(z1, z2, tau)
        w = torch.linspace(0.5, 1.5, loss.shape[0])
        grads = torch.autograd.grad((loss * w).sum(), (z1, z2, tau))
    return (loss.detach(), *grads)


_CALLS = {
    "info_nce": lambda a, b, t: fastcl.info_nce(a, b, temperature=t, reduction="none"),
    "nt_xent": lambda a, b, t: fastcl.nt_xent(a, b, temperature=t, reduction="none"),
    "queue": lambda a, b, t: fastcl.info_nce(a, b, b[:7].detach() * 2, temperature=t,
                                             reduction="none"),
    "dcl": lambda a, b, t: fastcl.dcl_loss(a, b, temperature=t, reduction="none"),
}


@pytest.mark.parametrize("backend", ["cpp", "chunked"])
@pytest.mark.parametrize("name", sorted(_CALLS))
def test_eager_entry_matches_the_custom_op_bitwise(name, backend):
    eager = _losses(_CALLS[name], backend)
    with mock.patch.object(contrastive, "_eager_ok", return_value=False):
        op = _losses(_CALLS[name], backend)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_plain_eager_calls_skip_the_custom_op():
    q = torch.randn(16, 8, requires_grad=True)
    k = torch.randn(16, 8, requires_grad=True)
    with mock.patch.object(contrastive, "softmax_rows", side_effect=AssertionError("op")), \
            mock.patch.object(contrastive, "softmax_rows_backward",
                              side_effect=AssertionError("op")):
        fastcl.info_nce(q, k).backward()  # with autograd
        with torch.no_grad():
            fastcl.info_nce(q, k)  # without
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("mode", ["dispatch", "function"])
def test_modes_get_the_custom_op(mode):
    q = torch.randn(16, 8, requires_grad=True)
    k = torch.randn(16, 8, requires_grad=True)
    if mode == "dispatch":
        ctx = _SeenOps()
        with ctx:
            fastcl.info_nce(q, k).backward()
        assert any("fastcl.softmax_rows.default" in n for n in ctx.names)
        assert any("fastcl.softmax_rows_backward.default" in n for n in ctx.names)
    else:
        with _PassThrough(), mock.patch.object(
                contrastive, "_EagerSoftmaxRows", side_effect=AssertionError("eager")):
            fastcl.info_nce(q, k).backward()
    assert q.grad is not None


def test_subclass_inputs_get_the_custom_op():
    class Sub(torch.Tensor):
        pass

    q = torch.randn(16, 8).as_subclass(Sub).requires_grad_()
    assert not contrastive._eager_ok(q)
    assert contrastive._eager_ok(torch.randn(2, 2), None)


def test_compile_traces_the_custom_op():
    from torch._dynamo.testing import CompileCounterWithBackend

    backend = CompileCounterWithBackend("aot_eager")
    seen = []

    def fn(q, k):
        return fastcl.info_nce(q, k, temperature=0.2)

    q = torch.randn(16, 8, requires_grad=True)
    k = torch.randn(16, 8, requires_grad=True)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    compiled(q, k).backward()
    for gm in backend.graphs:
        seen += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("fastcl.softmax_rows" in s for s in seen)
    torch.testing.assert_close(q.grad, torch.autograd.grad(fn(q, k), q)[0])
