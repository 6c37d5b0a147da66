"""The main job, ``python -m fastcl.train``: short runs on a small subset that write every
output, the user-data path, the argument errors and the console script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcl import models, train

SHORT = ["--epochs", "2", "--subset", "96", "--batch-size", "32", "--width", "8",
         "--no-progress"]


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_short_run_writes_its_outputs(method, tmp_path, capsys):
    extra = ["--queue-size", "40", "--hidden-dim", "32"] if method != "simclr" else []
    assert train.main(["--method", method, "--out", str(tmp_path), *SHORT, *extra]) == 0
    printed = capsys.readouterr().out
    for row in ("trained encoder", "random-init encoder", "raw pixels"):
        assert row in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_samples"] == 96 and metrics["steps"] == 2 * 3
    assert len(metrics["loss_per_epoch"]) == 2
    assert all(np.isfinite(metrics["loss_per_epoch"]))
    assert metrics["held_out_samples"] == 539  # 30% of 1797, stratified per class
    for r in metrics["probe"].values():
        assert set(r) == {"linear", "linear_10", "knn"}
        assert all(0.0 <= v <= 1.0 for v in r.values())
    # Raw pixels are a fixed baseline: a probe fitted on the 96 samples is far above chance.
    assert metrics["probe"]["raw pixels"]["linear"] > 0.5
    png = (tmp_path / "train.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The checkpoint restores into a fresh model of the same kind.
    ckpt = torch.load(tmp_path / "checkpoint.pt")
    args = train.parse_args(["--method", method, *SHORT, *extra])
    enc = train.SmallCNN(1, 8)
    fresh = train.build_model(method, enc, enc.feature_dim, args)
    fresh.load_state_dict(ckpt["model"])
    assert ckpt["step"] == 6
    if method == "moco":
        assert isinstance(fresh, models.MoCo)
        assert int(fresh.queue.ptr) == (6 * 32) % 40


def test_few_label_probe_uses_10_fixed_images_per_class():
    """linear_10's draws: 10 training images of every class (all of a smaller class), the same
    5 draws on every call, different from each other; the probe's score is their mean."""
    y = torch.tensor([c for c in range(10) for _ in range(30)] + [10] * 4)
    draws = train.few_label_draws(y)
    assert len(draws) == 5
    for idx in draws:
        counts = torch.bincount(y[idx], minlength=11)
        assert counts[:10].tolist() == [10] * 10 and counts[10] == 4
    assert all(torch.equal(a, b) for a, b in zip(draws, train.few_label_draws(y)))
    assert not torch.equal(draws[0], draws[1])
    # Separable features: every draw's probe is perfect, so the mean is 1; noise features
    # give chance level on a held-out set, far below.
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.one_hot(y).float() + 0.01 * torch.randn(len(y), 11, generator=g)
    r = train.probe(x, y, x, y)
    assert r["linear_10"] == 1.0 and r["linear"] == 1.0
    noise = torch.randn(len(y), 11, generator=g)
    assert train.probe(noise, y, torch.randn(len(y), 11, generator=g), y)["linear_10"] < 0.3


def test_user_data_without_labels_skips_the_probes(tmp_path, capsys):
    g = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", g.standard_normal((40, 3, 6, 6)).astype(np.float32))
    out = tmp_path / "out"
    assert train.main(["--data", str(tmp_path / "x.npy"), "--out", str(out), *SHORT]) == 0
    assert "linear probe and kNN skipped" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["probe"] == {} and metrics["train_samples"] == 28  # 70% of 40
    assert (out / "train.png").exists()


def test_user_data_with_labels_is_probed(tmp_path):
    g = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 30)
    x = g.standard_normal((60, 1, 6, 6)).astype(np.float32) + 3 * y[:, None, None, None]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "out"
    assert train.main(["--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                       "--out", str(out), *SHORT]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_samples"] == 18
    assert metrics["probe"]["raw pixels"]["linear"] == 1.0  # separable by construction


@pytest.mark.parametrize("argv, message", [
    (["--method", "simsiam"], "invalid choice"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--labels", "y.npy"], "--labels goes with --data"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_user_data_is_named(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(SystemExit, match="--data"):
        train.main(["--data", str(tmp_path / "x.npy"), "--out", str(tmp_path), *SHORT])


def test_entry_points():
    """``python -m fastcl.train --help`` and the ``fastcl-train`` console script (installed
    by ``pip install -e .``, as ``make`` does)."""
    r = subprocess.run([sys.executable, "-m", "fastcl.train", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--method" in r.stdout
    script = Path(sys.executable).parent / "fastcl-train"
    assert script.exists(), f"{script} missing: reinstall with pip install -e '.[test,train]'"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--method" in r.stdout


def test_compiled_run(tmp_path):
    """``--compile``: the model's forward under torch.compile(fullgraph=True) trains too."""
    assert train.main(["--compile", "--out", str(tmp_path), *SHORT]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["settings"]["compile"] is True
    assert all(np.isfinite(metrics["loss_per_epoch"]))
