"""The C++ CPU kernels: their build and its fallback, their operators on their own, and what the
C++ path promises beyond the shared property tests (test_nt_xent.py / test_info_nce.py /
test_ops.py run on it through the ``backend`` and ``cpu_backend`` fixtures).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastcl
from fastcl import _cpp, reference
from fastcl.ops import _backend, contrastive

from conftest import (assert_bitwise_across_threads, assert_thread_runs_agree, thread_runs,
                      tile_patch)

F64 = torch.float64


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    # Row norms spread over ~e^{+-1}: the normalization matters.
    x = x * torch.exp(torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64))
    return x.to(dtype)


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------- the build -------


def test_load_is_cached_in_the_build_directory():
    lib = _cpp.load()
    assert lib.is_file()
    assert lib.parent.parent == Path(fastcl._config.cpp_build_root())
    assert _cpp.load() == lib  # loads once per process
    assert hasattr(torch.ops.fastcl_cpu, "nt_xent_forward")


_SUBPROCESS = textwrap.dedent(
    """
    import warnings, torch, fastcl
    from fastcl import reference
    from fastcl.ops import _backend
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fastcl.nt_xent(z1, z2)
            out2 = fastcl.nt_xent(z1, z2)
        except RuntimeError as exc:
            print("RAISED", str(exc).replace(chr(10), " ")[-400:])
            raise SystemExit(0)
    torch.testing.assert_close(out, reference.nt_xent(z1, z2))
    print("IMPL", _backend.implementation(z1).__name__)
    for w in caught:
        print("WARN", str(w.message).replace(chr(10), " ")[-400:])
    """
)


def _run_python(env_updates, path):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCL_BACKEND", "CXX")}
    env.update(env_updates)
    env["PATH"] = path
    return subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True,
                          env=env, timeout=600)


def _path_with(tmp_path, *tools):
    """A PATH holding only links to the given tools (ninja, c++, ...) that exist here."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool) or shutil.which(tool, path=os.path.dirname(sys.executable))
        if found is None:
            pytest.skip(f"{tool} is not installed here")
        (bindir / tool).symlink_to(found)
    return str(bindir)


