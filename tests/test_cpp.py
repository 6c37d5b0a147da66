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

from conftest import tile_patch

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
    loss, lse = torch.ops.fastcl_cpu.nt_xent_forward(z, nz, 2.0, 4)
    _, lse_q, _ = torch.ops.fastcl_cpu.lse_forward(q, neg, nq, nn_, k, nk, 2.0, None, False, 4)
    g = torch.rand(12)
    return [
        ("nt_xent_forward", (z, nz, 2.0, 4)),
        ("nt_xent_grad", (z, nz, lse, g, 2.0, 4)),
        ("lse_forward", (q, k, nq, nk, None, None, 2.0, 0, False, 4)),
        ("lse_forward", (q, neg, nq, nn_, k, nk, 2.0, None, True, 4)),
        ("grad_accumulate", (q, neg, nq, nn_, lse_q, g[:5], None, None, 2.0, None, 4)),
        ("grad_accumulate", (neg, q, nn_, nq, None, None, lse_q, g[:5], 2.0, None, 4)),
    ]


@pytest.mark.parametrize("i", range(6))
def test_opcheck_cpp_operators(i):
    _backend._load_cpp()  # registers the fakes
    name, args = _op_cases()[i]
    torch.library.opcheck(getattr(torch.ops.fastcl_cpu, name).default, args)


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

    def run():
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        x, y = q.clone().requires_grad_(), k.clone().requires_grad_()
        with tile_patch("cpp", 32):
            l1 = fastcl.nt_xent(a, b, 0.2, "none")
            l2 = fastcl.info_nce(x, y, queue, 0.1, "none")
        (l1.sum() + l2.sum()).backward()
        return [l1.detach(), l2.detach(), a.grad, b.grad, x.grad, y.grad]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many, again = run(), run()
    finally:
        torch.set_num_threads(threads)
    return one, many, again


def test_results_do_not_depend_on_the_thread_count():
    """The NT-Xent schedule fixes every row's accumulation order, and each row block is owned
    by one thread. So the thread count changes nothing but the BLAS products themselves: equal
    to float32 rounding across thread counts, bitwise from run to run at a fixed count.
    (MKL's products on AVX-512 CPUs depend on the thread count; see the bitwise test below.)"""
    one, many, again = _thread_runs()
    for a, b, c in zip(one, many, again):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


_BITWISE = """
import sys
sys.path.insert(0, {tests!r})
import torch
import test_cpp
one, many, again = test_cpp._thread_runs()
assert all(torch.equal(a, b) for a, b in zip(one, many)), "thread count changed a result"
print("bitwise")
"""


def test_results_are_bitwise_the_same_for_any_thread_count_with_reproducible_products():
    """With products that are themselves reproducible across thread counts (MKL's conditional
    numerical reproducibility, MKL_CBWR=COMPATIBLE; on this Intel AVX-512 machine MKL's sgemm
    gives other roundings with 2 threads than with 1 otherwise), 1 thread and several give
    bitwise the same losses and gradients: fastcl's own schedule adds no dependence."""
    env = dict(os.environ, MKL_CBWR="COMPATIBLE")
    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", _BITWISE.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tests)
    assert proc.returncode == 0 and "bitwise" in proc.stdout, proc.stderr[-3000:]


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
