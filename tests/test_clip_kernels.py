"""CLIP's row + column kernels (``rows_cols_forward`` / ``rows_cols_grad``) of the C++ backend
on their own, against the float64 formula written out here.

The formula: xhat = x / nx, yhat = y / ny (the norms as passed: ones for CLIP, whose features are
used as given), s_ij = inv_temp * xhat_i . yhat_j,
    loss = [lse_j(s_ij) - s_ii ; lse_i(s_ij) - s_jj],  lse = [lse_j(s_ij) ; lse_i(s_ij)],
    dscale = [sum_j p^r_ij d_ij - d_ii ; sum_i p^c_ij d_ij - d_jj]  (p^r, p^c the row and column
             softmaxes, d = s / inv_temp),
    W = g_r p^r + g_c p^c with its diagonal zeroed,  dxhat = inv_temp W yhat,
    dyhat = inv_temp W^T xhat.
The same formula in the kernels' dtype is the eager baseline of the tolerance rule
(tests/tolerances.py): the error may be at most twice eager's plus the dtype's atol.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (assert_bitwise_across_threads, assert_thread_runs_agree, thread_runs,
                      tile_patch)
from tolerances import assert_within_rule

F64 = torch.float64


def _cpp():
    from fastcl.kernels import cpp

    return cpp


def _formula(x, y, nx, ny, inv_temp, g, dtype):
    """{loss, lse, dscale, dx, dy} in ``dtype`` from the (rounded) inputs as given."""
    xh = x.to(dtype) / nx.to(dtype)[:, None]
    yh = y.to(dtype) / ny.to(dtype)[:, None]
    n = x.shape[0]
    s = inv_temp * (xh @ yh.T)
    diag = s.diagonal()
    lr, lc = torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    pr, pc = torch.softmax(s, 1), torch.softmax(s, 0)
    d = s / inv_temp
    dsr = (pr * d).sum(1) - d.diagonal()
    dsc = (pc * d).sum(0) - d.diagonal()
    w = g[:n, None].to(dtype) * pr + g[None, n:].to(dtype) * pc
    w.fill_diagonal_(0)
    return {
        "loss": torch.cat([lr - diag, lc - diag]),
        "lse": torch.cat([lr, lc]),
        "dscale": torch.cat([dsr, dsc]),
        "dx": inv_temp * (w @ yh),
        "dy": inv_temp * (w.T @ xh),
    }


def _inputs(n, d, dtype, seed, norms):
    """Unnormalized rows (norms spread over ~e^{+-1} around 1, up to ~e^{+-3}) and the norms
    passed: ones (CLIP: the features as given) or the rows' own."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64) / d ** 0.5
    y = torch.randn(n, d, generator=gen, dtype=F64) / d ** 0.5
    x = x * torch.exp(torch.randn(n, 1, generator=gen, dtype=F64))
    y = y * torch.exp(torch.randn(n, 1, generator=gen, dtype=F64))
    x, y = x.to(dtype), y.to(dtype)
    if norms == "ones":
        nx = ny = torch.ones(n, dtype=dtype)
    else:
        nx = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12)
        ny = torch.linalg.vector_norm(y, dim=1).clamp_min(1e-12)
    gvec = torch.randn(2 * n, generator=gen, dtype=F64).to(dtype)
    return x, y, nx, ny, gvec


def _run(x, y, nx, ny, inv_temp, gvec, with_dscale=True):
    cpp = _cpp()
    loss, lse, dscale = cpp.rows_cols_forward(x, y, nx, ny, inv_temp, with_dscale=with_dscale)
    dx, dy = cpp.rows_cols_grad(x, y, nx, ny, lse, gvec, inv_temp)
    return {"loss": loss, "lse": lse, "dscale": dscale, "dx": dx, "dy": dy}


def _check(out, x, y, nx, ny, inv_temp, gvec, dtype, names=None):
    oracle = _formula(x, y, nx, ny, inv_temp, gvec.to(F64), F64)
    eager = _formula(x, y, nx, ny, inv_temp, gvec, dtype)
    for name in names or ("loss", "lse", "dscale", "dx", "dy"):
        got = out[name]
        assert got.dtype == (F64 if name == "lse" else dtype), name
        assert got.shape == oracle[name].shape, name
        assert_within_rule(got, oracle[name], eager[name], dtype, what=name)


