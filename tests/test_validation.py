"""Argument checking, NaN and zero-vector behaviour, backend forcing, and the smallest batch."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastcl
from fastcl import reference
from fastcl.ops import _backend


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)


def _q():
    return _randn(4, 8, seed=0)


def _k():
    return _randn(4, 8, seed=1)


# The public callables, each taking (tensors..., **kwargs), including the nn modules.
def _nt_xent_fn(z1, z2, **kw):
    return fastcl.nt_xent(z1, z2, **kw)


def _nt_xent_module(z1, z2, **kw):
    return fastcl.nn.NTXentLoss(**kw)(z1, z2)


def _info_nce_fn(q, k, neg=None, **kw):
    return fastcl.info_nce(q, k, neg, **kw)


def _info_nce_module(q, k, neg=None, **kw):
    return fastcl.nn.InfoNCELoss(**kw)(q, k, neg)


NT_FNS = [_nt_xent_fn, _nt_xent_module]
NCE_FNS = [_info_nce_fn, _info_nce_module]
NT_IDS = ["nt_xent", "NTXentLoss"]
NCE_IDS = ["info_nce", "InfoNCELoss"]


# ------------------------------------------------------------------- tensor arguments -----

# (description, z1, z2, exception, argument named in the message)
def _nt_bad_tensors():
    z = _randn(4, 8)
    return [
        ("z1 list", [[1.0] * 8] * 4, z, TypeError, "z1"),
        ("z2 numpy", z, z.numpy().copy(), TypeError, "z2"),
        ("z1 None", None, z, TypeError, "z1"),
        ("z1 1-D", _randn(8), z, ValueError, "z1"),
        ("z2 1-D", z, _randn(8), ValueError, "z2"),
        ("z1 3-D", _randn(4, 2, 8), z, ValueError, "z1"),
        ("z2 3-D", z, _randn(4, 2, 8), ValueError, "z2"),
        ("rows differ", z, _randn(5, 8), ValueError, "z2"),
        ("D differs", z, _randn(4, 7), ValueError, "z2"),
        ("z1 int", torch.ones(4, 8, dtype=torch.int64), z, TypeError, "z1"),
        ("z2 int32", z, torch.ones(4, 8, dtype=torch.int32), TypeError, "z2"),
        ("z1 bool", torch.ones(4, 8, dtype=torch.bool), z, TypeError, "z1"),
        ("z1 complex", torch.ones(4, 8, dtype=torch.complex64), z, TypeError, "z1"),
        ("empty batch", torch.empty(0, 8), torch.empty(0, 8), ValueError, "z1"),
        ("z2 empty", z, torch.empty(0, 8), ValueError, "z2"),
        ("zero features", torch.empty(4, 0), torch.empty(4, 0), ValueError, "z1"),
        ("devices differ", z, torch.empty(4, 8, device="meta"), ValueError, "z2"),
    ]


@pytest.mark.parametrize("fn", NT_FNS, ids=NT_IDS)
@pytest.mark.parametrize("case", _nt_bad_tensors(), ids=lambda c: c[0])
def test_nt_xent_bad_tensors(fn, case):
    _, z1, z2, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        fn(z1, z2)


def _nce_bad_tensors():
    q, k = _q(), _k()
    neg2, neg3 = _randn(6, 8, seed=2), _randn(4, 3, 8, seed=2)
    U, P = "unpaired", "paired"
    return [
        # (description, query, positive_key, negative_keys, negative_mode, exc, name)
        ("query tuple", (1.0, 2.0), k, None, U, TypeError, "query"),
        ("positive_key None", q, None, None, U, TypeError, "positive_key"),
        ("negative_keys list", q, k, [[0.0] * 8], U, TypeError, "negative_keys"),
        ("query 1-D", _randn(8), k, None, U, ValueError, "query"),
        ("query 3-D", _randn(4, 1, 8), k, None, U, ValueError, "query"),
        ("positive_key 1-D", q, _randn(8), None, U, ValueError, "positive_key"),
        ("positive_key 3-D", q, _randn(4, 1, 8), None, U, ValueError, "positive_key"),
        ("unpaired 3-D negatives", q, k, neg3, U, ValueError, "negative_keys"),
        ("unpaired 1-D negatives", q, k, _randn(8), U, ValueError, "negative_keys"),
        ("paired 2-D negatives", q, k, neg2, P, ValueError, "negative_keys"),
        ("paired 4-D negatives", q, k, _randn(4, 3, 1, 8), P, ValueError, "negative_keys"),
        ("rows differ", q, _randn(5, 8), None, U, ValueError, "positive_key"),
        ("D differs", q, _randn(4, 7), None, U, ValueError, "positive_key"),
        ("negatives D differs", q, k, _randn(6, 7), U, ValueError, "negative_keys"),
        ("paired D differs", q, k, _randn(4, 3, 7), P, ValueError, "negative_keys"),
        ("paired first dim", q, k, _randn(5, 3, 8), P, ValueError, "negative_keys"),
        ("query int", torch.ones(4, 8, dtype=torch.long), k, None, U, TypeError, "query"),
        ("positive_key bool", q, torch.ones(4, 8, dtype=torch.bool), None, U, TypeError,
         "positive_key"),
        ("negatives int", q, k, torch.ones(6, 8, dtype=torch.int16), U, TypeError,
         "negative_keys"),
        ("empty batch", torch.empty(0, 8), torch.empty(0, 8), None, U, ValueError, "query"),
        ("positive_key empty", q, torch.empty(0, 8), None, U, ValueError, "positive_key"),
        ("zero features", torch.empty(4, 0), torch.empty(4, 0), None, U, ValueError, "query"),
        ("negatives zero features", q, k, torch.empty(6, 0), U, ValueError, "negative_keys"),
        ("devices differ", q, torch.empty(4, 8, device="meta"), None, U, ValueError,
         "positive_key"),
        ("negatives device", q, k, torch.empty(6, 8, device="meta"), U, ValueError,
         "negative_keys"),
    ]


@pytest.mark.parametrize("fn", NCE_FNS, ids=NCE_IDS)
@pytest.mark.parametrize("case", _nce_bad_tensors(), ids=lambda c: c[0])
def test_info_nce_bad_tensors(fn, case):
    _, q, k, neg, mode, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        fn(q, k, neg, negative_mode=mode)


# ------------------------------------------------------------------ scalar arguments -------

BAD_TEMPERATURES = [
    ("zero", 0.0, ValueError),
    ("int zero", 0, ValueError),
    ("negative", -0.5, ValueError),
    ("nan", math.nan, ValueError),
    ("inf", math.inf, ValueError),
    ("-inf", -math.inf, ValueError),
    ("string", "0.5", TypeError),
    ("bool", True, TypeError),
    ("int tensor", torch.tensor(1), TypeError),
    ("two-element tensor", torch.tensor([0.5, 0.5]), TypeError),
    ("zero tensor", torch.tensor(0.0), ValueError),
    ("negative tensor", torch.tensor(-0.1, requires_grad=True), ValueError),
    ("nan tensor", torch.tensor(math.nan), ValueError),
    ("None", None, TypeError),
]


def _call_with(fn_kind, **kwargs):
    z1, z2 = _randn(4, 8, seed=0), _randn(4, 8, seed=1)
    if fn_kind == "nt_xent":
        return fastcl.nt_xent(z1, z2, **kwargs)
    if fn_kind == "NTXentLoss":
        return fastcl.nn.NTXentLoss(**kwargs)(z1, z2)
    if fn_kind == "info_nce":
        return fastcl.info_nce(z1, z2, _randn(6, 8, seed=2), **kwargs)
    return fastcl.nn.InfoNCELoss(**kwargs)(z1, z2, _randn(6, 8, seed=2))


ALL_KINDS = ["nt_xent", "NTXentLoss", "info_nce", "InfoNCELoss"]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("case", BAD_TEMPERATURES, ids=lambda c: c[0])
def test_bad_temperature(kind, case):
    _, value, exc = case
    with pytest.raises(exc, match="temperature"):
        _call_with(kind, temperature=value)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("value", ["avg", "MEAN", None, ""])
def test_unknown_reduction(kind, value):
    with pytest.raises(ValueError, match="reduction"):
        _call_with(kind, reduction=value)


@pytest.mark.parametrize("kind", ["info_nce", "InfoNCELoss"])
@pytest.mark.parametrize("value", ["both", "Paired", None])
def test_unknown_negative_mode(kind, value):
    with pytest.raises(ValueError, match="negative_mode"):
        _call_with(kind, negative_mode=value)


def test_unknown_negative_mode_without_negatives():
    with pytest.raises(ValueError, match="negative_mode"):
        fastcl.info_nce(_q(), _k(), None, negative_mode="shared")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_numpy_temperatures_are_accepted(kind):
    """NumPy scalars are real numbers: np.float32 (not a Python float subclass) is accepted
    like np.float64, with the same result as the Python float."""
    np = pytest.importorskip("numpy")
    expect = _call_with(kind, temperature=0.5)
    for tau in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        torch.testing.assert_close(_call_with(kind, temperature=tau), expect, rtol=0, atol=0)
    assert torch.equal(_call_with(kind, temperature=np.int64(1)),
                       _call_with(kind, temperature=1.0))
    with pytest.raises(ValueError, match="temperature"):
        _call_with(kind, temperature=np.float32(-1))


def test_messages_where_users_go_wrong():
    """The calls new users make by mistake get a message that says what to do."""
    q, k = _q(), _k()
    # Unpaired mode with (N, M, D) negatives: say (M, D) and suggest paired mode.
    with pytest.raises(ValueError, match=r"\(M, D\) in unpaired mode.*negative_mode='paired'"):
        fastcl.info_nce(q, k, _randn(4, 3, 8, seed=2))
    # A FAIR-style (D, K) queue: say it is (K, D) and that queue.T works ...
    fair = _randn(8, 5, seed=3)
    with pytest.raises(ValueError, match=r"negative_keys.*\(M, D\), one key per row.*queue\.T"):
        fastcl.info_nce(q, k, fair)
    assert torch.isfinite(fastcl.info_nce(q, k, fair.T))  # ... and it does
    # ... and for the push, that the buffer must be stored (K, D).
    with pytest.raises(ValueError, match=r"\(K, D\), one key per row.*transposed"):
        fastcl.queue_push_(fair.contiguous(), torch.zeros(1, dtype=torch.long), q)
    # pytorch-metric-learning's convention, loss(embeddings, labels): two views are expected.
    emb, labels = _randn(8, 4, seed=4), torch.arange(4).repeat(2)
    for call in (lambda: fastcl.nn.NTXentLoss()(emb, labels), lambda: fastcl.nt_xent(emb, labels)):
        with pytest.raises(TypeError, match=r"two views.*labels.*embeddings\[:N\]"):
            call()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_valid_scalars_accepted(kind):
    """The checks above reject only what is wrong: ints and small/large floats pass."""
    for tau in (1, 0.01, 2.0, 1e-3):
        for reduction in ("mean", "sum", "none"):
            assert torch.isfinite(_call_with(kind, temperature=tau, reduction=reduction)).all()


# -------------------------------------------------------------------------- NaN in --------

def _nan_at(t, index):
    t = t.clone()
    t[index] = float("nan")
    return t


def _nan_cases(n=5, d=8, m=7):
    """(id, fastcl callable, reference callable, args) with one NaN somewhere."""
    z1, z2 = _randn(n, d, seed=0), _randn(n, d, seed=1)
    q, k = _randn(n, d, seed=2), _randn(n, d, seed=3)
    neg, pneg = _randn(m, d, seed=4), _randn(n, 3, d, seed=5)
    nt = (fastcl.nt_xent, reference.nt_xent, {})
    nce = (fastcl.info_nce, reference.info_nce, {})
    paired = (fastcl.info_nce, reference.info_nce, {"negative_mode": "paired"})
    cases = [
        ("nt_xent-z1", nt, [_nan_at(z1, (2, 3)), z2]),
        ("nt_xent-z2", nt, [z1, _nan_at(z2, (0, 0))]),
        ("none-query", nce, [_nan_at(q, (1, 5)), k, None]),
        ("none-positive_key", nce, [q, _nan_at(k, (3, 2)), None]),
        ("unpaired-query", nce, [_nan_at(q, (4, 0)), k, neg]),
        ("unpaired-positive_key", nce, [q, _nan_at(k, (1, 1)), neg]),
        ("unpaired-negative_keys", nce, [q, k, _nan_at(neg, (6, 7))]),
        ("paired-query", paired, [_nan_at(q, (0, 3)), k, pneg]),
        ("paired-positive_key", paired, [q, _nan_at(k, (2, 2)), pneg]),
        ("paired-negative_keys", paired, [q, k, _nan_at(pneg, (3, 1, 4))]),
    ]
    return [(cid, fast, ref, kw, args) for cid, (fast, ref, kw), args in cases]


@pytest.mark.parametrize("case", _nan_cases(), ids=lambda c: c[0])
def test_nan_in_nan_out(backend, case):
    _, fast_fn, ref_fn, kw, args = case
    args = [None if a is None else a.to(backend.device) for a in args]
    assert torch.isnan(fast_fn(*args, **kw)).item()  # reduction="mean"
    assert torch.isnan(fast_fn(*args, reduction="sum", **kw)).item()
    per_row = fast_fn(*args, reduction="none", **kw)
    ref_rows = ref_fn(*args, reduction="none", **kw)
    # NaN exactly where the reference has it (no hidden NaN), equal values elsewhere.
    assert torch.isnan(per_row).any()
    assert torch.equal(torch.isnan(per_row).cpu(), torch.isnan(ref_rows).cpu())
    torch.testing.assert_close(per_row, ref_rows, rtol=1e-5, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------- zero vectors ------


def _zero_row(t, index):
    t = t.clone()
    t[index] = 0.0
    return t


def _zero_cases(n=5, d=8, m=7):
    z1, z2 = _randn(n, d, seed=0), _randn(n, d, seed=1)
    q, k = _randn(n, d, seed=2), _randn(n, d, seed=3)
    neg, pneg = _randn(m, d, seed=4), _randn(n, 3, d, seed=5)
    return [
        ("nt_xent", "nt", [_zero_row(z1, 1), _zero_row(z2, 3)], {}),
        ("nt_xent-pair", "nt", [_zero_row(z1, 2), _zero_row(z2, 2)], {}),
        ("none", "nce", [_zero_row(q, 0), _zero_row(k, 2), None], {}),
        ("unpaired", "nce", [_zero_row(q, 4), _zero_row(k, 1), _zero_row(neg, 3)], {}),
        ("paired", "nce", [_zero_row(q, 1), _zero_row(k, 3), _zero_row(pneg, (2, 1))],
         {"negative_mode": "paired"}),
    ]


@pytest.mark.parametrize("case", _zero_cases(), ids=lambda c: c[0])
def test_zero_vector_rows_are_finite_and_match_reference(backend, case):
    _, kind, args, kw = case
    fast_fn, ref_fn = ((fastcl.nt_xent, reference.nt_xent) if kind == "nt"
                       else (fastcl.info_nce, reference.info_nce))
    xs = [None if a is None else a.to(backend.device).requires_grad_() for a in args]
    rs = [None if a is None else a.to(backend.device).requires_grad_() for a in args]
    for reduction in ("mean", "none"):
        loss = fast_fn(*xs, reduction=reduction, **kw)
        ref = ref_fn(*rs, reduction=reduction, **kw)
        assert torch.isfinite(loss).all()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss = fast_fn(*xs, **kw)
    ref = ref_fn(*rs, **kw)
    loss.backward()
    ref.backward()
    for x, r in zip(xs, rs):
        if x is None:
            continue
        assert torch.isfinite(x.grad).all()
        # A zero row's gradient is d/d xhat scaled by 1/eps (F.normalize's clamp): huge but
        # finite. Compare relative to each row's own size.
        scale = r.grad.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
        torch.testing.assert_close(x.grad / scale, r.grad / scale, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------- backend forcing ------


def test_forced_cpp_backend_runs_on_cpu_and_rejects_other_devices():
    fastcl.set_backend("cpp")
    assert fastcl.get_backend() == "cpp"
    from fastcl.kernels import cpp

    assert _backend.implementation(_q()) is cpp
    torch.testing.assert_close(fastcl.nt_xent(_q(), _k()), reference.nt_xent(_q(), _k()))
    with pytest.raises(RuntimeError, match="FASTCL_BACKEND=cpp runs on CPU tensors"):
        _backend.implementation(_cuda_like())


@pytest.mark.parametrize("name", ["nonsense", "", "cuda", None])
def test_set_backend_rejects_unknown(name):
    before = fastcl.get_backend()
    with pytest.raises(ValueError, match="backend"):
        fastcl.set_backend(name)
    assert fastcl.get_backend() == before


def test_set_backend_is_case_insensitive():
    fastcl.set_backend(" Chunked ")
    assert fastcl.get_backend() == "chunked"


def test_bogus_env_backend_fails_at_import():
    env = dict(os.environ, FASTCL_BACKEND="bogus")
    proc = subprocess.run([sys.executable, "-c", "import fastcl"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "FASTCL_BACKEND" in proc.stderr
    assert "bogus" in proc.stderr


@pytest.mark.parametrize("value", [None, "0", ""])
def test_forced_triton_on_cpu_needs_interpreter(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    fastcl.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fastcl.nt_xent(_q(), _k())
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fastcl.info_nce(_q(), _k())


def test_reference_backend_is_the_reference_exactly():
    z1, z2 = _randn(6, 8, seed=0), _randn(6, 8, seed=1)
    q, k, neg, pneg = _q(), _k(), _randn(5, 8, seed=2), _randn(4, 3, 8, seed=3)
    fastcl.set_backend("reference")
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(fastcl.nt_xent(z1, z2, 0.3, reduction),
                           reference.nt_xent(z1, z2, 0.3, reduction))
        assert torch.equal(fastcl.info_nce(q, k, None, 0.2, reduction),
                           reference.info_nce(q, k, None, 0.2, reduction))
        assert torch.equal(fastcl.info_nce(q, k, neg, 0.2, reduction),
                           reference.info_nce(q, k, neg, 0.2, reduction))
        assert torch.equal(fastcl.info_nce(q, k, pneg, 0.2, reduction, "paired"),
                           reference.info_nce(q, k, pneg, 0.2, reduction, "paired"))
    # The reference backend still validates its arguments.
    with pytest.raises(ValueError, match="temperature"):
        fastcl.nt_xent(z1, z2, 0.0)


def test_use_backend_restores_after_exception(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fastcl.set_backend("chunked")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with fastcl.use_backend("triton"):
            assert fastcl.get_backend() == "triton"
            fastcl.nt_xent(_q(), _k())
    assert fastcl.get_backend() == "chunked"
    with pytest.raises(KeyError):
        with fastcl.use_backend("reference"):
            raise KeyError("body")
    assert fastcl.get_backend() == "chunked"
    with pytest.raises(ValueError):
        with fastcl.use_backend("nonsense"):
            pass  # pragma: no cover
    assert fastcl.get_backend() == "chunked"


# ------------------------------------------------------------------- smallest batches ------


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_nt_xent_one_pair(backend, temperature):
    """N=1 per view: each row's only other row is its positive.

    Compared with the float64 reference. fastcl forms lse - positive from two float32 numbers
    of size ~1/temperature, so its error is a few float32 ulps of 1/temperature.
    """
    z1 = _randn(1, 8, seed=0, device=backend.device, requires_grad=True)
    z2 = _randn(1, 8, seed=1, device=backend.device, requires_grad=True)
    r1, r2 = (t.detach().double().clone().requires_grad_() for t in (z1, z2))
    atol = 8 * torch.finfo(torch.float32).eps * max(1.0, 1.0 / temperature)
    for reduction in ("mean", "none"):
        out = fastcl.nt_xent(z1, z2, temperature, reduction)
        assert out.dtype == torch.float32
        torch.testing.assert_close(
            out.double(), reference.nt_xent(r1, r2, temperature, reduction),
            rtol=1e-6, atol=atol,
        )
    loss = fastcl.nt_xent(z1, z2, temperature)
    ref = reference.nt_xent(r1, r2, temperature)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad.double(), r1.grad, rtol=1e-5, atol=atol)
    torch.testing.assert_close(z2.grad.double(), r2.grad, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("mode", ["none", "unpaired", "paired"])
def test_info_nce_one_query(backend, mode):
    q = _randn(1, 8, seed=0, device=backend.device)
    k = _randn(1, 8, seed=1, device=backend.device)
    neg = {"none": None, "unpaired": _randn(3, 8, seed=2, device=backend.device),
           "paired": _randn(1, 3, 8, seed=2, device=backend.device)}[mode]
    negative_mode = "paired" if mode == "paired" else "unpaired"
    torch.testing.assert_close(
        fastcl.info_nce(q, k, neg, 0.1, "none", negative_mode),
        reference.info_nce(q, k, neg, 0.1, "none", negative_mode), rtol=1e-6, atol=1e-6,
    )


# ------------------------------------------------------- Triton missing on a CUDA machine ----


def _cuda_like(dtype=torch.float32):
    """What backend selection reads of a tensor (device and dtype), without needing a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