@pytest.mark.parametrize("missing", ["ninja", "compiler"])
def test_without_toolchain_auto_warns_once_and_uses_chunked(tmp_path, missing):
    """The documented fallback: no ninja or no compiler and no cached build -> one warning that
    says how to get the fast path, then the chunked path, with the right numbers."""
    tools = ["c++", "cc"] if missing == "ninja" else ["ninja"]
    path = _path_with(tmp_path, *tools)
    proc = _run_python({"FASTCL_CPP_BUILD_DIR": str(tmp_path / "build")}, path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "IMPL fastcl.kernels.chunked" in lines, proc.stdout
    warns = [line for line in lines if line.startswith("WARN")]
    assert len(warns) == 1, proc.stdout
    assert "ninja" in warns[0] and "compiler" in warns[0] and "chunked" in warns[0]


def test_without_toolchain_forced_cpp_raises(tmp_path):
    """FASTCL_BACKEND=cpp never falls back: it raises, saying what is missing."""
    path = _path_with(tmp_path, "c++", "cc")  # no ninja
    proc = _run_python(
        {"FASTCL_CPP_BUILD_DIR": str(tmp_path / "build"), "FASTCL_BACKEND": "cpp"}, path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("RAISED"), proc.stdout
    assert "ninja" in proc.stdout.lower()


def test_first_build_says_so_once_then_loads_from_cache(tmp_path):
    """A fresh build directory: the first process builds (one line on stderr), the second loads
    the cached library without building or printing, even with no compiler on PATH."""
    build = {"FASTCL_CPP_BUILD_DIR": str(tmp_path / "build")}
    first = _run_python(build, os.environ["PATH"])
    assert first.returncode == 0, first.stderr
    assert "IMPL fastcl.kernels.cpp" in first.stdout, first.stdout + first.stderr
    said = [line for line in first.stderr.splitlines() if line.startswith("fastcl:")]
    assert len(said) == 1 and "building the C++ CPU kernels" in said[0], first.stderr
    second = _run_python(build, _path_with(tmp_path))  # an empty PATH: no compiler, no ninja
    assert second.returncode == 0, second.stderr
    assert "IMPL fastcl.kernels.cpp" in second.stdout, second.stdout + second.stderr
    assert "fastcl:" not in second.stderr and "WARN" not in second.stdout


# ------------------------------------------------------------------ the operators ---------


def _op_cases():
    z = _randn(12, 7)
    nz = contrastive._norm(z)
    q, k, neg = _randn(5, 7, seed=1), _randn(5, 7, seed=2), _randn(9, 7, seed=3)
    nq, nk, nn_ = contrastive._norm(q), contrastive._norm(k), contrastive._norm(neg)
    loss, lse, _ = torch.ops.fastcl_cpu.nt_xent_forward(z, nz, 2.0, 4)
    _, lse_q, _, _ = torch.ops.fastcl_cpu.lse_forward(q, neg, nq, nn_, k, nk, 2.0, None, False, 4)
    g = torch.rand(12)
    dcl_dscale = dict(positive_in_denominator=False, with_dscale=True)
    return [
        ("nt_xent_forward", (z, nz, 2.0, 4), {}),
        ("nt_xent_forward", (z, nz, 2.0, 4), dcl_dscale),
        ("nt_xent_forward", (z.double(), nz.double(), 2.0, 4, True, True), {}),
        ("nt_xent_grad", (z, nz, lse, g, 2.0, 4), {}),
        ("lse_forward", (q, k, nq, nk, None, None, 2.0, 0, False, 4), {}),
        ("lse_forward", (q, neg, nq, nn_, k, nk, 2.0, None, True, 4), {}),
        ("lse_forward", (q, k, nq, nk, None, None, 2.0, 0, True, 4), dcl_dscale),
        ("lse_forward", (q, neg, nq, nn_, k, nk, 2.0, None, False, 4, False, True), {}),
        ("lse_forward", (q, neg, nq, nn_, None, None, 2.0, None, False, 4), dict(with_dscale=True)),
        ("grad_accumulate", (q, neg, nq, nn_, lse_q, g[:5], None, None, 2.0, None, 4), {}),
        ("grad_accumulate", (neg, q, nn_, nq, None, None, lse_q, g[:5], 2.0, None, 4), {}),
    ]


@pytest.mark.parametrize("i", range(11))
def test_opcheck_cpp_operators(i):
    _backend._load_cpp()  # registers the fakes
    name, args, kwargs = _op_cases()[i]
    torch.library.opcheck(getattr(torch.ops.fastcl_cpu, name).default, args, kwargs)


@pytest.mark.parametrize("tile", [0, -3, 5000])
def test_cpp_operator_rejects_bad_tile(tile):
    z = _randn(4, 3)
    with pytest.raises(RuntimeError, match="tile"):
        torch.ops.fastcl_cpu.nt_xent_forward(z, contrastive._norm(z), 1.0, tile)


def test_cpp_operator_checks_its_arguments():
    _cpp.load()
    z = _randn(6, 3)
    nz = contrastive._norm(z)
    ops = torch.ops.fastcl_cpu
    with pytest.raises(RuntimeError, match="2N rows"):
        ops.nt_xent_forward(z[:5], nz[:5], 1.0, 128)
    with pytest.raises(RuntimeError, match="norms"):
        ops.nt_xent_forward(z, nz[:4], 1.0, 128)
    with pytest.raises(RuntimeError, match="same width"):
        ops.lse_forward(z, _randn(6, 4), nz, nz, None, None, 1.0, 0, False, 128)
    with pytest.raises(RuntimeError, match="at most one"):
        ops.lse_forward(z, z, nz, nz, z, nz, 1.0, 0, False, 128)
    with pytest.raises(RuntimeError, match="exactly one"):
        ops.grad_accumulate(z, z, nz, nz, None, None, None, None, 1.0, 0, 128)


# ------------------------------------------------------------ what the C++ path promises ---


@pytest.mark.parametrize("tau", [0.5, 0.1, 0.07, 0.02, 0.01])
def test_float32_agrees_with_float64_reference_to_1e6(tau):
    """Issue 3: the fp32 path agrees with the float64 reference to about 1e-6, relative. N=300
    gives 600 rows: 5 x 5 tiles at the default edge. tau >= 0.07 takes the one-exp tiles,
    tau <= 0.02 the two-exp ones (2/tau + log n beyond their range)."""
    fastcl.set_backend("cpp")
    z1 = _randn(300, 128, seed=0, dtype=F64).requires_grad_()
    z2 = _randn(300, 128, seed=1, dtype=F64).requires_grad_()
    ref = reference.nt_xent(z1, z2, tau, "none")
    cot = torch.rand(600, generator=torch.Generator().manual_seed(5), dtype=F64)  # 2N losses
    g_ref = torch.autograd.grad(ref, (z1, z2), cot)
    a, b = z1.detach().float().requires_grad_(), z2.detach().float().requires_grad_()
    out = fastcl.nt_xent(a, b, tau, "none")
    g = torch.autograd.grad(out, (a, b), cot.float())
    assert _rel(out, ref) <= 1e-6
    for x, y in zip(g, g_ref):
        assert _rel(x, y) <= 3e-6  # |g| of a row is a sum of 600 weighted unit vectors

    q = _randn(200, 64, seed=2, dtype=F64).requires_grad_()
    k = _randn(200, 64, seed=3, dtype=F64).requires_grad_()
    queue = _randn(700, 64, seed=4, dtype=F64)
    ref = reference.info_nce(q, k, queue, tau, "none")
    g_ref = torch.autograd.grad(ref, (q, k), cot[:200])
    a, b = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    out = fastcl.info_nce(a, b, queue.float(), tau, "none")
    g = torch.autograd.grad(out, (a, b), cot[:200].float())
    assert _rel(out, ref) <= 1e-6
    for x, y in zip(g, g_ref):
        assert _rel(x, y) <= 3e-6


@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_large_upstream_gradient_does_not_overflow(tau):
    """Loss scaling (GradScaler multiplies the loss by 2^16 and more) must scale the gradient,
    not overflow the one-exp tiles' factors: grad(s * loss) == s * grad(loss)."""
    fastcl.set_backend("cpp")
    z1, z2 = _randn(70, 32, seed=0).requires_grad_(), _randn(70, 32, seed=1).requires_grad_()
    g = torch.autograd.grad(fastcl.nt_xent(z1, z2, tau), (z1, z2))
    for scale in (2.0 ** 16, 2.0 ** 24):
        gs = torch.autograd.grad(fastcl.nt_xent(z1, z2, tau) * scale, (z1, z2))
        for a, b in zip(gs, g):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a / scale, b, rtol=1e-5, atol=1e-9)


def _thread_runs():
    """Losses and gradients of NT-Xent and queue InfoNCE on the C++ path (small tiles: several
    row blocks and schedule rounds), with 1 thread, then with 2 or more."""
    fastcl.set_backend("cpp")
    z1, z2 = _randn(200, 48, seed=0), _randn(200, 48, seed=1)
    q, k, queue = _randn(90, 128, seed=2), _randn(90, 128, seed=3), _randn(300, 128, seed=4)

    from fastcl.kernels import cpp

    z = torch.cat([z1, z2])
    nz, nq, nk, nqueue = (contrastive._norm(t) for t in (z, q, k, queue))

    def run():
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        x, y = q.clone().requires_grad_(), k.clone().requires_grad_()
        with tile_patch("cpp", 32):
            l1 = fastcl.nt_xent(a, b, 0.2, "none")
            l2 = fastcl.info_nce(x, y, queue, 0.1, "none")
        (l1.sum() + l2.sum()).backward()
        out = [l1.detach(), l2.detach(), a.grad, b.grad, x.grad, y.grad]
        # Kernel contract v2's outputs: dscale (one-exp and two-exp NT-Xent tiles), DCL, and
        # with_grad's v alongside them.
        with tile_patch("cpp", 32):
            for tau in (0.2, 0.01):
                for pid in (True, False):
                    out += cpp.nt_xent_forward(z, nz, 1 / tau, positive_in_denominator=pid,
                                               with_dscale=True)
                    out += cpp.lse_forward_with_grad(q, queue, nq, nqueue, (k, nk), 1 / tau, None,
                                                     positive_in_denominator=pid,
                                                     with_dscale=True)
                    out += cpp.lse_forward(q, k, nq, nk, None, 1 / tau, 0,
                                           positive_in_denominator=pid, with_dscale=True)
        return out

    return thread_runs(run)


def test_results_do_not_depend_on_the_thread_count():
    """The NT-Xent schedule fixes every row's accumulation order, and each row block is owned
    by one thread. So the thread count changes nothing but the BLAS products themselves: equal
    to float32 rounding across thread counts, bitwise from run to run at a fixed count.
    (MKL's products on AVX-512 CPUs depend on the thread count; see the bitwise test below.)"""
    assert_thread_runs_agree(*_thread_runs())


def test_results_are_bitwise_the_same_for_any_thread_count_with_reproducible_products():
    """With products that are themselves reproducible across thread counts (MKL's conditional
    numerical reproducibility, MKL_CBWR=COMPATIBLE; on this Intel AVX-512 machine MKL's sgemm
    gives other roundings with 2 threads than with 1 otherwise), 1 thread and several give
    bitwise the same losses and gradients: fastcl's own schedule adds no dependence."""
    assert_bitwise_across_threads("test_cpp")


def test_nan_row_poisons_its_losses_on_cpp():
    """NaN in, NaN out: the one-exp tiles' shifts and factors must not hide a NaN row."""
    fastcl.set_backend("cpp")
    z1, z2 = _randn(40, 16, seed=0), _randn(40, 16, seed=1)
    z1[3, 5] = float("nan")
    out = fastcl.nt_xent(z1, z2, 0.1, "none")
    assert torch.isnan(out).all()  # every row sees the NaN row among its logits
    q, k = _randn(40, 16, seed=2), _randn(40, 16, seed=3)
    queue = _randn(50, 16, seed=4)
    queue[7, 0] = float("nan")
    assert torch.isnan(fastcl.info_nce(q, k, queue, 0.1, "none")).all()


# ------------------------------------ kernel contract v2: DCL and d loss / d inv_temp -------
#
# Dense float64 formulas, written here with explicit masks: s_ij = inv_temp * qhat_i . khat_j,
# the excluded entries (NT-Xent's diagonal; the positive under DCL) at -inf; lse over the rest;
# loss = lse - s_pos; p = softmax of the row; dscale = sum_j p_ij d_ij - d_pos with d = s /
# inv_temp; v = inv_temp * sum_{j not positive} p_ij khat_j. The same formulas in the kernel's
# dtype are the eager baseline of the 2x-eager tolerance rule (tests/tolerances.py).

_TAUS = [1e-3, 0.01, 0.07, 0.5, 2.0]  # float32: the first two take the two-exp NT-Xent tiles


def _formula(q, k, inv_temp, dtype, *, pos=None, k_pos=None, diagonal=False, pid=True):
    qh = torch.nn.functional.normalize(q.to(dtype), dim=1)
    kh = torch.nn.functional.normalize(k.to(dtype), dim=1)
    n = q.shape[0]
    rows = torch.arange(n)
    s = qh @ kh.T * inv_temp
    if diagonal:
        s[rows, rows] = -float("inf")
    pcol = None
    if k_pos is not None:  # the explicit key's logit as an extra column 0
        ph = torch.nn.functional.normalize(k_pos.to(dtype), dim=1)
        s = torch.cat([(qh * ph).sum(1, keepdim=True) * inv_temp, s], 1)
        pcol = torch.zeros(n, dtype=torch.long)
    elif pos is not None:
        pcol = pos
    s_pos = s[rows, pcol] if pcol is not None else torch.zeros(n, dtype=dtype)
    if not pid and pcol is not None:
        s[rows, pcol] = -float("inf")
    lse = torch.logsumexp(s, 1)
    p = torch.softmax(s, 1)
    d = torch.where(torch.isinf(s), torch.zeros_like(s), s / inv_temp)
    dscale = (p * d).sum(1) - s_pos / inv_temp
    w = p.clone()
    if pcol is not None:
        w[rows, pcol] = 0
    if k_pos is not None:
        w = w[:, 1:]
    v = inv_temp * (w @ kh)
    return {"loss": lse - s_pos, "lse": lse, "dscale": dscale, "v": v}


def _within_2x_eager(name, got, oracle, eager, dtype):
    from tolerances import ATOL

    atol = ATOL[dtype] * max(1.0, oracle.abs().max().item())
    err = (got.double() - oracle).abs().max().item()
    base = (eager.double() - oracle).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x eager {base:.3g} + {atol:.3g}"


def _check(out, inputs, inv_temp, dtype, **kw):
    oracle = _formula(*inputs, inv_temp, F64, **kw)
    eager = _formula(*inputs, inv_temp, dtype, **kw)
    for name, got in out.items():
        if name == "v" and dtype == torch.float32 and inv_temp > 500:
            # v (unchanged by contract v2) sums weights whose error at tau = 1e-3 is the
            # rounding of logits ~1e3 by two different products (the kernel's tile, eager's
            # matmul): the max over rows can exceed 2x eager's by chance (seen 2.5x). Its
            # low-temperature accuracy is tests/test_temperature.py's subject.
            continue
        assert got.dtype == (F64 if name == "lse" else dtype), name
        _within_2x_eager(name, got, oracle[name], eager[name], dtype)


def _cpp_module():
    from fastcl.kernels import cpp

    return cpp


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("tau", _TAUS)
@pytest.mark.parametrize("pid", [True, False], ids=["infonce", "dcl"])
@pytest.mark.parametrize("n,tile", [(13, 5), (13, 4), (5, 32)])
def test_nt_xent_forward_dscale_and_dcl_match_float64(dtype, tau, pid, n, tile):
    """2N = 26 rows in 6 blocks of 5 (the last one 1 row: a column whose only logit in an
    off-diagonal tile is its masked positive) or 7 of 4; 2N = 10 in one diagonal tile that holds
    the positives too."""
    cpp = _cpp_module()
    z = _randn(2 * n, 24, seed=7, dtype=dtype)
    inv_temp = 1.0 / tau
    with tile_patch("cpp", tile):
        loss, lse, dscale = cpp.nt_xent_forward(z, contrastive._norm(z), inv_temp,
                                                positive_in_denominator=pid, with_dscale=True)
    pos = (torch.arange(2 * n) + n) % (2 * n)
    _check({"loss": loss, "lse": lse, "dscale": dscale}, (z, z), inv_temp, dtype, pos=pos,
           diagonal=True, pid=pid)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("tau", [1e-3, 0.07, 2.0])
def test_nt_xent_forward_only_the_positive_left(dtype, tau):
    """N = 1: each row's one column is its positive. InfoNCE: lse = s_pos, loss = 0, dscale =
    0. DCL: the denominator is empty, lse = loss = -inf (dscale is then undefined)."""
    cpp = _cpp_module()
    z = _randn(2, 9, seed=3, dtype=dtype)
    nz = contrastive._norm(z)
    with tile_patch("cpp", 4):
        loss, lse, dscale = cpp.nt_xent_forward(z, nz, 1 / tau, with_dscale=True)
        loss_d, lse_d, _ = cpp.nt_xent_forward(z, nz, 1 / tau, positive_in_denominator=False)
    _check({"loss": loss, "lse": lse, "dscale": dscale}, (z, z), 1 / tau, dtype,
           pos=torch.tensor([1, 0]), diagonal=True)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(dscale, torch.zeros_like(dscale))
    assert torch.isneginf(lse_d).all() and torch.isneginf(loss_d).all()


def _lse_case(mode, dtype, nr=11, nc=37, d=20):
    """(q, k, positive, pos_offset, formula kwargs) for the three positive modes."""
    q, k = _randn(nr, d, seed=11, dtype=dtype), _randn(nc, d, seed=12, dtype=dtype)
    if mode == "offset":
        return q, k, None, 3, dict(pos=(torch.arange(nr) + 3) % nc)
    if mode == "key":
        kp = _randn(nr, d, seed=13, dtype=dtype)
        return q, k, (kp, contrastive._norm(kp)), None, dict(k_pos=kp)
    return q, k, None, None, {}


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("tau", _TAUS)
@pytest.mark.parametrize("pid", [True, False], ids=["infonce", "dcl"])
@pytest.mark.parametrize("mode", ["offset", "key", "none"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["lse", "with_grad"])
def test_lse_forward_dscale_and_dcl_match_float64(dtype, tau, pid, mode, with_grad):
    """11 rows in row blocks of 4 (tile 4), 37 columns in column tiles of 16: the positive
    column (offset 3) falls in every column tile for some rows."""
    cpp = _cpp_module()
    q, k, positive, pos_offset, kw = _lse_case(mode, dtype)
    inv_temp = 1.0 / tau
    args = (q, k, contrastive._norm(q), contrastive._norm(k), positive, inv_temp, pos_offset)
    opts = dict(positive_in_denominator=pid, with_dscale=True)
    with tile_patch("cpp", 4):
        if with_grad:
            loss, lse, dscale, v = cpp.lse_forward_with_grad(*args, **opts)
            out = {"loss": loss, "lse": lse, "dscale": dscale, "v": v}
        else:
            loss, lse, dscale = cpp.lse_forward(*args, **opts)
            out = {"loss": loss, "lse": lse, "dscale": dscale}
    _check(out, (q, k), inv_temp, dtype, pid=pid, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["offset", "key"])
def test_lse_forward_only_the_positive_left(dtype, mode):
    """Every column but the positive excluded: offset mode with one column (the positive of
    every row), key mode with no columns at all. lse = s_pos, loss = 0, dscale = 0; under DCL
    the denominator is empty: lse = -inf."""
    cpp = _cpp_module()
    q, k, positive, pos_offset, kw = _lse_case(mode, dtype, nc=1 if mode == "offset" else 0)
    args = (q, k, contrastive._norm(q), contrastive._norm(k), positive, 5.0, pos_offset)
    with tile_patch("cpp", 4):
        loss, lse, dscale, v = cpp.lse_forward_with_grad(*args, with_dscale=True)
        _, lse_d, _ = cpp.lse_forward(*args, positive_in_denominator=False)
    _check({"loss": loss, "lse": lse, "dscale": dscale, "v": v}, (q, k), 5.0, dtype, **kw)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dscale, torch.zeros_like(dscale))
    assert torch.isneginf(lse_d).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("tau", [1e-3, 0.01, 0.07, 1.0])
@pytest.mark.parametrize("pid", [True, False], ids=["infonce", "dcl"])
def test_with_dscale_leaves_loss_and_lse_bitwise_unchanged(dtype, tau, pid):
    """The centred sums ride along in the same loops: loss, lse (and v) are the very same
    floats with and without with_dscale, in the one-exp and two-exp NT-Xent tiles; and without
    it dscale is an empty tensor of the outputs' dtype."""
    cpp = _cpp_module()
    z = _randn(26, 24, seed=1, dtype=dtype)
    nz = contrastive._norm(z)
    with tile_patch("cpp", 5):
        plain = cpp.nt_xent_forward(z, nz, 1 / tau, positive_in_denominator=pid)
        both = cpp.nt_xent_forward(z, nz, 1 / tau, positive_in_denominator=pid, with_dscale=True)
    assert plain[2].shape == (0,) and plain[2].dtype == dtype and both[2].shape == (26,)
    assert torch.equal(plain[0], both[0]) and torch.equal(plain[1], both[1])
    for mode in ("offset", "key", "none"):
        q, k, positive, pos_offset, _ = _lse_case(mode, dtype)
        args = (q, k, contrastive._norm(q), contrastive._norm(k), positive, 1 / tau, pos_offset)
        with tile_patch("cpp", 4):
            for fn in (cpp.lse_forward, cpp.lse_forward_with_grad):
                plain = fn(*args, positive_in_denominator=pid)
                both = fn(*args, positive_in_denominator=pid, with_dscale=True)
                assert plain[2].shape == (0,) and plain[2].dtype == dtype
                assert both[2].shape == (q.shape[0],)
                for i in [0, 1] + ([3] if fn is cpp.lse_forward_with_grad else []):
                    assert torch.equal(plain[i], both[i]), (mode, fn.__name__, i)
