"""Decoupled contrastive loss (``fastcl.dcl_loss``, ``fastcl.nn.DCLLoss``, ``DCLWLoss``) against
the formulas written out here, in float64 and densely, never through ``fastcl.reference``:

- DCL (Yeh et al. 2021, eq. 6): for each of the 2N rows of cat([z1, z2]) (L2-normalized),
  -w_i s_pos_i + logsumexp over the row's 2N - 2 negatives (itself and its positive left out),
  s = cosine / temperature; the mean over the 2N rows (sum, or the rows for "none").
- lightly's current ``DCLLoss`` written from its description, side by side (the peer's
  formulation): two similarity matrices (view 0 against view 0 and against view 1), their
  diagonals masked out, one logsumexp over their concatenation, the positive term multiplied by
  ``weight_fn(out0, out1)``, and 0.5 * (loss0 + loss1) with the views swapped.
- DCLW: the weights 2 - N softmax_i(zhat1_i . zhat2_i / sigma) from detached inputs (no gradient);
  a custom ``weight_fn`` with a gradient gets its gradient through.

Whether a backend runs DCL is the registry's word (``engine.BACKENDS[name].unsupported(DCL)``):
where it declares DCL's choice unsupported the loss must raise ``NotImplementedError`` naming it.
"""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastcl
from fastcl import engine
from fastcl.functional import negative_mises_fisher_weights
from test_dtypes import _one_rank_group
from tolerances import assert_within_rule, max_err

TEMPERATURES = st.one_of(st.sampled_from([0.01, 0.07, 0.1, 0.5, 2.0]),
                         st.floats(0.01, 2.0, allow_nan=False, allow_infinity=False))
SEEDS = st.integers(0, 2**31 - 1)
REFUSED = "does not support double backward"


# ------------------------------------------------------------------ the formulas -----------


def dcl_formula(z1, z2, temperature, weight_fn=None, reduction="mean", weights=None):
    """DCL row by row, as the paper writes it (dense, in the inputs' dtype).

    ``weights``: explicit (2N,) positive weights (overrides ``weight_fn``)."""
    n = z1.shape[0]
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    z = torch.cat([a, b])
    s = z @ z.T / temperature
    if weights is None:
        weights = (torch.cat([weight_fn(a, b), weight_fn(b, a)]) if weight_fn is not None
                   else torch.ones(2 * n, dtype=z.dtype))
    rows = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        keep = torch.ones(2 * n, dtype=torch.bool)
        keep[i] = keep[pos] = False
        rows.append(-weights[i] * s[i, pos] + torch.logsumexp(s[i][keep], dim=0))
    loss = torch.stack(rows)
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


def dcl_formula_weights(z1, z2, weight_fn):
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    return torch.cat([weight_fn(a, b), weight_fn(b, a)]).detach()


def lightly_dcl(out0, out1, temperature, weight_fn=None):
    """lightly's current DCLLoss (one process), written from its description."""

    def one_side(x0, x1):
        x0, x1 = F.normalize(x0, dim=1), F.normalize(x1, dim=1)
        sim_00 = x0 @ x0.T / temperature
        sim_01 = x0 @ x1.T / temperature
        positive_loss = -torch.diag(sim_01)
        if weight_fn is not None:
            positive_loss = positive_loss * weight_fn(x0, x1)
        n = x0.shape[0]
        off_diag = ~torch.eye(n, dtype=torch.bool, device=x0.device)
        negatives = torch.cat([sim_00[off_diag].view(n, n - 1),
                               sim_01[off_diag].view(n, n - 1)], dim=1)
        negative_loss = torch.logsumexp(negatives, dim=1)
        return (positive_loss + negative_loss).mean()

    return 0.5 * (one_side(out0, out1) + one_side(out1, out0))


def squared_distance_weights(a, b):
    """A custom weight_fn with a gradient."""
    return ((a - b) ** 2).sum(1)


WEIGHTS = {"dcl": None, "dclw": negative_mises_fisher_weights,
           "custom": squared_distance_weights}


