"""The Triton kernels of the SigLIP sigmoid epilogue (``sigmoid_forward`` / ``sigmoid_grad`` of
fastcl/kernels/triton_sigmoid.py, re-exported by triton_contrastive) against a float64 formula
written here, through the kernel contract directly (no op layer): per-row loss, dscale and
dbias, dx and dy of the forward (with_grads), the g-weighted gradients of ``sigmoid_grad``;
positives at offset 0, a positive offset, some or all out of range, none at all; negative
scale, logits of +-100, n = 1, m != n; scale and bias as floats and as 0-dim tensors; several
column splits and small tiles (the fixed-order combines); float32, bfloat16 and float16 rows
within the accuracy rule of tests/tolerances.py (2 x eager float32 PyTorch's error against
float64, plus atol); bitwise run-to-run determinism; the ahead-of-time list.

Without CUDA they run under the interpreter (conftest sets TRITON_INTERPRET=1 before fastcl
is imported): small shapes (tiles 32 x 32, D resident up to 64, chunks of 32 above).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE
from tolerances import acc, assert_within_rule

pytest.importorskip("triton")

DEV = torch.device(TRITON_DEVICE)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture
def tc():
    from fastcl.kernels import triton_contrastive

    return triton_contrastive


def _inputs(seed, n, m, d, dtype, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * spread
    y = torch.randn(m, d, generator=gen, dtype=torch.float64) * spread
    return x.to(dtype).to(DEV), y.to(dtype).to(DEV)


def _labels(n, m, pos_offset, dtype):
    t = -torch.ones(n, m, dtype=dtype)
    if pos_offset is not None:
        for i in range(n):
            if 0 <= i + pos_offset < m:
                t[i, i + pos_offset] = 1.0
    return t


def ref(x, y, scale, bias, pos_offset, g=None):
    """The contract in float64: z = scale x.y + bias, l = softplus(-t z) written out stably,
    w = -t sigmoid(-t z); (loss, dscale, dbias, dx, dy) with dx = scale (g w) y and
    dy = scale (g w)^T x (g = 1 without it)."""
    x, y = x.cpu().double(), y.cpu().double()
    dots = x @ y.T
    z = float(scale) * dots + float(bias)
    t = _labels(x.shape[0], y.shape[0], pos_offset, torch.float64)
    u = -t * z
    loss = torch.clamp(u, min=0.0) + torch.log1p(torch.exp(-u.abs()))
    w = -t * torch.sigmoid(u)
    wg = w if g is None else g.cpu().double()[:, None] * w
    return (loss.sum(1), (w * dots).sum(1), w.sum(1), float(scale) * wg @ y,
            float(scale) * wg.T @ x)


def eager(x, y, scale, bias, pos_offset, g=None):
    """What users run today, in the accumulation dtype (float32): -logsigmoid(t z) with its
    autograd gradients; dscale / dbias per row from eager's own dl/dz. Gradients through the
    cast, in the inputs' dtype (tests/tolerances.py)."""
    dt = acc(x.dtype)
    xin = x.cpu().clone().requires_grad_()
    yin = y.cpu().clone().requires_grad_()
    xa, ya = xin.to(dt), yin.to(dt)
    dots = xa @ ya.T
    z = torch.tensor(float(scale), dtype=dt) * dots + torch.tensor(float(bias), dtype=dt)
    z.retain_grad()
    pairs = -F.logsigmoid(_labels(x.shape[0], y.shape[0], pos_offset, dt) * z)
    weights = torch.ones(x.shape[0], dtype=dt) if g is None else g.cpu().to(dt)
    (weights[:, None] * pairs).sum().backward()
    w = z.grad if g is None else None
    dots = dots.detach()
    stats = ((pairs.sum(1).detach(), (w * dots).sum(1), w.sum(1)) if w is not None
             else (None, None, None))
    return stats + (xin.grad, yin.grad)


def _scalar(v, as_tensor):
    return torch.tensor(v, dtype=torch.float64, device=DEV) if as_tensor else v


def _check_all(got, oracle, base, dtype, names):
    for name, a, o, b in zip(names, got, oracle, base):
        if name in ("dx", "dy"):
            assert a.dtype == F32 and a.is_contiguous()
            assert_within_rule(a.cpu(), o, b, dtype, name)
        else:
            assert a.dtype == F32
            assert_within_rule(a.cpu(), o, b, F32, name)
        assert torch.isfinite(a).all(), name


