"""fastcl.clip_loss and fastcl.nn.ClipLoss (issue 14) against open_clip's ClipLoss formula.

The formula is written out here in float64, as open_clip computes it: logits = scale * image @
text^T (+ bias), loss = (CE(logits, arange) + CE(logits^T, arange)) / 2, features as given.
Values and the gradients of image, text, scale and bias are checked over hypothesis shapes (N
from 1, D not a power of two, unnormalized features) on every backend: a backend whose
declaration (``engine.BACKENDS``) includes the both-directions epilogue must agree; one that
does not must refuse with ``NotImplementedError`` naming it, so that a backend picks these tests
up as soon as it declares the epilogue. The distributed forms run on 2 and 3 gloo ranks
against the same formula applied to the global batch (``clip_loss(distributed=True)``) and per
rank (``ClipLoss(local_loss=True, gather_with_grad=True)``, open_clip's semantics).
"""
from __future__ import annotations

import contextlib
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
from fastcl import engine, ops, reference
from tolerances import assert_within_rule, max_err

F64 = torch.float64
TIGHT = 1e-10  # float64, relative to max(1, |formula|)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


# ------------------------------------------------------------------- the formula ----------


def clip_formula(image, text, scale, bias=None, reduction="mean"):
    """open_clip's ClipLoss, written out: logits = scale * image @ text^T (+ bias), labels
    arange(N), (CE(logits, labels) + CE(logits^T, labels)) / 2 (``"none"``: per pair)."""
    logits = scale * image @ text.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels, reduction="none")
            + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def open_clip_rank_loss(images, texts, scale, rank, n):
    """open_clip's ClipLoss(local_loss=True, gather_with_grad=True) on ``rank`` (n pairs per
    rank): its own rows against every rank's gathered columns, labels offset by rank, both
    directions, mean over the local rows."""
    lo = rank * n
    img, txt = images[lo:lo + n], texts[lo:lo + n]
    labels = torch.arange(n) + lo
    logits_per_image = scale * img @ texts.T
    logits_per_text = scale * txt @ images.T
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


# ------------------------------------------------------------------------ backends --------


def _all_backends():
    try:
        from conftest import BACKENDS, Backend
    except ImportError:  # a distributed worker whose sys.path finds another conftest first
        return []
    return BACKENDS + [Backend("reference", "cpu")]


ALL_BACKENDS = _all_backends()


@pytest.fixture(params=ALL_BACKENDS, ids=repr)
def any_backend(request):
    """Every fastcl backend (the conftest's, plus the reference), forced for the test."""
    with fastcl.use_backend(request.param.name):
        yield request.param


def _declares(name: str) -> bool:
    return engine.BACKENDS[name].unsupported(engine.CLIP) is None


# The full-speed CPU backends that declare the epilogue (chunked today; cpp once it does).
FUSED_CPU = [name for name in ("cpp", "chunked") if _declares(name)]


def _tiling(backend, data):
    """Drawn tile edges on the tiled CPU backends, so small batches cross tile boundaries."""
    from conftest import CPU_BACKENDS, kernel_module, tile_patch

    if backend.name not in CPU_BACKENDS:
        return contextlib.nullcontext()
    tile = data.draw(st.sampled_from([kernel_module(backend.name)._TILE, 3, 7, 16]),
                     label="tile")
    return tile_patch(backend.name, tile)


def _features(gen, n, d, kind, dtype=F64, device="cpu"):
    """(n, d) features: ``"near-unit"`` (normalized, then norms spread over [e^-0.5, 1]: what
    a CLIP model gives, not exactly normalized; logits stay within the scale) or ``"raw"``
    (Gaussian, norms ~ sqrt(d))."""
    x = torch.randn(n, d, generator=gen, dtype=F64)
    if kind == "near-unit":
        x = F.normalize(x, dim=1) * torch.exp(-0.5 * torch.rand(n, 1, generator=gen,
                                                                dtype=F64))
    return x.to(dtype).to(device)