def _randn(gen, shape, dtype=torch.float64, device="cpu"):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.exp(torch.randn(shape[:-1] + (1,), generator=gen, dtype=torch.float64))
    return x.to(dtype).to(device)


def _refusal():
    return engine.BACKENDS[fastcl.get_backend()].unsupported(engine.DCL)


# ----------------------------------------------------- the formulas agree with lightly -----


@pytest.mark.parametrize("weights", list(WEIGHTS))
@given(n=st.integers(2, 12), d=st.integers(1, 9), seed=SEEDS, temperature=TEMPERATURES)
def test_formula_is_lightlys_dcl(weights, n, d, seed, temperature):
    """The row-by-row formula (mean) is lightly's DCLLoss, values and gradients, float64."""
    gen = torch.Generator().manual_seed(seed)
    z1 = _randn(gen, (n, d)).requires_grad_()
    z2 = _randn(gen, (n, d)).requires_grad_()
    ours = dcl_formula(z1, z2, temperature, WEIGHTS[weights])
    theirs = lightly_dcl(z1, z2, temperature, WEIGHTS[weights])
    g1 = torch.autograd.grad(ours, [z1, z2])
    g2 = torch.autograd.grad(theirs, [z1, z2])
    # Two float64 arrangements of logits of size 1/tau: their roundings differ by ~eps/tau.
    tol = 1e-12 * max(1.0, 1.0 / temperature)
    assert abs(ours.item() - theirs.item()) <= tol * max(1.0, abs(theirs.item()))
    for a, b in zip(g1, g2):
        assert max_err(a, b) <= tol * max(1.0, b.abs().max().item())


# ------------------------------------------------------------------- fastcl vs formula -----


def _tiling(backend, data):
    # Imported here, not at the top: the 2-process test's workers import this module in a
    # fresh interpreter whose sys.path may find benchmarks/conftest.py first.
    from conftest import CPU_BACKENDS, kernel_module, tile_patch

    if backend.name not in CPU_BACKENDS:
        import contextlib

        return contextlib.nullcontext()
    tile = data.draw(st.sampled_from([kernel_module(backend.name)._TILE, 3, 8]), label="tile")
    return tile_patch(backend.name, tile)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(data=st.data(), seed=SEEDS, temperature=TEMPERATURES)
def test_values_and_gradients_match_the_formula(backend, weights, reduction, data, seed,
                                                temperature):
    """fastcl.dcl_loss = the formula: values and the gradients of z1 and z2 (through a custom
    weight_fn's gradient too), float64 to 1e-10 on the backends that take it, float32 within
    the suite's rule (eager = the formula in float32); N across tiles, D odd."""
    n = data.draw(st.integers(2, 12 if backend.small else 24), label="n")
    d = data.draw(st.sampled_from([1, 3, 17, 33]) | st.integers(1, 40), label="d")
    dtype = torch.float32 if backend.name == "triton" else data.draw(
        st.sampled_from([torch.float32, torch.float64]), label="dtype")
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = _randn(gen, (n, d), dtype, backend.device), _randn(gen, (n, d), dtype,
                                                                backend.device)
    weight_fn = WEIGHTS[weights]
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    missing = _refusal()
    if missing is not None:
        with pytest.raises(NotImplementedError, match=re.escape(missing)):
            fastcl.dcl_loss(a, b, temperature, weight_fn, reduction)
        return
    with _tiling(backend, data):
        out = fastcl.dcl_loss(a, b, temperature, weight_fn, reduction)
        cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        g = torch.autograd.grad(out, [a, b], cot.to(out.dtype).to(out.device))
    oa, ob = z1.detach().cpu().double().requires_grad_(), z2.detach().cpu().double(
    ).requires_grad_()
    oracle = dcl_formula(oa, ob, temperature, weight_fn, reduction)
    g_o = torch.autograd.grad(oracle, [oa, ob], cot)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == oracle.shape
    if dtype == torch.float64:
        for what, x, y in [("loss", out, oracle), ("dz1", g[0], g_o[0]), ("dz2", g[1], g_o[1])]:
            assert max_err(x, y) <= 1e-10 * max(1.0, y.abs().max().item()), (
                f"{what}: {max_err(x, y):.3g}")
        return
    ea, eb = z1.detach().cpu().requires_grad_(), z2.detach().cpu().requires_grad_()
    eager = dcl_formula(ea, eb, temperature, weight_fn, reduction)
    g_e = torch.autograd.grad(eager, [ea, eb], cot.float())
    assert_within_rule(out.cpu(), oracle, eager, torch.float32, "loss")
    # D = 1: every normalized row is +-1 and the exact gradient is 0; what comes back is the
    # rounding of terms of size w / temperature summed over the rows, divided by |z| (the
    # reference backend's float32 gradients are no closer).
    floor = 0.0
    if d == 1:
        w_max = 1.0 if weight_fn is None else max(
            1.0, float(dcl_formula_weights(oa, ob, weight_fn).abs().max()))
        min_norm = float(torch.cat([oa, ob]).detach().abs().min())  # d/dz = d/dzhat / |z|
        floor = 8 * torch.finfo(torch.float32).eps * w_max / temperature / min_norm * float(
            cot.abs().sum() / (2 * n if reduction == "mean" else 1))
    for what, x, y, e in [("dz1", g[0], g_o[0], g_e[0]), ("dz2", g[1], g_o[1], g_e[1])]:
        assert x.dtype == dtype
        assert_within_rule(x.cpu(), y, e, torch.float32, what, floor=floor)


