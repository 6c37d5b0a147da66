"""The momentum family: ``fastcl.ema_``, ``fastcl.cosine_momentum``, ``fastcl.queue_push_`` and
the ``MomentumEncoder`` / ``NegativeQueue`` modules, on every backend (``backend`` fixture: C++,
the PyTorch fallback "chunked", and Triton, under its interpreter here).

Oracles: ``fastcl.reference.ema_`` (float64 arithmetic, one rounding) and
``fastcl.reference.queue_push_`` (key by key, reading the pointer on the host), plus lightly's
``update_momentum`` formula written from its description.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastcl
from fastcl import ops, reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
EPS = {dt: torch.finfo(dt).eps for dt in DTYPES}


def _tensor(gen, shape, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _assert_ema_close(out, ref, targets, sources, momentum):
    """Per element: the float32 (float64) arithmetic's error, 2 eps of the terms' sizes, plus
    one rounding to the storage dtype. (A relative bound on the result alone fails where the
    two terms cancel.)"""
    m = float(momentum)
    for a, b, t, s in zip(out, ref, targets, sources):
        assert a.dtype == b.dtype and a.shape == b.shape
        arith = EPS[torch.float64 if a.dtype == torch.float64 else torch.float32]
        terms = m * t.double().abs() + (1 - m) * s.double().abs()
        subnormal = torch.finfo(a.dtype).tiny * EPS[a.dtype]  # spacing below the normal range
        bound = 2 * arith * terms + EPS[a.dtype] * b.double().abs() + subnormal
        err = (a.double() - b.double()).abs()
        assert bool((err <= bound).all()), f"{a.dtype}: worst {float((err / bound).max()):.3g}x"


# ------------------------------------------------------------------------------- ema_ -----


@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_ema_matches_reference(backend, data, seed):
    """Mixed dtypes and sizes (empty, scalar, odd, and past the C++ 65536-element chunks) in
    one call; momentum as a float or a tensor."""
    dtypes = DTYPES if backend.name != "triton" else DTYPES[:1] + DTYPES[2:]  # no Triton fp64
    big = 70_000 if not backend.small else 3000
    shapes = data.draw(st.lists(st.sampled_from([(), (0,), (1,), (7,), (3, 5), (big,),
                                                 (2, 3, 4)]), min_size=1, max_size=6),
                       label="shapes")
    kinds = data.draw(st.lists(st.sampled_from(dtypes), min_size=len(shapes),
                               max_size=len(shapes)), label="dtypes")
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.996, 1.0]) | st.floats(0, 1),
                         label="momentum")
    as_tensor = data.draw(st.booleans(), label="as_tensor")
    gen = torch.Generator().manual_seed(seed)
    targets = [_tensor(gen, s, k, backend.device) for s, k in zip(shapes, kinds)]
    sources = [_tensor(gen, s, k, backend.device) for s, k in zip(shapes, kinds)]
    originals = [t.clone() for t in targets]
    expected = [t.clone() for t in targets]
    reference.ema_(expected, sources, momentum)
    m = torch.tensor(momentum, dtype=torch.float64) if as_tensor else momentum
    fastcl.ema_(targets, sources, m)
    _assert_ema_close(targets, expected, originals, sources, momentum)


def _lightly_update_momentum(model, model_ema, m):
    """lightly.models.utils.update_momentum, written from its description."""
    for model_ema_p, model_p in zip(model_ema.parameters(), model.parameters()):
        model_ema_p.data = model_ema_p.data * m + model_p.data * (1.0 - m)


def _net():
    return torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.BatchNorm1d(9), torch.nn.ReLU(),
                               torch.nn.Linear(9, 5))


def test_ema_matches_lightly_update_momentum(backend):
    torch.manual_seed(0)
    online, ours = _net().to(backend.device), _net().to(backend.device)
    theirs = copy.deepcopy(ours)
    for m in (0.99, 0.5, 0.996):
        fastcl.ema_(ours, online, m, buffers="none")
        _lightly_update_momentum(online, theirs, m)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours.buffers(), theirs.buffers()):
        assert torch.equal(a, b)  # buffers="none" leaves them alone, as lightly does


@pytest.mark.parametrize("buffers", ["average", "copy", "none"])
def test_ema_module_buffers(buffers):
    torch.manual_seed(0)
    online, target = _net(), _net()
    online.train()(torch.randn(16, 12))  # moves online's BatchNorm statistics
    before = copy.deepcopy(target)
    fastcl.ema_(target, online, 0.75, buffers=buffers)
    bn, bn_online, bn_before = target[1], online[1], before[1]
    for name in ("running_mean", "running_var"):
        got, src, old = (getattr(x, name) for x in (bn, bn_online, bn_before))
        want = {"average": 0.75 * old + 0.25 * src, "copy": src, "none": old}[buffers]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    n_batches = {"average": 1, "copy": 1, "none": 0}[buffers]  # integer buffer: copied
    assert int(bn.num_batches_tracked) == n_batches
    for p, q, r in zip(target.parameters(), online.parameters(), before.parameters()):
        torch.testing.assert_close(p, 0.75 * r + 0.25 * q, rtol=1e-6, atol=1e-7)


def test_ema_errors_name_the_problem():
    a, b = _net(), torch.nn.Sequential(torch.nn.Linear(12, 9))
    with pytest.raises(ValueError, match="different parameters"):
        fastcl.ema_(a, b, 0.9)
    with pytest.raises(TypeError, match="both"):
        fastcl.ema_(a, list(a.parameters()), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        fastcl.ema_([torch.zeros(2)], [torch.zeros(2)], 1.5)
    with pytest.raises(TypeError, match="momentum"):
        fastcl.ema_([torch.zeros(2)], [torch.zeros(2)], "0.9")
    with pytest.raises(ValueError, match="momentum"):
        fastcl.ema_([torch.zeros(2)], [torch.zeros(2)], torch.zeros(2))
    with pytest.raises(ValueError, match="tensor 1: target shape"):
        fastcl.ema_([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)], 0.9)
    with pytest.raises(TypeError, match="dtype"):
        fastcl.ema_([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)], 0.9)
    with pytest.raises(ValueError, match="2 tensors but source has 1"):
        fastcl.ema_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.9)
    with pytest.raises(TypeError, match="floating"):
        fastcl.ema_([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], 0.9)
    with pytest.raises(TypeError, match="single tensors"):
        fastcl.ema_(torch.zeros(2), torch.zeros(2), 0.9)
    with pytest.raises(ValueError, match="buffers"):
        fastcl.ema_(a, copy.deepcopy(a), 0.9, buffers="mean")


def test_ema_non_dense_layouts():
    """A transposed source against a contiguous target: correct (not the fused path)."""
    gen = torch.Generator().manual_seed(0)
    t = _tensor(gen, (6, 4), torch.float32, "cpu")
    s = _tensor(gen, (4, 6), torch.float32, "cpu").T
    original, expected = [t.clone()], [t.clone()]
    reference.ema_(expected, [s], 0.8)
    fastcl.ema_([t], [s], 0.8)
    _assert_ema_close([t], expected, original, [s], 0.8)


def test_opcheck_ema(backend):
    gen = torch.Generator().manual_seed(0)
    ts = [_tensor(gen, (5,), torch.float32, backend.device),
          _tensor(gen, (3, 2), torch.bfloat16, backend.device)]
    ss = [torch.randn_like(t) for t in ts]
    torch.library.opcheck(torch.ops.fastcl.ema_.default, (ts, ss, ops.temperature_tensor(0.9)))


# ------------------------------------------------------------------------ cosine_momentum --


def test_cosine_momentum_schedule():
    f = functools.partial(fastcl.cosine_momentum, total_steps=100, base=0.996)
    assert f(0) == pytest.approx(0.996)
    assert f(100) == pytest.approx(1.0)
    assert f(50) == pytest.approx((0.996 + 1.0) / 2)
    assert f(250) == pytest.approx(1.0)  # past the end: final
    assert f(10) < f(20) < f(90)
    for step in (0, 13, 50, 99, 100, 140):
        t = f(torch.tensor(step))
        assert isinstance(t, torch.Tensor)
        assert float(t) == pytest.approx(f(step), abs=1e-15)
    with pytest.raises(ValueError, match="total_steps"):
        fastcl.cosine_momentum(1, 0, 0.9)
    with pytest.raises(ValueError, match="base"):
        fastcl.cosine_momentum(1, 10, 1.5)


# -------------------------------------------------------------------------- queue_push_ ----


@given(k=st.integers(1, 40), b=st.integers(0, 100), d=st.integers(1, 9),
       start=st.integers(0, 200), steps=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_queue_push_matches_reference(backend, k, b, d, start, steps, dtype):
    """B < K, B = K, B > K, K not a multiple of B, B = 0, any start, pushes in a row; keys are
    cast to the queue's dtype."""
    gen = torch.Generator().manual_seed(k * 1000 + b)
    queue = _tensor(gen, (k, d), dtype, backend.device)
    ptr = torch.tensor([start % k], dtype=torch.int64, device=backend.device)
    q_ref, p_ref = queue.clone(), ptr.clone()
    for _ in range(steps):
        keys = _tensor(gen, (b, d), torch.float32, backend.device)
        fastcl.queue_push_(queue, ptr, keys)
        reference.queue_push_(q_ref, p_ref, keys)
        assert torch.equal(queue, q_ref)
        assert torch.equal(ptr, p_ref)
        assert ptr.dtype == torch.int64 and ptr.shape == (1,)


