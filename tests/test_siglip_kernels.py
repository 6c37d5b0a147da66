"""SigLIP's sigmoid kernels (``sigmoid_forward`` / ``sigmoid_grad``) of the CPU backends on their
own, against the float64 formula written out here. The C++ kernels always; the chunked
backend's too where it has them.

The formula: z_ij = scale * x_i . y_j + bias (features as given), t_ij = +1 at j = i + pos_offset
(0 <= j < m; none for None), -1 elsewhere,
    l_ij = softplus(-t_ij z_ij),  w_ij = -t_ij sigmoid(-t_ij z_ij),
    loss_i = sum_j l_ij,  dscale_i = sum_j w_ij x_i . y_j,  dbias_i = sum_j w_ij,
    dx = scale W y,  dy = scale W^T x   (sigmoid_grad: W scaled by g per row).
The eager baseline of the tolerance rule (tests/tolerances.py) is what users run today:
``-F.logsigmoid(t * (scale * x @ y.T + bias))`` in the accumulation dtype and its autograd
gradients; the kernels' error may be at most twice eager's plus the dtype's atol.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import (assert_bitwise_across_threads, assert_thread_runs_agree, kernel_module,
                      thread_runs, tile_patch)
from tolerances import (acc, assert_within_rule, bf16_product_settings, bf16_products, max_err,
                        products_floor)

F64 = torch.float64
NAMES = ("loss", "dscale", "dbias", "dx", "dy", "gdx", "gdy")

# The backends with SigLIP's kernels: cpp always, chunked once it has them.
MODULES = [name for name in ("cpp", "chunked") if hasattr(kernel_module(name), "sigmoid_grad")]


def _labels(n, m, pos_offset, dtype):
    t = -torch.ones(n, m, dtype=dtype)
    if pos_offset is not None:
        i = torch.arange(n)
        j = i + pos_offset
        keep = (j >= 0) & (j < m)
        t[i[keep], j[keep]] = 1.0
    return t


def _oracle(x, y, scale, bias, pos_offset, g):
    """The formula in float64, written out."""
    x, y, g = x.to(F64), y.to(F64), g.to(F64)
    p = x @ y.T
    z = scale * p + bias
    t = _labels(x.shape[0], y.shape[0], pos_offset, F64)
    u = -t * z
    l = u.clamp_min(0) + torch.log1p(torch.exp(-u.abs()))
    w = -t * torch.sigmoid(u)
    gw = g[:, None] * w
    return {"loss": l.sum(1), "dscale": (w * p).sum(1), "dbias": w.sum(1),
            "dx": scale * (w @ y), "dy": scale * (w.T @ x),
            "gdx": scale * (gw @ y), "gdy": scale * (gw.T @ x)}


def _eager(x, y, scale, bias, pos_offset, g):
    """Eager PyTorch in the accumulation dtype: -F.logsigmoid and autograd."""
    dtype = acc(x.dtype)
    out = {}
    for weights, names in ((None, ("dx", "dy")), (g.to(dtype), ("gdx", "gdy"))):
        xa = x.detach().to(dtype, copy=True).requires_grad_()
        ya = y.detach().to(dtype, copy=True).requires_grad_()
        p = xa @ ya.T
        z = scale * p + bias
        z.retain_grad()
        t = _labels(x.shape[0], y.shape[0], pos_offset, dtype)
        rows = (-F.logsigmoid(t * z)).sum(1)
        (rows.sum() if weights is None else (rows * weights).sum()).backward()
        out[names[0]], out[names[1]] = xa.grad, ya.grad
        if weights is None:
            w = z.grad
            out.update(loss=rows.detach(), dscale=(w * p.detach()).sum(1), dbias=w.sum(1))
    return out


def _inputs(n, m, d, dtype, seed, spread=1.0):
    """Rows of norm ~ spread (scale * x . y then ~ scale * spread^2 / sqrt(d) apart), per-row
    norms varied by ~e^{+-1}, and row weights g."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64) / d ** 0.5 * spread
    y = torch.randn(m, d, generator=gen, dtype=F64) / d ** 0.5 * spread
    x = x * torch.exp(0.5 * torch.randn(n, 1, generator=gen, dtype=F64))
    y = y * torch.exp(0.5 * torch.randn(m, 1, generator=gen, dtype=F64))
    g = torch.randn(n, generator=gen, dtype=F64)
    return x.to(dtype), y.to(dtype), g.to(acc(dtype))


