"""fastcl's performance report (``python -m fastcl.bench``): the benchmark cases, timed
interleaved in one process, as a table of medians and ratios, a JSON file and a PNG plot.

    python -m fastcl.bench [--device cpu|cuda] [--large] [--no-memory] [--out DIR] [--quick]

Cases (the same as ``pytest benchmarks --benchmark-only``):
    NT-Xent, fp32, D=128, N per view in {256, 1024, 4096} (``--large``: also 16384 and, on CUDA,
    32768 for fastcl and its fallback only: the eager reference would need (2N)^2 matrices of
    GiBs), modes forward / backward / full, providers fastcl (C++ on CPU, Triton on CUDA),
    chunked (the fallback), reference (eager), compile (``torch.compile(reference)``) and peer
    (lightly's NT-Xent / info-nce-pytorch's formulation). Input configurations (``--dtypes``,
    default fp32 on CPU, fp32,tf32,bf16 on CUDA): fp32 inputs with IEEE products, fp32 with
    TF32 products (``torch.set_float32_matmul_precision("high")``), bf16 inputs. MoCo InfoNCE
    (N=256, queue 16384).
    EMA over ResNet-50's 161 parameter tensors (bench_ema.py) and the queue push (bench_queue.py).

Columns: median time per provider; ratios baseline / fastcl (> 1: fastcl faster); peak memory
(CPU: RSS growth over one step in a fresh process; CUDA: max_memory_allocated growth); for the
losses, achieved TFLOP/s counting the 3 matrix products of eager forward + backward and the
fraction of the floor they reach (the floor: 3 products at this machine's measured fp32 GEMM
rate); for EMA and queue, GB/s against the flat-``lerp_`` bandwidth floor.

``--quick`` runs tiny sizes, 3 rounds and no memory probes: a smoke test of the report itself,
not figures to quote.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import bench_ema  # noqa: E402
import bench_queue  # noqa: E402

# fastcl, chunked, reference, compile, peer, and inf_cl (in_batch only, optional)
LOSS_PROVIDERS = _common.PROVIDERS + _common.OPTIONAL_PROVIDERS
COLORS = {"fastcl": (31, 119, 180), "chunked": (44, 160, 44), "reference": (214, 39, 40),
          "compile": (148, 103, 189), "peer": (255, 127, 14), "inf_cl": (140, 86, 75)}
EAGER_MAX_N = 4096  # above this, the O(N^2) baselines are skipped (several GiB each)


def _gemm_rate(device: str, config: str = "fp32") -> float:
    """Measured FLOP/s of a square 2048^3 product: this machine's compute-bound matmul pace.
    (A (2N x D) @ (D x 2N) product with D = 128 would mostly measure writing its output.)"""
    dtype, precision = _common.DTYPES[config]
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with _common.matmul_precision(precision):
        for _ in range(9):
            t0 = time.perf_counter()
            a @ a
            sync()
            times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / statistics.median(times[2:])


def _loss_flops(case: str, n: int) -> float:
    """3 products (eager forward + backward) over the case's logits, D = 128."""
    rows, cols = {"nt_xent": (2 * n, 2 * n), "in_batch": (n, n)}.get(
        case, (n, _common.MOCO_M + 1))
    return 3 * 2 * rows * cols * _common.D


def _time_losses(work, device, rounds, memory, configs=("fp32",)):
    rows = []
    for config in configs:
        rows += _time_loss_config(work, device, rounds, memory, config)
    return rows


def _time_loss_config(work, device, rounds, memory, config):
    rows = []
    for case, n in work:
        providers = [p for p in _common.PROVIDERS
                     if n <= EAGER_MAX_N or p in ("fastcl", "chunked")]
        skipped = {p: f"skipped: O(N^2) at N={n}" for p in _common.PROVIDERS
                   if p not in providers}
        why = _common.inf_cl_status(device)  # Inf-CL, the optional peer: in_batch only
        if case != "in_batch":
            skipped["inf_cl"] = "n/a"
        elif why:
            skipped["inf_cl"] = f"skipped: {why}"
        elif n <= EAGER_MAX_N:
            providers.append("inf_cl")
        mem = {}
        if memory and device == "cpu" and config == "fp32":  # the probe runs fp32 inputs
            for p in providers:
                mem[p] = _common.probe_memory(case, p, n, device=device)
        for mode in ("forward", "backward", "full"):
            steps, status = {}, dict(skipped)
            for p in providers:
                try:
                    steps[p] = _common.make_step(case, p, n, mode, device, config)
                except RuntimeError as exc:  # out of memory while building inputs
                    status[p] = f"failed: {str(exc).splitlines()[0][:80]}"
            try:
                med, _ = _common.interleaved(steps, rounds)
            except RuntimeError as exc:
                if "out of memory" not in str(exc).lower():
                    raise
                med = {}
                for p in steps:
                    status[p] = "out of memory"
            if device == "cuda" and memory:
                for p, st in steps.items():
                    mem.setdefault(p, {})[f"{mode}_mib"] = round(_common.cuda_peak_mib(st), 1)
            rows.append({"case": case, "n": n, "mode": mode, "dtype": config,
                         "median_s": med, "status": status,
                         "mem_mib": {p: (mem.get(p) or {}).get(f"{mode}_mib")
                                     for p in LOSS_PROVIDERS}})
            print(f"  done {config} {case} N={n} {mode}", file=sys.stderr, flush=True)
            del steps
    return rows


