"""The Triton kernels of CLIP's rows+columns pass (``rows_cols_forward`` / ``rows_cols_grad`` of
fastcl/kernels/triton_contrastive.py) against float64 formulas written here, through the
kernel contract directly (no op layer): both directions' loss, lse and dscale, both gradients
with the diagonal skipped, several row groups and column splits (forced with
``RC_GROUP_ROWS`` / ``SPLIT_COLUMNS``, also ending inside a tile), the scale from 1 to 1000 as a
float or a 0-dim tensor, float32 and bfloat16 rows, bitwise run-to-run determinism, and the
launch plan on an H100-sized device.

Without CUDA they run under the interpreter (conftest sets TRITON_INTERPRET=1): small shapes
(tiles 32 x 32, D resident up to 64, chunks of 32 above).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TRITON_DEVICE
from tolerances import assert_within_rule

pytest.importorskip("triton")

DEV = torch.device(TRITON_DEVICE)


@pytest.fixture
def tc():
    from fastcl.kernels import triton_contrastive

    return triton_contrastive


def _inputs(seed, n, d, dtype, unit):
    """x, y (n, D) in ``dtype`` on DEV and their float32 norms: unit rows with norms of ones
    (as the CLIP op passes them), or raw rows with their own norms, then as strided views
    (row stride D + 3, the columns of a wider tensor)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if unit:
        x = x / x.norm(dim=1, keepdim=True)
        y = y / y.norm(dim=1, keepdim=True)
    x, y = x.to(dtype).to(DEV), y.to(dtype).to(DEV)
    if not unit:
        pad = torch.zeros(n, 3, dtype=dtype, device=DEV)
        x, y = torch.cat([x, pad], 1)[:, :d], torch.cat([pad, y], 1)[:, 3:]
        assert x.stride() == y.stride() == (d + 3, 1)
    if unit:
        nx = ny = torch.ones(n, dtype=torch.float32, device=DEV)
    else:
        nx = torch.linalg.vector_norm(x.float(), dim=1)
        ny = torch.linalg.vector_norm(y.float(), dim=1)
    return x, y, nx, ny


def _hat(x, nx):
    return x.cpu().double() / nx.cpu().double()[:, None]


def ref_forward(x, y, nx, ny, a):
    """float64 [rows ; columns] loss, lse and dscale of the contract."""
    xh, yh = _hat(x, nx), _hat(y, ny)
    dots = xh @ yh.T
    s = a * dots
    diag = torch.diagonal(dots)
    lse_r, lse_c = torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    ds_r = (torch.softmax(s, 1) * dots).sum(1) - diag
    ds_c = (torch.softmax(s, 0) * dots).sum(0) - diag
    lse = torch.cat([lse_r, lse_c])
    return lse - torch.cat([a * diag, a * diag]), lse, torch.cat([ds_r, ds_c])


def ref_grad(x, y, nx, ny, lse, g, a):
    """float64 (dx_hat, dy_hat) of the contract, diagonal skipped, from the given lse."""
    xh, yh = _hat(x, nx), _hat(y, ny)
    n = xh.shape[0]
    s = a * (xh @ yh.T)
    lse, g = lse.cpu().double(), g.cpu().double()
    w = (g[:n, None] * torch.exp(s - lse[:n, None])
         + g[None, n:] * torch.exp(s - lse[None, n:]))
    w.fill_diagonal_(0.0)
    return a * w @ yh, a * w.T @ xh


def _close(actual, expect, tol):
    """|actual - expect| <= tol * max(1, max |expect|), elementwise."""
    scale = max(1.0, expect.abs().max().item()) if expect.numel() else 1.0
    torch.testing.assert_close(actual.cpu().double(), expect, rtol=0.0, atol=tol * scale)


F32, BF16 = torch.float32, torch.bfloat16
# (n, D, scale, dtype, unit rows, rows per group, columns per split): n = 1 up, D below and
# above the interpreter's resident size and never a power of two, groups and splits from the
# plan or forced (20: they end inside a 32-row / 32-column tile).
CASES = [
    (1, 5, 1.0, F32, True, None, None),
    (5, 24, 100.0, F32, True, None, None),
    (37, 80, 14.3, F32, False, 20, 20),
    (130, 40, 3.0, F32, True, None, None),
    (37, 24, 50.0, BF16, True, 20, 20),
    (70, 72, 10.0, BF16, False, None, None),
]


