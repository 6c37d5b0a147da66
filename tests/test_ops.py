"""fastcl's custom ops as torch components: opcheck, gradcheck, torch.compile, determinism,
needless-gradient skipping, autocast, memory, chunking and float64.

Values against the reference over many shapes live in test_nt_xent.py / test_info_nce.py; here
the question is whether the ops behave as well-formed PyTorch operators.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd import gradcheck

import fastcl
from fastcl import engine, ops, reference
from fastcl.ops import _backend

from conftest import TRITON_DEVICE, tile_patch

F64 = torch.float64

T = ops.temperature_tensor  # the ops take temperature as a 0-dim CPU tensor


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu", requires_grad=False):
    t = torch.randn(*shape, generator=_gen(seed), dtype=dtype).to(device)
    return t.requires_grad_(requires_grad)


def _permuted(*shape, seed=0, dtype=torch.float32, device="cpu", requires_grad=False):
    """A (rows, D) tensor stored column-major: the .T of a contiguous (D, rows) tensor."""
    t = _randn(*reversed(shape), seed=seed, dtype=dtype, device=device).T
    assert not t.is_contiguous()
    return t.requires_grad_(requires_grad)


def _strided_vector(n, seed=0, dtype=torch.float32, device="cpu", requires_grad=False):
    """A length-n vector with stride 2 (every other element of a longer one)."""
    t = _randn(2 * n, seed=seed, dtype=dtype, device=device)[::2]
    assert t.stride() == (2,)
    return t.requires_grad_(requires_grad)


def _fresh(*tensors):
    """Leaf copies that require grad (None passes through)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


# ------------------------------------------------------------------------------ opcheck ----

LAYOUTS = ["contiguous", "permuted"]


def _make(layout, rows, d, seed, device, requires_grad=False):
    maker = _randn if layout == "contiguous" else _permuted
    return maker(rows, d, seed=seed, device=device, requires_grad=requires_grad)


def _vec(layout, n, seed, device, requires_grad=False):
    if layout == "contiguous":
        return _randn(n, seed=seed, device=device, requires_grad=requires_grad)
    return _strided_vector(n, seed=seed, device=device, requires_grad=requires_grad)


# The engine's rows of choices that the ops implement today (fastcl.engine).
SPECS = {
    "nt_xent": engine.NT_XENT, "dcl": engine.DCL, "in_batch": engine.IN_BATCH,
    "queue": engine.QUEUE, "no_positive": engine.Spec(positive="none"),
    "in_batch_dcl": engine.Spec(positive="index", positive_in_denominator=False),
    "queue_dcl": engine.Spec(positive="key", positive_in_denominator=False),
    "clip_rows": engine.CLIP_ROWS,
}


def _op_inputs(name, layout, device, others=False, n=10, m=14, d=12):
    """(rows, cols, others, key) of a SPECS[name] pass."""
    spec = SPECS[name]
    rows = _make(layout, n, d, 0, device)
    cols = None
    if spec.columns == "tensor":
        cols = _make(layout, n if spec.positive == "index" else m, d, 1, device)
    key = _make(layout, n, d, 2, device) if spec.positive == "key" else None
    oth = _make(layout, 6, d, 3, device) if others else None
    return rows, cols, oth, key


def _scale(tau=0.3, requires_grad=False):
    return torch.tensor(1 / tau, dtype=F64).requires_grad_(requires_grad)


def _supported(backend, name, others) -> bool:
    return engine.BACKENDS[backend.name].unsupported(SPECS[name], others) is None