def _draw_case(data, small):
    n = data.draw(st.one_of(st.sampled_from([1, 2, 3, 7, 16, 17]),
                            st.integers(1, 16 if small else 40)), label="n")
    d = data.draw(st.one_of(st.sampled_from([1, 3, 5, 17, 33] if small else
                                            [1, 3, 5, 31, 33, 65, 100]),
                            st.integers(1, 40 if small else 100)), label="d")
    kind = data.draw(st.sampled_from(["near-unit", "raw"]), label="features")
    # A CLIP scale runs from 1 to 100 (open_clip clamps at 100) on near-unit features; raw
    # Gaussian features have dot products ~ sqrt(d) and get a smaller one (logits within
    # ~100: the float32 rule's regime, as the normalizing losses' at tau >= 0.01).
    scale = data.draw(st.floats(0.5, 100.0) if kind == "near-unit" else
                      st.floats(0.05, 1.0), label="scale")
    return n, d, kind, scale


def _leaf(x, dtype=None):
    x = x.detach().clone() if dtype is None else x.detach().to(dtype)
    return x.requires_grad_()


# --------------------------------------------------------------- values and gradients -----


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
@given(data=st.data(), seed=SEEDS)
def test_values_and_gradients_match_open_clips_formula(any_backend, scale_kind, reduction,
                                                       data, seed):
    """clip_loss = the formula in float64: values and the gradients of image, text, a tensor
    scale and a bias, float32 within the suite's rule (twice eager float32's error) and float64
    to 1e-10; or the refusal the registry declares."""
    backend = any_backend
    small = backend.name == "triton" and backend.device.type == "cpu"
    n, d, kind, scale = _draw_case(data, small)
    dtype = torch.float32 if backend.name == "triton" else data.draw(
        st.sampled_from([torch.float32, F64]), label="dtype")
    gen = torch.Generator().manual_seed(seed)
    img = _features(gen, n, d, kind, dtype, backend.device)
    txt = _features(gen, n, d, kind, dtype, backend.device)
    bias = torch.tensor(-3.0, dtype=dtype, device=backend.device)
    cot = torch.randn(n, generator=gen, dtype=F64) if reduction == "none" else torch.tensor(
        1.0, dtype=F64)

    def run(fn, dt):
        x, y, b = _leaf(img, dt), _leaf(txt, dt), _leaf(bias, dt)
        # A tensor scale in the inputs' dtype; the formula gets the very same value.
        a = _leaf(torch.tensor(scale, dtype=dtype, device=backend.device), dt) \
            if scale_kind == "tensor" else scale
        out = fn(x, y, a, b)
        wanted = [x, y, b] + ([a] if scale_kind == "tensor" else [])
        return out, torch.autograd.grad(out, wanted, cot.to(out.dtype).to(out.device))

    def fast(x, y, a, b):
        return fastcl.clip_loss(x, y, a, b, reduction)

    if not _declares(backend.name):
        with pytest.raises(NotImplementedError, match="softmax_rows_cols"):
            run(fast, dtype)
        return
    with _tiling(backend, data):
        out, g_fast = run(fast, dtype)
    oracle, g_ora = run(lambda x, y, a, b: clip_formula(x, y, a, b, reduction), F64)
    acc = F64 if dtype == F64 else torch.float32
    assert out.dtype == acc and out.device == img.device
    assert out.shape == (() if reduction != "none" else (n,))
    names = ["image", "text", "bias", "scale"]
    # The bias's gradient: zero for both, up to rounding in the formula's autograd.
    assert g_fast[2].dtype == dtype and torch.all(g_fast[2] == 0)
    assert abs(g_ora[2].item()) <= 1e-9 * max(1.0, cot.abs().sum().item())
    if dtype == F64:
        for what, a, b in [("loss", out, oracle)] + [
                (names[i], g_fast[i], g_ora[i]) for i in (0, 1, 3) if i < len(g_fast)]:
            bound = TIGHT * max(1.0, b.detach().abs().max().item())
            assert max_err(a, b) <= bound, f"{what}: error {max_err(a, b):.3g}"
        return
    base, g_base = run(lambda x, y, a, b: clip_formula(x, y, a, b, reduction), torch.float32)
    assert_within_rule(out, oracle, base, acc, "loss")
    for i in (0, 1, 3):
        if i >= len(g_fast):
            continue
        assert g_fast[i].dtype == torch.float32
        floor = 0.0
        if i == 3:
            # d loss / d scale sums (p - y) * raw dots over N^2 pairs: the float32 rounding
            # of each dot (~eps |x| |y|) weighted by the cotangent, which no float32
            # implementation avoids.
            norms = img.double().norm(dim=1).max() * txt.double().norm(dim=1).max()
            floor = 4 * torch.finfo(torch.float32).eps * norms.item() * cot.abs().sum().item()
        assert_within_rule(g_fast[i], g_ora[i], g_base[i], acc, f"gradient of {names[i]}",
                           floor)


