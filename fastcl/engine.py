"""One engine for every pairwise-similarity loss: the contract between the losses and the backends.

Every softmax-family loss is one tiled pass over rows R (n x D) and columns C (m x D) with
logits s_ij = scale * rhat_i . chat_j (rows and columns L2-normalized inside), differing only in
a few choices, written once as a :class:`Spec` that the backends read:

=========================  ==================================================  ===================
choice                     values                                              used by
=========================  ==================================================  ===================
``columns``                ``"rows"`` (C = R), ``"tensor"`` (a second tensor)  NT-Xent, DCL / the rest
``others`` (call argument)  other ranks' rows appended to the columns,         ``distributed=True``
                           negatives only
scale (call argument)      a 0-dim tensor with a gradient, or a Python float   learnable tau, CLIP
``exclude_self``           the diagonal left out (``columns="rows"``)          NT-Xent, DCL, SupCon
``positive``               ``"none"``, ``"offset"`` (i <-> i + n/2 of C = R),  -, NT-Xent, in-batch
                           ``"index"`` (column i), ``"key"`` (one explicit     InfoNCE, MoCo,
                           key per row), ``"labels"`` (columns of the row's    SupCon
                           label but its own)
``positive_in_denominator``  the positive in the row's logsumexp or not         InfoNCE family / DCL
``normalize``              rows and columns L2-normalized inside (True) or     all above / CLIP
                           used as given (False: the op passes norms of ones)
``epilogue``               ``"softmax_rows"``; ``"softmax_rows_cols"`` (both   all above; CLIP;
                           directions in one pass); ``"sigmoid"`` (per pair)    SigLIP
=========================  ==================================================  ===================

``"softmax_rows_cols"`` (CLIP) reads a second tensor with the index positive (``columns=
"tensor"``, ``positive="index"``, n = m): row i's loss lr_i = lse_j(s_ij) - s_ii and column j's
lc_j = lse_i(s_ij) - s_jj, from one pass over the tiles; the per-row outputs (loss, lse,
dscale) have length 2n, [rows ; columns]. Other ranks' rows are not a choice of that epilogue:
the distributed CLIP loss runs two row passes (:data:`CLIP_ROWS`), images against texts and
texts against images.

``"sigmoid"`` (SigLIP, :data:`SIGLIP`): every pair is its own binary problem, z_ij = scale *
r_i . c_j + bias (features as given), label +1 for the positive (column i + ``pos_offset``,
where that column exists) and -1 elsewhere; row i's loss is sum_j softplus(-t_ij z_ij). No
row statistic couples the pairs, so one pass gives the loss and, per row, d loss_i / d scale
= sum_j w_ij r_i . c_j and d loss_i / d bias = sum_j w_ij (w = d loss / d z); when the loss is
summed (``reduce=True``), the same pass forms both inputs' gradients (three products for
forward + backward; the backward multiplies them by the upstream scalar). Per-row losses
(``reduce=False``) get a backward that recomputes the logits. The ops are
``fastcl.ops.sigmoid``'s. Other ranks' texts are not ``others`` here: the distributed loss
passes every rank's texts as the columns and ``pos_offset`` = this rank's first row.

Per-row statistics a softmax pass returns: the loss l_i = lse_i - s_pos_i, the lse (float64),
and on request ``dscale`` = d l_i / d scale = sum_j (p_ij - y_ij) (rhat_i . chat_j), on the raw
cosines, which is all the scale's gradient needs (``fastcl.kernels`` documents the backends'
side of the contract). A learnable temperature is scale = 1 / tau through autograd.

Backends declare which choices they support (:data:`BACKENDS`); the reference (dense PyTorch,
``fastcl.reference``) is one of them, chosen with ``FASTCL_BACKEND=reference``, and the
distributed losses pass the other ranks' rows through the same ops as ``others``. A new loss is
a public function, a Spec, a reference and tests. Choices marked planned are part of the
contract but not implemented by any backend yet: asking for them raises ``NotImplementedError``
naming the choice.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

COLUMNS = ("rows", "tensor")
POSITIVES = ("none", "offset", "index", "key", "labels")
EPILOGUES = ("softmax_rows", "softmax_rows_cols", "sigmoid")


@dataclass(frozen=True)
class Spec:
    """The choices of one tiled pass (see the module docstring). Immutable and hashable."""

    columns: str = "tensor"
    positive: str = "index"
    exclude_self: bool = False
    positive_in_denominator: bool = True
    epilogue: str = "softmax_rows"
    normalize: bool = True

    def __post_init__(self):
        for name, allowed in (("columns", COLUMNS), ("positive", POSITIVES),
                              ("epilogue", EPILOGUES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Spec.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.positive == "offset" and self.columns != "rows":
            raise ValueError("Spec: positive='offset' pairs row i with row i + n/2 of the rows "
                             "themselves: it needs columns='rows'")
        if self.exclude_self and self.columns != "rows" and self.positive != "labels":
            # (label positives: the rows are a block of the columns, at the call's offset)
            raise ValueError("Spec: exclude_self needs columns='rows' (or positive='labels')")
        if self.positive == "labels" and not self.exclude_self:
            raise ValueError("Spec: positive='labels' excludes each row's own column: it needs "
                             "exclude_self=True")
        if self.positive == "labels" and (self.epilogue != "softmax_rows"
                                          or not self.positive_in_denominator):
            raise ValueError("Spec: positive='labels' is a softmax_rows pass with the "
                             "positives in the denominator")
        if self.columns == "rows" and not self.exclude_self:
            raise ValueError("Spec: a softmax over the rows themselves must exclude_self")
        if not self.positive_in_denominator and self.positive == "none":
            raise ValueError("Spec: positive_in_denominator=False needs a positive")
        for name in ("exclude_self", "positive_in_denominator", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Spec.{name} must be a bool, got {getattr(self, name)!r}")

    def code(self) -> str:
        """The string form the custom ops take (torch.library schemas have no dataclasses)."""
        if torch.compiler.is_compiling():  # traced once; dynamo warns about lru_cache wrappers
            return _code.__wrapped__(self)
        return _code(self)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def parse(code: str) -> "Spec":
        kwargs = {}
        for part in code.split(","):
            name, _, value = part.partition("=")
            kwargs[name] = bool(int(value)) if name in _BOOL_FIELDS else value
        return Spec(**kwargs)


@functools.lru_cache(maxsize=None)
def _code(spec: Spec) -> str:  # cached: called at every loss call
    return ",".join(f"{f.name}={int(v) if isinstance(v, bool) else v}"
                    for f in fields(spec) for v in [getattr(spec, f.name)])


_BOOL_FIELDS = ("exclude_self", "positive_in_denominator", "normalize")


# Today's losses, as rows of choices.
NT_XENT = Spec(columns="rows", positive="offset", exclude_self=True)
DCL = Spec(columns="rows", positive="offset", exclude_self=True, positive_in_denominator=False)
IN_BATCH = Spec(columns="tensor", positive="index")
QUEUE = Spec(columns="tensor", positive="key")
# CLIP (open_clip's ClipLoss): features used as given, both softmax directions in one pass.
CLIP = Spec(columns="tensor", positive="index", normalize=False, epilogue="softmax_rows_cols")
# SupCon (SupContrast's SupConLoss) with contrast_mode="all": every view of every sample is an
# anchor against all the others; the positives are the other rows of the same label.
SUPCON = Spec(columns="rows", positive="labels", exclude_self=True)
# The same with the rows a block of the columns (at the call's offset): contrast_mode="one"
# (view 0 against every view) and the distributed loss (local rows against every rank's).
SUPCON_ROWS = Spec(columns="tensor", positive="labels", exclude_self=True)
# One direction of CLIP (its distributed form: two row passes with other ranks' columns).
CLIP_ROWS = Spec(columns="tensor", positive="index", normalize=False)
# SigLIP (open_clip's SigLipLoss): a sigmoid per pair, features used as given.
SIGLIP = Spec(columns="tensor", positive="index", normalize=False, epilogue="sigmoid")


@dataclass(frozen=True)
class Backend:
    """A backend's declaration: the values of each choice it implements."""

    name: str
    columns: frozenset = frozenset(COLUMNS)
    positive: frozenset = frozenset(("none", "offset", "index", "key"))
    exclude_self: frozenset = frozenset((False, True))
    positive_in_denominator: frozenset = frozenset((False, True))
    epilogue: frozenset = frozenset(("softmax_rows",))
    normalize: frozenset = frozenset((True, False))
    others: bool = True

    def unsupported(self, spec: Spec, others: bool = False) -> Optional[str]:
        """None if this backend runs ``spec``, else the first choice it lacks, in words."""
        for f in fields(spec):
            value = getattr(spec, f.name)
            if value not in getattr(self, f.name):
                return f"{f.name}={value!r}"
        if spec.epilogue == "softmax_rows_cols":
            # The one combination of that epilogue the contract has (module docstring).
            for name, wanted in _ROWS_COLS_CHOICES:
                if getattr(spec, name) != wanted:
                    return f"epilogue='softmax_rows_cols' with {name}={getattr(spec, name)!r}"
            if others:
                return "epilogue='softmax_rows_cols' with other ranks' rows as columns"
        if spec.epilogue == "sigmoid":
            for name, wanted in _SIGMOID_CHOICES:
                if getattr(spec, name) != wanted:
                    return f"epilogue='sigmoid' with {name}={getattr(spec, name)!r}"
            if others:
                return ("epilogue='sigmoid' with other ranks' rows as negatives-only columns "
                        "(pass them as columns, with pos_offset)")
        if spec.positive == "labels" and others:
            return ("positive='labels' with other ranks' rows as negatives-only columns (pass "
                    "every rank's rows as the columns, with the rows' offset)")
        if others and not self.others:
            return "other ranks' rows as columns"
        return None


