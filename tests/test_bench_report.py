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
        (dt, c, m) for dt in ("fp32", "bf16") for c in ("nt_xent", "info_nce", "in_batch")
        for m in ("forward", "backward", "full")}
    for r in losses:  # every provider timed, none silently missing
        assert set(r["median_s"]) == {"fastcl", "chunked", "reference", "compile", "peer"}, r
        assert all(t > 0 for t in r["median_s"].values())
        if r["case"] == "in_batch":  # the optional peer is marked, with the reason
            assert r["status"]["inf_cl"].startswith("skipped: Inf-CL's kernels need CUDA")
    assert "skipped" in report
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
