"""Triton kernels for normalized similarity + log-softmax (NT-Xent / InfoNCE), and launchers.

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton reads it when
the ``@triton.jit`` functions below are defined. ``fastcl.ops`` imports it lazily.
See ``fastcl.kernels`` for the contract (version 2).

Forward (``_lse_fwd_kernel`` + ``_combine_kernel``): flash-decoding. The grid is
(row blocks, column splits): program (i, s) owns BLOCK_M rows and the columns
[s * cols_per_split, (s + 1) * cols_per_split), walks them in BLOCK_N tiles with an online
(max m, sum l, centred sum t) per row, and writes that partial state; ``_combine_kernel`` merges
the partials of each row in split order (a fixed order: deterministic) and writes loss, lse and
dscale. With one split the forward kernel finishes the rows itself (one launch). The split count
comes from the shape and the GPU's SM count only (``split_plan``), never from the autotuned
tile sizes: a MoCo batch of 256 rows against 65,536 queue keys is 4 row blocks x 128 splits.
While D is small enough (``d_tiling``: bf16/fp16 D <= 128, TF32 D <= 64) the row tile is
loaded (and normalized) once, before the column loop; above, and always for float32 IEEE dots
(FMA chains that hold their operands in registers), the logits are reduced over BLOCK_D chunks
of D. The limits are measured: with ptxas for sm_90, a resident bf16 row tile of D = 256 spills
2-4 KB per thread (so does TF32 at D = 128), and the FMA dot spills from 32-wide chunks up.
A positive given as rows (POS_ROWS, MoCo's) is computed before the column loop and waits in its
output slot (the row's loss, or its partial-state plane) until the loop ends: held in registers,
ptxas spilled it across the loop (16-32 B).

Backward (``_grad_kernel``): the same (row blocks, column splits) grid, no atomics: each split
writes its partial rows and ``_sum_splits_kernel`` adds them in split order (so the dq of a MoCo
batch against its queue fills the machine too). Each column tile's logits
are computed once over the full D; with a resident row tile one BLOCK_M x D accumulator takes
W @ B and the column tile loaded for the logits serves the second product too; above, it loops over
D chunks of its own output rows in global memory (read, add W @ B_chunk, write: the rows are
the program's alone, so this is deterministic; a barrier orders the read after the write).
The column-side gradients (dk, dneg) are the same kernel with the roles swapped.

Rows are L2-normalized on the fly: the kernels take raw rows plus one float32 norm per row.
float32 rows are divided by their norms as each tile is loaded (NORM_TILES), which rounds like
eager PyTorch's F.normalize-then-matmul; bf16/fp16 tiles go to the matrix units raw and the
float32 products are scaled, s_ij = (q_i . k_j) * ((1/|q_i| * 1/|k_j|) * inv_temp).

The scale ``inv_temp`` is a Python float or a 0-dim float32/float64 tensor on the inputs'
device, read inside the kernels (SCALE_PTR): no host sync. Either way it is rounded to float32
once, so both forms give the same bits.

exp vs exp2 (``EXP2``): natural exp, by measurement. With EXP2 = True the kernels fold log2(e)
into the scale, alpha2 = inv_temp * log2(e) (one float32 product, the same in every kernel),
work in base-2 units with exp2, and convert loss, lse and dscale back at the end (lse in float64;
the backward converts it back to base 2 in float64 and keeps its exp2((s - hi) - lo) trick).
It is implemented and correct, but at low temperature it breaks the 2x-eager rule: the rounding
of alpha2 shifts every logit of size 1/tau by up to an ulp (eager's own logits do not carry
it), and base-2 logits are 1.44x larger (often an ulp twice as large). Measured under the
interpreter (float32, tests/test_temperature.py's inputs plus a 33 x 32 case, worst of the
seeds, error against float64 / eager float32's error):
    tau = 1e-3  exp : loss 1.28, grads <= 1.82      exp2: loss 1.81, grads up to 3.68
                      (queue grad 1.25e-4 vs eager 3.4e-5; NT-Xent grad 8.96e-5 vs 3.24e-5)
    tau = 1e-4  exp : loss 1.37, grads <= 1.89      exp2: loss 1.04, grads <= 1.89
So EXP2 is False. What it would save is small anyway: on the GPU tl.exp is ex2.approx(x * log2 e),
so exp2 saves one multiply per logit next to the D-long dot product that made it. The flag stays
so that a GPU run can measure both.

Low temperature: the row lse is stored in float64 and the backward exponentiates
(s - hi) - lo with lse = hi + lo (hi its nearest float32); each logit in the backward must be the
very float the forward's lse saw. On the GPU the float32 IEEE dot is a sequential FMA chain over
D (a . b and b . a are the same float, whatever the tile shape), so forward and backward agree
whatever tile sizes the autotuner picked. The interpreter's tl.dot is numpy's BLAS matmul, whose
per-element rounding depends on the element's place in the tile, so under the interpreter
(SUM_DOT) the logits are an elementwise product summed over D (same sum for (a, b) and
(b, a)); the D chunking (BLOCK_D) is the same in every kernel in both modes. bf16/fp16 logits
come from the matrix units: that identity is claimed only where tested on a device.

Autotuning (``triton.autotune``, on CUDA only): configs ``FWD_CONFIGS`` / ``GRAD_CONFIGS``,
keyed on D, the dtypes and the code-path constexprs; ``prune_configs`` keeps those within a
register and shared-memory budget and with BLOCK_N = ``block_n(d, dtype, kind)``. BLOCK_N is
not tuned because it sets the order of the online row reductions: with it fixed by (kind, D,
dtype), the autotuner's pick (by timing, so possibly different per process) changes no float32
result: the configs it picks from differ only in the pipeline depth.
The configs are those that compile without spills on sm_80, sm_89 and sm_90 (``_TUNE``,
``_stages``; the AOT check compiles them with the JIT's specializations): BLOCK_M = 64 with 8
warps, BLOCK_N 64 (128 only in bf16/fp16 forwards at D <= 64: in the backward it spilled 16 B),
and the pipeline depths that fit each tiling class:

    class (D chunk)                       forward stages   backward stages
    float32 IEEE (FMA, BLOCK_D 16)        2                2
    TF32, D <= 64 (BLOCK_D = D)           2, 3             2, 3   (rows stream: see below)
    TF32, D > 64 (BLOCK_D 32)             3                2, 3
    bf16/fp16, D <= 128 (resident)        2, 3             2, 3
    bf16/fp16, D > 128 (BLOCK_D 64)       2, 3             1

(4 stages spilled 8 B in some forwards; more stages than these spill 8-52 B on some
architecture.) The TF32 backward keeps its rows resident only up to D = 32
(``TF32_GRAD_RESIDENT_MAX_D``; at D = 64 the resident form spilled 16-184 B on sm_80): above,
it streams them in the forward's BLOCK_D, so its logits are the forward's very dots.
Autotuning benchmarks on the first call per key (host syncs): do a warm-up call outside CUDA-graph capture. Under the
interpreter one small fixed config is used (``INTERPRETER_TILES``). ``aot_variants()`` lists
every (kernel, signature, constexprs, options) that can run, for the ahead-of-time compile test.

CLIP's rows+columns pass (``rows_cols_forward``, ``rows_cols_grad``; x, y of the same n):
the forward is one pass over the n x n logits for both directions. ``_rows_cols_fwd_kernel``
runs on (row groups x column splits) programs (``rows_cols_plan``: about PROGRAMS_PER_SM per
SM); each walks its row blocks, and for each the column tiles of its split, and feeds every
logit tile to the row block's online state (as ``_lse_fwd_kernel``; row partials per split)
and to the tile's column statistics over the block's rows (max, sum, centred sum over
axis 0), which it merges into its group's running column state in global memory (its own
columns of its own plane: read, merge, write, in row-block order; no atomics).
``_combine_rows_cols_kernel`` merges rows over splits and columns over groups in a fixed
order. Each logit is exponentiated twice (centred on its row's and on its column's running
max): at D = 512 in bf16 that is about half the tensor-core time of the tile's product on an
H100 (MUFU ex2 vs HMMA rates), the price of one pass. The positive s_ii is the tile's own
float, in both denominators. BLOCK_M / BLOCK_N are fixed per (D, dtype) (the autotuner picks
only the depth), so the column merge order is fixed. The backward is two ``_grad_kernel``
passes (row-owned dx, column-owned dy; see ``rows_cols_grad`` for why not one), which for
bf16/fp16 at 128 < D <= 512 keep 32-row tiles and their accumulators resident
(``rows_cols_grad_meta``) instead of streaming D through global memory.

SupCon's label positives (``labels_*``; launchers in ``triton_labels``, re-exported here) are
the HAS_LABELS form of ``_lse_fwd_kernel`` / ``_combine_kernel`` / ``_grad_kernel``: int64
labels loaded with the row block and with each column tile and compared inside the tile, row
i's own column i + offset excluded (no modulo: the columns' pass gives a negative offset), the
positives' logit sum (float64 across tiles) and count added to the row state and to the split
partials (a count plane after t), finished by ``_finish_labels``; in the backward W gets
- gp [same label] inside the tile, and an lse of -inf (a row without any column) weighs 0. The
forms without labels compile exactly as before (the flag is a constexpr; the new pointer
arguments are unused dummies there).

Offsets that multiply a row index by a stride, and partial-state offsets, are int64.
Launches run under ``torch.cuda.device(tensor.device)``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

# exp, not exp2: exp2 with log2(e) folded into the scale breaks the 2x-eager rule at tau = 1e-3
# (see the module docstring for the measurement).
EXP2 = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

RESIDENT_MAX_D = 128          # GPU, bf16/fp16: D up to this keeps the row tile resident
CHUNK_D = 64                  # GPU, bf16/fp16: D chunk above it
TF32_RESIDENT_MAX_D = 64      # GPU, float32 with TF32 dots
TF32_CHUNK_D = 32
TF32_GRAD_RESIDENT_MAX_D = 32  # GPU backward, TF32: D = 64 streams, in one BLOCK_D = 64 chunk
FMA_CHUNK_D = 16              # GPU, float32 IEEE (FMA) dots: never resident
INTERPRETER_TILES = dict(BLOCK_M=32, BLOCK_N=32)
INTERPRETER_RESIDENT_MAX_D = 64
INTERPRETER_CHUNK_D = 32
SPLIT_ALIGN = 128             # GPU: columns per split are a multiple of every BLOCK_N
MIN_SPLIT_COLUMNS = 512       # GPU: at least this many columns per split
PROGRAMS_PER_SM = 4
INTERPRETER_SPLIT_COLUMNS = 64
# Tests: force the columns per split (rounded up to a multiple of BLOCK_N); None = the plan.
SPLIT_COLUMNS: Optional[int] = None
INTERPRETER_GROUP_ROWS = 64   # the rows+columns forward: rows per program (2 row blocks)
RC_GRAD_RESIDENT_MAX_D = 512  # GPU, bf16/fp16: CLIP's backward keeps 32-row tiles resident
# Tests: force the rows+columns forward's rows per program (as given); None = the plan.
RC_GROUP_ROWS: Optional[int] = None
COMBINE_BLOCK = 128
SUM_BLOCK = 1024
PARTIAL_BYTES = 64 << 20      # GPU backward: the split partial rows' budget


# ----------------------------------------------------------------------------- helpers ----


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the Triton interpreter (3.9) computes bf16 tl.dot wrongly, so under
    it bf16 operands are widened to float32 first (exact: bf16 values are float32 values)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _ldot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SUM_DOT: tl.constexpr):
    """acc + a @ b^T for the logits (a: rows x D chunk, b: columns x D chunk). SUM_DOT (the
    interpreter): a sum of elementwise products, the same float for (a, b) and (b, a)."""
    if SUM_DOT:
        return acc + tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], 2)
    return _dot(a, tl.trans(b), acc, PRECISION, UPCAST)


@triton.jit
def _wdot(w, b, acc, CAST_W: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + W @ B (the gradient's second product); bf16 casts W to B's dtype."""
    if CAST_W:
        return _dot(w.to(b.dtype), b, acc, PRECISION, UPCAST)
    return tl.dot(w, b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _exp(x, EXP2: tl.constexpr):
    if EXP2:
        return tl.exp2(x)
    return tl.exp(x)


@triton.jit
def _load_scale(SCALE, scale_val, SCALE_PTR: tl.constexpr, EXP2: tl.constexpr):
    """(inv_temp, the logits' scale) in float32: the scale is inv_temp * log2(e) with EXP2."""
    if SCALE_PTR:
        inv_temp = tl.load(SCALE).to(tl.float32)
    else:
        inv_temp = tl.full([], scale_val, tl.float32)
    if EXP2:
        scale = inv_temp * 1.4426950408889634
    else:
        scale = inv_temp
    return inv_temp, scale


@triton.jit
def _scale_logits(acc, na, nb, scale, NORM_TILES: tl.constexpr):
    if NORM_TILES:  # the rows were normalized before the product
        s = acc * scale
    else:
        # (1/na_a * 1/nb_b) first: the same product for (a, b) and (b, a).
        s = acc * (((1.0 / na)[:, None] * (1.0 / nb)[None, :]) * scale)
    return s


@triton.jit
def _load_rows(X, rows64, row_ok, dd, d, stride_m, stride_d, norm, NORM_TILES: tl.constexpr):
    x = tl.load(X + rows64[:, None] * stride_m + dd[None, :].to(tl.int64) * stride_d,
                mask=row_ok[:, None] & (dd[None, :] < d), other=0.0)
    if NORM_TILES:
        x = x / norm[:, None]
    return x


@triton.jit
def _logit_tile(
    A, B, rows64, cols64, row_ok, col_ok, na, nb, d,
    stride_am, stride_ad, stride_bm, stride_bd, scale,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, NORM_TILES: tl.constexpr,
    SUM_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits of one tile with D reduced in BLOCK_D chunks (D above the resident size)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start_d in range(0, d, BLOCK_D):
        dd = start_d + offs_d
        a_tile = _load_rows(A, rows64, row_ok, dd, d, stride_am, stride_ad, na, NORM_TILES)
        b_tile = _load_rows(B, cols64, col_ok, dd, d, stride_bm, stride_bd, nb, NORM_TILES)
        acc = _ldot(a_tile, b_tile, acc, PRECISION, UPCAST, SUM_DOT)
    return _scale_logits(acc, na, nb, scale, NORM_TILES)


@triton.jit
def _add_pair(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _merge(m, l, t, m2, l2, t2, EXP2: tl.constexpr):
    """Merge two online states (m, l, t) of the same rows; an empty state is (-inf, 0, 0).
    t is centred on m: t = sum exp(s - m) (s - m)."""
    m_new = tl.maximum(m, m2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a1 = _exp(m - m_safe, EXP2)
    a2 = _exp(m2 - m_safe, EXP2)
    d1 = tl.where(m == float("-inf"), 0.0, m - m_safe)
    d2 = tl.where(m2 == float("-inf"), 0.0, m2 - m_safe)
    t_new = a1 * (t + d1 * l) + a2 * (t2 + d2 * l2)
    l_new = l * a1 + l2 * a2
    return m_new, l_new, t_new


@triton.jit
def _finish(m, l, t, s_pos, inv_temp, rows, row_ok, LOSS, LSE, DSCALE,
            WITH_DSCALE: tl.constexpr, EXP2: tl.constexpr, BLOCK: tl.constexpr):
    """loss = (m - s_pos) + log l (exact when the positive is the max), lse = m + log l in
    float64, dscale = (t / l + (m - s_pos)) / inv_temp; converted to natural units with EXP2."""
    l = tl.where(row_ok, l, 1.0)  # padding rows: no log(0) (their results are not stored)
    if EXP2:
        log_l = tl.log2(l)
        loss = ((m - s_pos) + log_l) * 0.6931471805599453
        ln2 = tl.full([BLOCK], 0.6931471805599453, tl.float64)
        lse = (m.to(tl.float64) + log_l.to(tl.float64)) * ln2
    else:
        log_l = tl.log(l)
        loss = (m - s_pos) + log_l
        lse = m.to(tl.float64) + log_l.to(tl.float64)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)
    if WITH_DSCALE:
        ds = t / l + (m - s_pos)
        if EXP2:
            ds = ds * 0.6931471805599453
        tl.store(DSCALE + rows, ds / inv_temp, mask=row_ok)


@triton.jit
def _finish_labels(m, l, t, sp, cnt, inv_temp, rows, row_ok, LOSS, LSE, DSCALE, COUNT,
                   WITH_DSCALE: tl.constexpr, EXP2: tl.constexpr, BLOCK: tl.constexpr):
    """The label positives' finish (``labels_forward``): with the mean positive logit sp / cnt
    (sp the sum of the positive logits, each the very float the max and sum saw),
    loss = (m - sp / cnt) + log l, lse = m + log l (float64; -inf for a row without any
    column), dscale = (t / l + (m - sp / cnt)) / inv_temp; loss = dscale = 0 where cnt = 0.
    m - sp / cnt is formed in float64 (exact 0 when the one positive is the max)."""
    has = cnt > 0.0
    # Padding rows and rows without any column (m = -inf, so lse = -inf below): no log(0).
    l = tl.where(row_ok & (l > 0.0), l, 1.0)
    gap = (m.to(tl.float64) - sp.to(tl.float64) / tl.where(has, cnt, 1.0).to(tl.float64))
    gap = gap.to(tl.float32)
    if EXP2:
        log_l = tl.log2(l)
        loss = (gap + log_l) * 0.6931471805599453
        ln2 = tl.full([BLOCK], 0.6931471805599453, tl.float64)
        lse = (m.to(tl.float64) + log_l.to(tl.float64)) * ln2
    else:
        log_l = tl.log(l)
        loss = gap + log_l
        lse = m.to(tl.float64) + log_l.to(tl.float64)
    tl.store(LOSS + rows, tl.where(has, loss, 0.0), mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(COUNT + rows, cnt, mask=row_ok)
    if WITH_DSCALE:
        ds = t / l + gap  # a row without a positive: 0 below
        if EXP2:
            ds = ds * 0.6931471805599453
        tl.store(DSCALE + rows, tl.where(has, ds / inv_temp, 0.0), mask=row_ok)


# ----------------------------------------------------------------------------- forward ----


@triton.jit
def _lse_fwd_kernel(
    Q, K, NQ, NK, KP, NP, SCALE, PART, LOSS, LSE, DSCALE, LQ, LK, COUNT,
    n_q, n_k, d, pos_offset, cols_per_split, n_splits,
    stride_qm, stride_qd, stride_km, stride_kd, stride_pm, stride_pd,
    scale_val,
    SCALE_PTR: tl.constexpr,
    POS_ROWS: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
    POS_IN_COLUMNS: tl.constexpr,
    POS_IN_DENOM: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    WITH_DSCALE: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    RESIDENT: tl.constexpr,
    EXP2: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NORM_TILES: tl.constexpr,
    SUM_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    inv_temp, scale = _load_scale(SCALE, scale_val, SCALE_PTR, EXP2)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(n_k, col_start + cols_per_split)

    # Row norms (clamped at eps, so never 0; 1.0 in padding rows).
    nq = tl.load(NQ + rows, mask=row_ok, other=1.0)
    # Online state: max m, sum l of exp(s - m), centred t = sum exp(s - m) (s - m).
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    if HAS_LABELS:
        # Label positives (SupCon): row i's own column i + pos_offset is excluded; s_pos sums
        # the logits of the columns with the row's label (float64 across tiles), cnt counts
        # them (exact below 2^24).
        lq = tl.load(LQ + rows, mask=row_ok, other=0)
        s_pos = tl.zeros([BLOCK_M], tl.float64)
        cnt = tl.zeros([BLOCK_M], tl.float32)
    else:
        s_pos = tl.zeros([BLOCK_M], tl.float32)  # stays 0 without a positive: loss = lse
    if RESIDENT:  # the row tile, loaded and normalized once
        q_tile = _load_rows(Q, rows64, row_ok, offs_d, d, stride_qm, stride_qd, nq, NORM_TILES)
    if POS_ROWS:
        # Row i's positive is KP[i], scaled exactly as the tiles are. Split 0 owns it.
        n_p = tl.load(NP + rows, mask=row_ok, other=1.0)
        if RESIDENT:
            p_tile = _load_rows(KP, rows64, row_ok, offs_d, d, stride_pm, stride_pd, n_p,
                                NORM_TILES)
            dot_pos = tl.sum(q_tile.to(tl.float32) * p_tile.to(tl.float32), 1)
        else:
            dot_pos = tl.zeros([BLOCK_M], tl.float32)
            for start_d in range(0, d, BLOCK_D):
                dd = start_d + offs_d
                q_part = _load_rows(Q, rows64, row_ok, dd, d, stride_qm, stride_qd, nq,
                                    NORM_TILES)
                p_part = _load_rows(KP, rows64, row_ok, dd, d, stride_pm, stride_pd, n_p,
                                    NORM_TILES)
                dot_pos += tl.sum(q_part.to(tl.float32) * p_part.to(tl.float32), 1)
        if NORM_TILES:
            sp = dot_pos * scale
        else:
            sp = dot_pos * (((1.0 / nq) * (1.0 / n_p)) * scale)
        first = pid_s == 0
        if POS_IN_DENOM:  # it starts the state: m = s_pos, l = 1, t = 0
            m = tl.where(first, sp, m)
            l = tl.where(first, l + 1.0, l)
        if POS_IN_COLUMNS:  # the column loop adds to it
            s_pos = tl.where(first, sp, 0.0)
        else:
            # Unused in the column loop, s_pos waits in its output slot (the row's loss, or its
            # partial-state plane) rather than in registers, which ptxas spilled across the
            # loop (16-32 B); read back after the loop (and a barrier), in the same layout.
            if ONE_SPLIT:
                pos_slot = LOSS + rows
            else:
                pos_slot = PART + 2 * (tl.full([], n_splits, tl.int64) * n_q) \
                    + tl.full([], pid_s, tl.int64) * n_q + rows64
            tl.store(pos_slot, tl.where(first, sp, 0.0), mask=row_ok)
    if POS_IN_COLUMNS:
        pos_col = (rows + pos_offset) % n_k

    for start_n in range(col_start, col_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < col_end
        cols64 = cols.to(tl.int64)
        nk = tl.load(NK + cols, mask=col_ok, other=1.0)
        if RESIDENT:
            k_tile = _load_rows(K, cols64, col_ok, offs_d, d, stride_km, stride_kd, nk,
                                NORM_TILES)
            acc = _ldot(q_tile, k_tile, tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                        PRECISION, UPCAST, SUM_DOT)
            s = _scale_logits(acc, nq, nk, scale, NORM_TILES)
        else:
            s = _logit_tile(Q, K, rows64, cols64, row_ok, col_ok, nq, nk, d,
                            stride_qm, stride_qd, stride_km, stride_kd, scale,
                            PRECISION, UPCAST, NORM_TILES, SUM_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = col_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        if HAS_LABELS:
            valid = valid & (cols[None, :] != rows[:, None] + pos_offset)
            lk = tl.load(LK + cols, mask=col_ok, other=0)
            is_lab = valid & (lq[:, None] == lk[None, :])
            if SUM_DOT or PRECISION == "ieee":
                # The interpreter (its tl.reduce with a combine function is slow) and the
                # float32 FMA dot: two sums.
                sp_t = tl.sum(tl.where(is_lab, s, 0.0), 1)
                cnt_t = tl.sum(is_lab.to(tl.float32), 1)
            else:
                # Matrix-unit dots: one reduction for the positives' sum and count. As two,
                # the count (independent of the logits) was scheduled apart and held the label
                # tiles across the product (ptxas, sm_90, D = 128: 169 registers for bf16
                # instead of 112, 180 for TF32 instead of 128). The FMA dot keeps two sums:
                # paired, ptxas capped its one-split form at 128 registers and spilled 8 B
                # (two sums: 194-196 registers, no spill).
                sp_t, cnt_t = tl.reduce((tl.where(is_lab, s, 0.0), is_lab.to(tl.float32)), 1,
                                        _add_pair)
            s_pos += sp_t.to(tl.float64)
            cnt += cnt_t
        if POS_IN_COLUMNS:
            is_pos = (cols[None, :] == pos_col[:, None]) & col_ok[None, :]
            s_pos += tl.sum(tl.where(is_pos, s, 0.0), 1)
            if not POS_IN_DENOM:
                valid = valid & (~is_pos)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row whose every logit so far is excluded keeps m = -inf; shift by 0 there.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m - m_safe, EXP2)
        p = _exp(s - m_safe[:, None], EXP2)
        if WITH_DSCALE:
            # Masked entries (p = 0, s - m = -inf) add 0, never 0 * -inf.
            centred = p * tl.where(valid, s - m_safe[:, None], 0.0)
            dm = tl.where(m == float("-inf"), 0.0, m - m_safe)
            t = alpha * (t + dm * l) + tl.sum(centred, 1)
        l = l * alpha + tl.sum(p, 1)
        m = m_new

    if POS_ROWS:
        if not POS_IN_COLUMNS:
            tl.debug_barrier()
            s_pos = tl.load(pos_slot, mask=row_ok, other=0.0)
    if ONE_SPLIT:
        if HAS_LABELS:
            _finish_labels(m, l, t, s_pos, cnt, inv_temp, rows, row_ok, LOSS, LSE, DSCALE,
                           COUNT, WITH_DSCALE, EXP2, BLOCK_M)
        else:
            _finish(m, l, t, s_pos, inv_temp, rows, row_ok, LOSS, LSE, DSCALE,
                    WITH_DSCALE, EXP2, BLOCK_M)
    else:
        plane = tl.full([], n_splits, tl.int64) * n_q
        off = tl.full([], pid_s, tl.int64) * n_q + rows64
        tl.store(PART + off, m, mask=row_ok)
        tl.store(PART + plane + off, l, mask=row_ok)
        if POS_IN_COLUMNS or not POS_ROWS:  # else it is there already
            tl.store(PART + 2 * plane + off, s_pos.to(tl.float32), mask=row_ok)
        if WITH_DSCALE:
            tl.store(PART + 3 * plane + off, t, mask=row_ok)
        if HAS_LABELS:  # the count's plane follows: 3, or 4 with dscale
            if WITH_DSCALE:
                tl.store(PART + 4 * plane + off, cnt, mask=row_ok)
            else:
                tl.store(PART + 3 * plane + off, cnt, mask=row_ok)


@triton.jit
def _merge_partials(PART, n_parts, n, idx64, ok, HAS_POS: tl.constexpr, T_PLANE: tl.constexpr,
                    WITH_DSCALE: tl.constexpr, EXP2: tl.constexpr, BLOCK: tl.constexpr):
    """(m, l, t, s_pos) of entries idx: the n_parts partial states in PART (planes of n_parts x
    n floats: m, l, then s_pos when HAS_POS, t at plane T_PLANE with WITH_DSCALE) merged in
    part order (deterministic); s_pos summed (one part holds it, the others 0)."""
    plane = tl.full([], n_parts, tl.int64) * n
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    s_pos = tl.zeros([BLOCK], tl.float32)
    for p in range(0, n_parts):
        off = tl.full([], p, tl.int64) * n + idx64
        m_p = tl.load(PART + off, mask=ok, other=float("-inf"))
        l_p = tl.load(PART + plane + off, mask=ok, other=0.0)
        if HAS_POS:
            s_pos += tl.load(PART + 2 * plane + off, mask=ok, other=0.0)
        if WITH_DSCALE:
            t_p = tl.load(PART + T_PLANE * plane + off, mask=ok, other=0.0)
        else:
            t_p = tl.zeros([BLOCK], tl.float32)
        m, l, t = _merge(m, l, t, m_p, l_p, t_p, EXP2)
    return m, l, t, s_pos


@triton.jit
def _combine_kernel(
    PART, SCALE, LOSS, LSE, DSCALE, COUNT, n_q, n_splits, scale_val,
    SCALE_PTR: tl.constexpr, WITH_DSCALE: tl.constexpr, HAS_LABELS: tl.constexpr,
    EXP2: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge each row's partial states in split order (deterministic) and finish the row
    (HAS_LABELS: with the label positives' sum and count, the count summed in split order)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)
    inv_temp, _scale = _load_scale(SCALE, scale_val, SCALE_PTR, EXP2)
    m, l, t, s_pos = _merge_partials(PART, n_splits, n_q, rows64, row_ok, True, 3, WITH_DSCALE,
                                     EXP2, BLOCK)
    if HAS_LABELS:
        plane = tl.full([], n_splits, tl.int64) * n_q
        if WITH_DSCALE:
            cnt_part = PART + 4 * plane
        else:
            cnt_part = PART + 3 * plane
        cnt = tl.zeros([BLOCK], tl.float32)
        for p in range(0, n_splits):
            cnt += tl.load(cnt_part + tl.full([], p, tl.int64) * n_q + rows64, mask=row_ok,
                           other=0.0)
        _finish_labels(m, l, t, s_pos, cnt, inv_temp, rows, row_ok, LOSS, LSE, DSCALE, COUNT,
                       WITH_DSCALE, EXP2, BLOCK)
    else:
        _finish(m, l, t, s_pos, inv_temp, rows, row_ok, LOSS, LSE, DSCALE, WITH_DSCALE, EXP2,
                BLOCK)


# ------------------------------------------------------- rows and columns (CLIP) forward ----


@triton.jit
def _rows_cols_fwd_kernel(
    X, Y, NX, NY, SCALE, RPART, CPART,
    n, d, rows_per_group, cols_per_split, n_splits, n_groups,
    stride_xm, stride_xd, stride_ym, stride_yd,
    scale_val,
    SCALE_PTR: tl.constexpr,
    WITH_DSCALE: tl.constexpr,
    RESIDENT: tl.constexpr,
    EXP2: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NORM_TILES: tl.constexpr,
    SUM_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Both softmax directions of s_ij = scale * xhat_i . yhat_j from one pass over the tiles.

    Grid (row groups, column splits): program (g, s) owns rows [g * rows_per_group, ...) and
    columns [s * cols_per_split, ...). For each of its BLOCK_M row blocks (in order) it walks its
    columns in BLOCK_N tiles; each logit tile feeds
    - the row block's online state (max m, sum l, centred t, positive s_ii), written at the end
      of the block to RPART[., s, rows] (the layout of ``_combine_kernel``'s partials: planes m,
      l, s_pos, t of n_splits * n each);
    - the tile's column statistics over the block's rows, merged into the group's running column
      state CPART[., g, cols] (planes m, l, t of n_groups * n each): read, merge, write. The
      columns of split s in plane g are this program's alone and its row blocks merge in order,
      so this is deterministic without atomics; a barrier orders each row block's writes before
      the next block's reads.
    ``_combine_rows_cols_kernel`` then merges the rows over splits and the columns over groups.
    """
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_g * rows_per_group
    row_hi = tl.minimum(n, row_lo + rows_per_group)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(n, col_start + cols_per_split)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    inv_temp, scale = _load_scale(SCALE, scale_val, SCALE_PTR, EXP2)
    rplane = tl.full([], n_splits, tl.int64) * n
    cplane = tl.full([], n_groups, tl.int64) * n
    rbase = tl.full([], pid_s, tl.int64) * n
    cbase = tl.full([], pid_g, tl.int64) * n

    for start_m in range(row_lo, row_hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < row_hi
        rows64 = rows.to(tl.int64)
        nx = tl.load(NX + rows, mask=row_ok, other=1.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        t = tl.zeros([BLOCK_M], tl.float32)
        s_pos = tl.zeros([BLOCK_M], tl.float32)
        if RESIDENT:  # the row tile, loaded (and normalized) once per row block
            x_tile = _load_rows(X, rows64, row_ok, offs_d, d, stride_xm, stride_xd, nx,
                                NORM_TILES)
        # The group's first row block starts the column state (its reads are masked off).
        not_first = (tl.zeros([BLOCK_N], tl.int32) + start_m) != row_lo
        for start_n in range(col_start, col_end, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < col_end
            cols64 = cols.to(tl.int64)
            ny = tl.load(NY + cols, mask=col_ok, other=1.0)
            if RESIDENT:
                y_tile = _load_rows(Y, cols64, col_ok, offs_d, d, stride_ym, stride_yd, ny,
                                    NORM_TILES)
                acc = _ldot(x_tile, y_tile, tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                            PRECISION, UPCAST, SUM_DOT)
                s = _scale_logits(acc, nx, ny, scale, NORM_TILES)
            else:
                s = _logit_tile(X, Y, rows64, cols64, row_ok, col_ok, nx, ny, d,
                                stride_xm, stride_xd, stride_ym, stride_yd, scale,
                                PRECISION, UPCAST, NORM_TILES, SUM_DOT, BLOCK_M, BLOCK_N,
                                BLOCK_D)
            valid = row_ok[:, None] & col_ok[None, :]
            # The positive pair (i, i) is in both denominators; its logit is taken from the
            # tile, the very float both maxima saw.
            s_pos += tl.sum(tl.where(valid & (rows[:, None] == cols[None, :]), s, 0.0), 1)
            s = tl.where(valid, s, float("-inf"))

            # Rows: the online update of _lse_fwd_kernel.
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = _exp(m - m_safe, EXP2)
            p = _exp(s - m_safe[:, None], EXP2)
            if WITH_DSCALE:
                centred = p * tl.where(valid, s - m_safe[:, None], 0.0)
                dm = tl.where(m == float("-inf"), 0.0, m - m_safe)
                t = alpha * (t + dm * l) + tl.sum(centred, 1)
            l = l * alpha + tl.sum(p, 1)
            m = m_new

            # Columns: this tile's statistics over the block's rows, merged into the state.
            mc = tl.max(s, 0)
            mc_safe = tl.where(mc == float("-inf"), 0.0, mc)
            pc = _exp(s - mc_safe[None, :], EXP2)
            lc = tl.sum(pc, 0)
            if WITH_DSCALE:
                tc = tl.sum(pc * tl.where(valid, s - mc_safe[None, :], 0.0), 0)
            else:
                tc = tl.zeros([BLOCK_N], tl.float32)
            c_off = cbase + cols64
            c_rd = col_ok & not_first
            m_o = tl.load(CPART + c_off, mask=c_rd, other=float("-inf"))
            l_o = tl.load(CPART + cplane + c_off, mask=c_rd, other=0.0)
            if WITH_DSCALE:
                t_o = tl.load(CPART + 2 * cplane + c_off, mask=c_rd, other=0.0)
            else:
                t_o = tl.zeros([BLOCK_N], tl.float32)
            m_c, l_c, t_c = _merge(m_o, l_o, t_o, mc, lc, tc, EXP2)
            tl.store(CPART + c_off, m_c, mask=col_ok)
            tl.store(CPART + cplane + c_off, l_c, mask=col_ok)
            if WITH_DSCALE:
                tl.store(CPART + 2 * cplane + c_off, t_c, mask=col_ok)

        r_off = rbase + rows64
        tl.store(RPART + r_off, m, mask=row_ok)
        tl.store(RPART + rplane + r_off, l, mask=row_ok)
        tl.store(RPART + 2 * rplane + r_off, s_pos, mask=row_ok)
        if WITH_DSCALE:
            tl.store(RPART + 3 * rplane + r_off, t, mask=row_ok)
        tl.debug_barrier()  # the next row block reads the column state this one wrote


@triton.jit
def _combine_rows_cols_kernel(
    RPART, CPART, SCALE, LOSS, LSE, DSCALE, n, n_splits, n_groups, scale_val,
    SCALE_PTR: tl.constexpr, WITH_DSCALE: tl.constexpr, EXP2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Index i: row i's partials merged over the column splits in split order, column i's over
    the row groups in group order (deterministic); both finished with the positive logit
    s_ii (the sum of the row's s_pos planes: one split holds it, the others 0). Writes
    LOSS/LSE/DSCALE[i] (rows) and [n + i] (columns)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    idx64 = idx.to(tl.int64)
    inv_temp, _scale = _load_scale(SCALE, scale_val, SCALE_PTR, EXP2)
    m, l, t, s_pos = _merge_partials(RPART, n_splits, n, idx64, ok, True, 3, WITH_DSCALE, EXP2,
                                     BLOCK)
    _finish(m, l, t, s_pos, inv_temp, idx, ok, LOSS, LSE, DSCALE, WITH_DSCALE, EXP2, BLOCK)
    m, l, t, _ = _merge_partials(CPART, n_groups, n, idx64, ok, False, 2, WITH_DSCALE, EXP2,
                                 BLOCK)
    _finish(m, l, t, s_pos, inv_temp, idx, ok, LOSS + n, LSE + n, DSCALE + n, WITH_DSCALE,
            EXP2, BLOCK)


# ---------------------------------------------------------------------------- backward ----


@triton.jit
def _split_lse(lse, EXP2: tl.constexpr, BLOCK: tl.constexpr):
    """A float64 lse (natural units) as (hi, lo), float32, in the logits' units: hi the nearest
    float, lo the rest."""
    if EXP2:
        lse = lse * tl.full([BLOCK], 1.4426950408889634, tl.float64)
    hi = lse.to(tl.float32)
    return hi, (lse - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _split_lse_safe(lse, EXP2: tl.constexpr, BLOCK: tl.constexpr):
    """``_split_lse`` with (0, 0) for lse = -inf (a row without any column: all its logits are
    masked to -inf, so exp(-inf - 0) = 0 there, never exp(-inf - -inf) = NaN)."""
    return _split_lse(tl.where(lse == float("-inf"), 0.0, lse), EXP2, BLOCK)


@triton.jit
def _grad_kernel(
    A, B, NA, NB, LSE_A, G_A, LSE_B, G_B, LA, LB, GP_A, GP_B, SCALE, OUT,
    n_a, n_b, d, pos_offset, cols_per_split,
    stride_am, stride_ad, stride_bm, stride_bd, stride_om,
    scale_val,
    SCALE_PTR: tl.constexpr,
    USE_A: tl.constexpr,
    USE_B: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
    POS_IN_COLUMNS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CAST_W: tl.constexpr,
    RESIDENT: tl.constexpr,
    EXP2: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NORM_TILES: tl.constexpr,
    SUM_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """OUT[s, a, :] = inv_temp * sum_b W_ab * bhat_b over all of D, b in column split s; grid
    (row blocks, column splits). With one split OUT is the result; with several, the launcher
    sums the splits' partial rows in split order (``_sum_splits_kernel``).
    HAS_LABELS (``labels_grad``): the pair (a, a + pos_offset) is excluded (no modulo; the
    offset may be negative) and W_ab gets - gp [la_a == lb_b] from each side whose statistics
    are given (GP_A by row, GP_B by column); an lse of -inf weighs 0."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(n_b, col_start + cols_per_split)
    OUT = OUT + tl.full([], pid_s, tl.int64) * n_a * stride_om  # this split's partial rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_a
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    inv_temp, scale = _load_scale(SCALE, scale_val, SCALE_PTR, EXP2)

    na = tl.load(NA + rows, mask=row_ok, other=1.0)
    if POS_IN_COLUMNS:
        pos_col = (rows + pos_offset) % n_b
    if HAS_LABELS:
        la = tl.load(LA + rows, mask=row_ok, other=0)
        if USE_A:
            hi_a, lo_a = _split_lse_safe(tl.load(LSE_A + rows, mask=row_ok, other=0.0), EXP2,
                                         BLOCK_M)
            g_a = tl.load(G_A + rows, mask=row_ok, other=0.0)
            gp_a = tl.load(GP_A + rows, mask=row_ok, other=0.0)
    elif USE_A:
        hi_a, lo_a = _split_lse(tl.load(LSE_A + rows, mask=row_ok, other=0.0), EXP2, BLOCK_M)
        g_a = tl.load(G_A + rows, mask=row_ok, other=0.0)

    if RESIDENT:
        a_tile = _load_rows(A, rows64, row_ok, offs_d, d, stride_am, stride_ad, na, NORM_TILES)
        out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    else:
        # This program's output rows accumulate in OUT itself: zero them first.
        for start_d in range(0, d, BLOCK_D):
            dd = start_d + offs_d
            tl.store(OUT + rows64[:, None] * stride_om + dd[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                     mask=row_ok[:, None] & (dd[None, :] < d))
        tl.debug_barrier()

    for start_n in range(col_start, col_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < col_end
        cols64 = cols.to(tl.int64)
        nb = tl.load(NB + cols, mask=col_ok, other=1.0)
        if RESIDENT:
            b_tile = _load_rows(B, cols64, col_ok, offs_d, d, stride_bm, stride_bd, nb,
                                NORM_TILES)
            acc = _ldot(a_tile, b_tile, tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                        PRECISION, UPCAST, SUM_DOT)
            s = _scale_logits(acc, na, nb, scale, NORM_TILES)
        else:
            s = _logit_tile(A, B, rows64, cols64, row_ok, col_ok, na, nb, d,
                            stride_am, stride_ad, stride_bm, stride_bd, scale,
                            PRECISION, UPCAST, NORM_TILES, SUM_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])
        if POS_IN_COLUMNS:
            valid = valid & (cols[None, :] != pos_col[:, None])
        if HAS_LABELS:
            valid = valid & (cols[None, :] != rows[:, None] + pos_offset)
            lb = tl.load(LB + cols, mask=col_ok, other=0)
            same = valid & (la[:, None] == lb[None, :])
        # Skipped entries get exp(-inf) = 0 (an excluded diagonal logit can exceed its row's
        # lse by ~2/tau, so exponentiating it first would overflow).
        s = tl.where(valid, s, float("-inf"))
        w = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # exp((s - hi) - lo): s - hi is exact wherever the weight is not negligible.
        if USE_A:
            w += g_a[:, None] * _exp((s - hi_a[:, None]) - lo_a[:, None], EXP2)
        if USE_B:
            if HAS_LABELS:
                hi_b, lo_b = _split_lse_safe(tl.load(LSE_B + cols, mask=col_ok, other=0.0),
                                             EXP2, BLOCK_N)
            else:
                hi_b, lo_b = _split_lse(tl.load(LSE_B + cols, mask=col_ok, other=0.0), EXP2,
                                        BLOCK_N)
            g_b = tl.load(G_B + cols, mask=col_ok, other=0.0)
            w += g_b[None, :] * _exp((s - hi_b[None, :]) - lo_b[None, :], EXP2)
        if HAS_LABELS:  # the positives' term, - gp [same label], inside the tile
            if USE_A:
                w -= tl.where(same, gp_a[:, None], 0.0)
            if USE_B:
                w -= tl.where(same, tl.load(GP_B + cols, mask=col_ok, other=0.0)[None, :],
                              0.0)
        w = w * inv_temp
        if not NORM_TILES:  # the raw column rows are the second product's operand
            w = w / nb[None, :]
        if RESIDENT:  # the tile loaded for the logits serves the second product too
            out = _wdot(w, b_tile, out, CAST_W, PRECISION, UPCAST)
        else:
            for start_d in range(0, d, BLOCK_D):
                dd = start_d + offs_d
                d_ok = dd < d
                b_part = _load_rows(B, cols64, col_ok, dd, d, stride_bm, stride_bd, nb,
                                    NORM_TILES)
                o_ptr = OUT + rows64[:, None] * stride_om + dd[None, :]
                o_mask = row_ok[:, None] & d_ok[None, :]
                o = tl.load(o_ptr, mask=o_mask, other=0.0)
                tl.store(o_ptr, _wdot(w, b_part, o, CAST_W, PRECISION, UPCAST), mask=o_mask)
            tl.debug_barrier()  # the next tile reads what this one wrote

    if RESIDENT:
        tl.store(OUT + rows64[:, None] * stride_om + offs_d[None, :], out,
                 mask=row_ok[:, None] & (offs_d[None, :] < d))


@triton.jit
def _sum_splits_kernel(PART, OUT, numel, n_splits, BLOCK: tl.constexpr):
    """OUT = sum over s of PART[s] (numel values each), in split order: deterministic."""
    offs = tl.full([], tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], tl.float32)
    for sp in range(0, n_splits):
        acc += tl.load(PART + tl.full([], sp, tl.int64) * numel + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc, mask=mask)


# --------------------------------------------------------------- tiles, configs, tuning ----


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def d_tiling(d: int, on_cuda: bool, dtype: torch.dtype = torch.bfloat16,
             precision: str = "ieee") -> Tuple[bool, int]:
    """(RESIDENT, BLOCK_D) for feature size d: the same in every kernel (the logits' D
    chunking must not differ between forward and backward). On the GPU the resident limit
    depends on what the dot runs on (measured with ptxas, sm_90: spills beyond these): bf16/fp16
    matrix units up to D = 128 (D = 256 spills 2-4 KB at BLOCK_M = 64), TF32 up to 64; the
    float32 IEEE dot is an FMA chain that holds its operands in registers, so it always streams
    D in chunks of 16."""
    if not on_cuda:
        max_d, chunk = INTERPRETER_RESIDENT_MAX_D, INTERPRETER_CHUNK_D
    elif dtype == torch.float32 and precision == "ieee":
        max_d, chunk = 0, FMA_CHUNK_D
    elif dtype == torch.float32:
        max_d, chunk = TF32_RESIDENT_MAX_D, TF32_CHUNK_D
    else:
        max_d, chunk = RESIDENT_MAX_D, CHUNK_D
    if d <= max_d:
        return True, _pow2(d, 16, max_d)
    return False, chunk


def block_n(d: int, dtype: torch.dtype, kind: str = "fwd") -> int:
    """BLOCK_N on the GPU: fixed by (D, dtype), not tuned (it orders the row reductions). 128
    only for half types at D <= 64 in the forward; the backward keeps 64 (128 spilled: fp16
    8-24 B, bf16 NT-Xent 16 B on sm_89 / sm_90 at every depth). The rows+columns forward
    ("rc") follows the forward (its 64 x 128 half tiles: no spills, at most 244 registers, on
    sm_89 at depth 3)."""
    if kind not in ("fwd", "rc"):
        return 64
    return 128 if dtype in (torch.bfloat16, torch.float16) and d <= 64 else 64


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); prune_configs keeps the BLOCK_N of block_n() and
# the stages of _stages().
# Measured with ptxas for sm_90 (Triton 3.9; the heaviest variants: dscale, positives, splits):
# with 4 warps every kernel spills (16 B to 2.4 KB) at BLOCK_M = 64, and BLOCK_M = 128 spills
# with 8 warps too (32 B to 1.6 KB) in most (dtype, D) classes; BLOCK_M = 64 with 8 warps
# spills nowhere, and BLOCK_N = 128 only for bf16/fp16 forwards at D <= 64 (108 B at D = 128).
# So the tuned dimension is the pipeline depth, over the tiles that fit; which depths fit
# depends on the tiling class and the architecture (see _stages).
_TUNE = [(64, 64, 8, 1), (64, 64, 8, 2), (64, 64, 8, 3),
         (64, 128, 8, 1), (64, 128, 8, 2), (64, 128, 8, 3)]
FWD_CONFIGS: List[triton.Config] = [_cfg(*c) for c in _TUNE]
GRAD_CONFIGS: List[triton.Config] = [_cfg(*c) for c in _TUNE]
# CLIP's backward for bf16/fp16 at RESIDENT_MAX_D < D <= RC_GRAD_RESIDENT_MAX_D (see
# rows_cols_grad_meta): 32 x 32 tiles, 8 warps, the row tile and the BLOCK_M x D accumulator
# resident. Measured with ptxas (Triton 3.9, D = 256 and 512, bf16 and fp16, sm_80 / sm_89 /
# sm_90): no spills at depths 1-3 (167-196 registers); depth 3 needs 101-103 KiB of shared
# memory at D = 512, over sm_89's 99 KiB, so depths 1 and 2. (64-row tiles spill 512 B at
# D = 512; 32 x 64 tiles need 101-160 KiB.)
RC_GRAD_CONFIGS: List[triton.Config] = [_cfg(32, 32, 8, 1), _cfg(32, 32, 8, 2)]


def _stages(kind: str, dtype: torch.dtype, precision: str, resident: bool) -> Tuple[int, ...]:
    """The pipeline depths that compile without spills on sm_80, sm_89 and sm_90 alike
    (ptxas of Triton 3.9, every code path; the stage count changes no result, so the autotuner
    may pick any). Measured, per tiling class (spills in bytes per thread):
      float32 IEEE (FMA chain, D chunks of 16): 2 (3 spills 8 B on sm_80 / sm_89, 4 8 B on
        sm_90 with dscale and splits); the backward 2 (3 spills 52 B).
      TF32 forward, D > 64 (chunks of 32): 3 (2 spills 8 B on sm_89, 4 8 B on sm_80 / sm_89).
      bf16 / fp16 backward, D > 128 (chunks of 64): 1 (2 spills 8-24 B on sm_80 / sm_89, 3
        8-16 B); every other class 2 and 3 (4 spilled 8 B in forwards, 8-64 B in backwards)."""
    if dtype == torch.float32 and precision == "ieee":
        # The rows+columns forward ("rc") holds a second exponentiated tile: at depth 2 ptxas
        # capped it at 128 registers and spilled 16-24 B on sm_90; depth 3 fits everywhere.
        return (3,) if kind == "rc" else (2,)
    if kind in ("fwd", "rc"):
        return (2, 3) if resident or dtype != torch.float32 else (3,)
    if dtype != torch.float32 and not resident:
        return (1,)
    return (2, 3)


_REG_BUDGET = 128            # estimated float32 values per thread for the big tiles
_SMEM_BUDGET = 160 * 1024    # bytes: under sm_80's 164 KiB (sm_90: 227 KiB)


def _fits(cfg: triton.Config, kind: str, d: int, dtype: torch.dtype, resident: bool,
          block_d: int) -> bool:
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    threads = 32 * cfg.num_warps
    esize = torch.empty((), dtype=dtype).element_size()
    width = block_d  # the D extent of the row/column tiles
    regs = bm * bn + bm * width * esize / 4
    if kind == "grad":
        regs += bn * width * esize / 4 + (bm * width if resident else bm * block_d)
    smem = (cfg.num_stages * bn * width + bm * width) * esize
    return regs / threads <= _REG_BUDGET and smem <= _SMEM_BUDGET


def prune_configs(configs, kind: str, d: int, dtype: torch.dtype,
                  precision: str = "ieee") -> List[triton.Config]:
    """The configs that may run for (kind, d, dtype, precision): BLOCK_N = block_n(d, dtype),
    within the register and shared-memory budgets (at least one: the smallest)."""
    precision = precision if dtype == torch.float32 else "tf32"
    if kind == "rc_grad":  # CLIP's resident backward: its own configs, kept as measured
        return [c for c in configs if c in RC_GRAD_CONFIGS] or list(RC_GRAD_CONFIGS)
    resident, block_d = d_tiling(d, True, dtype, precision)
    bn = block_n(d, dtype, kind)
    stages = _stages(kind, dtype, precision, resident)
    same_n = [c for c in configs if c.kwargs["BLOCK_N"] == bn]
    same_n = [c for c in same_n if c.num_stages in stages] or same_n
    kept = [c for c in same_n if _fits(c, kind, d, dtype, resident, block_d)]
    if not kept:
        kept = [min(same_n, key=lambda c: (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages))]
    return kept


def _early_prune(kind, input_name):
    def prune(configs, named_args, **kwargs):
        return prune_configs(configs, kind, int(named_args["d"]), named_args[input_name].dtype,
                             kwargs.get("PRECISION", "ieee"))
    return prune


_KEY_FWD = ["d", "POS_ROWS", "EXCLUDE_DIAG", "POS_IN_COLUMNS", "POS_IN_DENOM", "WITH_DSCALE",
            "ONE_SPLIT", "RESIDENT", "BLOCK_D", "PRECISION", "NORM_TILES", "SCALE_PTR"]
_KEY_GRAD = ["d", "USE_A", "USE_B", "EXCLUDE_DIAG", "POS_IN_COLUMNS", "RESIDENT", "BLOCK_D",
             "PRECISION", "NORM_TILES", "SCALE_PTR"]

_lse_fwd_tuned = triton.autotune(
    configs=FWD_CONFIGS, key=_KEY_FWD,
    prune_configs_by={"early_config_prune": _early_prune("fwd", "Q")},
)(_lse_fwd_kernel)
_grad_tuned = triton.autotune(
    configs=GRAD_CONFIGS, key=_KEY_GRAD,
    prune_configs_by={"early_config_prune": _early_prune("grad", "A")},
)(_grad_kernel)
_grad_rc_tuned = triton.autotune(
    configs=RC_GRAD_CONFIGS, key=_KEY_GRAD,
    prune_configs_by={"early_config_prune": _early_prune("rc_grad", "A")},
)(_grad_kernel)
# The label positives' passes (triton_labels): one config each, the first the pruning keeps
# (the autotuner never benchmarks: no host syncs on a first call; the AOT check compiles it).
def _first_kept(kind, input_name):
    prune = _early_prune(kind, input_name)

    def first(configs, named_args, **kwargs):
        return prune(configs, named_args, **kwargs)[:1]
    return first


_lse_labels_tuned = triton.autotune(
    configs=FWD_CONFIGS, key=_KEY_FWD,
    prune_configs_by={"early_config_prune": _first_kept("fwd", "Q")},
)(_lse_fwd_kernel)
_grad_labels_tuned = triton.autotune(
    configs=GRAD_CONFIGS, key=_KEY_GRAD,
    prune_configs_by={"early_config_prune": _first_kept("grad", "A")},
)(_grad_kernel)
_KEY_RC = ["d", "WITH_DSCALE", "RESIDENT", "BLOCK_D", "PRECISION", "NORM_TILES", "SCALE_PTR"]
_rows_cols_tuned = triton.autotune(
    configs=FWD_CONFIGS, key=_KEY_RC,
    prune_configs_by={"early_config_prune": _early_prune("rc", "X")},
)(_rows_cols_fwd_kernel)


def _common_meta(dtype: torch.dtype, d: int, on_cuda: bool, precision: str) -> dict:
    # bf16/fp16 dots ignore the setting; fp32 follows torch.get_float32_matmul_precision().
    precision = precision if dtype == torch.float32 else "tf32"
    resident, block_d = d_tiling(d, on_cuda, dtype, precision)
    meta = dict(RESIDENT=resident, BLOCK_D=block_d, EXP2=EXP2, PRECISION=precision)
    # The Triton interpreter (3.9) computes bf16 tl.dot wrongly: widen operands there.
    meta["UPCAST"] = not on_cuda and dtype == torch.bfloat16
    meta["NORM_TILES"] = dtype == torch.float32
    meta["SUM_DOT"] = not on_cuda
    if not on_cuda:
        meta.update(INTERPRETER_TILES)
    return meta


def lse_meta(dtype, d, on_cuda, positive_rows, exclude_diag, pos_in_columns, precision,
             positive_in_denominator=True, with_dscale=False, one_split=True,
             scale_ptr=False, has_labels=False) -> dict:
    """Compile-time arguments of ``_lse_fwd_kernel`` for one call (without BLOCK_M/BLOCK_N and
    launch options on CUDA: those come from the autotuner). ``has_labels``: the label
    positives' pass (give no other positive and no diagonal exclusion with it)."""
    meta = _common_meta(dtype, d, on_cuda, precision)
    meta.update(POS_ROWS=bool(positive_rows), EXCLUDE_DIAG=bool(exclude_diag),
                POS_IN_COLUMNS=bool(pos_in_columns),
                POS_IN_DENOM=bool(positive_in_denominator), HAS_LABELS=bool(has_labels),
                WITH_DSCALE=bool(with_dscale), ONE_SPLIT=bool(one_split),
                SCALE_PTR=bool(scale_ptr))
    return meta


def rows_cols_meta(dtype, d, on_cuda, precision, with_dscale=False, scale_ptr=False) -> dict:
    """Compile-time arguments of ``_rows_cols_fwd_kernel`` for one call (see ``lse_meta``): the
    D tiling of the other kernels, so that the backward (``_grad_kernel``) recomputes the very
    logits the forward's statistics saw."""
    meta = _common_meta(dtype, d, on_cuda, precision)
    meta.update(WITH_DSCALE=bool(with_dscale), SCALE_PTR=bool(scale_ptr))
    return meta


def rc_grad_resident(dtype, d: int, on_cuda: bool) -> bool:
    """Whether CLIP's backward runs the resident 32-row tiling (RC_GRAD_CONFIGS): on the GPU,
    bf16/fp16 at RESIDENT_MAX_D < D <= RC_GRAD_RESIDENT_MAX_D (below, the usual resident
    tiling; above, D chunks)."""
    return (on_cuda and dtype in (torch.bfloat16, torch.float16)
            and RESIDENT_MAX_D < d <= RC_GRAD_RESIDENT_MAX_D)


def rows_cols_grad_meta(dtype, d, on_cuda, precision, scale_ptr=False) -> dict:
    """Compile-time arguments of the two ``_grad_kernel`` passes of ``rows_cols_grad`` (both
    weights, the diagonal skipped as the positive column of offset 0). For bf16/fp16 at
    128 < D <= 512 on the GPU (``rc_grad_resident``) the row tile and the accumulator stay
    resident (BLOCK_D = D rounded up to a power of two) with the 32-row configs
    RC_GRAD_CONFIGS, where ``grad_meta`` would stream D in chunks of 64 and add each column
    tile's W @ B into the output rows in global memory (a read and a write of BLOCK_M x D
    float32 per column tile: about 19 FLOP per byte moved at D = 512, against 64 here, where
    each column tile is loaded once for both products). The logits are then an MMA over all of
    D in one dot: the same products in the same k order as the forward's chunks; that it is the
    same float is claimed only where tested on a device, and a last-bit difference is far below
    the bf16 rounding of the weights (CAST_W)."""
    meta = grad_meta(dtype, d, on_cuda, True, True, False, True, precision, scale_ptr)
    if rc_grad_resident(dtype, d, on_cuda):
        meta.update(RESIDENT=True, BLOCK_D=_pow2(d, 16, RC_GRAD_RESIDENT_MAX_D))
    return meta


def grad_meta(dtype, d, on_cuda, use_a, use_b, exclude_diag, pos_in_columns, precision,
              scale_ptr=False, has_labels=False) -> dict:
    """Compile-time arguments of ``_grad_kernel`` for one call (see ``lse_meta``)."""
    meta = _common_meta(dtype, d, on_cuda, precision)
    if on_cuda and dtype == torch.float32 and d > TF32_GRAD_RESIDENT_MAX_D:
        # The same BLOCK_D (so the same logits) as the forward; the rows stream (spills).
        meta["RESIDENT"] = False
    meta.update(USE_A=bool(use_a), USE_B=bool(use_b), EXCLUDE_DIAG=bool(exclude_diag),
                POS_IN_COLUMNS=bool(pos_in_columns), HAS_LABELS=bool(has_labels),
                CAST_W=dtype == torch.bfloat16, SCALE_PTR=bool(scale_ptr))
    return meta


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(n_q: int, n_k: int, device: torch.device,
               max_splits: Optional[int] = None) -> Tuple[int, int]:
    """(n_splits, cols_per_split) for n_q rows against n_k columns: from the shape and the
    device's SM count only (never from the autotuned tiles), so results are deterministic.
    Enough programs for PROGRAMS_PER_SM per SM, each with at least MIN_SPLIT_COLUMNS columns,
    aligned to SPLIT_ALIGN, at most ``max_splits``. ``SPLIT_COLUMNS`` (tests) forces the
    columns per split."""
    on_cuda = device.type == "cuda"
    align = SPLIT_ALIGN if on_cuda else INTERPRETER_TILES["BLOCK_N"]
    if SPLIT_COLUMNS is not None:  # as given: a split may end inside a column tile (masked)
        cps = max(1, int(SPLIT_COLUMNS))
        return max(1, triton.cdiv(n_k, cps)), cps
    if on_cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        row_blocks = triton.cdiv(max(n_q, 1), 64)
        want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(index), row_blocks)
        splits = max(1, min(want, n_k // MIN_SPLIT_COLUMNS, max_splits or want))
        cps = triton.cdiv(max(n_k, 1), splits)
    else:
        cps = INTERPRETER_SPLIT_COLUMNS
    cps = max(align, triton.cdiv(cps, align) * align)
    return max(1, triton.cdiv(n_k, cps)), cps


def rows_cols_plan(n: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(n_groups, rows_per_group, n_splits, cols_per_split) of the rows+columns forward over an
    n x n logit matrix: a grid of n_groups x n_splits programs. From the shape and the SM count
    only (never the autotuned tiles; BLOCK_M and BLOCK_N are fixed per (D, dtype) anyway), so the
    column merge order, and the results, are deterministic. On the GPU: about
    PROGRAMS_PER_SM * SMs programs, k x k with k = ceil(sqrt(that)), rows and columns per
    program rounded up to SPLIT_ALIGN (a multiple of every tile): on an H100 (132 SMs) k = 23,
    and n = 32768 gives 22 x 22 programs of 1536 x 1536 logits each. The partial statistics are
    (4 n_splits + 3 n_groups) * n floats (19.3 MiB at n = 32768, 40.3 MiB at 65536, with
    dscale): O(n sqrt(SMs)). One program per row block with (row blocks, n) column partials
    would be O(n^2 / BLOCK_M): 192 MiB at n = 32768 with BLOCK_M = 64, 768 MiB at 65536.
    ``SPLIT_COLUMNS`` / ``RC_GROUP_ROWS`` (tests) force the columns per split / rows per
    group."""
    n = max(int(n), 1)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        k = max(1, math.isqrt(PROGRAMS_PER_SM * _sm_count(index) - 1) + 1)
        align = SPLIT_ALIGN
        rows = cols = max(align, triton.cdiv(triton.cdiv(n, k), align) * align)
    else:
        rows, cols = INTERPRETER_GROUP_ROWS, INTERPRETER_SPLIT_COLUMNS
    if RC_GROUP_ROWS is not None:
        rows = max(1, int(RC_GROUP_ROWS))
    if SPLIT_COLUMNS is not None:
        cols = max(1, int(SPLIT_COLUMNS))
    return triton.cdiv(n, rows), rows, triton.cdiv(n, cols), cols


def _scale_args(inv_temp, device, dummy):
    """(SCALE pointer, scale_val, SCALE_PTR) for a float or a 0-dim tensor inv_temp."""
    if isinstance(inv_temp, torch.Tensor):
        if inv_temp.numel() != 1:
            raise ValueError(f"inv_temp must be a 0-dim tensor, got shape {tuple(inv_temp.shape)}")
        if inv_temp.device == device:
            return inv_temp.reshape(()), 0.0, True
        if inv_temp.device.type == "cpu":  # a CPU scalar: reading it syncs nothing
            return dummy, float(inv_temp), False
        raise ValueError(f"inv_temp is on {inv_temp.device}, the inputs on {device}")
    return dummy, float(inv_temp), False


def _on_device(t: torch.Tensor):
    """Launch under the tensor's device (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------- launchers ----


def _lse(q, k, nq, nk, positive, inv_temp, exclude_diag, pos_offset, precision,
         positive_in_denominator=True, with_dscale=False, labels=None, own_offset=0):
    """The forward pass. ``labels`` = (lq, lk) int64: the label positives' pass (row i's own
    column i + ``own_offset`` excluded; ``positive``, ``pos_offset`` and ``exclude_diag``
    unused): returns (loss, lse, dscale, count), else (loss, lse, dscale)."""
    n_q, d = q.shape
    n_k = k.shape[0]
    dev = q.device
    on_cuda = q.is_cuda
    has_labels = labels is not None
    if has_labels:
        positive, pos_offset, exclude_diag = None, None, False
    scale_t, scale_val, scale_ptr = _scale_args(inv_temp, dev, nq)
    n_splits, cps = split_plan(n_q, n_k, dev)
    meta = lse_meta(q.dtype, d, on_cuda, positive is not None, exclude_diag,
                    pos_offset is not None, precision, positive_in_denominator, with_dscale,
                    n_splits == 1, scale_ptr, has_labels)
    loss = torch.empty(n_q, dtype=torch.float32, device=dev)
    lse = torch.empty(n_q, dtype=torch.float64, device=dev)
    dscale = torch.empty(n_q if with_dscale else 0, dtype=torch.float32, device=dev)
    count = torch.empty(n_q if has_labels else 0, dtype=torch.float32, device=dev)
    if n_q == 0:
        return (loss, lse, dscale, count) if has_labels else (loss, lse, dscale)
    planes = 3 + bool(with_dscale) + has_labels
    part = (torch.empty(planes * n_splits * n_q, dtype=torch.float32, device=dev)
            if n_splits > 1 else loss)
    kp, n_p = positive if positive is not None else (q, nq)
    lq, lk = labels if has_labels else (nq, nk)  # dummies without labels
    args = (q, k, nq, nk, kp, n_p, scale_t, part, loss, lse,
            dscale if with_dscale else loss, lq, lk, count if has_labels else loss,
            n_q, n_k, d, own_offset if has_labels else (pos_offset or 0), cps, n_splits,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), kp.stride(0), kp.stride(1),
            scale_val)
    with _on_device(q):
        if on_cuda:
            grid = lambda META: (triton.cdiv(n_q, META["BLOCK_M"]), n_splits)  # noqa: E731
            (_lse_labels_tuned if has_labels else _lse_fwd_tuned)[grid](*args, **meta)
        else:
            _lse_fwd_kernel[(triton.cdiv(n_q, meta["BLOCK_M"]), n_splits)](*args, **meta)
        if n_splits > 1:
            block = COMBINE_BLOCK if on_cuda else 32
            _combine_kernel[(triton.cdiv(n_q, block),)](
                part, scale_t, loss, lse, dscale if with_dscale else loss,
                count if has_labels else loss, n_q, n_splits, scale_val, SCALE_PTR=scale_ptr,
                WITH_DSCALE=bool(with_dscale), HAS_LABELS=has_labels, EXP2=EXP2, BLOCK=block,
            )
    return (loss, lse, dscale, count) if has_labels else (loss, lse, dscale)


def _grad(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, exclude_diag, pos_offset, precision,
          rows_cols=False, labels=None, own_offset=0):
    """The gradient pass. ``labels`` = (la, lb, gp_a, gp_b) (int64 labels; gp_a / gp_b the
    positives' weights of the side whose statistics are given, else None): the label
    positives' pass, the pair (a, a + ``own_offset``) excluded (``exclude_diag`` and
    ``pos_offset`` unused)."""
    n_a, d = a.shape
    n_b = b.shape[0]
    on_cuda = a.is_cuda
    has_labels = labels is not None
    if has_labels:
        exclude_diag, pos_offset = False, None
    scale_t, scale_val, scale_ptr = _scale_args(inv_temp, a.device, na)
    if rows_cols:  # CLIP's passes: both weights, the diagonal skipped (offset 0)
        meta = rows_cols_grad_meta(a.dtype, d, on_cuda, precision, scale_ptr)
    else:
        meta = grad_meta(a.dtype, d, on_cuda, lse_a is not None, lse_b is not None,
                         exclude_diag, pos_offset is not None, precision, scale_ptr,
                         has_labels)
    if has_labels:
        tuned = _grad_labels_tuned
    else:
        tuned = (_grad_rc_tuned if rows_cols and rc_grad_resident(a.dtype, d, on_cuda)
                 else _grad_tuned)
    out = torch.empty(n_a, d, dtype=torch.float32, device=a.device)
    if n_a == 0 or d == 0:
        return out.zero_()
    # Each split holds n_a x d float32 partial rows: at most ~64 MiB of them in all.
    n_splits, cps = split_plan(n_a, n_b, a.device,
                               max_splits=max(1, PARTIAL_BYTES // (4 * n_a * d)))
    part = (torch.empty(n_splits, n_a, d, dtype=torch.float32, device=a.device)
            if n_splits > 1 else out)
    dummy = na
    lse_a = lse_a.to(torch.float64).contiguous() if lse_a is not None else dummy
    lse_b = lse_b.to(torch.float64).contiguous() if lse_b is not None else dummy
    la, lb, gp_a, gp_b = labels if has_labels else (dummy, dummy, None, None)
    args = (a, b, na, nb,
            lse_a, g_a if g_a is not None else dummy,
            lse_b, g_b if g_b is not None else dummy,
            la, lb, gp_a if gp_a is not None else dummy, gp_b if gp_b is not None else dummy,
            scale_t, part,
            n_a, n_b, d, own_offset if has_labels else (pos_offset or 0), cps,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), d,
            scale_val)
    with _on_device(a):
        if on_cuda:
            grid = lambda META: (triton.cdiv(n_a, META["BLOCK_M"]), n_splits)  # noqa: E731
            tuned[grid](*args, **meta)
        else:
            _grad_kernel[(triton.cdiv(n_a, meta["BLOCK_M"]), n_splits)](*args, **meta)
        if n_splits > 1:
            block = SUM_BLOCK if on_cuda else 1024
            _sum_splits_kernel[(triton.cdiv(n_a * d, block),)](part, out, n_a * d, n_splits,
                                                               BLOCK=block)
    return out


# ------------------------------------------------------------ the fastcl.kernels contract ----


def _check_pair(x, y, nx, ny):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (n, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (n, D), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.dtype not in _PTR:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 rows, got "
                        f"{x.dtype}")
    for name, t in (("nx", nx), ("ny", ny)):
        if t.shape != (x.shape[0],) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape ({x.shape[0]},), got {t.dtype} "
                             f"{tuple(t.shape)}")


def rows_cols_forward(x, y, nx, ny, inv_temp, precision: str = "ieee",
                      with_dscale: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's two directions in one pass (``_rows_cols_fwd_kernel``, then
    ``_combine_rows_cols_kernel``).

    s_ij = inv_temp * xhat_i . yhat_j, xhat = x / nx. Returns loss (2n,) float32 =
    [row losses (m_i - s_ii) + log l_i ; column losses (m_j - s_jj) + log l_j], lse (2n,)
    float64 = [row lse ; column lse], and with ``with_dscale`` dscale (2n,) float32 = [sum_j
    p^r_ij d_ij - d_ii ; sum_i p^c_ij d_ij - d_jj] (d = s / inv_temp), else an empty tensor.
    Two launches; memory: the partial statistics of ``rows_cols_plan`` (O(n sqrt(SMs)))."""
    _check_pair(x, y, nx, ny)
    n, d = x.shape
    dev = x.device
    on_cuda = x.is_cuda
    scale_t, scale_val, scale_ptr = _scale_args(inv_temp, dev, nx)
    loss = torch.empty(2 * n, dtype=torch.float32, device=dev)
    lse = torch.empty(2 * n, dtype=torch.float64, device=dev)
    dscale = torch.empty(2 * n if with_dscale else 0, dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse, dscale
    n_groups, rows_per_group, n_splits, cols_per_split = rows_cols_plan(n, dev)
    meta = rows_cols_meta(x.dtype, d, on_cuda, precision, with_dscale, scale_ptr)
    rpart = torch.empty((4 if with_dscale else 3) * n_splits * n, dtype=torch.float32,
                        device=dev)
    cpart = torch.empty((3 if with_dscale else 2) * n_groups * n, dtype=torch.float32,
                        device=dev)
    args = (x, y, nx, ny, scale_t, rpart, cpart,
            n, d, rows_per_group, cols_per_split, n_splits, n_groups,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), scale_val)
    with _on_device(x):
        if on_cuda:
            _rows_cols_tuned[(n_groups, n_splits)](*args, **meta)
        else:
            _rows_cols_fwd_kernel[(n_groups, n_splits)](*args, **meta)
        block = COMBINE_BLOCK if on_cuda else 32
        _combine_rows_cols_kernel[(triton.cdiv(n, block),)](
            rpart, cpart, scale_t, loss, lse, dscale if with_dscale else loss, n, n_splits,
            n_groups, scale_val, SCALE_PTR=scale_ptr, WITH_DSCALE=bool(with_dscale),
            EXP2=EXP2, BLOCK=block,
        )
    return loss, lse, dscale


def rows_cols_grad(x, y, nx, ny, lse, g, inv_temp, precision: str = "ieee"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx_hat, dy_hat), float32 (n, D): dx_hat_i = inv_temp * sum_{j != i} W_ij yhat_j and
    dy_hat_j = inv_temp * sum_{i != j} W_ij xhat_i with W_ij = g_r_i exp(s_ij - lse_r_i) +
    g_c_j exp(s_ij - lse_c_j), lse = [lse_r ; lse_c] and g = [g_r ; g_c] of length 2n; the
    diagonal is skipped (the op layer adds the positives' terms).

    Two passes of ``_grad_kernel``: row-owned for dx (a = x, b = y; both weights, the pair
    (i, i) skipped as the positive column of offset 0) and column-owned for dy (a = y, b = x,
    the roles swapped). Each recomputes its logits: 5 products in forward + backward, against
    4 for one pass that would form both W @ Y and W^T @ X from one tile. That pass needs, without
    atomics, a partial dY per row group summed in a fixed order: (groups x n x D) float32, 64
    MiB per group at n = 32768, D = 512, and enough groups to fill 132 SMs is gigabytes; with
    atomics it would not be deterministic. Each pass here holds n x D float32 (plus the split
    partial rows ``_grad`` caps at PARTIAL_BYTES): memory O(n D). Tiling: ``rows_cols_grad_meta``
    (at N = 32768, D = 512, bf16 on an H100: 1024 programs of 32 rows per pass, each column
    tile loaded once for the logits and the product). The logits are the forward's
    floats: the same D tiling (``d_tiling``), products of the same normalized operands; the
    column pass takes y_j . x_i, the same float under the interpreter's SUM_DOT and for the
    GPU's IEEE FMA chains (as the existing in-batch dk pass assumes for the matrix units)."""
    _check_pair(x, y, nx, ny)
    n = x.shape[0]
    for name, t in (("lse", lse), ("g", g)):
        if t.shape != (2 * n,):
            raise ValueError(f"{name} must have shape ({2 * n},) = [rows ; columns], got "
                             f"{tuple(t.shape)}")
    lse = lse.to(torch.float64).contiguous()
    g = g.to(torch.float32).contiguous()
    lse_r, lse_c, g_r, g_c = lse[:n], lse[n:], g[:n], g[n:]
    dx = _grad(x, y, nx, ny, lse_r, g_r, lse_c, g_c, inv_temp, False, 0, precision, True)
    dy = _grad(y, x, ny, nx, lse_c, g_c, lse_r, g_r, inv_temp, False, 0, precision, True)
    return dx, dy


def nt_xent_forward(z, nz, inv_temp, precision: str = "ieee",
                    positive_in_denominator: bool = True, with_dscale: bool = False):
    return _lse(z, z, nz, nz, None, inv_temp, True, z.shape[0] // 2, precision,
                positive_in_denominator, with_dscale)


def nt_xent_grad(z, nz, lse, g, inv_temp, precision: str = "ieee"):
    # The symmetric form: W_ij = g_i P_ij + g_j P_ji from one tile, dz = W z / tau, no atomics.
    return _grad(z, z, nz, nz, lse, g, lse, g, inv_temp, True, z.shape[0] // 2, precision)


def lse_forward(q, k, nq, nk, positive: Optional[Tuple[torch.Tensor, torch.Tensor]],
                inv_temp, pos_offset: Optional[int], precision: str = "ieee",
                positive_in_denominator: bool = True, with_dscale: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lse(q, k, nq, nk, positive, inv_temp, False, pos_offset, precision,
                positive_in_denominator, with_dscale)


def grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp,
                    pos_offset: Optional[int], precision: str = "ieee") -> torch.Tensor:
    return _grad(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, False, pos_offset, precision)


# ------------------------------------------------------------------- ahead-of-time list ----

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_OPTIONS = ("num_warps", "num_stages")
# (positive_rows, exclude_diag, pos_in_columns)
LSE_CASES = {"nt_xent": (False, True, True), "in_batch": (False, False, True),
             "queue": (True, False, False), "no_positive": (False, False, False)}
# (use_a, use_b, exclude_diag, pos_in_columns)
GRAD_CASES = {"nt_xent": (True, True, True, True), "in_batch_dq": (True, False, False, True),
              "in_batch_dk": (False, True, False, True), "queue_dq": (True, False, False, False),
              "queue_dneg": (False, True, False, False)}


def _signature(kernel, dtype, constexprs, scale_dtype):
    sig = {}
    inputs = {"Q", "K", "KP", "A", "B", "X", "Y"}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in inputs:
            sig[arg] = _PTR[dtype]
        elif arg in ("LSE", "LSE_A", "LSE_B"):  # the row lse is float64
            sig[arg] = "*fp64"
        elif arg in ("LQ", "LK", "LA", "LB"):  # int64 labels (without them: a float dummy)
            sig[arg] = "*i64" if constexprs.get("HAS_LABELS") else "*fp32"
        elif arg == "SCALE":
            sig[arg] = scale_dtype
        elif arg.isupper():
            sig[arg] = "*fp32"
        elif arg == "scale_val":
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return sig


def aot_variants(ds=(128, 512), dtypes=(torch.float32, torch.bfloat16),
                 precisions=("ieee",), every_config: bool = True) -> Iterator[dict]:
    """What can run on a GPU, for the ahead-of-time compile test: dicts with ``kernel`` (the
    @triton.jit function), ``label``, ``signature`` and ``constexprs`` (for
    ``triton.compiler.ASTSource``) and ``options`` (num_warps, num_stages). For each case in
    LSE_CASES / GRAD_CASES (forward with one and with several splits, with and without dscale
    and the positive in the denominator, scale as a float and as a device pointer), each D in
    ``ds`` (give one at most RESIDENT_MAX_D and one above it), dtype and precision, and each
    config ``prune_configs`` keeps (or only the first with every_config=False); plus the
    combine and split-sum kernels. (The backward's pointer-scale form only for NT-Xent: it is
    one load, independent of the case.) Arguments the launchers pass as Python ints are "i32"
    here; the JIT also specializes those divisible by 16 (tt.divisibility), which the caller
    may add."""
    for dtype in dtypes:
        for d in ds:
            for precision in (precisions if dtype == torch.float32 else ("ieee",)):
                fwd = prune_configs(FWD_CONFIGS, "fwd", d, dtype, precision)
                grad = prune_configs(GRAD_CONFIGS, "grad", d, dtype, precision)
                for case, flags in LSE_CASES.items():
                    for one_split, pid, ds_, sptr in ((True, True, False, False),
                                                      (False, False, True, True)):
                        meta = lse_meta(dtype, d, True, *flags, precision, pid, ds_,
                                        one_split, sptr)
                        for cfg in (fwd if every_config else fwd[:1]):
                            yield _variant(_lse_fwd_kernel, f"lse/{case}", dtype, d, precision,
                                           meta, cfg, sptr,
                                           f"splits={'1' if one_split else 'n'} pid={pid} "
                                           f"dscale={ds_} scale_ptr={sptr}")
                # CLIP's rows+columns forward: dscale with the scale as a pointer (the
                # heavier form) always; without dscale (float scale) with every_config (the
                # CI's sm_90 group at D = 128): both forms of every (arch, D, dtype, config)
                # were compiled once without spills (see rows_cols_plan's docstring).
                rc = prune_configs(FWD_CONFIGS, "rc", d, dtype, precision)
                for ds_ in ((False, True) if every_config else (True,)):
                    meta = rows_cols_meta(dtype, d, True, precision, ds_, ds_)
                    for cfg in (rc if every_config else rc[:1]):
                        yield _variant(_rows_cols_fwd_kernel, "rows_cols", dtype, d,
                                       precision, meta, cfg, ds_,
                                       f"dscale={ds_} scale_ptr={ds_}")
                # CLIP's backward passes (rows_cols_grad_meta: its own tiling at some D).
                meta = rows_cols_grad_meta(dtype, d, True, precision)
                kind = "rc_grad" if rc_grad_resident(dtype, d, True) else "grad"
                cfgs = prune_configs(RC_GRAD_CONFIGS if kind == "rc_grad" else GRAD_CONFIGS,
                                     kind, d, dtype, precision)
                for cfg in (cfgs if every_config else cfgs[:1]):
                    yield _variant(_grad_kernel, "grad/clip", dtype, d, precision, meta, cfg,
                                   False, f"scale_ptr=False tiles={kind}")
                for case, flags in GRAD_CASES.items():
                    # The scale's pointer form is one load, independent of the case: once.
                    for sptr in ((False, True) if case == "nt_xent" else (False,)):
                        meta = grad_meta(dtype, d, True, *flags, precision, sptr)
                        for cfg in (grad if every_config else grad[:1]):
                            yield _variant(_grad_kernel, f"grad/{case}", dtype, d, precision,
                                           meta, cfg, sptr, f"scale_ptr={sptr}")
    sig = {"PART": "*fp32", "OUT": "*fp32", "numel": "i32", "n_splits": "i32",
           "BLOCK": "constexpr"}
    yield dict(kernel=_sum_splits_kernel, signature=sig, constexprs=dict(BLOCK=SUM_BLOCK),
               options=dict(num_warps=4, num_stages=1), label="sum_splits")
    for with_dscale in (False, True):
        for sptr in (False, True):
            constexprs = dict(SCALE_PTR=sptr, WITH_DSCALE=with_dscale, HAS_LABELS=False,
                              EXP2=EXP2, BLOCK=COMBINE_BLOCK)
            sig = _signature(_combine_kernel, torch.float32, constexprs,
                             "*fp32" if sptr else "*fp32")
            yield dict(kernel=_combine_kernel, signature=sig, constexprs=constexprs,
                       options=dict(num_warps=4, num_stages=1),
                       label=f"combine dscale={with_dscale} scale_ptr={sptr}")
            if sptr != with_dscale:  # the rows+columns combine: its two launch forms
                continue
            constexprs = dict(constexprs)
            del constexprs["HAS_LABELS"]
            sig = _signature(_combine_rows_cols_kernel, torch.float32, constexprs, "*fp32")
            yield dict(kernel=_combine_rows_cols_kernel, signature=sig, constexprs=constexprs,
                       options=dict(num_warps=4, num_stages=1),
                       label=f"combine_rows_cols dscale={with_dscale} scale_ptr={sptr}")


def _variant(kernel, name, dtype, d, precision, meta, cfg, scale_ptr, extra):
    constexprs = dict(meta, **cfg.kwargs)
    sig = _signature(kernel, dtype, constexprs, "*fp64" if scale_ptr else "*fp32")
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    label = (f"{name} {str(dtype)[6:]} d={d} {precision} BM={cfg.kwargs['BLOCK_M']} "
             f"BN={cfg.kwargs['BLOCK_N']} w={cfg.num_warps} s={cfg.num_stages} {extra}")
    return dict(kernel=kernel, signature=sig, constexprs=constexprs, options=options,
                label=label)


# The SigLIP sigmoid epilogue (its own module; it imports this module's helpers).
from fastcl.kernels.triton_sigmoid import sigmoid_forward, sigmoid_grad  # noqa: E402,F401
from fastcl.kernels.triton_labels import (  # noqa: E402,F401
    labels_forward,
    labels_grad,
    labels_sym_forward,
    labels_sym_grad,
)
