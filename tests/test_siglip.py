"""fastcl.siglip_loss and fastcl.nn.SigLipLoss (issue 15) against open_clip's SigLipLoss formula.

The formula is written out here in float64, as open_clip computes it: logits = scale * image @
text^T + bias, labels 2 I - 1, loss = -sum log sigmoid(labels * logits) / N, features as given.
Values and the gradients of image, text, scale and bias are checked over hypothesis shapes (N
from 1, D not a power of two, negative scales, large biases) on every backend: a backend whose
declaration (``engine.BACKENDS``) includes the sigmoid epilogue must agree; one that does not
must refuse with ``NotImplementedError`` naming it. The distributed forms run on 2 and 3 gloo
ranks against the same formula over the global batch (``siglip_loss(distributed=True)``) and
per rank (``SigLipLoss(rank, world_size)``, open_clip's semantics).
"""
from __future__ import annotations

import datetime
import math
import os
import re
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
from fastcl import engine
from tolerances import assert_within_rule, max_err
# The backends, the fixture that forces each (used by name), drawn tile edges, leaves: CLIP's.
from test_clip import ALL_BACKENDS, _leaf, _tiling, any_backend  # noqa: F401

F64 = torch.float64
TIGHT = 1e-10  # float64, relative to max(1, |formula|)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


# ------------------------------------------------------------------- the formula ----------


def siglip_formula(image, text, scale, bias=None, reduction="mean"):
    """open_clip's SigLipLoss (one process), written out: logits = scale * image @ text^T
    (+ bias), labels 2 I - 1, -sum log sigmoid(labels * logits) / N; ``"sum"`` the sum,
    ``"none"`` each image's row sum."""
    logits = scale * image @ text.T
    if bias is not None:
        logits = logits + bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    rows = -F.logsigmoid(labels * logits).sum(dim=1)
    return {"mean": lambda: rows.sum() / n, "sum": rows.sum, "none": lambda: rows}[reduction]()


def open_clip_rank_loss(images, texts, scale, bias, rank, n):
    """open_clip's SigLipLoss on ``rank`` of several (n pairs per rank): its images against
    its own texts (labels 2 I - 1) plus every other rank's texts (negatives only), the sum over
    all of them divided by n."""
    lo = rank * n
    img = images[lo:lo + n]
    logits = scale * img @ texts.T + bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n) + lo] = 1
    return -F.logsigmoid(labels * logits).sum() / n


# ------------------------------------------------------------------------ backends --------


def _declares(name: str) -> bool:
    return engine.BACKENDS[name].unsupported(engine.SIGLIP) is None


# The full-speed CPU backends that declare the epilogue.
FUSED_CPU = [name for name in ("cpp", "chunked") if _declares(name)]


def _features(gen, n, d, kind, dtype=F64, device="cpu"):
    """(n, d) features: ``"unit"`` (normalized, as open_clip's model gives them) or ``"raw"``
    (Gaussian, norms ~ sqrt(d))."""
    x = torch.randn(n, d, generator=gen, dtype=F64)
    if kind == "unit":
        x = F.normalize(x, dim=1)
    return x.to(dtype).to(device)


def _draw_case(data, small):
    n = data.draw(st.one_of(st.sampled_from([1, 2, 3, 7, 16, 17]),
                            st.integers(1, 16 if small else 40)), label="n")
    d = data.draw(st.one_of(st.sampled_from([1, 3, 5, 17, 33] if small else
                                            [1, 3, 5, 31, 33, 65, 100]),
                            st.integers(1, 40 if small else 100)), label="d")
    kind = data.draw(st.sampled_from(["unit", "raw"]), label="features")
    # SigLIP starts at scale 10, bias -10 (open_clip's init) and learns both; negative scales
    # and large biases are drawn too. Raw features have dot products ~ sqrt(d): a smaller
    # scale keeps the logits within ~100.
    top = 100.0 if kind == "unit" else 2.0
    scale = data.draw(st.one_of(st.floats(-top, top), st.sampled_from([10.0, -1.0, 0.0])),
                      label="scale")
    bias = data.draw(st.one_of(st.floats(-100.0, 100.0), st.sampled_from([-10.0, 0.0])),
                     label="bias")
    return n, d, kind, scale, bias