@pytest.mark.parametrize("others", [False, True], ids=["local", "others"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_softmax_rows(backend, layout, name, others):
    rows, cols, oth, key = _op_inputs(name, layout, backend.device, others)
    for t in (rows, cols, oth, key):
        if t is not None:
            t.requires_grad_()
    code = SPECS[name].code()
    op = torch.ops.fastcl.softmax_rows.default
    if not _supported(backend, name, others):
        # A backend that lacks a choice says which, never a silently different loss.
        with pytest.raises(NotImplementedError, match="does not implement"):
            op(rows, cols, oth, key, _scale(), code, False, False)
        return
    torch.library.opcheck(op, (rows, cols, oth, key, _scale(requires_grad=True), code, False,
                               True))
    if SPECS[name].columns == "tensor" and not others:
        torch.library.opcheck(op, (rows, cols, oth, key, _scale(), code, True, False))


@pytest.mark.parametrize("others", [False, True], ids=["local", "others"])
@pytest.mark.parametrize("name", list(SPECS))
def test_opcheck_softmax_rows_backward(backend, name, others):
    if not _supported(backend, name, others):
        pytest.skip("covered by test_opcheck_softmax_rows: the forward raises")
    rows, cols, oth, key = _op_inputs(name, "permuted", backend.device, others)
    code = SPECS[name].code()
    loss, lse, *_ = ops.softmax_rows(rows, cols, oth, key, _scale(), code)
    lse = torch.stack([lse, lse], dim=1)[:, 0]  # same values, stride 2
    grad = _vec("permuted", rows.shape[0], 3, backend.device)
    op = torch.ops.fastcl.softmax_rows_backward.default
    for need in ((True, True, True, True), (True, False, False, False),
                 (False, True, False, False), (False, False, True, False),
                 (False, False, False, True)):
        torch.library.opcheck(op, (grad, rows, cols, oth, key, loss, lse, _scale(), None, code,
                                   *need))


@pytest.mark.parametrize("name", ["in_batch", "queue", "in_batch_dcl", "no_positive"])
def test_forward_rows_give_the_backward_pass_gradient(backend, name):
    """d rows from the rows' gradient formed in the forward pass (need_row_grad) equals the
    one from the backward's own pass over the logits, for any upstream gradient; the forward's
    other outputs do not change."""
    n, m, d = (12, 20, 16) if backend.small else (70, 300, 40)
    rows, cols, _, key = _op_inputs(name, "contiguous", backend.device, n=n, m=m, d=d)
    code = SPECS[name].code()
    loss, lse, _, v, _ = ops.softmax_rows(rows, cols, None, key, _scale(0.15), code, True)
    loss0, lse0, _, empty, _ = ops.softmax_rows(rows, cols, None, key, _scale(0.15), code)
    assert empty.numel() == 0 and v.shape == rows.shape
    assert torch.equal(loss, loss0) and torch.equal(lse, lse0)
    grad = _randn(n, seed=3, device=backend.device)
    args = (grad, rows, cols, None, key, loss, lse, _scale(0.15))
    fwd = ops.softmax_rows_backward(*args, v, code, True, False, False, False)
    bwd = ops.softmax_rows_backward(*args, None, code, True, False, False, False)
    torch.testing.assert_close(fwd[0], bwd[0], rtol=2e-5, atol=1e-7)


def test_spec_code_round_trips_and_rejects_nonsense():
    for spec in SPECS.values():
        assert engine.Spec.parse(spec.code()) == spec
    with pytest.raises(ValueError, match="offset"):
        engine.Spec(columns="tensor", positive="offset")
    with pytest.raises(ValueError, match="positive"):
        engine.Spec(positive="sometimes")
    with pytest.raises(ValueError, match="exclude_self"):
        engine.Spec(columns="rows", positive="offset")


def test_undeclared_choices_are_refused_by_every_backend():
    """A choice a backend does not declare raises NotImplementedError naming it: label
    positives with other ranks' rows as negatives-only columns (every backend: the distributed
    SupCon passes every rank's rows as the columns), the sigmoid epilogue outside its one
    combination, and the both-directions and sigmoid epilogues on the backends that do not
    declare them."""
    for backend in engine.BACKENDS:
        assert engine.BACKENDS[backend].unsupported(engine.SUPCON) is None
        with pytest.raises(NotImplementedError, match="positive='labels' with other ranks"):
            engine.require(engine.SUPCON_ROWS, backend, others=True)
        cases = [(engine.Spec(epilogue="sigmoid"), "epilogue='sigmoid'")]
        if "softmax_rows_cols" not in engine.BACKENDS[backend].epilogue:
            cases.append((engine.CLIP, "softmax_rows_cols"))
        if "sigmoid" not in engine.BACKENDS[backend].epilogue:
            cases.append((engine.SIGLIP, "epilogue='sigmoid'"))
        for spec, what in cases:
            with pytest.raises(NotImplementedError, match=what):
                engine.require(spec, backend)


# ---------------------------------------------------------------------------- gradcheck ----


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_nt_xent_op(cpu_backend, layout):
    maker = _randn if layout == "contiguous" else _permuted
    z = maker(10, 6, dtype=F64, requires_grad=True)
    assert gradcheck(lambda z: ops.nt_xent(z, T(0.3))[0], (z,))


@pytest.mark.parametrize(
    "k_grad,with_negatives,neg_grad",
    [(True, True, True), (False, True, True), (True, True, False), (True, False, False),
     (False, False, False)],
    ids=["k-neg", "neg", "k-detached_neg", "k-in_batch", "q_only-in_batch"],
)
def test_gradcheck_info_nce_op(cpu_backend, k_grad, with_negatives, neg_grad):
    q = _randn(6, 5, seed=0, dtype=F64, requires_grad=True)
    k = _permuted(6, 5, seed=1, dtype=F64, requires_grad=k_grad)
    neg = _permuted(7, 5, seed=2, dtype=F64, requires_grad=neg_grad) if with_negatives else None
    inputs = [t for t in (q, k, neg) if t is not None and t.requires_grad]

    def f(*args):
        it = iter(args)
        q_ = next(it)
        k_ = next(it) if k_grad else k
        n_ = next(it) if neg_grad else neg
        return ops.info_nce(q_, k_, n_, T(0.3))[0]

    assert gradcheck(f, tuple(inputs))


def _with_zero_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """t with the given rows (of its (-1, D) view) set to exactly zero, differentiably."""
    mask = torch.ones(t.shape[:-1] + (1,), dtype=t.dtype)
    mask.view(-1, 1)[list(rows)] = 0
    return t * mask


def _zero_row_gradchecks(loss_fn, inputs, zero_rows):
    """Gradcheck ``loss_fn`` at inputs whose ``zero_rows[i]`` rows are exactly zero.

    normalize(x) = x / max(|x|, eps) is not differentiable at 0 at gradcheck's usual step, so:
    1. the other rows are checked with the usual step while the zero rows stay zero (forward
       and backward see the zeros: their normalized value is 0, their columns give 0 logits);
    2. each zero row alone is checked with a step far below eps = 1e-12, where normalize is
       the linear map x / eps: the finite (huge) gradient autograd of F.normalize also gives.
    """

    def masked(*xs):
        return loss_fn(*[_with_zero_rows(x, zero_rows[i]) for i, x in enumerate(xs)])

    assert gradcheck(masked, tuple(inputs))

    base = [_with_zero_rows(x.detach(), zero_rows[i]) for i, x in enumerate(inputs)]
    for i, rows in enumerate(zero_rows):
        for row in rows:
            d = base[i].shape[-1]
            r = torch.zeros(d, dtype=F64, requires_grad=True)

            def f(r, i=i, row=row):
                xs = list(base)
                flat = xs[i].reshape(-1, d)
                sel = torch.zeros(flat.shape[0], 1, dtype=F64)
                sel[row] = 1
                xs[i] = (flat + sel * r).reshape(xs[i].shape)
                return loss_fn(*xs)

            assert gradcheck(f, (r,), eps=1e-16, atol=1e-3, rtol=1e-3), (i, row)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_nt_xent_public(cpu_backend, reduction):
    z1 = _randn(4, 5, seed=0, dtype=F64, requires_grad=True)
    z2 = _permuted(4, 5, seed=1, dtype=F64, requires_grad=True)

    def loss(a, b):
        return fastcl.nt_xent(a, b, temperature=0.4, reduction=reduction)

    assert gradcheck(loss, (z1, z2))
    _zero_row_gradchecks(loss, [z1, z2], [[1], []])


@pytest.mark.parametrize("mode", ["none", "unpaired", "paired"])
def test_gradcheck_info_nce_public(cpu_backend, mode):
    q = _randn(4, 5, seed=0, dtype=F64, requires_grad=True)
    k = _randn(4, 5, seed=1, dtype=F64, requires_grad=True)
    if mode == "none":
        negs = []
    elif mode == "unpaired":
        negs = [_randn(6, 5, seed=2, dtype=F64, requires_grad=True)]
    else:
        negs = [_randn(4, 3, 5, seed=2, dtype=F64, requires_grad=True)]
    negative_mode = "paired" if mode == "paired" else "unpaired"

    def loss(*xs):
        return fastcl.info_nce(*xs, temperature=0.4, reduction="none",
                               negative_mode=negative_mode)

    inputs = [q, k] + negs
    assert gradcheck(loss, tuple(inputs))
    zero_rows = [[2], [0]] + [[1]] * len(negs)
    _zero_row_gradchecks(loss, inputs, zero_rows)


# ------------------------------------------------------------------------ torch.compile ----

# Compiled callables are shared by the parametrizations of one backend; dynamo guards on the
# backend (and on temperature), so switching backend recompiles only what it must.
_COMPILED: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _room_for_recompiles():
    """Dynamo counts recompiles per code object (fastcl.functional.info_nce), whatever wrapper
    compiled it: 3 backends x 3 InfoNCE modes x 2 layouts pass its default limit of 8."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: 64}):
        yield


def _compiled(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True)
    return _COMPILED[name]


def _assert_same_loss_and_grads(fn_a, fn_b, inputs, **kwargs):
    xa, xb = _fresh(*inputs), _fresh(*inputs)
    la = fn_a(*xa, **kwargs)
    lb = fn_b(*xb, **kwargs)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for ga, gb in zip(_grads(xa), _grads(xb)):
        assert ga is not None and gb is not None
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    return la


def _info_nce_inputs(mode, device, n=8, d=12, m=10, layout="contiguous"):
    q = _make(layout, n, d, 0, device)
    k = _make(layout, n, d, 1, device)
    if mode == "none":
        return [q, k], "unpaired"
    if mode == "unpaired":
        return [q, k, _make(layout, m, d, 2, device)], "unpaired"
    return [q, k, _randn(n, 3, d, seed=2, device=device)], "paired"


def test_compile_nt_xent(backend):
    z1 = _randn(8, 12, seed=0, device=backend.device)
    z2 = _randn(8, 12, seed=1, device=backend.device)
    _assert_same_loss_and_grads(
        _compiled(f"nt_xent-{backend}", fastcl.nt_xent), fastcl.nt_xent, [z1, z2]
    )


@pytest.mark.parametrize("mode", ["none", "unpaired", "paired"])
def test_compile_info_nce(backend, mode):
    inputs, negative_mode = _info_nce_inputs(mode, backend.device)
    _assert_same_loss_and_grads(
        _compiled(f"info_nce-{backend}", fastcl.info_nce), fastcl.info_nce, inputs,
        negative_mode=negative_mode,
    )


def test_compile_runtime_temperature(cpu_backend):
    """Temperature as an argument of the compiled function: each value gives its own loss."""
    def step(z1, z2, tau):
        return fastcl.nt_xent(z1, z2, tau)

    compiled = torch.compile(step, fullgraph=True)
    z1, z2 = _randn(8, 12, seed=0), _randn(8, 12, seed=1)
    losses = []
    for tau in (0.5, 0.1):
        losses.append(_assert_same_loss_and_grads(compiled, step, [z1, z2], tau=tau))
        torch.testing.assert_close(
            losses[-1], reference.nt_xent(z1, z2, tau), rtol=1e-5, atol=1e-6
        )
    assert not torch.allclose(losses[0], losses[1])


def test_compile_temperature_not_specialized(cpu_backend):
    """DESIGN: "Temperature is a runtime scalar (no recompilation per tau)".

    With floats left symbolic (``specialize_float=False``), a temperature schedule must not
    recompile once per value: after the first call (which dynamo always specializes), new
    temperatures reuse one graph.
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    z1, z2 = _randn(8, 12, seed=0), _randn(8, 12, seed=1)
    with torch._dynamo.config.patch(specialize_float=False):
        compiled = torch.compile(fastcl.nt_xent, fullgraph=True, backend=counter)
        taus = (0.5, 0.2, 0.3, 0.7)
        for tau in taus:
            torch.testing.assert_close(
                compiled(z1, z2, tau), fastcl.nt_xent(z1, z2, tau), rtol=1e-6, atol=1e-6
            )
    assert counter.frame_count <= 2, (
        f"{counter.frame_count} compilations for {len(taus)} temperatures"
    )


def test_compile_noncontiguous_inputs(backend):
    """Permuted (column-major) inputs through compiled forward and backward.

    Inductor trusts the fake kernels' output strides; a fake that disagrees with the real
    kernel fails here (or silently reads gradients with the wrong layout).
    """
    inputs, negative_mode = _info_nce_inputs("unpaired", backend.device, layout="permuted")
    _assert_same_loss_and_grads(
        _compiled(f"info_nce_noncontig-{backend}", fastcl.info_nce), fastcl.info_nce, inputs,
        negative_mode=negative_mode,
    )


def test_compile_nn_modules(backend):
    nt = fastcl.nn.NTXentLoss(temperature=0.2)
    z1 = _randn(8, 12, seed=0, device=backend.device)
    z2 = _randn(8, 12, seed=1, device=backend.device)
    _assert_same_loss_and_grads(_compiled(f"NTXentLoss-{backend}", nt), nt, [z1, z2])

    nce = fastcl.nn.InfoNCELoss(temperature=0.1, negative_mode="unpaired")
    inputs, _ = _info_nce_inputs("unpaired", backend.device)
    _assert_same_loss_and_grads(_compiled(f"InfoNCELoss-{backend}", nce), nce, inputs)


# -------------------------------------------------------------------------- determinism ----


def _run(fn, inputs, **kwargs):
    xs = _fresh(*inputs)
    loss = fn(*xs, **kwargs)
    loss.sum().backward()
    return loss.detach(), _grads(xs)


@pytest.mark.parametrize("case", ["nt_xent", "info_nce-none", "info_nce-unpaired",
                                  "info_nce-paired"])
def test_bitwise_deterministic(backend, case):
    n, d = (20, 24) if backend.small else (300, 96)
    dev = backend.device
    if case == "nt_xent":
        fn, kwargs = fastcl.nt_xent, {}
        inputs = [_randn(n, d, seed=0, device=dev), _randn(n, d, seed=1, device=dev)]
    else:
        fn = fastcl.info_nce
        inputs, negative_mode = _info_nce_inputs(case.split("-")[1], dev, n=n, d=d, m=n + 7)
        kwargs = dict(negative_mode=negative_mode)
    loss_a, grads_a = _run(fn, inputs, **kwargs)
    loss_b, grads_b = _run(fn, inputs, **kwargs)
    assert torch.equal(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


# ------------------------------------------------------ MoCo: no gradient for the queue ----


def test_backward_op_skips_unneeded_gradient(backend):
    q = _randn(10, 12, seed=0, device=backend.device)
    k = _randn(10, 12, seed=3, device=backend.device)
    queue = _randn(30, 12, seed=1, device=backend.device)
    code = engine.QUEUE.code()
    loss, lse, *_ = ops.softmax_rows(q, queue, None, k, _scale(0.2), code)
    grad = torch.ones_like(loss)
    args = (grad, q, queue, None, k, loss, lse, _scale(0.2), None, code)
    dq, dn, _, dk = ops.softmax_rows_backward(*args, True, False, False, True)
    assert dq.shape == q.shape and dk.shape == k.shape and torch.isfinite(dq).all()
    assert dn.numel() == 0
    dq0, dn0, _, dk0 = ops.softmax_rows_backward(*args, False, True, False, False)
    assert dq0.numel() == 0 and dk0.numel() == 0 and dn0.shape == queue.shape
    dq2, dn2, _, dk2 = ops.softmax_rows_backward(*args, True, True, False, True)
    torch.testing.assert_close(dq, dq2, rtol=0, atol=0)
    torch.testing.assert_close(dk, dk2, rtol=0, atol=0)
    torch.testing.assert_close(dn0, dn2, rtol=0, atol=0)


def test_moco_queue_gets_no_gradient(backend, monkeypatch):
    n, m, d = (8, 24, 16) if backend.small else (32, 200, 64)
    dev = backend.device
    q = _randn(n, d, seed=0, device=dev, requires_grad=True)
    k = _randn(n, d, seed=1, device=dev, requires_grad=True)
    queue = _randn(m, d, seed=2, device=dev)  # a buffer: no grad

    impl = _backend.implementation(q)
    calls = []
    original = impl.grad_accumulate

    def counting(a, b, *args, **kwargs):
        calls.append((a.shape[0], b.shape[0]))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(impl, "grad_accumulate", counting)
    loss = fastcl.info_nce(q, k, queue, temperature=0.07)
    loss.backward()
    assert queue.grad is None
    # None of the tile passes is spent on the queue's gradient. dq comes from the forward tile
    # pass where the backend can form it there (C++, chunked), else from one (N x M) pass.
    expected = [] if hasattr(impl, "lse_forward_with_grad") else [(n, m)]
    assert calls == expected

    q_ref, k_ref = _fresh(q, k)
    ref = reference.info_nce(q_ref, k_ref, queue, temperature=0.07)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k.grad, k_ref.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- autocast -----


def test_autocast_bf16_linear_projection(cpu_backend):
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 16)
    x1, x2 = _randn(24, 32, seed=1), _randn(24, 32, seed=2)

    def run(loss_fn):
        proj.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h1, h2 = proj(x1), proj(x2)
            assert h1.dtype == torch.bfloat16
            h1.retain_grad()
            h2.retain_grad()
            loss = loss_fn(h1, h2)
        loss.backward()
        return loss, h1.grad, h2.grad, proj.weight.grad.clone(), proj.bias.grad.clone()

    def ref_fn(h1, h2):
        with torch.autocast("cpu", enabled=False):  # the same bf16 activations, no autocast
            return reference.nt_xent(h1, h2, 0.2)

    fast = run(lambda a, b: fastcl.nt_xent(a, b, 0.2))
    ref = run(ref_fn)
    assert fast[0].dtype == torch.float32  # the accumulation dtype, as documented
    assert ref[0].dtype == torch.float32
    assert fast[1].dtype == torch.bfloat16 and fast[3].dtype == torch.float32
    for a, b in zip(fast, ref):
        scale = max(1.0, b.detach().float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2 * scale)


# ------------------------------------------------------------------------------ memory -----

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import fastcl
    from fastcl import reference

    which = sys.argv[1]
    assert fastcl.get_backend() == "auto", fastcl.get_backend()
    fn = fastcl.nt_xent if which == "fastcl" else reference.nt_xent

    def peak_kib():
        # Linux keeps ru_maxrss across fork+exec: a child of a large process (pytest after
        # torch.compile) starts with its parent's peak, hiding growth below it. VmHWM belongs
        # to this process's own address space, and clear_refs resets it to the current RSS.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def inputs(n, d=64):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, d, generator=g).requires_grad_(),
                torch.randn(n, d, generator=g).requires_grad_())

    w1, w2 = inputs(64)
    fn(w1, w2).backward()  # warm-up: lazy imports, allocator pools
    z1, z2 = inputs(4096)
    reset_peak()
    before = peak_kib()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = fn(z1, z2)
    loss.backward()
    after = peak_kib()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(z1.grad).all())
    print(json.dumps({"growth_mib": (after - before) / 1024.0, "finite": ok,
                      "ru_maxrss_growth_mib": (rss_after - rss_before) / 1024.0}))
    """
)


def _spawn_memory(which):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCL_BACKEND", "TRITON_INTERPRET")}
    return subprocess.Popen(
        [sys.executable, "-c", _MEMORY_SCRIPT, which],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_memory_never_builds_similarity_matrix():
    """NT-Xent at N=4096 (8192 rows): a (2N)^2 float32 matrix is 256 MiB; fastcl stays O(N*D)."""
    fast_proc, ref_proc = _spawn_memory("fastcl"), _spawn_memory("reference")
    fast, ref = _result(fast_proc), _result(ref_proc)
    assert fast["finite"] and ref["finite"]
    assert fast["growth_mib"] < 150, fast
    assert ref["growth_mib"] > 500, ref  # the eager oracle needs several 256 MiB matrices
    assert ref["growth_mib"] > 3 * fast["growth_mib"], (fast, ref)


def test_many_small_tiles_match_default(cpu_backend):
    n, d, m = 37, 20, 45
    z1, z2 = _randn(n, d, seed=0), _randn(n, d, seed=1)
    q, k, queue = _randn(n, d, seed=2), _randn(n, d, seed=3), _randn(m, d, seed=4)
    cases = [
        (fastcl.nt_xent, [z1, z2], {}),
        (fastcl.info_nce, [q, k], {}),
        (fastcl.info_nce, [q, k, queue], {}),
    ]
    default = [_run(fn, xs, reduction="none" if fn is fastcl.nt_xent else "mean", **kw)
               for fn, xs, kw in cases]
    with tile_patch(cpu_backend, 5):  # 15 x 15 tiles for NT-Xent's 74 rows
        small = [_run(fn, xs, reduction="none" if fn is fastcl.nt_xent else "mean", **kw)
                 for fn, xs, kw in cases]
    for (la, ga), (lb, gb) in zip(default, small):
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- float64 -----


@pytest.mark.parametrize("backend_name", ["cpp", "chunked", "auto"])
def test_float64_cpu_paths_match_reference(backend_name):
    fastcl.set_backend(backend_name)
    z1, z2 = _randn(13, 9, seed=0, dtype=F64), _randn(13, 9, seed=1, dtype=F64)
    q, k = _randn(13, 9, seed=2, dtype=F64), _randn(13, 9, seed=3, dtype=F64)
    queue, paired = _randn(17, 9, seed=4, dtype=F64), _randn(13, 4, 9, seed=5, dtype=F64)
    cases = [
        (fastcl.nt_xent, reference.nt_xent, [z1, z2], {}),
        (fastcl.info_nce, reference.info_nce, [q, k], {}),
        (fastcl.info_nce, reference.info_nce, [q, k, queue], {}),
        (fastcl.info_nce, reference.info_nce, [q, k, paired], {"negative_mode": "paired"}),
    ]
    for fast_fn, ref_fn, xs, kw in cases:
        la, ga = _run(fast_fn, xs, reduction="none", **kw)
        lb, gb = _run(ref_fn, xs, reduction="none", **kw)
        assert la.dtype == F64
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        for a, b in zip(ga, gb):
            assert a.dtype == F64
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_triton_rejects_float64():
    fastcl.set_backend("triton")
    z = _randn(6, 8, dtype=F64)
    with pytest.raises(RuntimeError, match="float64"):
        fastcl.nt_xent(z, z.clone())
    with pytest.raises(RuntimeError, match="float64"):
        fastcl.info_nce(z, z.clone(), z.clone())


def test_triton_rejects_float64_via_env():
    code = textwrap.dedent(
        """
        import torch, fastcl
        assert fastcl.get_backend() == "triton"
        z = torch.randn(6, 8, dtype=torch.float64)
        try:
            fastcl.nt_xent(z, z.clone())
        except RuntimeError as exc:
            assert "float64" in str(exc), exc
            print("raised")
        """
    )
    env = dict(os.environ, FASTCL_BACKEND="triton", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "raised"


# ------------------------------------------------------- float32 matmul precision ----------


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    "setting,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]
)
def test_float32_products_follow_matmul_precision(setting, expected, monkeypatch):
    """fp32 tile products use IEEE at torch's "highest" and TF32 otherwise, so that CUDA results
    match eager PyTorch under the user's own setting (the interpreter itself does not emulate
    TF32, so the flag is checked where it reaches the kernels)."""
    tc = _backend._load_triton()
    spies = {name: _LaunchSpy(getattr(tc, name)) for name in ("_lse_fwd_kernel", "_grad_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(tc, name, spy)
    before = torch.get_float32_matmul_precision()
    z1 = _randn(6, 20, seed=0, device=TRITON_DEVICE, requires_grad=True)
    z2 = _randn(6, 20, seed=1, device=TRITON_DEVICE, requires_grad=True)
    try:
        torch.set_float32_matmul_precision(setting)
        with fastcl.use_backend("triton"):
            fastcl.nt_xent(z1, z2).backward()
    finally:
        torch.set_float32_matmul_precision(before)
    launches = spies["_lse_fwd_kernel"].launches + spies["_grad_kernel"].launches
    assert len(launches) == 2
    assert {kw["PRECISION"] for kw in launches} == {expected}
