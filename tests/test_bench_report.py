"""``python -m fastcl.bench``: the report runs from a checkout and writes what it promises.

A smoke test at tiny sizes (``--quick``); the figures it prints are not checked, only that every
case ran and the three files are well formed.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys


def _png_size(png: bytes):
    """(width, height) of a well-formed PNG file."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert png.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", png[16:24])


def test_report_quick_run_writes_table_json_and_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCL_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-m", "fastcl.bench", "--quick", "--device", "cpu",
                           "--dtypes", "fp32,bf16", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "report.txt").read_text()
    assert "fastcl performance report" in report and "GEMM rate" in report
    results = json.loads((tmp_path / "results.json").read_text())
    losses = results["losses"]
    assert {(r["dtype"], r["case"], r["mode"]) for r in losses} == {
        (dt, c, m) for dt in ("fp32", "bf16")
        for c in ("nt_xent", "info_nce", "in_batch", "supcon")
        for m in ("forward", "backward", "full")}
    for r in losses:  # every provider timed, none silently missing
        assert set(r["median_s"]) == {"fastcl", "chunked", "reference", "compile", "peer"}, r
        assert all(t > 0 for t in r["median_s"].values())
        if r["case"] == "in_batch":  # the optional peer is marked, with the reason
            assert r["status"]["inf_cl"].startswith("skipped: Inf-CL's kernels need CUDA")
    assert "skipped" in report
    # a PNG per input configuration, named in the caption; --quick has no memory columns:
    # 3 time panels (forward, backward, full) of 3.4 in, 1.7 in of margins, at 100 dpi; a row
    # of panels per loss case (4)
    for name in ("plot.png", "plot_bf16.png"):
        width, height = _png_size((tmp_path / name).read_bytes())
        assert width == 1190 and 1200 < height < 2000, (name, width, height)
        assert name in report and name in results["plot"]
    assert not (tmp_path / "plot_fp32.png").exists()


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
OLD_CAPTION = "plot.png: an older description"


def _fake_results(folder):
    """A results.json as a full CPU run writes it, small: NT-Xent at 3 sizes (the eager
    reference skipped at the largest), MoCo at one; memory for forward and full only."""
    providers = ("fastcl", "chunked", "reference", "compile", "peer")
    rows = []
    for case, ns in (("nt_xent", (256, 1024, 4096)), ("info_nce", (256,))):
        for n in ns:
            for mode in ("forward", "backward", "full"):
                run = [p for p in providers if not (p == "reference" and n == 4096)]
                rows.append({
                    "case": case, "n": n, "mode": mode, "dtype": "fp32",
                    "median_s": {p: 1e-3 * (i + 1) * (n / 256) ** 2 for i, p in enumerate(run)},
                    "status": {"inf_cl": "n/a", **({"reference": "skipped: O(N^2) at N=4096"}
                                                   if n == 4096 else {})},
                    "mem_mib": {p: (None if mode == "backward" or p not in run else n / 64.0)
                                for p in providers + ("inf_cl",)}})
    results = {"info": {"date": "2026-01-01 00:00 UTC", "device": "cpu", "cpu": "x86_64 / Test",
                        "torch_threads": 2, "torch": "2.x"},
               "gemm_flop_s": {"fp32": 1e11}, "dtypes": ["fp32"], "losses": rows,
               "ema_queue": None, "plot": OLD_CAPTION}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    (folder / "report.txt").write_text("# fastcl performance report\n" + OLD_CAPTION + "\n")
    return folder / "results.json"