_ROWS_COLS_CHOICES = (("columns", "tensor"), ("positive", "index"), ("exclude_self", False),
                      ("positive_in_denominator", True))
# The sigmoid epilogue's one combination: SigLIP's features used as given, the positive at
# column i + pos_offset.
_SIGMOID_CHOICES = (("columns", "tensor"), ("positive", "index"), ("exclude_self", False),
                    ("positive_in_denominator", True), ("normalize", False))

# The registry. "cpp", "chunked" and "triton" run the custom ops (fastcl.ops.contrastive);
# "reference" is the dense PyTorch oracle, differentiable to any order. Every backend runs
# normalize=False (the op layer passes norms of ones to the kernels); the both-directions
# epilogue needs a backend's rows_cols_forward / rows_cols_grad, the sigmoid epilogue its
# sigmoid_forward / sigmoid_grad (fastcl.kernels).
_ALL_EPILOGUES = frozenset(EPILOGUES)
_ALL_POSITIVES = frozenset(POSITIVES)
BACKENDS = {"reference": Backend("reference", epilogue=_ALL_EPILOGUES, positive=_ALL_POSITIVES),
            "chunked": Backend("chunked", epilogue=_ALL_EPILOGUES, positive=_ALL_POSITIVES),
            "cpp": Backend("cpp", epilogue=_ALL_EPILOGUES, positive=_ALL_POSITIVES),
            "triton": Backend("triton", epilogue=_ALL_EPILOGUES, positive=_ALL_POSITIVES)}