# --------------------------------------------------------------- values and gradients -----


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("param_kind", ["float", "tensor"])
@given(data=st.data(), seed=SEEDS)
def test_values_and_gradients_match_open_clips_formula(any_backend, param_kind, reduction,
                                                       data, seed):
    """siglip_loss = the formula in float64: values and the gradients of image, text, scale
    and bias (tensors), float32 within the suite's rule (twice eager float32's error) and
    float64 to 1e-10; or the refusal the registry declares."""
    backend = any_backend
    small = backend.name == "triton" and backend.device.type == "cpu"
    n, d, kind, scale, bias = _draw_case(data, small)
    dtype = torch.float32 if backend.name == "triton" else data.draw(
        st.sampled_from([torch.float32, F64]), label="dtype")
    gen = torch.Generator().manual_seed(seed)
    img = _features(gen, n, d, kind, dtype, backend.device)
    txt = _features(gen, n, d, kind, dtype, backend.device)
    cot = torch.randn(n, generator=gen, dtype=F64) if reduction == "none" else torch.tensor(
        1.0, dtype=F64)
    tensors = param_kind == "tensor"

    def run(fn, dt):
        x, y = _leaf(img, dt), _leaf(txt, dt)
        # Tensor scale and bias in the inputs' dtype; the formula gets the very same values.
        a, b = ((_leaf(torch.tensor(v, dtype=dtype, device=backend.device), dt)
                 for v in (scale, bias)) if tensors else (scale, bias))
        out = fn(x, y, a, b)
        wanted = [x, y] + ([a, b] if tensors else [])
        return out, torch.autograd.grad(out, wanted, cot.to(out.dtype).to(out.device))

    def fast(x, y, a, b):
        return fastcl.siglip_loss(x, y, a, b, reduction)

    if not _declares(backend.name):
        with pytest.raises(NotImplementedError, match="sigmoid"):
            run(fast, dtype)
        return
    with _tiling(backend, data):
        out, g_fast = run(fast, dtype)
    oracle, g_ora = run(lambda x, y, a, b: siglip_formula(x, y, a, b, reduction), F64)
    acc = F64 if dtype == F64 else torch.float32
    assert out.dtype == acc and out.device == img.device
    assert out.shape == (() if reduction != "none" else (n,))
    assert bool(torch.isfinite(out).all())
    names = ["image", "text", "scale", "bias"]
    if dtype == F64:
        for what, a, b in [("loss", out, oracle)] + [
                (names[i], g_fast[i], g_ora[i]) for i in range(len(g_fast))]:
            bound = TIGHT * max(1.0, b.detach().abs().max().item())
            assert max_err(a, b) <= bound, f"{what}: error {max_err(a, b):.3g}"
        return
    base, g_base = run(lambda x, y, a, b: siglip_formula(x, y, a, b, reduction), torch.float32)
    assert_within_rule(out, oracle, base, acc, "loss")
    for i in range(len(g_fast)):
        assert g_fast[i].dtype == torch.float32
        floor = 0.0
        if i >= 2:
            # d loss / d scale (d bias) sums w * raw dots (w) over N^2 pairs: the float32
            # rounding of each term, weighted by the cotangent, which no float32
            # implementation avoids.
            norms = img.double().norm(dim=1).max() * txt.double().norm(dim=1).max()
            terms = n * cot.abs().sum().item() * (norms.item() if i == 2 else 1.0)
            floor = 4 * torch.finfo(torch.float32).eps * terms
        assert_within_rule(g_fast[i], g_ora[i], g_base[i], acc, f"gradient of {names[i]}",
                           floor)


