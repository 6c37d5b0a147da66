"""The Triton kernels of the label positives (SupCon: ``labels_forward``, ``labels_grad``,
``labels_sym_forward``, ``labels_sym_grad`` of fastcl/kernels/triton_labels.py, re-exported by
triton_contrastive) through the kernel contract directly (no op layer):
- the forwards against ``reference.label_pairs`` in float64 (loss, lse, dscale, count), within
  the accuracy rule of tests/tolerances.py (2 x the error of the same formula in float32, plus
  atol);
- the gradients against a dense float64 W = ga P - gp Y written here from the contract, the
  rows pass, the columns pass (W^T) and the symmetric pass (W + W^T), within the same rule
  (the baseline: the dense formula in float32);
- offsets > 0 with n < m, tau = 0.07 and 1e-3, n = m = 1 (no column at all: lse = -inf, loss
  0, zero gradients, never NaN), n = 1 with columns, rows without a positive (count 0), all
  labels equal, labels of any int64 value, several column splits (forced, ending inside a
  tile) and the plan's, 16-wide tiles, D resident and chunked, bfloat16 and float16 rows, the
  scale as a 0-dim tensor;
- bitwise determinism, the split count changing only the summation order, the EXP2 path, the
  AOT list.

Without CUDA they run under the interpreter (conftest sets TRITON_INTERPRET=1 before fastcl
is imported): small shapes (tiles 32 x 32, D resident up to 64, chunks of 32 above).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE
from tolerances import acc, assert_within_rule

from fastcl import reference

pytest.importorskip("triton")

DEV = torch.device(TRITON_DEVICE)
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.fixture
def tc():
    from fastcl.kernels import triton_contrastive

    return triton_contrastive


def _norms(x):
    return x.float().norm(dim=1).clamp_min(1e-12)


def _inputs(seed, n, m, offset, d, dtype, n_classes):
    """k (m, D) and its rows q = k[offset:offset + n] (a copy), int64 labels."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(m, d, generator=gen, dtype=F64).to(dtype)
    lk = torch.randint(0, n_classes, (m,), generator=gen)
    q = k[offset:offset + n].clone()
    lq = lk[offset:offset + n].clone()
    return q.to(DEV), k.to(DEV), lq.to(DEV), lk.to(DEV)


def _scalar(v, as_tensor):
    return torch.tensor(v, dtype=F64, device=DEV) if as_tensor else v


