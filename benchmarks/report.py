"""fastcl's performance report (``python -m fastcl.bench``): the benchmark cases, timed
interleaved in one process, as a table of medians and ratios, a JSON file and a PNG plot.

    python -m fastcl.bench [--device cpu|cuda] [--large] [--no-memory] [--out DIR] [--quick]
    python -m fastcl.bench --replot DIR/results.json [--out DIR2]   # redraw the plot only
    python benchmarks/report.py ...                                 # the same, from a checkout

Cases (the same as ``pytest benchmarks --benchmark-only``):
    NT-Xent, fp32, D=128, N per view in {256, 1024, 4096} (``--large``: also 16384 and, on CUDA,
    32768 for fastcl and its fallback only: the eager reference would need (2N)^2 matrices of
    GiBs), modes forward / backward / full, providers fastcl (C++ on CPU, Triton on CUDA),
    chunked (the fallback), reference (eager), compile (``torch.compile(reference)``) and peer
    (lightly's NT-Xent / info-nce-pytorch's formulation). Input configurations (``--dtypes``,
    default fp32,bf16 on CPU, fp32,tf32,bf16 on CUDA): fp32 inputs with IEEE products, fp32 with
    TF32 products (``torch.set_float32_matmul_precision("high")``), bf16 inputs (on CPU, the
    C++ kernels' bf16 products where the CPU has AVX512-BF16), mixed (bf16 inputs beside a
    float32 MoCo queue). MoCo InfoNCE
    (N=256, queue 16384).
    EMA over ResNet-50's 161 parameter tensors (bench_ema.py) and the queue push (bench_queue.py).

Columns: median time per provider; ratios baseline / fastcl (> 1: fastcl faster); peak memory
(CPU: RSS growth over one step in a fresh process; CUDA: max_memory_allocated growth); for the
losses, achieved TFLOP/s counting the 3 matrix products of eager forward + backward and the
fraction of the floor they reach (the floor: 3 products at this machine's measured fp32 GEMM
rate); for EMA and queue, GB/s against the flat-``lerp_`` bandwidth floor.

``--quick`` runs tiny sizes, 3 rounds and no memory probes: a smoke test of the report itself,
not figures to quote.

Plot (matplotlib, Agg backend; optional: without it the report still writes report.txt and
results.json, and says in one line that it skipped the plot and how to get it, ``pip install
matplotlib`` or ``pip install fastcl[train]``): one PNG per input configuration, ``plot.png``
for the first of ``--dtypes`` and ``plot_<dtype>.png`` for each other (e.g. ``plot_tf32.png``,
``plot_bf16.png`` on CUDA), at 100 dpi. In each, one row per loss case (NT-Xent, MoCo InfoNCE,
in-batch InfoNCE) and two column groups: median time per step for forward, backward and
forward + backward, then peak memory for the modes where it was measured (on CPU: forward and
forward + backward, fp32 only; none with ``--quick`` or ``--no-memory``: the group is left out).
A case run at several N (NT-Xent) is a line per provider against N on a log-2 axis, the y axis
logarithmic where the values span a decade or more; a case run at one size is a bar per
provider with its value written on top. Time in ms (s from 10 s up), memory in MiB. The legend
names every provider (one that never ran says why); notes under the panels say why points are
missing and what the memory figure measures. ``--replot results.json`` redraws the PNG(s) of an
earlier run without timing anything, next to it (there also refreshing the plot caption in
report.txt and results.json) or in ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import statistics
import sys
import textwrap
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import bench_ema  # noqa: E402
import bench_queue  # noqa: E402

# fastcl, chunked, reference, compile, peer, and inf_cl (in_batch only, optional)
LOSS_PROVIDERS = _common.PROVIDERS + _common.OPTIONAL_PROVIDERS
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
    rows, cols = {"nt_xent": (2 * n, 2 * n), "in_batch": (n, n), "supcon": (2 * n, 2 * n)}.get(
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

# matplotlib's tab10 colours, one per provider, the same in every panel and file
COLORS = {"fastcl": "#1f77b4", "chunked": "#2ca02c", "reference": "#d62728",
          "compile": "#9467bd", "peer": "#ff7f0e", "inf_cl": "#8c564b"}
MARKERS = {"fastcl": "o", "chunked": "s", "reference": "^", "compile": "D", "peer": "v",
           "inf_cl": "P"}  # shapes as well as colours, for readers who can't tell them apart
SHORT = {"fastcl": "fastcl", "chunked": "chunked", "reference": "eager", "compile": "compile",
         "peer": "peer", "inf_cl": "Inf-CL"}
CASES = {  # panel title, row label, what N means (line panels: x axis; bars: the one size)
    "nt_xent": ("NT-Xent", "NT-Xent (SimCLR)\n2N x 2N logits", "N, samples per view"),
    "info_nce": ("MoCo", "MoCo InfoNCE\nN x (1 + queue) logits", "N={n} queries, queue {m}"),
    "in_batch": ("in-batch", "in-batch InfoNCE (CLIP)\nN x N logits", "N={n} pairs"),
    "supcon": ("SupCon", "SupCon (labels)\n2B x 2B logits",
               f"B={{n}} samples x 2 views, {_common.SUPCON_CLASSES} classes"),
}
MODES = {"forward": "forward", "backward": "backward", "full": "forward + backward"}
DTYPE_NAMES = {"fp32": "fp32 inputs, IEEE fp32 matmul", "tf32": "fp32 inputs, TF32 matmul",
               "bf16": "bf16 inputs"}
MATPLOTLIB_MISSING = ("plot skipped: matplotlib is not installed (pip install matplotlib, or "
                      "pip install fastcl[train]); report.txt and results.json are complete")


def _provider_label(p: str, device: str) -> str:
    return {"fastcl": "fastcl (" + ("Triton kernels" if device == "cuda" else "C++ kernels")
                      + ")",
            "chunked": "chunked (fastcl's PyTorch fallback)",
            "reference": "eager reference (PyTorch)",
            "compile": "torch.compile(eager reference)",
            "peer": "peer: lightly (NT-Xent), info-nce-pytorch (InfoNCE)",
            "inf_cl": "Inf-CL (in-batch)"}.get(p, p)


def _num(v: float) -> str:
    """At most 3 significant digits, no exponent: 0.0123, 1.23, 12.3, 8.5, 123, 1234."""
    if v == 0:
        return "0"
    digits = max(0, 2 - int(np.floor(np.log10(abs(v)))))
    s = f"{v:.{digits}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def _tick(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s or "0"


def _log_ticks(lo: float, hi: float):
    """Round tick values (1-2-5, 1-3 or decades) spanning [lo, hi], at most 7 of them."""
    for mantissas in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))) - 1,
                                              int(np.ceil(np.log10(hi))) + 1)
                 for m in mantissas]
        ticks = [t for t in ticks if lo <= t * (1 + 1e-9) and t <= hi * (1 + 1e-9)]
        if len(ticks) <= 7:
            return ticks
    return ticks


def _value(row, kind: str, p: str):
    v = row["median_s"].get(p) if kind == "time" else row["mem_mib"].get(p)
    return v if v else None  # 0 or None: nothing to draw (a 0 MiB peak has no log position)


def _time_scale(values):
    """ms, unless the panel reaches 10 s."""
    return (1.0, "s") if max(values, default=0) >= 10 else (1e3, "ms")


def _line_panel(ax, rows, kind, providers, plt_ticker):
    """Log-2 N axis, one line per provider; log y when the values span a decade or more."""
    ns = sorted({r["n"] for r in rows})
    raw = [_value(r, kind, p) for r in rows for p in providers]
    scale, unit = _time_scale([v for v in raw if v]) if kind == "time" else (1.0, "MiB")
    vals = []
    for p in providers:
        pts = [(r["n"], _value(r, kind, p)) for r in rows]
        pts = [(n, v * scale) for n, v in pts if v]
        if pts:
            ax.plot(*zip(*pts), color=COLORS.get(p, "black"), marker=MARKERS.get(p, "o"), lw=2,
                    ms=6, zorder=3)
            vals += [v for _, v in pts]
    ax.set_xscale("log", base=2)
    compact = len(ns) > 4  # 16384 and 32768 side by side would overlap: 16k, 32k
    ax.set_xticks(ns, [f"{n // 1024}k" if compact and n % 1024 == 0 else str(n) for n in ns])
    ax.xaxis.set_minor_locator(plt_ticker.NullLocator())
    ax.set_xlim(ns[0] / 1.35, ns[-1] * 1.35)
    if vals and max(vals) / min(vals) >= 10:
        ax.set_yscale("log")
        lo, hi = min(vals) / 1.5, max(vals) * 1.5
        ax.set_ylim(lo, hi)
        ticks = _log_ticks(lo, hi)
        ax.set_yticks(ticks, [_tick(t) for t in ticks])
        ax.yaxis.set_minor_formatter(plt_ticker.NullFormatter())
        scale_note = ", log scale"
    else:
        ax.set_ylim(0, max(vals, default=1) * 1.15)
        scale_note = ""
    ax.set_xlabel(_case_text(rows[0]["case"], 2, n=ns[0])
                  + (" (log" + ("; k = 1024)" if compact else ")") if len(ns) > 2 else ""))
    ax.set_ylabel(("time" if kind == "time" else "peak memory") + f" ({unit}{scale_note})")


def _bar_panel(ax, row, kind, providers):
    """A case run at one size: one bar per provider, its value written on top."""
    raw = [_value(row, kind, p) for p in providers]
    scale, unit = _time_scale([v for v in raw if v]) if kind == "time" else (1.0, "MiB")
    top = max([v * scale for v in raw if v], default=1.0)
    for i, (p, v) in enumerate(zip(providers, raw)):
        if v:
            ax.bar(i, v * scale, width=0.7, color=COLORS.get(p, "black"), zorder=3)
            ax.text(i, v * scale + top * 0.02, _num(v * scale), ha="center", va="bottom",
                    fontsize=9)
        else:
            why = row["status"].get(p, "not measured").split(":")[0]
            ax.text(i, top * 0.03, why, ha="center", va="bottom", rotation=90, fontsize=9,
                    color="dimgray")
    ax.set_xticks(range(len(providers)), [SHORT.get(p, p) for p in providers], rotation=30,
                  ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(providers) - 0.4)
    ax.set_ylim(0, top * 1.18)
    ax.set_xlabel(_case_text(row["case"], 2, n=row["n"]))
    ax.set_ylabel(("time" if kind == "time" else "peak memory") + f" ({unit})")


def _case_text(case: str, which: int, **fmt) -> str:
    texts = CASES.get(case, (case, case, "N"))
    return texts[which].format(m=_common.MOCO_M, **fmt)


def _plot_dtype(plt, plt_ticker, path, rows, info, dtype) -> None:
    device = info.get("device", "cpu")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    mem_modes = [m for m in modes if any(_value(r, "mem", p) for r in rows if r["mode"] == m
                                         for p in LOSS_PROVIDERS)]
    columns = [("time", m) for m in modes] + [("mem", m) for m in mem_modes]
    present = [p for p in LOSS_PROVIDERS  # run somewhere, or skipped with a reason
               if any(p in r["median_s"] or r["status"].get(p, "n/a") != "n/a" for r in rows)]

    # the legend: every provider; one that never ran says why in its own entry
    labels = []
    for p in present:
        if any(p in r["median_s"] for r in rows):
            labels.append(_provider_label(p, device))
        else:
            why = next(r["status"][p] for r in rows if r["status"].get(p, "n/a") != "n/a")
            labels.append(f"{_provider_label(p, device)}: {why}")
    # notes under the panels: missing points, what memory means, how to read the panels
    missing = {}  # (reason, sizes): providers, for those that ran elsewhere
    for p in present:
        if not any(p in r["median_s"] for r in rows):
            continue
        gaps = {}
        for r in rows:
            if r["status"].get(p, "n/a") != "n/a" and p not in r["median_s"]:
                why = re.sub(r" at N=\d+$", "", r["status"][p])
                gaps.setdefault(why, set()).add((_case_text(r["case"], 0), r["n"]))
        for why, where in gaps.items():
            missing.setdefault((why, tuple(sorted(where))), []).append(SHORT.get(p, p))
    notes = [", ".join(ps) + " not shown at " + ", ".join(f"{c} N={n}" for c, n in where)
             + f" ({why})." for (why, where), ps in missing.items()]
    if mem_modes:
        how = ("growth of torch.cuda.max_memory_allocated over one step" if device == "cuda"
               else "RSS growth over one step in a fresh process")
        only = (", measured for " + " and ".join(MODES[m] for m in mem_modes) + " only"
                if mem_modes != modes else "")
        notes.append(f"Peak memory: {how}{only}.")
    else:
        notes.append("Peak memory: not measured for these inputs (--quick, --no-memory, or a "
                     "CPU run's non-fp32 inputs).")
    notes.append("D = 128 throughout. Lines: a case run at several N; bars: a case run at one "
                 "size. Medians of interleaved rounds; every figure is in report.txt and "
                 "results.json.")

    gap = 0.15 if mem_modes else 0.0  # a blank column between the time and memory groups
    widths = [1.0] * len(modes) + ([gap] if mem_modes else []) + [1.0] * len(mem_modes)
    panel_w, panel_h, left, right = 3.4, 3.1, 1.45, 0.25
    fig_w = left + right + panel_w * (len(columns) + gap)
    ncol = max(1, min(len(labels), int(fig_w // 4.6)))
    legend_rows = -(-len(labels) // ncol)
    notes = [line for note in notes  # wrapped to the figure's width (10.5 pt: ~8 px a char)
             for line in textwrap.wrap(note, int((fig_w - left - right) * 100 / 8),
                                       subsequent_indent="  ")]
    head = 0.95 + 0.27 * legend_rows + 0.8
    foot = 0.95 + 0.22 * len(notes) + 0.15
    fig_h = head + panel_h * len(cases) + foot - 0.6
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=100)
    grid = fig.add_gridspec(len(cases), len(widths), width_ratios=widths,
                            left=left / fig_w, right=1 - right / fig_w, top=1 - head / fig_h,
                            bottom=foot / fig_h, wspace=0.4, hspace=0.68)
    axes_by_col = {}
    for i, case in enumerate(cases):
        for j, (kind, mode) in enumerate(columns):
            col = j + (1 if kind == "mem" else 0)
            ax = fig.add_subplot(grid[i, col])
            axes_by_col.setdefault(col, ax)
            sel = sorted((r for r in rows if r["case"] == case and r["mode"] == mode),
                         key=lambda r: r["n"])
            provs = [p for p in present
                     if any(p in r["median_s"] or r["status"].get(p, "n/a") != "n/a"
                            for r in sel)]
            ax.set_title(f"{_case_text(case, 0)}: {MODES[mode]}", fontweight="bold")
            ax.grid(True, which="major", color="0.88", zorder=0)
            ax.grid(True, which="minor", axis="y", color="0.95", zorder=0)
            if not sel:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            elif len({r["n"] for r in sel}) == 1:
                _bar_panel(ax, sel[0], kind, provs)
            else:
                _line_panel(ax, sel, kind, provs, plt_ticker)
            if j == 0:  # the row's label, left of its first panel
                box = ax.get_position()
                fig.text(0.12 / fig_w, (box.y0 + box.y1) / 2, _case_text(case, 1), rotation=90,
                         ha="left", va="center", fontsize=12.5, fontweight="bold",
                         multialignment="center")
    fig.suptitle(f"fastcl benchmarks: {DTYPE_NAMES.get(dtype, dtype)}", fontsize=16,
                 fontweight="bold", y=1 - 0.12 / fig_h, va="top")
    where = str(info.get("gpu") or info.get("cpu", "")).split(" / ")[-1]
    if device == "cpu" and "torch_threads" in info:
        where += f", {info['torch_threads']} threads"
    fig.text(0.5, 1 - 0.55 / fig_h, f"{device}: {where}  |  torch {info.get('torch', '?')}  |  "
             f"{info.get('date', '')}", ha="center", va="top", fontsize=11.5, color="0.3")
    handles = [plt.Line2D([], [], color=COLORS.get(p, "black"), marker=MARKERS.get(p, "o"),
                          lw=3, ms=7)
               for p in present]
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=11.5, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.88 / fig_h), columnspacing=2.5, handlelength=2.5)
    groups = [("Median time per step (lower is better)", 0, len(modes) - 1)]
    if mem_modes:
        groups.append(("Peak memory of one step (lower is better)", len(modes) + 1,
                       len(modes) + len(mem_modes)))
    for text, c0, c1 in groups:  # headings over the time and the memory columns
        x0, x1 = axes_by_col[c0].get_position().x0, axes_by_col[c1].get_position().x1
        fig.text((x0 + x1) / 2, 1 - (head - 0.45) / fig_h, text, ha="center", va="bottom",
                 fontsize=13.5, fontweight="bold")
    fig.text(left / fig_w, 0.15 / fig_h, "\n".join(notes), ha="left", va="bottom",
             fontsize=10.5, color="0.25", linespacing=1.45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    plt.close(fig)
    try:  # 128 colours look the same and take a third of the bytes (Pillow: matplotlib's dep)
        from PIL import Image

        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(128).save(path, optimize=True)
    except ImportError:
        with open(path, "wb") as f:
            f.write(buf.getvalue())


def plot_files(dtypes):
    """plot.png for the first input configuration, plot_<dtype>.png for each other one."""
    return {dt: "plot.png" if i == 0 else f"plot_{dt}.png" for i, dt in enumerate(dtypes)}


def write_plots(out_dir: str, rows, info, dtypes=None):
    """Draw the loss benchmarks (see the module docstring, "Plot"); returns a caption for
    report.txt, or None when matplotlib is missing (the caller says so and goes on)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker as plt_ticker

    dtypes = [dt for dt in dtypes or dict.fromkeys(r["dtype"] for r in rows)
              if any(r["dtype"] == dt for r in rows)]
    files = plot_files(dtypes)
    with plt.rc_context({"font.size": 10.5, "axes.titlesize": 11.5, "axes.labelsize": 10.5,
                         "xtick.labelsize": 10, "ytick.labelsize": 10,
                         "axes.spines.top": False, "axes.spines.right": False}):
        for dt in dtypes:
            sel = [r for r in rows if r["dtype"] == dt]
            _plot_dtype(plt, plt_ticker, os.path.join(out_dir, files[dt]), sel, info, dt)
    return (", ".join(f"{f} ({dt})" for dt, f in files.items())
            + ": one row per loss case, columns median time of forward, backward and forward + "
              "backward, then peak memory where measured; lines against N (log axes where "
              "values span a decade), bars for a case run at one size; legend names every "
              "provider.")


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
        for label, med in q["pairs"].items():
            # label: the rotation ("moco_slice (clone)": the peer moco_slice after a clone)
            peer = next(p for p in med if p != "fastcl")
            lines.append(f"  fastcl {med['fastcl'] * 1e6:9.1f} us vs {label:<18} "
                         f"{med[peer] * 1e6:9.1f} us  {peer}/fastcl "
                         f"{_fmt_ratio(med[peer], med['fastcl'])}")
    return "\n".join(lines) + "\n"


