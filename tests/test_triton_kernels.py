"""The Triton contrastive kernels (fastcl/kernels/triton_contrastive.py) against float64 formulas
written here, through the kernel contract v2 directly (no op layer): loss, lse and dscale, the
positive in or out of the denominator, inv_temp as a float or a 0-dim tensor, several column
splits (forced with ``SPLIT_COLUMNS``), D below and above the resident size, run-to-run bitwise
determinism; and the launch plan (split count, configs, the ahead-of-time list).

Without CUDA they run under the interpreter (conftest sets TRITON_INTERPRET=1): small shapes.
The interpreter's resident limit is D <= 64 (BLOCK_D 32 chunks above), its tiles 32 x 32.
"""
from __future__ import annotations

import pytest
import torch

import fastcl
from conftest import TRITON_DEVICE

pytest.importorskip("triton")

DEV = torch.device(TRITON_DEVICE)
# Below and above the resident limit, on both the interpreter (64) and a GPU (256).
D_VALUES = [24, 80] if DEV.type == "cpu" else [24, 80, 300]


@pytest.fixture
def tc():
    from fastcl.kernels import triton_contrastive

    return triton_contrastive


@pytest.fixture(params=[None, 32, 20], ids=["plan", "splits32", "splits20"])
def splits(request, tc, monkeypatch):
    """None: the launcher's own split plan; 32: 32 columns per split (several splits); 20:
    splits that end inside a column tile (the rest of the tile is masked, positives too)."""
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", request.param)
    return request.param


def _unit(x):
    return x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)


def _norm(x):
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(1e-12)


def _rows(gen, n, d, dtype=torch.float32):
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).to(DEV)


def ref_forward(q, k, inv_temp, *, kpos=None, exclude_diag=False, pos_offset=None, pid=True):
    """float64 (loss, lse, dscale) of the contract: dscale_i = sum_j p_ij d_ij - d_pos_i."""
    qn, kn = _unit(q.cpu()), _unit(k.cpu())
    s = qn @ kn.T * inv_temp
    n_q, n_k = s.shape
    keep = torch.ones_like(s, dtype=torch.bool)
    if exclude_diag:
        keep &= ~torch.eye(n_q, n_k, dtype=torch.bool)
    s_pos = torch.zeros(n_q, dtype=torch.float64)
    if pos_offset is not None:
        pc = (torch.arange(n_q) + pos_offset) % n_k
        s_pos = s[torch.arange(n_q), pc]
        if not pid:
            keep[torch.arange(n_q), pc] = False
    if kpos is not None:
        s_pos = (qn * _unit(kpos.cpu())).sum(1) * inv_temp
        if pid:
            s = torch.cat([s_pos[:, None], s], 1)
            keep = torch.cat([torch.ones(n_q, 1, dtype=torch.bool), keep], 1)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, 1)
    p = torch.softmax(s, 1)
    dscale = torch.where(keep, p * s / inv_temp, torch.zeros_like(p)).sum(1) - s_pos / inv_temp
    return lse - s_pos, lse, dscale


def ref_grad(a, b, inv_temp, lse_a=None, g_a=None, lse_b=None, g_b=None, exclude_diag=False,
             pos_offset=None):
    """float64 out_a = inv_temp * sum_b W_ab bhat_b, positive pairs and the diagonal skipped."""
    an, bn = _unit(a.cpu()), _unit(b.cpu())
    s = an @ bn.T * inv_temp
    w = torch.zeros_like(s)
    if lse_a is not None:
        w += g_a.cpu().double()[:, None] * torch.exp(s - lse_a.cpu()[:, None])
    if lse_b is not None:
        w += g_b.cpu().double()[None, :] * torch.exp(s - lse_b.cpu()[None, :])
    n_a, n_b = s.shape
    if exclude_diag:
        w.fill_diagonal_(0.0)
    if pos_offset is not None:
        w[torch.arange(n_a), (torch.arange(n_a) + pos_offset) % n_b] = 0.0
    return inv_temp * w @ bn


