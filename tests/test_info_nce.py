"""Property tests for ``fastcl.info_nce`` in its three negative modes, on every backend.

- ``None``: in-batch, logits q @ k^T, label i (fused op, N x N tiles);
- ``(M, D)`` unpaired: logits [q_i . k_i, q_i . neg_j], label 0 (fused op, positive as the
  "extra" logit);
- ``(N, M, D)`` paired: plain PyTorch bmm path.

The oracle is ``fastcl.reference.info_nce`` in float64; values and gradients (wrt query,
positive_key and negative_keys, whichever require grad) must obey the flash-attention rule
against eager PyTorch from the same inputs with float32 logits (``tolerances.eager_info_nce``,
info-nce-pytorch's formula). Helpers shared with the NT-Xent tests live in ``test_nt_xent``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcl
from fastcl import reference
from conftest import CPU_BACKENDS, kernel_module, tile_patch
from test_nt_xent import (
    REDUCTIONS,
    SEEDS,
    TEMPERATURES,
    _tiling,
    _dims,
    _randn,
    assert_same_as_contiguous,
    check_against_oracle,
)
from tolerances import eager_info_nce, max_err

MODES = ("inbatch", "unpaired", "paired")


def _queries(backend, data, label="n"):
    """N query rows: across the 32-row tiles on the interpreter."""
    if backend.small:
        return data.draw(
            st.one_of(st.sampled_from([1, 2, 31, 32, 33, 40]), st.integers(1, 40)), label=label
        )
    return data.draw(
        st.one_of(st.sampled_from([1, 2, 31, 32, 33, 64, 65]), st.integers(1, 130)), label=label
    )


def _negatives(backend, data, mode, label="m"):
    """M negatives: unpaired across 32/64 columns (+1 for the positive); paired a few."""
    if mode == "paired":
        return data.draw(st.integers(1, 12 if backend.small else 40), label=label)
    if backend.small:
        return data.draw(
            st.one_of(st.sampled_from([1, 31, 32, 33, 63, 64, 65, 70]), st.integers(1, 70)),
            label=label,
        )
    return data.draw(
        st.one_of(st.sampled_from([1, 31, 32, 33, 63, 64, 65, 200]), st.integers(1, 200)),
        label=label,
    )


def _make_inputs(gen, mode, n, m, d, dtype, device):
    q = _randn(gen, (n, d), dtype, device)
    k = _randn(gen, (n, d), dtype, device)
    if mode == "inbatch":
        return [q, k]
    shape = (m, d) if mode == "unpaired" else (n, m, d)
    return [q, k, _randn(gen, shape, dtype, device)]


def _fns(mode, temperature, reduction):
    """fastcl, float64-oracle and eager functions of (q, k[, neg]) for one mode."""
    nm = "paired" if mode == "paired" else "unpaired"

    def call(fn):
        def f(q, k, neg=None):
            return fn(q, k, neg, temperature, reduction, negative_mode=nm)
        return f

    return call(fastcl.info_nce), call(reference.info_nce), call(eager_info_nce)


# ------------------------------------------------------------------------ properties ------


@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES), temperature=TEMPERATURES,
       reduction=st.sampled_from(REDUCTIONS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_matches_reference_values_and_grads(backend, data, seed, mode, temperature, reduction,
                                            dtype):
    """Loss and gradients wrt query, positive_key and negative_keys (each drawn to require grad
    or not, e.g. a detached MoCo queue) match the float64 reference within the flash-attention
    rule: all three modes, N and M across tile boundaries, odd/large D, tau 0.01..2, all
    reductions, fp32/bf16/fp16."""
    n, d = _queries(backend, data), _dims(backend, data)
    m = _negatives(backend, data, mode)
    gen = torch.Generator().manual_seed(seed)
    tensors = _make_inputs(gen, mode, n, m, d, dtype, backend.device)
    needs = tuple(data.draw(st.booleans(), label=f"needs_grad{i}") for i in range(len(tensors)))
    fast, oracle, eager = _fns(mode, temperature, reduction)
    with _tiling(backend, data):
        check_against_oracle(fast, oracle, eager, tensors, needs, dtype, gen)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES), temperature=TEMPERATURES,
       reduction=st.sampled_from(REDUCTIONS))
def test_float64_matches_info_nce_pytorch(name, data, seed, mode, temperature, reduction):
    """In float64 on the C++ and chunked backends, fastcl.info_nce equals info-nce-pytorch's
    formula (``eager_info_nce`` in float64) and the reference to ~1e-10, values and gradients
    wrt every input, in all three negative modes; the result is float64."""
    n = data.draw(st.integers(1, 100), label="n")
    d = data.draw(st.integers(1, 100), label="d")
    m = data.draw(st.integers(1, 30 if mode == "paired" else 150), label="m")
    tile = data.draw(st.sampled_from([kernel_module(name)._TILE, 3, 50]), label="tile")
    gen = torch.Generator().manual_seed(seed)
    tensors = [t.requires_grad_() for t in
               _make_inputs(gen, mode, n, m, d, torch.float64, "cpu")]
    fast, oracle, eager = _fns(mode, temperature, reduction)
    with fastcl.use_backend(name), tile_patch(name, tile):
        out = fast(*tensors)
        cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        g = torch.autograd.grad(out, tensors, cot)
    assert out.dtype == torch.float64
    for peer in (eager, oracle):
        ref = peer(*tensors)
        g_ref = torch.autograd.grad(ref, tensors, cot)
        for a, b, what in [(out, ref, "loss")] + [
            (ga, gb, f"grad {i}") for i, (ga, gb) in enumerate(zip(g, g_ref))
        ]:
            scale = max(1.0, b.abs().max().item())
            assert max_err(a, b) <= 1e-10 * scale, f"{what}: {max_err(a, b):.3g}"


def _noncontiguous_2d(kind, rows, d, gen, device):
    """A leaf and a function giving a (rows, d) view of it with the named layout."""
    if kind == "transposed":
        return _randn(gen, (rows, d), torch.float32, device).T.contiguous(), lambda t: t.T
    if kind == "strided":
        return _randn(gen, (2 * rows + 1, 3 * d), torch.float32, device), lambda t: t[1::2, ::3]
    if kind == "expanded":
        return _randn(gen, (1, d), torch.float32, device), lambda t: t.expand(rows, d)
    if kind == "column_slice":
        return _randn(gen, (rows, d + 5), torch.float32, device), lambda t: t[:, 2:2 + d]
    return _randn(gen, (rows, d), torch.float32, device), lambda t: t


def _noncontiguous_3d(kind, n, m, d, gen, device):
    if kind == "permuted":  # stored (M, N, D)
        leaf = _randn(gen, (n, m, d), torch.float32, device).permute(1, 0, 2).contiguous()
        return leaf, lambda t: t.permute(1, 0, 2)
    if kind == "feature_major":  # stored (N, D, M)
        leaf = _randn(gen, (n, m, d), torch.float32, device).transpose(1, 2).contiguous()
        return leaf, lambda t: t.transpose(1, 2)
    if kind == "expanded":  # the same M negatives for every query
        return _randn(gen, (1, m, d), torch.float32, device), lambda t: t.expand(n, m, d)
    if kind == "strided":
        return _randn(gen, (n, 2 * m, d + 3), torch.float32, device), lambda t: t[:, ::2, 1:1 + d]
    return _randn(gen, (n, m, d), torch.float32, device), lambda t: t


LAYOUTS_2D = ["transposed", "strided", "expanded", "column_slice", "contiguous"]
LAYOUTS_3D = ["permuted", "feature_major", "expanded", "strided", "contiguous"]


@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES), temperature=TEMPERATURES,
       reduction=st.sampled_from(REDUCTIONS))
def test_noncontiguous_inputs_match_contiguous(backend, data, seed, mode, temperature,
                                               reduction):
    """Transposed, step-sliced, column-sliced, expanded (stride 0) and permuted inputs give the
    same loss and gradients (wrt the underlying leaves) as their contiguous copies; the fused
    kernels read strides directly, so this checks their indexing."""
    n, d = _queries(backend, data), _dims(backend, data)
    m = _negatives(backend, data, mode)
    gen = torch.Generator().manual_seed(seed)
    leaves, views = [], []
    for i, rows in enumerate([n, n] + ([m] if mode == "unpaired" else [])):
        kind = data.draw(st.sampled_from(LAYOUTS_2D), label=f"layout{i}")
        leaf, view = _noncontiguous_2d(kind, rows, d, gen, backend.device)
        leaves.append(leaf.requires_grad_())
        views.append(view)
    if mode == "paired":
        kind = data.draw(st.sampled_from(LAYOUTS_3D), label="layout_neg")
        leaf, view = _noncontiguous_3d(kind, n, m, d, gen, backend.device)
        leaves.append(leaf.requires_grad_())
        views.append(view)
    fast = _fns(mode, temperature, reduction)[0]
    with _tiling(backend, data):
        assert_same_as_contiguous(fast, views, leaves, temperature, gen)


@settings(max_examples=6)
@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES))
def test_near_collapsed_embeddings_at_low_temperature(backend, data, seed, mode):
    """Every query, key and negative = v + 1e-4 noise at tau = 0.01 (logits ~100, where a plain
    exp overflows float32): loss and gradients are finite and within the rule of the float64
    reference."""
    n = data.draw(st.integers(2, 40 if backend.small else 128), label="n")
    d = data.draw(st.integers(2, 64 if backend.small else 130), label="d")
    m = data.draw(st.integers(1, 8 if mode == "paired" else (70 if backend.small else 200)),
                  label="m")
    gen = torch.Generator().manual_seed(seed)
    v = 3 * torch.randn(d, generator=gen, dtype=torch.float64)

    def near(*shape):
        x = v + 1e-4 * torch.randn(*shape, d, generator=gen, dtype=torch.float64)
        return x.float().to(backend.device)

    tensors = [near(n), near(n)]
    if mode != "inbatch":
        tensors.append(near(m) if mode == "unpaired" else near(n, m))
    fast, oracle, eager = _fns(mode, 0.01, "mean")
    # Logits of ~100 carry a float32 rounding of up to half an ulp (3.8e-6) each, whichever way
    # they are formed; eager's error here can be far smaller only because its positive and
    # negative logits, of near-identical vectors, round alike (1e-8 on one Intel machine). One
    # ulp of a logit is the floor of the loss's error bound.
    floor = torch.finfo(torch.float32).eps / 0.01
    with _tiling(backend, data):
        check_against_oracle(fast, oracle, eager, tensors, (True,) * len(tensors),
                             torch.float32, gen, loss_floor=floor)
    # A plain exp of these logits is what the max shift avoids: it overflows float32.
    q = torch.nn.functional.normalize(tensors[0], dim=1)
    assert not torch.isfinite(torch.exp(q @ q.T / 0.01)).all()


@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES),
       temperature=st.sampled_from([0.05, 0.1, 0.5, 1.0, 2.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_reductions_are_consistent(backend, data, seed, mode, temperature, dtype):
    """reduction="none" gives N per-row losses in float32, also for bfloat16 inputs (the loss is
    never rounded to 16 bits); "mean" and "sum" equal their float32 mean and sum."""
    n = _queries(backend, data)
    d = data.draw(st.integers(1, 40 if backend.small else 130), label="d")
    m = _negatives(backend, data, mode)
    gen = torch.Generator().manual_seed(seed)
    tensors = _make_inputs(gen, mode, n, m, d, dtype, backend.device)
    with _tiling(backend, data):
        rows = _fns(mode, temperature, "none")[0](*tensors)
        mean = _fns(mode, temperature, "mean")[0](*tensors)
        total = _fns(mode, temperature, "sum")[0](*tensors)
    assert rows.shape == (n,) and rows.dtype == torch.float32
    assert mean.shape == () and total.shape == () and mean.dtype == total.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    r = rows.double()
    tol_mean = 2 * eps * r.abs().mean().item() + 2 * eps * r.abs().max().item() + 1e-7
    tol_sum = 2 * eps * r.abs().sum().item() + 2 * eps * n * r.abs().max().item() + 1e-6
    assert abs(mean.double().item() - r.mean().item()) <= tol_mean
    assert abs(total.double().item() - r.sum().item()) <= tol_sum


@settings(max_examples=10)
@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES), temperature=TEMPERATURES)
def test_permutation_and_scale_invariance(backend, data, seed, mode, temperature):
    """Per-row losses (fp32): permuting the batch (queries, keys and paired negatives alike)
    permutes them; permuting unpaired negatives leaves them unchanged; scaling any row of any
    input by a positive factor leaves them unchanged and divides that row's gradient by it."""
    n = _queries(backend, data)
    d = data.draw(st.integers(1, 40 if backend.small else 130), label="d")
    m = _negatives(backend, data, mode)
    gen = torch.Generator().manual_seed(seed)
    tensors = [t.requires_grad_() for t in
               _make_inputs(gen, mode, n, m, d, torch.float32, backend.device)]
    perm = torch.randperm(n, generator=gen)
    scales = [torch.exp(3 * torch.rand(t.shape[:-1] + (1,), generator=gen) - 1.5) for t in tensors]
    fast = _fns(mode, temperature, "none")[0]
    tol = dict(rtol=1e-5, atol=1e-6 * max(1.0, 1.0 / temperature))
    with _tiling(backend, data):
        base = fast(*tensors)
        permuted = [t[perm] for t in tensors[:2]]
        if mode == "paired":
            permuted.append(tensors[2][perm])
        elif mode == "unpaired":
            permuted.append(tensors[2][torch.randperm(m, generator=gen)])
        out_perm = fast(*permuted)
        scaled = [(t.detach() * c).requires_grad_() for t, c in zip(tensors, scales)]
        out_scaled = fast(*scaled)
        cot = torch.randn(n, generator=gen)
        g = torch.autograd.grad(base, tensors, cot)
        gs = torch.autograd.grad(out_scaled, scaled, cot)
    assert base.shape == (n,)
    torch.testing.assert_close(out_perm, base[perm], **tol)
    torch.testing.assert_close(out_scaled, base, **tol)
    # dL/dx = (I - xhat xhat^T) dL/dxhat / |x| with |dL/dxhat| <~ 2 / tau: tolerance relative
    # to that scale (which also bounds the rounding in the projection).
    for a, b, c, t in zip(gs, g, scales, tensors):
        r_max = t.detach().norm(dim=-1).reciprocal().max().item()
        torch.testing.assert_close(a * c, b, rtol=1e-4, atol=1e-5 * max(1.0, r_max) / temperature)