def _run(module, x, y, scale, bias, pos_offset, g, with_grads=True):
    k = kernel_module(module)
    loss, dscale, dbias, dx, dy = k.sigmoid_forward(x, y, scale, bias, pos_offset, with_grads)
    gdx, gdy = k.sigmoid_grad(x, y, scale, bias, pos_offset, g, True, True)
    return {"loss": loss, "dscale": dscale, "dbias": dbias, "dx": dx, "dy": dy, "gdx": gdx,
            "gdy": gdy}


def _check(out, x, y, scale, bias, pos_offset, g, names=NAMES, module=None):
    oracle = _oracle(x, y, scale, bias, pos_offset, g)
    eager = _eager(x, y, scale, bias, pos_offset, g)
    dtype = acc(x.dtype)
    for name in names:
        got = out[name]
        assert got.dtype == dtype, name
        assert got.shape == oracle[name].shape, name
        assert got.is_contiguous(), name
        assert_within_rule(got, oracle[name], eager[name], dtype, what=name,
                           floor=products_floor(module, x.dtype, oracle[name]))


def _offsets(n, m):
    """pos_offset cases: the same index, a rank's block further on, one before, every positive
    out of range (both ways), none."""
    return st.sampled_from([0, min(m - 1, 3), -1, m, -n, None])


@pytest.mark.parametrize("module", MODULES)
@given(
    data=st.data(),
    n=st.integers(1, 150),
    m=st.integers(1, 150),
    d=st.sampled_from([3, 17, 50]),
    tile=st.sampled_from([3, 8, 16, 128]),
    scale=st.sampled_from([-10.0, 0.0, 0.5, 10.0, 30.0]),
    bias=st.sampled_from([-10.0, 0.0, 4.0]),
    dtype=st.sampled_from([torch.float32, F64]),
    with_grads=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sigmoid_matches_the_float64_formula(module, data, n, m, d, tile, scale, bias, dtype,
                                             with_grads, seed):
    pos_offset = data.draw(_offsets(n, m), label="pos_offset")
    x, y, g = _inputs(n, m, d, dtype, seed, spread=2.0)
    with tile_patch(module, tile):
        out = _run(module, x, y, scale, bias, pos_offset, g, with_grads)
    names = list(NAMES)
    if not with_grads:
        assert out["dx"].shape == (0,) and out["dy"].shape == (0,)
        names = [k for k in names if k not in ("dx", "dy")]
    _check(out, x, y, scale, bias, pos_offset, g, names)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,m,tile,pos_offset", [
    (1, 1, 4, 0),       # one pair, the positive
    (1, 1, 4, None),    # one pair, a negative
    (5, 5, 5, 0),       # one full tile
    (6, 5, 5, 0),       # a last row block of one row; row 5 has no positive
    (13, 40, 4, 27),    # m != n: a rank's block of the gathered texts, many tiles
    (40, 13, 4, -20),   # more rows than columns, positives from row 20 on
    (33, 70, 128, 70),  # one partial tile, every positive out of range
])
def test_block_edges(module, dtype, n, m, tile, pos_offset):
    x, y, g = _inputs(n, m, 7, dtype, seed=n + m)
    with tile_patch(module, tile):
        out = _run(module, x, y, 10.0, -10.0, pos_offset, g)
    _check(out, x, y, 10.0, -10.0, pos_offset, g)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_large_logits_stay_finite(module, dtype):
    """|z| up to ~200 (scale 100, bias +-100, positives at both signs): softplus and the weights
    stay finite and within the rule; the saturated weights are exactly 0 or +-1 in float32."""
    n, m, d = 24, 30, 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=F64).to(dtype) / d ** 0.5
    y = torch.randn(m, d, generator=gen, dtype=F64).to(dtype) / d ** 0.5
    g = torch.ones(n, dtype=acc(dtype))
    for bias in (-100.0, 100.0):
        with tile_patch(module, 8):
            out = _run(module, x, y, 100.0, bias, 2, g)
        for name, v in out.items():
            assert torch.isfinite(v).all(), (bias, name)
        _check(out, x, y, 100.0, bias, 2, g)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("label", ["negative", "positive"])