def _close(actual, expect, tol=2e-5):
    torch.testing.assert_close(actual.cpu().double(), expect.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("d", D_VALUES)
@pytest.mark.parametrize("pid", [True, False], ids=["pid", "dcl"])
def test_nt_xent_forward_matches_float64(tc, splits, d, pid):
    gen = torch.Generator().manual_seed(d)
    z = _rows(gen, 70, d)
    loss, lse, dscale = tc.nt_xent_forward(z, _norm(z), 2.5, positive_in_denominator=pid,
                                           with_dscale=True)
    r_loss, r_lse, r_ds = ref_forward(z, z, 2.5, exclude_diag=True, pos_offset=35, pid=pid)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float64
    assert dscale.dtype == torch.float32 and dscale.shape == (70,)
    _close(loss, r_loss)
    _close(lse, r_lse)
    _close(dscale, r_ds)


@pytest.mark.parametrize("d", D_VALUES)
@pytest.mark.parametrize("mode", ["key", "column", "none"])
@pytest.mark.parametrize("pid", [True, False], ids=["pid", "dcl"])
def test_lse_forward_matches_float64(tc, splits, d, mode, pid):
    gen = torch.Generator().manual_seed(10 + d)
    q, k, neg = _rows(gen, 40, d), _rows(gen, 40, d), _rows(gen, 75, d)
    if mode == "key":  # MoCo: explicit positive key, shared negatives
        cols, positive, pos_offset = neg, (k, _norm(k)), None
        ref = ref_forward(q, neg, 3.0, kpos=k, pid=pid)
    elif mode == "column":  # in-batch: positive at column i + 5
        cols, positive, pos_offset = neg, None, 5
        ref = ref_forward(q, neg, 3.0, pos_offset=5, pid=pid)
    else:  # the other ranks' block: no positive
        cols, positive, pos_offset = neg, None, None
        ref = ref_forward(q, neg, 3.0, pid=pid)
    out = tc.lse_forward(q, cols, _norm(q), _norm(cols), positive, 3.0, pos_offset,
                         positive_in_denominator=pid, with_dscale=True)
    for got, want in zip(out, ref):
        _close(got, want)


def test_dscale_is_the_temperature_derivative(tc):
    """dscale = d loss / d inv_temp (central difference of the float64 formula)."""
    gen = torch.Generator().manual_seed(3)
    z = _rows(gen, 40, 24)
    _, _, dscale = tc.nt_xent_forward(z, _norm(z), 4.0, with_dscale=True)
    h = 1e-6
    up = ref_forward(z, z, 4.0 + h, exclude_diag=True, pos_offset=20)[0]
    down = ref_forward(z, z, 4.0 - h, exclude_diag=True, pos_offset=20)[0]
    _close(dscale, (up - down) / (2 * h), tol=1e-4)


def test_no_dscale_is_empty(tc):
    z = _rows(torch.Generator().manual_seed(0), 10, 16)
    _, _, dscale = tc.nt_xent_forward(z, _norm(z), 2.0)
    assert dscale.shape == (0,) and dscale.dtype == torch.float32 and dscale.device == z.device


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_tensor_inv_temp_gives_the_float_results(tc, splits, scale_dtype):
    """A 0-dim tensor on the device is read in the kernel; rounded to float32 once, as the
    float is: bitwise the same results, forward and backward."""
    gen = torch.Generator().manual_seed(5)
    z = _rows(gen, 50, 24)
    nz = _norm(z)
    inv = 1 / 0.07
    as_float = tc.nt_xent_forward(z, nz, inv, with_dscale=True)
    as_tensor = tc.nt_xent_forward(z, nz, torch.tensor(inv, dtype=scale_dtype, device=DEV),
                                   with_dscale=True)
    for a, b in zip(as_float, as_tensor):
        assert torch.equal(a, b)
    g = torch.rand(50, generator=gen).to(DEV)
    lse = as_float[1]
    grad_f = tc.nt_xent_grad(z, nz, lse, g, inv)
    grad_t = tc.nt_xent_grad(z, nz, lse, g, torch.tensor(inv, dtype=scale_dtype, device=DEV))
    assert torch.equal(grad_f, grad_t)
    acc_f = tc.grad_accumulate(z, z, nz, nz, None, None, lse, g, inv, 0)
    acc_t = tc.grad_accumulate(z, z, nz, nz, None, None, lse, g,
                               torch.tensor(inv, dtype=scale_dtype, device=DEV), 0)
    assert torch.equal(acc_f, acc_t)


def test_splits_agree_with_one_split(tc, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    q, neg, k = _rows(gen, 33, 40), _rows(gen, 130, 40), _rows(gen, 33, 40)
    results = []
    for cps in (None, 32, 64):
        monkeypatch.setattr(tc, "SPLIT_COLUMNS", cps)
        n_splits, _ = tc.split_plan(33, 130, DEV)
        results.append(tc.lse_forward(q, neg, _norm(q), _norm(neg), (k, _norm(k)), 5.0, None,
                                      with_dscale=True))
    assert tc.split_plan(33, 130, DEV)[0] == 3  # 64 columns a split
    for other in results[1:]:
        for a, b in zip(results[0], other):
            _close(a, b.cpu().double(), tol=1e-6)


@pytest.mark.parametrize("d", D_VALUES)
def test_grads_match_float64(tc, splits, d):
    gen = torch.Generator().manual_seed(20 + d)
    z = _rows(gen, 70, d)
    nz = _norm(z)
    _, lse, _ = tc.nt_xent_forward(z, nz, 2.0)
    g = torch.rand(70, generator=gen, dtype=torch.float64).float().to(DEV)
    out = tc.nt_xent_grad(z, nz, lse, g, 2.0)
    _close(out, ref_grad(z, z, 2.0, lse, g, lse, g, exclude_diag=True, pos_offset=35))

    q, neg = _rows(gen, 40, d), _rows(gen, 75, d)
    nq, nn_ = _norm(q), _norm(neg)
    _, lse_q, _ = tc.lse_forward(q, neg, nq, nn_, None, 2.0, 3)
    gq = torch.rand(40, generator=gen, dtype=torch.float64).float().to(DEV)
    dq = tc.grad_accumulate(q, neg, nq, nn_, lse_q, gq, None, None, 2.0, 3)
    _close(dq, ref_grad(q, neg, 2.0, lse_a=lse_q, g_a=gq, pos_offset=3))
    # The column side: the roles swapped (a = columns, b = rows with the lse), positive pairs
    # (column (i + 3) mod 75 of row i) skipped: pos_offset maps column c to row c - 3 there.
    dneg = tc.grad_accumulate(neg, q, nn_, nq, None, None, lse_q, gq, 2.0, None)
    _close(dneg, ref_grad(neg, q, 2.0, lse_b=lse_q, g_b=gq))


def test_bitwise_deterministic(tc, monkeypatch):
    gen = torch.Generator().manual_seed(30)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 32)
    for d in D_VALUES:
        z = _rows(gen, 66, d)
        nz = _norm(z)
        g = torch.rand(66, generator=gen).to(DEV)
        first = tc.nt_xent_forward(z, nz, 10.0, with_dscale=True)
        second = tc.nt_xent_forward(z, nz, 10.0, with_dscale=True)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        assert torch.equal(tc.nt_xent_grad(z, nz, first[1], g, 10.0),
                           tc.nt_xent_grad(z, nz, first[1], g, 10.0))


def test_low_temperature_with_splits(tc, monkeypatch):
    """tests/test_temperature.py's rule at tau = 1e-3 with the columns in 32-wide splits: the
    backward's logits are still the very floats the split forward saw."""
    from test_temperature import _check, _rows as rows
    from fastcl import reference
    from tolerances import eager_info_nce, eager_nt_xent

    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 32)
    fastcl.set_backend("triton")  # conftest restores the backend
    tau = 1e-3
    gen = torch.Generator().manual_seed(7)
    z1, z2 = rows(gen, 37, 16), rows(gen, 37, 16)
    _check(lambda a, b: fastcl.nt_xent(a.to(DEV), b.to(DEV), tau, reduction="none").cpu(),
           lambda a, b: reference.nt_xent(a, b, tau, reduction="none"),
           lambda a, b: eager_nt_xent(a, b, tau, reduction="none"), [z1, z2], 74, gen)
    q, k, neg = rows(gen, 9, 24), rows(gen, 9, 24), rows(gen, 70, 24)
    _check(lambda a, b, c: fastcl.info_nce(a.to(DEV), b.to(DEV), c.to(DEV), tau,
                                           reduction="none").cpu(),
           lambda a, b, c: reference.info_nce(a, b, c, tau, reduction="none"),
           lambda a, b, c: eager_info_nce(a, b, c, tau, reduction="none"), [q, k, neg], 9, gen)