def _ids(case):
    n, d, a, dtype, unit, rows, cols = case
    return (f"n{n}-d{d}-a{a:g}-{str(dtype)[6:]}-{'unit' if unit else 'raw'}"
            f"-{'plan' if rows is None else f'g{rows}s{cols}'}")


@pytest.fixture(params=CASES, ids=[_ids(c) for c in CASES])
def case(request, tc, monkeypatch):
    n, d, a, dtype, unit, rows, cols = request.param
    monkeypatch.setattr(tc, "RC_GROUP_ROWS", rows)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
    return request.param


def test_forward_matches_float64(tc, case):
    n, d, a, dtype, unit, _, _ = case
    x, y, nx, ny = _inputs(n + d, n, d, dtype, unit)
    loss, lse, dscale = tc.rows_cols_forward(x, y, nx, ny, a, with_dscale=True)
    assert loss.shape == lse.shape == dscale.shape == (2 * n,)
    assert (loss.dtype, lse.dtype, dscale.dtype) == (F32, torch.float64, F32)
    r_loss, r_lse, r_ds = ref_forward(x, y, nx, ny, a)
    # float32 accumulation of logits up to |a|: a few ulps of the largest logit.
    tol = 4e-6
    _close(loss, r_loss, tol)
    _close(lse, r_lse, tol)
    _close(dscale * a, r_ds * a, tol)  # dscale in units of the logits
    # Without dscale: an empty dscale, and the very same loss and lse.
    loss2, lse2, ds2 = tc.rows_cols_forward(x, y, nx, ny, a)
    assert ds2.shape == (0,) and ds2.dtype == F32 and ds2.device == x.device
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)


def test_grad_matches_float64(tc, case):
    n, d, a, dtype, unit, _, _ = case
    x, y, nx, ny = _inputs(n + d + 1, n, d, dtype, unit)
    _, lse, _ = tc.rows_cols_forward(x, y, nx, ny, a)
    gen = torch.Generator().manual_seed(n)
    g = (torch.rand(2 * n, generator=gen, dtype=torch.float64) + 0.5).float().to(DEV)
    dx, dy = tc.rows_cols_grad(x, y, nx, ny, lse, g, a)
    assert dx.shape == dy.shape == (n, d) and dx.dtype == dy.dtype == F32
    r_dx, r_dy = ref_grad(x, y, nx, ny, lse, g, a)
    # bfloat16: the weights go to the matrix units in bfloat16 (CAST_W), 2^-9 relative.
    tol = 2e-5 if dtype == F32 else 8e-3
    _close(dx, r_dx, tol)
    _close(dy, r_dy, tol)