def test_formula_is_open_clips_siglip_loss():
    """The formula above is open_clip's SigLipLoss.forward (world_size=1), on a case worked by
    hand: two pairs, features e1, e2 (images) and e1, -e2 (texts), scale 2, bias -1: logits
    [[1, -1], [-1, -3]], labels [[1, -1], [-1, 1]]; loss = (softplus(-1) + softplus(-1) +
    softplus(-1) + softplus(3)) / 2."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    txt = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64)
    sp = F.softplus
    expect = (3 * sp(torch.tensor(-1.0, dtype=F64)) + sp(torch.tensor(3.0, dtype=F64))) / 2
    torch.testing.assert_close(siglip_formula(img, txt, 2.0, -1.0), expect)
    for name in ["reference"] + FUSED_CPU:
        with fastcl.use_backend(name):
            torch.testing.assert_close(fastcl.siglip_loss(img, txt, 2.0, -1.0), expect,
                                       rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(fastcl.nn.SigLipLoss()(img, txt, 2.0, -1.0), expect,
                                       rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_logits_of_a_hundred_stay_finite(name):
    """Logits of +-100 and more (scale 100 on unit features, bias +-100): log sigmoid stays
    finite in float32, equal to the float64 formula, and the gradients are finite."""
    gen = torch.Generator().manual_seed(3)
    img, txt = _features(gen, 9, 7, "unit"), _features(gen, 9, 7, "unit")
    img[0], txt[0] = F.normalize(torch.ones(7, dtype=F64), dim=0), -F.normalize(
        torch.ones(7, dtype=F64), dim=0)  # a positive pair at logit -scale + bias
    with fastcl.use_backend(name):
        for scale, bias in ((100.0, 100.0), (100.0, -100.0), (-100.0, 50.0), (300.0, 0.0)):
            x, y = _leaf(img, torch.float32), _leaf(txt, torch.float32)
            a = torch.tensor(scale, requires_grad=True)
            b = torch.tensor(bias, requires_grad=True)
            loss = fastcl.siglip_loss(x, y, a, b, reduction="none")
            grads = torch.autograd.grad(loss.sum(), [x, y, a, b])
            expect = siglip_formula(img, txt, scale, bias, "none")
            assert bool(torch.isfinite(loss).all()), (scale, bias, loss)
            assert all(bool(torch.isfinite(g).all()) for g in grads)
            torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_reductions_agree(name):
    """"none" gives each image's row sum, "sum" their sum and "mean" that over N (the three
    run different paths: "none" recomputes the logits in the backward, the others form the
    gradients in the forward); the gradients agree accordingly."""
    gen = torch.Generator().manual_seed(4)
    img, txt = _features(gen, 11, 6, "unit"), _features(gen, 11, 6, "unit")
    with fastcl.use_backend(name):
        results = {}
        for reduction in ("mean", "sum", "none"):
            x, y = _leaf(img), _leaf(txt)
            a, b = _leaf(torch.tensor(10.0, dtype=F64)), _leaf(torch.tensor(-10.0, dtype=F64))
            out = fastcl.siglip_loss(x, y, a, b, reduction)
            total = out.sum() if reduction == "none" else out * (11 if reduction == "mean" else 1)
            results[reduction] = (total, *torch.autograd.grad(total, [x, y, a, b]))
        for reduction in ("mean", "none"):
            for p, q in zip(results[reduction], results["sum"]):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_the_backends_that_declare_the_epilogue():
    """The reference and chunked backends run the sigmoid epilogue; a backend whose
    declaration lacks it refuses it naming the choice; no backend runs it with a softmax
    spec's choices (normalized features, other ranks' rows as negatives-only columns)."""
    assert _declares("reference") and _declares("chunked")
    normalized = engine.Spec(columns="tensor", positive="index", epilogue="sigmoid")
    for name in engine.BACKENDS:
        backend = engine.BACKENDS[name]
        missing = backend.unsupported(engine.SIGLIP)
        assert missing is None or "sigmoid" in missing
        if missing is None:
            assert "normalize=True" in backend.unsupported(normalized)
            assert "other ranks" in backend.unsupported(engine.SIGLIP, others=True)
    with pytest.raises(TypeError, match="run_sigmoid"):
        engine.run(engine.SIGLIP, torch.randn(2, 3), torch.randn(2, 3), scale=1.0)


# ---------------------------------------------------------------------- bad input ---------


def test_bad_arguments_name_themselves():
    x = torch.randn(4, 8)
    cases = [
        (lambda: fastcl.siglip_loss(x.numpy(), x, 1.0, 0.0), TypeError, "image_features"),
        (lambda: fastcl.siglip_loss(x, x.long(), 1.0, 0.0), TypeError, "text_features"),
        (lambda: fastcl.siglip_loss(x[0], x, 1.0, 0.0), ValueError,
         "image_features must be 2-dim"),
        (lambda: fastcl.siglip_loss(x, x[None], 1.0, 0.0), ValueError,
         "text_features must be 2-dim"),
        (lambda: fastcl.siglip_loss(x[:0], x[:0], 1.0, 0.0), ValueError,
         "image_features is an empty"),
        (lambda: fastcl.siglip_loss(x, x[:, :5], 1.0, 0.0), ValueError,
         "text_features has 5 features but image_features has 8"),
        (lambda: fastcl.siglip_loss(x, x[:3], 1.0, 0.0), ValueError, "same number of pairs"),
        (lambda: fastcl.siglip_loss(x, x, float("nan"), 0.0), ValueError, "logit_scale"),
        (lambda: fastcl.siglip_loss(x, x, float("inf"), 0.0), ValueError, "logit_scale"),
        (lambda: fastcl.siglip_loss(x, x, torch.ones(2), 0.0), TypeError, "logit_scale"),
        (lambda: fastcl.siglip_loss(x, x, torch.tensor(1), 0.0), TypeError, "logit_scale"),
        (lambda: fastcl.siglip_loss(x, x, "10", 0.0), TypeError, "logit_scale"),
        (lambda: fastcl.siglip_loss(x, x, 1.0, torch.ones(2)), TypeError, "logit_bias"),
        (lambda: fastcl.siglip_loss(x, x, 1.0, "0"), TypeError, "logit_bias"),
        (lambda: fastcl.siglip_loss(x, x, 1.0, float("-inf")), ValueError, "logit_bias"),
        (lambda: fastcl.siglip_loss(x, x, 1.0, True), TypeError, "logit_bias"),
        (lambda: fastcl.siglip_loss(x, x, 1.0, 0.0, reduction="avg"), ValueError, "reduction"),
        (lambda: fastcl.nn.SigLipLoss(rank=2, world_size=2), ValueError, "rank"),
        (lambda: fastcl.nn.SigLipLoss(world_size=0), ValueError, "world_size"),
        (lambda: fastcl.nn.SigLipLoss(world_size=2.0), TypeError, "world_size"),
        (lambda: fastcl.nn.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
    ]
    if torch.cuda.is_available():
        cases.append((lambda: fastcl.siglip_loss(x, x.cuda(), 1.0, 0.0), ValueError,
                      "text_features"))
    for call, error, words in cases:
        with pytest.raises(error, match=re.escape(words)):
            call()


def test_several_ranks_without_a_process_group_is_a_clear_error():
    loss = fastcl.nn.SigLipLoss(rank=0, world_size=2)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss(x, x, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcl.siglip_loss(x, x, 1.0, 0.0, distributed=True)


# ---------------------------------------------------------------- the module --------------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_module_with_one_process_equals_the_formula(name):
    """world_size=1: open_clip's value and gradients (scale as exp of a parameter, bias a
    parameter) for every dist_impl and cache_labels; output_dict=True gives
    {"contrastive_loss": loss}; no bias means none."""
    gen = torch.Generator().manual_seed(5)
    img, txt = _features(gen, 7, 6, "unit"), _features(gen, 7, 6, "unit")
    p0, b0 = torch.tensor(math.log(10.0), dtype=F64), torch.tensor(-10.0, dtype=F64)
    x, y, p, b = _leaf(img), _leaf(txt), _leaf(p0), _leaf(b0)
    expect = siglip_formula(x, y, p.exp(), b)
    g_expect = torch.autograd.grad(expect, [x, y, p, b])
    with fastcl.use_backend(name):
        for dist_impl in (None, "bidir", "shift", "reduce", "gather"):
            for cache_labels in (False, True):
                module = fastcl.nn.SigLipLoss(cache_labels, dist_impl=dist_impl)
                x, y, p, b = _leaf(img), _leaf(txt), _leaf(p0), _leaf(b0)
                out = module(x, y, p.exp(), b, output_dict=True)
                assert list(out) == ["contrastive_loss"]
                loss = out["contrastive_loss"]
                torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
                for g, e in zip(torch.autograd.grad(loss, [x, y, p, b]), g_expect):
                    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fastcl.nn.SigLipLoss()(img, txt, 3.0),
                                   siglip_formula(img, txt, 3.0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- op and autograd -------


@pytest.mark.parametrize("name", FUSED_CPU)
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck(name, layout):
    """torch.library.opcheck of the op pair: the forward summed (gradients formed in it) and
    per row, the backward of the per-row form, any strides; rectangular (the distributed
    form's every-rank texts) with an offset positive."""
    gen = torch.Generator().manual_seed(6)

    def make(n, d):
        x = torch.randn(n, d, generator=gen)
        return x if layout == "contiguous" else x.T.contiguous().T

    code = engine.SIGLIP.code()
    op = torch.ops.fastcl.sigmoid_pairs.default
    with fastcl.use_backend(name):
        for rows, cols, offset in ((make(10, 12), make(10, 12), 0),
                                   (make(5, 12), make(15, 12), 5)):
            scale = torch.tensor(3.0, dtype=F64)
            bias = torch.tensor(-2.0, dtype=F64)
            for reduce in (True, False):
                torch.library.opcheck(op, (rows.clone().requires_grad_(),
                                           cols.clone().requires_grad_(),
                                           scale.clone().requires_grad_(),
                                           bias.clone().requires_grad_(), code, offset, reduce,
                                           True, name))
                torch.library.opcheck(op, (rows, cols, scale, bias, code, offset, reduce, False,
                                           name))
            grad = torch.randn(2 * rows.shape[0], generator=gen)[::2]  # stride 2
            back = torch.ops.fastcl.sigmoid_pairs_backward.default
            for need in ((True, True), (True, False), (False, True)):
                torch.library.opcheck(back, (grad, rows, cols, scale, bias, code, offset, *need,
                                             name))


@pytest.mark.parametrize("name", FUSED_CPU)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_float64_across_tiles(name, reduction):
    """torch.autograd.gradcheck of siglip_loss (image, text, scale, bias) on 2-row tiles."""
    from conftest import tile_patch

    gen = torch.Generator().manual_seed(7)
    x, y = _features(gen, 5, 3, "raw").requires_grad_(), _features(gen, 5, 3, "raw")
    a = torch.tensor(1.3, dtype=F64, requires_grad=True)
    b = torch.tensor(-0.7, dtype=F64, requires_grad=True)
    with fastcl.use_backend(name), tile_patch(name, 2):
        assert torch.autograd.gradcheck(
            lambda x, y, a, b: fastcl.siglip_loss(x, y, a, b, reduction=reduction),
            (x, y.requires_grad_(), a, b))


def test_double_backward_refused_by_the_kernels_and_run_by_the_reference():
    gen = torch.Generator().manual_seed(8)
    x, y = _features(gen, 4, 3, "raw").requires_grad_(), _features(gen, 4, 3, "raw")
    a = torch.tensor(0.9, dtype=F64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=F64, requires_grad=True)
    for reduction in ("mean", "none"):
        with fastcl.use_backend("chunked"):
            loss = fastcl.siglip_loss(x, y, a, b, reduction).sum()
            with pytest.raises(RuntimeError, match="fastcl.siglip_loss"):
                torch.autograd.grad(loss, [x], create_graph=True)
    with fastcl.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda x, y, a, b: fastcl.siglip_loss(x, y, a, b),
                                            (x, y.requires_grad_(), a, b))