# ----------------------------------------------------------------------- launch plan ----


def test_moco_batch_fills_an_h100(tc, monkeypatch):
    """256 rows against a 65,536-key queue on 132 SMs: 4 row blocks of 64 x 128 splits of 512
    columns (512 programs), not 4 programs. The plan reads no tile size the autotuner picks."""
    monkeypatch.setattr(tc, "_sm_count", lambda index: 132)
    n_splits, cps = tc.split_plan(256, 65536, torch.device("cuda", 0))
    assert (n_splits, cps) == (128, 512)
    # A big NT-Xent batch needs few splits; a tiny problem gets one.
    assert tc.split_plan(16384, 16384, torch.device("cuda", 0))[0] == 3
    assert tc.split_plan(64, 100, torch.device("cuda", 0)) == (1, 128)
    assert cps % tc.SPLIT_ALIGN == 0
    # The backward's partial rows are capped: 16 splits here, not 128.
    assert tc.split_plan(256, 65536, torch.device("cuda", 0), max_splits=16) == (16, 4096)


def test_configs_pruned_per_d_and_dtype(tc):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (16, 64, 128, 200, 256, 512, 2048):
            for kind, configs in (("fwd", tc.FWD_CONFIGS), ("grad", tc.GRAD_CONFIGS),
                                  ("rc", tc.FWD_CONFIGS)):
                kept = tc.prune_configs(configs, kind, d, dtype)
                assert kept, (kind, d, dtype)
                assert {c.kwargs["BLOCK_N"] for c in kept} == {tc.block_n(d, dtype, kind)}
                assert all(c.kwargs["BLOCK_M"] in (64, 128) for c in kept)