def _weights(count, seed):
    """The op layer's ga = g and gp = g / count, both 0 where count = 0 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(count.shape[0], generator=gen, dtype=F64) * 2.0 - 0.5
    has = count > 0
    ga = torch.where(has, g, torch.zeros_like(g))
    gp = torch.where(has, g / torch.where(has, count, torch.ones_like(count)),
                     torch.zeros_like(g))
    return ga, gp


def dense_w(q, k, lq, lk, scale, offset, ga, gp, dt):
    """(W, qhat, khat) in dtype dt: W = ga P - gp Y over the pairs but (i, i + offset), P the
    row softmax (lse from the same dtype), Y the positive mask."""
    qh = F.normalize(q.cpu().to(dt), dim=1)
    kh = F.normalize(k.cpu().to(dt), dim=1)
    n, m = qh.shape[0], kh.shape[0]
    s = (qh @ kh.T) * torch.tensor(float(scale), dtype=dt)
    own = torch.zeros(n, m, dtype=torch.bool)
    own[torch.arange(n), torch.arange(n) + offset] = True
    y = (lq.cpu()[:, None] == lk.cpu()[None, :]) & ~own
    s = s.masked_fill(own, float("-inf"))
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    w = ga.to(dt)[:, None] * p - gp.to(dt)[:, None] * y.to(dt)
    return w, qh, kh


def grads(q, k, lq, lk, scale, offset, ga, gp, dt):
    """(rows' gradient, columns' gradient) of the contract in dtype dt."""
    w, qh, kh = dense_w(q, k, lq, lk, scale, offset, ga, gp, dt)
    sc = torch.tensor(float(scale), dtype=dt)
    return sc * (w @ kh), sc * (w.T @ qh)


def _check_forward(out, q, k, lq, lk, scale, offset, dtype, with_dscale=True):
    loss, lse, dscale, count = out
    n = q.shape[0]
    assert loss.dtype == dscale.dtype == count.dtype == F32 and lse.dtype == F64
    assert loss.shape == lse.shape == count.shape == (n,)
    assert dscale.shape == ((n,) if with_dscale else (0,))
    oracle = reference.label_pairs(q.cpu().double(), k.cpu().double(), lq.cpu(), lk.cpu(),
                                   float(scale), offset)
    base = reference.label_pairs(q.cpu().to(acc(dtype)), k.cpu().to(acc(dtype)), lq.cpu(),
                                 lk.cpu(), float(scale), offset)
    assert torch.equal(count.cpu().double(), oracle[3]), "count"
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(oracle[1])), "lse = -inf rows"
    fin = torch.isfinite(oracle[1])
    for name, a, o, b in (("loss", loss, oracle[0], base[0]),
                          ("lse", lse, oracle[1], base[1]),
                          ("dscale", dscale, oracle[2], base[2])):
        if name == "dscale" and not with_dscale:
            continue
        a = a.cpu()
        assert not torch.isnan(a).any(), name
        if name == "lse":
            a, o, b = a[fin], o[fin], b[fin]
            if not fin.any():
                continue
        assert_within_rule(a, o, b, F32, name)
    return oracle


def _check_grad(got, oracle, base, dtype, name):
    assert got.dtype == F32 and got.shape == oracle.shape and got.is_contiguous()
    assert torch.isfinite(got).all(), name
    assert_within_rule(got.cpu(), oracle, base, F32 if dtype == F32 else dtype, name)


# (n, m, offset, D, scale, dtype, classes, columns per split, scale as a tensor):
# D below and above the interpreter's resident size (64); splits from the plan or forced
# (20: ending inside a 32-column tile).
CASES = [
    (37, 70, 20, 24, 1 / 0.07, F32, 5, 20, False),   # offset, n < m, several splits
    (45, 45, 0, 80, 1 / 0.1, F32, 30, None, True),   # D chunked; many rows without positive
    (1, 1, 0, 8, 10.0, F32, 3, None, False),         # no column at all
    (1, 3, 2, 8, 10.0, F32, 1, None, False),         # n = 1, the last column's row
    (33, 40, 4, 24, 1 / 0.07, F32, 1, 16, True),     # all labels equal
    (40, 64, 10, 24, 1e3, F32, 4, 32, False),       # tau = 1e-3: logits of 1000
    (37, 70, 20, 40, 1 / 0.07, BF16, 5, 20, False),
    (30, 40, 7, 80, 1 / 0.2, F16, 4, 32, True),
]


def _ids(c):
    n, m, off, d, s, dtype, classes, cols, tens = c
    return (f"n{n}-m{m}-off{off}-d{d}-s{s:.3g}-{str(dtype)[6:]}-c{classes}"
            f"-{'plan' if cols is None else f'split{cols}'}{'-tensor' if tens else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_and_grads(tc, monkeypatch, case):
    n, m, off, d, scale, dtype, classes, cols, as_tensor = case
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
    q, k, lq, lk = _inputs(n + m + d, n, m, off, d, dtype, classes)
    nq, nk = _norms(q), _norms(k)
    sc = _scalar(scale, as_tensor)
    out = tc.labels_forward(q, k, nq, nk, lq, lk, sc, off, with_dscale=True)
    oracle = _check_forward(out, q, k, lq, lk, scale, off, dtype)
    loss, lse, _, count = out
    if n == m == 1:
        assert lse.item() == float("-inf") and loss.item() == 0.0 and count.item() == 0.0
    # Without dscale: an empty tensor, the same loss, lse and count.
    again = tc.labels_forward(q, k, nq, nk, lq, lk, sc, off)
    assert again[2].shape == (0,)
    for a, b in zip((again[0], again[1], again[3]), (loss, lse, count)):
        assert torch.equal(a, b)

    ga, gp = _weights(oracle[3], n)
    o_rows, o_cols = grads(q, k, lq, lk, scale, off, ga, gp, F64)
    b_rows, b_cols = grads(q, k, lq, lk, scale, off, ga, gp, acc(dtype))
    ga32, gp32 = ga.float().to(DEV), gp.float().to(DEV)
    rows = tc.labels_grad(q, k, nq, nk, lq, lk, lse, ga32, gp32, None, None, None, sc, off)
    cols_ = tc.labels_grad(k, q, nk, nq, lk, lq, None, None, None, lse, ga32, gp32, sc, off)
    _check_grad(rows, o_rows, b_rows, dtype, "rows' gradient")
    _check_grad(cols_, o_cols, b_cols, dtype, "columns' gradient")
    if n == m == 1:
        assert torch.equal(rows.cpu(), torch.zeros(1, d))


SYM_CASES = [
    (45, 40, 1 / 0.07, F32, 6, 20, False),
    (40, 80, 1 / 0.1, F32, 40, None, True),     # D chunked, rows without a positive
    (1, 8, 10.0, F32, 2, None, False),          # one row: no column
    (37, 24, 1 / 0.07, BF16, 3, 16, True),
]


@pytest.mark.parametrize("case", SYM_CASES,
                         ids=[f"n{c[0]}-d{c[1]}-{str(c[3])[6:]}-c{c[4]}-split{c[5]}"
                              for c in SYM_CASES])
def test_symmetric(tc, monkeypatch, case):
    n, d, scale, dtype, classes, cols, as_tensor = case
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", cols)
    z, _, labels, _ = _inputs(3 * n + d, n, n, 0, d, dtype, classes)
    nz = _norms(z)
    sc = _scalar(scale, as_tensor)
    out = tc.labels_sym_forward(z, nz, labels, sc, with_dscale=True)
    oracle = _check_forward(out, z, z, labels, labels, scale, 0, dtype)
    # The general forward with q = k, offset 0: the same bits.
    general = tc.labels_forward(z, z, nz, nz, labels, labels, sc, 0, with_dscale=True)
    for a, b in zip(out, general):
        assert torch.equal(a, b)
    ga, gp = _weights(oracle[3], n + 1)
    o_rows, o_cols = grads(z, z, labels, labels, scale, 0, ga, gp, F64)
    b_rows, b_cols = grads(z, z, labels, labels, scale, 0, ga, gp, acc(dtype))
    got = tc.labels_sym_grad(z, nz, labels, out[1], ga.float().to(DEV), gp.float().to(DEV), sc)
    _check_grad(got, o_rows + o_cols, b_rows + b_cols, dtype, "symmetric gradient")


def test_any_int64_labels_and_small_tiles(tc, monkeypatch):
    """Labels are compared for equality only (negative, beyond 32 bits); 16 x 16 tiles and
    splits of 24 columns give the float64 values within the rule."""
    monkeypatch.setattr(tc, "INTERPRETER_TILES", dict(BLOCK_M=16, BLOCK_N=16))
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 24)
    q, k, lq, lk = _inputs(5, 21, 50, 9, 24, F32, 4)
    big = torch.tensor([-(2 ** 62), 2 ** 40 + 3, -7, 2 ** 32], device=DEV)
    lq, lk = big[lq], big[lk]
    # 2^32 and 0, 2^40 + 3 and 3 differ: a 32-bit comparison would merge them.
    lk[:5] = torch.tensor([0, 3, 0, 3, -(2 ** 62)], device=DEV)
    lq = lk[9:30].clone()
    nq, nk = _norms(q), _norms(k)
    out = tc.labels_forward(q, k, nq, nk, lq, lk, 5.0, 9, with_dscale=True)
    oracle = _check_forward(out, q, k, lq, lk, 5.0, 9, F32)
    ga, gp = _weights(oracle[3], 3)
    o_rows, o_cols = grads(q, k, lq, lk, 5.0, 9, ga, gp, F64)
    b_rows, b_cols = grads(q, k, lq, lk, 5.0, 9, ga, gp, F32)
    ga32, gp32 = ga.float().to(DEV), gp.float().to(DEV)
    _check_grad(tc.labels_grad(q, k, nq, nk, lq, lk, out[1], ga32, gp32, None, None, None,
                               5.0, 9), o_rows, b_rows, F32, "rows' gradient")
    _check_grad(tc.labels_grad(k, q, nk, nq, lk, lq, None, None, None, out[1], ga32, gp32,
                               5.0, 9), o_cols, b_cols, F32, "columns' gradient")


def test_deterministic_and_split_invariant(tc, monkeypatch):
    """Twice the same call gives the same bits (several splits); the scale as a 0-dim tensor
    gives the float's bits; one split and four agree to float32 rounding."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    q, k, lq, lk = _inputs(11, 30, 64, 30, 24, F32, 4)
    nq, nk = _norms(q), _norms(k)
    s_t = torch.tensor(1 / 0.07, dtype=F64, device=DEV)
    runs = [tc.labels_forward(q, k, nq, nk, lq, lk, 1 / 0.07, 30, with_dscale=True)
            for _ in range(2)]
    runs.append(tc.labels_forward(q, k, nq, nk, lq, lk, s_t, 30, with_dscale=True))
    ga, gp = _weights(runs[0][3].cpu().double(), 1)
    ga32, gp32 = ga.float().to(DEV), gp.float().to(DEV)
    grads_ = [tc.labels_grad(q, k, nq, nk, lq, lk, runs[0][1], ga32, gp32, None, None, None,
                             sc, 30) for sc in (1 / 0.07, 1 / 0.07, s_t)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    assert torch.equal(grads_[0], grads_[1]) and torch.equal(grads_[0], grads_[2])
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 64)
    one = tc.labels_forward(q, k, nq, nk, lq, lk, 1 / 0.07, 30, with_dscale=True)
    for a, b in zip(one, runs[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_rejects_bad_arguments(tc):
    q, k, lq, lk = _inputs(0, 6, 9, 2, 8, F32, 3)
    nq, nk = _norms(q), _norms(k)
    with pytest.raises(ValueError, match="offset"):
        tc.labels_forward(q, k, nq, nk, lq, lk, 1.0, 4)
    with pytest.raises(ValueError, match="int64"):
        tc.labels_forward(q, k, nq, nk, lq.int(), lk, 1.0, 2)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tc.labels_forward(q.double(), k.double(), nq, nk, lq, lk, 1.0, 2)
    ones = torch.ones(6, device=DEV)
    with pytest.raises(ValueError, match="exactly one side"):
        tc.labels_grad(q, k, nq, nk, lq, lk, ones.double(), ones, ones, ones.double(), ones,
                       ones, 1.0, 2)
    with pytest.raises(ValueError, match="exactly one side"):
        tc.labels_grad(q, k, nq, nk, lq, lk, ones.double(), ones, None, None, None, None,
                       1.0, 2)


def test_reexported_by_the_contrastive_backend(tc):
    from fastcl.kernels import triton_labels as tl_

    for name in ("labels_forward", "labels_grad", "labels_sym_forward", "labels_sym_grad"):
        assert getattr(tc, name) is getattr(tl_, name)


def test_aot_variants_cover_the_kernels():
    """The ahead-of-time list (compiled by tests/triton_aot.py): each pass form for each D,
    dtype and precision with its one config, every non-constexpr parameter typed, int64
    labels, distinct labels."""
    from fastcl.kernels import triton_labels as tl_

    items = list(tl_.aot_variants(ds=(128,), dtypes=(F32, BF16), precisions=("ieee",)))
    labels = [it["label"] for it in items]
    assert len(labels) == len(set(labels))
    assert len(items) == 2 * (len(tl_.FWD_FORMS) + len(tl_.GRAD_FORMS)) + 1
    for it in items:
        sig = it["signature"]
        for arg in it["kernel"].arg_names:
            assert arg in sig, (it["label"], arg)
        assert it["constexprs"]["HAS_LABELS"] is True
        for arg in ("LQ", "LK", "LA", "LB"):
            if arg in sig:
                assert sig[arg] == "*i64", (it["label"], arg)
    for dtype in (F32, BF16, F16):
        for kind in ("fwd", "grad"):
            (cfg,) = tl_.labels_configs(kind, 128, dtype)
            assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps) == (64, 64, 8)


def test_exp2_path(tc, monkeypatch):
    """With ``EXP2`` (log2(e) folded into the scale, exp2; off by measurement, kept for a GPU
    to measure) the label forward's base-2 state converts back: loss, lse, dscale and the
    gradients within the rule at tau = 0.07, through the combine (several splits)."""
    monkeypatch.setattr(tc, "EXP2", True)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 20)
    z, _, labels, _ = _inputs(17, 33, 33, 0, 24, F32, 5)
    nz = _norms(z)
    out = tc.labels_sym_forward(z, nz, labels, 1 / 0.07, with_dscale=True)
    oracle = _check_forward(out, z, z, labels, labels, 1 / 0.07, 0, F32)
    ga, gp = _weights(oracle[3], 5)
    o_rows, o_cols = grads(z, z, labels, labels, 1 / 0.07, 0, ga, gp, F64)
    b_rows, b_cols = grads(z, z, labels, labels, 1 / 0.07, 0, ga, gp, F32)
    got = tc.labels_sym_grad(z, nz, labels, out[1], ga.float().to(DEV), gp.float().to(DEV),
                             1 / 0.07)
    _check_grad(got, o_rows + o_cols, b_rows + b_cols, F32, "symmetric gradient")


def test_gpu_form_of_the_positive_sums(tc, monkeypatch):
    """On the GPU with matrix-unit dots (SUM_DOT off, bf16 here) the positives' sum and count
    are one paired tl.reduce; the interpreter runs that form here (its logits then from
    tl.dot): within the rule, with several splits."""
    common = tc._common_meta

    def gpu_form(*args, **kwargs):
        return dict(common(*args, **kwargs), SUM_DOT=False)

    monkeypatch.setattr(tc, "_common_meta", gpu_form)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 16)
    q, k, lq, lk = _inputs(23, 12, 40, 5, 24, BF16, 3)
    out = tc.labels_forward(q, k, _norms(q), _norms(k), lq, lk, 1 / 0.07, 5, with_dscale=True)
    _check_forward(out, q, k, lq, lk, 1 / 0.07, 5, BF16)