@pytest.mark.parametrize("name", FUSED_CPU)
def test_a_second_backward_through_the_summed_loss(name):
    """The summed loss hands the gradients its forward formed to the first backward, scaled in
    place (no second copy); a second backward through the same graph (retain_graph=True)
    recomputes them: the same gradients (to rounding), never a rescaled buffer. The per-row
    losses recompute every time."""
    gen = torch.Generator().manual_seed(13)
    img, txt = _features(gen, 9, 5, "unit"), _features(gen, 9, 5, "unit")
    x64 = _leaf(img)
    (want,) = torch.autograd.grad(siglip_formula(x64, txt, 10.0, -10.0), [x64])
    with fastcl.use_backend(name):
        for reduction in ("mean", "sum", "none"):
            x, y = _leaf(img), _leaf(txt)
            out = fastcl.siglip_loss(x, y, 10.0, -10.0, reduction)
            loss = out.sum() / (9 if reduction != "mean" else 1)
            grads = [torch.autograd.grad(loss, [x, y], retain_graph=True) for _ in range(3)]
            torch.testing.assert_close(grads[0][0], want, rtol=1e-10, atol=1e-12)
            for later in grads[1:]:
                for p, q in zip(later, grads[0]):
                    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        # And .backward() twice accumulates twice the gradient.
        x = _leaf(img)
        loss = fastcl.siglip_loss(x, txt, 10.0, -10.0)
        loss.backward(retain_graph=True)
        loss.backward()
        torch.testing.assert_close(x.grad, 2 * want, rtol=1e-10, atol=1e-12)


