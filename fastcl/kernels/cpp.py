"""The C++ CPU kernels (``csrc/contrastive.cpp``, ``csrc/clip.cpp``, ``csrc/labels.cpp``,
``csrc/sigmoid.cpp``, ``csrc/dense.cpp``) behind the backend contract of ``fastcl.kernels``
(and SigLIP's ``sigmoid_forward`` / ``sigmoid_grad``, the same functions as the chunked and
Triton backends'): thin calls into the ``torch.ops.fastcl_cpu`` operators.

Beyond the contract, the dense path (``dense_forward``, ``dense_grad_cols``,
``dense_backward``): for in-batch passes whose logits fit ``DENSE_CAP_BYTES``, the op layer
(``fastcl.ops.contrastive``) keeps the softmax weights from forward to backward, 3 matrix
products in all instead of the tiled kernels' 4.

``precision`` is accepted for the contract's sake: the tiles' products are ATen matmuls, which
follow torch's own float32 matmul settings on the CPU, as eager PyTorch does. bfloat16 rows are
multiplied as bf16 (float32 sums; ``csrc/bf16.h``) where the build has 16-bit dot products:
``bf16_products()`` says whether, ``bf16_amx()`` whether on AMX.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastcl import _cpp

_cpp.load()
_ops = torch.ops.fastcl_cpu

# Tile edge: 128 measured fastest on a 2-core Zen 4 (see csrc/contrastive.cpp). Tests set it
# small so that small inputs cross many tile boundaries.
_TILE = 128


def bf16_products(enable: Optional[bool] = None) -> bool:
    """Whether the kernels multiply bfloat16 rows as bfloat16 (float32 sums; ``csrc/bf16.h``):
    the build targets a CPU with 16-bit dot products (AVX512-BF16) and the switch is on.
    ``enable`` sets that process-wide switch first (off: bfloat16 rows are widened to float32,
    as on a CPU without them); it cannot turn on what the build lacks."""
    return bool(_ops.bf16_products(enable))


def bf16_amx(enable: Optional[bool] = None) -> bool:
    """Whether the bf16 products run on AMX (Sapphire Rapids and later: B in the VNNI layout)
    rather than the plain layout (oneDNN's bf16 GEMM: AVX512-BF16). ``enable`` sets that
    switch first (off: the plain layout, as on a CPU without AMX)."""
    return bool(_ops.bf16_amx(enable))


def nt_xent_forward(z, nz, inv_temp: float, precision: str = "ieee",
                    positive_in_denominator: bool = True, with_dscale: bool = False):
    """(loss, lse, dscale); dscale is empty (shape (0,)) unless with_dscale."""
    return _ops.nt_xent_forward(z, nz, inv_temp, _TILE, positive_in_denominator, with_dscale)


def nt_xent_grad(z, nz, lse, g, inv_temp: float, precision: str = "ieee"):
    return _ops.nt_xent_grad(z, nz, lse, g, inv_temp, _TILE)


def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    nq: torch.Tensor,
    nk: torch.Tensor,
    positive: Optional[Tuple[torch.Tensor, torch.Tensor]],
    inv_temp: float,
    pos_offset: Optional[int],
    precision: str = "ieee",
    positive_in_denominator: bool = True,
    with_dscale: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dscale); dscale is empty (shape (0,)) unless with_dscale."""
    loss, lse, _, dscale = _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, False,
                                        positive_in_denominator, with_dscale)
    return loss, lse, dscale


def lse_forward_with_grad(q, k, nq, nk, positive, inv_temp: float, pos_offset: Optional[int],
                          precision: str = "ieee", positive_in_denominator: bool = True,
                          with_dscale: bool = False):
    """(loss, lse, dscale, v)."""
    loss, lse, v, dscale = _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, True,
                                        positive_in_denominator, with_dscale)
    return loss, lse, dscale, v


def _lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, with_grad,
                 positive_in_denominator, with_dscale):
    k_pos, n_pos = positive if positive is not None else (None, None)
    return _ops.lse_forward(q, k, nq, nk, k_pos, n_pos, inv_temp, pos_offset, with_grad, _TILE,
                            positive_in_denominator, with_dscale)


def grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp: float,
                    pos_offset: Optional[int], precision: str = "ieee") -> torch.Tensor:
    return _ops.grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, pos_offset,
                                _TILE)


# ----------------------------------------------- SupCon's label positives (csrc/labels.cpp) ---