def _time_ema_queue(device, rounds):
    out = {}
    n, med = bench_ema.measure("resnet50", device, rounds)
    out["ema"] = {"params": n, "median_s": med,
                  "gb_s": {p: 12 * n / t / 1e9 for p, t in med.items()}}
    queue = bench_queue.measure(device, max(rounds, 21))
    moved = 2 * bench_queue.B * bench_queue.D * 4  # read the keys, write the rows
    out["queue"] = {"K": bench_queue.K, "D": bench_queue.D, "B": bench_queue.B,
                    "pairs": queue,
                    "fastcl_gb_s": moved / queue["moco_slice"]["fastcl"] / 1e9}
    return out


# ------------------------------------------------------------------------------ plot ------


def _png(path: str, img: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG with zlib alone (no imaging library needed)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (len(data).to_bytes(4, "big") + body
                + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big"))

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _line(img, x0, y0, x1, y1, color, width=2):
    h, w, _ = img.shape
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    r = width // 2
    for t in np.linspace(0.0, 1.0, n):
        x, y = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
        if r <= x < w - r and r <= y < h - r:  # (a negative index would wrap around)
            img[y - r:y + r + 1, x - r:x + r + 1] = color


def _panel(img, x_off, series, size=(420, 320), margin=40):
    """One log-log panel: series = {provider: [(n, value or None)]}; None: an X at the top."""
    w, h = size
    vals = [v for pts in series.values() for _, v in pts if v]
    ns = [n for pts in series.values() for n, _ in pts]
    if not vals or not ns:
        return
    lx0, lx1 = np.log10(min(ns)) - 0.1, np.log10(max(ns)) + 0.1
    ly0, ly1 = np.floor(np.log10(min(vals))), np.ceil(np.log10(max(vals))) + 0.3

    def xy(n, v):
        x = x_off + margin + (np.log10(n) - lx0) / (lx1 - lx0) * (w - 2 * margin)
        y = h - margin - (np.log10(v) - ly0) / (ly1 - ly0) * (h - 2 * margin)
        return x, y

    for d in range(int(ly0), int(np.floor(ly1)) + 1):  # a grid line per decade
        _, y = xy(min(ns), 10.0 ** d)
        _line(img, x_off + margin, y, x_off + w - margin, y, (225, 225, 225), 1)
    _line(img, x_off + margin, h - margin, x_off + w - margin, h - margin, (0, 0, 0), 1)
    _line(img, x_off + margin, margin, x_off + margin, h - margin, (0, 0, 0), 1)
    for p, pts in series.items():
        color = COLORS.get(p, (0, 0, 0))
        done = [(n, v) for n, v in pts if v]
        for (n0, v0), (n1, v1) in zip(done, done[1:]):
            _line(img, *xy(n0, v0), *xy(n1, v1), color)
        for n, v in pts:
            if v:
                x, y = xy(n, v)
                img[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] = color
            else:  # skipped / out of memory: an X at the top edge
                x, _ = xy(n, 10.0 ** ly0)
                _line(img, x - 5, margin - 15, x + 5, margin - 5, color, 1)
                _line(img, x - 5, margin - 5, x + 5, margin - 15, color, 1)


def write_plot(path: str, rows) -> str:
    """Time (left) and peak memory (right) of NT-Xent forward + backward against N."""
    full = [r for r in rows
            if r["case"] == "nt_xent" and r["mode"] == "full" and r["dtype"] == "fp32"]
    times = {p: [(r["n"], r["median_s"].get(p)) for r in full] for p in LOSS_PROVIDERS}
    mems = {p: [(r["n"], r["mem_mib"].get(p)) for r in full] for p in LOSS_PROVIDERS}
    img = np.full((320, 840, 3), 255, dtype=np.uint8)
    _panel(img, 0, times)
    _panel(img, 420, mems)
    for i, p in enumerate(LOSS_PROVIDERS):  # legend swatches, in LOSS_PROVIDERS order
        img[8:18, 60 + 30 * i:80 + 30 * i] = COLORS[p]
    _png(path, img)
    return ("plot.png: NT-Xent fp32 forward + backward; left: median time (s), right: peak "
            "memory (MiB), both against N on log-log axes, a grey line per decade; swatches "
            "top-left and lines: " + ", ".join(f"{p} rgb{COLORS[p]}" for p in LOSS_PROVIDERS)
            + "; an X at the top marks a provider skipped or out of memory at that N.")


# ---------------------------------------------------------------------------- report ------


def _fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def format_report(info, rows, extra, gemm) -> str:
    rates = ", ".join(f"{c} {r / 1e9:.0f}" for c, r in gemm.items())
    lines = [f"# fastcl performance report, {info['date']}, device {info['device']}",
             "# " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "date"),
             f"# measured GEMM rate (2048^3), GFLOP/s: {rates}", ""]
    others = ("reference", "compile", "peer", "inf_cl", "chunked")
    header = ("dtype", "case", "N", "mode", *LOSS_PROVIDERS, *(f"{p}/fastcl" for p in others),
              "TFLOP/s", "of floor", *(f"mem {p}" for p in LOSS_PROVIDERS))
    table = [header]
    for r in rows:
        med, st = r["median_s"], r["status"]
        t = med.get("fastcl")
        cells = [r["dtype"], r["case"], str(r["n"]), r["mode"]]
        cells += [_common.fmt_time(med[p]) if p in med else st.get(p, "-").split(":")[0]
                  for p in LOSS_PROVIDERS]
        cells += [_fmt_ratio(med.get(p), t) for p in others]
        if r["mode"] == "full" and t:
            flops = _loss_flops(r["case"], r["n"])
            cells += [f"{flops / t / 1e12:.3f}", f"{flops / gemm[r['dtype']] / t:.0%}"]
        else:
            cells += ["", ""]
        cells += [_common.fmt_mib(r["mem_mib"].get(p)) for p in LOSS_PROVIDERS]
        table.append(tuple(cells))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) if i >= 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("# ratios > 1: fastcl faster. TFLOP/s counts eager's 3 products; 'of floor' is "
                 "the share of the measured GEMM rate they reach.")
    reasons = sorted({(p, st) for r in rows for p, st in r["status"].items() if st != "n/a"})
    for p, st in reasons:  # why a provider has no time: skipped, out of memory, failed
        lines.append(f"# {p}: {st}")
    if extra:
        ema, q = extra["ema"], extra["queue"]
        lines += ["", f"EMA, ResNet-50 shapes ({ema['params']:,} floats; floor = flat lerp_):"]
        for p, t in ema["median_s"].items():
            lines.append(f"  {p:<13} {_common.fmt_time(t):>10}  {ema['gb_s'][p]:6.1f} GB/s  "
                         f"{p}/fastcl {_fmt_ratio(t, ema['median_s']['fastcl'])}")
        lines += ["", f"queue push K={q['K']} D={q['D']} B={q['B']} (fastcl against one peer "
                      f"at a time; {q['fastcl_gb_s']:.1f} GB/s of keys moved):"]
        for peer, med in q["pairs"].items():
            lines.append(f"  fastcl {med['fastcl'] * 1e6:9.1f} us vs {peer:<14} "
                         f"{med[peer] * 1e6:9.1f} us  {peer}/fastcl "
                         f"{_fmt_ratio(med[peer], med['fastcl'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda"))
    p.add_argument("--large", action="store_true", help="add N=16384 (and 32768 on CUDA)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="default 7 (5 at N >= 4096)")
    p.add_argument("--out", default=None, help="folder for report.txt, results.json, plot.png")
    p.add_argument("--quick", action="store_true", help="tiny smoke run; not for quoting")
    p.add_argument("--dtypes", default=None,
                   help="input configurations among fp32,tf32,bf16 (default: fp32 on CPU, all "
                        "three on CUDA)")
    a = p.parse_args(argv)
    configs = (a.dtypes or ("fp32,tf32,bf16" if a.device == "cuda" else "fp32")).split(",")
    for c in configs:
        if c not in _common.DTYPES:
            p.error(f"--dtypes: unknown {c!r}; choose among {', '.join(_common.DTYPES)}")
    started = datetime.datetime.now().astimezone()
    out = a.out or os.path.join(os.getcwd(), f"fastcl-report-{started:%Y%m%d-%H%M%S}")
    os.makedirs(out, exist_ok=True)
    if a.quick:
        sizes, rounds, memory = [64, 128], 3, False
    else:
        sizes = list(_common.SIZES) + ([16384] + ([32768] if a.device == "cuda" else [])
                                       if a.large else [])
        rounds, memory = a.rounds or 7, not a.no_memory
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {"date": f"{started:%Y-%m-%d %H:%M %Z}", "device": a.device,
            **_common.machine_info(), "triton": triton_version,
            "command": "python -m fastcl.bench " + " ".join(sys.argv[1:] if argv is None
                                                          else argv)}
    gemm = {c: _gemm_rate(a.device, c) for c in configs}
    work = [("nt_xent", n) for n in sizes] + [("info_nce", _common.MOCO_N if not a.quick
                                               else 64), ("in_batch", 1024 if not a.quick else 64)]
    rows = _time_losses(work, a.device, rounds, memory, configs)
    extra = None if a.quick else _time_ema_queue(a.device, rounds * 3)
    report = format_report(info, rows, extra, gemm)
    caption = write_plot(os.path.join(out, "plot.png"), rows)
    report += caption + "\n"
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"info": info, "gemm_flop_s": gemm, "dtypes": configs, "losses": rows, "ema_queue": extra,
                   "plot": caption}, f, indent=1, default=str)
    print(report)
    print(f"# written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
