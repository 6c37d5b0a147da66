"""Peak memory of one loss step, measured in a fresh interpreter.

    python benchmarks/memory_probe.py --case nt_xent --provider fastcl --n 4096 --d 128

prints one JSON line: ``forward_mib`` and ``full_mib`` (forward + backward), in MiB.

    python benchmarks/memory_probe.py --case supcon --provider reference [--n 2048] [--classes 100]

SupCon (issue 16): ``--n`` samples (2048 by default) x 2 views, D=128, labels in
``range(--classes)``; ``reference`` / ``compile`` are SupContrast's formulation.

Method (CPU)
    1. Import torch and fastcl, then run a full step (forward + backward) of the same provider
       at two tiny sizes. This pays one-off costs outside the measurement: library
       initialization, custom-op registration, thread pools, and for ``compile`` the
       compilation itself (the second size makes torch.compile switch to dynamic shapes, so
       the target size reuses that graph; ``recompiled`` in the output says if it did not).
       No warm-up at the target size: nothing the step allocates exists before it runs.
    2. Create the inputs at the target size; ``gc.collect()``.
    3. Reset the peak-RSS mark (``echo 5 > /proc/self/clear_refs``), read VmRSS as the baseline,
       run one forward; peak = VmHWM - baseline. Then the same for one full step.
    The parent (``_common.probe_memory``) sets ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` to 128 KiB so glibc returns freed blocks to the OS rather than
    keeping them for reuse, which would hide part of a step's peak. The figure is the growth in
    resident memory over one step: saved activations, the similarity blocks or matrices,
    temporaries and the gradients returned; not the inputs. Where /proc/self/clear_refs can't
    be written (not Linux), it falls back to ``ru_maxrss`` growth, which is a lower bound
    (a higher peak during set-up would mask the step's); ``method`` says which was used.

Method (CUDA)
    ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step, after
    the same tiny-size warm-up: the caching allocator's reserved pool does not enter into it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common  # noqa: E402

WARM_SIZES = ((8, 32), (16, 64))  # (n, m) pairs


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="nt_xent", choices=_common.CASES)
    p.add_argument("--provider", required=True,
                   choices=_common.PROVIDERS + _common.OPTIONAL_PROVIDERS)
    p.add_argument("--n", type=int, default=None,
                   help="rows per view (supcon: samples, 2048 by default); required otherwise")
    p.add_argument("--d", type=int, default=_common.D)
    p.add_argument("--m", type=int, default=_common.MOCO_M, help="queue rows (info_nce)")
    p.add_argument("--classes", type=int, default=_common.SUPCON_CLASSES,
                   help="label range (supcon)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--warmup", choices=("tiny", "target"), default=None,
                   help="warm-up sizes (default: target for compile, tiny otherwise)")
    a = p.parse_args(argv)
    if a.n is None:
        if a.case not in _common.CASE_N:
            p.error(f"--n is required for --case {a.case}")
        a.n = _common.CASE_N[a.case]

    fn = _common.loss_fn(a.case, a.provider, a.device)
    ctx = lambda: _common.backend_context(a.provider, a.device)  # noqa: E731
    warmup = a.warmup or ("target" if a.provider == "compile" else "tiny")
    warm_sizes = WARM_SIZES if warmup == "tiny" else ((a.n, a.m),)
    for n_warm, m_warm in warm_sizes:
        args, wrt = _common.make_inputs(a.case, n_warm, a.d, m_warm, a.device, seed=1,
                                        classes=a.classes)
        _common.step_once(fn, args, wrt, "full", ctx)
        del args, wrt
    graphs = _unique_graphs()

    args, wrt = _common.make_inputs(a.case, a.n, a.d, a.m, a.device, classes=a.classes)
    result = {"case": a.case, "provider": a.provider, "n": a.n, "d": a.d, "device": a.device,
              "warmup": warmup}
    if a.case == "info_nce":
        result["m"] = a.m
    if a.case == "supcon":
        result.update(views=_common.SUPCON_VIEWS, classes=a.classes)

    for mode in ("forward", "full"):
        gc.collect()
        if a.device == "cuda":
            method = "cuda max_memory_allocated delta"
            peak = _common.cuda_peak_mib(lambda: _common.step_once(fn, args, wrt, mode, ctx))
        elif _reset_hwm():
            method = "VmHWM - VmRSS after clear_refs"
            base = _status_kib("VmRSS")
            out = _common.step_once(fn, args, wrt, mode, ctx)
            peak = (_status_kib("VmHWM") - base) / 1024
            del out
        else:
            method = "ru_maxrss delta (lower bound)"
            base = _maxrss_kib()
            out = _common.step_once(fn, args, wrt, mode, ctx)
            peak = (_maxrss_kib() - base) / 1024
            del out
        result[f"{mode}_mib"] = round(peak, 1)
    result["method"] = method
    if a.provider == "compile":
        result["recompiled"] = _unique_graphs() != graphs
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
