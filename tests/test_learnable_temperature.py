"""A learnable temperature through the public API: ``fastcl.nt_xent``, ``info_nce`` (in-batch and
with a queue), ``dcl_loss`` (and DCLW) and the loss modules take a one-element tensor temperature,
possibly an ``nn.Parameter``, and give it its gradient (the engine's ``dscale`` statistic, through
scale = 1 / tau).

On every backend of the suite. Whether a backend runs a loss is the registry's word
(``fastcl.engine.BACKENDS[name].unsupported(spec)``): where it declares the loss's choices
unsupported, the call must raise ``NotImplementedError`` naming the choice; everywhere else it
must run, with a temperature that requires grad too.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import fastcl
from fastcl import engine, reference
from fastcl.functional import negative_mises_fisher_weights

N, D, K = 6, 8, 10


def _randn(*shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x * torch.exp(0.5 * torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64))
    return x.to(dtype).to(device)


def _inputs(device, dtype=torch.float32):
    return [_randn(N, D, seed=s, dtype=dtype, device=device) for s in (1, 2)] + [
        _randn(K, D, seed=3, dtype=dtype, device=device)]


# name -> (spec, fastcl loss(a, b, queue, tau, reduction), reference loss(...)); every case
# differentiates both of its first two inputs (and the queue where it is read).
CASES = {
    "nt_xent": (engine.NT_XENT,
                lambda a, b, q, t, r="mean": fastcl.nt_xent(a, b, t, r),
                lambda a, b, q, t, r="mean": reference.nt_xent(a, b, t, r)),
    "info_nce_in_batch": (engine.IN_BATCH,
                          lambda a, b, q, t, r="mean": fastcl.info_nce(a, b, None, t, r),
                          lambda a, b, q, t, r="mean": reference.info_nce(a, b, None, t, r)),
    "info_nce_queue": (engine.QUEUE,
                       lambda a, b, q, t, r="mean": fastcl.info_nce(a, b, q, t, r),
                       lambda a, b, q, t, r="mean": reference.info_nce(a, b, q, t, r)),
    "dcl": (engine.DCL,
            lambda a, b, q, t, r="mean": fastcl.dcl_loss(a, b, t, reduction=r),
            lambda a, b, q, t, r="mean": reference.dcl_loss(a, b, t, reduction=r)),
    "dclw": (engine.DCL,
             lambda a, b, q, t, r="mean": fastcl.dcl_loss(
                 a, b, t, negative_mises_fisher_weights, r),
             lambda a, b, q, t, r="mean": reference.dcl_loss(
                 a, b, t, negative_mises_fisher_weights, r)),
}


def _reads_queue(name):
    return name == "info_nce_queue"


def _refusal(spec):
    """The registry's word on the backend in force: None, or the choice it lacks."""
    return engine.BACKENDS[fastcl.get_backend()].unsupported(spec)


def _run(name, inputs, tau, reduction="mean"):
    """(loss, grads of the inputs and of tau) of case ``name``, or None after checking the
    declared refusal."""
    spec, fast, _ = CASES[name]
    a, b, q = (x.detach().clone().requires_grad_() for x in inputs)
    missing = _refusal(spec)
    if missing is not None:
        with pytest.raises(NotImplementedError, match=re.escape(missing)):
            fast(a, b, q, tau, reduction)
        return None
    loss = fast(a, b, q, tau, reduction)
    wanted = [a, b] + ([q] if _reads_queue(name) else [])
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        wanted.append(tau)
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype,
                         device=loss.device).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, wanted, cot)


def _oracle(name, inputs, tau_value, reduction="mean", dtype=torch.float64):
    """The reference's loss and gradients (the temperature's included) by autograd."""
    _, _, ref = CASES[name]
    a, b, q = (x.detach().cpu().to(dtype).requires_grad_() for x in inputs)
    tau = torch.tensor(tau_value, dtype=dtype, requires_grad=True)
    loss = ref(a, b, q, tau, reduction)
    wanted = [a, b] + ([q] if _reads_queue(name) else []) + [tau]
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, wanted, cot)


def _close(a, b, rtol, atol):
    torch.testing.assert_close(a.detach().cpu().double(), b.detach().cpu().double(), rtol=rtol,
                               atol=atol)