def _triton_missing(monkeypatch):
    def fail(family="contrastive"):
        raise RuntimeError("fastcl's Triton kernels are unavailable (no module named 'triton')")

    monkeypatch.setattr(_backend, "_load_triton", fail)
    monkeypatch.setattr(_backend, "_warned", set())


def test_auto_without_triton_on_cuda_warns_once_and_uses_chunked(monkeypatch):
    """The documented fallback: CUDA tensors with no importable Triton run the chunked path,
    with one RuntimeWarning that says how to get the fast path."""
    _triton_missing(monkeypatch)
    from fastcl.kernels import chunked

    with fastcl.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="pip install triton"):
            assert _backend.implementation(_cuda_like()) is chunked
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.implementation(_cuda_like()) is chunked


def test_forced_triton_without_triton_raises(monkeypatch):
    """FASTCL_BACKEND=triton never falls back: a missing Triton is an error."""
    _triton_missing(monkeypatch)
    with fastcl.use_backend("triton"):
        with pytest.raises(RuntimeError, match="Triton"):
            _backend.implementation(_cuda_like())


def test_auto_routes_float64_on_cuda_to_chunked():
    """float64 is not a Triton dtype: on CUDA it runs on the chunked path (as documented)."""
    from fastcl.kernels import chunked

    with fastcl.use_backend("auto"):
        assert _backend.implementation(_cuda_like(torch.float64)) is chunked


def test_momentum_arguments_of_the_wrong_type_name_the_argument():
    """Wrong types reach a TypeError naming the argument, not a failure inside a comparison."""
    cases = [
        (lambda: fastcl.cosine_momentum(1, 10, None), "base"),
        (lambda: fastcl.cosine_momentum(1, 10, 0.9, "1"), "final"),
        (lambda: fastcl.nn.NegativeQueue(4, 2, dtype="float32"), "dtype"),
        (lambda: fastcl.models.MoCo(torch.nn.Linear(2, 2), 2, momentum="x"), "momentum"),
        (lambda: fastcl.models.BYOL(torch.nn.Linear(2, 2), 2, momentum="x"), "momentum"),
    ]
    for call, name in cases:
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            call()
