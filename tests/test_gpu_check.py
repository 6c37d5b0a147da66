"""benchmarks/gpu_check.py and benchmarks/gpu.sh, which only do their real work on a CUDA
machine, run here in their CPU smoke modes so that the first GPU run is not their first run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_gpu_check_smoke_on_cpu(tmp_path):
    """One line per case (configuration x loss x D) appended to --out, then the queue push and
    a summary; the established losses within the 2x-eager rule on the CPU backend."""
    out = tmp_path / "check.txt"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
         "--small", "--configs", "fp32,bf16", "--dims", "64,200", "--out", str(out),
         "--stats", str(tmp_path / "stats.txt")],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert out.exists(), (proc.stdout + proc.stderr)[-3000:]
    lines = out.read_text().splitlines()
    cases = [line for line in lines if line.startswith(("ok", "FAIL"))]
    losses = {line.split()[2] for line in cases if "queue_push" not in line}
    assert {"nt_xent", "info_nce", "info_nce_queue", "byol_loss", "supcon_loss"} <= losses
    assert len(cases) == 2 * len(losses) * 2 + 1  # configs x losses x dims + the push
    # The losses every backend has must pass; a newer one (dcl_loss) only has to be run.
    base = [line for line in cases if "queue_push" in line or line.split()[2] in
            ("nt_xent", "info_nce", "info_nce_queue", "byol_loss", "supcon_loss")]
    assert all(line.startswith("ok") for line in base), "\n".join(base)
    failed = sum(line.startswith("FAIL") for line in cases)
    assert lines[-1] == f"gpu_check: {len(cases)} cases, {failed} failed"
    assert proc.returncode == (1 if failed else 0), (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "stats.txt").read_text().startswith("0 Triton kernels compiled")


def test_gpu_check_supcon_cases_pass_where_the_backend_has_supcon(tmp_path):
    """The supcon_loss cases (N samples x 2 views, labels, a learnable temperature, against
    SupContrast's formula on the normalized features) within the rule on fastcl's chunked
    path, which has label positives: the cases measure the loss, not their own set-up; and
    ``--losses`` runs that loss alone."""
    out = tmp_path / "check.txt"
    env = dict(_env(), FASTCL_BACKEND="chunked")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
         "--small", "--configs", "fp32,bf16", "--dims", "64,200", "--losses", "supcon_loss",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cases = [line for line in out.read_text().splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(cases) == 2 * 2 + 1 and "queue_push" in cases[-1], cases  # configs x dims
    assert all(line.split()[2] == "supcon_loss" for line in cases[:4]), cases
    assert all(line.startswith("ok") for line in cases), "\n".join(cases)
    assert all("grad0" in line and "grad1" in line for line in cases[:4])  # features, tau


def test_gpu_check_rejects_an_unknown_loss():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
         "--losses", "supcon"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "unknown supcon" in proc.stderr


def test_gpu_check_counts_launches_on_cpu(tmp_path):
    out = tmp_path / "launches.txt"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
         "--small", "--launches", "--out", str(out)],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    text = out.read_text()
    assert "nt_xent forward+backward:" in text and "moco info_nce(queue)" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu.sh")], check=True)


@pytest.mark.parametrize("loss", ["clip", "siglip", "supcon"])
def test_gpu_clip_smoke_on_cpu(tmp_path, loss):
    """benchmarks/gpu_clip.py (CLIP's, SigLIP's and SupCon's speed and memory) in its CPU smoke
    mode: one line per (size, provider) appended as it runs (a measurement, or why the provider
    is unavailable: Inf-CL has no sigmoid loss nor label positives), then the summary. SupCon
    runs on fastcl's chunked path (FASTCL_BACKEND=chunked), which has label positives."""
    out = tmp_path / f"{loss}.txt"
    env = dict(_env(), FASTCL_BACKEND="chunked") if loss == "supcon" else _env()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_clip.py"), "--loss", loss,
         "--device", "cpu", "--small", "--providers", "fastcl,eager,inf_cl", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = out.read_text().splitlines()
    rows = [line for line in lines if line.startswith(f"{loss} N=") and " vs " not in line]
    assert len(rows) == 2 * 3, lines  # sizes x providers
    assert all(" ms" in line for line in rows if " eager " in line), lines
    assert all(" ms" in line for line in rows if " fastcl " in line), lines
    assert sum(" fastcl vs eager: " in line for line in lines) == 2
    if loss == "siglip":
        assert all("unavailable: Inf-CL has no sigmoid loss" in line
                   for line in rows if " inf_cl " in line), lines
    if loss == "supcon":
        assert "2 views, 10 classes" in lines[0], lines[0]
        assert all("unavailable: Inf-CL has no label positives" in line
                   for line in rows if " inf_cl " in line), lines
    assert lines[-1].startswith("gpu_clip: done in") and lines[-1].endswith("0 failed")
