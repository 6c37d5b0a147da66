"""``fastcl.models``: SimCLR, MoCo v2 / v3 and BYOL on tiny inputs (the default backend: C++ on
the CPU). Learning, the momentum networks, the queue, torch.compile, checkpoints and errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcl
from fastcl import models, reference

FEATURES = 16
KINDS = ("simclr", "moco-v2", "moco-v3", "byol")


def _backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.Linear(24, FEATURES))


def _build(kind, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "simclr":
        return models.SimCLR(_backbone(), FEATURES, projection_dim=8, hidden_dim=32, **kw)
    if kind == "moco-v2":
        kw.setdefault("queue_size", 20)
        return models.MoCo(_backbone(), FEATURES, dim=8, hidden_dim=32, temperature=0.2,
                           momentum=0.9, **kw)
    if kind == "moco-v3":
        return models.MoCo(_backbone(), FEATURES, dim=8, hidden_dim=32, version="v3", **kw)
    return models.BYOL(_backbone(), FEATURES, projection_dim=8, hidden_dim=32, momentum=0.9,
                       **kw)


def _momentum_net(model):
    return model.target if isinstance(model, models.BYOL) else getattr(model, "key_encoder",
                                                                          None)


def _views(g, base, noise=0.3):
    return (base + noise * torch.randn(base.shape, generator=g),
            base + noise * torch.randn(base.shape, generator=g))


def _batches(n, seed, b=8):
    g = torch.Generator().manual_seed(seed)
    return [_views(g, torch.randn(b, 12, generator=g)) for _ in range(n)]


def _train(model, opt, batches, total=50, start=0):
    losses = []
    for i, (x1, x2) in enumerate(batches):
        loss = model(x1, x2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.step_end(start + i, total)
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls(kind):
    """40 steps on one batch of 16 samples (fresh noisy views each step): the mean loss of the
    last 5 steps is well below that of the first 5. MoCo v2's queue is reset to the same random
    negatives before each step, so the loss measures the encoder alone (the queue's own
    behaviour is tested below)."""
    model = _build(kind)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 12, generator=g)
    queue0 = model.queue.queue.clone() if kind == "moco-v2" else None
    losses = []
    for step in range(40):
        if queue0 is not None:
            model.queue.queue.copy_(queue0)
            model.queue.ptr.zero_()
        losses.extend(_train(model, opt, [_views(g, base)], total=40, start=step))
    first, last = torch.stack(losses[:5]).mean(), torch.stack(losses[-5:]).mean()
    assert torch.isfinite(torch.stack(losses)).all()
    assert last < 0.8 * first, (kind, [round(float(x), 4) for x in losses])


@pytest.mark.parametrize("kind", KINDS[1:])
def test_momentum_network_changes_only_through_ema(kind):
    """The optimizer step leaves the momentum network alone (no gradient reaches it); step_end
    moves it by one EMA step from the online weights with the model's momentum (cosine
    schedule for MoCo v3 and BYOL, at the step given)."""
    model = _build(kind)
    net = _momentum_net(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # every parameter, frozen ones included
    before = {k: v.clone() for k, v in net.target.state_dict().items()}
    x1, x2 = _batches(1, seed=4)[0]
    loss = model(x1, x2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in net.target.parameters())
    after_opt = net.target.state_dict()
    # Buffers (BatchNorm statistics) change in the target's own forward; weights must not.
    for name, p in net.target.named_parameters():
        assert torch.equal(p, before[name]), name
    online = dict(net.online.named_parameters())
    assert any(not torch.equal(online[n], before[n]) for n in online)  # the online net moved
    step, total = 7, 20
    m = model.momentum_at(step, total)
    if kind != "moco-v2":
        assert m == pytest.approx(fastcl.cosine_momentum(step, total, model.base_momentum))
    expected = [after_opt[n].clone() for n, _ in net.target.named_parameters()]
    reference.ema_(expected, [online[n] for n, _ in net.target.named_parameters()], m)
    model.step_end(step, total)
    for (name, p), e in zip(net.target.named_parameters(), expected):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7, msg=name)


def test_moco_v2_queue_advances_with_the_keys():
    """Each forward pushes its B keys (the key encoder's outputs for x2) at the pointer, which
    wraps: batch 8 into a queue of 20."""
    model = _build("moco-v2")
    for i, (x1, x2) in enumerate(_batches(3, seed=5)):
        start = int(model.queue.ptr)
        keys = model.key_encoder(x2)  # train mode: the same batch statistics as in forward
        model(x1, x2)
        rows = (torch.arange(8) + start) % 20
        torch.testing.assert_close(model.queue.queue[rows], keys)
        assert int(model.queue.ptr) == (8 * (i + 1)) % 20


def test_moco_v3_has_no_queue_and_the_paper_defaults():
    v3 = models.MoCo(_backbone(), FEATURES, version="v3", hidden_dim=32)
    v2 = models.MoCo(_backbone(), FEATURES, queue_size=16)
    assert v3.queue is None and v3.predictor is not None
    assert (v2.temperature, v2.base_momentum) == (0.07, 0.999)
    assert (v3.temperature, v3.base_momentum) == (0.2, 0.99)
    assert v2.queue.queue.shape == (16, 128)


def test_moco_v3_loss_is_the_symmetric_scaled_in_batch_loss():
    """Against the formula written out in plain PyTorch: (ctr(q1, k2) + ctr(q2, k1)) * 2τ,
    ctr(q, k) = CE(q̂ k̂ᵀ / τ, arange)."""
    model = _build("moco-v3")
    x1, x2 = _batches(1, seed=6)[0]
    loss = model(x1, x2)
    model2 = _build("moco-v3")  # the same weights (train-mode BN: batch statistics)
    q1, q2 = model2.predictor(model2.projector(model2.encoder(torch.cat([x1, x2])))).chunk(2)
    with torch.no_grad():
        k1, k2 = model2.key_encoder.target(torch.cat([x1, x2])).chunk(2)
    tau = model2.temperature

    def ctr(q, k):
        logits = nn.functional.normalize(q, dim=1) @ nn.functional.normalize(k, dim=1).T / tau
        return nn.functional.cross_entropy(logits, torch.arange(len(q)))

    torch.testing.assert_close(loss, (ctr(q1, k2) + ctr(q2, k1)) * 2 * tau, rtol=1e-5,
                               atol=1e-6)


def test_byol_loss_is_the_symmetric_normalized_mse():
    model = _build("byol")
    x1, x2 = _batches(1, seed=7)[0]
    loss = model(x1, x2)
    torch.manual_seed(0)
    twin = _build("byol")
    p1, p2 = twin.predictor(twin.projector(twin.encoder(torch.cat([x1, x2])))).chunk(2)
    with torch.no_grad():
        z1, z2 = twin.target.target(torch.cat([x1, x2])).chunk(2)

    def nmse(p, z):
        n = nn.functional.normalize
        return ((n(p, dim=1) - n(z, dim=1)) ** 2).sum(1)

    torch.testing.assert_close(loss, (nmse(p1, z2) + nmse(p2, z1)).mean(), rtol=1e-5, atol=1e-6)
    # No gradient into the target, whatever the input.
    z = torch.randn(4, 8, requires_grad=True)
    p = torch.randn(4, 8, requires_grad=True)
    models.byol_loss(p, z).sum().backward()
    assert z.grad is None and p.grad is not None
    # A zero row stays finite, as with F.normalize.
    assert torch.isfinite(models.byol_loss(torch.zeros(2, 8), torch.ones(2, 8))).all()
    # 16-bit inputs give a float32 loss (never rounded to the bfloat16 grid).
    assert models.byol_loss(p.bfloat16(), z.bfloat16()).dtype == torch.float32


def test_simclr_loss_is_nt_xent_of_the_projections():
    model = _build("simclr", temperature=0.3)
    x1, x2 = _batches(1, seed=8)[0]
    loss = model(x1, x2)
    torch.manual_seed(0)
    twin = _build("simclr", temperature=0.3)
    z1, z2 = twin.projector(twin.encoder(torch.cat([x1, x2]))).chunk(2)
    torch.testing.assert_close(loss, reference.nt_xent(z1, z2, 0.3, "mean"), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step_matches_eager(kind):
    """torch.compile(fullgraph=True) of the model's forward (with its compiled backward) and
    of step_end (MoCo v3 / BYOL: the cosine momentum from the step buffer, a tensor: no
    recompiles), three steps, against the same steps run eagerly."""
    eager, comp = _build(kind), _build(kind)
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    opt_c = torch.optim.SGD([p for p in comp.parameters() if p.requires_grad], lr=0.1)
    c_forward = torch.compile(comp, fullgraph=True)
    c_step_end = torch.compile(lambda: comp.step_end(None, 10), fullgraph=True)
    for x1, x2 in _batches(3, seed=9):
        le, lc = eager(x1, x2), c_forward(x1, x2)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for opt, loss in ((opt_e, le), (opt_c, lc)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        eager.step_end(None, 10)
        c_step_end()
    for (name, a), (_, b) in zip(eager.state_dict().items(), comp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    if kind == "moco-v2":
        assert int(comp.queue.ptr) == (3 * 8) % 20
    if kind in ("moco-v3", "byol"):
        assert int(_momentum_net(comp).step) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_resume_is_bitwise(kind, tmp_path):
    """Train, save model + optimizer state, train on; a fresh model (another seed) loading the
    checkpoint trains on to bitwise the same losses and state (weights, momentum network and
    its step, MoCo's queue and pointer)."""
    model = _build(kind)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    _train(model, opt, _batches(3, seed=10), total=10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    later = _batches(4, seed=11)
    losses_a = _train(model, opt, later, total=10, start=3)

    resumed = _build(kind, seed=123)
    opt_b = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05,
                            momentum=0.9)
    state = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    losses_b = _train(resumed, opt_b, later, total=10, start=3)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="backbone"):
        models.SimCLR(lambda x: x, 4)
    with pytest.raises(ValueError, match="feature_dim"):
        models.SimCLR(_backbone(), 0)
    with pytest.raises(ValueError, match="temperature"):
        models.SimCLR(_backbone(), FEATURES, temperature=0.0)
    with pytest.raises(ValueError, match="version"):
        models.MoCo(_backbone(), FEATURES, version="v1")
    with pytest.raises(ValueError, match="momentum"):
        models.BYOL(_backbone(), FEATURES, momentum=1.5)
    with pytest.raises(ValueError, match="schedule"):
        models.BYOL(_backbone(), FEATURES, schedule="linear")
    with pytest.raises(ValueError, match="hidden_dim"):
        models.mlp(4, 0, 4)
    model = _build("simclr")
    with pytest.raises(ValueError, match="x1 and x2"):
        model(torch.randn(4, 12), torch.randn(5, 12))
    for kind in ("moco-v3", "byol"):
        with pytest.raises(ValueError, match="total_steps"):
            _build(kind).step_end(3)
    _build("moco-v2").step_end()  # constant momentum: no schedule to feed
    _build("byol", schedule=None).step_end()