@functools.lru_cache(maxsize=None)
def _unsupported(spec: Spec, backend: str, others: bool) -> Optional[str]:
    return BACKENDS[backend].unsupported(spec, others)


def require(spec: Spec, backend: str, others: bool = False) -> None:
    """Raise ``NotImplementedError`` naming the choice ``backend`` lacks for ``spec``."""
    missing = (_unsupported.__wrapped__ if torch.compiler.is_compiling() else _unsupported)(
        spec, backend, others)
    if missing is not None:
        raise NotImplementedError(
            f"fastcl backend {backend!r} does not implement {missing} (spec {spec.code()}) yet")


# ---------------------------------------------------------------------------- the scale ----


def check_temperature(temperature, name: str = "temperature"):
    """A temperature as the losses accept it: a positive finite real number (returned as a
    Python float; NumPy scalars converted; symbolic floats under torch.compile pass through),
    or a one-element floating tensor, possibly requiring grad (returned as a 0-dim view). A
    CPU tensor is checked for a finite value > 0 (no sync: it is on the host), except while
    compiling; a tensor on an accelerator is never read on the host, so it is not checked."""
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point() or temperature.numel() != 1:
            raise TypeError(f"{name} must be a float or a one-element floating tensor, got a "
                            f"{temperature.dtype} tensor of shape {tuple(temperature.shape)}")
        t = temperature.reshape(())
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(t.detach())
            if not 0.0 < value < math.inf:
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        return t
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        import numbers

        if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
            temperature = float(temperature)  # np.float32, np.int64, ...
        else:
            raise TypeError(f"{name} must be a Python float or a one-element tensor, got "
                            f"{type(temperature).__name__}")
    # One chained comparison (False for NaN) rather than math.isfinite, which torch.compile
    # cannot trace for a symbolic float.
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {temperature}")
    return float(temperature) if isinstance(temperature, int) else temperature