def test_queue_push_wraps_and_keeps_last_keys():
    queue = torch.zeros(5, 1)
    ptr = torch.tensor([3])
    fastcl.queue_push_(queue, ptr, torch.arange(4.0)[:, None])  # rows 3, 4, 0, 1
    assert queue.flatten().tolist() == [2.0, 3.0, 0.0, 0.0, 1.0] and ptr.item() == 2
    fastcl.queue_push_(queue, ptr, torch.arange(10.0, 17.0)[:, None])  # B = 7 > K = 5
    assert sorted(queue.flatten().tolist()) == [12.0, 13.0, 14.0, 15.0, 16.0]
    assert ptr.item() == (2 + 7) % 5
    assert queue[(ptr.item() - 1) % 5].item() == 16.0  # the newest key sits just before ptr


def test_queue_push_errors_name_the_argument():
    q, p = torch.zeros(8, 4), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="keys have 3 features"):
        fastcl.queue_push_(q, p, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="keys must be a 2-D"):
        fastcl.queue_push_(q, p, torch.zeros(4))
    with pytest.raises(ValueError, match="ptr must be a one-element int64"):
        fastcl.queue_push_(q, torch.zeros(1), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ptr must be a one-element int64"):
        fastcl.queue_push_(q, torch.zeros(2, dtype=torch.int64), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="queue must be a 2-D"):
        fastcl.queue_push_(torch.zeros(8), p, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="contiguous"):
        fastcl.queue_push_(torch.zeros(4, 8).T, p, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no rows"):
        fastcl.queue_push_(torch.zeros(0, 4), p, torch.zeros(2, 4))


def test_opcheck_queue_push(backend):
    q = torch.randn(9, 4, device=backend.device)
    p = torch.tensor([7], device=backend.device)
    torch.library.opcheck(torch.ops.fastcl.queue_push_.default,
                          (q, p, torch.randn(5, 4, device=backend.device)))


# ----------------------------------------------------------------------------- modules -----


def test_momentum_encoder_is_a_frozen_copy():
    online = _net()
    enc = fastcl.nn.MomentumEncoder(online, momentum=0.9)
    assert all(not p.requires_grad for p in enc.target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert list(enc.parameters()) == list(enc.target.parameters())  # online not registered
    assert not any(k.startswith("online") for k in enc.state_dict())
    x = torch.randn(4, 12, requires_grad=True)
    y = enc(x)
    assert not y.requires_grad
    before = copy.deepcopy(enc.target)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    enc.update()
    for p, q, r in zip(enc.target.parameters(), online.parameters(), before.parameters()):
        torch.testing.assert_close(p, 0.9 * r + 0.1 * q, rtol=1e-6, atol=1e-7)
    assert int(enc.step) == 1


def test_momentum_encoder_schedule_uses_step():
    sched = functools.partial(fastcl.cosine_momentum, total_steps=10, base=0.5)
    enc = fastcl.nn.MomentumEncoder(_net(), schedule=sched)
    assert float(enc.current_momentum()) == pytest.approx(0.5)
    for _ in range(5):
        enc.update()
    assert float(enc.current_momentum()) == pytest.approx(0.75)
    assert float(enc.current_momentum(step=10)) == pytest.approx(1.0)


def test_negative_queue_buffers():
    nq = fastcl.nn.NegativeQueue(32, 6)
    torch.testing.assert_close(nq.queue.norm(dim=1), torch.ones(32))
    assert nq.ptr.dtype == torch.int64 and int(nq.ptr) == 0
    assert set(nq.state_dict()) == {"queue", "ptr"}
    nq.push(torch.ones(40, 6))  # more keys than rows
    assert torch.equal(nq.negatives(), torch.ones(32, 6)) and int(nq.ptr) == 40 % 32
    with pytest.raises(ValueError, match="size"):
        fastcl.nn.NegativeQueue(0, 6)


class _TinyMoCo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                           torch.nn.Linear(16, 8))
        self.key_encoder = fastcl.nn.MomentumEncoder(self.encoder, momentum=0.9)
        self.queue = fastcl.nn.NegativeQueue(20, 8)

    def forward(self, x1, x2):
        q = self.encoder(x1)
        k = self.key_encoder(x2)
        loss = fastcl.info_nce(q, k, self.queue.negatives(), temperature=0.2)
        self.queue.push(k)  # before backward, as MoCo does
        return loss


def _train(model, opt, batches):
    losses = []
    for x1, x2 in batches:
        opt.zero_grad()
        loss = model(x1, x2)
        loss.backward()
        opt.step()
        model.key_encoder.update()
        losses.append(loss.detach())
    return losses


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)) for _ in range(n)]


