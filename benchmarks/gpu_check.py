"""fastcl's correctness on a GPU, before any timing: every public loss, value and gradients,
against the float64 formula on the same inputs, under the tolerance rule of tests/tolerances.py
(the error may be at most 2x eager PyTorch's own error in the same dtype and matmul setting, plus
a small atol); a queue push past 2^31 elements; then what the run compiled and launched.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--small] [--out FILE] [--stats FILE]
    python benchmarks/gpu_check.py --launches [--device cuda|cpu] [--out FILE]

Matrix (``--device cuda``): configurations fp32 (IEEE products), tf32
(``torch.set_float32_matmul_precision("high")``, eager too), bf16, fp16 x losses
``fastcl.nt_xent``, ``fastcl.info_nce`` in-batch and with a queue (16384 keys, the queue gets a
gradient too), ``fastcl.byol_loss``, and ``fastcl.dcl_loss``, ``fastcl.clip_loss`` (with a
learnable scale, against open_clip's formula) and ``fastcl.siglip_loss`` (learnable scale and
bias, against open_clip's SigLipLoss formula) and ``fastcl.supcon_loss`` (B = N samples x 2
views with labels in range(N / 16), a learnable temperature and SupContrast's base temperature
0.07, against SupContrast's SupConLoss formula on the normalized features) where fastcl has
them x D in {64, 128, 256, 1024}; N = 256 rows per view, reduction "none" with a random
cotangent. ``--losses`` runs a subset (names as printed, e.g. ``supcon_loss``). One line per case
is appended to ``--out`` as soon as it is known (``ok`` / ``FAIL``, the errors and their
bounds). Then the queue push: a float16 queue of K = 2^22 + 3 rows of D = 520 (K * D > 2^31;
4.4 GB), ptr 10 rows before the end, 64 keys: the rows written (wrapping to the start) must be
the keys and every other row untouched. ``--small`` (for a CPU smoke test): N = 8, a queue of
40 keys, a push queue of 1000 rows.

``--stats FILE``: after each configuration, the registers, spills and shared memory of every
Triton kernel compiled so far in this process (read from each ``JITFunction.device_caches``),
rewritten in place. ``--launches``: the CUDA kernels launched by one forward + backward of
``nt_xent`` and of the MoCo queue loss (``info_nce`` with a queue, then the queue push), counted
with torch.profiler (on CPU: the operators recorded, for a smoke test).

Exit status 1 if any case fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import fastcl  # noqa: E402
from fastcl import reference  # noqa: E402
import tolerances  # noqa: E402  (tests/tolerances.py: the rule and eager baselines)
from _common import Log, matmul_precision, supcontrast_loss  # noqa: E402  (benchmarks/)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
CONFIGS = {"fp32": (F32, "highest"), "tf32": (F32, "high"), "bf16": (BF16, "highest"),
           "fp16": (F16, "highest")}
DIMS = (64, 128, 256, 1024)


def _randn(gen, shape, dtype, device):
    """Gaussian rows with norms spread over ~e^{+-2} (so normalization matters), rounded to
    dtype."""
    x = torch.randn(shape, generator=gen, dtype=F64)
    x = x * torch.exp(torch.randn(shape[:-1] + (1,), generator=gen, dtype=F64))
    return x.to(dtype).to(device)


def _widen(xs):
    return [x.to(tolerances.acc(x.dtype)) for x in xs]


def losses():
    """(name, fastcl function, eager baseline, float64 oracle, inputs maker, grads wanted)."""
    out = [
        ("nt_xent",
         lambda a, b: fastcl.nt_xent(a, b, 0.1, "none"),
         lambda a, b: tolerances.eager_nt_xent(a, b, 0.1, "none"),
         lambda a, b: reference.nt_xent(a, b, 0.1, "none"),
         lambda n, k, d: [(n, d), (n, d)], (True, True)),
        ("info_nce",
         lambda q, k: fastcl.info_nce(q, k, None, 0.1, "none"),
         lambda q, k: tolerances.eager_info_nce(q, k, None, 0.1, "none"),
         lambda q, k: reference.info_nce(q, k, None, 0.1, "none"),
         lambda n, k, d: [(n, d), (n, d)], (True, True)),
        ("info_nce_queue",
         lambda q, k, m: fastcl.info_nce(q, k, m, 0.07, "none"),
         lambda q, k, m: tolerances.eager_info_nce(q, k, m, 0.07, "none"),
         lambda q, k, m: reference.info_nce(q, k, m, 0.07, "none"),
         lambda n, k, d: [(n, d), (n, d), (k, d)], (True, True, True)),
        ("byol_loss",
         lambda p, z: fastcl.byol_loss(p, z, "none"),
         lambda p, z: reference.byol_loss(p, z, "none"),  # its formula, in the acc dtype
         lambda p, z: reference.byol_loss(p, z, "none"),
         lambda n, k, d: [(n, d), (n, d)], (True, False)),
    ]
    if hasattr(fastcl, "dcl_loss") and hasattr(reference, "dcl_loss"):
        out.append((
            "dcl_loss",
            lambda a, b: fastcl.dcl_loss(a, b, temperature=0.1, reduction="none"),
            lambda a, b: reference.dcl_loss(*_widen([a, b]), temperature=0.1, reduction="none"),
            lambda a, b: reference.dcl_loss(a, b, temperature=0.1, reduction="none"),
            lambda n, k, d: [(n, d), (n, d)], (True, True)))
    if hasattr(fastcl, "clip_loss"):
        # CLIP with a learnable scale: the third input s (one element) gives the scale
        # 10 + 5 |s| (in the accumulation dtype, for all three), so its gradient is checked.
        out.append((
            "clip_loss",
            lambda x, y, s: fastcl.clip_loss(x, y, _clip_scale(s), reduction="none"),
            lambda x, y, s: eager_clip(*_widen([x, y, s])),
            lambda x, y, s: eager_clip(x, y, s),
            lambda n, k, d: [(n, d), (n, d), (1,)], (True, True, True)))
    if hasattr(fastcl, "siglip_loss"):
        # SigLIP with a learnable scale (10 + 5 |s|) and bias (10 b), per image row.
        out.append((
            "siglip_loss",
            lambda x, y, s, b: fastcl.siglip_loss(x, y, _clip_scale(s), _siglip_bias(b),
                                                  reduction="none"),
            lambda x, y, s, b: eager_siglip(*_widen([x, y, s, b])),
            lambda x, y, s, b: eager_siglip(x, y, s, b),
            lambda n, k, d: [(n, d), (n, d), (1,), (1,)], (True, True, True, True)))
    if hasattr(fastcl, "supcon_loss"):
        # SupCon on (N, 2, D) features with labels (_supcon_labels), a learnable temperature
        # (0.05 + 0.05 |t|) and SupContrast's base temperature 0.07, per anchor (N, 2).
        out.append((
            "supcon_loss",
            lambda x, t: fastcl.supcon_loss(x, _supcon_labels(x), _supcon_tau(t), 0.07,
                                            reduction="none"),
            lambda x, t: eager_supcon(*_widen([x, t])),
            lambda x, t: eager_supcon(x, t),
            lambda n, k, d: [(n, 2, d), (1,)], (True, True)))
    return out


def _supcon_labels(x):
    """Labels of the N samples, fixed by N: range(max(2, N // 16)) (16 samples per class at
    N = 256, so 31 positives per anchor with 2 views), drawn on the CPU."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, max(2, n // 16), (n,), generator=gen).to(x.device)


def _supcon_tau(t):
    return 0.05 + 0.05 * t.reshape(()).to(tolerances.acc(t.dtype)).abs()


def eager_supcon(x, t):
    """SupContrast's SupConLoss per anchor (N, 2), on the features normalized (fastcl
    normalizes inside; SupContrast expects unit rows), from the inputs as given."""
    x = torch.nn.functional.normalize(x, dim=2)
    return supcontrast_loss(x, _supcon_labels(x), _supcon_tau(t), 0.07, reduction="none")


def _siglip_bias(b):
    return 10.0 * b.reshape(()).to(tolerances.acc(b.dtype))


def eager_siglip(x, y, s, b):
    """open_clip's SigLipLoss per image row (-sum_j log sigmoid(label_ij logit_ij)), from the
    inputs as given, logits in their dtype."""
    logits = _clip_scale(s) * x @ y.T + _siglip_bias(b)
    labels = 2 * torch.eye(x.shape[0], dtype=logits.dtype, device=x.device) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum(dim=1)


def _clip_scale(s):
    return 10.0 + 5.0 * s.reshape(()).to(tolerances.acc(s.dtype)).abs()


def eager_clip(x, y, s):
    """open_clip's ClipLoss, per pair (reduction "none": (CE of row i + CE of column i) / 2),
    from the inputs as given, logits in their dtype."""
    logits = _clip_scale(s) * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels, reduction="none") + ce(logits.T, labels, reduction="none")) / 2


