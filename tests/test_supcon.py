"""fastcl.supcon_loss and fastcl.nn.SupConLoss (issue 16) against SupContrast's SupConLoss.

SupContrast's formula is written out here step by step, as its ``SupConLoss.forward`` computes
it (dense (V B)^2 masks, logits shifted by their detached row max, the positive count clamped
to 1 for anchors without a positive), on L2-normalized features. ``reference.supcon_loss`` is
checked against it; every backend is checked against it in float64 (values, the features' and
a learnable temperature's gradients) and, in float32, within the suite's rule (twice eager
float32's error). A backend whose declaration (``engine.BACKENDS``) lacks the label positives
must refuse with ``NotImplementedError`` naming them. pytorch-metric-learning's SupConLoss is
written out too (its AvgNonZero mean, cosine similarity inside), and the multi-rank form runs
on 2 gloo ranks against the formula over the global batch.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastcl
from fastcl import engine, reference
from tolerances import assert_within_rule, max_err
from test_clip import ALL_BACKENDS, _leaf, _tiling, any_backend  # noqa: F401

F64 = torch.float64
TIGHT = 1e-10
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


# ------------------------------------------------------------------- the formulas ---------


def supcontrast_formula(features, labels=None, temperature=0.07, base_temperature=0.07,
                        contrast_mode="all"):
    """SupContrast's SupConLoss.forward, step by step, on (B, V, D) features that are already
    unit-norm (it does not normalize)."""
    b, v = features.shape[:2]
    dtype = features.dtype
    if labels is None:
        mask = torch.eye(b, dtype=dtype)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(dtype)
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, v
    anchor_dot_contrast = torch.matmul(anchor_feature, contrast_feature.T) / temperature
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, v)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(b * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, b).mean()


def pml_supcon_formula(embeddings, labels, temperature=0.1):
    """pytorch-metric-learning's SupConLoss(temperature)(embeddings, labels), step by step:
    cosine similarity / temperature, shifted by the detached row max, log-softmax over every
    other embedding, the mean over positives (count + the dtype's tiny), then the mean over
    the anchors whose loss is not zero (AvgNonZeroReducer)."""
    x = F.normalize(embeddings, dim=1)
    mat = x @ x.T / temperature
    n = mat.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    pos_mask, neg_mask = (same & ~eye).to(mat.dtype), (~same).to(mat.dtype)
    mat = mat - mat.max(dim=1, keepdim=True).values.detach()
    keep = (pos_mask + neg_mask).bool()
    denominator = torch.logsumexp(mat.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    log_prob = mat - denominator
    mean_log_prob_pos = (pos_mask * log_prob).sum(dim=1) / (
        pos_mask.sum(dim=1) + torch.finfo(mat.dtype).tiny)
    losses = -mean_log_prob_pos
    nonzero = losses > 0
    return losses[nonzero].mean()


def _declares(name: str) -> bool:
    return engine.BACKENDS[name].unsupported(engine.SUPCON) is None


FUSED_CPU = [name for name in ("cpp", "chunked") if _declares(name)]


def _features(gen, b, v, d, dtype=F64, unit=True):
    """(b, v, d) features, unit-norm or with norms spread over [0.5, 2] (never near 0, where
    the normalization's backward divides any rounding by the norm)."""
    x = F.normalize(torch.randn(b, v, d, generator=gen, dtype=F64), dim=2)
    if not unit:
        x = x * (0.5 + 1.5 * torch.rand(b, v, 1, generator=gen, dtype=F64))
    return x.to(dtype)


def _labels(gen, b, classes):
    return torch.randint(0, classes, (b,), generator=gen)


# ------------------------------------------------------------------- the reference --------


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("labelled", [True, False])
def test_reference_is_supcontrasts_formula(mode, labelled):
    """reference.supcon_loss = SupContrast's steps on unit-norm features (values and
    gradients), with anchors without a positive among them (a class seen once, V = 1)."""
    gen = torch.Generator().manual_seed(1)
    for b, v, classes in [(9, 2, 4), (7, 3, 7), (8, 1, 3), (5, 4, 1), (1, 2, 1)]:
        if v == 1 and not labelled:
            continue
        # The user's own normalization upstream: SupContrast's input is unit-norm.
        x = _leaf(_features(gen, b, v, 6, unit=False))
        labels = _labels(gen, b, classes) if labelled else None
        ours = reference.supcon_loss(F.normalize(x, dim=2), labels, 0.1, 0.07, mode)
        theirs = supcontrast_formula(F.normalize(x, dim=2), labels, 0.1, 0.07, mode)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(ours, x)[0],
                                   torch.autograd.grad(theirs, x)[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------- values and gradients -----


def _draw_case(data, small):
    b = data.draw(st.one_of(st.sampled_from([1, 2, 5, 8]), st.integers(1, 10 if small else 24)),
                  label="B")
    v = data.draw(st.integers(1, 3 if small else 4), label="V")
    d = data.draw(st.sampled_from([1, 3, 8, 17] if small else [1, 3, 8, 17, 33]), label="D")
    labelled = v == 1 or data.draw(st.booleans(), label="labels")
    classes = data.draw(st.one_of(st.just(1), st.just(b), st.integers(1, max(1, b))),
                        label="classes") if labelled else None
    tau = data.draw(st.sampled_from([0.05, 0.07, 0.1, 0.5, 1.0]), label="tau")
    mode = data.draw(st.sampled_from(["all", "one"]), label="mode")
    base = data.draw(st.sampled_from([None, 0.07, 1.0]), label="base")
    return b, v, d, classes, tau, mode, base


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(data=st.data(), seed=SEEDS)
def test_values_and_gradients_match_supcontrasts_formula(any_backend, reduction, data, seed):
    """supcon_loss = the formula in float64 (values, the features' and a learnable
    temperature's gradients; any label counts, anchors without a positive, 1-4 views, both
    contrast modes), float32 within the suite's rule; or the declared refusal."""
    backend = any_backend
    small = backend.name == "triton" and backend.device.type == "cpu"
    b, v, d, classes, tau, mode, base = _draw_case(data, small)
    dtype = torch.float32 if backend.name == "triton" else data.draw(
        st.sampled_from([torch.float32, F64]), label="dtype")
    gen = torch.Generator().manual_seed(seed)
    feats = _features(gen, b, v, d, unit=data.draw(st.booleans(), label="unit"))
    labels = _labels(gen, b, classes) if classes else None
    shape = () if reduction != "none" else ((b,) if mode == "one" else (b, v))
    cot = torch.randn(shape, generator=gen, dtype=F64)

    def run(fn, dt):
        x = _leaf(feats, dt).to(backend.device) if dt != F64 else _leaf(feats, dt)
        if x.device.type != "cpu":
            x.retain_grad()
        t = _leaf(torch.tensor(tau, dtype=dt))
        lab = None if labels is None else labels.to(x.device)
        out = fn(x, lab, t)
        return out, torch.autograd.grad(out, [x, t], cot.to(out.dtype).to(out.device))

    def fast(x, lab, t):
        return fastcl.supcon_loss(x, lab, t, base, mode, reduction)

    def formula(x, lab, t):
        return reference.supcon_loss(x, lab, t, base, mode, reduction)

    if not _declares(backend.name):
        with pytest.raises(NotImplementedError, match="labels"):
            run(fast, dtype)
        return
    with _tiling(backend, data):
        out, g_fast = run(fast, dtype)
    oracle, g_ora = run(formula, F64)
    acc = F64 if dtype == F64 else torch.float32
    assert out.dtype == acc and out.shape == shape
    assert bool(torch.isfinite(out).all())
    if dtype == F64:
        for what, a, e in [("loss", out, oracle), ("features", g_fast[0], g_ora[0]),
                           ("temperature", g_fast[1], g_ora[1])]:
            bound = TIGHT * max(1.0, e.detach().abs().max().item())
            assert max_err(a, e) <= bound, f"{what}: error {max_err(a, e):.3g}"
        return
    base_out, g_base = run(formula, torch.float32)
    assert_within_rule(out, oracle, base_out, acc, "loss")
    assert_within_rule(g_fast[0], g_ora[0], g_base[0], acc, "gradient of features")
    # d loss / d tau sums (P - y / count) cosines over (V B)^2 pairs, each rounded once in
    # float32 at logits of size 1 / tau: that floor no float32 implementation avoids.
    terms = (v * b) ** 2 * cot.abs().sum().item() / tau ** 2
    assert_within_rule(g_fast[1], g_ora[1], g_base[1], acc, "gradient of temperature",
                       4 * torch.finfo(torch.float32).eps * terms)


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_two_views_without_labels_is_nt_xent(name):
    """labels=None with V = 2 is multi-view SimCLR: NT-Xent on the two views (values per
    anchor in [z1 rows; z2 rows] order = the (B, 2) "none" transposed, and gradients)."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(13, 2, 9, generator=gen)
    with fastcl.use_backend(name):
        x1, x2 = _leaf(z[:, 0]), _leaf(z[:, 1])
        expect = fastcl.nt_xent(x1, x2, 0.2, reduction="none")
        g_expect = torch.autograd.grad(expect.sum(), [x1, x2])
        x = _leaf(z)
        got = fastcl.supcon_loss(x, temperature=0.2, reduction="none")
        (g,) = torch.autograd.grad(got.sum(), [x])
    torch.testing.assert_close(got.T.reshape(-1), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[:, 0], g_expect[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[:, 1], g_expect[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_anchors_without_a_positive_contribute_zero_and_count(name):
    """One view, a class seen once: that anchor's loss is exactly 0, its gradient 0, and the
    mean divides by every anchor (SupContrast's convention since it stopped giving NaN)."""
    gen = torch.Generator().manual_seed(3)
    x = _leaf(torch.randn(5, 7, generator=gen))
    labels = torch.tensor([0, 0, 1, 2, 2])  # sample 2 has no positive
    with fastcl.use_backend(name):
        rows = fastcl.supcon_loss(x, labels, 0.5, reduction="none")
        (g,) = torch.autograd.grad(rows[2, 0] * 3.0 + rows[0, 0] * 0, [x])
        mean = fastcl.supcon_loss(x, labels, 0.5)
    assert rows.shape == (5, 1) and rows[2, 0].item() == 0.0
    assert bool((rows[[0, 1, 3, 4], 0] > 0).all())
    assert g.abs().max().item() == 0.0
    torch.testing.assert_close(mean, rows.sum() / 5)
    # Every label distinct with one view: no anchor has a positive, the loss is 0, no NaN.
    with fastcl.use_backend(name):
        y = _leaf(torch.randn(4, 3, generator=gen))
        zero = fastcl.supcon_loss(y, torch.arange(4), 0.1)
        zero.backward()
    assert zero.item() == 0.0 and y.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_pytorch_metric_learnings_supcon_when_every_anchor_has_a_positive(name):
    """pytorch-metric-learning's SupConLoss(temperature)(embeddings, labels) on (M, D)
    embeddings = SupConLoss(temperature, base_temperature=temperature) with one view."""
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(24, 10, generator=gen, dtype=F64)
    labels = torch.arange(24) % 5  # every class at least 4 times
    x, y = _leaf(emb), _leaf(emb)
    with fastcl.use_backend(name):
        ours = fastcl.nn.SupConLoss(temperature=0.1, base_temperature=0.1)(x, labels)
    theirs = pml_supcon_formula(y, labels, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, y)[0],
                               rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------ the module ------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_module_is_supcontrasts_supconloss(name):
    """SupConLoss() with SupContrast's defaults (temperature 0.07, base 0.07, "all") and
    "one": its value on unit-norm (B, V, D) features and on (B, V, h, w) features flattened as
    it does, and the gradients upstream of the model's own normalization; an nn.Parameter
    temperature is the module's parameter."""
    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(12, 2, 16, generator=gen, dtype=F64)
    feats = F.normalize(raw, dim=2)
    labels = _labels(gen, 12, 4)
    for mode in ("all", "one"):
        with fastcl.use_backend(name):
            x = _leaf(raw)
            ours = fastcl.nn.SupConLoss(contrast_mode=mode)(F.normalize(x, dim=2), labels)
            g = torch.autograd.grad(ours, x)[0]
            x4 = _leaf(feats.view(12, 2, 4, 4))
            ours4 = fastcl.nn.SupConLoss(contrast_mode=mode)(x4, labels)
        y = _leaf(raw)
        theirs = supcontrast_formula(F.normalize(y, dim=2), labels, contrast_mode=mode)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours4, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, torch.autograd.grad(theirs, y)[0], rtol=1e-9, atol=1e-12)
    module = fastcl.nn.SupConLoss(temperature=torch.nn.Parameter(torch.tensor(0.1)))
    assert [n for n, _ in module.named_parameters()] == ["temperature"]
    with fastcl.use_backend(name):
        module(feats.float(), labels).backward()
    assert module.temperature.grad is not None and torch.isfinite(module.temperature.grad)
    assert "contrast_mode='all'" in repr(module)


def test_a_mask_is_refused_pointing_to_labels():
    x = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="labels"):
        fastcl.nn.SupConLoss()(x, mask=torch.eye(4))
    with pytest.raises(ValueError, match="labels"):
        fastcl.nn.SupConLoss()(x, torch.arange(4), mask=torch.eye(4))


def test_bad_arguments_name_themselves():
    x = torch.randn(4, 2, 3)
    cases = [
        (lambda: fastcl.supcon_loss(x, torch.arange(3)), ValueError, "labels must have shape"),
        (lambda: fastcl.supcon_loss(x, torch.zeros(4)), TypeError, "labels must have an integer"),
        (lambda: fastcl.supcon_loss(x, torch.zeros(4, dtype=torch.bool)), TypeError,
         "labels must have an integer"),
        (lambda: fastcl.supcon_loss(x, [0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
        (lambda: fastcl.supcon_loss(x, torch.zeros(4, 2, dtype=torch.long)), ValueError,
         "labels must have shape"),
        (lambda: fastcl.supcon_loss(torch.randn(4, 0, 3)), ValueError, "no views"),
        (lambda: fastcl.supcon_loss(torch.randn(4, 3)), ValueError, "no anchor has a positive"),
        (lambda: fastcl.supcon_loss(torch.randn(4, 1, 3)), ValueError,
         "no anchor has a positive"),
        (lambda: fastcl.supcon_loss(x, temperature=0.0), ValueError, "temperature"),
        (lambda: fastcl.supcon_loss(x, temperature=-0.1), ValueError, "temperature"),
        (lambda: fastcl.supcon_loss(x, base_temperature=0.0), ValueError, "base_temperature"),
        (lambda: fastcl.supcon_loss(x, contrast_mode="two"), ValueError, "contrast_mode"),
        (lambda: fastcl.supcon_loss(x, reduction="avg"), ValueError, "reduction"),
        (lambda: fastcl.supcon_loss(x.long()), TypeError, "features must have a floating"),
        (lambda: fastcl.supcon_loss(torch.randn(4)), ValueError, "features must be 3-dim"),
        (lambda: fastcl.supcon_loss(torch.randn(0, 2, 3)), ValueError, "empty batch"),
        (lambda: fastcl.supcon_loss(torch.randn(4, 2, 0)), ValueError, "zero features"),
        (lambda: fastcl.nn.SupConLoss(contrast_mode="many"), ValueError, "contrast_mode"),
        (lambda: fastcl.nn.SupConLoss(temperature=0), ValueError, "temperature"),
        (lambda: fastcl.nn.SupConLoss(base_temperature=-1), ValueError, "base_temperature"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match):
            call()
    # SupContrast's (B, 1) label column is accepted.
    with fastcl.use_backend("chunked"):
        col = fastcl.supcon_loss(x, torch.tensor([[0], [1], [0], [1]]))
        torch.testing.assert_close(col, fastcl.supcon_loss(x, torch.tensor([0, 1, 0, 1])))


# ------------------------------------------------------------- ops, compile, dtypes -------


@pytest.mark.parametrize("name", FUSED_CPU)
def test_opcheck(name):
    """torch.library.opcheck of the op pair: the symmetric pass and the rows-in-columns pass
    (offset > 0), learnable scale, strided inputs."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(12, 5, generator=gen)
    zs = z.T.contiguous().T  # column-major
    lab = torch.randint(0, 3, (12,), generator=gen)
    op = torch.ops.fastcl.label_rows.default
    back = torch.ops.fastcl.label_rows_backward.default
    scale = torch.tensor(4.0, dtype=F64)
    with fastcl.use_backend(name):
        for rows, cols, rl, cl, spec, off in (
                (zs, None, lab, None, engine.SUPCON.code(), 0),
                (z[4:9], zs, lab[4:9], lab, engine.SUPCON_ROWS.code(), 4)):
            args = (rows.clone().requires_grad_(),
                    None if cols is None else cols.clone().requires_grad_(), rl, cl,
                    scale.clone().requires_grad_(), spec, off, True, name)
            torch.library.opcheck(op, args)
            loss, lse, _, count = op(rows, cols, rl, cl, scale, spec, off, False, name)
            grad = torch.randn(2 * rows.shape[0], generator=gen)[::2]
            for need in ((True, True), (True, False), (False, True)):
                if cols is None and need[1]:
                    continue
                torch.library.opcheck(back, (grad, rows, cols, rl, cl, lse, count, scale, spec,
                                             off, *need, name))


@pytest.mark.parametrize("name", FUSED_CPU)
@pytest.mark.parametrize("mode", ["all", "one"])
def test_gradcheck_float64_across_tiles(name, mode):
    from conftest import tile_patch

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 2, 3, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    with fastcl.use_backend(name), tile_patch(name, 2):
        assert torch.autograd.gradcheck(
            lambda x, t: fastcl.supcon_loss(x, labels, t, 0.07, mode, "none"), (x, t))


def test_double_backward_refused_by_the_kernels_and_run_by_the_reference():
    x = torch.randn(6, 2, 4, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    for name in FUSED_CPU:
        with fastcl.use_backend(name):
            loss = fastcl.supcon_loss(x, labels, 0.2)
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(loss, x, create_graph=True)
    with fastcl.use_backend("reference"):
        (g,) = torch.autograd.grad(fastcl.supcon_loss(x, labels, 0.2), x, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), x)
    assert torch.isfinite(h).all() and h.abs().max() > 0


@pytest.mark.parametrize("name", FUSED_CPU)
@pytest.mark.parametrize("mode", ["all", "one"])
def test_compile_fullgraph_with_a_learnable_temperature(name, mode):
    """torch.compile(fullgraph=True) of a SupCon step (labels, a learnable log-temperature):
    eager's loss and gradients over steps where the temperature changes, compiled once."""
    counter = torch._dynamo.testing.CompileCounter()

    def step(x, labels, p):
        return fastcl.supcon_loss(x, labels, p.exp(), 0.07, mode)

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(9)
    with fastcl.use_backend(name):
        for value in (-2.0, -1.5, -1.0):
            feats = torch.randn(10, 2, 8, generator=gen)
            labels = torch.randint(0, 3, (10,), generator=gen)
            results = []
            for fn in (compiled, step):
                x, p = _leaf(feats), torch.tensor(value, requires_grad=True)
                loss = fn(x, labels, p)
                results.append((loss, *torch.autograd.grad(loss, [x, p])))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert counter.frame_count == 1
        inductor = torch.compile(step, fullgraph=True)
        feats = torch.randn(10, 2, 8, generator=gen)
        labels = torch.randint(0, 3, (10,), generator=gen)
        results = []
        for fn in (inductor, step):
            x, p = _leaf(feats), torch.tensor(-2.3, requires_grad=True)
            loss = fn(x, labels, p)
            results.append((loss, *torch.autograd.grad(loss, [x, p])))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_bf16_and_fp16_give_a_float32_loss(name):
    gen = torch.Generator().manual_seed(10)
    feats = torch.randn(16, 2, 12, generator=gen, dtype=F64)
    labels = _labels(gen, 16, 4)
    with fastcl.use_backend(name):
        for dt in (torch.bfloat16, torch.float16):
            x = _leaf(feats, dt)
            loss = fastcl.supcon_loss(x, labels, 0.1)
            (g,) = torch.autograd.grad(loss, [x])
            assert loss.dtype == torch.float32 and g.dtype == dt
            xd = x.detach()
            expect = reference.supcon_loss(xd.double(), labels, 0.1)
            base = reference.supcon_loss(xd.float(), labels, 0.1)
            assert_within_rule(loss, expect, base, torch.float32, "loss")
            x64, x32 = _leaf(xd, F64), _leaf(xd, torch.float32)
            g64 = torch.autograd.grad(reference.supcon_loss(x64, labels, 0.1), [x64])[0]
            g32 = torch.autograd.grad(reference.supcon_loss(x32, labels, 0.1), [x32])[0]
            assert_within_rule(g.float(), g64, g32.to(dt).float(), dt, "gradient")


@pytest.mark.parametrize("name", FUSED_CPU)
def test_autocast_bf16_encoder(name):
    """Under CPU autocast (a bf16 linear encoder, a learnable temperature), the loss is
    float32, and it and the gradients agree with the formula on the same bf16 features in
    float32."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(24, 16)
    inputs = torch.randn(10, 2, 24)
    labels = torch.randint(0, 3, (10,))

    def run(loss_fn):
        p = torch.tensor(-2.0, requires_grad=True)
        enc.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = enc(inputs)
            assert feats.dtype == torch.bfloat16
            loss = loss_fn(feats, labels, p.exp())
        loss.backward()
        return loss, enc.weight.grad.clone(), p.grad.clone()

    def formula(feats, labels, t):
        with torch.autocast("cpu", enabled=False):
            return reference.supcon_loss(feats.float(), labels, t)

    with fastcl.use_backend(name):
        fast = run(fastcl.supcon_loss)
    ref = run(formula)
    assert fast[0].dtype == torch.float32
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_one_rank_group_equals_single_process(name):
    from test_dtypes import _one_rank_group

    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(7, 3, 5, generator=gen, dtype=F64)
    labels = _labels(gen, 7, 3)
    with fastcl.use_backend(name), _one_rank_group():
        for mode in ("all", "one"):
            for reduction in ("mean", "sum", "none"):
                for lab in (labels, None):
                    x = _leaf(feats)
                    got = fastcl.supcon_loss(x, lab, 0.3, None, mode, reduction, distributed=True)
                    (g,) = torch.autograd.grad(got.sum(), [x])
                    y = _leaf(feats)
                    expect = fastcl.supcon_loss(y, lab, 0.3, None, mode, reduction)
                    (ge,) = torch.autograd.grad(expect.sum(), [y])
                    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
                    torch.testing.assert_close(g, ge, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------- several ranks --------

DIST_SHARDS = {"even": [4, 4], "uneven": [5, 2]}
DIST_BACKENDS = ("chunked", "cpp")


def _dist_inputs(b):
    gen = torch.Generator().manual_seed(21)
    return torch.randn(b, 2, 6, generator=gen, dtype=F64), _labels(gen, b, 3)


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    out = {}
    try:
        for backend in DIST_BACKENDS:
            if not _declares(backend):
                continue
            fastcl.set_backend(backend)
            for kind, sizes in DIST_SHARDS.items():
                feats, labels = _dist_inputs(sum(sizes))
                lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
                for mode in ("all", "one"):
                    for labelled in (True, False):
                        for reduction in ("mean", "none"):
                            key = f"{backend}/{kind}/{mode}/{labelled}/{reduction}"
                            try:
                                x = _leaf(feats[lo:hi])
                                t = torch.tensor(0.2, dtype=F64, requires_grad=True)
                                loss = fastcl.supcon_loss(x, labels[lo:hi] if labelled else None,
                                                          t, 0.07, mode, reduction,
                                                          distributed=True)
                                out[key] = (loss.detach(),
                                            *torch.autograd.grad(loss.sum(), [x, t]))
                            except Exception as exc:  # reported by the parent
                                out[key] = repr(exc)
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supcon_dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_dist_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("backend", [b for b in DIST_BACKENDS if _declares(b)])
@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_distributed_supcon_is_the_global_loss(two_ranks, kind, backend):
    """supcon_loss(distributed=True) on 2 gloo ranks: "mean" is the formula over the global
    batch on every rank (positives on the other rank count), with gradients world_size x the
    single-process gradients of the shard (DDP's average gives the single-process step; the
    temperature's averaged over ranks too); "none" the rank's own anchors. Both modes, with
    and without labels, even and uneven shards."""
    sizes = DIST_SHARDS[kind]
    feats, labels = _dist_inputs(sum(sizes))
    for mode in ("all", "one"):
        for labelled in (True, False):
            for reduction in ("mean", "none"):
                x = _leaf(feats)
                t = torch.tensor(0.2, dtype=F64, requires_grad=True)
                lab = labels if labelled else None
                expect = reference.supcon_loss(x, lab, t, 0.07, mode, reduction)
                gx, gt = torch.autograd.grad(expect.sum(), [x, t])
                t_grads = []
                for rank, res in enumerate(two_ranks):
                    got = res[f"{backend}/{kind}/{mode}/{labelled}/{reduction}"]
                    assert not isinstance(got, str), f"rank {rank} raised {got}"
                    loss, dx, dt = got
                    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
                    factor = 1 if reduction == "none" else 2
                    want = expect[lo:hi] if reduction == "none" else expect
                    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
                    torch.testing.assert_close(dx, factor * gx[lo:hi], rtol=1e-9, atol=1e-12)
                    t_grads.append(dt)
                torch.testing.assert_close(sum(t_grads) / (2 if reduction == "mean" else 1), gt,
                                           rtol=1e-9, atol=1e-12)