def test_formula_is_open_clips_clip_loss():
    """The formula above is open_clip's ClipLoss.forward, line for line (world_size=1), on a
    case worked by hand: two pairs, scale 2, features e1, e2 (images) and e1, -e2 (texts)."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    txt = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64)
    # logits [[2, 0], [0, -2]]: row 0: log(1 + e^-2); row 1: log(1 + e^2) (its positive is -2
    # against 0); columns the same (the matrix is symmetric).
    expect = (math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2
    assert abs(clip_formula(img, txt, 2.0).item() - expect) < 1e-15
    for name in ("reference", "chunked"):
        with fastcl.use_backend(name):
            assert abs(fastcl.clip_loss(img, txt, 2.0).item() - expect) < 1e-15


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_reduction_none_is_the_mean_of_both_directions(name):
    """reduction="none" gives (l_image_i + l_text_i) / 2: each direction's cross-entropy is
    recovered from two calls (features swapped exchange the directions)."""
    gen = torch.Generator().manual_seed(3)
    img, txt = _features(gen, 9, 7, "raw"), _features(gen, 9, 7, "raw")
    logits = 0.7 * img @ txt.T
    labels = torch.arange(9)
    l_img = F.cross_entropy(logits, labels, reduction="none")
    l_txt = F.cross_entropy(logits.T, labels, reduction="none")
    with fastcl.use_backend(name):
        got = fastcl.clip_loss(img, txt, 0.7, reduction="none")
        torch.testing.assert_close(got, (l_img + l_txt) / 2, rtol=1e-12, atol=1e-12)
        both = engine.run(engine.CLIP, img, txt, scale=0.7)
    torch.testing.assert_close(both, torch.cat([l_img, l_txt]), rtol=1e-12, atol=1e-12)


def test_the_backends_that_declare_the_epilogue():
    """The reference and chunked backends run the both-directions epilogue; a backend whose
    declaration lacks it refuses it naming the choice (its tests above check the refusal)."""
    assert _declares("reference") and _declares("chunked")
    for name in engine.BACKENDS:
        missing = engine.BACKENDS[name].unsupported(engine.CLIP)
        assert missing is None or "softmax_rows_cols" in missing


# ------------------------------------------------------------------------- the bias -------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_bias_cancels_and_keeps_nan_and_inf(name):
    """A bias changes neither the value nor another gradient; its gradient is a zero tensor;
    a NaN or infinite bias gives a NaN loss, as open_clip's logits do; a float bias works."""
    gen = torch.Generator().manual_seed(4)
    img, txt = _features(gen, 6, 5, "near-unit", torch.float32), _features(
        gen, 6, 5, "near-unit", torch.float32)
    with fastcl.use_backend(name):
        plain = fastcl.clip_loss(img, txt, 10.0)
        b = torch.tensor(-10.0, requires_grad=True)
        with_bias = fastcl.clip_loss(img, txt, 10.0, b)
        (gb,) = torch.autograd.grad(with_bias, [b])
        assert torch.equal(with_bias, plain) and gb.item() == 0.0 and gb.dtype == b.dtype
        assert torch.equal(fastcl.clip_loss(img, txt, 10.0, -10.0), plain)
        for bad in (float("nan"), float("inf")):
            assert torch.isnan(fastcl.clip_loss(img, txt, 10.0, bad))
            assert torch.isnan(fastcl.clip_loss(img, txt, 10.0, torch.tensor(bad)))
            assert torch.isnan(clip_formula(img.double(), txt.double(), 10.0, bad))
        # An upstream NaN reaches the bias's gradient too (it is in the graph).
        b = torch.tensor(1.0, requires_grad=True)
        loss = fastcl.clip_loss(img, txt, 10.0, b, reduction="none")
        (gb,) = torch.autograd.grad(loss, [b], torch.full_like(loss, float("nan")))
        assert torch.isnan(gb)