def labels_forward(q, k, nq, nk, lq, lk, inv_temp: float, offset: int, precision: str = "ieee",
                   with_dscale: bool = False):
    """(loss, lse, dscale, count) of the label pass: rows q against columns k, row i's own
    column i + offset excluded, its positives the other columns with its label (int64 ``lq``,
    ``lk``); dscale is empty (shape (0,)) unless with_dscale."""
    return _ops.labels_forward(q, k, nq, nk, lq, lk, float(inv_temp), int(offset), _TILE,
                               with_dscale)


def labels_grad(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b, gp_b, inv_temp: float,
                offset: int, precision: str = "ieee") -> torch.Tensor:
    """inv_temp * W bhat over the label pass's pairs, the statistics (lse, ga, gp) on exactly
    one side: a's (the rows' gradient, the tiles of labels_forward(a, b)) or b's (the
    columns', the tiles of labels_forward(b, a))."""
    return _ops.labels_grad(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b, gp_b,
                            float(inv_temp), int(offset), _TILE)


def labels_sym_forward(z, nz, labels, inv_temp: float, precision: str = "ieee",
                       with_dscale: bool = False):
    """``labels_forward(z, z, nz, nz, labels, labels, inv_temp, 0)`` from the tiles on and
    above the diagonal, each feeding its rows' and its columns' statistics."""
    return _ops.labels_sym_forward(z, nz, labels, float(inv_temp), _TILE, with_dscale)


def labels_sym_grad(z, nz, labels, lse, ga, gp, inv_temp: float, precision: str = "ieee"):
    """inv_temp * (W + W^T) zhat, W_ij = ga_i exp(s_ij - lse_i) - gp_i [l_i == l_j] off the
    diagonal, from the tiles on and above it."""
    return _ops.labels_sym_grad(z, nz, labels, lse, ga, gp, float(inv_temp), _TILE)


# ------------------------------------------------------- CLIP's rows + columns (csrc/clip.cpp) ---


# CLIP's tiles: wide features (D >= _WIDE_D, CLIP's 512 and up) take _TILE_WIDE-edge tiles: fewer,
# larger BLAS products (N = 4096, D = 512, 2 threads, forward + backward: 0.39-0.44 s at 256
# against 0.41-0.44 s at 128, benchmarks/clip_kernels_probe.py); narrower ones _TILE (tests patch
# it, with D < _WIDE_D). The choice depends on the shape alone: results stay independent of
# the thread count.
_TILE_WIDE = 256
_WIDE_D = 256


def _rows_cols_tile(d: int) -> int:
    return _TILE_WIDE if d >= _WIDE_D else _TILE


def rows_cols_forward(x, y, nx, ny, inv_temp: float, precision: str = "ieee",
                      with_dscale: bool = False):
    """(loss, lse, dscale) of both softmax directions of s = inv_temp * xhat yhat^T in one pass
    over its tiles: each is [rows ; columns], length 2n (lse float64); dscale is empty (shape
    (0,)) unless with_dscale. x and y have the same shape (n, D); row i's positive is column i."""
    return _ops.rows_cols_forward(x, y, nx, ny, inv_temp, _rows_cols_tile(x.shape[1]),
                                  with_dscale)


def rows_cols_grad(x, y, nx, ny, lse, g, inv_temp: float, precision: str = "ieee"):
    """(dxhat, dyhat): inv_temp W yhat and inv_temp W^T xhat with W_ij = g_r_i exp(s_ij -
    lse_r_i) + g_c_j exp(s_ij - lse_c_j) off the diagonal (the positives' terms are the op
    layer's); lse and g are [rows ; columns] (2n), lse the forward's."""
    return _ops.rows_cols_grad(x, y, nx, ny, lse, g, inv_temp, _rows_cols_tile(x.shape[1]))


# ------------------------------------------------------------- SigLIP's pairs (csrc/sigmoid.cpp) ---


def _acc_inputs(x, y):
    """x and y as the kernels take them: float16 widened to float32; bfloat16 passed as is (the
    kernels multiply it as bf16 where the build has bf16 products, else widen it)."""
    if x.dtype == torch.float16:
        x, y = x.float(), y.float()
    return x, y


def sigmoid_forward(x, y, scale: float, bias: float, pos_offset: Optional[int],
                    with_grads: bool, precision: str = "ieee"):
    """(loss, dscale, dbias, dx, dy) of SigLIP's pairs z_ij = scale * x_i . y_j + bias, label +1
    at j = i + pos_offset (none with None or out of range), -1 elsewhere: per row the sums of
    softplus(-t z), of its derivative w in z times x_i . y_j, and of w; with ``with_grads``
    dx = scale W y and dy = scale W^T x (the gradients of the loss's sum), else both empty
    (shape (0,)). All in the accumulation dtype (float32; float64 for float64 inputs). Tiles
    as CLIP's (``_rows_cols_tile``)."""
    x, y = _acc_inputs(x, y)
    return _ops.sigmoid_forward(x, y, float(scale), float(bias), pos_offset, with_grads,
                                _rows_cols_tile(x.shape[1]))