# ----------------------------------------------------------------- the functions ----------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(CASES))
def test_tensor_temperature_equals_float_temperature(backend, name, reduction):
    """A tensor temperature that requires grad gives the float temperature's loss and input
    gradients (same value), and a finite gradient of its own."""
    inputs = _inputs(backend.device)
    value = 0.2
    tau = torch.tensor(value, device=backend.device, requires_grad=True)
    got = _run(name, inputs, tau, reduction)
    expect = _run(name, inputs, value, reduction)
    if got is None:
        return
    (loss, grads), (loss_f, grads_f) = got, expect
    assert loss.dtype == torch.float32 and loss.shape == loss_f.shape
    # float32 tau: 1/tau differs from the float's 1/0.2 by one float32 rounding of 0.2.
    _close(loss, loss_f, rtol=1e-6, atol=1e-6)
    for g, gf in zip(grads, grads_f):
        _close(g, gf, rtol=1e-5, atol=1e-6)
    g_tau = grads[-1]
    assert g_tau.shape == () and g_tau.dtype == torch.float32 and torch.isfinite(g_tau)


@pytest.mark.parametrize("name", list(CASES))
def test_temperature_gradient_equals_autograd_through_the_reference(backend, name):
    """d loss / d tau (and the inputs' gradients) = autograd through the reference formula:
    float32 against the float64 oracle, and float64 tightly on the backends that take it."""
    for value in (0.05, 0.3, 1.7):
        inputs = _inputs(backend.device)
        tau = torch.tensor(value, device=backend.device, requires_grad=True)
        got = _run(name, inputs, tau)
        if got is None:
            return
        _, ref_grads = _oracle(name, inputs, float(tau.detach()))
        loss, grads = got
        for g, r in zip(grads, ref_grads):
            scale = max(1.0, r.abs().max().item())
            _close(g, r, rtol=1e-4, atol=2e-5 * scale)
    if backend.name == "triton":  # float32 only
        return
    inputs = _inputs(backend.device, torch.float64)
    tau = torch.tensor(0.1, dtype=torch.float64, device=backend.device, requires_grad=True)
    got = _run(name, inputs, tau)
    ref_loss, ref_grads = _oracle(name, inputs, 0.1)
    _close(got[0], ref_loss, rtol=1e-12, atol=1e-12)
    for g, r in zip(got[1], ref_grads):
        _close(g, r, rtol=1e-10, atol=1e-10 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("name", list(CASES))
def test_zero_dim_and_one_element_tensors_are_both_accepted(backend, name):
    """A 0-dim tensor and a (1,)-shaped one give the same loss; the (1,) tensor's gradient keeps
    its shape."""
    inputs = _inputs(backend.device)
    t0 = torch.tensor(0.25, device=backend.device, requires_grad=True)
    t1 = torch.tensor([0.25], device=backend.device, requires_grad=True)
    a, b = _run(name, inputs, t0), _run(name, inputs, t1)
    if a is None:
        return
    _close(a[0], b[0], rtol=0, atol=0)
    assert b[1][-1].shape == (1,) and a[1][-1].shape == ()
    _close(a[1][-1], b[1][-1].reshape(()), rtol=0, atol=0)


def test_cpu_temperature_with_device_inputs(backend):
    """A CPU tensor temperature beside inputs on the backend's device (CUDA when present)."""
    inputs = _inputs(backend.device)
    tau = torch.tensor(0.3, requires_grad=True)  # on the CPU
    got = _run("nt_xent", inputs, tau)
    if got is not None:
        assert got[1][-1].device.type == "cpu" and torch.isfinite(got[1][-1])


# --------------------------------------------------------------------- the modules ---------


def _modules(tau):
    return {
        "NTXentLoss": (engine.NT_XENT, fastcl.nn.NTXentLoss(temperature=tau),
                       lambda m, x: m(x[0], x[1])),
        "InfoNCELoss": (engine.IN_BATCH, fastcl.nn.InfoNCELoss(temperature=tau),
                        lambda m, x: m(x[0], x[1])),
        "InfoNCELoss_queue": (engine.QUEUE, fastcl.nn.InfoNCELoss(temperature=tau),
                              lambda m, x: m(x[0], x[1], x[2])),
        "DCLLoss": (engine.DCL, fastcl.nn.DCLLoss(temperature=tau), lambda m, x: m(x[0], x[1])),
        "DCLWLoss": (engine.DCL, fastcl.nn.DCLWLoss(temperature=tau),
                     lambda m, x: m(x[0], x[1])),
    }


MODULES = list(_modules(0.1))


@pytest.mark.parametrize("which", MODULES)
def test_module_with_parameter_temperature_learns_it(backend, which):
    """An nn.Parameter temperature is the module's parameter (``parameters()``, ``state_dict``),
    receives a gradient equal to the functional's, and an optimizer step changes it; loading a
    state_dict restores it."""
    param = nn.Parameter(torch.tensor(0.2, device=backend.device))
    spec, module, call = _modules(param)[which]
    assert any(p is param for p in module.parameters())
    assert "temperature" in module.state_dict()
    assert module.state_dict()["temperature"].item() == pytest.approx(0.2)
    assert "requires_grad=True" in repr(module) or backend.device.type != "cpu"
    inputs = _inputs(backend.device)
    missing = _refusal(spec)
    if missing is not None:
        with pytest.raises(NotImplementedError, match=re.escape(missing)):
            call(module, inputs)
        return
    loss = call(module, inputs)
    loss.backward()
    assert param.grad is not None and torch.isfinite(param.grad)
    # The same gradient as the functional with a fresh leaf at the same value.
    tau = torch.tensor(0.2, device=backend.device, requires_grad=True)
    float_module = _modules(0.2)[which][1]
    _close(loss, call(float_module, inputs), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(call(_modules(tau)[which][1], inputs), [tau])
    _close(param.grad, g, rtol=1e-6, atol=1e-7)
    before = param.detach().clone()
    torch.optim.SGD(module.parameters(), lr=0.01).step()
    assert not torch.equal(param.detach(), before)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        param.fill_(0.9)
    module.load_state_dict(state)
    assert param.item() == pytest.approx(state["temperature"].item())


def test_module_with_a_float_temperature_has_no_parameter():
    for _, module, _ in _modules(0.1).values():
        assert list(module.parameters()) == [] and "temperature" not in module.state_dict()
        assert isinstance(module.temperature, float)


# ------------------------------------------------------------- log-parametrized tau --------


@pytest.mark.parametrize("name", list(CASES))
def test_log_parametrized_temperature(backend, name):
    """tau = log_tau.exp() (CLIP's parametrization): d loss / d log_tau = tau * d loss / d tau,
    as autograd through the reference gives it; a few SGD steps move log_tau and stay finite."""
    spec = CASES[name][0]
    inputs = _inputs(backend.device)
    log_tau = nn.Parameter(torch.tensor(math.log(0.3), device=backend.device))
    missing = _refusal(spec)
    if missing is not None:
        with pytest.raises(NotImplementedError, match=re.escape(missing)):
            CASES[name][1](*inputs, log_tau.exp())
        return
    loss = CASES[name][1](*inputs, log_tau.exp())
    (g,) = torch.autograd.grad(loss, [log_tau])
    a, b, q = (x.detach().cpu().double() for x in inputs)
    ref_log_tau = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(CASES[name][2](a, b, q, ref_log_tau.exp()), [ref_log_tau])
    _close(g, g_ref, rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD([log_tau], lr=0.1)
    values = []
    for _ in range(3):
        opt.zero_grad()
        loss = CASES[name][1](*inputs, log_tau.exp())
        loss.backward()
        opt.step()
        values.append(log_tau.item())
        assert math.isfinite(values[-1]) and torch.isfinite(loss)
    assert len(set(values)) == 3


# --------------------------------------------------------------------------- errors --------


def _callers():
    z1, z2, queue = _inputs("cpu")
    return {
        "nt_xent": lambda t: fastcl.nt_xent(z1, z2, t),
        "info_nce": lambda t: fastcl.info_nce(z1, z2, None, t),
        "info_nce_queue": lambda t: fastcl.info_nce(z1, z2, queue, t),
        "dcl_loss": lambda t: fastcl.dcl_loss(z1, z2, t),
        "NTXentLoss": lambda t: fastcl.nn.NTXentLoss(t),
        "InfoNCELoss": lambda t: fastcl.nn.InfoNCELoss(t),
        "DCLLoss": lambda t: fastcl.nn.DCLLoss(t),
        "DCLWLoss": lambda t: fastcl.nn.DCLWLoss(t),
    }


@pytest.mark.parametrize("caller", list(_callers()))
@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), -float("inf")])
def test_bad_tensor_temperature_values_raise_value_error(caller, bad):
    """A CPU tensor temperature <= 0, NaN or inf: ValueError naming ``temperature`` (whether or
    not it requires grad, 0-dim or (1,))."""
    fn = _callers()[caller]
    for t in (torch.tensor(bad), torch.tensor([bad]), torch.tensor(bad, requires_grad=True),
              nn.Parameter(torch.tensor(bad))):
        with pytest.raises(ValueError, match="temperature"):
            fn(t)


