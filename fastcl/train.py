"""The main job: self-supervised pre-training on a real dataset, then a linear probe and kNN.

    python -m fastcl.train                       # SimCLR on scikit-learn's digits, ~1 min
                                                 # on 2 CPU cores
    python -m fastcl.train --method moco         # MoCo v2 (--moco-version v3 for v3), or byol
    python -m fastcl.train --method supcon       # supervised contrastive: the reference line
    python -m fastcl.train --data x.npy --labels y.npy --device cuda

The default data set is scikit-learn's handwritten digits (1,797 8×8 grey images, shipped
inside scikit-learn: no download), split into a training and a held-out part (stratified,
``--test-fraction``). The encoder is a small CNN; the views come from augmentations written in
torch (random affine, contrast and brightness, Gaussian noise) applied to whole batches on the
device. The run prints a tqdm bar (loss, samples/s) and ends with a table: logistic-regression
linear-probe and kNN accuracy on the held-out split, for the trained encoder, the same encoder
at its random initialization, and the raw pixels. It writes to ``--out``:

- ``metrics.json``: the table, the loss per epoch, the settings and the wall times;
- ``train.png``: the loss curve and the probe accuracies (matplotlib);
- ``checkpoint.pt``: the model's ``state_dict`` (momentum networks and queue included) and the
  optimizer's.

``--data PATH.npy`` trains on your own images instead: an (N, C, H, W) array; a channels-last
(N, H, W, C) one (last dim 1, 3 or 4, both middle dims larger than 4) is transposed and an
(N, H, W) one read as (N, 1, H, W) grayscale; float values, or uint8 ones scaled to [0, 1]
(/ 255). Each conversion prints a one-line note; any other shape or dtype is refused with what
to do. ``--labels PATH.npy`` ((N,) integers) sets a held-out split aside and probes on it;
without labels every sample trains and the probes are skipped (and said so).

``--method supcon`` (SupCon, Khosla et al. 2020) is the supervised reference line for the
self-supervised methods: SimCLR's model and views, with the loss's positives set by the class
labels of the training split, and only those (the held-out split's labels only score the
probes). It needs labels: the digits', or ``--labels`` with ``--data``.

Bad input ends the run with a one-line message naming the option: a missing file (``--data:
no such file: x.npy``, exit 2, like every argument error), a file that is not a .npy or not an
image array (exit 1). An option the chosen method would ignore is an error rather than silence:
``--temperature`` with byol, ``--momentum`` with simclr or supcon, ``--queue-size`` with simclr,
byol, MoCo v3 or supcon, ``--moco-version`` without ``--method moco``, ``--hidden-dim`` with
simclr or supcon (their head is as wide as the encoder's features), ``--test-fraction`` with
``--data`` but no ``--labels``; and ``--method supcon`` with ``--data`` but no ``--labels``.
A ``--batch-size`` larger than the training set is lowered to it, with a note.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

METHODS = ("simclr", "moco", "byol", "supcon")

# Each method's defaults on the digits (2-core CPU, ≤ 3 min a run), chosen so that the trained
# encoder beats the same encoder at its random initialization on the few-label probe and kNN
# (README, "The training job"). Any of them can be overridden on the command line.
DEFAULTS = {
    "simclr": dict(epochs=60, batch_size=256, lr=2e-3, temperature=0.5),
    "moco v2": dict(epochs=60, batch_size=128, lr=1e-3, temperature=0.07, momentum=0.999,
                    queue_size=256),
    "moco v3": dict(epochs=100, batch_size=256, lr=1e-3, temperature=0.2, momentum=0.99),
    "byol": dict(epochs=120, batch_size=128, lr=1e-3, momentum=0.996),
    "supcon": dict(epochs=60, batch_size=256, lr=2e-3, temperature=0.1),
}


def method_key(method: str, moco_version: str = "v2") -> str:
    """The DEFAULTS key of a --method / --moco-version pair."""
    return f"moco {moco_version}" if method == "moco" else method
_UNSET = object()  # parse_args: marks an option left at its default


# ------------------------------------------------------------------------- data -------------


def load_digits() -> Tuple[Tensor, Tensor]:
    """scikit-learn's digits as (1797, 1, 8, 8) float32 in [0, 1] and (1797,) int64 labels."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def load_user_data(path: str, labels: Optional[str]) -> Tuple[Tensor, Optional[Tensor]]:
    """A user's image array from ``path`` (.npy) and optional (N,) integer labels.

    Layouts (each conversion prints a one-line note to stderr):

    - (N, C, H, W): used as is;
    - (N, H, W, C), channels-last: recognised when the last dim is 1, 3 or 4 and both middle
      dims are larger than 4 (no channel count fastcl expects), e.g. (N, 32, 32, 3); transposed
      to (N, C, H, W). A genuine (N, C, H, W) array is only misread if it has more than 4
      channels and is at most 4 pixels wide;
    - (N, H, W), grayscale: read as (N, 1, H, W).

    Dtypes: floats are used as float32; uint8 is scaled to [0, 1] (divided by 255); any other
    dtype is refused with the conversion to do. A bad file or array ends the run with a
    one-line ``SystemExit`` message naming the flag (``--data`` or ``--labels``).
    """
    import numpy as np

    def read(flag: str, file: str):
        try:
            with open(file, "rb") as f:
                magic = f.read(6)
        except OSError as e:
            raise SystemExit(f"{flag}: cannot read {file}: {e.strerror or e}")
        if magic[:2] == b"PK":
            raise SystemExit(f"{flag}: {file} is a .npz archive, not a .npy file: save the "
                             f"one array with np.save")
        if magic != b"\x93NUMPY":
            raise SystemExit(f"{flag}: not a .npy file (no .npy header): {file}")
        try:
            return np.load(file)
        except (OSError, ValueError, EOFError) as e:
            raise SystemExit(f"{flag}: cannot load {file}: {e}")

    def note(msg: str) -> None:
        print(f"note: --data {os.path.basename(path)}: {msg}", file=sys.stderr)

    x = read("--data", path)
    if x.ndim == 3:
        note(f"{x.shape} read as grayscale (N, H, W), used as (N, 1, H, W)")
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4) and min(x.shape[1:3]) > 4:
        shape = x.shape
        x = x.transpose(0, 3, 1, 2)
        note(f"{shape} read as channels-last (N, H, W, C), transposed to (N, C, H, W) = "
             f"{x.shape}")
    if x.ndim != 4:
        raise SystemExit(f"--data: expected an (N, C, H, W) image array, got shape {x.shape}")
    if x.dtype == np.uint8:
        note("uint8 values scaled to [0, 1] (divided by 255)")
        x = x.astype("float32") / 255.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise SystemExit(f"--data: expected float (or uint8) values, got {x.dtype}: convert "
                         f"with x.astype(np.float32), scaled to about [0, 1]")
    y = None
    if labels is not None:
        y = read("--labels", labels)
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise SystemExit(f"--labels: expected ({x.shape[0]},) integers, got {y.dtype} "
                             f"with shape {y.shape}")
        y = torch.from_numpy(y.astype("int64"))
    return torch.from_numpy(np.ascontiguousarray(x, dtype="float32")), y


def split(n: int, labels: Optional[Tensor], test_fraction: float, seed: int):
    """Indices of a (stratified when labelled) train / held-out split."""
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        k = int(round(n * test_fraction))
        return perm[k:], perm[:k]
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class Augment:
    """Random views of a batch, in torch, on the batch's device: a random affine warp (rotation,
    scale, shear, translation), random contrast and brightness, and Gaussian noise."""

    def __init__(self, rotate: float = 15.0, scale: Tuple[float, float] = (0.85, 1.15),
                 shear: float = 0.15, translate: float = 0.15, contrast: float = 0.4,
                 brightness: float = 0.2, noise: float = 0.1):
        self.rotate, self.scale, self.shear, self.translate = rotate, scale, shear, translate
        self.contrast, self.brightness, self.noise = contrast, brightness, noise

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        b, dev = x.shape[0], x.device

        def u(lo, hi, *shape):
            return torch.rand(b, *shape, generator=g, device=dev) * (hi - lo) + lo

        angle = u(-1, 1) * math.radians(self.rotate)
        s = u(*self.scale)
        sh = u(-self.shear, self.shear)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([s * cos, s * (-sin + sh * cos), u(-1, 1) * self.translate * 2], 1),
            torch.stack([s * sin, s * (cos + sh * sin), u(-1, 1) * self.translate * 2], 1),
        ], 1)
        grid = TF.affine_grid(theta, list(x.shape), align_corners=False)
        v = TF.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        v = (v - mean) * u(1 - self.contrast, 1 + self.contrast, 1, 1, 1) + mean
        v = v + u(-self.brightness, self.brightness, 1, 1, 1)
        v = v + self.noise * torch.randn(v.shape, generator=g, device=dev)
        return v


# ------------------------------------------------------------------------- model ------------


class SmallCNN(nn.Module):
    """The default encoder: three 3×3 conv blocks (BN, ReLU), a 2×2 max-pool after the first
    two, global average pooling: (B, C, H, W) → (B, width·4) features."""

    def __init__(self, in_channels: int = 1, width: int = 64):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                    nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_model(method: str, encoder: nn.Module, feature_dim: int, args) -> nn.Module:
    from fastcl import models

    if method == "supcon":
        return models.SupCon(encoder, feature_dim, projection_dim=args.dim,
                             temperature=args.temperature)
    if method == "simclr":
        return models.SimCLR(encoder, feature_dim, projection_dim=args.dim,
                             temperature=args.temperature)
    if method == "moco":
        return models.MoCo(encoder, feature_dim, dim=args.dim,
                           queue_size=args.queue_size or 1,  # v3 has no queue
                           temperature=args.temperature, version=args.moco_version,
                           momentum=args.momentum,
                           hidden_dim=args.hidden_dim or 4 * feature_dim)
    return models.BYOL(encoder, feature_dim, projection_dim=args.dim,
                       hidden_dim=args.hidden_dim or 4 * feature_dim, momentum=args.momentum)


# ------------------------------------------------------------------------- probes -----------


@torch.no_grad()
def embed(encoder: nn.Module, x: Tensor, device, batch: int = 512) -> Tensor:
    encoder.eval()
    out = [encoder(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


FEW_LABELS = 10  # labelled training images per class for the few-label probe
FEW_DRAWS = 5  # its fixed draws (seeds 0..4, the same for every feature set and run)


def few_label_draws(train_y: Tensor, per_class: int = FEW_LABELS,
                    draws: int = FEW_DRAWS) -> List[Tensor]:
    """Indices into the training set of ``draws`` fixed random picks of ``per_class`` images of
    each class (all of a class's images when it has fewer)."""
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(d)
        picks = []
        for c in train_y.unique():
            idx = (train_y == c).nonzero().flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        out.append(torch.cat(picks).sort().values)
    return out


def probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
          k: int = 5) -> Dict[str, float]:
    """Held-out accuracy of three probes of frozen features:

    - ``linear``: logistic regression on standardized features, all training labels;
    - ``linear_10``: the same on 10 labelled training images per class (the few-label protocol
      of the self-supervised papers), mean over 5 fixed draws (``few_label_draws``); the
      standardization uses every training image's features, which needs no labels;
    - ``knn``: cosine kNN (k neighbours, majority vote) over all training images.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    a, b = train_x.numpy().astype(np.float64), test_x.numpy().astype(np.float64)
    ya, yb = train_y.numpy(), test_y.numpy()
    scaler = StandardScaler().fit(a)
    sa, sb = scaler.transform(a), scaler.transform(b)
    lin = LogisticRegression(max_iter=5000, C=1.0).fit(sa, ya)
    few = [LogisticRegression(max_iter=5000, C=1.0).fit(sa[idx.numpy()], ya[idx.numpy()])
           .score(sb, yb) for idx in few_label_draws(train_y)]
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(a, ya)
    return {"linear": float(lin.score(sb, yb)), "linear_10": float(np.mean(few)),
            "knn": float(knn.score(b, yb))}


# ------------------------------------------------------------------------- main -------------


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(
        prog="python -m fastcl.train",
        description="Self-supervised pre-training with fastcl's models (or supervised "
                    "contrastive, --method supcon), then linear-probe and kNN accuracy on a "
                    "held-out split.")
    p.add_argument("--method", choices=METHODS, default="simclr")
    p.add_argument("--moco-version", choices=("v2", "v3"), default="v2")
    p.add_argument("--epochs", type=int, default=None, help="default: the method's (below)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the method's; at least 2; lowered, with a note, to the "
                        "training set's size if larger")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (cosine decay); default: the method's")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=None,
                   help="default: the method's")
    p.add_argument("--dim", type=int, default=128, help="projection width")
    p.add_argument("--hidden-dim", type=int, default=None, help="heads' hidden width")
    p.add_argument("--momentum", type=float, default=None,
                   help="EMA momentum (MoCo v2), or the base of the cosine schedule to 1 "
                        "(MoCo v3, BYOL); default: the method's")
    p.add_argument("--queue-size", type=int, default=None,
                   help="MoCo v2 negatives; default 256 (small: the training split has 1,258 "
                        "images, and a queue near that holds each image's own older key)")
    p.add_argument("--width", type=int, default=64, help="encoder width (features = 4x)")
    p.add_argument("--data", default=None,
                   help="a .npy of images instead of digits: (N, C, H, W); channels-last "
                        "(N, H, W, C) with C in 1, 3, 4 and H, W > 4 is transposed, (N, H, W) "
                        "is read as (N, 1, H, W); float, or uint8 (scaled to [0, 1]), each "
                        "conversion with a note")
    p.add_argument("--labels", default=None,
                   help="(N,) integer .npy for --data: held-out split and probes (without "
                        "it, every sample trains and the probes are skipped)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="held-out fraction (digits, or --data with --labels)")
    p.add_argument("--subset", type=int, default=None,
                   help="train on the first N training samples only (smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default="fastcl-train-out", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.epilog = ("Defaults per method: " + "; ".join(
        f"{m}: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in d.items())
        for m, d in DEFAULTS.items()) + ". "
        "supcon is the supervised reference line: it trains on the class labels of the "
        "training split only (digits, or --data with --labels; the held-out split's labels "
        "only score the probes). "
        "An option the chosen method ignores is an error: --temperature with byol, "
        "--momentum with simclr or supcon, --queue-size with simclr, byol, moco v3 or "
        "supcon, --moco-version without --method moco, --hidden-dim with simclr or supcon, "
        "--test-fraction with --data but no --labels.")
    args = p.parse_args(argv)
    for name, value in DEFAULTS[method_key(args.method, args.moco_version)].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("epochs", "batch_size", "dim", "queue_size", "width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (a contrastive batch needs two samples)")
    if args.subset is not None and args.subset <= 0:
        p.error("--subset must be positive")
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be in (0, 1)")
    if args.labels is not None and args.data is None:
        p.error("--labels goes with --data")
    if args.method == "supcon" and args.data is not None and args.labels is None:
        p.error("--method supcon needs --labels with --data (it trains on the training "
                "split's class labels)")
    for flag, file in (("--data", args.data), ("--labels", args.labels)):
        if file is not None and not os.path.isfile(file):
            p.error(f"{flag}: no such file: {file}")
    # Options the chosen method would silently ignore are errors. "Given" means on the command
    # line (parsed again with every default replaced by a marker), whatever the value.
    p.set_defaults(**{k: _UNSET for k in vars(args)})
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not _UNSET}
    method = f"moco {args.moco_version}" if args.method == "moco" else args.method
    unused = {  # option: (the methods that ignore it, why)
        "temperature": (("byol",), "BYOL's loss has no temperature"),
        "momentum": (("simclr", "supcon"),
                     f"{'SupCon' if method == 'supcon' else 'SimCLR'} has no momentum network"),
        "queue_size": (("simclr", "byol", "moco v3", "supcon"), "only MoCo v2 keeps a queue"),
        "moco_version": (("simclr", "byol", "supcon"), "it picks MoCo's version"),
        "hidden_dim": (("simclr", "supcon"),
                       "its head's hidden width is the encoder's feature width"),
    }
    for name, (methods, why) in unused.items():
        if name in given and method in methods:
            what = ("--method moco --moco-version v3" if method == "moco v3"
                    else f"--method {method}")
            p.error(f"--{name.replace('_', '-')} does not apply to {what} ({why}): drop it")
    if "test_fraction" in given and args.data is not None and args.labels is None:
        p.error("--test-fraction does not apply without --labels: all of --data trains, "
                "there is no held-out split")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def train(args) -> Dict:
    """Pre-train, probe, write the outputs; returns the metrics."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.data is None:
        x, y = load_digits()
        dataset = "sklearn digits"
    else:
        x, y = load_user_data(args.data, args.labels)
        dataset = os.path.basename(args.data)
    if y is None:  # nothing to probe: no held-out split, every sample trains
        train_idx, test_idx = torch.arange(len(x)), torch.arange(0)
    else:
        train_idx, test_idx = split(len(x), y, args.test_fraction, args.seed)
    if args.subset is not None:
        train_idx = train_idx[:args.subset]
    x_train = x[train_idx].to(device)
    # SupCon's labels: the training split's only (the held-out ones score the probes).
    y_train = y[train_idx].to(device) if args.method == "supcon" else None
    n = len(x_train)
    if n < 2:
        why = f" (--subset {args.subset})" if args.subset is not None else ""
        raise SystemExit(f"need at least 2 training samples, got {n}{why}")
    batch = min(args.batch_size, n)
    if batch < args.batch_size:
        print(f"note: --batch-size {args.batch_size} is more than the {n} training samples: "
              f"batches of {n} (one step per epoch)", file=sys.stderr)

    encoder = SmallCNN(x.shape[1], args.width).to(device)
    random_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = build_model(args.method, encoder, encoder.feature_dim, args).to(device)
    step_fn = torch.compile(model, fullgraph=True) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = n // batch  # drop the last partial batch: constant shapes
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    aug = Augment()
    g = torch.Generator(device=device).manual_seed(args.seed)
    losses: List[float] = []
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=args.method, unit="epoch", disable=args.no_progress,
               dynamic_ncols=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=g, device=device)
        total_loss = torch.zeros((), device=device)
        e0 = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = x_train[idx]
            if y_train is None:
                loss = step_fn(aug(xb, g), aug(xb, g))
            else:
                loss = step_fn(aug(xb, g), aug(xb, g), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.step_end(step, total)
            step += 1
            total_loss += loss.detach()
        losses.append(float(total_loss) / steps_per_epoch)  # one host sync per epoch
        rate = steps_per_epoch * batch / (time.perf_counter() - e0)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{rate:,.0f}")
    train_s = time.perf_counter() - t0

    results: Dict[str, Dict[str, float]] = {}
    p0 = time.perf_counter()
    if y is not None:
        xt, xh = x[train_idx], x[test_idx]
        yt, yh = y[train_idx], y[test_idx]
        results["trained encoder"] = probe(embed(encoder, xt, device), yt,
                                           embed(encoder, xh, device), yh)
        fresh = SmallCNN(x.shape[1], args.width).to(device)
        fresh.load_state_dict(random_state)
        results["random-init encoder"] = probe(embed(fresh, xt, device), yt,
                                               embed(fresh, xh, device), yh)
        results["raw pixels"] = probe(xt.flatten(1), yt, xh.flatten(1), yh)
    probe_s = time.perf_counter() - p0

    metrics = {
        "method": args.method if args.method != "moco" else f"moco-{args.moco_version}",
        "dataset": dataset, "train_samples": n, "held_out_samples": int(len(test_idx)),
        "epochs": args.epochs, "steps": step, "batch_size": batch,
        "loss_per_epoch": losses, "probe": results,
        "train_seconds": train_s, "probe_seconds": probe_s,
        "samples_per_second": step * batch / train_s,
        "device": str(device), "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items()},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "args": vars(args)}, os.path.join(args.out, "checkpoint.pt"))
    plot(metrics, os.path.join(args.out, "train.png"))
    return metrics


def table(metrics: Dict) -> str:
    """The accuracy table printed at the end of a run."""
    probe_res = metrics["probe"]
    if not probe_res:
        return "no labels: linear probe and kNN skipped (pass --labels)"
    lines = [f"held-out accuracy ({metrics['held_out_samples']} samples of "
             f"{metrics['dataset']}):",
             f"  {'features':<22}{'linear probe':>13}{'10 labels/class':>17}{'kNN':>8}"]
    for name, r in probe_res.items():
        lines.append(f"  {name:<22}{r['linear']:>13.4f}{r['linear_10']:>17.4f}{r['knn']:>8.4f}")
    return "\n".join(lines)


def plot(metrics: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    losses = metrics["loss_per_epoch"]
    a.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) < 30 else None)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.set_title(f"{metrics['method']} on {metrics['dataset']}")
    probe_res = metrics["probe"]
    if probe_res:
        names = list(probe_res)
        xs = range(len(names))
        bars = [("linear", "linear probe"), ("linear_10", "linear, 10 labels/class"),
                 ("knn", "kNN (k=5)")]
        for j, (key, label) in enumerate(bars):
            vals = [probe_res[k][key] for k in names]
            drawn = b.bar([i + (j - 1) * 0.27 for i in xs], vals, width=0.27, label=label)
            b.bar_label(drawn, fmt="%.3f", fontsize=7, rotation=90, padding=2)
        b.set_xticks(list(xs), names, fontsize=8)
        b.set_ylim(0, 1.2)
        b.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        b.set_ylabel("held-out accuracy")
        b.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    else:
        b.text(0.5, 0.5, "no labels: probes skipped", ha="center", va="center")
        b.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    metrics = train(args)
    print(table(metrics))
    print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.1f} s "
          f"({metrics['samples_per_second']:,.0f} samples/s), probes in "
          f"{metrics['probe_seconds']:.1f} s; outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