def scale_of(temperature, like: Tensor) -> Tensor:
    """The 0-dim scale tensor 1 / temperature that the ops take.

    A Python float gives a float64 CPU tensor (read by the kernels as a double, no device
    tensor, no recompile per value under torch.compile: the product keeps a symbolic float
    symbolic). A tensor gives 1 / tau in float64 through autograd (its gradient flows back to
    tau in tau's dtype), on ``like``'s device: a CPU tensor beside CUDA inputs is copied
    without a sync."""
    if isinstance(temperature, Tensor):
        return scale_tensor(temperature, like).reciprocal()
    return scale_tensor(1.0 / temperature, like)


# ------------------------------------------------------------------------------ running ----


def scale_tensor(scale, like: Tensor) -> Tensor:
    """The 0-dim scale tensor the ops take, from a multiplier given directly (CLIP's
    ``logit_scale``): a Python float gives a float64 CPU tensor; a tensor is cast to float64
    through autograd on ``like``'s device (a CPU tensor beside CUDA inputs copied without a
    sync). :func:`scale_of` is this of 1 / temperature."""
    if isinstance(scale, Tensor):
        t = scale
        if t.device != like.device:
            t = t.to(like.device, non_blocking=True)
        return t.to(torch.float64)
    return torch.ones((), dtype=torch.float64, device="cpu") * scale


def run(spec: Spec, rows: Tensor, cols: Optional[Tensor] = None, key: Optional[Tensor] = None,
        others: Optional[Tensor] = None, *, temperature=None, scale=None) -> Tensor:
    """The per-row losses l_i = lse_i - s_pos_i of ``spec`` (float32; float64 for float64
    inputs), differentiable with respect to every tensor input and to a tensor temperature.

    ``rows`` (n, D); ``cols`` (m, D) unless ``columns="rows"``; ``key`` (n, D) for
    ``positive="key"``; ``others`` (r, D) the other ranks' rows, negatives only. Inputs of one
    floating dtype (``fastcl.functional`` promotes mixed ones). The logits' multiplier is
    1 / ``temperature``, or ``scale`` itself when given instead (a float or a 0-dim tensor,
    possibly requiring grad: CLIP's ``logit_scale``). With ``epilogue="softmax_rows_cols"``
    the result has 2n entries: the n row losses, then the n column losses. The backend is
    ``fastcl.get_backend()``: the reference computes the dense formula; the others run the
    fused custom ops.
    """
    from fastcl import _config, ops, reference

    if (temperature is None) == (scale is None):
        raise TypeError("engine.run takes exactly one of temperature= and scale=")
    backend = _config.get_backend()
    if spec.epilogue == "sigmoid":
        if backend in BACKENDS:  # "auto" resolves per tensor, in the ops
            require(spec, backend, others is not None)
        raise TypeError("the sigmoid epilogue runs through engine.run_sigmoid")
    if spec.positive == "labels":
        if backend in BACKENDS:
            require(spec, backend, others is not None)
        raise TypeError("label positives run through engine.run_labels")
    if spec.positive == "index" and cols is not None and cols.shape[0] != rows.shape[0]:
        raise ValueError(f"positive='index' pairs row i with column i: rows and columns must "
                         f"have the same count, got {rows.shape[0]} and {cols.shape[0]}")
    if backend == "reference":
        require(spec, "reference", others is not None)
        if spec.epilogue == "softmax_rows_cols":
            return reference.softmax_rows_cols(spec, rows, cols, temperature, scale)
        return reference.softmax_rows(spec, rows, cols, key, others, temperature, scale)
    a = scale_of(temperature, rows) if scale is None else scale_tensor(scale, rows)
    grad_on = torch.is_grad_enabled()
    need_dscale = grad_on and a.requires_grad
    # The rows' gradient is formed in the forward tile pass when it will be needed (one
    # product fewer), except with other ranks' columns (their statistics merge afterwards)
    # and for the both-directions epilogue (its backward is one pass for both gradients).
    need_row_grad = (grad_on and rows.requires_grad and spec.columns == "tensor"
                     and others is None and spec.epilogue == "softmax_rows")
    return ops.contrastive.run(rows, cols, others, key, a, spec.code(), need_row_grad,
                               need_dscale, backend)[0]