def test_checkpoint_resume_is_bitwise(backend, tmp_path):
    """Train, checkpoint, train on; a fresh model loading the checkpoint trains on to bitwise
    the same queue, pointer, target weights and losses (batch 7 against a queue of 20: the
    pointer wraps mid-batch)."""
    if backend.device.type != "cpu":
        pytest.skip("the tiny model lives on the CPU")
    model = _TinyMoCo()
    opt = torch.optim.SGD(model.encoder.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, _batches(3, seed=1))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    later = _batches(4, seed=2)
    losses_a = _train(model, opt, later)

    resumed = _TinyMoCo()
    opt_b = torch.optim.SGD(resumed.encoder.parameters(), lr=0.1, momentum=0.9)
    state = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    losses_b = _train(resumed, opt_b, later)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert {"queue.queue", "queue.ptr", "key_encoder.step"} <= set(model.state_dict())


def test_compiled_train_step_pushes_and_updates():
    """torch.compile(fullgraph=True) of a MoCo step's forward (encoders, loss, queue push) and of
    the momentum update (a cosine schedule: momentum is a tensor computed from the step
    buffer), with the backward in between, against the same steps run eagerly. (Dynamo does
    not trace ``loss.backward()`` itself; the compiled forward brings its compiled backward.)"""
    sched = functools.partial(fastcl.cosine_momentum, total_steps=6, base=0.9)

    def build():
        m = _TinyMoCo()
        m.key_encoder.schedule = sched
        return m

    def forward(model, x1, x2):
        return model(x1, x2)

    def update(encoder):
        encoder.update()

    eager, compiled_model = build(), build()
    c_forward = torch.compile(forward, fullgraph=True)
    c_update = torch.compile(update, fullgraph=True)
    for x1, x2 in _batches(4, seed=3):
        la = forward(eager, x1, x2)
        la.backward()
        update(eager.key_encoder)
        lb = c_forward(compiled_model, x1, x2)
        lb.backward()
        c_update(compiled_model.key_encoder)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        for a, b in zip(eager.encoder.parameters(), compiled_model.encoder.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
            a.grad = b.grad = None
    for (name, a), (_, b) in zip(eager.state_dict().items(),
                                 compiled_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert int(compiled_model.queue.ptr) == (4 * 7) % 20  # the pushes happened, and wrapped


def test_triton_ema_leaves_float64_and_strided_pairs_to_pytorch_exactly():
    """Pairs the Triton kernel does not take (float64; a transposed source) in one call with
    ones it does (contiguous; channels-last conv weights, both sides): float64 stays float64
    arithmetic, to the float64 bound."""
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    targets = [_tensor(gen, (9,), torch.float32, "cpu"),
               _tensor(gen, (5, 3), torch.float64, "cpu"),
               _tensor(gen, (4, 6), torch.float32, "cpu"),
               _tensor(gen, (2, 3, 4, 5), torch.float32, "cpu").to(memory_format=cl)]
    sources = [_tensor(gen, (9,), torch.float32, "cpu"),
               _tensor(gen, (5, 3), torch.float64, "cpu"),
               _tensor(gen, (6, 4), torch.float32, "cpu").T,
               _tensor(gen, (2, 3, 4, 5), torch.float32, "cpu").to(memory_format=cl)]
    originals = [t.clone() for t in targets]
    expected = [t.clone() for t in targets]
    reference.ema_(expected, sources, 0.9999)
    with fastcl.use_backend("triton"):
        fastcl.ema_(targets, sources, torch.tensor(0.9999, dtype=torch.float64))
    _assert_ema_close(targets, expected, originals, sources, 0.9999)


def _lightly_cosine_schedule(step, max_steps, start_value, end_value):
    """lightly.utils.scheduler.cosine_schedule's formula (period=None), written out: it
    divides by max_steps - 1 and gives end_value at step == max_steps - 1 and max_steps."""
    if max_steps == 1 or step == max_steps:
        return end_value
    return end_value - (end_value - start_value) * (math.cos(math.pi * step / (max_steps - 1))
                                                    + 1) / 2


@pytest.mark.parametrize("max_steps", [2, 3, 10, 1000])
def test_cosine_momentum_equals_lightly_with_max_steps_minus_one(max_steps):
    """The README's swap: lightly's cosine_schedule(step, max_steps, 0.996, 1) is
    cosine_momentum(step, max_steps - 1, 0.996, 1.0) for 0 <= step <= max_steps. (With
    total_steps = max_steps the two differ: 0.996824 against lightly's 0.997 at step 3 of 10.)"""
    for step in range(max_steps + 1):
        assert fastcl.cosine_momentum(step, max_steps - 1, 0.996, 1.0) == pytest.approx(
            _lightly_cosine_schedule(step, max_steps, 0.996, 1.0), abs=1e-15)
    if max_steps == 10:
        assert fastcl.cosine_momentum(3, 10, 0.996) == pytest.approx(0.996824, abs=1e-6)
        assert _lightly_cosine_schedule(3, 10, 0.996, 1.0) == pytest.approx(0.997, abs=1e-12)
