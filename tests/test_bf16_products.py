"""bfloat16 on the CPU: the C++ kernels' bf16 products (csrc/bf16.h).

Where the build targets a CPU with 16-bit dot products (AVX512-BF16), bf16 rows are multiplied
as bf16 with float32 sums: the logits exactly (products of bf16 numbers are exact in float32),
the gradient products with their weights split into two bf16 (16 significant bits). Elsewhere,
and with the switch off, bf16 rows are widened to float32 as before. Every kernel is compared
here both ways on the same inputs; the public losses' accuracy against eager bf16 is
test_dtypes.py's and the property tests' (they run on whatever path the machine has); the path
of CPUs without bf16 dot products is built and run in a subprocess (the build flags
FASTCL_CPU_BF16=0 selects).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastcl
from fastcl import _cpp, reference
from fastcl.kernels import cpp

from conftest import tile_patch
from tolerances import BF16_PRODUCTS_FLOOR, bf16_products

BF16 = torch.bfloat16


def _cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def _rows(n, d, seed, spread=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if spread:  # row norms over ~e^{+-1}: the inverse norms matter
        x = x * torch.exp(torch.randn(n, 1, generator=g))
    return x.to(BF16)


def _unit(x):
    return (x.float() / _norms(x)[:, None]).to(BF16)


def _norms(x):
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min(1e-12)


def _both(fn):
    """fn() with the bf16 products on and off (the widening path). Where the products run on
    AMX, also with AMX off (the plain layout of CPUs without it), compared with the AMX run
    (bitwise equality is not expected: the two sum their products in different orders)."""
    with bf16_products(True):
        on = fn()
        if cpp.bf16_amx():
            before = cpp.bf16_amx()
            try:
                cpp.bf16_amx(False)
                plain = fn()
            finally:
                cpp.bf16_amx(before)
            _assert_agree(on, plain, "AMX against the plain layout", exact_forward=range(4))
    with bf16_products(False):
        off = fn()
    return on, off


def _assert_agree(on, off, what, exact_forward=()):
    """Forward statistics (loss, lse, dscale): the logits are exact either way, so only the
    sums' order differs (float32 rounding); gradients: the weights' 16-bit rounding."""
    on = on if isinstance(on, (tuple, list)) else (on,)
    off = off if isinstance(off, (tuple, list)) else (off,)
    assert len(on) == len(off)
    for k, (a, b) in enumerate(zip(on, off)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k)
        if b.numel() == 0:
            continue
        scale = max(1.0, b.double().abs().max().item())
        tol = (2e-5 if k in exact_forward else BF16_PRODUCTS_FLOOR) * scale
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol, f"{what}[{k}]: on/off differ by {err:.3g} > {tol:.3g}"


needs_products = pytest.mark.skipif(
    not cpp.bf16_products(), reason="this build has no bf16 products (CPU without AVX512-BF16)")


def test_the_build_has_bf16_products_exactly_where_the_cpu_has_bf16_dot_products():
    assert cpp.bf16_products() == _cpu_has_bf16_dot()
    before = cpp.bf16_products()
    try:
        assert cpp.bf16_products(False) is False
        assert cpp.bf16_products(True) is before  # cannot turn on what the build lacks
    finally:
        cpp.bf16_products(before)


@needs_products
@pytest.mark.parametrize("tile", [5, 128])
def test_nt_xent_kernels(tile):
    z = _rows(70, 24, 0)
    nz = _norms(z)
    g = torch.rand(70, generator=torch.Generator().manual_seed(1))
    with tile_patch("cpp", tile):
        for scale in (10.0, 100.0):  # one exp a logit, and two
            fwd = _both(lambda: cpp.nt_xent_forward(z, nz, scale, with_dscale=True))
            _assert_agree(*fwd, "nt_xent_forward", exact_forward=(0, 1, 2))
            lse = fwd[1][1]
            _assert_agree(*_both(lambda: cpp.nt_xent_grad(z, nz, lse, g, scale)), "nt_xent_grad")


@needs_products
@pytest.mark.parametrize("tile", [7, 128])
def test_general_kernels_against_a_queue(tile):
    q, k, queue = _rows(37, 24, 2), _rows(37, 24, 3), _rows(300, 24, 4)
    nq, nk, nqueue = _norms(q), _norms(k), _norms(queue)
    g = torch.rand(37, generator=torch.Generator().manual_seed(5))
    with tile_patch("cpp", tile):
        for pos in ((k, nk), None):
            fwd = _both(lambda: cpp.lse_forward_with_grad(q, queue, nq, nqueue, pos, 14.0, None,
                                                          with_dscale=True))
            _assert_agree(*fwd, "lse_forward_with_grad", exact_forward=(0, 1, 2))
            lse = fwd[1][1]
            _assert_agree(*_both(lambda: cpp.grad_accumulate(q, queue, nq, nqueue, lse, g, None,
                                                             None, 14.0, None)),
                          "grad_accumulate rows")
        # in-batch (positive column i + offset) and the columns' side
        fwd = _both(lambda: cpp.lse_forward(q, k, nq, nk, None, 14.0, 0))
        _assert_agree(*fwd, "lse_forward in-batch", exact_forward=(0, 1, 2))
        lse = fwd[1][1]
        _assert_agree(*_both(lambda: cpp.grad_accumulate(k, q, nk, nq, None, None, lse, g, 14.0,
                                                         0)),
                      "grad_accumulate columns")


@needs_products
def test_clip_siglip_and_label_kernels():
    x, y = _rows(45, 16, 6), _rows(45, 16, 7)
    nx, ny = _norms(x), _norms(y)
    g2 = torch.rand(90, generator=torch.Generator().manual_seed(8))
    with tile_patch("cpp", 8):
        fwd = _both(lambda: cpp.rows_cols_forward(x, y, nx, ny, 20.0, with_dscale=True))
        _assert_agree(*fwd, "rows_cols_forward", exact_forward=(0, 1, 2))
        lse = fwd[1][1]
        _assert_agree(*_both(lambda: cpp.rows_cols_grad(x, y, nx, ny, lse, g2, 20.0)),
                      "rows_cols_grad")
        # SigLIP: features used as given (no norms)
        xs, ys = (_unit(_rows(n, 16, seed)) for n, seed in ((45, 9), (33, 10)))
        _assert_agree(*_both(lambda: cpp.sigmoid_forward(xs, ys, 10.0, -10.0, 0, True)),
                      "sigmoid_forward", exact_forward=(0, 1, 2))
        g = torch.rand(45, generator=torch.Generator().manual_seed(11))
        _assert_agree(*_both(lambda: cpp.sigmoid_grad(xs, ys, 10.0, -10.0, 0, g, True, True)),
                      "sigmoid_grad")
        # SupCon's label positives
        lab = torch.randint(0, 5, (45,), generator=torch.Generator().manual_seed(12))
        fwd = _both(lambda: cpp.labels_sym_forward(x, nx, lab, 14.0, with_dscale=True))
        _assert_agree(*fwd, "labels_sym_forward", exact_forward=(0, 1, 2, 3))
        lse = fwd[1][1]
        ga = torch.rand(45, generator=torch.Generator().manual_seed(13))
        gp = torch.rand(45, generator=torch.Generator().manual_seed(14))
        _assert_agree(*_both(lambda: cpp.labels_sym_grad(x, nx, lab, lse, ga, gp, 14.0)),
                      "labels_sym_grad")


@needs_products
def test_public_losses_agree_both_ways_and_with_eager_bf16():
    """The bf16 losses and gradients through the public functions: on and off agree to the
    gradients' bf16 rounding, and both are within 2x eager bf16's error of the float64 formula
    (MoCo with a bf16 queue, NT-Xent)."""
    q, k, queue = _rows(40, 32, 15), _rows(40, 32, 16), _rows(500, 32, 17)

    def moco(*xs):
        xs = [x.detach().requires_grad_(i < 2) for i, x in enumerate(xs)]
        loss = fastcl.info_nce(xs[0], xs[1], xs[2], temperature=0.07)
        return (loss, *torch.autograd.grad(loss, xs[:2]))

    def eager(*xs):
        xs = [x.detach().requires_grad_(i < 2) for i, x in enumerate(xs)]
        loss = reference.info_nce(*xs, temperature=0.07)
        return (loss, *torch.autograd.grad(loss, xs[:2]))

    with tile_patch("cpp", 16):
        on, off = _both(lambda: moco(q, k, queue))
    oracle = eager(q.double(), k.double(), queue.double())
    base = eager(q, k, queue)
    for a, b, o, e in zip(on, off, oracle, base):
        assert a.dtype == b.dtype
        err = (a.double() - o).abs().max().item()
        assert err <= 2 * (e.double() - o).abs().max().item() + 2e-2 * max(1.0, o.abs().max().item())
        assert (a.double() - b.double()).abs().max().item() <= 1e-2 * max(1.0, o.abs().max().item())


_NO_BF16_BUILD = textwrap.dedent(
    """
    import torch, fastcl
    from fastcl.kernels import cpp
    assert not cpp.bf16_products(), "the build without bf16 flags still has bf16 products"
    assert not cpp.bf16_products(True)
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(50, 24, generator=g).bfloat16().requires_grad_() for _ in range(2))
    queue = torch.randn(200, 24, generator=g).bfloat16()
    out = []
    for loss in (fastcl.nt_xent(z1, z2, temperature=0.1),
                 fastcl.info_nce(z1, z2, queue, temperature=0.07)):
        out += [loss.detach(), *torch.autograd.grad(loss, (z1, z2))]
    torch.save(out, {path!r})
    """
)


@needs_products
def test_a_build_without_bf16_flags_widens_as_before(tmp_path):
    """FASTCL_CPU_BF16=0 builds without the bf16 instructions (as for a CPU without them): no
    bf16 products, and its results are this build's with the products switched off."""
    path = str(tmp_path / "out.pt")
    env = dict(os.environ, FASTCL_CPU_BF16="0")
    run = subprocess.run([sys.executable, "-c", _NO_BF16_BUILD.format(path=path)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(path)
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(50, 24, generator=g).bfloat16().requires_grad_() for _ in range(2))
    queue = torch.randn(200, 24, generator=g).bfloat16()
    with bf16_products(False):
        ours = []
        for loss in (fastcl.nt_xent(z1, z2, temperature=0.1),
                     fastcl.info_nce(z1, z2, queue, temperature=0.07)):
            ours += [loss.detach(), *torch.autograd.grad(loss, (z1, z2))]
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_build_flags_follow_fastcl_cpu_bf16(monkeypatch):
    monkeypatch.setenv("FASTCL_CPU_BF16", "0")
    off = _cpp._cflags()
    monkeypatch.delenv("FASTCL_CPU_BF16")
    on = _cpp._cflags()
    if "-march=native" in on:
        assert "-mno-avx512bf16" in off and "-mno-avx512bf16" not in on
    assert _cpp._build_name(_cpp.source_dir(), off) != _cpp._build_name(_cpp.source_dir(), on) \
        or off == on


@needs_products
def test_results_do_not_change_after_torch_runs_its_own_bf16_matmuls():
    """AMX's tile configuration belongs to whoever set it last: torch's own bf16 matmuls between
    two fastcl calls (oneDNN, AMX where available) must not change fastcl's results."""
    q, queue = _rows(64, 32, 20), _rows(700, 32, 21)
    nq, nqueue = _norms(q), _norms(queue)

    def step():
        return cpp.lse_forward_with_grad(q, queue, nq, nqueue, None, 14.0, None)

    first = step()
    for _ in range(3):
        torch.mm(queue[:256], queue[:256].t())  # bf16 GEMM on this thread
        torch.nn.functional.linear(q, queue[:96])
        again = step()
        for a, b in zip(first, again):
            assert torch.equal(a, b)