def replot(results_json: str, out=None) -> int:
    """Redraw the PNG(s) of an earlier run from its results.json. Written next to it (or in
    ``out``); there, the plot caption in report.txt and results.json is brought up to date."""
    with open(results_json) as f:
        results = json.load(f)
    here = os.path.dirname(os.path.abspath(results_json))
    out = os.path.abspath(out) if out else here
    os.makedirs(out, exist_ok=True)
    caption = write_plots(out, results["losses"], results.get("info", {}),
                          results.get("dtypes"))
    if caption is None:
        print(MATPLOTLIB_MISSING)
        return 1
    old = results.get("plot")
    if out == here and old and old != caption:  # keep the folder's own description current
        report_txt = os.path.join(here, "report.txt")
        if os.path.isfile(report_txt):
            with open(report_txt) as f:
                text = f.read()
            with open(report_txt, "w") as f:
                f.write(text.replace(old, caption))
        with open(results_json) as f:
            text = f.read()
        with open(results_json, "w") as f:
            f.write(text.replace(json.dumps(old), json.dumps(caption)))
    print(caption)
    print(f"# written to {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda"))
    p.add_argument("--large", action="store_true", help="add N=16384 (and 32768 on CUDA)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="default 7 (5 at N >= 4096)")
    p.add_argument("--out", default=None,
                   help="folder for report.txt, results.json, plot.png (plot_<dtype>.png)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run; not for quoting")
    p.add_argument("--dtypes", default=None,
                   help="input configurations among fp32,tf32,bf16,mixed (default: fp32,bf16 "
                        "on CPU, fp32,tf32,bf16 on CUDA)")
    p.add_argument("--replot", metavar="RESULTS_JSON", default=None,
                   help="redraw the plot(s) from a results.json (no benchmark runs), next to it "
                        "or in --out")
    a = p.parse_args(argv)
    if a.replot:
        return replot(a.replot, a.out)
    configs = (a.dtypes or ("fp32,tf32,bf16" if a.device == "cuda" else "fp32,bf16")).split(",")
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
                                               else 64), ("in_batch", 1024 if not a.quick else 64),
                                              ("supcon", _common.SUPCON_N if not a.quick else 64)]
    rows = _time_losses(work, a.device, rounds, memory, configs)
    extra = None if a.quick else _time_ema_queue(a.device, rounds * 3)
    report = format_report(info, rows, extra, gemm)
    caption = write_plots(out, rows, info, configs) or MATPLOTLIB_MISSING
    report += caption + "\n"  # (a later --replot replaces this line, the skip line too)
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"info": info, "gemm_flop_s": gemm, "dtypes": configs, "losses": rows,
                   "ema_queue": extra, "plot": caption}, f, indent=1, default=str)
    print(report)
    print(f"# written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