# ---------------------------------------------------------------------- bad input ---------


def test_bad_arguments_name_themselves():
    x = torch.randn(4, 8)
    cases = [
        (lambda: fastcl.clip_loss(x.numpy(), x, 1.0), TypeError, "image_features"),
        (lambda: fastcl.clip_loss(x, x.long(), 1.0), TypeError, "text_features"),
        (lambda: fastcl.clip_loss(x[0], x, 1.0), ValueError, "image_features must be 2-dim"),
        (lambda: fastcl.clip_loss(x, x[None], 1.0), ValueError, "text_features must be 2-dim"),
        (lambda: fastcl.clip_loss(x[:0], x[:0], 1.0), ValueError, "image_features is an empty"),
        (lambda: fastcl.clip_loss(x, x[:, :5], 1.0), ValueError,
         "text_features has 5 features but image_features has 8"),
        (lambda: fastcl.clip_loss(x, x[:3], 1.0), ValueError, "same number of pairs"),
        (lambda: fastcl.clip_loss(x, x, 0.0), ValueError, "logit_scale must be finite and > 0"),
        (lambda: fastcl.clip_loss(x, x, -1.0), ValueError, "logit_scale"),
        (lambda: fastcl.clip_loss(x, x, float("nan")), ValueError, "logit_scale"),
        (lambda: fastcl.clip_loss(x, x, float("inf")), ValueError, "logit_scale"),
        (lambda: fastcl.clip_loss(x, x, torch.tensor(-2.0)), ValueError, "logit_scale"),
        (lambda: fastcl.clip_loss(x, x, torch.ones(2)), TypeError, "logit_scale"),
        (lambda: fastcl.clip_loss(x, x, "10"), TypeError, "logit_scale"),
        (lambda: fastcl.clip_loss(x, x, 1.0, torch.ones(2)), TypeError, "logit_bias"),
        (lambda: fastcl.clip_loss(x, x, 1.0, "0"), TypeError, "logit_bias"),
        (lambda: fastcl.clip_loss(x, x, 1.0, reduction="avg"), ValueError, "reduction"),
        (lambda: fastcl.nn.ClipLoss(use_horovod=True), ValueError, "use_horovod"),
        (lambda: fastcl.nn.ClipLoss(rank=2, world_size=2), ValueError, "rank"),
        (lambda: fastcl.nn.ClipLoss(world_size=0), ValueError, "world_size"),
        (lambda: fastcl.nn.ClipLoss(local_loss=True, world_size=2), ValueError,
         "supports local_loss=True, gather_with_grad=True only"),
        (lambda: fastcl.nn.ClipLoss(gather_with_grad=True, world_size=4), ValueError,
         "supports local_loss=True, gather_with_grad=True only"),
    ]
    if torch.cuda.is_available():
        cases.append((lambda: fastcl.clip_loss(x, x.cuda(), 1.0), ValueError, "text_features"))
    for call, error, words in cases:
        with pytest.raises(error, match=re.escape(words)):
            call()


def test_several_ranks_without_a_process_group_is_a_clear_error():
    loss = fastcl.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=2)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss(x, x, 1.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcl.clip_loss(x, x, 1.0, distributed=True)


# ---------------------------------------------------------------- the module --------------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_module_with_one_process_equals_the_formula_for_any_flags(name):
    """world_size=1: every flag combination gives open_clip's value and gradients;
    output_dict=True gives {"contrastive_loss": loss}."""
    gen = torch.Generator().manual_seed(5)
    img, txt = _features(gen, 7, 6, "near-unit"), _features(gen, 7, 6, "near-unit")
    a0 = torch.tensor(math.log(1 / 0.07), dtype=F64)
    x, y, a = _leaf(img), _leaf(txt), _leaf(a0)
    expect = clip_formula(x, y, a.exp())
    g_expect = torch.autograd.grad(expect, [x, y, a])
    with fastcl.use_backend(name):
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                for cache_labels in (False, True):
                    module = fastcl.nn.ClipLoss(local_loss, gather_with_grad, cache_labels)
                    x, y, a = _leaf(img), _leaf(txt), _leaf(a0)
                    out = module(x, y, a.exp(), output_dict=True)
                    assert list(out) == ["contrastive_loss"]
                    loss = out["contrastive_loss"]
                    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
                    for g, e in zip(torch.autograd.grad(loss, [x, y, a]), g_expect):
                        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
                    assert torch.equal(module(img, txt, 14.0, torch.tensor(-1.0)),
                                       fastcl.clip_loss(img, txt, 14.0))


# ------------------------------------------------------------------- op and autograd -------


@pytest.mark.parametrize("name", FUSED_CPU)
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck_both_directions(name, layout):
    """torch.library.opcheck of the op pair on the CLIP spec: the forward (2n statistics, with
    and without dscale) and the backward (a 2n upstream gradient), any strides."""
    gen = torch.Generator().manual_seed(6)

    def make(n, d):
        x = torch.randn(n, d, generator=gen)
        return x if layout == "contiguous" else x.T.contiguous().T

    rows, cols = make(10, 12), make(10, 12)
    scale = torch.tensor(3.0, dtype=F64)
    code = engine.CLIP.code()
    op = torch.ops.fastcl.softmax_rows.default
    with fastcl.use_backend(name):
        torch.library.opcheck(op, (rows.requires_grad_(), cols.requires_grad_(), None, None,
                                   scale.clone().requires_grad_(), code, False, True, name))
        torch.library.opcheck(op, (rows, cols, None, None, scale, code, False, False, name))
        loss, lse, dscale, *_ = ops.softmax_rows(rows.detach(), cols.detach(), None, None,
                                                 scale, code, False, True, name)
        assert loss.shape == lse.shape == dscale.shape == (20,)
        grad = torch.randn(40, generator=gen)[::2]  # stride 2
        back = torch.ops.fastcl.softmax_rows_backward.default
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(back, (grad, rows.detach(), cols.detach(), None, None, loss,
                                         lse, scale, None, code, *need, False, False, name))


@pytest.mark.parametrize("name", FUSED_CPU)
def test_gradcheck_float64_across_tiles(name):
    """torch.autograd.gradcheck of clip_loss (image, text, scale) on 2-row tiles."""
    from conftest import tile_patch

    gen = torch.Generator().manual_seed(7)
    x, y = _features(gen, 5, 3, "raw").requires_grad_(), _features(gen, 5, 3, "raw")
    a = torch.tensor(1.3, dtype=F64, requires_grad=True)
    with fastcl.use_backend(name), tile_patch(name, 2):
        assert torch.autograd.gradcheck(
            lambda x, y, a: fastcl.clip_loss(x, y, a, reduction="none"),
            (x, y.requires_grad_(), a))


def test_double_backward_refused_by_the_kernels_and_run_by_the_reference():
    gen = torch.Generator().manual_seed(8)
    x, y = _features(gen, 4, 3, "raw").requires_grad_(), _features(gen, 4, 3, "raw")
    a = torch.tensor(0.9, dtype=F64, requires_grad=True)
    with fastcl.use_backend("chunked"):
        loss = fastcl.clip_loss(x, y, a)
        with pytest.raises(RuntimeError, match="fastcl.clip_loss"):
            torch.autograd.grad(loss, [x], create_graph=True)
    with fastcl.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda x, y, a: fastcl.clip_loss(x, y, a),
                                            (x, y.requires_grad_(), a))