def test_pair_terms_elementwise_accuracy(module, label):
    """One pair a row (m = 1, D = 1, exact logits z = x_i): loss and weight of z over [-40, 40]
    against float64, within twice eager float32's -F.logsigmoid / autograd error plus 2 ulp
    (relative; the rule's atol would be loose here): what the epilogue's exp and log1p cost."""
    z = torch.linspace(-40, 40, 4001, dtype=torch.float32)
    z = torch.cat([z, torch.tensor([-1e-3, -1e-7, 0.0, 1e-7, 1e-3, 0.3, 0.4142, 0.5, 0.881374])])
    x, y = z[:, None], torch.ones(1, 1)
    pos_offset = 0 if label == "positive" else None
    g = torch.ones(z.shape[0])
    out = _run(module, x, y, 1.0, 0.0, pos_offset, g)
    oracle = _oracle(x, y, 1.0, 0.0, pos_offset, g)
    eager = _eager(x, y, 1.0, 0.0, pos_offset, g)
    ulp = torch.finfo(torch.float32).eps
    for name in ("loss", "dbias"):
        ref = oracle[name]
        tiny = torch.finfo(torch.float32).tiny
        rel = lambda a: ((a.double() - ref).abs() / ref.abs().clamp_min(tiny)).max().item()  # noqa
        assert rel(out[name]) <= 2 * rel(eager[name]) + 2 * ulp, (name, rel(out[name]),
                                                                   rel(eager[name]))


@pytest.mark.parametrize("module", MODULES)
def test_strided_inputs(module):
    """Non-contiguous x and y (every other feature; a transposed buffer) and g: the same
    results as their contiguous copies, contiguous outputs."""
    x, y, g = _inputs(30, 20, 18, torch.float32, seed=11)
    xs = torch.zeros(30, 36)
    xs[:, ::2] = x
    ys = y.T.contiguous().T
    gs = torch.zeros(60)
    gs[::2] = g
    with tile_patch(module, 8):
        a = _run(module, xs[:, ::2], ys, 6.0, -4.0, 0, gs[::2])
        b = _run(module, x, y, 6.0, -4.0, 0, g)
    for name in NAMES:
        assert a[name].is_contiguous(), name
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize("module", MODULES)
def test_16_bit_inputs_are_widened(module):
    """bfloat16 / float16 inputs: outputs in float32, within the rule against eager float32 from
    the same rounded inputs."""
    for dtype in (torch.bfloat16, torch.float16):
        for products in bf16_product_settings(module, dtype):
            x, y, g = _inputs(40, 30, 16, dtype, seed=4)
            with tile_patch(module, 8), bf16_products(products):
                out = _run(module, x, y, 5.0, -3.0, 1, g)
                _check(out, x, y, 5.0, -3.0, 1, g, module=module)


def test_cpp_outputs_do_not_depend_on_what_else_is_asked():
    """The C++ forward's loss / dscale / dbias are bitwise the same with and without grads; a
    positive out of range is bitwise no positive; sigmoid_grad's dx (dy) bitwise the same with
    or without the other."""
    cpp = kernel_module("cpp")
    for dtype in (torch.float32, F64):
        x, y, g = _inputs(50, 45, 12, dtype, seed=7)
        with tile_patch("cpp", 16):
            a = cpp.sigmoid_forward(x, y, 7.0, -2.0, 3, True)
            b = cpp.sigmoid_forward(x, y, 7.0, -2.0, 3, False)
            assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
            none = cpp.sigmoid_forward(x, y, 7.0, -2.0, None, True)
            for off in (45, -50, 10**6):
                out = cpp.sigmoid_forward(x, y, 7.0, -2.0, off, True)
                assert all(torch.equal(u, v) for u, v in zip(out, none)), off
            both = cpp.sigmoid_grad(x, y, 7.0, -2.0, 3, g, True, True)
            rows = cpp.sigmoid_grad(x, y, 7.0, -2.0, 3, g, True, False)
            cols = cpp.sigmoid_grad(x, y, 7.0, -2.0, 3, g, False, True)
            neither = cpp.sigmoid_grad(x, y, 7.0, -2.0, 3, g, False, False)
        assert torch.equal(rows[0], both[0]) and rows[1].shape == (0,)
        assert torch.equal(cols[1], both[1]) and cols[0].shape == (0,)
        assert neither[0].shape == (0,) and neither[1].shape == (0,)
        # g = 1: the backward's recompute gives the forward's gradients bitwise.
        ones = torch.ones(50, dtype=dtype)
        with tile_patch("cpp", 16):
            grad1 = cpp.sigmoid_grad(x, y, 7.0, -2.0, 3, ones, True, True)
        assert torch.equal(grad1[0], a[3]) and torch.equal(grad1[1], a[4])