def test_replot_redraws_the_png_from_results_json(tmp_path):
    """``--replot`` draws without timing anything: next to the results.json (refreshing the
    caption there), or in --out (leaving the original folder alone)."""
    results_json = _fake_results(tmp_path / "run")
    other = tmp_path / "elsewhere"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), "--replot",
                           str(results_json), "--out", str(other)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "plot.png").exists()
    assert OLD_CAPTION in (tmp_path / "run" / "report.txt").read_text()
    # 100 dpi; 5 panel columns (time: 3 modes; memory: forward and full), 3.4 in each, the
    # gap between the groups and margins: 19.21 in; 2 rows of 3.1 in, title, legend, notes
    assert _png_size((other / "plot.png").read_bytes()) == (1921, 965)

    proc = subprocess.run([sys.executable, "-m", "fastcl.bench", "--replot", str(results_json)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "plot.png").read_bytes() == (other / "plot.png").read_bytes()
    caption = json.loads(results_json.read_text())["plot"]
    assert caption.startswith("plot.png (fp32):") and caption in proc.stdout
    report = (tmp_path / "run" / "report.txt").read_text()
    assert OLD_CAPTION not in report and caption in report


def _without_matplotlib(tmp_path):
    """An environment in which ``import matplotlib`` fails, as where it isn't installed."""
    site = tmp_path / "no_matplotlib"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    root = os.path.dirname(BENCH)
    path = os.pathsep.join([str(site), root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCL_BACKEND", "TRITON_INTERPRET")}
    return dict(env, PYTHONPATH=path)


def test_report_without_matplotlib_skips_only_the_plot(tmp_path):
    """matplotlib is optional: the report exits 0 with report.txt and results.json, and says
    in one line that it skipped the plot and how to get it. The timing is stubbed (the quick
    run above covers it): this drives main() itself, in a process without matplotlib."""
    env = _without_matplotlib(tmp_path)
    rows = json.loads(_fake_results(tmp_path / "fake").read_text())["losses"]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    driver = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import report\n"
        "try:\n    import matplotlib\nexcept ImportError: pass\n"
        "else: raise SystemExit('matplotlib still importable')\n"
        "rows = json.load(open(sys.argv[2]))\n"
        "report._gemm_rate = lambda device, config='fp32': 1e11\n"
        "report._time_losses = lambda *a, **k: rows\n"
        "sys.exit(report.main(['--quick', '--device', 'cpu', '--out', sys.argv[3]]))\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", driver, BENCH, str(tmp_path / "rows.json"),
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stdout.splitlines() if "plot skipped" in line]
    assert len(said) == 1 and "matplotlib is not installed" in said[0]
    assert "pip install matplotlib" in said[0] and "pip install fastcl[train]" in said[0]
    assert "plot skipped" in (out / "report.txt").read_text()
    assert json.loads((out / "results.json").read_text())["losses"] == rows
    assert not list(out.glob("*.png"))

    # --replot, whose only job is the plot, fails with the same line
    proc = subprocess.run([sys.executable, "-m", "fastcl.bench", "--replot",
                           str(tmp_path / "fake" / "results.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "pip install matplotlib" in proc.stdout
    assert not (tmp_path / "fake" / "plot.png").exists()


def test_bench_outside_a_checkout_says_what_it_needs(tmp_path):
    """Installed without benchmarks/ next to the package, the entry point explains itself."""
    import shutil

    import fastcl

    pkg = tmp_path / "fastcl"
    shutil.copytree(os.path.dirname(fastcl.__file__), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from fastcl import bench; "
                           "sys.exit(bench.main(['--quick']))"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          timeout=300)
    assert proc.returncode == 2
    assert "source checkout" in proc.stderr


def test_gpu_script_parses():
    """benchmarks/gpu.sh is valid bash (it can't run here: no GPU), and names its outputs."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", "gpu.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(script).read()
    for needed in ("tests.log", "check.txt", "summary.txt", "report-",
                   "DEVICE=${FASTCL_GPU_SH_DEVICE:-cuda}", '--device "$DEVICE"', "timeout"):
        assert needed in text


def test_report_rejects_unknown_dtype(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastcl.bench", "--quick", "--dtypes", "fp8",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "fp8" in proc.stderr


def test_inf_cl_provider_maps_the_in_batch_case(monkeypatch):
    """The optional Inf-CL provider, against a stand-in ``inf_cl`` module that computes what
    ``cal_inf_loss`` documents (mean cross-entropy of scale * q @ k^T, labels arange, rows
    normalized by the caller, D split into heads of ``head_dim``): it must give
    ``fastcl.info_nce(q, k)``, so the provider times the same loss."""
    import types

    import torch

    import fastcl

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import _common

    calls = []

    def cal_inf_loss(q, k, labels=None, scale=None, head_dim=256):
        calls.append(head_dim)
        assert q.shape[1] % head_dim == 0
        torch.testing.assert_close(q.norm(dim=1), torch.ones(len(q)))  # normalized by caller
        labels = torch.arange(len(q)) if labels is None else labels
        return torch.nn.functional.cross_entropy(scale * q @ k.T, labels)

    monkeypatch.setitem(sys.modules, "inf_cl", types.SimpleNamespace(cal_inf_loss=cal_inf_loss))
    assert _common.inf_cl_status("cuda") is None
    assert _common.inf_cl_status("cpu") == "Inf-CL's kernels need CUDA"
    (q, k, neg, tau), _ = _common.make_inputs("in_batch", 16, d=96)
    loss = _common.loss_fn("in_batch", "inf_cl", "cpu")(q, k, neg, tau)
    torch.testing.assert_close(loss, fastcl.info_nce(q, k, temperature=tau))
    assert calls == [32]  # the largest of 256, 128, 64, 32, 16 dividing D = 96


def test_accuracy_report_prints_every_backend_case_and_temperature():
    """``benchmarks/accuracy.py`` runs from a checkout: a row per case, temperature, backend and
    dtype, with finite errors (the accuracy rule itself is tested in test_nt_xent,
    test_info_nce and test_temperature)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accuracy.py")
    proc = subprocess.run([sys.executable, script, "--n", "8", "--d", "12", "--taus", "1e-4,0.5",
                           "--dtypes", "float32,bfloat16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    keys = {(r[-7], r[-6], r[-5]) for r in rows}  # tau, backend, dtype
    assert keys == {(t, b, dt) for t in ("0.0001", "0.5") for b in ("cpp", "chunked", "triton")
                    for dt in ("float32", "bfloat16")}
    assert len(rows) == 3 * len(keys)  # three cases
    for r in rows:
        errs = [float(x) for x in r[-4:]]
        assert all(e == e and e < float("inf") for e in errs), r


def test_supcon_case_times_supcontrasts_loss():
    """The supcon case: (B, 2, D) unit features requiring grad, labels in range(classes),
    tau 0.07; its reference provider (SupContrast's formulation written out in _common) and
    fastcl's (on the chunked path, which has label positives) compute the same loss, which
    reference.supcon_loss gives too, and the same feature gradients up to their radial part;
    "none" is per anchor (B, 2)."""
    import torch

    import fastcl
    from fastcl import reference

    sys.path.insert(0, BENCH)
    import _common

    assert "supcon" in _common.CASES and _common.CASE_N["supcon"] == 2048
    args, wrt = _common.make_inputs("supcon", 24, d=16, classes=5)
    features, labels, tau = args
    assert features.shape == (24, 2, 16) and wrt == (features,) and tau == 0.07
    torch.testing.assert_close(features.norm(dim=2), torch.ones(24, 2))
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    assert len(labels.unique()) > 1  # positives from the labels, not only the other view
    eager = _common.loss_fn("supcon", "reference", "cpu")(*args)
    g_eager = torch.autograd.grad(eager, features)[0]
    with _common.backend_context("chunked", "cpu"):
        fast = _common.loss_fn("supcon", "chunked", "cpu")(*args)
        g_fast = torch.autograd.grad(fast, features)[0]
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
    # fastcl normalizes inside, SupContrast does not: on unit rows their feature gradients
    # differ by the radial part alone (what a normalization upstream takes out).
    def tangent(g):
        return g - (g * features).sum(dim=2, keepdim=True) * features

    torch.testing.assert_close(tangent(g_fast), tangent(g_eager), rtol=1e-4, atol=1e-6)
    assert (g_fast - g_eager).abs().max() > 1e-3  # (so the projection is what makes them agree)
    torch.testing.assert_close(eager, reference.supcon_loss(features, labels, tau),
                               rtol=1e-5, atol=1e-5)
    per_anchor = _common.supcontrast_loss(features, labels, reduction="none")
    assert per_anchor.shape == (24, 2)
    torch.testing.assert_close(per_anchor.mean(), eager)
    with fastcl.use_backend("chunked"):
        torch.testing.assert_close(fastcl.supcon_loss(features, labels, tau, reduction="none"),
                                   per_anchor, rtol=1e-5, atol=1e-5)


def test_supcon_entry_points_run(tmp_path):
    """interleaved.py and memory_probe.py take --case supcon (B samples x 2 views, --classes),
    B = 2048 by default; interleaved.py without fastcl prints the baselines' times alone."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(BENCH))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "interleaved.py"), "--case",
                           "supcon", "--n", "32", "--classes", "4", "--rounds", "2",
                           "--repeats", "1", "--providers", "chunked,reference"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interleaved supcon B=32 x 2 views, 4 classes D=128" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("medians over repeats")
    assert " chunked " in proc.stdout.splitlines()[-1]
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "memory_probe.py"), "--case",
                           "supcon", "--provider", "reference", "--n", "64", "--classes", "7"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert (result["case"], result["n"], result["views"], result["classes"]) == (
        "supcon", 64, 2, 7)
    assert isinstance(result["full_mib"], float) and result["method"].startswith("VmHWM")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "memory_probe.py"), "--case",
                           "clip", "--provider", "reference"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "--n is required for --case clip" in proc.stderr


def test_the_report_text_names_each_queue_rotation():
    """The EMA / queue lines of report.txt: a rotation's label ("moco_slice (clone)") is not a
    provider's name; each line takes the peer that ran in it (a KeyError here once lost a whole
    CPU report at its last step)."""
    sys.path.insert(0, BENCH)
    import report

    rows = [{"case": "info_nce", "n": 256, "mode": "full", "dtype": "fp32",
             "median_s": {"fastcl": 1e-3, "reference": 2e-3}, "status": {},
             "mem_mib": {}}]
    extra = {"ema": {"params": 10, "median_s": {"fastcl": 1e-3, "lerp": 2e-3},
                     "gb_s": {"fastcl": 1.0, "lerp": 0.5}},
             "queue": {"K": 4, "D": 2, "B": 1, "fastcl_gb_s": 1.0,
                       "pairs": {"moco_slice": {"fastcl": 1e-6, "moco_slice": 2e-6},
                                 "lightly_clone": {"fastcl": 1e-6, "lightly_clone": 4e-6},
                                 "moco_slice (clone)": {"fastcl": 1e-6, "moco_slice": 3e-6}}}}
    info = {"date": "2026-01-01 00:00 UTC", "device": "cpu", "cpu": "x86_64 / Test",
            "torch_threads": 2, "torch": "2.x"}
    text = report.format_report(info, rows, extra, {"fp32": 1e11})
    lines = [x for x in text.splitlines() if x.strip().startswith("fastcl ") and " vs " in x]
    assert len(lines) == 3
    assert "moco_slice (clone)" in lines[2] and "moco_slice/fastcl 3.00x" in lines[2]
    assert "lightly_clone/fastcl 4.00x" in lines[1]
