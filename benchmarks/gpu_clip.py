"""CLIP's, SigLIP's and SupCon's losses on a GPU: speed and memory of one training step's loss
(forward + backward with a learnable logit scale, and SigLIP's learnable bias) at open_clip's
sizes, fastcl against open_clip's formulation; SupCon against SupContrast's.

    python benchmarks/gpu_clip.py [--loss clip|siglip|supcon] [--device cuda|cpu] [--small]
        [--sizes 16384,32768] [--dim 512] [--dtype bf16] [--classes 1000]
        [--providers fastcl,eager,compile,inf_cl] [--budget S] [--out FILE]

``--loss siglip``: ``fastcl.siglip_loss(image, text, logit_scale, logit_bias)`` against
open_clip's SigLipLoss formula (logits = scale * image @ text.T + bias, labels 2 I - 1,
-sum log sigmoid / N), scale exp(ln 10) and bias -10 as open_clip initializes them, the bias a
float32 parameter too; Inf-CL has no sigmoid loss (the provider is skipped).

``--loss supcon``: ``fastcl.supcon_loss(features, labels, 0.07)`` on (N, 2, D) features (N
samples x 2 views, unit rows, requiring grad; ``--sizes`` counts samples) with labels in
``range(--classes)``, against SupContrast's SupConLoss formula (``_common.supcontrast_loss``:
(2N)^2 logits and dense masks, temperature and base temperature 0.07, a fixed float as
SupContrast has it), eager and compiled, under autocast for half types; Inf-CL has no label
positives (the provider is skipped).

Providers, each on the same inputs (image and text features (N, D) in ``--dtype``, unit rows
as open_clip's model returns them, requiring grad; logit_scale = exp(p) of a float32
parameter p = ln(1/0.07), as open_clip's model holds it):
- ``fastcl``: ``fastcl.clip_loss(image, text, logit_scale)`` (skipped, with a line saying so,
  where fastcl has no clip_loss);
- ``eager``: open_clip's ``ClipLoss`` formula: logits_per_image = scale * image @ text.T,
  logits_per_text = scale * text @ image.T, (CE(per_image) + CE(per_text)) / 2, under
  autocast in the features' dtype for half types (as open_clip trains);
- ``compile``: the same function under ``torch.compile`` (its compile time is reported apart);
- ``inf_cl``: Inf-CL's ``cal_inf_loss`` called once per direction, when ``inf_cl`` is
  installed (it computes in float32).

Per (N, provider): one warm-up step (compiles, autotunes), then the median of ``--reps`` steps
timed with CUDA events (wall clock on the CPU), and the peak memory of one step beyond what the
inputs hold (``torch.cuda.max_memory_allocated`` after a reset; on the CPU: not measured). One
line per measurement is appended to ``--out`` as soon as it is known, then the ratios of each
size. A provider that runs out of memory gets an "OOM" line; a size whose first measurement
would start after ``--budget`` seconds is skipped with a line saying so. ``--small`` (a CPU
smoke test): N in {64, 96}, D = 32, float32 (SupCon: 10 classes).

Exit status 0 unless a provider other than inf_cl fails with something else than OOM.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastcl  # noqa: E402

sys.path.insert(0, HERE)
from _common import (  # noqa: E402  (open_clip's and SupContrast's formulas)
    Log, open_clip_loss, open_siglip_loss, supcontrast_loss)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device, dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    import contextlib
    return contextlib.nullcontext()


def siglip_providers(names, bias):
    """SigLIP's {name: (loss function of (x, y, scale) or None, why)}; ``bias`` the learnable
    bias every provider adds."""
    out = {}
    for name in names:
        if name == "fastcl":
            fn = getattr(fastcl, "siglip_loss", None)
            out[name] = ((lambda x, y, s: fn(x, y, s, bias)) if fn is not None else None,
                         "fastcl has no siglip_loss in this checkout")
        elif name == "eager":
            out[name] = ((lambda x, y, s: open_siglip_loss(x, y, s, bias)), "")
        elif name == "compile":
            compiled = torch.compile(open_siglip_loss, dynamic=False)
            out[name] = ((lambda x, y, s: compiled(x, y, s, bias)), "")
        elif name == "inf_cl":
            out[name] = (None, "Inf-CL has no sigmoid loss")
        else:
            raise ValueError(f"unknown provider {name!r}")
    return out


def supcon_providers(names, temperature):
    """SupCon's {name: (loss function of (features, labels) or None, why)}."""
    out = {}
    for name in names:
        if name == "fastcl":
            fn = getattr(fastcl, "supcon_loss", None)
            out[name] = ((lambda x, lab: fn(x, lab, temperature)) if fn is not None else None,
                         "fastcl has no supcon_loss in this checkout")
        elif name == "eager":
            out[name] = ((lambda x, lab: supcontrast_loss(x, lab, temperature, temperature)),
                         "")
        elif name == "compile":
            compiled = torch.compile(supcontrast_loss, dynamic=False)
            out[name] = ((lambda x, lab: compiled(x, lab, temperature, temperature)), "")
        elif name == "inf_cl":
            out[name] = (None, "Inf-CL has no label positives")
        else:
            raise ValueError(f"unknown provider {name!r}")
    return out