def test_cpp_wide_features_take_the_wide_tile():
    """D >= cpp._WIDE_D: cpp._TILE_WIDE-edge blocks whatever _TILE is (300 x 260 pairs: a full
    block and a partial one each way)."""
    cpp = kernel_module("cpp")
    x, y, g = _inputs(300, 260, cpp._WIDE_D + 4, torch.float32, seed=9, spread=3.0)
    with tile_patch("cpp", 8):
        out = _run("cpp", x, y, 10.0, -10.0, 0, g)
    _check(out, x, y, 10.0, -10.0, 0, g)


def _thread_runs():
    """The C++ kernels' outputs (float32 and float64; tile 16 over 70 x 90 pairs: 5 x 6 blocks,
    and over 90 x 70) with 1 thread, then twice with 2."""
    cases = [(_inputs(70, 90, 24, dtype, seed=5), off)
             for dtype in (torch.float32, F64) for off in (0, 20)]
    cases += [(_inputs(90, 70, 24, torch.float32, seed=6), -10)]

    def run():
        out = []
        with tile_patch("cpp", 16):
            for (x, y, g), off in cases:
                out += list(_run("cpp", x, y, 8.0, -5.0, off, g).values())
        return out

    return thread_runs(run)


def test_cpp_deterministic_and_thread_count_independent_up_to_the_products():
    """Bitwise the same from run to run; across thread counts equal to float32 rounding (MKL's
    own products may round otherwise with 2 threads: the bitwise test below pins them)."""
    assert_thread_runs_agree(*_thread_runs())


def test_cpp_bitwise_the_same_for_any_thread_count_with_reproducible_products():
    """With MKL_CBWR=COMPATIBLE (thread-count independent products), 1 and 2 threads give
    bitwise the same outputs: the diagonal rounds fix every row's and column's order."""
    assert_bitwise_across_threads("test_siglip_kernels")


def test_opcheck_sigmoid_operators():
    from fastcl.ops import _backend

    _backend._load_cpp()  # registers the fakes
    x, y, g = _inputs(9, 7, 5, torch.float32, seed=1)
    for with_grads in (False, True):
        for off in (0, None):
            torch.library.opcheck(torch.ops.fastcl_cpu.sigmoid_forward.default,
                                  (x, y, 3.0, -1.0, off, with_grads, 4))
    for need_rows, need_cols in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.fastcl_cpu.sigmoid_grad.default,
                              (x, y, 3.0, -1.0, 2, g, need_rows, need_cols, 4))


def test_cpp_operators_check_their_arguments():
    ops = torch.ops.fastcl_cpu
    kernel_module("cpp")
    x, y, g = _inputs(6, 5, 4, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="feature size"):
        ops.sigmoid_forward(x, y[:, :3], 1.0, 0.0, 0, True, 8)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.sigmoid_forward(x, y.double(), 1.0, 0.0, 0, True, 8)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.sigmoid_forward(x[0], y, 1.0, 0.0, 0, True, 8)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.sigmoid_forward(x.half(), y.half(), 1.0, 0.0, 0, True, 8)
    with pytest.raises(RuntimeError, match="g must"):
        ops.sigmoid_grad(x, y, 1.0, 0.0, 0, g[:5], True, True, 8)
    with pytest.raises(RuntimeError, match="tile"):
        ops.sigmoid_forward(x, y, 1.0, 0.0, 0, True, 0)


def test_error_at_training_sizes_within_twice_eagers():
    """At sizes and parameters of real training (256 x 256 x 64 at SigLIP's initial scale 10
    and bias -10; 200 x 600 x 32 at scale 30 with an offset positive; 128 x 128 x 512 at scale
    100, bias -100, no positive), every output of every kernel module is within twice eager
    float32's max error against float64 (plus float32's atol, relative to the output's size)."""
    kernel_module("cpp")
    for n, m, d, scale, bias, off in ((256, 256, 64, 10.0, -10.0, 0),
                                      (200, 600, 32, 30.0, 5.0, 100),
                                      (128, 128, 512, 100.0, -100.0, None)):
        x, y, g = _inputs(n, m, d, torch.float32, seed=n, spread=3.0)
        oracle = _oracle(x, y, scale, bias, off, g)
        eager = _eager(x, y, scale, bias, off, g)
        for module in MODULES:
            out = _run(module, x, y, scale, bias, off, g)
            for k in NAMES:
                size = max(1.0, oracle[k].abs().max().item())
                bound = 2 * max_err(eager[k], oracle[k]) + 2e-6 * size
                assert max_err(out[k], oracle[k]) <= bound, (module, k, n, m, d)
