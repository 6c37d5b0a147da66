"""NT-Xent, in-batch and MoCo-style InfoNCE: fastcl against the eager reference, torch.compile
and the peers.

pytest-benchmark (``cd <repo> && python -m pytest benchmarks --benchmark-only``)
    ``test_nt_xent``: fp32, D=128, N in {256, 1024, 4096} rows per view (plus 16384 for fastcl
    alone with ``--fastcl-size=large``), modes ``full`` (forward + backward) and ``forward``,
    providers ``fastcl`` (C++ kernels forced on CPU, Triton forced on CUDA), ``chunked``
    (fastcl's tiled PyTorch fallback), ``reference`` (``fastcl.reference``, eager) and ``compile``
    (``torch.compile(fastcl.reference.nt_xent)``); on CUDA the same grid runs again there.
    ``test_info_nce_moco``: query/key (256, 128) requiring grad against a detached
    (16384, 128) queue, same providers and modes.
    ``test_in_batch``: CLIP-style in-batch InfoNCE (``fastcl.info_nce(q, k)``), N in {256,
    1024, 4096}, same providers and modes; on CUDA also Inf-CL's ``cal_inf_loss`` (skipped,
    saying why, where the ``inf_cl`` package is not installed: an optional peer, not a
    dependency).
    On CUDA every case runs for fp32, tf32 (``set_float32_matmul_precision("high")``) and bf16
    inputs; on CPU for fp32 and bf16 (and MoCo for "mixed": bf16 queries beside a float32
    queue, what autocast gives).
    Cases are grouped per (case, mode, device, N, dtype), so each pytest-benchmark table
    compares the providers on the same work. ``extra_info`` holds ``peak_mem_mib`` (for the
    case's mode), both peaks, the backend that ran, and the probe's method; see
    ``memory_probe.py``
    (CPU: RSS growth over one step in a fresh subprocess; CUDA: max_memory_allocated growth).
    Rounds are few at large N (``benchmark.pedantic``, one warm-up round that also absorbs
    torch.compile's compilation); inputs rotate among 3 buffers (``_common.Step``).

Ratios (``python benchmarks/bench_nt_xent.py --ratios``)
    One process; for each case and size, the providers run interleaved, round-robin, with the
    starting provider rotated every round, after two warm-up calls each; the table gives each
    provider's median over the rounds (7, or 5 at N >= 4096), the ratios reference/fastcl,
    (cases: NT-Xent at ``--sizes``, MoCo InfoNCE, in-batch InfoNCE at ``--in-batch``, 1024 by
    default: issue 13's target)
    compile/fastcl and chunked/fastcl (> 1: fastcl faster), and the peak memory from the
    subprocess probe. This
    is the figure to quote: on a shared, noisy machine only ratios from interleaved runs in
    one process mean much, and absolute times only with the machine and date.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

# --------------------------------------------------------------------- pytest cases -------

ROUNDS = {256: 20, 1024: 8, 4096: 3, 16384: 2}


def _rounds(n: int) -> int:
    return ROUNDS.get(n, 3 if n < 16384 else 2)


def _configs(device, case):
    """Input configurations (``_common.DTYPES``): fp32 and bf16 on CPU (the C++ kernels' bf16
    products where the CPU has them), plus, for MoCo, "mixed" (bf16 queries and keys beside a
    float32 queue, as under autocast); fp32, tf32 and bf16 on CUDA."""
    if device == "cuda":
        return ("fp32", "tf32", "bf16")
    return ("fp32", "bf16", "mixed") if case == "info_nce" else ("fp32", "bf16")


def _params(config, case):
    """(device, dtype config, mode, N, provider) for a case."""
    large = config.getoption("--fastcl-size", "default") == "large" and case == "nt_xent"
    sizes = {"nt_xent": _common.SIZES, "in_batch": _common.SIZES,
             "info_nce": (_common.MOCO_N,)}[case]
    params = []
    for device in _common.devices():
        for dt in _configs(device, case):
            for mode in _common.MODES:
                for n in tuple(sizes) + (tuple(_common.LARGE_SIZES) if large else ()):
                    providers = _common.PROVIDERS if n in sizes else ("fastcl",)
                    if case == "in_batch" and device == "cuda":
                        providers += ("inf_cl",)
                    params += [(device, dt, mode, n, p) for p in providers]
    return params


_CASE_OF = {"test_nt_xent": "nt_xent", "test_in_batch": "in_batch",
            "test_info_nce_moco": "info_nce"}


def pytest_generate_tests(metafunc):
    case = _CASE_OF.get(metafunc.function.__name__)
    if case is not None:
        params = _params(metafunc.config, case)
        metafunc.parametrize(
            "device,dtype,mode,n,provider", params,
            ids=[f"{dev}-{dt}-{mode}-N{n}-{prov}" for dev, dt, mode, n, prov in params],
        )


def _run(benchmark, memory_probe, case, provider, n, mode, device, dtype, group, extra):
    step = _common.make_step(case, provider, n, mode, device, config=dtype)
    benchmark.group = f"{group} {dtype}"
    benchmark.extra_info.update(
        case=case, provider=provider, n=n, d=_common.D, mode=mode, device=device, dtype=dtype,
        backend=_common.backend_name(case, provider, device), n_buffers=_common.N_BUFFERS,
        **extra,
    )
    # The memory probe measures fp32 inputs (a fresh process on CPU; on CUDA, this step).
    if not benchmark.disabled and (dtype == "fp32" or device == "cuda"):
        mem = memory_probe(case, provider, n, device, step=step, mode=mode)
        if mem is not None:
            benchmark.extra_info["peak_mem_mib"] = mem.get(f"{mode}_mib")
            benchmark.extra_info["memory"] = mem
    # Backward: the forward runs untimed before each round (pedantic's setup).
    benchmark.pedantic(step, setup=getattr(step, "prepare", None), rounds=_rounds(n),
                       iterations=1, warmup_rounds=1)


def test_nt_xent(benchmark, memory_probe, device, dtype, mode, n, provider):
    _run(benchmark, memory_probe, "nt_xent", provider, n, mode, device, dtype,
         group=f"nt_xent {mode} {device} N={n} D={_common.D}",
         extra={"temperature": _common.NT_XENT_TAU})


def test_in_batch(benchmark, memory_probe, device, dtype, mode, n, provider):
    if provider == "inf_cl" and _common.inf_cl_status(device):
        pytest.skip(_common.inf_cl_status(device))  # an optional provider, absent here
    _run(benchmark, memory_probe, "in_batch", provider, n, mode, device, dtype,
         group=f"in_batch {mode} {device} N={n} D={_common.D}",
         extra={"temperature": _common.IN_BATCH_TAU})


def test_info_nce_moco(benchmark, memory_probe, device, dtype, mode, n, provider):
    m = _common.MOCO_M
    _run(benchmark, memory_probe, "info_nce", provider, n, mode, device, dtype,
         group=f"info_nce moco {mode} {device} N={n} M={m} D={_common.D}",
         extra={"m": m, "temperature": _common.MOCO_TAU, "queue_requires_grad": False})


# ---------------------------------------------------------------------- --ratios ----------


def ratios(argv=None) -> int:
    import argparse
    import datetime

    p = argparse.ArgumentParser(description="interleaved medians and ratios (see module doc)")
    p.add_argument("--ratios", action="store_true", required=True)
    p.add_argument("--sizes", default=",".join(map(str, _common.SIZES)))
    p.add_argument("--modes", default="full,forward")
    p.add_argument("--rounds", type=int, default=None, help="default: 7, or 5 at N >= 4096")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the timed process (default: torch's)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-moco", action="store_true", help="skip the info_nce MoCo case")
    p.add_argument("--in-batch", default="1024",
                   help="N of the in-batch InfoNCE case (comma-separated; empty: skip)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    device = a.device
    providers = _common.PROVIDERS

    work = [("nt_xent", n) for n in sizes]
    if not a.no_moco:
        work.append(("info_nce", _common.MOCO_N))
    work += [("in_batch", int(n)) for n in a.in_batch.split(",") if n]

    info = _common.machine_info()
    started = datetime.datetime.now().astimezone()
    print(f"# fastcl ratios, {started:%Y-%m-%d %H:%M %Z}, device {device}")
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"# load average at start: {_common.loadavg()}")
    print("# command: python benchmarks/bench_nt_xent.py " + " ".join(sys.argv[1:] if argv is None else argv))
    sys.stdout.flush()

    mem = {}
    if not a.no_memory:
        for case, n in work:
            for prov in providers:
                if device == "cpu":
                    mem[(case, n, prov)] = _common.probe_memory(case, prov, n, device=device)
                # CUDA: measured in-process below, after the warm-up

    rows = []
    for case, n in work:
        for mode in modes:
            steps = {prov: _common.make_step(case, prov, n, mode, device) for prov in providers}
            rounds = a.rounds or (5 if n >= 4096 else 7)
            med, _ = _common.interleaved(steps, rounds)
            if device == "cuda" and not a.no_memory:
                for prov, st in steps.items():
                    mem.setdefault((case, n, prov), {})[f"{mode}_mib"] = _common.cuda_peak_mib(st)
            label = {"nt_xent": "nt_xent", "in_batch": "in_batch"}.get(
                case, f"info_nce M={_common.MOCO_M}")
            rows.append((label, n, mode, rounds, med,
                         {prov: (mem.get((case, n, prov)) or {}).get(f"{mode}_mib")
                          for prov in providers}))
            print(f"  done {label} N={n} {mode}", file=sys.stderr, flush=True)
            del steps

    others = [p for p in providers if p != "fastcl"]
    header = ("case", "N", "mode", "rounds", *providers,
              *(f"{p}/fastcl" for p in others), *(f"mem {p}" for p in providers))
    table = [header]
    slower = []
    for label, n, mode, rounds, med, mm in rows:
        ratio = {p: med[p] / med["fastcl"] for p in others}
        table.append((label, str(n), mode, str(rounds),
                      *(_common.fmt_time(med[p]) for p in providers),
                      *(f"{ratio[p]:.2f}x" for p in others),
                      *(_common.fmt_mib(mm[p]) for p in providers)))
        for other, r in ratio.items():
            if r < 1.0:
                slower.append(f"{label} N={n} {mode}: fastcl {_common.fmt_time(med['fastcl'])} "
                              f"vs {other} {_common.fmt_time(med[other])} ({r:.2f}x)")
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        print("  ".join(c.rjust(w) if i >= 1 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("# times: median seconds per step; ratios > 1 mean fastcl is faster; "
          "mem: peak RSS growth over one step (memory_probe.py)")
    if not a.no_memory and device == "cpu":
        methods = {v.get("method") or v.get("error") for v in mem.values()}
        print("# memory method: " + "; ".join(sorted(map(str, methods))))
    if slower:
        print("# fastcl slower than:")
        for line in slower:
            print("#   " + line)
    print(f"# load average at end: {_common.loadavg()}")
    elapsed = datetime.datetime.now().astimezone() - started
    print(f"# total {elapsed.total_seconds():.0f} s")
    return 0


if __name__ == "__main__":
    if "--ratios" in sys.argv[1:]:
        sys.exit(ratios())
    print("usage: python benchmarks/bench_nt_xent.py --ratios [--sizes 256,1024,4096] "
          "[--modes full,forward] [--rounds R] [--threads T] [--no-memory] [--no-moco]\n"
          "pytest cases: python -m pytest benchmarks --benchmark-only", file=sys.stderr)
    sys.exit(2)
