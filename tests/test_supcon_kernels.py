"""SupCon's label-positive kernels (``labels_forward`` / ``labels_grad`` / ``labels_sym_forward``
/ ``labels_sym_grad``, the contract in fastcl/kernels/__init__.py) of the CPU backends on their
own: the C++ kernels always, the chunked backend's where it has them.

Oracles, in float64 from the (rounded) inputs and the norms as passed (qhat = q / nq):
- the forward's (loss, lse, dscale, count): ``reference.label_pairs`` (normalize=False);
- the gradients: the dense weights written out, W_ij = ga_i exp(s_ij - lse_i) - gp_i y_ij off
  the own column (y the positive mask), dq = inv_temp W khat, dk = inv_temp W^T qhat, and in the
  symmetric case dz = inv_temp (W + W^T) zhat.
The eager baseline of the tolerance rule (tests/tolerances.py: at most twice eager's error plus
the dtype's atol) is the same forward in the accumulation dtype and, for the gradients,
autograd of L = sum_i ga_i lse_i - gp_i sum_j y_ij s_ij (whose gradient the kernels form) there.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (assert_bitwise_across_threads, assert_thread_runs_agree, kernel_module,
                      thread_runs, tile_patch)
from fastcl import reference
from tolerances import (acc, assert_within_rule, bf16_product_settings, bf16_products,
                        products_floor)

F64 = torch.float64
FWD = ("loss", "lse", "dscale", "count")

# The backends with the label kernels: cpp always, chunked once it has them.
BACKENDS = [name for name in ("cpp", "chunked")
            if hasattr(kernel_module(name), "labels_forward")]


# ----------------------------------------------------------------------------- formulas ---


def _hat(x, n, dtype):
    return x.to(dtype) / n.to(dtype)[:, None]


def _masks(n, m, lq, lk, offset):
    own = torch.zeros(n, m, dtype=torch.bool)
    own[torch.arange(n), torch.arange(n) + offset] = True
    return own, (lq[:, None] == lk[None, :]) & ~own


def _forward_formula(q, k, nq, nk, lq, lk, inv_temp, offset, dtype):
    out = reference.label_pairs(_hat(q, nq, dtype), _hat(k, nk, dtype), lq, lk, inv_temp,
                                offset, normalize=False)
    return dict(zip(FWD, out))


def _grads_oracle(q, k, nq, nk, lq, lk, inv_temp, offset, ga, gp):
    """(dqhat, dkhat) in float64 from the dense weights (the statistics on q's rows)."""
    qh, kh = _hat(q, nq, F64), _hat(k, nk, F64)
    n, m = qh.shape[0], kh.shape[0]
    own, pos = _masks(n, m, lq, lk, offset)
    s = inv_temp * (qh @ kh.T)
    lse = torch.logsumexp(s.masked_fill(own, float("-inf")), 1)
    p = torch.exp(s - lse[:, None]).masked_fill(own, 0)
    w = ga.to(F64)[:, None] * p - gp.to(F64)[:, None] * pos.to(F64)
    return inv_temp * (w @ kh), inv_temp * (w.T @ qh)


def _eager_grads(q, k, nq, nk, lq, lk, inv_temp, offset, ga, gp, sym=False):
    """Autograd of L = sum ga lse - sum gp y s in the accumulation dtype: (dqhat, dkhat), or
    dzhat (sym: q = k = z, one leaf)."""
    dtype = acc(q.dtype)
    qh = _hat(q, nq, dtype).detach().requires_grad_()
    kh = qh if sym else _hat(k, nk, dtype).detach().requires_grad_()
    n, m = qh.shape[0], kh.shape[0]
    own, pos = _masks(n, m, lq, lk, offset)
    s = inv_temp * (qh @ kh.T)
    lse = torch.logsumexp(s.masked_fill(own, float("-inf")), 1)
    loss = (ga.to(dtype) * lse).sum() - (gp.to(dtype)[:, None] * (s * pos.to(dtype))).sum()
    loss.backward()
    return qh.grad if sym else (qh.grad, kh.grad)


def _g_split(count, gen, dtype):
    """The op layer's (ga, gp) from a random upstream g: ga = g, gp = g / count, both 0 where
    count = 0."""
    g = torch.randn(count.shape[0], generator=gen, dtype=F64).to(dtype)
    has = count > 0
    ga = torch.where(has, g, torch.zeros_like(g))
    gp = torch.where(has, g / count.clamp_min(1).to(dtype), torch.zeros_like(g))
    return ga, gp


# ------------------------------------------------------------------------------ inputs ----


def _labels(m, classes, gen, big=False):
    lab = torch.randint(0, max(classes, 1), (m,), generator=gen)
    if big:  # spread over the whole int64 range, negative ones included
        lab = lab * (2**40 * 7919) - 2**62
    return lab


def _inputs(n, m, d, dtype, seed, classes, norms="real", big=False):
    """Rows of norms spread ~e^{+-1}, passed with their own norms or with ones (then used as
    given), and int64 labels of ``classes`` values."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(m, d, generator=gen, dtype=F64) / d ** 0.5
    k = (k * torch.exp(torch.randn(m, 1, generator=gen, dtype=F64))).to(dtype)
    a = acc(dtype)
    nk = (torch.ones(m, dtype=a) if norms == "ones"
          else torch.linalg.vector_norm(k.to(a), dim=1).clamp_min(1e-12))
    return k, nk, _labels(m, classes, gen, big), gen


def _sym(module, z, nz, lab, inv_temp, ga=None, gp=None, with_dscale=True, gen=None):
    kern = kernel_module(module)
    loss, lse, dscale, count = kern.labels_sym_forward(z, nz, lab, inv_temp,
                                                       with_dscale=with_dscale)
    out = {"loss": loss, "lse": lse, "dscale": dscale, "count": count}
    if ga is None:
        ga, gp = _g_split(count, gen, count.dtype)
    out["dz"] = kern.labels_sym_grad(z, nz, lab, lse, ga, gp, inv_temp)
    return out, ga, gp


def _general(module, q, k, nq, nk, lq, lk, inv_temp, offset, gen, with_dscale=True):
    kern = kernel_module(module)
    loss, lse, dscale, count = kern.labels_forward(q, k, nq, nk, lq, lk, inv_temp, offset,
                                                   with_dscale=with_dscale)
    ga, gp = _g_split(count, gen, count.dtype)
    dq = kern.labels_grad(q, k, nq, nk, lq, lk, lse, ga, gp, None, None, None, inv_temp, offset)
    dk = kern.labels_grad(k, q, nk, nq, lk, lq, None, None, None, lse, ga, gp, inv_temp, offset)
    out = {"loss": loss, "lse": lse, "dscale": dscale, "count": count, "dq": dq, "dk": dk}
    return out, ga, gp


def _check_forward(out, q, k, nq, nk, lq, lk, inv_temp, offset, names=FWD):
    dtype = acc(q.dtype)
    oracle = _forward_formula(q, k, nq, nk, lq, lk, inv_temp, offset, F64)
    eager = _forward_formula(q, k, nq, nk, lq, lk, inv_temp, offset, dtype)
    for name in names:
        got = out[name]
        assert got.dtype == (F64 if name == "lse" else dtype), name
        assert got.shape == oracle[name].shape, name
        if name == "count":
            assert torch.equal(got.double(), oracle[name]), name
            continue
        ref = oracle[name]
        # lse = -inf for a row with no column at all (n = m = 1): exactly that
        lone = torch.isinf(ref)
        assert torch.equal(got[lone].double(), ref[lone]), name
        if not lone.all():
            assert_within_rule(got[~lone], ref[~lone], eager[name][~lone], dtype, what=name)


def _check_sym(out, z, nz, lab, inv_temp, ga, gp, names=FWD, module=None):
    _check_forward(out, z, z, nz, nz, lab, lab, inv_temp, 0, names)
    dq, dk = _grads_oracle(z, z, nz, nz, lab, lab, inv_temp, 0, ga, gp)
    eager = _eager_grads(z, z, nz, nz, lab, lab, inv_temp, 0, ga, gp, sym=True)
    dtype = acc(z.dtype)
    assert out["dz"].dtype == dtype and out["dz"].shape == z.shape
    assert_within_rule(out["dz"], dq + dk, eager, dtype, what="dz",
                       floor=products_floor(module, z.dtype, dq + dk))


def _check_general(out, q, k, nq, nk, lq, lk, inv_temp, offset, ga, gp, names=FWD,
                   module=None):
    _check_forward(out, q, k, nq, nk, lq, lk, inv_temp, offset, names)
    dq, dk = _grads_oracle(q, k, nq, nk, lq, lk, inv_temp, offset, ga, gp)
    eq, ek = _eager_grads(q, k, nq, nk, lq, lk, inv_temp, offset, ga, gp)
    dtype = acc(q.dtype)
    for name, got, oracle, eager in (("dq", out["dq"], dq, eq), ("dk", out["dk"], dk, ek)):
        assert got.dtype == dtype and got.shape == oracle.shape, name
        assert_within_rule(got, oracle, eager, dtype, what=name,
                           floor=products_floor(module, q.dtype, oracle))


# ------------------------------------------------------------------------------- tests ----


def test_the_gradient_oracle_is_the_autograd_gradient():
    """The dense weights formula (the oracle) is autograd's gradient of sum ga lse - gp y s in
    float64, symmetric and general."""
    k, nk, lk, gen = _inputs(23, 23, 6, F64, seed=1, classes=4)
    count = _forward_formula(k, k, nk, nk, lk, lk, 3.0, 0, F64)["count"]
    ga, gp = _g_split(count, gen, F64)
    dq, dk = _grads_oracle(k, k, nk, nk, lk, lk, 3.0, 0, ga, gp)
    dz = _eager_grads(k, k, nk, nk, lk, lk, 3.0, 0, ga, gp, sym=True)
    torch.testing.assert_close(dq + dk, dz, rtol=1e-12, atol=1e-12)
    q, nq, lq = k[5:15], nk[5:15], lk[5:15]
    count = _forward_formula(q, k, nq, nk, lq, lk, 3.0, 5, F64)["count"]
    ga, gp = _g_split(count, gen, F64)
    for a, b in zip(_grads_oracle(q, k, nq, nk, lq, lk, 3.0, 5, ga, gp),
                    _eager_grads(q, k, nq, nk, lq, lk, 3.0, 5, ga, gp)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", BACKENDS)
@given(
    n=st.integers(1, 90),
    d=st.sampled_from([3, 17, 32]),
    tile=st.sampled_from([3, 4, 8, 128]),
    scale=st.sampled_from([1.0, 2.5, 14.3, 50.0]),
    classes=st.sampled_from([1, 3, 10, 1000]),
    dtype=st.sampled_from([torch.float32, F64]),
    norms=st.sampled_from(["ones", "real"]),
    with_dscale=st.booleans(),
    big=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sym_matches_the_float64_formula(module, n, d, tile, scale, classes, dtype, norms,
                                         with_dscale, big, seed):
    z, nz, lab, gen = _inputs(n, n, d, dtype, seed, classes, norms, big)
    with tile_patch(module, tile):
        out, ga, gp = _sym(module, z, nz, lab, scale, with_dscale=with_dscale, gen=gen)
    names = ["loss", "lse", "count"]
    if with_dscale:
        names.append("dscale")
    else:
        assert out["dscale"].shape == (0,)
    _check_sym(out, z, nz, lab, scale, ga, gp, names)


@pytest.mark.parametrize("module", BACKENDS)
@given(
    data=st.data(),
    m=st.integers(1, 90),
    d=st.sampled_from([3, 17, 32]),
    tile=st.sampled_from([3, 4, 8, 128]),
    scale=st.sampled_from([1.0, 2.5, 14.3, 50.0]),
    classes=st.sampled_from([1, 3, 10, 1000]),
    dtype=st.sampled_from([torch.float32, F64]),
    same_block=st.booleans(),
    with_dscale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_general_matches_the_float64_formula(module, data, m, d, tile, scale, classes, dtype,
                                             same_block, with_dscale, seed):
    """Rows q against columns k, row i's own column i + offset: q = k[offset:offset + n]
    (contrast_mode="one", a rank's block) or other rows with labels of their own."""
    n = data.draw(st.integers(1, m), label="n")
    offset = data.draw(st.integers(0, m - n), label="offset")
    k, nk, lk, gen = _inputs(n, m, d, dtype, seed, classes)
    if same_block:
        q, nq, lq = k[offset:offset + n], nk[offset:offset + n], lk[offset:offset + n]
    else:
        q, nq, lq, _ = _inputs(n, n, d, dtype, seed + 1, classes)
    with tile_patch(module, tile):
        out, ga, gp = _general(module, q, k, nq, nk, lq, lk, scale, offset, gen, with_dscale)
    names = ["loss", "lse", "count"] + (["dscale"] if with_dscale else [])
    _check_general(out, q, k, nq, nk, lq, lk, scale, offset, ga, gp, names)


@pytest.mark.parametrize("module", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,tile", [(2, 4), (5, 5), (6, 5), (13, 4), (40, 128)])
def test_block_edges(module, dtype, n, tile):
    """Two rows; one full tile; a last block of one row; several blocks; one partial tile."""
    z, nz, lab, gen = _inputs(n, n, 7, dtype, seed=n, classes=3)
    with tile_patch(module, tile):
        out, ga, gp = _sym(module, z, nz, lab, 10.0, gen=gen)
        _check_sym(out, z, nz, lab, 10.0, ga, gp)
        gout, ga, gp = _general(module, z[1:], z, nz[1:], nz, lab[1:], lab, 10.0, 1, gen)
        _check_general(gout, z[1:], z, nz[1:], nz, lab[1:], lab, 10.0, 1, ga, gp)


@pytest.mark.parametrize("module", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_a_lone_row(module, dtype):
    """n = 1 (and m = 1): no column at all, lse = -inf, loss and dscale 0, count 0, zero
    gradients, nothing NaN, even with an upstream g given as the op layer would not."""
    a = acc(dtype)
    z = torch.randn(1, 5, dtype=dtype)
    nz = torch.linalg.vector_norm(z.to(a), dim=1)
    lab = torch.tensor([7])
    kern = kernel_module(module)
    for out in (kern.labels_sym_forward(z, nz, lab, 10.0, with_dscale=True),
                kern.labels_forward(z, z, nz, nz, lab, lab, 10.0, 0, with_dscale=True)):
        loss, lse, dscale, count = out
        assert lse.dtype == F64 and lse.item() == float("-inf")
        for v in (loss, dscale, count):
            assert v.dtype == a and v.tolist() == [0.0]
    zero = torch.zeros(1, dtype=a)
    lse = torch.full((1,), float("-inf"), dtype=F64)
    for got in (kern.labels_sym_grad(z, nz, lab, lse, zero, zero, 10.0),
                kern.labels_grad(z, z, nz, nz, lab, lab, lse, zero, zero, None, None, None,
                                 10.0, 0),
                kern.labels_grad(z, z, nz, nz, lab, lab, None, None, None, lse, zero, zero,
                                 10.0, 0)):
        assert torch.equal(got, torch.zeros_like(got)), got


@pytest.mark.parametrize("module", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["distinct", "equal", "extremes"])
def test_label_patterns(module, dtype, case):
    """All labels distinct (one view: every count 0, every loss 0 and, with ga = gp = 0, a zero
    gradient); all equal (every other row a positive); the int64 extremes and -1, 0 (equality
    only: no overflow, no sign games). Tiles of 4 over 30 rows, offset 6 for the rows' block."""
    n = 30
    z, nz, _, gen = _inputs(n, n, 9, dtype, seed=3, classes=1)
    if case == "distinct":
        lab = torch.randperm(n, generator=gen) * 3 - 40
    elif case == "equal":
        lab = torch.full((n,), -5)
    else:
        vals = torch.tensor([-2**63, 2**63 - 1, -1, 0])
        lab = vals[torch.randint(0, 4, (n,), generator=gen)]
    with tile_patch(module, 4):
        out, ga, gp = _sym(module, z, nz, lab, 14.0, gen=gen)
        _check_sym(out, z, nz, lab, 14.0, ga, gp)
        q, nq, lq = z[6:20], nz[6:20], lab[6:20]
        gout, gga, ggp = _general(module, q, z, nq, nz, lq, lab, 14.0, 6, gen)
        _check_general(gout, q, z, nq, nz, lq, lab, 14.0, 6, gga, ggp)
    if case == "distinct":
        for o in (out, gout):
            assert torch.equal(o["count"], torch.zeros_like(o["count"]))
            assert torch.equal(o["loss"], torch.zeros_like(o["loss"]))
            assert torch.equal(o["dscale"], torch.zeros_like(o["dscale"]))
        assert torch.equal(out["dz"], torch.zeros_like(out["dz"]))
        assert torch.equal(gout["dq"], torch.zeros_like(gout["dq"]))
        assert torch.equal(gout["dk"], torch.zeros_like(gout["dk"]))
    if case == "equal":
        assert torch.equal(out["count"], torch.full_like(out["count"], n - 1))


@pytest.mark.parametrize("module", BACKENDS)
def test_zero_vectors_give_no_nan(module):
    """Rows of zeros (norms clamped at eps, as F.normalize: zero logits) among others, float32
    and float64, norms as F.normalize clamps them: finite outputs within the rule."""
    for dtype in (torch.float32, F64):
        z, _, lab, gen = _inputs(20, 20, 6, dtype, seed=4, classes=3)
        z[[0, 7, 8]] = 0
        nz = torch.linalg.vector_norm(z.to(acc(dtype)), dim=1).clamp_min(1e-12)
        with tile_patch(module, 4):
            out, ga, gp = _sym(module, z, nz, lab, 10.0, gen=gen)
            gout, gga, ggp = _general(module, z[:12], z, nz[:12], nz, lab[:12], lab, 10.0, 0,
                                      gen)
        for o in (out, gout):
            for name, v in o.items():
                assert torch.isfinite(v).all(), (dtype, name)
        _check_sym(out, z, nz, lab, 10.0, ga, gp)
        _check_general(gout, z[:12], z, nz[:12], nz, lab[:12], lab, 10.0, 0, gga, ggp)


@pytest.mark.parametrize("module", BACKENDS)
def test_float32_training_size_within_twice_eager(module):
    """SupCon's setting at a training-like size: 2 views x 320 samples (N = 640 rows, several
    128-row tiles), D = 64, 20 classes, tau = 0.07, unit norms: loss, lse, dscale and the
    gradients within twice eager float32's error (symmetric); the rows' block of view 0
    (contrast_mode="one": offset 0, n = 320) likewise."""
    gen = torch.Generator().manual_seed(12)
    b, d = 320, 64
    z = torch.randn(2 * b, d, generator=gen)
    nz = torch.linalg.vector_norm(z, dim=1)
    lab = torch.randint(0, 20, (b,), generator=gen).repeat(2)
    out, ga, gp = _sym(module, z, nz, lab, 1 / 0.07, gen=gen)
    _check_sym(out, z, nz, lab, 1 / 0.07, ga, gp)
    gout, ga, gp = _general(module, z[:b], z, nz[:b], nz, lab[:b], lab, 1 / 0.07, 0, gen)
    _check_general(gout, z[:b], z, nz[:b], nz, lab[:b], lab, 1 / 0.07, 0, ga, gp)


@pytest.mark.parametrize("module", BACKENDS)
def test_16_bit_inputs_are_widened(module):
    """bfloat16 / float16 rows with float32 norms: float32 outputs, within the rule against
    eager float32 from the same rounded inputs (plus, for the C++ kernels' bf16 products, their
    weights' rounding: tolerances.products_floor; and with them off, the widening path)."""
    for dtype in (torch.bfloat16, torch.float16):
        for products in bf16_product_settings(module, dtype):
            z, nz, lab, gen = _inputs(40, 40, 16, dtype, seed=5, classes=4)
            with tile_patch(module, 8), bf16_products(products):
                out, ga, gp = _sym(module, z, nz, lab, 5.0, gen=gen)
                gout, gga, ggp = _general(module, z[3:20], z, nz[3:20], nz, lab[3:20], lab, 5.0,
                                          3, gen)
                _check_sym(out, z, nz, lab, 5.0, ga, gp, module=module)
                _check_general(gout, z[3:20], z, nz[3:20], nz, lab[3:20], lab, 5.0, 3, gga, ggp,
                               module=module)


@pytest.mark.parametrize("module", BACKENDS)
def test_dscale_leaves_loss_and_lse_unchanged(module):
    """with_dscale only adds an output: loss, lse and count bitwise those without it."""
    kern = kernel_module(module)
    for dtype in (torch.float32, F64):
        z, nz, lab, _ = _inputs(70, 70, 24, dtype, seed=3, classes=5)
        with tile_patch(module, 16):
            for scale in (10.0, 100.0):  # the one-exp tiles, and the two-exp ones
                a = kern.labels_sym_forward(z, nz, lab, scale, with_dscale=False)
                b = kern.labels_sym_forward(z, nz, lab, scale, with_dscale=True)
                c = kern.labels_forward(z[4:30], z, nz[4:30], nz, lab[4:30], lab, scale, 4)
                e = kern.labels_forward(z[4:30], z, nz[4:30], nz, lab[4:30], lab, scale, 4,
                                        with_dscale=True)
                for x, y in ((a, b), (c, e)):
                    assert all(torch.equal(x[i], y[i]) for i in (0, 1, 3))


def _thread_runs():
    """The C++ kernels' outputs (float32 and float64, scales 10 and 100: the one-exp tiles and
    the two-exp ones; tile 16 over 70 rows: 5 blocks, 5 rounds; the general pass on rows
    10..50) with 1 thread, then twice with 2. (Thread-count independence is the C++ kernels'
    contract; the chunked backend's reductions are torch's.)"""
    cases = [_inputs(70, 70, 24, dtype, seed=5, classes=6) for dtype in (torch.float32, F64)]

    def run():
        out = []
        with tile_patch("cpp", 16):
            for z, nz, lab, _ in cases:
                for scale in (10.0, 100.0):
                    gen = torch.Generator().manual_seed(0)
                    o, _, _ = _sym("cpp", z, nz, lab, scale, gen=gen)
                    out += list(o.values())
                    o, _, _ = _general("cpp", z[10:50], z, nz[10:50], nz, lab[10:50], lab,
                                       scale, 10, gen)
                    out += list(o.values())
        return out

    return thread_runs(run)


def test_cpp_deterministic_and_thread_count_independent_up_to_the_products():
    """Bitwise the same from run to run; across thread counts equal to float32 rounding (MKL's
    own products may round otherwise with 2 threads: the bitwise test below pins them)."""
    assert_thread_runs_agree(*_thread_runs())


def test_cpp_bitwise_the_same_for_any_thread_count_with_reproducible_products():
    """With MKL_CBWR=COMPATIBLE the products are thread-count independent; then 1 and 2
    threads give bitwise the same outputs: the rounds schedule fixes every row's order."""
    assert_bitwise_across_threads("test_supcon_kernels")


def test_opcheck_labels_operators():
    from fastcl.ops import _backend

    _backend._load_cpp()  # registers the fakes
    ops = torch.ops.fastcl_cpu
    z, nz, lab, gen = _inputs(9, 9, 5, torch.float32, seed=1, classes=3)
    _, lse, _, count = ops.labels_sym_forward(z, nz, lab, 3.0, 4, False)
    ga, gp = _g_split(count, gen, torch.float32)
    for with_dscale in (False, True):
        torch.library.opcheck(ops.labels_sym_forward.default, (z, nz, lab, 3.0, 4, with_dscale))
        torch.library.opcheck(ops.labels_forward.default,
                              (z[2:6], z, nz[2:6], nz, lab[2:6], lab, 3.0, 2, 4, with_dscale))
    torch.library.opcheck(ops.labels_sym_grad.default, (z, nz, lab, lse, ga, gp, 3.0, 4))
    torch.library.opcheck(ops.labels_grad.default,
                          (z, z, nz, nz, lab, lab, lse, ga, gp, None, None, None, 3.0, 0, 4))
    torch.library.opcheck(ops.labels_grad.default,
                          (z, z, nz, nz, lab, lab, None, None, None, lse, ga, gp, 3.0, 0, 4))


def test_operators_check_their_arguments():
    cpp = kernel_module("cpp")
    z, nz, lab, _ = _inputs(6, 6, 5, torch.float32, seed=2, classes=2)
    with pytest.raises(RuntimeError, match="int64"):
        cpp.labels_sym_forward(z, nz, lab.int(), 1.0)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        cpp.labels_sym_forward(z, nz, lab[:5], 1.0)
    with pytest.raises(RuntimeError, match="offset"):
        cpp.labels_forward(z[:3], z, nz[:3], nz, lab[:3], lab, 1.0, 4)
    with pytest.raises(RuntimeError, match="offset"):
        cpp.labels_forward(z[:3], z, nz[:3], nz, lab[:3], lab, 1.0, -1)
    _, lse, _, count = cpp.labels_sym_forward(z, nz, lab, 1.0)
    g = torch.ones(6)
    with pytest.raises(RuntimeError, match="lse"):
        cpp.labels_sym_grad(z, nz, lab, lse[:5], g, g, 1.0)
    with pytest.raises(RuntimeError, match="gp must"):
        cpp.labels_sym_grad(z, nz, lab, lse, g, g[:5], 1.0)
    with pytest.raises(RuntimeError, match="exactly one"):
        cpp.labels_grad(z, z, nz, nz, lab, lab, lse, g, g, lse, g, g, 1.0, 0)
    with pytest.raises(RuntimeError, match="comes with"):
        cpp.labels_grad(z, z, nz, nz, lab, lab, lse, g, None, None, None, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="tile"):
        torch.ops.fastcl_cpu.labels_sym_forward(z, nz, lab, 1.0, 0, False)