def test_no_grad_and_detached_inputs():
    """Under no_grad (evaluation) the value is the training value and nothing is formed for a
    backward; with detached features only the scale and bias get gradients."""
    gen = torch.Generator().manual_seed(12)
    img, txt = _features(gen, 6, 5, "unit", torch.float32), _features(gen, 6, 5, "unit",
                                                                       torch.float32)
    for name in FUSED_CPU:
        with fastcl.use_backend(name):
            with torch.no_grad():
                value = fastcl.siglip_loss(img, txt, 10.0, -10.0)
            a = torch.tensor(10.0, requires_grad=True)
            b = torch.tensor(-10.0, requires_grad=True)
            loss = fastcl.siglip_loss(img, txt, a, b)
            assert torch.equal(loss.detach(), value)
            ga, gb = torch.autograd.grad(loss, [a, b])
            x, y = _leaf(img, F64), _leaf(txt, F64)
            a64, b64 = _leaf(a, F64), _leaf(b, F64)
            ea, eb = torch.autograd.grad(siglip_formula(x, y, a64, b64), [a64, b64])
            torch.testing.assert_close(ga.double(), ea, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gb.double(), eb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FUSED_CPU)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_with_learnable_scale_and_bias(name, reduction):
    """torch.compile(fullgraph=True) of a SigLIP step with a learnable scale (exp of a
    parameter) and bias: the same loss and gradients as eager, over steps where both change,
    compiled once."""
    counter = torch._dynamo.testing.CompileCounter()

    def step(x, y, p, b):
        return fastcl.siglip_loss(x, y, p.exp(), b, reduction).sum()

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(9)
    with fastcl.use_backend(name):
        for value in (2.0, 2.5, 3.0):
            img = _features(gen, 12, 10, "unit", torch.float32)
            txt = _features(gen, 12, 10, "unit", torch.float32)
            results = []
            for fn in (compiled, step):
                x, y = _leaf(img), _leaf(txt)
                p = torch.tensor(value, requires_grad=True)
                b = torch.tensor(-value * 3, requires_grad=True)
                loss = fn(x, y, p, b)
                results.append((loss, *torch.autograd.grad(loss, [x, y, p, b])))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert counter.frame_count == 1
        inductor = torch.compile(step, fullgraph=True)
        img = _features(gen, 12, 10, "unit", torch.float32)
        txt = _features(gen, 12, 10, "unit", torch.float32)
        results = []
        for fn in (inductor, step):
            x, y = _leaf(img), _leaf(txt)
            p, b = torch.tensor(2.3, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
            loss = fn(x, y, p, b)
            results.append((loss, *torch.autograd.grad(loss, [x, y, p, b])))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ dtypes ----------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_bf16_and_fp16_give_a_float32_loss_and_mixed_dtypes_promote(name):
    gen = torch.Generator().manual_seed(10)
    img, txt = _features(gen, 8, 16, "unit"), _features(gen, 8, 16, "unit")
    with fastcl.use_backend(name):
        for dt in (torch.bfloat16, torch.float16):
            x, y = _leaf(img, dt), _leaf(txt, dt)
            b = torch.tensor(-10.0, requires_grad=True)
            loss = fastcl.siglip_loss(x, y, 10.0, b)
            gx, gy, gb = torch.autograd.grad(loss, [x, y, b])
            assert loss.dtype == torch.float32 and gx.dtype == gy.dtype == dt
            assert gb.dtype == torch.float32
            expect = siglip_formula(x.detach().double(), y.detach().double(), 10.0, -10.0)
            base = siglip_formula(x.detach().float(), y.detach().float(), 10.0, -10.0)
            assert_within_rule(loss, expect, base, torch.float32, "loss")
        x, y = _leaf(img, torch.bfloat16), _leaf(txt, torch.float32)
        loss = fastcl.siglip_loss(x, y, 10.0, -10.0)
        gx, gy = torch.autograd.grad(loss, [x, y])
        assert loss.dtype == torch.float32
        assert gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
        torch.testing.assert_close(
            loss, siglip_formula(x.detach().float(), y.detach(), 10.0, -10.0),
            rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FUSED_CPU)
def test_autocast_bf16_encoders(name):
    """Under CPU autocast (bf16 linear encoders), the loss is float32 and it and every
    gradient (encoders, scale, bias) agree with the formula on the same bf16 features,
    computed in float32."""
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(24, 16), torch.nn.Linear(20, 16)
    xi, xt = torch.randn(10, 24), torch.randn(10, 20)

    def run(loss_fn):
        p = torch.tensor(math.log(10.0), requires_grad=True)
        b = torch.tensor(-10.0, requires_grad=True)
        enc_i.zero_grad(set_to_none=True)
        enc_t.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = F.normalize(enc_i(xi), dim=-1)
            txt = F.normalize(enc_t(xt), dim=-1)
            assert img.dtype == torch.bfloat16
            loss = loss_fn(img, txt, p.exp(), b)
        loss.backward()
        return (loss, enc_i.weight.grad.clone(), enc_t.weight.grad.clone(), p.grad.clone(),
                b.grad.clone())

    def formula(img, txt, a, b):
        with torch.autocast("cpu", enabled=False):
            return siglip_formula(img.float(), txt.float(), a, b)

    with fastcl.use_backend(name):
        fast = run(fastcl.siglip_loss)
    ref = run(formula)
    assert fast[0].dtype == torch.float32
    for a, b in zip(fast, ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------ a tiny model ---------


class TinySigLip(torch.nn.Module):
    """Two linear encoders with normalized outputs, a learnable logit scale (exp of ln 10) and
    bias (-10), as open_clip's SigLIP models initialize them."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(12, 8)
        self.text = torch.nn.Linear(10, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp(), self.logit_bias)


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_training_a_tiny_model_matches_the_formula(name):
    """Five SGD steps of a tiny image-text model with fastcl's SigLipLoss and with the formula,
    from the same initialization on the same batches: the parameters (scale and bias
    included) agree after every step, and both scale and bias moved."""
    torch.manual_seed(1)
    models = [TinySigLip(), TinySigLip()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    losses = [fastcl.nn.SigLipLoss(), siglip_formula]
    gen = torch.Generator().manual_seed(2)
    with fastcl.use_backend(name):
        for step in range(5):
            images, texts = torch.randn(16, 12, generator=gen), torch.randn(16, 10, generator=gen)
            values = []
            for model, opt, loss_fn in zip(models, opts, losses):
                opt.zero_grad()
                loss = loss_fn(*model(images, texts))
                loss.backward()
                opt.step()
                values.append(loss.item())
            assert abs(values[0] - values[1]) <= 1e-5 * max(1.0, abs(values[1])), (step, values)
            for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{k}, step {step}")
    assert models[0].logit_scale.item() != math.log(10.0)
    assert models[0].logit_bias.item() != -10.0


# ------------------------------------------------------------------- distributed ---------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_one_rank_group_equals_single_process(name):
    """distributed=True on a one-rank group: the single-process values and gradients."""
    from test_dtypes import _one_rank_group

    gen = torch.Generator().manual_seed(11)
    img, txt = _features(gen, 7, 9, "unit"), _features(gen, 7, 9, "unit")
    a0, b0 = torch.tensor(12.0, dtype=F64), torch.tensor(-5.0, dtype=F64)
    with fastcl.use_backend(name), _one_rank_group():
        for reduction in ("mean", "sum", "none"):
            x, y, a, b = _leaf(img), _leaf(txt), _leaf(a0), _leaf(b0)
            got = fastcl.siglip_loss(x, y, a, b, reduction=reduction, distributed=True)
            g = torch.autograd.grad(got.sum(), [x, y, a, b])
            x, y, a, b = _leaf(img), _leaf(txt), _leaf(a0), _leaf(b0)
            expect = siglip_formula(x, y, a, b, reduction=reduction)
            ge = torch.autograd.grad(expect.sum(), [x, y, a, b])
            torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
            for p, q in zip(g, ge):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


DIST_D = 6
DIST_SCALE, DIST_BIAS = 7.5, -4.0
DIST_SHARDS = {2: {"even": [3, 3], "uneven": [4, 1]}, 3: {"even": [2, 2, 2],
                                                           "uneven": [3, 1, 2]}}
# The backend each distributed worker runs; the reference backend's results are checked too.
DIST_BACKENDS = ("chunked", "cpp")


def _dist_inputs(n):
    gen = torch.Generator().manual_seed(21)
    return _features(gen, n, DIST_D, "unit"), _features(gen, n, DIST_D, "unit")


def _params():
    return (torch.tensor(DIST_SCALE, dtype=F64, requires_grad=True),
            torch.tensor(DIST_BIAS, dtype=F64, requires_grad=True))


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    out = {}

    def record(key, fn):
        try:
            out[key] = fn()
        except Exception as exc:  # reported by the parent
            out[key] = repr(exc)

    try:
        for backend in DIST_BACKENDS:
            if not _declares(backend):
                continue
            fastcl.set_backend(backend)
            for kind, sizes in DIST_SHARDS[world].items():
                imgs, txts = _dist_inputs(sum(sizes))
                lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
                for reduction in ("mean", "sum", "none"):
                    def global_loss():
                        x, y = _leaf(imgs[lo:hi]), _leaf(txts[lo:hi])
                        a, b = _params()
                        loss = fastcl.siglip_loss(x, y, a, b, reduction, distributed=True)
                        return (loss.detach(), *torch.autograd.grad(loss.sum(), [x, y, a, b]))
                    record(f"{backend}/global/{kind}/{reduction}", global_loss)

                def local_loss():
                    module = fastcl.nn.SigLipLoss(rank=rank, world_size=world)
                    x, y = _leaf(imgs[lo:hi]), _leaf(txts[lo:hi])
                    a, b = _params()
                    loss = module(x, y, a, b, output_dict=True)["contrastive_loss"]
                    return (loss.detach(), *torch.autograd.grad(loss, [x, y, a, b]))
                record(f"{backend}/local/{kind}", local_loss)
        record("wrong_rank", lambda: fastcl.nn.SigLipLoss(
            rank=(rank + 1) % world, world_size=world)(imgs[:2], txts[:2], 1.0, 0.0))
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"siglip_dist{world}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_dist_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("backend", [b for b in DIST_BACKENDS if _declares(b)])
@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_distributed_siglip_loss_is_the_global_loss(ranks, kind, backend):
    """siglip_loss(distributed=True): every rank returns the formula over the global batch
    ("mean", "sum"; "none": its own images' rows), and its gradients are world_size x the
    single-process gradients of its shard (DDP's average then gives the single-process ones;
    the scale's and bias's averaged over ranks too). Shards even and uneven."""
    world, results = ranks
    sizes = DIST_SHARDS[world][kind]
    imgs, txts = _dist_inputs(sum(sizes))
    for reduction in ("mean", "sum", "none"):
        x, y = _leaf(imgs), _leaf(txts)
        a, b = _params()
        expect = siglip_formula(x, y, a, b, reduction)
        gx, gy, ga, gb = torch.autograd.grad(expect.sum(), [x, y, a, b])
        param_grads = []
        for rank, res in enumerate(results):
            got = res[f"{backend}/global/{kind}/{reduction}"]
            assert not isinstance(got, str), f"rank {rank} raised {got}"
            loss, dx, dy, da, db = got
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            want = expect[lo:hi] if reduction == "none" else expect
            factor = 1 if reduction == "none" else world
            torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(dx, factor * gx[lo:hi], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(dy, factor * gy[lo:hi], rtol=1e-9, atol=1e-12)
            param_grads.append((da, db))
        div = 1 if reduction == "none" else world
        torch.testing.assert_close(sum(p[0] for p in param_grads) / div, ga, rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(sum(p[1] for p in param_grads) / div, gb, rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in DIST_BACKENDS if _declares(b)])
def test_siglip_module_on_several_ranks_is_open_clips(ranks, backend):
    """SigLipLoss(rank, world_size): each rank's value is open_clip's local loss; its text
    features get the sum over ranks of every rank's loss gradient (open_clip's exchanges), its
    images their own rank's, and the scale and bias their own rank's term."""
    world, results = ranks
    n = DIST_SHARDS[world]["even"][0]
    imgs, txts = _dist_inputs(n * world)
    x, y = _leaf(imgs), _leaf(txts)
    a_fixed, b_fixed = (torch.tensor(v, dtype=F64) for v in (DIST_SCALE, DIST_BIAS))
    per_rank = [open_clip_rank_loss(x, y, a_fixed, b_fixed, r, n) for r in range(world)]
    gx, gy = torch.autograd.grad(sum(per_rank), [x, y])
    for rank, res in enumerate(results):
        got = res[f"{backend}/local/even"]
        assert not isinstance(got, str), f"rank {rank} raised {got}"
        loss, dx, dy, da, db = got
        a, b = _params()
        own = open_clip_rank_loss(imgs, txts, a, b, rank, n)
        ga, gb = torch.autograd.grad(own, [a, b])
        torch.testing.assert_close(loss, per_rank[rank].detach(), rtol=1e-10, atol=1e-12)
        lo = rank * n
        torch.testing.assert_close(dx, gx[lo:lo + n], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dy, gy[lo:lo + n], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(da, ga, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(db, gb, rtol=1e-9, atol=1e-12)


def test_siglip_module_refuses_unequal_shards_and_a_wrong_rank(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        for backend in DIST_BACKENDS:
            if _declares(backend):
                got = res[f"{backend}/local/uneven"]
                assert isinstance(got, str) and "same batch size on every rank" in got, got
        assert isinstance(res["wrong_rank"], str) and "process group" in res["wrong_rank"]

