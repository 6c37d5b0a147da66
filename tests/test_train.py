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


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "supcon"])
def test_short_run_writes_its_outputs(method, tmp_path, capsys):
    extra = {"simclr": [], "moco": ["--queue-size", "40", "--hidden-dim", "32"],
             "byol": ["--hidden-dim", "32"], "supcon": []}[method]
    assert train.main(["--method", method, "--out", str(tmp_path), *SHORT, *extra]) == 0
    printed = capsys.readouterr().out
    for row in ("trained encoder", "random-init encoder", "raw pixels"):
        assert row in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == {"moco": "moco-v2"}.get(method, method)
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
    if method == "supcon":
        assert isinstance(fresh, models.SupCon) and fresh.temperature == 0.1


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
    # No labels: nothing held out, every sample trains.
    assert metrics["probe"] == {} and metrics["train_samples"] == 40
    assert metrics["held_out_samples"] == 0
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


@pytest.mark.parametrize("flag", ["--data", "--labels"])
def test_a_missing_file_is_an_argument_error(flag, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 6, 6), dtype=np.float32))
    argv = {"--data": ["--data", str(tmp_path / "nope.npy")],
            "--labels": ["--data", str(tmp_path / "x.npy"), "--labels", "nope.npy"]}[flag]
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}: no such file: " in err and "nope.npy" in err
    assert "Traceback" not in err


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        with open(path, "wb") as f:  # a .npz archive under the name x.npy
            np.savez(f, **content)
    else:
        np.save(path, content, allow_pickle=True)


GOOD_X = np.zeros((6, 1, 6, 6), dtype=np.float32)


@pytest.mark.parametrize("x, y, message", [
    (b"x,y\n1,2\n", None, "--data: not a .npy file (no .npy header): "),
    (b"", None, "--data: not a .npy file (no .npy header): "),
    ({"x": GOOD_X}, None, "is a .npz archive, not a .npy file: save the one array with np.save"),
    (np.array([{}], dtype=object), None, "--data: cannot load "),
    (GOOD_X, b"not numpy", "--labels: not a .npy file (no .npy header): "),
    (np.zeros((6, 1, 6, 6), dtype=np.int64), None,
     "--data: expected float (or uint8) values, got int64: convert with "
     "x.astype(np.float32)"),
    (np.zeros((6, 36), dtype=np.float32), None,
     "--data: expected an (N, C, H, W) image array, got shape (6, 36)"),
])
def test_an_unreadable_file_is_a_one_line_error(x, y, message, tmp_path):
    _write(tmp_path / "x.npy", x)
    argv = ["--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "out"), *SHORT]
    if y is not None:
        _write(tmp_path / "y.npy", y)
        argv += ["--labels", str(tmp_path / "y.npy")]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code  # one line, exit 1
    assert message in e.value.code


@pytest.mark.parametrize("shape, seen, kept", [
    # converted (with a note), and a genuine (N, C, H, W) array close to it (kept, no note)
    ((5, 8, 8, 3), (5, 3, 8, 8), (5, 3, 8, 4)),   # channels-last RGB; W = 4 is not C
    ((5, 9, 7, 1), (5, 1, 9, 7), (5, 1, 6, 3)),   # channels-last grey; C = 1, W = 3
    ((5, 8, 8, 4), (5, 4, 8, 8), (5, 4, 8, 8)),   # channels-last RGBA; genuine RGBA
    ((5, 8, 8), (5, 1, 8, 8), (5, 3, 8, 8)),      # (N, H, W) grey; genuine RGB
])
def test_image_layouts(shape, seen, kept, tmp_path, capsys):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.save(tmp_path / "x.npy", x)
    got, y = train.load_user_data(str(tmp_path / "x.npy"), None)
    assert tuple(got.shape) == seen and y is None
    err = capsys.readouterr().err
    if len(shape) == 3:
        assert torch.equal(got[:, 0], torch.from_numpy(x))
        assert "read as grayscale (N, H, W), used as (N, 1, H, W)" in err
    else:
        assert torch.equal(got, torch.from_numpy(x).permute(0, 3, 1, 2))
        assert f"read as channels-last (N, H, W, C), transposed to (N, C, H, W) = {seen}" in err
    assert len(err.splitlines()) == 1
    x = np.arange(np.prod(kept), dtype=np.float32).reshape(kept)
    np.save(tmp_path / "x.npy", x)
    got, _ = train.load_user_data(str(tmp_path / "x.npy"), None)
    assert torch.equal(got, torch.from_numpy(x)) and capsys.readouterr().err == ""


def test_uint8_images_are_scaled_and_channels_last_trains(tmp_path, capsys):
    g = np.random.default_rng(2)
    x = g.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    got, _ = train.load_user_data(str(tmp_path / "x.npy"), None)
    assert got.dtype == torch.float32 and got.shape == (40, 3, 8, 8)
    assert torch.allclose(got, torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0).float())
    assert "uint8 values scaled to [0, 1] (divided by 255)" in capsys.readouterr().err
    out = tmp_path / "out"
    assert train.main(["--data", str(tmp_path / "x.npy"), "--out", str(out), *SHORT]) == 0
    assert json.loads((out / "metrics.json").read_text())["loss_per_epoch"]