@given(
    n=st.integers(1, 300),
    d=st.sampled_from([3, 17, 24, 50]),
    tile=st.sampled_from([3, 8, 16, 50, 128]),
    scale=st.sampled_from([1.0, 2.5, 14.3, 100.0]),
    dtype=st.sampled_from([torch.float32, F64]),
    norms=st.sampled_from(["ones", "real"]),
    with_dscale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rows_cols_match_the_float64_formula(n, d, tile, scale, dtype, norms, with_dscale, seed):
    x, y, nx, ny, gvec = _inputs(n, d, dtype, seed, norms)
    with tile_patch("cpp", tile):
        out = _run(x, y, nx, ny, scale, gvec, with_dscale)
    names = ["loss", "lse", "dx", "dy"]
    if with_dscale:
        names.append("dscale")
    else:
        assert out["dscale"].shape == (0,)
    _check(out, x, y, nx, ny, scale, gvec, dtype, names)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,tile", [(1, 4), (5, 5), (6, 5), (13, 4), (40, 128)])
def test_block_edges(dtype, n, tile):
    """One row; one full tile; a last block of one row; several blocks; one partial tile."""
    x, y, nx, ny, gvec = _inputs(n, 7, dtype, seed=n, norms="ones")
    with tile_patch("cpp", tile):
        out = _run(x, y, nx, ny, 30.0, gvec)
    _check(out, x, y, nx, ny, 30.0, gvec, dtype)
    if n == 1:  # the one logit is the positive of its row and of its column
        assert torch.equal(out["loss"], torch.zeros_like(out["loss"]))
        assert torch.equal(out["dscale"], torch.zeros_like(out["dscale"]))
        assert torch.equal(out["dx"], torch.zeros_like(out["dx"]))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_wide_features_take_the_wide_tile(dtype):
    """D >= cpp._WIDE_D runs cpp._TILE_WIDE-edge tiles (300 rows: a full block and a partial
    one), whatever _TILE is."""
    cpp = _cpp()
    assert cpp._rows_cols_tile(cpp._WIDE_D) == cpp._TILE_WIDE
    x, y, nx, ny, gvec = _inputs(300, cpp._WIDE_D + 4, dtype, seed=9, norms="ones")
    with tile_patch("cpp", 8):
        assert cpp._rows_cols_tile(x.shape[1]) == cpp._TILE_WIDE
        out = _run(x, y, nx, ny, 100.0, gvec)
    _check(out, x, y, nx, ny, 100.0, gvec, dtype)


def test_dscale_leaves_loss_and_lse_unchanged():
    """with_dscale only adds outputs: loss and lse are bitwise those without it."""
    cpp = _cpp()
    for dtype in (torch.float32, F64):
        x, y, nx, ny, _ = _inputs(70, 24, dtype, seed=3, norms="ones")
        with tile_patch("cpp", 16):
            a = cpp.rows_cols_forward(x, y, nx, ny, 50.0, with_dscale=False)
            b = cpp.rows_cols_forward(x, y, nx, ny, 50.0, with_dscale=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _near_one_hot(n=48, d=60, seed=0):
    """Features whose logits at scale 100 are nearly one-hot, the max off the diagonal: x = 3 Q
    (Q with orthonormal rows), y = M^T Q / 3, so x y^T = M with M_{i, pi(i)} = 9 (s = 900) and
    for each row and column one runner-up 0.07-0.12 below (s 7-12 below the max; it may be the
    diagonal); the rest
    below 4 (s <= 400). The gradients' big weights are off-diagonal, near 1."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=F64))
    q = q.T  # (n, d), orthonormal rows
    m = _one_hot_pattern(n, gen, top=9.0, runner_gap=lambda k: 0.07 + 0.05 * torch.rand(
        k, generator=gen, dtype=F64), rest=4.0)
    return (3.0 * q).float(), ((m.T @ q) / 3.0).float()


def _one_hot_pattern(n, gen, top, runner_gap, rest):
    """(n x n): top at (i, pi(i)) (pi without fixed points), top - runner_gap at (i, pi(i - 1)),
    so every row and every column has one max and one runner-up off the diagonal; the rest
    uniform in [0, rest)."""
    perm = torch.randperm(n, generator=gen)
    perm = torch.where(perm == torch.arange(n), (perm + 1) % n, perm)
    m = torch.rand(n, n, generator=gen, dtype=F64) * rest
    rows = torch.arange(n)
    m[rows, perm] = top
    m[rows, torch.roll(perm, 1)] = top - runner_gap(n)
    return m


def _exact_one_hot(n=40, seed=1):
    """The same pattern with logits that every implementation computes exactly at scale 100: x =
    4 e_i (one-hot rows, D = n + 3), y_j[i] = k_ij / 64 with integers k, so s_ij = 6.25 k_ij
    exactly in float32: the max 900 (k = 144), the runner-up 6.25 or 12.5 below (weights ~2e-3
    and ~4e-6), the rest <= 400. Every row's and column's lse is its max plus log l with
    l - 1 between ~4e-6 and ~2e-3: the lse's float32 rounding (up to 3e-5 at 900) is then the
    largest error a weight near 1 can get, and the split lse must remove it."""
    gen = torch.Generator().manual_seed(seed)
    k = _one_hot_pattern(n, gen, top=144.0, runner_gap=lambda c: 1.0 + torch.randint(
        0, 2, (c,), generator=gen).double(), rest=64.0).floor()
    x = torch.zeros(n, n + 3)
    x[:, :n] = 4.0 * torch.eye(n)
    y = torch.zeros(n, n + 3)
    y[:, :n] = (k / 64.0).T.float()
    return x, y


@pytest.mark.parametrize("exact", [False, True], ids=["rounded_logits", "exact_logits"])
def test_low_temperature_weights_use_the_split_lse(exact):
    """Scale 100, nearly one-hot rows and columns, logits ~900, the big weights off the
    diagonal: the float32 outputs stay within the rule. With exact logits (_exact_one_hot) the
    rule holds only because the weights are exp((s - hi) - lo), the float64 lse split in two:
    the same kernel fed the lse rounded to float32 (what an unsplit lse gives) misses it by
    far, so the test tells the two apart. (With rounded logits, their own rounding, in eager
    too, is as large as the lse's.)"""
    cpp = _cpp()
    x, y = _exact_one_hot() if exact else _near_one_hot()
    n = x.shape[0]
    ones = torch.ones(n)
    gvec = torch.ones(2 * n) / (2 * n)
    inv_temp = 100.0
    oracle = _formula(x, y, ones, ones, inv_temp, gvec.to(F64), F64)
    eager = _formula(x, y, ones, ones, inv_temp, gvec, torch.float32)
    assert oracle["lse"].max() > 850  # the regime meant: logits ~900
    with tile_patch("cpp", 16):
        out = _run(x, y, ones, ones, inv_temp, gvec)
        _check(out, x, y, ones, ones, inv_temp, gvec, torch.float32)
        if not exact:
            return
        rounded = out["lse"].float().double()
        dx_r, dy_r = cpp.rows_cols_grad(x, y, ones, ones, rounded, gvec, inv_temp)
    for name, got in (("dx", dx_r), ("dy", dy_r)):
        with pytest.raises(AssertionError):
            assert_within_rule(got, oracle[name], eager[name], torch.float32, what=name)


def _thread_runs():
    """The kernels' outputs (float32 and float64, tile 16 over 70 rows: 5 blocks, 5 rounds) with 1
    thread, then twice with 2."""
    cases = [_inputs(70, 24, dtype, seed=5, norms=norms)
             for dtype in (torch.float32, F64) for norms in ("ones", "real")]

    def run():
        out = []
        with tile_patch("cpp", 16):
            for x, y, nx, ny, gvec in cases:
                out += list(_run(x, y, nx, ny, 40.0, gvec).values())
        return out

    return thread_runs(run)


def test_deterministic_and_thread_count_independent_up_to_the_products():
    """Bitwise the same from run to run; across thread counts equal to float32 rounding (MKL's
    own products may round otherwise with 2 threads: the bitwise test below pins them)."""
    assert_thread_runs_agree(*_thread_runs())


def test_bitwise_the_same_for_any_thread_count_with_reproducible_products():
    """With MKL's conditional numerical reproducibility (MKL_CBWR=COMPATIBLE) the products are
    themselves thread-count independent; then 1 and 2 threads give bitwise the same outputs:
    the diagonal-rounds schedule fixes every row's and column's accumulation order."""
    assert_bitwise_across_threads("test_clip_kernels")


def test_opcheck_rows_cols_operators():
    from fastcl.ops import _backend

    _backend._load_cpp()  # registers the fakes
    x, y, nx, ny, gvec = _inputs(9, 5, torch.float32, seed=1, norms="real")
    loss, lse, _ = torch.ops.fastcl_cpu.rows_cols_forward(x, y, nx, ny, 3.0, 4, True)
    for with_dscale in (False, True):
        torch.library.opcheck(torch.ops.fastcl_cpu.rows_cols_forward.default,
                              (x, y, nx, ny, 3.0, 4, with_dscale))
    torch.library.opcheck(torch.ops.fastcl_cpu.rows_cols_grad.default,
                          (x, y, nx, ny, lse, gvec, 3.0, 4))


def test_operators_check_their_arguments():
    cpp = _cpp()
    x, y, nx, ny, gvec = _inputs(6, 5, torch.float32, seed=2, norms="ones")
    with pytest.raises(RuntimeError, match="same shape"):
        cpp.rows_cols_forward(x, y[:5], nx, ny[:5], 1.0)
    with pytest.raises(RuntimeError, match="norms of y"):
        cpp.rows_cols_forward(x, y, nx, ny[:5], 1.0)
    _, lse, _ = cpp.rows_cols_forward(x, y, nx, ny, 1.0)
    with pytest.raises(RuntimeError, match="lse"):
        cpp.rows_cols_grad(x, y, nx, ny, lse[:6], gvec, 1.0)
    with pytest.raises(RuntimeError, match="g must"):
        cpp.rows_cols_grad(x, y, nx, ny, lse, gvec[:6], 1.0)
    with pytest.raises(RuntimeError, match="tile"):
        torch.ops.fastcl_cpu.rows_cols_forward(x, y, nx, ny, 1.0, 0, False)
