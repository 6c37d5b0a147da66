"""``python -m fastcl.bench``: the report runs from a checkout and writes what it promises.

A smoke test at tiny sizes (``--quick``); the figures it prints are not checked, only that every
case ran and the three files are well formed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


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
        (dt, c, m) for dt in ("fp32", "bf16") for c in ("nt_xent", "info_nce")
        for m in ("forward", "backward", "full")}
    for r in losses:  # every provider timed, none silently missing
        assert set(r["median_s"]) == {"fastcl", "chunked", "reference", "compile", "peer"}, r
        assert all(t > 0 for t in r["median_s"].values())
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]


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
    for needed in ("tests.log", "report.log", "--device cuda", "timeout"):
        assert needed in text


def test_report_rejects_unknown_dtype(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastcl.bench", "--quick", "--dtypes", "fp8",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "fp8" in proc.stderr