def test_aot_variants_are_complete(tc):
    seen = set()
    for v in tc.aot_variants(every_config=False):
        kernel, sig, constexprs = v["kernel"], v["signature"], v["constexprs"]
        assert set(sig) == set(kernel.arg_names), v["label"]
        assert {k for k, t in sig.items() if t == "constexpr"} == set(constexprs), v["label"]
        assert set(v["options"]) == {"num_warps", "num_stages"}
        seen.add(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
    # forward, combine, backward, split sum; CLIP's rows+columns forward and its combine
    assert seen == {"_lse_fwd_kernel", "_combine_kernel", "_grad_kernel", "_sum_splits_kernel",
                    "_rows_cols_fwd_kernel", "_combine_rows_cols_kernel"}


def test_exp2_path_matches_float64(tc, monkeypatch):
    """The EXP2 code path (off by default: see the module docstring) stays correct."""
    monkeypatch.setattr(tc, "EXP2", True)
    monkeypatch.setattr(tc, "SPLIT_COLUMNS", 32)
    gen = torch.Generator().manual_seed(40)
    z = _rows(gen, 70, 24)
    nz = _norm(z)
    loss, lse, dscale = tc.nt_xent_forward(z, nz, 2.0, with_dscale=True)
    for got, want in zip((loss, lse, dscale),
                         ref_forward(z, z, 2.0, exclude_diag=True, pos_offset=35)):
        _close(got, want)
    g = torch.rand(70, generator=gen, dtype=torch.float64).float().to(DEV)
    _close(tc.nt_xent_grad(z, nz, lse, g, 2.0),
           ref_grad(z, z, 2.0, lse, g, lse, g, exclude_diag=True, pos_offset=35))