@pytest.mark.parametrize("caller", list(_callers()))
def test_bad_tensor_temperature_types_raise_type_error(caller):
    """An integer tensor, or a tensor of more than one element: TypeError naming
    ``temperature``."""
    fn = _callers()[caller]
    for t in (torch.tensor(1), torch.tensor([1]), torch.tensor([0.1, 0.2]),
              torch.tensor([[0.1, 0.2]]), torch.tensor(True), torch.empty(0)):
        with pytest.raises(TypeError, match="temperature"):
            fn(t)


# ----------------------------------------------------------------------- compile ----------


@pytest.mark.parametrize("learnable", [False, True], ids=["schedule", "learnable"])
@pytest.mark.parametrize("name", ["nt_xent", "info_nce_in_batch", "info_nce_queue", "dcl"])
def test_compile_once_for_a_changing_temperature_tensor(cpu_backend, name, learnable):
    """torch.compile(fullgraph=True) of a loss whose temperature tensor changes every step (a
    schedule, or a learnable one requiring grad): exactly one frame compiled over several
    values, and the values and gradients (the temperature's included) are eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    spec, fast, _ = CASES[name]
    missing = _refusal(spec)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fast, fullgraph=True, backend=counter)
    inputs = _inputs("cpu")
    for value in (0.5, 0.2, 0.07, 1.3):
        a, b, q = (x.clone().requires_grad_() for x in inputs)
        tau = torch.tensor(value, requires_grad=learnable)
        if missing is not None:
            with pytest.raises(Exception, match=re.escape(missing)):
                compiled(a, b, q, tau)
            return
        loss = compiled(a, b, q, tau)
        wanted = [a, b, q] if _reads_queue(name) else [a, b]
        wanted = wanted + ([tau] if learnable else [])
        grads = torch.autograd.grad(loss, wanted)
        a2, b2, q2 = (x.clone().requires_grad_() for x in inputs)
        tau2 = torch.tensor(value, requires_grad=learnable)
        loss_e = fast(a2, b2, q2, tau2)
        wanted_e = ([a2, b2, q2] if _reads_queue(name) else [a2, b2]) + (
            [tau2] if learnable else [])
        grads_e = torch.autograd.grad(loss_e, wanted_e)
        _close(loss, loss_e, rtol=1e-6, atol=1e-6)
        for g, ge in zip(grads, grads_e):
            _close(g, ge, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled for 4 temperatures"


def test_compile_module_with_parameter_temperature(cpu_backend):
    """A compiled NTXentLoss whose nn.Parameter temperature an optimizer changes every step: one
    frame, losses and the temperature's gradients as eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    param = nn.Parameter(torch.tensor(0.5))
    module = fastcl.nn.NTXentLoss(temperature=param)
    missing = _refusal(engine.NT_XENT)
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    z1, z2, _ = _inputs("cpu")
    opt = torch.optim.SGD([param], lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        if missing is not None:
            with pytest.raises(Exception, match=re.escape(missing)):
                compiled(z1, z2)
            return
        loss = compiled(z1, z2)
        loss.backward()
        tau = torch.tensor(param.item(), requires_grad=True)
        loss_e = fastcl.nt_xent(z1, z2, tau)
        (g_e,) = torch.autograd.grad(loss_e, [tau])
        _close(loss, loss_e, rtol=1e-6, atol=1e-6)
        _close(param.grad, g_e, rtol=1e-5, atol=1e-6)
        opt.step()
    assert counter.frame_count == 1


# ----------------------------------------------------------------------- autocast ---------


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_bf16_inputs_with_float32_tensor_temperature(cpu_backend, name):
    """Under CPU autocast, bf16 activations with a float32 learnable temperature: a float32
    loss, a finite float32 temperature gradient close to the reference's on the same bf16
    activations, and bf16 input gradients."""
    spec, fast, ref = CASES[name]
    torch.manual_seed(0)
    proj = nn.Linear(12, D)
    x = [_randn(N, 12, seed=s) for s in (1, 2)] + [_randn(K, 12, seed=3)]
    tau = nn.Parameter(torch.tensor(0.2))
    missing = _refusal(spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = [proj(v) for v in x]
        assert h[0].dtype == torch.bfloat16
        if missing is not None:
            with pytest.raises(NotImplementedError, match=re.escape(missing)):
                fast(*h, tau)
            return
        loss = fast(*h, tau)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, [tau, h[0]])
    assert grads[0].dtype == torch.float32 and torch.isfinite(grads[0])
    assert grads[1].dtype == torch.bfloat16 and torch.isfinite(grads[1]).all()
    hb = [v.detach() for v in h]
    tau_r = torch.tensor(0.2, requires_grad=True)
    (g_ref,) = torch.autograd.grad(ref(*hb, tau_r), [tau_r])
    _close(grads[0], g_ref, rtol=1e-3, atol=1e-3)