@pytest.mark.parametrize("name", FUSED_CPU)
def test_compile_fullgraph_with_a_learnable_scale(name):
    """torch.compile(fullgraph=True) of a CLIP step with a learnable logit scale (exp of a
    parameter): the same loss and gradients as eager, over steps where the scale changes,
    compiled once."""
    counter = torch._dynamo.testing.CompileCounter()

    def step(x, y, p):
        return fastcl.clip_loss(x, y, p.exp())

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(9)
    with fastcl.use_backend(name):
        for value in (2.0, 2.5, 3.0):
            img = _features(gen, 12, 10, "near-unit", torch.float32)
            txt = _features(gen, 12, 10, "near-unit", torch.float32)
            results = []
            for fn in (compiled, step):
                x, y, p = _leaf(img), _leaf(txt), torch.tensor(value, requires_grad=True)
                loss = fn(x, y, p)
                results.append((loss, *torch.autograd.grad(loss, [x, y, p])))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert counter.frame_count == 1
        # And through inductor (its exp of the parameter may round the scale differently).
        inductor = torch.compile(step, fullgraph=True)
        for value in (2.0, 4.0):
            img = _features(gen, 12, 10, "near-unit", torch.float32)
            txt = _features(gen, 12, 10, "near-unit", torch.float32)
            results = []
            for fn in (inductor, step):
                x, y, p = _leaf(img), _leaf(txt), torch.tensor(value, requires_grad=True)
                loss = fn(x, y, p)
                results.append((loss, *torch.autograd.grad(loss, [x, y, p])))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ dtypes ----------


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_bf16_and_fp16_give_a_float32_loss_and_mixed_dtypes_promote(name):
    gen = torch.Generator().manual_seed(10)
    img, txt = _features(gen, 8, 16, "near-unit"), _features(gen, 8, 16, "near-unit")
    with fastcl.use_backend(name):
        for dt in (torch.bfloat16, torch.float16):
            x, y = _leaf(img, dt), _leaf(txt, dt)
            loss = fastcl.clip_loss(x, y, 20.0)
            gx, gy = torch.autograd.grad(loss, [x, y])
            assert loss.dtype == torch.float32 and gx.dtype == gy.dtype == dt
            expect = clip_formula(x.detach().double(), y.detach().double(), 20.0)
            base = clip_formula(x.detach().float(), y.detach().float(), 20.0)
            assert_within_rule(loss, expect, base, torch.float32, "loss")
        x, y = _leaf(img, torch.bfloat16), _leaf(txt, torch.float32)
        loss = fastcl.clip_loss(x, y, 20.0)
        gx, gy = torch.autograd.grad(loss, [x, y])
        assert loss.dtype == torch.float32
        assert gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
        torch.testing.assert_close(loss, clip_formula(x.detach().float(), y.detach(), 20.0),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FUSED_CPU)