# (n, m, D, scale, bias, pos_offset, dtype, columns per split, scale/bias as tensors):
# D below and above the interpreter's resident size (64); splits from the plan or forced (20,
# 16: ending inside a 32-column tile).
CASES = [
    (1, 1, 5, 1.0, 0.0, 0, F32, None, False),
    (37, 45, 40, 0.3, -2.0, 3, F32, 20, False),
    (45, 37, 80, -0.4, 1.5, 0, F32, 16, True),
    (37, 70, 24, 0.5, -1.0, None, F32, 32, False),
    (20, 30, 24, 0.5, 0.5, 15, F32, None, True),   # rows 15..19 have no positive
    (12, 9, 8, 2.0, -10.0, 40, F32, 4, False),     # every positive out of range
    (37, 45, 40, 0.3, -2.0, 3, BF16, 20, False),
    (33, 40, 80, 0.3, 1.0, 0, F16, 32, True),
]


def _ids(c):
    n, m, d, s, b, off, dtype, cols, tens = c
    return (f"n{n}-m{m}-d{d}-s{s:g}-b{b:g}-off{off}-{str(dtype)[6:]}"
            f"-{'plan' if cols is None else f'split{cols}'}{'-tensor' if tens else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_matches_float64(tc, monkeypatch, case):
    n, m, d, scale, bias, off, dtype, cols, as_tensor = case
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
    x, y = _inputs(n + m + d, n, m, d, dtype)
    out = tc.sigmoid_forward(x, y, _scalar(scale, as_tensor), _scalar(bias, as_tensor), off,
                             True)
    assert [tuple(t.shape) for t in out] == [(n,), (n,), (n,), (n, d), (m, d)]
    _check_all(out, ref(x, y, scale, bias, off), eager(x, y, scale, bias, off), dtype,
               ("loss", "dscale", "dbias", "dx", "dy"))
    # Without the gradients: empty dx and dy, the same statistics (the same bits under the
    # interpreter; on a GPU the stats-only pass is another compiled kernel).
    loss, dscale, dbias, dx, dy = tc.sigmoid_forward(x, y, scale, bias, off, False)
    assert dx.shape == dy.shape == (0,) and dx.dtype == dy.dtype == F32
    for a, b in zip((loss, dscale, dbias), out[:3]):
        if DEV.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


GRAD_CASES = [
    (37, 45, 40, 0.3, -2.0, 3, F32, 20, False),
    (45, 37, 80, -0.4, 1.5, None, F32, None, True),
    (37, 45, 40, 0.3, -2.0, 0, BF16, 20, False),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[_ids(c) for c in GRAD_CASES])
def test_grad_matches_float64(tc, monkeypatch, case):
    n, m, d, scale, bias, off, dtype, cols, as_tensor = case
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
    x, y = _inputs(n + m + d + 1, n, m, d, dtype)
    gen = torch.Generator().manual_seed(n)
    g = (torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 0.5).float()
    dx, dy = tc.sigmoid_grad(x, y, _scalar(scale, as_tensor), _scalar(bias, as_tensor), off,
                             g.to(DEV), True, True)
    assert dx.shape == (n, d) and dy.shape == (m, d)
    r = ref(x, y, scale, bias, off, g)
    e = eager(x, y, scale, bias, off, g)
    _check_all((dx, dy), r[3:], e[3:], dtype, ("dx", "dy"))
    # One side only: the other is an empty tensor, the needed one the same bits.
    dx1, dy1 = tc.sigmoid_grad(x, y, scale, bias, off, g.to(DEV), True, False)
    assert dy1.shape == (0,) and torch.equal(dx1, dx)
    dx2, dy2 = tc.sigmoid_grad(x, y, scale, bias, off, g.to(DEV), False, True)
    assert dx2.shape == (0,) and torch.equal(dy2, dy)


@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_large_logits_are_finite(tc, monkeypatch, bias):
    """Logits near +-100 (the bias dominates): softplus and the weights stay finite and within
    the rule; the positive's weight is -sigmoid(-z) (no 1 - sigmoid cancellation)."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    x, y = _inputs(5, 30, 26, 24, F32, spread=0.2)
    out = tc.sigmoid_forward(x, y, 1.0, bias, 2, True)
    _check_all(out, ref(x, y, 1.0, bias, 2), eager(x, y, 1.0, bias, 2), F32,
               ("loss", "dscale", "dbias", "dx", "dy"))


def test_splits_and_tiles_agree(tc, monkeypatch):
    """The column splits and the tile sizes change only the summation order: every plan gives
    the float64 values to float32 rounding (1, 3 and 9 splits; 32- and 16-wide tiles)."""
    x, y = _inputs(8, 40, 70, 24, F32)
    r = ref(x, y, 0.7, -1.0, 5)
    for tile, cols in ((32, 70), (32, 24), (16, 8)):
        monkeypatch.setattr(tc, "INTERPRETER_TILES", dict(BLOCK_M=tile, BLOCK_N=tile))
        monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
        out = tc.sigmoid_forward(x, y, 0.7, -1.0, 5, True)
        for a, b in zip(out, r):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.cpu().double(), b, rtol=0.0, atol=4e-6 * scale)


def test_bitwise_deterministic_and_tensor_scalars(tc, monkeypatch):
    """Twice the same call gives the same bits (several splits); scale and bias as 0-dim
    tensors (float32 or float64, loaded in the kernel) give the floats' bits."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    x, y = _inputs(21, 37, 45, 40, F32)
    g = torch.rand(37, generator=torch.Generator().manual_seed(2)).to(DEV)
    s_t = torch.tensor(1 / 0.07, dtype=torch.float64, device=DEV)
    b_t = torch.tensor(-3.3, dtype=torch.float32, device=DEV)
    runs = [tc.sigmoid_forward(x, y, 1 / 0.07, -3.3, 1, True),
            tc.sigmoid_forward(x, y, 1 / 0.07, -3.3, 1, True),
            tc.sigmoid_forward(x, y, s_t, b_t, 1, True)]
    grads = [tc.sigmoid_grad(x, y, 1 / 0.07, -3.3, 1, g, True, True),
             tc.sigmoid_grad(x, y, 1 / 0.07, -3.3, 1, g, True, True),
             tc.sigmoid_grad(x, y, s_t, b_t, 1, g, True, True)]
    for first, other in ((runs[0], runs[1]), (runs[0], runs[2]),
                         (grads[0], grads[1]), (grads[0], grads[2])):
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_rejects_bad_arguments(tc):
    x, y = _inputs(0, 6, 7, 8, F32)
    with pytest.raises(ValueError, match="feature size"):
        tc.sigmoid_forward(x, y[:, :5], 1.0, 0.0, 0, False)
    with pytest.raises(TypeError, match="dtype"):
        tc.sigmoid_forward(x, y.to(BF16), 1.0, 0.0, 0, False)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tc.sigmoid_forward(x.double(), y.double(), 1.0, 0.0, 0, False)
    with pytest.raises(ValueError, match="g must have shape"):
        tc.sigmoid_grad(x, y, 1.0, 0.0, 0, torch.ones(7, device=DEV), True, True)


def test_reexported_by_the_contrastive_backend(tc):
    from fastcl.kernels import triton_sigmoid as ts

    assert tc.sigmoid_forward is ts.sigmoid_forward and tc.sigmoid_grad is ts.sigmoid_grad


def test_one_config_per_pass():
    """Every pass runs one config per (D, dtype, precision) (the AOT check compiles it): the
    contrastive backward's first kept one, 64 x 64 tiles with 8 warps."""
    from fastcl.kernels import triton_sigmoid as ts

    for dtype in (F32, BF16, F16):
        for d in (64, 128, 256, 1024):
            for precision in ("ieee", "tf32"):
                (cfg,) = ts.sig_configs(d, dtype, precision)
                assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps) == (64, 64, 8)


def test_aot_variants_cover_the_kernels():
    """The ahead-of-time list (compiled by tests/triton_aot.py): every pass for each D, dtype
    and precision, every non-constexpr parameter typed, float64 partials, the scale and bias
    pointers typed alike, distinct labels."""
    from fastcl.kernels import triton_sigmoid as ts

    items = list(ts.aot_variants(ds=(64, 128, 256, 1024), dtypes=(F32, BF16, F16),
                                 precisions=("ieee", "tf32"), every_config=False))
    labels = [it["label"] for it in items]
    assert len(labels) == len(set(labels))
    # 4 D x (2 float32 precisions + 2 half types) x 3 passes, plus the combine.
    assert len(items) == 4 * 4 * 3 + 1
    for it in items:
        fn = it["kernel"]
        for arg in fn.arg_names:
            assert arg in it["signature"], (it["label"], arg)
        sig = it["signature"]
        if "BIAS" in sig:
            assert sig["BIAS"] == sig["SCALE"] and sig["bias_val"] == sig["scale_val"] == "fp32"
        if it["constexprs"].get("WITH_STATS", True):
            assert sig["PART"] == "*fp64"