def test_dscale_is_the_scale_derivative(tc, monkeypatch):
    """dscale = d loss / d scale, both directions (central difference of the float64 loss)."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    x, y, nx, ny = _inputs(3, 37, 24, F32, False)
    _, _, dscale = tc.rows_cols_forward(x, y, nx, ny, 4.0, with_dscale=True)
    h = 1e-6
    fd = (ref_forward(x, y, nx, ny, 4.0 + h)[0] - ref_forward(x, y, nx, ny, 4.0 - h)[0]) / (2 * h)
    _close(dscale, fd, 1e-5)


def test_low_temperature_within_the_rule(tc, monkeypatch):
    """tau = 1e-3 (scale 1000) on unit rows, float32: the loss and the full gradients (the
    op layer's diagonal term added as the contract gives it) within twice eager float32's
    error of the float64 formula (tests/tolerances.py), with several splits and groups: the
    backward's logits are the very floats the forward's lse saw."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    monkeypatch.setattr(tc, "RC_GROUP_ROWS", 20)
    a, n = 1000.0, 37
    x, y, nx, ny = _inputs(11, n, 24, F32, True)
    gen = torch.Generator().manual_seed(12)
    g = (torch.rand(2 * n, generator=gen, dtype=torch.float64) + 0.5).float()

    def objective(xh, yh):  # sum_i g_r_i lr_i + g_c_i lc_i, and the per-direction losses
        s = a * xh @ yh.T
        labels = torch.arange(n)
        lr = torch.nn.functional.cross_entropy(s, labels, reduction="none")
        lc = torch.nn.functional.cross_entropy(s.T, labels, reduction="none")
        return (g.to(s.dtype) * torch.cat([lr, lc])).sum(), torch.cat([lr, lc])

    grads, losses = {}, {}
    for dt in (torch.float64, F32):
        xh = x.cpu().to(dt).requires_grad_()
        yh = y.cpu().to(dt).requires_grad_()
        obj, losses[dt] = objective(xh, yh)
        grads[dt] = torch.autograd.grad(obj, (xh, yh))

    loss, lse, _ = tc.rows_cols_forward(x, y, nx, ny, a)
    dx, dy = tc.rows_cols_grad(x, y, nx, ny, lse, g.to(DEV), a)
    loss, dx, dy = loss.cpu(), dx.cpu(), dy.cpu()
    # The positive pair's term the op layer adds (clip_contract.md).
    c = a * (g[:n] * torch.expm1(-loss[:n]) + g[n:] * torch.expm1(-loss[n:]))
    dx = dx + c[:, None] * y.cpu()
    dy = dy + c[:, None] * x.cpu()
    assert_within_rule(loss, losses[torch.float64], losses[F32], F32, "loss")
    assert_within_rule(dx, grads[torch.float64][0], grads[F32][0], F32, "dx")
    assert_within_rule(dy, grads[torch.float64][1], grads[F32][1], F32, "dy")


def test_bitwise_deterministic_and_tensor_scale(tc, monkeypatch):
    """Twice the same call gives the same bits (several groups and splits); a 0-dim tensor
    scale (read in the kernels) gives the float's bits."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 32)
    monkeypatch.setattr(tc, "RC_GROUP_ROWS", 32)
    x, y, nx, ny = _inputs(21, 70, 40, F32, False)
    g = torch.rand(140, generator=torch.Generator().manual_seed(2)).to(DEV)
    first = tc.rows_cols_forward(x, y, nx, ny, 1 / 0.07, with_dscale=True)
    second = tc.rows_cols_forward(x, y, nx, ny, 1 / 0.07, with_dscale=True)
    scale_t = torch.tensor(1 / 0.07, dtype=torch.float64, device=DEV)
    third = tc.rows_cols_forward(x, y, nx, ny, scale_t, with_dscale=True)
    for a_, b_, c_ in zip(first, second, third):
        assert torch.equal(a_, b_) and torch.equal(a_, c_)
    grads = [tc.rows_cols_grad(x, y, nx, ny, first[1], g, 1 / 0.07),
             tc.rows_cols_grad(x, y, nx, ny, first[1], g, 1 / 0.07),
             tc.rows_cols_grad(x, y, nx, ny, first[1], g, scale_t)]
    for other in grads[1:]:
        assert torch.equal(grads[0][0], other[0]) and torch.equal(grads[0][1], other[1])


def test_groups_and_splits_agree_with_one_program(tc, monkeypatch):
    """Rows per group and columns per split change only the merge order: the same results
    to float32 rounding as one program over the whole matrix."""
    x, y, nx, ny = _inputs(5, 70, 24, F32, True)
    results = []
    for rows, cols in ((70, 70), (32, 32), (20, 45), (None, None)):
        monkeypatch.setattr(tc, "RC_GROUP_ROWS", rows)
        monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
        results.append(tc.rows_cols_forward(x, y, nx, ny, 20.0, with_dscale=True))
    monkeypatch.setattr(tc, "RC_GROUP_ROWS", 20)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 45)
    assert tc.rows_cols_plan(70, DEV) == (4, 20, 2, 45)
    for other in results[1:]:
        for a_, b_ in zip(results[0], other):
            _close(a_, b_.cpu().double(), 2e-6)


def test_exp2_path_matches_float64(tc, monkeypatch):
    """The EXP2 code path (off by default: see the module docstring) stays correct here too."""
    monkeypatch.setattr(tc, "EXP2", True)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    monkeypatch.setattr(tc, "RC_GROUP_ROWS", 20)
    x, y, nx, ny = _inputs(9, 37, 24, F32, False)
    out = tc.rows_cols_forward(x, y, nx, ny, 6.0, with_dscale=True)
    r_loss, r_lse, r_ds = ref_forward(x, y, nx, ny, 6.0)
    _close(out[0], r_loss, 4e-6)
    _close(out[1], r_lse, 4e-6)
    _close(out[2] * 6.0, r_ds * 6.0, 4e-6)
    g = (torch.rand(74, generator=torch.Generator().manual_seed(4)) + 0.5).to(DEV)
    dx, dy = tc.rows_cols_grad(x, y, nx, ny, out[1], g, 6.0)
    r_dx, r_dy = ref_grad(x, y, nx, ny, out[1], g, 6.0)
    _close(dx, r_dx, 2e-5)
    _close(dy, r_dy, 2e-5)


def test_rejects_bad_arguments(tc):
    x, y, nx, ny = _inputs(0, 6, 8, F32, True)
    with pytest.raises(ValueError, match="same shape"):
        tc.rows_cols_forward(x, y[:5], nx, ny, 2.0)
    with pytest.raises(ValueError, match="nx"):
        tc.rows_cols_forward(x, y, nx[:5], ny, 2.0)
    with pytest.raises(TypeError, match="dtype"):
        tc.rows_cols_forward(x, y.to(BF16), nx, ny, 2.0)
    with pytest.raises(ValueError, match="lse"):
        tc.rows_cols_grad(x, y, nx, ny, torch.zeros(6, dtype=torch.float64, device=DEV),
                          torch.ones(12, device=DEV), 2.0)


def test_plan_on_an_h100(tc, monkeypatch):
    """132 SMs: k = ceil(sqrt(4 * 132)) = 23 groups and splits at most, of a multiple of 128
    rows / columns; N = 32768 is 22 x 22 programs of 1536 x 1536 logits, and the partial
    statistics stay O(N sqrt(SMs)): 19.3 MiB at N = 32768, 40.3 MiB at 65536 (with dscale)."""
    monkeypatch.setattr(tc, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert tc.rows_cols_plan(32768, cuda) == (22, 1536, 22, 1536)
    assert tc.rows_cols_plan(1000, cuda) == (8, 128, 8, 128)
    assert tc.rows_cols_plan(1, cuda) == (1, 128, 1, 128)
    for n, mib in ((32768, 20), (65536, 41)):
        groups, _, splits, _ = tc.rows_cols_plan(n, cuda)
        assert math.ceil((4 * splits + 3 * groups) * n * 4 / 2**20) <= mib


def test_backward_tiling_per_d_and_dtype(tc):
    """On the GPU, CLIP's backward keeps its 32-row tiles resident for bf16/fp16 at
    128 < D <= 512 (configs RC_GRAD_CONFIGS, BLOCK_D = D rounded up to a power of two), and
    otherwise uses the other backward passes' tiling; the interpreter always the latter."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128, 200, 256, 512, 600, 1024):
            meta = tc.rows_cols_grad_meta(dtype, d, True, "tf32")
            plain = tc.grad_meta(dtype, d, True, True, True, False, True, "tf32")
            special = dtype != F32 and 128 < d <= 512
            assert tc.rc_grad_resident(dtype, d, True) == special
            if special:
                assert meta == dict(plain, RESIDENT=True, BLOCK_D=256 if d <= 256 else 512)
                kept = tc.prune_configs(tc.RC_GRAD_CONFIGS, "rc_grad", d, dtype)
                assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                        for c in kept} == {(32, 32, 8)}
                assert {c.num_stages for c in kept} == {1, 2}
            else:
                assert meta == plain
            assert not tc.rc_grad_resident(dtype, d, False)
            assert tc.rows_cols_grad_meta(dtype, d, False, "ieee") == tc.grad_meta(
                dtype, d, False, True, True, False, True, "ieee")