def _within(actual, oracle, baseline, dtype):
    """(error, bound, ok) under tolerances.assert_within_rule's rule."""
    err = tolerances.max_err(actual, oracle)
    base = tolerances.max_err(baseline, oracle)
    scale = max(1.0, oracle.detach().double().abs().max().item()) if oracle.numel() else 1.0
    bound = 2.0 * base + tolerances.ATOL[dtype] * scale
    return err, bound, bool(err <= bound) and bool(torch.isfinite(actual).all())


def run_case(name, fast, eager, oracle, shapes, needs, dtype, device, n, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [_randn(gen, s, dtype, device) for s in shapes(n, k, d)]
    fast_in = [t.clone().requires_grad_(r) for t, r in zip(tensors, needs)]
    eag_in = [t.clone().requires_grad_(r) for t, r in zip(tensors, needs)]
    ora_in = [t.double().requires_grad_(r) for t, r in zip(tensors, needs)]
    out, base, ref = fast(*fast_in), eager(*eag_in), oracle(*ora_in)
    acc = tolerances.acc(dtype)
    checks = [("loss",) + _within(out, ref, base, acc)]
    if out.dtype != acc:
        checks.append(("loss dtype", 0.0, 0.0, False))
    cot = torch.randn(ref.shape, generator=gen, dtype=F64).to(device)
    wanted = [i for i, r in enumerate(needs) if r]
    g_fast = torch.autograd.grad(out, [fast_in[i] for i in wanted], cot.to(out.dtype))
    g_eag = torch.autograd.grad(base, [eag_in[i] for i in wanted], cot.to(base.dtype))
    g_ora = torch.autograd.grad(ref, [ora_in[i] for i in wanted], cot)
    for i, gf, ge, go in zip(wanted, g_fast, g_eag, g_ora):
        checks.append((f"grad{i}",) + _within(gf, go, ge, dtype))
    return checks


def correctness(args, log, stats_path):
    device = torch.device(args.device)
    n, k = (8, 40) if args.small else (256, 16384)
    failures = total = 0
    seed = 0
    for config in args.configs.split(","):
        dtype, setting = CONFIGS[config]
        for name, fast, eager, oracle, shapes, needs in losses():
            if args.losses and name not in args.losses:
                continue
            for d in args.dims:
                seed += 1
                t0 = time.perf_counter()
                label = f"{config:<4} {name:<15} d={d:<5} n={n}"
                try:
                    with matmul_precision(setting):
                        checks = run_case(name, fast, eager, oracle, shapes, needs, dtype,
                                          device, n, k, d, seed)
                    ok = all(c[3] for c in checks)
                    detail = "; ".join(f"{w} {e:.2e}<={b:.2e}" + ("" if good else " FAIL")
                                       for w, e, b, good in checks)
                except Exception as exc:  # a crash is one failed case, not the end of the run
                    ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
                total += 1
                failures += not ok
                log(f"{'ok  ' if ok else 'FAIL'} {label} {detail} "
                    f"({time.perf_counter() - t0:.2f} s)")
        if stats_path:
            write_stats(stats_path)
    ok, detail = big_queue_push(device, args.small)
    total += 1
    failures += not ok
    log(f"{'ok  ' if ok else 'FAIL'} queue_push {detail}")
    if stats_path:
        write_stats(stats_path)
    log(f"gpu_check: {total} cases, {failures} failed")
    return failures


def big_queue_push(device, small):
    """A push whose rows lie past 2^31 elements of the queue, wrapping to the start."""
    k, d, b = (1000, 520, 64) if small else (2 ** 22 + 3, 520, 64)
    t0 = time.perf_counter()
    try:
        queue = torch.zeros(k, d, dtype=F16, device=device)
        start = k - 10
        ptr = torch.tensor([start], dtype=torch.int64, device=device)
        keys = torch.randn(b, d, generator=torch.Generator().manual_seed(7)).to(device)
        fastcl.queue_push_(queue, ptr, keys)
        rows = (start + torch.arange(b, device=device)) % k
        written = torch.equal(queue[rows], keys.to(F16))
        touched = (queue != 0).any(dim=1)
        expected = torch.zeros(k, dtype=torch.bool, device=device)
        expected[rows] = True  # (Gaussian keys: no row rounds to all zeros)
        untouched = torch.equal(touched, expected)
        ptr_ok = int(ptr.reshape(-1)[0]) == (start + b) % k
        ok = written and untouched and ptr_ok
        detail = (f"K={k} D={d} fp16 (K*D={k * d}{' > 2^31' if k * d > 2 ** 31 else ''}), "
                  f"rows {start}..{(start + b - 1) % k}: keys written {written}, other rows "
                  f"untouched {untouched}, ptr {ptr_ok}")
        del queue
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok, detail + f" ({time.perf_counter() - t0:.2f} s)"


# ------------------------------------------------------------------ compile statistics ----


def _jit_functions():
    """(module name, attribute, JITFunction) for every Triton kernel fastcl has imported."""
    out = []
    for mod_name, mod in sorted(sys.modules.items()):
        if not mod_name.startswith("fastcl.kernels.triton") or mod is None:
            continue
        for attr, obj in sorted(vars(mod).items()):
            fn = obj
            while fn is not None and not hasattr(fn, "device_caches") and hasattr(fn, "fn"):
                fn = fn.fn  # an Autotuner / Heuristics wrapper
            if fn is not None and hasattr(fn, "device_caches"):
                out.append((mod_name.rsplit(".", 1)[-1], attr, fn))
    return out


def compiled_kernels():
    """One dict per kernel compiled in this process: name, constants, warps, stages, regs,
    spills, shared memory. Defensive: attributes triton does not expose come back as None."""
    rows = []
    for mod, attr, fn in _jit_functions():
        try:
            caches = dict(fn.device_caches)
        except Exception:
            continue
        for device, entry in caches.items():
            kernel_cache = entry[0] if isinstance(entry, tuple) else entry
            if not isinstance(kernel_cache, dict):
                continue
            for kernel in kernel_cache.values():
                if hasattr(kernel, "result"):  # an async compile handle
                    try:
                        kernel = kernel.result()
                    except Exception:
                        continue
                try:
                    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                        kernel._init_handles()
                except Exception:
                    pass
                md = getattr(kernel, "metadata", None)
                consts = getattr(getattr(kernel, "src", None), "constants", None) or {}
                names = getattr(fn, "arg_names", [])
                shown = {}
                for key, value in consts.items():
                    i = key[0] if isinstance(key, tuple) and key else key
                    pname = names[i] if isinstance(i, int) and i < len(names) else str(key)
                    if pname.isupper() or pname.startswith("BLOCK"):
                        shown[pname] = getattr(value, "value", value)
                rows.append({
                    "kernel": f"{mod}.{attr}", "device": device,
                    "warps": getattr(md, "num_warps", None),
                    "stages": getattr(md, "num_stages", None),
                    "regs": getattr(kernel, "n_regs", None),
                    "spills": getattr(kernel, "n_spills", None),
                    "smem": getattr(md, "shared", None),
                    "constants": shown,
                })
    return rows


def write_stats(path):
    rows = compiled_kernels()
    lines = [f"{len(rows)} Triton kernels compiled in this process (regs; spills: triton's "
             f"n_spills, local memory per thread / 4; smem: shared memory bytes per block)"]
    for r in rows:
        consts = " ".join(f"{k}={v}" for k, v in r["constants"].items())
        flag = "  SPILLS" if r["spills"] else ""
        lines.append(f"{r['kernel']:<40} regs={r['regs']} spills={r['spills']} "
                     f"smem={r['smem']} warps={r['warps']} stages={r['stages']} {consts}{flag}")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------- launches per step ----


def launches(args, log):
    """Kernels launched by one forward + backward (after a warm-up step that compiles)."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    n, k, d = (8, 40, 16) if args.small else (256, 16384, 128)
    gen = torch.Generator().manual_seed(0)
    z1, z2, q, kk = (_randn(gen, (n, d), F32, device).requires_grad_() for _ in range(4))
    queue = _randn(gen, (k, d), F32, device)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)

    def nt_xent_step():
        fastcl.nt_xent(z1, z2, 0.1).backward()

    def moco_step():
        fastcl.info_nce(q, kk.detach(), queue, 0.07).backward()
        fastcl.queue_push_(queue, ptr, kk.detach())

    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    for name, step in (("nt_xent forward+backward", nt_xent_step),
                       ("moco info_nce(queue) forward+backward + queue_push_", moco_step)):
        step()  # compile and warm up
        if on_cuda:
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            step()
            if on_cuda:
                torch.cuda.synchronize()
        if on_cuda:
            events = [e for e in prof.events()
                      if str(getattr(e, "device_type", "")).endswith("CUDA")]
            copies = [e for e in events if e.name.lower().startswith(("memcpy", "memset"))]
            what = f"CUDA kernels (+ {len(copies)} memcpy/memset)"
            events = [e for e in events if e not in copies]
        else:
            events = [e for e in prof.events() if getattr(e, "cpu_parent", None) is None]
            what = "top-level CPU operators (smoke test: not kernels)"
        counts = {}
        for e in events:
            counts[e.name] = counts.get(e.name, 0) + 1
        log(f"{name}: {len(events)} {what}")
        for kname, c in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
            log(f"    {c:3d}  {kname[:110]}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None, help="append one line per case to this file")
    ap.add_argument("--stats", default=None, help="write compile statistics here")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--dims", default=",".join(map(str, DIMS)))
    ap.add_argument("--losses", default="", help="a comma-separated subset (default: all)")
    ap.add_argument("--launches", action="store_true",
                    help="count the kernels of one training step instead")
    args = ap.parse_args(argv)
    args.dims = [int(x) for x in args.dims.split(",")]
    args.losses = [x for x in args.losses.split(",") if x]
    unknown = set(args.losses) - {case[0] for case in losses()}
    if unknown:
        ap.error(f"--losses: unknown {', '.join(sorted(unknown))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    log = Log(args.out)
    if args.launches:
        return launches(args, log)
    log(f"gpu_check on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, backend {fastcl.get_backend()}, "
        f"{'small' if args.small else 'full'} sizes")
    return 1 if correctness(args, log, args.stats) else 0


if __name__ == "__main__":
    sys.exit(main())
