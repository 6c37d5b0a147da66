"""The image-text losses against open_clip's formulations: CLIP (``fastcl.clip_loss``, issue
14) and SigLIP (``fastcl.siglip_loss``, issue 15).

pytest-benchmark (``python -m pytest benchmarks/bench_clip.py --benchmark-only``)
    ``test_clip``: forward + backward with respect to the image and text features and the
    learnable logit scale (a 0-dim tensor, 1/0.07), normalized fp32 features, D=512, against
    open_clip's formulation in eager mode (``reference``: two (N x N) logit matrices,
    cross-entropy both ways) and under ``torch.compile`` (``compile``); the peak memory of
    each (RSS growth over one step in a fresh process, ``memory_probe.py``) in extra_info.
    With ``--fastcl-size=large``, fastcl alone at N=32768 (open_clip would hold two 4 GiB
    logit matrices).

    ``test_siglip``: the same for SigLIP, with a learnable scale (10) and bias (-10), against
    open_clip's SigLipLoss formulation (one (N x N) logit matrix and one of labels,
    log-sigmoid, sum / N), eager and compiled.

Ratios (the issues' figures; interleaved in one process, medians, ratios to fastcl):
    python benchmarks/interleaved.py --case clip --n 4096 --d 512 --providers fastcl,reference,compile
    python benchmarks/interleaved.py --case siglip --n 4096 --d 512 --providers fastcl,reference,compile
Memory at the large size:
    python benchmarks/memory_probe.py --case clip --provider fastcl --n 32768 --d 512
    python benchmarks/memory_probe.py --case siglip --provider fastcl --n 32768 --d 512
"""
from __future__ import annotations

import pytest

import _common

D = 512
SIZES = (1024, 4096)
LARGE = 32768
PROVIDERS = ("fastcl", "reference", "compile")


def _params(config):
    params = [(n, p) for n in SIZES for p in PROVIDERS]
    if config.getoption("--fastcl-size", "default") == "large":
        params.append((LARGE, "fastcl"))
    return params


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ in ("test_clip", "test_siglip"):
        params = _params(metafunc.config)
        metafunc.parametrize("n,provider", params, ids=[f"N{n}-{p}" for n, p in params])


def _run(case, benchmark, memory_probe, n, provider, **info):
    step = _common.make_step(case, provider, n, "full", d=D)
    benchmark.group = f"{case} full cpu N={n} D={D} fp32"
    benchmark.extra_info.update(case=case, provider=provider, n=n, d=D, mode="full",
                                device="cpu", backend=_common.backend_name(case, provider, "cpu"),
                                **info)
    if not benchmark.disabled:
        mem = memory_probe(case, provider, n, "cpu", step=step, d=D)
        if mem is not None:
            benchmark.extra_info["peak_mem_mib"] = mem.get("full_mib")
            benchmark.extra_info["memory"] = mem
    benchmark.pedantic(step, rounds=1 if n >= LARGE else 3, iterations=1, warmup_rounds=1)


def test_clip(benchmark, memory_probe, n, provider):
    _run("clip", benchmark, memory_probe, n, provider, logit_scale=_common.CLIP_SCALE)


def test_siglip(benchmark, memory_probe, n, provider):
    _run("siglip", benchmark, memory_probe, n, provider, logit_scale=_common.SIGLIP_SCALE,
         logit_bias=_common.SIGLIP_BIAS)