def providers(names, device, dtype):
    """{name: (loss function or None, why it is unavailable)}."""
    out = {}
    for name in names:
        if name == "fastcl":
            fn = getattr(fastcl, "clip_loss", None)
            out[name] = ((lambda x, y, s: fn(x, y, s)) if fn is not None else None,
                         "fastcl has no clip_loss in this checkout")
        elif name == "eager":
            out[name] = (open_clip_loss, "")
        elif name == "compile":
            out[name] = (torch.compile(open_clip_loss, dynamic=False), "")
        elif name == "inf_cl":
            try:
                from inf_cl import cal_inf_loss
            except Exception as exc:  # not installed
                out[name] = (None, f"inf_cl not importable ({type(exc).__name__})")
                continue

            def inf_cl(x, y, s, _f=cal_inf_loss):
                # One direction per call; Inf-CL forces float32.
                x, y = x.float(), y.float()
                return (_f(x, y, scale=s).mean() + _f(y, x, scale=s).mean()) / 2
            out[name] = (inf_cl, "")
        else:
            raise ValueError(f"unknown provider {name!r}")
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loss_of, leaves, device, dtype, reps):
    """(warm-up s, median step s, peak extra MiB or None) of ``loss_of()`` (under autocast for
    half types) and its backward into ``leaves``."""
    def step():
        for t in leaves:
            t.grad = None
        with _autocast(device, dtype):
            loss = loss_of()
        loss.backward()
        return loss

    t0 = time.perf_counter()
    step()
    _sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    peak = None
    if device.type == "cuda":
        for t in leaves:
            t.grad = None
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return warm, statistics.median(times), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="clip", choices=("clip", "siglip", "supcon"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--classes", type=int, default=1000, help="SupCon's label range")
    ap.add_argument("--providers", default="fastcl,eager,compile,inf_cl")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=math.inf, help="seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.dim, args.dtype, args.reps = "64,96", 32, "fp32", 2
        args.classes = 10
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_clip: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    log = Log(args.out)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    what = {"clip": "CLIP loss forward + backward (features and the logit scale)",
            "siglip": "SigLIP loss forward + backward (features, the logit scale and bias)",
            "supcon": f"SupCon loss forward + backward (N samples x 2 views, {args.classes} "
                      f"classes, temperature 0.07)"}[args.loss]
    log(f"gpu_clip on {name}: {what}, "
        f"D={args.dim} {args.dtype}, torch {torch.__version__}, backend "
        f"{fastcl.get_backend()}; step time median of {args.reps}, peak extra memory of one "
        f"step")
    if args.loss == "clip":
        provs = providers(args.providers.split(","), device, dtype)
        p0 = math.log(1 / 0.07)
    elif args.loss == "siglip":
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        provs = siglip_providers(args.providers.split(","), bias)
        p0 = math.log(10.0)
    else:
        provs = supcon_providers(args.providers.split(","), 0.07)
    failures = 0
    for n in (int(v) for v in args.sizes.split(",")):
        results = {}
        for pname, (fn, why) in provs.items():
            label = f"{args.loss} N={n:<6} D={args.dim} {args.dtype} {pname:<8}"
            if fn is None:
                log(f"{label} unavailable: {why}")
                continue
            if time.perf_counter() - start > args.budget:
                log(f"{label} skipped: past the {args.budget:.0f} s budget")
                continue
            gen = torch.Generator().manual_seed(n)
            if args.loss == "supcon":
                x = F.normalize(torch.randn(n, 2, args.dim, generator=gen), dim=2).to(dtype)
                x = x.to(device).requires_grad_()
                labels = torch.randint(0, args.classes, (n,), generator=gen).to(device)
                loss_of, leaves = (lambda fn=fn, x=x, lab=labels: fn(x, lab)), (x,)
            else:
                x = F.normalize(torch.randn(n, args.dim, generator=gen), dim=1).to(dtype)
                y = F.normalize(torch.randn(n, args.dim, generator=gen), dim=1).to(dtype)
                x = x.to(device).requires_grad_()
                y = y.to(device).requires_grad_()
                p = torch.tensor(p0, device=device, requires_grad=True)
                loss_of = lambda fn=fn, x=x, y=y, p=p: fn(x, y, p.exp())  # noqa: E731
                leaves = (x, y, p) if args.loss == "clip" else (x, y, p, bias)
            try:
                warm, med, peak = measure(loss_of, leaves, device, dtype, args.reps)
            except torch.cuda.OutOfMemoryError:
                log(f"{label} OOM")
                continue
            except Exception as exc:
                log(f"{label} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                failures += pname != "inf_cl"
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results[pname] = (med, peak)
            mem = "" if peak is None else f", peak extra {peak:,.0f} MiB"
            log(f"{label} {med * 1e3:9.2f} ms{mem} (first step {warm:.1f} s)")
        if "fastcl" in results:
            f_t, f_m = results["fastcl"]
            for other, (t, m) in results.items():
                if other == "fastcl":
                    continue
                mem = ("" if m is None or f_m is None or f_m <= 0 else
                       f", memory {m / f_m:.1f}x less")
                log(f"{args.loss} N={n} fastcl vs {other}: {t / f_t:.2f}x faster{mem}")
    log(f"gpu_clip: done in {time.perf_counter() - start:.0f} s, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
