"""The supervised contrastive loss against SupContrast's formulation: SupCon
(``fastcl.supcon_loss``, issue 16).

pytest-benchmark (``python -m pytest benchmarks/bench_supcon.py --benchmark-only``)
    ``test_supcon``: forward + backward with respect to the features (B, 2 views, D=128, unit
    rows, fp32), labels in range(100), temperature 0.07, against SupContrast's SupConLoss
    formulation in eager mode (``reference``: (2B)^2 logits and dense masks) and under
    ``torch.compile`` (``compile``), B in {512, 2048} samples (2048: the issue's size); the
    peak memory of each (RSS growth over one step in a fresh process, ``memory_probe.py``) in
    extra_info. With ``--fastcl-size=large``, fastcl alone at B=16384 (32768 anchors: the
    formulation would hold (V B)^2 float32 matrices of 4 GiB each).

Ratios (the issue's figure; interleaved in one process, medians, ratios to fastcl):
    python benchmarks/interleaved.py --case supcon --n 2048 --classes 100 --providers fastcl,reference,compile
Memory:
    python benchmarks/memory_probe.py --case supcon --provider fastcl --n 2048 --classes 100
"""
from __future__ import annotations

import _common

SIZES = (512, _common.SUPCON_N)
LARGE = 16384
PROVIDERS = ("fastcl", "reference", "compile")


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_supcon":
        params = [(n, p) for n in SIZES for p in PROVIDERS]
        if metafunc.config.getoption("--fastcl-size", "default") == "large":
            params.append((LARGE, "fastcl"))
        metafunc.parametrize("n,provider", params, ids=[f"B{n}-{p}" for n, p in params])


def test_supcon(benchmark, memory_probe, n, provider):
    d, views, classes = _common.D, _common.SUPCON_VIEWS, _common.SUPCON_CLASSES
    step = _common.make_step("supcon", provider, n, "full", d=d, classes=classes)
    benchmark.group = f"supcon full cpu B={n} x {views} views D={d} {classes} classes fp32"
    benchmark.extra_info.update(case="supcon", provider=provider, n=n, views=views, d=d,
                                classes=classes, temperature=_common.SUPCON_TAU, mode="full",
                                device="cpu",
                                backend=_common.backend_name("supcon", provider, "cpu"))
    if not benchmark.disabled:
        mem = memory_probe("supcon", provider, n, "cpu", step=step, d=d)
        if mem is not None:
            benchmark.extra_info["peak_mem_mib"] = mem.get("full_mib")
            benchmark.extra_info["memory"] = mem
    benchmark.pedantic(step, rounds=1 if n >= LARGE else 3, iterations=1, warmup_rounds=1)