def test_a_batch_larger_than_the_training_set_is_said(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--epochs", "1", "--subset", "45", "--batch-size", "256",
            "--width", "8", "--no-progress"]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert ("note: --batch-size 256 is more than the 45 training samples: batches of 45 "
            "(one step per epoch)") in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["batch_size"] == 45 and metrics["steps"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--subset", "0"], "--subset must be positive"),
    (["--subset", "-5"], "--subset must be positive"),
])
def test_batch_and_subset_bounds(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_one_training_sample_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"need at least 2 training samples, got 1 \(--subset 1\)"):
        train.main(["--out", str(tmp_path), "--subset", "1", "--epochs", "1", "--no-progress"])


@pytest.mark.parametrize("argv, message, accepted", [
    # rejected, and the nearest command line that is accepted
    (["--method", "byol", "--temperature", "0.1"],
     "--temperature does not apply to --method byol (BYOL's loss has no temperature)",
     ["--method", "moco", "--moco-version", "v3", "--temperature", "0.1"]),
    (["--method", "simclr", "--momentum", "0.9"],
     "--momentum does not apply to --method simclr (SimCLR has no momentum network)",
     ["--method", "byol", "--momentum", "0.9"]),
    (["--queue-size", "256"],  # the default value, given explicitly: still an error
     "--queue-size does not apply to --method simclr (only MoCo v2 keeps a queue)",
     ["--method", "moco", "--queue-size", "256"]),
    (["--method", "byol", "--queue-size=64"],
     "--queue-size does not apply to --method byol",
     ["--method", "byol"]),
    (["--method", "moco", "--moco-version", "v3", "--queue-size", "64"],
     "--queue-size does not apply to --method moco --moco-version v3",
     ["--method", "moco", "--moco-version", "v2", "--queue-size", "64", "--momentum", "0.9"]),
    (["--moco-version", "v2"], "--moco-version does not apply to --method simclr",
     ["--method", "simclr", "--temperature", "0.2"]),
    (["--method", "byol", "--moco-v", "v3"], "--moco-version does not apply to --method byol",
     ["--method", "moco", "--moco-v", "v3", "--momentum", "0.9"]),
    (["--hidden-dim", "32"], "--hidden-dim does not apply to --method simclr",
     ["--method", "byol", "--hidden-dim", "32"]),
    (["--data", "__DATA__", "--test-fraction", "0.2"],
     "--test-fraction does not apply without --labels",
     ["--test-fraction", "0.2"]),
    (["--method", "supcon", "--momentum", "0.99"],
     "--momentum does not apply to --method supcon (SupCon has no momentum network)",
     ["--method", "supcon", "--temperature", "0.2"]),
    (["--method", "supcon", "--queue-size", "64"],
     "--queue-size does not apply to --method supcon (only MoCo v2 keeps a queue)",
     ["--method", "supcon", "--dim", "64"]),
    (["--method", "supcon", "--moco-version", "v3"],
     "--moco-version does not apply to --method supcon",
     ["--method", "supcon", "--epochs", "3"]),
    (["--method", "supcon", "--hidden-dim", "32"],
     "--hidden-dim does not apply to --method supcon (its head's hidden width is the "
     "encoder's feature width)",
     ["--method", "supcon", "--width", "16"]),
    # SupCon trains on labels: --data alone has none
    (["--method", "supcon", "--data", "__DATA__"],
     "--method supcon needs --labels with --data (it trains on the training split's class "
     "labels)",
     ["--method", "supcon", "--data", "__DATA__", "--labels", "__LABELS__"]),
])
def test_an_option_the_method_ignores_is_an_error(argv, message, accepted, tmp_path, capsys):
    np.save(tmp_path / "x.npy", GOOD_X)
    np.save(tmp_path / "y.npy", np.zeros(len(GOOD_X), dtype=np.int64))
    files = {"__DATA__": str(tmp_path / "x.npy"), "__LABELS__": str(tmp_path / "y.npy")}
    argv = [files.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    train.parse_args([files.get(a, a) for a in accepted])


def test_entry_points():
    """``python -m fastcl.train --help`` and the ``fastcl-train`` console script (installed
    by ``pip install -e .``, as ``make`` does)."""
    r = subprocess.run([sys.executable, "-m", "fastcl.train", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--method" in r.stdout
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "{simclr,moco,byol,supcon}" in text
    assert "supcon: epochs 60, batch-size 256, lr 0.002, temperature 0.1" in text
    assert ("supcon is the supervised reference line: it trains on the class labels of the "
            "training split only") in text
    assert "--momentum with simclr or supcon" in text
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


@pytest.mark.parametrize("argv, key", [([], "simclr"), (["--method", "moco"], "moco v2"),
                                       (["--method", "moco", "--moco-version", "v3"], "moco v3"),
                                       (["--method", "byol"], "byol"),
                                       (["--method", "supcon"], "supcon")])
def test_each_method_gets_its_own_defaults(argv, key):
    """Unset options take the method's DEFAULTS (the tuned settings the README's table used);
    a given option wins; --help lists them."""
    args = train.parse_args(argv)
    for name, value in train.DEFAULTS[key].items():
        assert getattr(args, name) == value, name
    assert train.parse_args(argv + ["--epochs", "3", "--lr", "0.01"]).epochs == 3
    assert train.method_key(args.method, args.moco_version) == key


# ------------------------------------------------------------------------- SupCon -----------


def test_supcon_model_is_supcon_loss_of_its_projections():
    """models.SupCon: fastcl.supcon_loss (checked against reference's dense formula) of the
    two views' projections stacked (B, 2, D), with the batch's labels; τ_base = τ."""
    from fastcl import reference

    torch.manual_seed(0)
    enc = train.SmallCNN(1, 4)
    model = models.SupCon(enc, enc.feature_dim, projection_dim=16, temperature=0.2)
    x1, x2 = torch.rand(12, 1, 8, 8), torch.rand(12, 1, 8, 8)
    y = torch.tensor([0, 1, 2] * 4)
    loss = model(x1, x2, y)
    z1, z2 = model.projector(model.encoder(torch.cat([x1, x2]))).chunk(2)
    want = reference.supcon_loss(torch.stack([z1, z2], 1).double(), y, 0.2)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    # The labels matter: with every sample its own class it is multi-view SimCLR.
    other = reference.supcon_loss(torch.stack([z1, z2], 1).double(), torch.arange(12), 0.2)
    assert abs(other.item() - want.item()) > 1e-3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="labels must be a tensor"):
        model(x1, x2, None)


def test_supcon_trains_on_the_training_labels_only(tmp_path, monkeypatch):
    """Every image the SupCon loss sees is a training-split image, with its own label, and
    the loss gets those labels: no held-out image or label ever reaches training. By
    construction: image i is the constant i / 100 and the augmentation is the identity, so
    each batch's images name their samples. And the loss falls as it trains."""
    from fastcl import functional

    n = 60
    y = np.repeat(np.arange(3), [10, 20, 30])  # held out: 3, 6, 9 of each class
    x = np.broadcast_to((np.arange(n) / 100).astype(np.float32)[:, None, None, None],
                        (n, 1, 6, 6)).copy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    seen = []  # (sample indices of the batch, labels given to the model, labels of the loss)
    forward = models.SupCon.forward
    loss_fn = functional.supcon_loss

    def spy_forward(self, x1, x2, labels):
        seen.append([(x1[:, 0, 0, 0] * 100).round().long().cpu(), labels.cpu(), None])
        return forward(self, x1, x2, labels)

    def spy_loss(features, labels=None, *a, **k):
        seen[-1][2] = labels.cpu()
        return loss_fn(features, labels, *a, **k)

    monkeypatch.setattr(models.SupCon, "forward", spy_forward)
    monkeypatch.setattr(functional, "supcon_loss", spy_loss)
    monkeypatch.setattr(train.Augment, "__call__", lambda self, xb, g: xb.clone())
    out = tmp_path / "out"
    assert train.main(["--method", "supcon", "--data", str(tmp_path / "x.npy"), "--labels",
                       str(tmp_path / "y.npy"), "--out", str(out), "--epochs", "4",
                       "--batch-size", "14", "--width", "4", "--no-progress"]) == 0
    train_idx, test_idx = train.split(n, torch.from_numpy(y), 0.3, 0)
    assert len(train_idx) == 42 and len(test_idx) == 18
    assert len(seen) == 4 * 3  # 42 // 14 steps an epoch
    for idx, labels, loss_labels in seen:
        assert set(idx.tolist()) <= set(train_idx.tolist())
        assert torch.equal(labels, torch.from_numpy(y)[idx])
        assert torch.equal(loss_labels, labels)
    for epoch in range(4):  # every training sample, once an epoch
        idx = torch.cat([s[0] for s in seen[3 * epoch:3 * epoch + 3]])
        assert torch.equal(idx.sort().values, train_idx)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "supcon" and metrics["held_out_samples"] == 18
    losses = metrics["loss_per_epoch"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses

