"""Shared pieces of fastcl's benchmarks: providers, rotating inputs, timed steps, memory probes.

Imported by ``bench_nt_xent.py`` (pytest-benchmark cases and ``--ratios``), ``conftest.py`` and
``memory_probe.py``; ``benchmarks/`` is on ``sys.path`` in all three (pytest's rootdir-relative
import for the first two, the script's own directory for the others).

Cases
    ``nt_xent``: ``z1, z2`` (N, D), both requiring grad, temperature 0.1.
    ``info_nce``: MoCo-style, ``query, key`` (N, D) requiring grad and a detached (M, D) queue
    as unpaired negatives, temperature 0.07.
    ``in_batch``: CLIP-style one-directional InfoNCE (MoCo v3's ctr), ``query, key`` (N, D)
    requiring grad, logits q_i . k_j over the batch, label i, temperature 0.07.
    ``clip``: ``fastcl.clip_loss(image, text, logit_scale)``: normalized (N, D) features and
    the scale 1/0.07 (a 0-dim tensor), all requiring grad; the ``reference`` / ``peer`` and
    ``compile`` providers are open_clip's ClipLoss formulation (``open_clip_loss``), eager
    and compiled.
    ``siglip``: ``fastcl.siglip_loss(image, text, logit_scale, logit_bias)``: normalized (N, D)
    features, scale 10 and bias -10 (open_clip's initial values; 0-dim tensors), all requiring
    grad; ``reference`` / ``peer`` and ``compile`` are open_clip's SigLipLoss formulation
    (``open_siglip_loss``), eager and compiled.
    ``supcon``: ``fastcl.supcon_loss(features, labels, 0.07)``: features (B, V=2, D), unit rows,
    requiring grad, labels ``randint(0, classes)`` (100 classes by default), temperature 0.07
    (SupContrast's; its base temperature is 0.07 too, so its factor tau / tau_base is 1);
    ``reference`` / ``peer`` and ``compile`` are SupContrast's SupConLoss formulation
    (``supcontrast_loss``: dense (V B)^2 logits and masks), eager and compiled. ``n`` is B,
    the samples (``SUPCON_N`` = 2048 by default: 4096 anchors). fastcl normalizes inside and
    SupContrast does not: on these unit rows the losses agree and the feature gradients differ
    by their radial part only (the same work either way).

Providers
    ``fastcl``: ``fastcl.nt_xent`` / ``fastcl.info_nce`` on the backend ``auto`` picks, forced,
    so that a missing toolchain fails the case instead of silently timing the chunked
    fallback: the C++ kernels on CPU, Triton on CUDA.
    ``chunked``: the same functions on fastcl's tiled PyTorch path (the fallback), for scale.
    ``peer``: the peers' own formulation, written fresh from its description: lightly's
    NTXentLoss (four (N x N) blocks, concatenated, cross-entropy) for NT-Xent, and
    info-nce-pytorch's ``info_nce`` (positive logit first, then q @ queue^T, cross-entropy) for
    the MoCo case.
    ``reference``: ``fastcl.reference`` in eager mode (stores the full similarity matrix).
    ``compile``: ``torch.compile(fastcl.reference.<loss>)`` with default options (one compiled
    object per loss, shared by every size, as in a training script: it recompiles once with
    dynamic shapes when a second size shows up).
    ``inf_cl`` (``in_batch`` only, optional): Inf-CL's ``cal_inf_loss`` (tiled Triton kernels)
    on the normalized inputs with scale 1/τ, where it can run: CUDA with the ``inf_cl`` package
    installed (``inf_cl_status``). It is not a dependency.

Modes
    ``full``: forward, then ``torch.autograd.grad`` of the loss w.r.t. every input that
    requires grad (no ``.grad`` accumulation). ``forward``: the forward alone, with grad-enabled
    inputs (what a training step pays; the graph is dropped right after).

Each step takes the next of ``N_BUFFERS`` input sets, so consecutive calls never reuse the
same (cache-warm) tensors. On CUDA each step ends with ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastcl
from fastcl import reference

HERE = os.path.dirname(os.path.abspath(__file__))

D = 128
SIZES = (256, 1024, 4096)
LARGE_SIZES = (16384,)  # fastcl only: eager would hold several (2N)^2 float32 matrices > 4 GiB
MOCO_N, MOCO_M = 256, 16384
NT_XENT_TAU = 0.1
MOCO_TAU = 0.07
N_BUFFERS = 3
IN_BATCH_TAU = 0.07
PROVIDERS = ("fastcl", "chunked", "reference", "compile", "peer")
OPTIONAL_PROVIDERS = ("inf_cl",)  # in_batch only, where inf_cl_status() says it runs
MODES = ("full", "forward", "backward")
CASES = ("nt_xent", "info_nce", "in_batch", "clip", "siglip", "supcon")
# CLIP: open_clip's learnable logit scale (the multiplier, exp of the parameter), its initial
# value 1 / 0.07; features normalized (open_clip's model does it) leaves requiring grad.
CLIP_SCALE = 1 / 0.07
# SigLIP: open_clip's initial scale (exp of ln 10) and bias, both learnable.
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
# SupCon: SupContrast's temperature (and base temperature), 2 views, 100 classes, and the
# issue's default size: 2048 samples (4096 anchors), D = 128.
SUPCON_TAU, SUPCON_VIEWS, SUPCON_CLASSES, SUPCON_N = 0.07, 2, 100, 2048
# Default sample counts of the entry points (interleaved.py, memory_probe.py) per case; the
# others default to 1024 in interleaved.py and have no default in memory_probe.py.
CASE_N = {"supcon": SUPCON_N}
# The cases whose peer formulation stands in for the reference and compile providers.
_PEER_FORMULAS = {}


def devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------ providers -------


@functools.lru_cache(maxsize=None)
def _compiled(case: str) -> Callable:
    if case in _PEER_FORMULAS:
        return torch.compile(_PEER_FORMULAS[case])
    return torch.compile(reference.nt_xent if case == "nt_xent" else reference.info_nce)


def open_clip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's ClipLoss (one process), from its description: logits = scale * image @
    text^T (+ bias) and its transpose, each a (N x N) matrix, cross-entropy against arange in
    both directions, averaged."""
    logits_per_image = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
    return (torch.nn.functional.cross_entropy(logits_per_image, labels)
            + torch.nn.functional.cross_entropy(logits_per_text, labels)) / 2


def open_siglip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's SigLipLoss (one process), from its description: logits = scale * image @
    text^T (+ bias), a (N x N) matrix, labels 2 I - 1 (a second N x N matrix),
    -sum log sigmoid(labels * logits) / N."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / n


def supcontrast_loss(features, labels=None, temperature=SUPCON_TAU,
                     base_temperature=SUPCON_TAU, contrast_mode="all", reduction="mean"):
    """SupContrast's SupConLoss.forward (one process), from its description, step by step, on
    (B, V, D) features that are already unit-norm (it does not normalize): the (V B)^2 logits
    of every view against every view / tau, shifted by their detached row max, a dense (V B)^2
    positive mask (labels equal, or the sample's own other views without labels) and one that
    takes out each anchor's own column, log-probabilities against every other column, the mean
    over each anchor's positives (their count clamped to 1 for an anchor without any), times
    -tau / tau_base, then the mean over the anchors. ``reduction="none"`` (not SupContrast's)
    returns the per-anchor losses as fastcl does, (B, V) for "all", (B,) for "one"."""
    b, v = features.shape[:2]
    device, dtype = features.device, features.dtype
    if labels is None:
        mask = torch.eye(b, dtype=dtype, device=device)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(dtype)
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, v
    anchor_dot_contrast = torch.matmul(anchor_feature, contrast_feature.T) / temperature
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, v)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(b * anchor_count, device=device).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    loss = loss.view(anchor_count, b)
    if reduction == "none":
        return loss.T if contrast_mode == "all" else loss[0]
    return loss.mean()


_PEER_FORMULAS.update(clip=open_clip_loss, siglip=open_siglip_loss, supcon=supcontrast_loss)
_FASTCL_FUNCTIONS = {"clip": "clip_loss", "siglip": "siglip_loss", "supcon": "supcon_loss"}


def _lightly_nt_xent(z1, z2, temperature):
    """lightly's NTXentLoss (one process, no memory bank), from its description."""
    b = z1.shape[0]
    z1 = torch.nn.functional.normalize(z1, dim=1)
    z2 = torch.nn.functional.normalize(z2, dim=1)
    off_diag = ~torch.eye(b, dtype=torch.bool, device=z1.device)
    l00 = (z1 @ z1.T / temperature)[off_diag].view(b, -1)
    l11 = (z2 @ z2.T / temperature)[off_diag].view(b, -1)
    l01, l10 = z1 @ z2.T / temperature, z2 @ z1.T / temperature
    logits = torch.cat([torch.cat([l01, l00], dim=1), torch.cat([l10, l11], dim=1)])
    labels = torch.arange(b, device=z1.device).repeat(2)
    return torch.nn.functional.cross_entropy(logits, labels)


def _info_nce_pytorch(query, positive_key, negative_keys, temperature):
    """info-nce-pytorch's info_nce, from its description: unpaired negatives (positive logit
    first, then q @ negatives^T, label 0) or, without negatives, the in-batch q @ k^T, label i."""
    q = torch.nn.functional.normalize(query, dim=-1)
    k = torch.nn.functional.normalize(positive_key, dim=-1)
    if negative_keys is None:
        logits = q @ k.T / temperature
        labels = torch.arange(len(logits), device=query.device)
        return torch.nn.functional.cross_entropy(logits, labels)
    n = torch.nn.functional.normalize(negative_keys, dim=-1)
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ n.T], dim=1) / temperature
    labels = torch.zeros(len(logits), dtype=torch.long, device=query.device)
    return torch.nn.functional.cross_entropy(logits, labels)


def inf_cl_status(device: str) -> Optional[str]:
    """None when Inf-CL's provider can run on ``device``, else why not."""
    if device != "cuda":
        return "Inf-CL's kernels need CUDA"
    try:
        import inf_cl  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return f"Inf-CL is not installed ({type(exc).__name__}: {exc})"[:120]
    return None


def _inf_cl_head_dim(d: int) -> int:
    """The largest head width Inf-CL accepts (256, 128, 64, 32 or 16) that divides D."""
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    raise ValueError(f"Inf-CL needs D divisible by 16, got {d}")


def _inf_cl_in_batch(query, positive_key, negative_keys, temperature):
    """In-batch InfoNCE through Inf-CL's ``cal_inf_loss``: it takes normalized rows and a
    logit scale, labels arange(N) by default, and returns the mean over the rows."""
    from inf_cl import cal_inf_loss

    if negative_keys is not None:
        raise ValueError("Inf-CL's provider runs the in-batch case only")
    q = torch.nn.functional.normalize(query, dim=-1)
    k = torch.nn.functional.normalize(positive_key, dim=-1)
    scale = torch.full((), 1.0 / temperature, dtype=torch.float32, device=query.device)
    return cal_inf_loss(q, k, scale=scale, head_dim=_inf_cl_head_dim(q.shape[1]))


def loss_fn(case: str, provider: str, device: str) -> Callable:
    """A callable taking the case's inputs (see ``make_inputs``) and returning the loss."""
    if case in _PEER_FORMULAS:
        if provider in ("fastcl", "chunked"):
            return getattr(fastcl, _FASTCL_FUNCTIONS[case])
        if provider in ("reference", "peer"):
            return _PEER_FORMULAS[case]
    if provider in ("fastcl", "chunked"):
        return fastcl.nt_xent if case == "nt_xent" else fastcl.info_nce
    if provider == "reference":
        return reference.nt_xent if case == "nt_xent" else reference.info_nce
    if provider == "compile":
        return _compiled(case)
    if provider == "peer":
        return _lightly_nt_xent if case == "nt_xent" else _info_nce_pytorch
    if provider == "inf_cl":
        if case != "in_batch":
            raise ValueError("Inf-CL's provider runs the in_batch case only")
        return _inf_cl_in_batch
    raise ValueError(f"unknown provider {provider!r}")


def backend_context(provider: str, device: str):
    """Held around a whole step (forward and backward): the backend the provider stands for."""
    if provider == "fastcl":
        return fastcl.use_backend("triton" if device == "cuda" else "cpp")
    if provider == "chunked":
        return fastcl.use_backend("chunked")
    return contextlib.nullcontext()


def backend_name(case: str, provider: str, device: str) -> str:
    """Which implementation actually runs (recorded in extra_info)."""
    if provider not in ("fastcl", "chunked"):
        return provider
    from fastcl.ops._backend import implementation

    with backend_context(provider, device):
        module = implementation(torch.empty(1, device=device))
    return module.__name__.rsplit(".", 1)[-1]


# -------------------------------------------------------------------------- inputs --------


# Input configurations: name -> (input dtype, torch.get_float32_matmul_precision during the step).
# "mixed": bf16 activations beside a float32 MoCo queue (what autocast gives a MoCo model whose
# queue buffer stays float32); other cases take it as bf16.
DTYPES = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"),
          "bf16": (torch.bfloat16, "highest"), "mixed": (torch.bfloat16, "highest")}


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision for the duration (TF32 products at "high")."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def make_inputs(
    case: str, n: int, d: int = D, m: int = MOCO_M, device: str = "cpu", seed: int = 0,
    dtype: torch.dtype = torch.float32, classes: int = SUPCON_CLASSES,
    queue_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """One input set: (arguments for the loss, the tensors gradients are taken for).
    ``m``: the queue's rows (info_nce), in ``queue_dtype`` (default: ``dtype``); ``classes``:
    the label range (supcon)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(True)

    if case == "nt_xent":
        z1, z2 = leaf(n, d), leaf(n, d)
        return (z1, z2, NT_XENT_TAU), (z1, z2)
    if case == "info_nce":
        q, k = leaf(n, d), leaf(n, d)
        queue = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
        return (q, k, queue.to(device, queue_dtype or dtype), MOCO_TAU), (q, k)
    if case == "in_batch":
        q, k = leaf(n, d), leaf(n, d)
        return (q, k, None, IN_BATCH_TAU), (q, k)
    if case == "clip":
        image, text = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
                       .to(device, dtype).requires_grad_(True) for _ in range(2))
        scale = torch.tensor(CLIP_SCALE, device=device).requires_grad_(True)
        return (image, text, scale), (image, text, scale)
    if case == "siglip":
        image, text = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
                       .to(device, dtype).requires_grad_(True) for _ in range(2))
        scale, bias = (torch.tensor(v, device=device).requires_grad_(True)
                       for v in (SIGLIP_SCALE, SIGLIP_BIAS))
        return (image, text, scale, bias), (image, text, scale, bias)
    if case == "supcon":
        features = torch.nn.functional.normalize(torch.randn(n, SUPCON_VIEWS, d, generator=g),
                                                 dim=2).to(device, dtype).requires_grad_(True)
        labels = torch.randint(0, classes, (n,), generator=g).to(device)
        return (features, labels, SUPCON_TAU), (features,)
    raise ValueError(f"unknown case {case!r}")


def step_once(fn: Callable, args, wrt, mode: str, ctx=contextlib.nullcontext):
    with ctx():
        loss = fn(*args)
        if mode == "full":
            return torch.autograd.grad(loss, wrt)
        if mode == "forward":
            return loss
    raise ValueError(f"unknown mode {mode!r}")


class Step:
    """One timed step: calls the loss (and its backward) on the next of ``N_BUFFERS`` inputs."""

    def __init__(self, case: str, provider: str, n: int, mode: str, device: str = "cpu",
                 d: int = D, m: int = MOCO_M, n_buffers: int = N_BUFFERS, config: str = "fp32",
                 classes: int = SUPCON_CLASSES):
        self.case, self.provider, self.n, self.mode, self.device = case, provider, n, mode, device
        self.fn = loss_fn(case, provider, device)
        dtype, precision = DTYPES[config]

        @contextlib.contextmanager
        def ctx():
            with backend_context(provider, device), matmul_precision(precision):
                yield

        self.ctx = ctx
        queue_dtype = torch.float32 if config == "mixed" else None
        self.buffers = [make_inputs(case, n, d, m, device, seed=s, dtype=dtype, classes=classes,
                                    queue_dtype=queue_dtype)
                        for s in range(n_buffers)]
        self.i = 0
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self):
        args, wrt = self.buffers[self.i]
        self.i = (self.i + 1) % len(self.buffers)
        out = step_once(self.fn, args, wrt, self.mode, self.ctx)
        self.sync()
        return out


def make_step(case: str, provider: str, n: int, mode: str, device: str = "cpu",
              config: str = "fp32", d: int = D, classes: int = SUPCON_CLASSES,
              m: int = MOCO_M) -> "Step":
    """A timed step of ``mode`` (full, forward, or backward: a BackwardStep) with inputs and
    matmul precision of ``config`` (a key of DTYPES); ``classes``: supcon's label range;
    ``m``: the queue's rows (info_nce)."""
    if mode == "backward":
        return BackwardStep(case, provider, n, device, d=d, m=m, config=config, classes=classes)
    return Step(case, provider, n, mode, device, d=d, m=m, config=config, classes=classes)


class BackwardStep(Step):
    """Times the backward alone: ``prepare()`` runs the forward (untimed) on the next input
    set, the call runs ``torch.autograd.grad`` of that loss."""

    def __init__(self, case: str, provider: str, n: int, device: str = "cpu", d: int = D,
                 m: int = MOCO_M, n_buffers: int = N_BUFFERS, config: str = "fp32",
                 classes: int = SUPCON_CLASSES):
        super().__init__(case, provider, n, "full", device, d, m, n_buffers, config, classes)
        self.pending = None

    def prepare(self):
        args, wrt = self.buffers[self.i]
        self.i = (self.i + 1) % len(self.buffers)
        with self.ctx():
            self.pending = (self.fn(*args), wrt)
        self.sync()

    def __call__(self):
        if self.pending is None:
            self.prepare()
        loss, wrt = self.pending
        self.pending = None
        with self.ctx():
            out = torch.autograd.grad(loss, wrt)
        self.sync()
        return out


# ---------------------------------------------------------------------------- memory ------


def cuda_peak_mib(fn: Callable[[], object]) -> float:
    """max_memory_allocated growth over one call of ``fn`` (inputs already allocated)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


# The probe's malloc settings: every block above 128 KiB is its own mmap (no dynamic threshold)
# and freed heap tops are trimmed, so memory freed before a step goes back to the OS instead
# of being reused silently by the step (which would hide part of its peak).
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def probe_memory(case: str, provider: str, n: int, d: int = D, m: int = MOCO_M,
                 device: str = "cpu", timeout: float = 600.0,
                 classes: int = SUPCON_CLASSES) -> Dict[str, object]:
    """Run ``memory_probe.py`` in a fresh interpreter; returns its JSON (peaks in MiB)."""
    cmd = [sys.executable, os.path.join(HERE, "memory_probe.py"), "--case", case,
           "--provider", provider, "--n", str(n), "--d", str(d), "--m", str(m),
           "--classes", str(classes), "--device", device]
    env = dict(os.environ, **PROBE_ENV)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"probe exited {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- machine -----


def machine_info() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:  # platform.processor() is often empty or just the architecture on Linux
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = f"{cpu} / {line.split(':', 1)[1].strip()}"
                    break
    except OSError:
        pass
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fastcl_backend": fastcl.get_backend(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:,.2f} s"
    return f"{seconds * 1e3:,.1f} ms"


def fmt_mib(mib) -> str:
    return "-" if mib is None else f"{mib:,.0f} MiB"


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])


# ------------------------------------------------------------------------ interleaving ----


def interleaved(steps, rounds, clock: str = "wall"):
    """Median seconds per provider, the providers run round-robin, start rotated per round.

    A step with a ``prepare()`` method has it called, untimed, before each timed call (the
    forward of a backward-only measurement). ``clock``: ``"wall"`` (perf_counter) or
    ``"cpu"`` (the process's CPU time, less sensitive to other processes with one thread)."""
    import time

    now = time.perf_counter if clock == "wall" else time.process_time
    names = list(steps)
    times = {name: [] for name in names}

    def run(name):
        prepare = getattr(steps[name], "prepare", None)
        if prepare is not None:
            prepare()
        t0 = now()
        steps[name]()
        return now() - t0

    for name in names:  # warm-up: compilation, first-call costs
        run(name)
        run(name)
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            times[name].append(run(name))
    return {name: median(ts) for name, ts in times.items()}, times


class Log:
    """Lines appended to a file (and printed) as they come: a report that a timeout cuts short
    keeps what it had (the GPU scripts)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" (on {os.cpu_count()} CPUs)"
    except OSError:
        return "n/a"


def ratios_args(description: str, default_rounds: int, argv=None):
    """The command line shared by the ``--ratios`` entry points of bench_ema / bench_queue."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ratios", action="store_true", required=True)
    p.add_argument("--rounds", type=int, default=default_rounds)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return p.parse_args(argv)


def print_header(title: str) -> None:
    """Date, machine and load average: the context every quoted ratio needs."""
    import datetime

    print(f"# {title}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print("# " + ", ".join(f"{k}={v}" for k, v in machine_info().items()))
    print(f"# load average at start: {loadavg()}")