@settings(max_examples=8)
@given(data=st.data(), seed=SEEDS, mode=st.sampled_from(MODES), temperature=TEMPERATURES,
       reduction=st.sampled_from(REDUCTIONS))
def test_module_matches_functional(backend, data, seed, mode, temperature, reduction):
    """fastcl.nn.InfoNCELoss(temperature, reduction, negative_mode)(q, k, neg) equals
    fastcl.info_nce exactly, and InfoNCELoss() uses the functional's defaults."""
    n = data.draw(st.integers(1, 40 if backend.small else 100), label="n")
    d = data.draw(st.integers(1, 40 if backend.small else 100), label="d")
    m = _negatives(backend, data, mode)
    gen = torch.Generator().manual_seed(seed)
    tensors = _make_inputs(gen, mode, n, m, d, torch.float32, backend.device)
    nm = "paired" if mode == "paired" else "unpaired"
    module = fastcl.nn.InfoNCELoss(temperature, reduction, nm)
    assert torch.equal(module(*tensors), _fns(mode, temperature, reduction)[0](*tensors))
    if mode != "paired":
        assert torch.equal(fastcl.nn.InfoNCELoss()(*tensors), fastcl.info_nce(*tensors))
    assert list(module.parameters()) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_feature_at_low_temperature(backend, mode, seed):
    """D = 1 (every unit vector is +-1) at tau = 0.01: logits are exactly +-100 and the true
    gradient is exactly 0. fastcl must round as eager does (F.normalize divides, giving exactly
    +-1), not leave an ulp of a logit in the loss or a residue in the gradient. Found by
    hypothesis in the dev profile; kept here so the CI profile always checks it."""
    gen = torch.Generator().manual_seed(seed)
    tensors = _make_inputs(gen, mode, 2, 3, 1, torch.float32, backend.device)
    fast, oracle, eager = _fns(mode, 0.01, "none")
    check_against_oracle(fast, oracle, eager, tensors, (True,) * len(tensors), torch.float32, gen)


# ------------------------------------------------------------ the textbook single query ----


def test_single_query_is_the_textbook_formula(backend):
    """A (D,) query with a (D,) positive and (M, D) negatives (unpaired): the scalar
    L = -log(exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.k-_j/t))) of L2-normalized vectors, in
    float32, with gradients of the inputs' shapes, against that formula in float64."""
    d, m, tau = 24, 37, 0.1
    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2))
    neg = torch.randn(m, d, generator=gen, dtype=torch.float64)
    fast_in = [t.float().to(backend.device).requires_grad_() for t in (q, k, neg)]
    ora_in = [t.float().double().requires_grad_() for t in (q, k, neg)]

    def textbook(q, k, neg):
        q, k, neg = (t / t.norm(dim=-1, keepdim=True) for t in (q, k, neg))
        pos = torch.exp(q @ k / tau)
        return -torch.log(pos / (pos + torch.exp(neg @ q / tau).sum()))

    for reduction in ("mean", "sum", "none"):
        loss = fastcl.info_nce(*fast_in, temperature=tau, reduction=reduction)
        assert loss.shape == () and loss.dtype == torch.float32
        expect = textbook(*ora_in)
        torch.testing.assert_close(loss.double().cpu(), expect, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(loss, fast_in)
        expect_grads = torch.autograd.grad(expect, ora_in)
        for g, ge, x in zip(grads, expect_grads, fast_in):
            assert g.shape == x.shape
            torch.testing.assert_close(g.double().cpu(), ge, rtol=1e-4, atol=1e-6)


def test_single_query_elsewhere_is_a_clear_error():
    q, k = torch.randn(8), torch.randn(8)
    for neg, mode in [(None, "unpaired"), (torch.randn(1, 3, 8), "paired")]:
        with pytest.raises(ValueError, match=r"single \(D,\) query.*unpaired mode"):
            fastcl.info_nce(q, k, neg, negative_mode=mode)
    with pytest.raises(ValueError, match=r"positive_key must be \(D,\)"):
        fastcl.info_nce(q, torch.randn(1, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="negative_keys must be 2-dimensional"):
        fastcl.info_nce(q, k, torch.randn(8))