def test_autocast_bf16_encoders(name):
    """Under CPU autocast (bf16 linear encoders), the loss is float32 and it and every
    gradient (encoders and scale) agree with the formula on the same bf16 features, computed
    in float32 (the fused ops run with autocast off; the reference backend, a debugging
    oracle, would run its products under autocast)."""
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(24, 16), torch.nn.Linear(20, 16)
    xi, xt = torch.randn(10, 24), torch.randn(10, 20)

    def run(loss_fn):
        p = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        enc_i.zero_grad(set_to_none=True)
        enc_t.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = F.normalize(enc_i(xi), dim=-1)
            txt = F.normalize(enc_t(xt), dim=-1)
            assert img.dtype == torch.bfloat16
            loss = loss_fn(img, txt, p.exp())
        loss.backward()
        return loss, enc_i.weight.grad.clone(), enc_t.weight.grad.clone(), p.grad.clone()

    def formula(img, txt, a):
        with torch.autocast("cpu", enabled=False):
            return clip_formula(img.float(), txt.float(), a)

    with fastcl.use_backend(name):
        fast = run(fastcl.clip_loss)
    ref = run(formula)
    assert fast[0].dtype == torch.float32
    for a, b in zip(fast, ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------ a tiny model ---------


class TinyClip(torch.nn.Module):
    """Two linear encoders with normalized outputs and a learnable logit scale, as open_clip's
    CLIP model returns them (features normalized, scale = exp of the parameter)."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(12, 8)
        self.text = torch.nn.Linear(10, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp())


@pytest.mark.parametrize("name", ["reference"] + FUSED_CPU)
def test_training_a_tiny_model_matches_the_formula(name):
    """Five SGD steps of a tiny image-text model with fastcl's ClipLoss and with the formula,
    from the same initialization on the same batches (the scale clamped in the loop, as
    open_clip's training loop does): the parameters agree after every step."""
    torch.manual_seed(1)
    models = [TinyClip(), TinyClip()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    losses = [fastcl.nn.ClipLoss(), lambda i, t, s: clip_formula(i, t, s)]
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
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                values.append(loss.item())
            assert abs(values[0] - values[1]) <= 1e-5 * max(1.0, abs(values[1])), (step, values)
            for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{k}, step {step}")
    assert models[0].logit_scale.item() != math.log(1 / 0.07)  # the scale learned


# ------------------------------------------------------------------- distributed ---------


@pytest.mark.parametrize("name", ["reference", "chunked", "cpp"])
def test_one_rank_group_equals_single_process(name):
    """distributed=True on a one-rank group (and ClipLoss with world_size 1): the
    single-process values and gradients, on every backend (the distributed form runs the
    one-direction spec, which every backend declares)."""
    from test_dtypes import _one_rank_group

    gen = torch.Generator().manual_seed(11)
    img, txt = _features(gen, 7, 9, "near-unit"), _features(gen, 7, 9, "near-unit")
    a0 = torch.tensor(12.0, dtype=F64)
    with fastcl.use_backend(name), _one_rank_group():
        for reduction in ("mean", "sum", "none"):
            x, y, a = _leaf(img), _leaf(txt), _leaf(a0)
            got = fastcl.clip_loss(x, y, a, reduction=reduction, distributed=True)
            g = torch.autograd.grad(got.sum(), [x, y, a])
            x, y, a = _leaf(img), _leaf(txt), _leaf(a0)
            expect = clip_formula(x, y, a, reduction=reduction)
            ge = torch.autograd.grad(expect.sum(), [x, y, a])
            torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
            for p, q in zip(g, ge):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


DIST_D = 6
DIST_SCALE = 7.5
DIST_SHARDS = {2: {"even": [3, 3], "uneven": [4, 1]}, 3: {"even": [2, 2, 2],
                                                           "uneven": [3, 1, 2]}}


def _dist_inputs(n):
    gen = torch.Generator().manual_seed(21)
    return _features(gen, n, DIST_D, "near-unit"), _features(gen, n, DIST_D, "near-unit")


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    fastcl.set_backend("chunked")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    out = {}

    def record(key, fn):
        try:
            out[key] = fn()
        except Exception as exc:  # reported by the parent
            out[key] = repr(exc)

    try:
        for kind, sizes in DIST_SHARDS[world].items():
            imgs, txts = _dist_inputs(sum(sizes))
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            for reduction in ("mean", "sum", "none"):
                def global_loss():
                    x, y = _leaf(imgs[lo:hi]), _leaf(txts[lo:hi])
                    a = torch.tensor(DIST_SCALE, dtype=F64, requires_grad=True)
                    loss = fastcl.clip_loss(x, y, a, torch.tensor(-2.0), reduction,
                                            distributed=True)
                    return (loss.detach(), *torch.autograd.grad(loss.sum(), [x, y, a]))
                record(f"global/{kind}/{reduction}", global_loss)

            def local_loss():
                module = fastcl.nn.ClipLoss(local_loss=True, gather_with_grad=True,
                                            rank=rank, world_size=world)
                x, y = _leaf(imgs[lo:hi]), _leaf(txts[lo:hi])
                a = torch.tensor(DIST_SCALE, dtype=F64, requires_grad=True)
                loss = module(x, y, a, output_dict=True)["contrastive_loss"]
                return (loss.detach(), *torch.autograd.grad(loss, [x, y, a]))
            record(f"local/{kind}", local_loss)
        record("wrong_rank", lambda: fastcl.nn.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=(rank + 1) % world,
            world_size=world)(imgs[:2], txts[:2], 1.0))
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"clip_dist{world}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_dist_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_distributed_clip_loss_is_the_global_loss(ranks, kind):
    """clip_loss(distributed=True): every rank returns the formula over the global batch
    ("mean", "sum"; "none": its own pairs), and its gradients are world_size x the
    single-process gradients of its shard (DDP's average then gives the single-process
    ones; the scale's averaged over ranks too). Shards even and uneven."""
    world, results = ranks
    sizes = DIST_SHARDS[world][kind]
    imgs, txts = _dist_inputs(sum(sizes))
    for reduction in ("mean", "sum", "none"):
        x, y, a = _leaf(imgs), _leaf(txts), _leaf(torch.tensor(DIST_SCALE, dtype=F64))
        expect = clip_formula(x, y, a, -2.0, reduction)
        gx, gy, ga = torch.autograd.grad(expect.sum(), [x, y, a])
        scale_grads = []
        for rank, res in enumerate(results):
            got = res[f"global/{kind}/{reduction}"]
            assert not isinstance(got, str), f"rank {rank} raised {got}"
            loss, dx, dy, da = got
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            want = expect[lo:hi] if reduction == "none" else expect
            factor = 1 if reduction == "none" else world
            torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(dx, factor * gx[lo:hi], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(dy, factor * gy[lo:hi], rtol=1e-9, atol=1e-12)
            scale_grads.append(da)
        total = sum(scale_grads) / (1 if reduction == "none" else world)
        torch.testing.assert_close(total, ga, rtol=1e-9, atol=1e-12)


def test_clip_loss_module_on_several_ranks_is_open_clips(ranks):
    """ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size): each rank's value is
    open_clip's local loss; its features get the sum over ranks of every rank's loss gradient
    (open_clip's gather backward), the scale its own rank's term."""
    world, results = ranks
    n = DIST_SHARDS[world]["even"][0]
    imgs, txts = _dist_inputs(n * world)
    x, y = _leaf(imgs), _leaf(txts)
    per_rank = [open_clip_rank_loss(x, y, torch.tensor(DIST_SCALE, dtype=F64), r, n)
                for r in range(world)]
    gx, gy = torch.autograd.grad(sum(per_rank), [x, y])
    for rank, res in enumerate(results):
        got = res["local/even"]
        assert not isinstance(got, str), f"rank {rank} raised {got}"
        loss, dx, dy, da = got
        a = _leaf(torch.tensor(DIST_SCALE, dtype=F64))
        own = open_clip_rank_loss(imgs, txts, a, rank, n)
        (ga,) = torch.autograd.grad(own, [a])
        torch.testing.assert_close(loss, per_rank[rank].detach(), rtol=1e-10, atol=1e-12)
        lo = rank * n
        torch.testing.assert_close(dx, gx[lo:lo + n], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dy, gy[lo:lo + n], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(da, ga, rtol=1e-9, atol=1e-12)


def test_clip_loss_module_refuses_unequal_shards_and_a_wrong_rank(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        assert isinstance(res["local/uneven"], str) and "same batch size on every rank" in \
            res["local/uneven"], res["local/uneven"]
        assert isinstance(res["wrong_rank"], str) and "process group" in res["wrong_rank"]