def sigmoid_grad(x, y, scale: float, bias: float, pos_offset: Optional[int], g,
                 need_rows: bool, need_cols: bool, precision: str = "ieee"):
    """(dx, dy) = (scale (g o W) y, scale (g o W)^T x), W the pairs' weights recomputed as in
    :func:`sigmoid_forward`, g per row; one not needed comes back empty (shape (0,))."""
    x, y = _acc_inputs(x, y)
    return _ops.sigmoid_grad(x, y, float(scale), float(bias), pos_offset, g, need_rows,
                             need_cols, _rows_cols_tile(x.shape[1]))


# ----------------------------------------------------------- dense path (csrc/dense.cpp) ------

# The largest logits matrix the dense path materializes: n_rows * n_cols * element size (4 bytes
# in float32, 8 in float64). Within it, the softmax weights P are kept from forward to backward
# and forward + backward is 3 matrix products (eager's count) instead of the tiled kernels' 4;
# beyond it, the tiled kernels run and memory stays O((n + m) D). 16 MiB is 2048 x 2048 float32
# logits; the op layer (fastcl.ops.contrastive) reads this at each call (tests patch it).
DENSE_CAP_BYTES = 16 * 2**20


def dense_fits(n_rows: int, n_cols: int, dtype: torch.dtype) -> bool:
    """Whether an (n_rows x n_cols) logits matrix of ``dtype`` accumulation fits the cap."""
    size = 8 if dtype == torch.float64 else 4
    return n_rows * n_cols * size <= DENSE_CAP_BYTES


def dense_forward(q, k, nq, nk, inv_temp: float, pos_offset: Optional[int],
                  positive_in_denominator: bool = True, with_dscale: bool = False,
                  with_row_grad: bool = True):
    """``lse_forward_with_grad`` on the materialized logits: (loss, lse, dscale, v, probs),
    probs the (n x m) softmax weights P = exp(s - lse) with the positive's entries 0, kept for
    :func:`dense_grad_cols`; v empty without ``with_row_grad``. ``nq`` / ``nk`` may be empty
    (of the accumulation dtype): the kernel then computes the norms itself (max(|x|, eps),
    as F.normalize) in its normalization pass."""
    return _ops.dense_forward(q, k, nq, nk, inv_temp, pos_offset, positive_in_denominator,
                              with_dscale, with_row_grad)


def dense_grad_cols(probs, g, q, nq, inv_temp: float) -> torch.Tensor:
    """The columns' gradient direction inv_temp * (g o P)^T qhat (positive pairs skipped):
    ``grad_accumulate`` of the columns, from the forward's own weights."""
    return _ops.dense_grad_cols(probs, g, q, nq, inv_temp)


def dense_backward(probs, v, g, c, q, k, nq, nk, inv_temp: float, need_rows: bool,
                   need_cols: bool):
    """(dq, dk) of an in-batch pass (positive of row i: column i) in the inputs' dtypes, from
    the forward's v and probs: d qhat = g v + c khat and d khat = :func:`dense_grad_cols` + c
    qhat (c the positive pairs' weights times the scale), each through the normalization's
    backward. One not needed comes back empty. Empty ``nq`` / ``nk``: computed here, as in
    :func:`dense_forward`."""
    return _ops.dense_backward(probs, v, g, c, q, k, nq, nk, inv_temp, need_rows, need_cols)


# ----------------------------------------------------------------------- momentum -------------


def ema_(targets, sources, momentum: torch.Tensor) -> None:
    _ops.ema_(targets, sources, momentum.to("cpu", torch.float64))


def queue_push_(queue, ptr, keys) -> None:
    _ops.queue_push_(queue, ptr, keys)


# fastcl.queue_push_'s eager fast path (fastcl.ops.momentum.try_eager_cpu_push): the checks, the
# version-counter bumps and the push in one dispatcher call; False when an argument fails them.
# The overload's C++ callable where torch exposes it (OpOverload.__call__ is one Python frame
# more, about 6 us with cold caches).
_push_eager = _ops.queue_push_eager_.default
queue_push_eager_ = getattr(_push_eager, "_op", _push_eager)


# ----------------------------------------------------------------------- BYOL's cosine loss ----


def cosine_forward(p, z):
    return _ops.cosine_forward(p, z)


def cosine_backward(g, p, z, stats):
    return _ops.cosine_backward(g, p, z, stats)