def test_dclw_weights_carry_no_gradient():
    """DCLW's weights are 2 - N softmax(s / sigma) of detached similarities: no gradient flows
    through them (the loss's gradient is the formula's with the weights as constants), and
    their mean is 1."""
    gen = torch.Generator().manual_seed(3)
    z1, z2 = _randn(gen, (7, 5)).requires_grad_(), _randn(gen, (7, 5)).requires_grad_()
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    for sigma in (0.5, 0.1, 2.0):
        w = negative_mises_fisher_weights(a, b, sigma)
        assert not w.requires_grad
        expect = 2 - 7 * torch.softmax((a * b).sum(1).detach() / sigma, dim=0)
        torch.testing.assert_close(w, expect, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(w.mean(), torch.ones((), dtype=w.dtype))
    w = torch.cat([negative_mises_fisher_weights(a, b), negative_mises_fisher_weights(b, a)])
    with fastcl.use_backend("chunked"):
        loss = fastcl.dcl_loss(z1, z2, 0.2, negative_mises_fisher_weights)
        g = torch.autograd.grad(loss, [z1, z2])
    expect = dcl_formula(z1, z2, 0.2, weights=w.detach())
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
    ge = torch.autograd.grad(expect, [z1, z2])
    for x, y in zip(g, ge):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_backward_outside_the_backend_context_uses_the_forwards_backend():
    """A loss computed under ``fastcl.use_backend("chunked")`` and differentiated after the
    block (the usual training loop: loss in the context, ``backward()`` later) gets the gradient
    of the backend that computed it: the backward must not re-dispatch on the backend in force
    at backward time (by default ``cpp`` on CPU, which does not run DCL's backward today)."""
    gen = torch.Generator().manual_seed(12)
    z1, z2 = _randn(gen, (5, 4)).requires_grad_(), _randn(gen, (5, 4)).requires_grad_()
    with fastcl.use_backend("chunked"):
        inside = torch.autograd.grad(fastcl.dcl_loss(z1, z2, 0.3), [z1, z2])
        loss = fastcl.dcl_loss(z1, z2, 0.3)
    assert fastcl.get_backend() == "auto"
    outside = torch.autograd.grad(loss, [z1, z2])
    for a, b in zip(outside, inside):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_weight_fn_gets_its_gradient(backend):
    """A weight_fn with a gradient ((a - b)^2 summed) contributes it: the loss's gradient is
    not the one with the weights detached."""
    gen = torch.Generator().manual_seed(4)
    dtype = torch.float32 if backend.name == "triton" else torch.float64
    z1, z2 = (_randn(gen, (6, 5), dtype, backend.device).requires_grad_() for _ in range(2))
    calls = []

    def weight_fn(x, y):
        calls.append((x.shape, x.requires_grad))
        return squared_distance_weights(x, y)

    missing = _refusal()
    if missing is not None:
        with pytest.raises(NotImplementedError, match=re.escape(missing)):
            fastcl.dcl_loss(z1, z2, 0.3, weight_fn)
        return
    loss = fastcl.dcl_loss(z1, z2, 0.3, weight_fn)
    assert calls == [((6, 5), True), ((6, 5), True)]
    g = torch.autograd.grad(loss, [z1, z2])
    detached = fastcl.dcl_loss(z1, z2, 0.3, lambda x, y: squared_distance_weights(x, y).detach())
    gd = torch.autograd.grad(detached, [z1, z2])
    torch.testing.assert_close(loss, detached)
    assert max_err(g[0], gd[0]) > 1e-3
    za, zb = (z.detach().cpu().double().requires_grad_() for z in (z1, z2))
    ge = torch.autograd.grad(dcl_formula(za, zb, 0.3, squared_distance_weights), [za, zb])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for x, y in zip(g, ge):
        torch.testing.assert_close(x.cpu().double(), y, rtol=tol, atol=tol)


# ------------------------------------------------------------------------- errors ----------


def test_one_sample_is_refused():
    z = torch.randn(1, 4)
    for fn in (lambda: fastcl.dcl_loss(z, z), lambda: fastcl.nn.DCLLoss()(z, z),
               lambda: fastcl.nn.DCLWLoss()(z, z)):
        with pytest.raises(ValueError, match="at least 2 samples"):
            fn()


@pytest.mark.parametrize("name", ["chunked", "reference"])
def test_bad_weight_fn_is_refused(name):
    fastcl.set_backend(name)  # backends that run DCL: the check comes after the rows' pass
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    for bad in (3, "weights", torch.ones(4)):
        with pytest.raises(TypeError, match="weight_fn"):
            fastcl.dcl_loss(z1, z2, weight_fn=bad)
        with pytest.raises(TypeError, match="weight_fn"):
            fastcl.nn.DCLLoss(weight_fn=bad)
    for bad in (lambda a, b: torch.ones(5), lambda a, b: torch.ones(4, 2),
                lambda a, b: torch.ones(()), lambda a, b: 1.0, lambda a, b: [1.0] * 4):
        with pytest.raises(ValueError, match=r"weight_fn.*\(4,\)"):
            fastcl.dcl_loss(z1, z2, weight_fn=bad)
    with pytest.raises(ValueError, match="sigma"):
        fastcl.nn.DCLWLoss(sigma=0.0)
    # A (N, 1) column of weights is accepted (lightly's functions return (N,)).
    torch.testing.assert_close(fastcl.dcl_loss(z1, z2, weight_fn=lambda a, b: torch.ones(4, 1)),
                               fastcl.dcl_loss(z1, z2))


def test_bad_arguments_name_themselves():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        fastcl.dcl_loss(z, z, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        fastcl.dcl_loss(z, z, reduction="avg")
    with pytest.raises(ValueError, match="same shape"):
        fastcl.dcl_loss(z, torch.randn(5, 3))
    with pytest.raises(TypeError, match="z1"):
        fastcl.dcl_loss(torch.ones(4, 3, dtype=torch.int64), z)


# ----------------------------------------------------------------- dtypes, modules ---------


def test_bf16_inputs_give_a_float32_loss(backend):
    gen = torch.Generator().manual_seed(5)
    z1, z2 = (_randn(gen, (6, 8), torch.bfloat16, backend.device).requires_grad_()
              for _ in range(2))
    for weight_fn in WEIGHTS.values():
        missing = _refusal()
        if missing is not None:
            with pytest.raises(NotImplementedError, match=re.escape(missing)):
                fastcl.dcl_loss(z1, z2, 0.2, weight_fn)
            continue
        loss = fastcl.dcl_loss(z1, z2, 0.2, weight_fn)
        assert loss.dtype == torch.float32
        g = torch.autograd.grad(loss, [z1, z2])
        assert all(x.dtype == torch.bfloat16 and torch.isfinite(x).all() for x in g)
        expect = dcl_formula(z1.detach().cpu().float(), z2.detach().cpu().float(), 0.2,
                             weight_fn)
        torch.testing.assert_close(loss.cpu(), expect, rtol=1e-5, atol=1e-5)
        rows = fastcl.dcl_loss(z1, z2, 0.2, weight_fn, reduction="none")
        assert rows.dtype == torch.float32 and rows.shape == (12,)


def test_modules_equal_the_functional(backend):
    gen = torch.Generator().manual_seed(6)
    z1, z2 = (_randn(gen, (6, 8), torch.float32, backend.device) for _ in range(2))
    missing = _refusal()
    for module, fn in [
        (fastcl.nn.DCLLoss(), lambda: fastcl.dcl_loss(z1, z2, 0.1)),
        (fastcl.nn.DCLLoss(temperature=0.3, weight_fn=squared_distance_weights),
         lambda: fastcl.dcl_loss(z1, z2, 0.3, squared_distance_weights)),
        (fastcl.nn.DCLWLoss(), lambda: fastcl.dcl_loss(z1, z2, 0.1,
                                                       negative_mises_fisher_weights)),
        (fastcl.nn.DCLWLoss(temperature=0.5, sigma=0.2),
         lambda: fastcl.dcl_loss(z1, z2, 0.5, lambda a, b: negative_mises_fisher_weights(
             a, b, sigma=0.2))),
    ]:
        if missing is not None:
            with pytest.raises(NotImplementedError, match=re.escape(missing)):
                module(z1, z2)
            continue
        torch.testing.assert_close(module(z1, z2), fn(), rtol=0, atol=0)
    assert fastcl.nn.DCLLoss().temperature == 0.1  # lightly's default
    assert fastcl.nn.DCLWLoss().sigma == 0.5
    assert "weighted=True" in repr(fastcl.nn.DCLWLoss())


# ---------------------------------------------------------------- double backward ---------


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_double_backward_is_refused_naming_dcl_loss(backend):
    gen = torch.Generator().manual_seed(7)
    z1 = _randn(gen, (5, 4), torch.float32, backend.device).requires_grad_()
    z2 = _randn(gen, (5, 4), torch.float32, backend.device)
    missing = _refusal()
    for weight_fn in WEIGHTS.values():
        if missing is not None:
            with pytest.raises(NotImplementedError, match=re.escape(missing)):
                fastcl.dcl_loss(z1, z2, 0.3, weight_fn)
            continue
        loss = fastcl.dcl_loss(z1, z2, 0.3, weight_fn)
        with pytest.raises(RuntimeError, match=REFUSED) as info:
            torch.autograd.grad(loss, z1, create_graph=True)
        assert "fastcl.dcl_loss" in str(info.value)
        (g,) = torch.autograd.grad(fastcl.dcl_loss(z1, z2, 0.3, weight_fn), z1)
        assert torch.isfinite(g).all()


def test_reference_backend_is_twice_differentiable():
    gen = torch.Generator().manual_seed(8)
    z1 = _randn(gen, (4, 3)).requires_grad_()
    z2 = _randn(gen, (4, 3)).requires_grad_()
    with fastcl.use_backend("reference"):
        # (DCLW's weights are detached on purpose: its gradient is not the derivative.)
        for weight_fn in (None, squared_distance_weights):
            assert torch.autograd.gradgradcheck(
                lambda a, b: fastcl.dcl_loss(a, b, 0.4, weight_fn), (z1, z2))


# -------------------------------------------------------------------- distributed ---------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_rank_group_equals_single_process(cpu_backend, reduction):
    gen = torch.Generator().manual_seed(9)
    z1, z2 = _randn(gen, (6, 5), torch.float32), _randn(gen, (6, 5), torch.float32)
    missing = _refusal()
    with _one_rank_group():
        for weight_fn in WEIGHTS.values():
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            if missing is not None:
                with pytest.raises(NotImplementedError, match=re.escape(missing)):
                    fastcl.dcl_loss(a, b, 0.2, weight_fn, reduction, distributed=True)
                continue
            got = fastcl.dcl_loss(a, b, 0.2, weight_fn, reduction, distributed=True)
            g = torch.autograd.grad(got.sum(), [a, b])
            c, d = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            expect = fastcl.dcl_loss(c, d, 0.2, weight_fn, reduction)
            ge = torch.autograd.grad(expect.sum(), [c, d])
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
            for x, y in zip(g, ge):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            module = fastcl.nn.DCLLoss(0.2, weight_fn, gather_distributed=True)
            if reduction == "mean":
                torch.testing.assert_close(module(z1, z2), expect, rtol=1e-6, atol=1e-6)


DIST_D = 5
DIST_TAU = 0.3
DIST_SHARDS = {"even": [3, 3], "uneven": [4, 2], "one_sample_rank": [3, 1]}


def _dist_inputs(n):
    g = torch.Generator().manual_seed(21)
    return _randn(g, (n, DIST_D)), _randn(g, (n, DIST_D))


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    fastcl.set_backend("chunked")  # the backend that implements DCL today (registry: every)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    out = {}
    try:
        for kind, sizes in DIST_SHARDS.items():
            z1g, z2g = _dist_inputs(sum(sizes))
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            for wname in ("dcl", "dclw"):
                for reduction in ("mean", "sum"):
                    z1 = z1g[lo:hi].clone().requires_grad_()
                    z2 = z2g[lo:hi].clone().requires_grad_()
                    try:
                        loss = fastcl.dcl_loss(z1, z2, DIST_TAU, WEIGHTS[wname], reduction,
                                               distributed=True)
                        out[f"{kind}/{wname}/{reduction}"] = (
                            loss.detach(), *torch.autograd.grad(loss, [z1, z2]))
                    except Exception as exc:  # reported by the parent
                        out[f"{kind}/{wname}/{reduction}"] = repr(exc)
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcl_dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_dist_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("wname", ["dcl", "dclw"])
@pytest.mark.parametrize("kind", list(DIST_SHARDS))
def test_two_processes_equal_the_single_process_global_loss(two_ranks, kind, wname):
    """Two gloo ranks, distributed=True: every rank returns the global loss (the formula over
    the whole batch; DCLW's weights computed per rank over its own rows, as lightly does), and
    its shard's gradient is 2x the single-process gradient of its rows (DDP averages it back).
    Shards even, uneven, and a rank holding one sample (its own rows have no negative: they
    come from the other rank)."""
    sizes = DIST_SHARDS[kind]
    z1, z2 = (x.requires_grad_() for x in _dist_inputs(sum(sizes)))
    weights = None
    if wname == "dclw":
        a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        w1, w2, off = [], [], 0
        for s in sizes:
            w1.append(negative_mises_fisher_weights(a[off:off + s], b[off:off + s]))
            w2.append(negative_mises_fisher_weights(b[off:off + s], a[off:off + s]))
            off += s
        weights = torch.cat(w1 + w2)
    for reduction in ("mean", "sum"):
        expect = dcl_formula(z1, z2, DIST_TAU, None, reduction, weights=weights)
        g1, g2 = torch.autograd.grad(expect, [z1, z2])
        for rank, res in enumerate(two_ranks):
            got = res[f"{kind}/{wname}/{reduction}"]
            assert not isinstance(got, str), f"rank {rank} raised {got}"
            loss, d1, d2 = got
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            torch.testing.assert_close(loss.double(), expect.detach(), rtol=2e-5, atol=2e-6,
                                       msg=f"{reduction} value, rank {rank}")
            for d, g in ((d1, g1), (d2, g2)):
                torch.testing.assert_close(d.double(), 2 * g[lo:hi], rtol=2e-5, atol=2e-6,
                                           msg=f"{reduction} gradient, rank {rank}")