def run_sigmoid(spec: Spec, rows: Tensor, cols: Tensor, *, scale, bias=None,
                pos_offset: int = 0, reduce: bool = False) -> Tensor:
    """The sigmoid epilogue (SigLIP; module docstring): the per-row losses sum_j softplus(-t_ij
    z_ij), z = ``scale`` * rows @ cols^T + ``bias``, t_ij = +1 for j = i + ``pos_offset`` and -1
    elsewhere (float32; float64 for float64 inputs), or, with ``reduce``, their sum (a 0-dim
    tensor whose forward also forms both inputs' gradients when they will be needed).
    Differentiable with respect to ``rows``, ``cols`` and tensor ``scale`` / ``bias`` (floats,
    or 0-dim tensors possibly requiring grad; ``bias`` None means 0). ``rows`` (n, D), ``cols``
    (m, D) of one floating dtype; any m (the distributed loss passes every rank's texts)."""
    from fastcl import _config, ops, reference

    if spec.epilogue != "sigmoid":
        raise TypeError(f"engine.run_sigmoid runs the sigmoid epilogue, got {spec.code()}")
    backend = _config.get_backend()
    bias = 0.0 if bias is None else bias
    if backend == "reference":
        require(spec, "reference")
        rows_loss = reference.sigmoid_pairs(rows, cols, scale, bias, pos_offset)
        return rows_loss.sum() if reduce else rows_loss
    a, b = scale_tensor(scale, rows), scale_tensor(bias, rows)
    need_grads = (reduce and torch.is_grad_enabled()
                  and (rows.requires_grad or cols.requires_grad))
    return ops.sigmoid.run(rows, cols, a, b, spec.code(), pos_offset, reduce, need_grads,
                           backend)


def run_labels(spec: Spec, rows: Tensor, cols: Optional[Tensor] = None, *, row_labels: Tensor,
               col_labels: Optional[Tensor] = None, offset: int = 0, temperature=None,
               scale=None) -> Tensor:
    """The per-row losses of a label-positive pass (``positive="labels"``: SupCon): l_i =
    lse_i - mean of row i's positive logits, 0 for a row without a positive (float32;
    float64 for float64 inputs), differentiable with respect to ``rows``, ``cols`` and a
    tensor temperature / scale.

    ``spec.columns="rows"`` (:data:`SUPCON`): the rows are their own columns, ``row_labels``
    (n,) int64 theirs. ``"tensor"`` (:data:`SUPCON_ROWS`): ``cols`` (m, D) with
    ``col_labels`` (m,), the rows being ``cols[offset:offset + n]`` (row i's own column, left
    out). The positives of row i: the other columns with its label."""
    from fastcl import _config, ops, reference

    if (temperature is None) == (scale is None):
        raise TypeError("engine.run_labels takes exactly one of temperature= and scale=")
    if spec.positive != "labels":
        raise TypeError(f"engine.run_labels runs label-positive passes, got {spec.code()}")
    n = rows.shape[0]
    if spec.columns == "rows":
        if cols is not None or col_labels is not None or offset != 0:
            raise TypeError("columns='rows': no cols, col_labels or offset")
    elif cols is None or col_labels is None or not 0 <= offset <= cols.shape[0] - n:
        raise ValueError("columns='tensor' needs cols and col_labels, with the rows at "
                         "cols[offset:offset + n]")
    backend = _config.get_backend()
    if backend == "reference":
        require(spec, "reference")
        a = 1.0 / temperature if scale is None else scale
        c, lc = (rows, row_labels) if spec.columns == "rows" else (cols, col_labels)
        return reference.label_pairs(rows, c, row_labels, lc, a, offset, spec.normalize)[0]
    a = scale_of(temperature, rows) if scale is None else scale_tensor(scale, rows)
    need_dscale = torch.is_grad_enabled() and a.requires_grad
    return ops.labels.label_rows(rows, cols, row_labels, col_labels, a, spec.code(), offset,
                                 need_dscale, backend)[0]
