"""Triton launchers of the label positives (SupCon: ``labels_forward``, ``labels_grad``,
``labels_sym_forward``, ``labels_sym_grad`` of the kernel contract in ``fastcl.kernels``).
``triton_contrastive`` imports this module at its end and re-exports the four; this module
imports that one's kernels and launchers after its own functions are defined, so either may be
imported first (as ``triton_sigmoid``). Import it only after ``TRITON_INTERPRET`` has its final
value.

No kernels of its own: the label pass is a constexpr form (HAS_LABELS) of the contrastive
kernels, ``_lse_fwd_kernel`` / ``_combine_kernel`` and ``_grad_kernel``, which already hold
everything else it needs (the D tiling, resident or chunked rows, normalization on the fly,
the online max / sum / centred moment, the column splits with their fixed-order combines, the
split gradient partials summed in split order, the scale as a float or a device pointer, int64
offsets, the float64 lse split as hi + lo in the backward). With HAS_LABELS:

Forward (grid: row blocks x column splits, ``split_plan``; one launch, or two with the
combine): each program loads its rows' labels once (int64) and each column tile's labels with
the tile, compares them inside the tile, excludes row i's own column i + offset, and keeps per
row, besides the online (m, l, t) of every other column: sp, the sum of the positive logits
(each the very float the max and the sum saw; float64 across tiles) and the positive count.
Several splits write (m, l, sp, t, count) planes, merged in split order by ``_combine_kernel``
(deterministic: results do not depend on the number of programs' completion order). The
finish: loss = (m - sp / count) + log l, lse = m + log l (float64, -inf for a row without any
column), dscale = (t / l + (m - sp / count)) / inv_temp; loss = dscale = 0 where count = 0.
exp or exp2 follows the module's ``EXP2`` (False, measured: see triton_contrastive's
docstring; the kernels fold log2(e) into the scale when it is set).

Backward (``_grad_kernel``, grid row blocks x column splits, no atomics): W_ab = ga exp(s_ab -
lse) - gp [la_a == lb_b] per tile, own pair excluded, every logit recomputed with the
forward's tiling and operand order; exp((s - hi) - lo) with lse = hi + lo, (hi, lo) = (0, 0)
for lse = -inf (so a row without columns weighs exactly 0, never -inf - -inf).
- ``labels_grad`` with a's statistics: the rows pass (a, b) = (q, k), pair (i, i + offset)
  skipped; with b's: the columns pass (a, b) = (k, q), pair (j + offset, j) skipped.
- ``labels_sym_forward``: ``labels_forward(z, z, ..., offset 0)`` (each tile pair computed
  twice, once per side: symmetry is not exploited on the GPU, where the row-owned forward with
  split columns fills the machine and needs no column-state merges).
- ``labels_sym_grad``: one row-owned pass of ``_grad_kernel`` with both sides' weights,
  out_i = inv_temp sum_j (W_ij + W_ji) zhat_j, W_ji from the same tile (s_ji = s_ij: the
  FMA-chain / SUM_DOT dot is symmetric, as ``nt_xent_grad`` already relies on): 2 N^2 D flops
  (logits + product), against 1.5 N^2 D for a one-pass triangle form, which without atomics
  would need per-row-block partial column gradients (O(N^2 D / BLOCK_M) memory).

Configs: one per pass, the first the contrastive pruning keeps (64 x 64 tiles, 8 warps; depth
2 at D = 128, 3 for the TF32 forward): the autotuner never benchmarks (no host syncs on a first
call), and the AOT check compiles exactly what runs. The interpreter takes
``INTERPRETER_TILES`` (32 x 32). Accumulation dtype float32 (the Triton kernels take float32,
bfloat16 and float16 rows).

Resources (ptxas, sm_90, D = 128, Triton 3.9; tests/triton_aot.py; no spills anywhere):
    pass                      float32 IEEE   TF32        bf16        (the NT-Xent form)
    forward, splits + dscale  194            128         112         124 / 116 / 87
    forward, one split        196            116         105         118 / 110 / 70
    grad, rows                215            -           178         201 / 123 / 162 (dq)
    grad, symmetric           215            182         201         207 / 143 / 201
    combine                   32
The forward's extra registers are the int64 label tiles and the positives' sum and count;
where the products run on matrix units the two are one paired reduction (see the kernel).
"""
from __future__ import annotations

from typing import Iterator

import torch


def _check_rows(name, x, norms_name, norms):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (n, D), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _PTR:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 rows, got "
                        f"{x.dtype}")
    if (not isinstance(norms, torch.Tensor) or norms.shape != (x.shape[0],)
            or norms.dtype != torch.float32):
        raise ValueError(f"{norms_name} must be float32 of shape ({x.shape[0]},), got "
                         f"{getattr(norms, 'dtype', None)} {tuple(getattr(norms, 'shape', ()))}")
    if norms.device != x.device:
        raise ValueError(f"{norms_name} is on {norms.device}, {name} on {x.device}")


def _check_labels(name, labels, n, device):
    if (not isinstance(labels, torch.Tensor) or labels.shape != (n,)
            or labels.dtype != torch.int64):
        raise ValueError(f"{name} must be int64 of shape ({n},), got "
                         f"{getattr(labels, 'dtype', None)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device}, the rows on {device}")
    return labels.contiguous()


def _check_pair(a, b, na, nb, names):
    _check_rows(names[0], a, "n" + names[0], na)
    _check_rows(names[1], b, "n" + names[1], nb)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same feature size D, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got {a.dtype} "
                        f"and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{names[0]} is on {a.device}, {names[1]} on {b.device}")


def _check_offset(offset, n, m):
    offset = int(offset)
    if offset < 0 or offset + n > m:
        raise ValueError(f"offset must satisfy 0 <= offset and offset + n <= m (the rows are "
                         f"columns offset .. offset + n - 1), got offset={offset}, n={n}, m={m}")
    return offset


def _stat(name, t, n, dtype, device):
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got "
                         f"{tuple(getattr(t, 'shape', ()))}")
    return t.to(device=device, dtype=dtype).contiguous()


def labels_forward(q, k, nq, nk, lq, lk, inv_temp, offset, precision: str = "ieee",
                   with_dscale: bool = False):
    """(loss, lse, dscale, count) of the label positives (see the module docstring and the
    contract): loss, dscale, count float32 (n,), lse float64 (n,); dscale empty without
    ``with_dscale``. Row i of q is column i + ``offset`` of k (excluded)."""
    _check_pair(q, k, nq, nk, ("q", "k"))
    n, m = q.shape[0], k.shape[0]
    offset = _check_offset(offset, n, m)
    lq = _check_labels("lq", lq, n, q.device)
    lk = _check_labels("lk", lk, m, q.device)
    return _lse(q, k, nq.contiguous(), nk.contiguous(), None, inv_temp, False, None, precision,
                True, with_dscale, labels=(lq, lk), own_offset=offset)


def labels_grad(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b, gp_b, inv_temp, offset,
                precision: str = "ieee"):
    """out_a (n_a, D) float32 = inv_temp * sum_b W_ab bhat_b (the contract): with a's
    statistics (lse_a, ga_a, gp_a) W_ab = ga_a exp(s_ab - lse_a) - gp_a [la_a == lb_b], pair
    (a, a + offset) skipped (the rows' gradient, (a, b) = (q, k)); with b's, W_ab = ga_b
    exp(s_ab - lse_b) - gp_b [la_a == lb_b], pair (b + offset, b) skipped (the columns',
    (a, b) = (k, q)). One ``_grad_kernel`` pass."""
    _check_pair(a, b, na, nb, ("a", "b"))
    n_a, n_b = a.shape[0], b.shape[0]
    side_a = [x is not None for x in (lse_a, ga_a, gp_a)]
    side_b = [x is not None for x in (lse_b, ga_b, gp_b)]
    if not ((all(side_a) and not any(side_b)) or (all(side_b) and not any(side_a))):
        raise ValueError("labels_grad takes the statistics (lse, ga, gp) of exactly one side: "
                         "all three of a's or all three of b's")
    dev = a.device
    la = _check_labels("la", la, n_a, dev)
    lb = _check_labels("lb", lb, n_b, dev)
    if all(side_a):
        offset = _check_offset(offset, n_a, n_b)
        lse_a = _stat("lse_a", lse_a, n_a, torch.float64, dev)
        ga_a = _stat("ga_a", ga_a, n_a, torch.float32, dev)
        gp_a = _stat("gp_a", gp_a, n_a, torch.float32, dev)
        own = offset  # skip column a + offset
    else:
        offset = _check_offset(offset, n_b, n_a)
        lse_b = _stat("lse_b", lse_b, n_b, torch.float64, dev)
        ga_b = _stat("ga_b", ga_b, n_b, torch.float32, dev)
        gp_b = _stat("gp_b", gp_b, n_b, torch.float32, dev)
        own = -offset  # skip column b where a = b + offset
    return _grad(a, b, na.contiguous(), nb.contiguous(), lse_a, ga_a, lse_b, ga_b, inv_temp,
                 False, None, precision, labels=(la, lb, gp_a, gp_b), own_offset=own)


def labels_sym_forward(z, nz, labels, inv_temp, precision: str = "ieee",
                       with_dscale: bool = False):
    """``labels_forward(z, z, nz, nz, labels, labels, inv_temp, 0)`` (SupCon's
    contrast_mode="all"): each tile pair computed once per side (see the module docstring)."""
    return labels_forward(z, z, nz, nz, labels, labels, inv_temp, 0, precision, with_dscale)


def labels_sym_grad(z, nz, labels, lse, ga, gp, inv_temp, precision: str = "ieee"):
    """out (n, D) float32 = inv_temp * sum_j (W_ij + W_ji) zhat_j, W_ij = ga_i exp(s_ij -
    lse_i) - gp_i [l_i == l_j], i != j: one ``_grad_kernel`` pass with both sides' weights
    from each tile."""
    _check_rows("z", z, "nz", nz)
    n = z.shape[0]
    dev = z.device
    labels = _check_labels("labels", labels, n, dev)
    lse = _stat("lse", lse, n, torch.float64, dev)
    ga = _stat("ga", ga, n, torch.float32, dev)
    gp = _stat("gp", gp, n, torch.float32, dev)
    nz = nz.contiguous()
    return _grad(z, z, nz, nz, lse, ga, lse, ga, inv_temp, False, None, precision,
                 labels=(labels, labels, gp, gp), own_offset=0)


# ------------------------------------------------------ helpers of triton_contrastive ----
# Imported here, after the launchers (see the module docstring).
from fastcl.kernels.triton_contrastive import (  # noqa: E402
    COMBINE_BLOCK,
    EXP2,
    FWD_CONFIGS,
    GRAD_CONFIGS,
    _PTR,
    _combine_kernel,
    _grad,
    _grad_kernel,
    _lse,
    _lse_fwd_kernel,
    _signature,
    _variant,
    grad_meta,
    lse_meta,
    prune_configs,
)


def labels_configs(kind: str, d: int, dtype: torch.dtype, precision: str = "ieee") -> list:
    """The one config of a label pass ("fwd" or "grad") at (D, dtype, precision): the first
    the contrastive pruning keeps (what ``_lse_labels_tuned`` / ``_grad_labels_tuned`` run)."""
    return prune_configs(FWD_CONFIGS if kind == "fwd" else GRAD_CONFIGS, kind, d, dtype,
                         precision)[:1]


# (name, one_split, with_dscale, scale_ptr): the forward's launch forms compiled ahead of time:
# the heaviest (several splits: partial planes; dscale; the scale's load) and the one-split
# form (the finish inside the kernel).
FWD_FORMS = (("fwd/splits", False, True, True), ("fwd/one_split", True, False, False))
# (name, use_a, use_b, scale_ptr): the rows pass (labels_grad with a's statistics) and the
# symmetric pass (both sides' weights; the columns pass is it minus a's loads).
GRAD_FORMS = (("grad/rows", True, False, False), ("grad/sym", True, True, True))


def aot_variants(ds=(128,), dtypes=(torch.float32, torch.bfloat16), precisions=("ieee",),
                 every_config: bool = True) -> Iterator[dict]:
    """What can run on a GPU, in ``triton_contrastive.aot_variants``'s form (dicts: kernel,
    label, signature, constexprs, options), for tests/triton_aot.py: ``FWD_FORMS`` and
    ``GRAD_FORMS`` for each D, dtype and precision with the one config each runs
    (``every_config`` changes nothing), and the label combine (dscale, scale pointer)."""
    for dtype in dtypes:
        for d in ds:
            for precision in (precisions if dtype == torch.float32 else ("ieee",)):
                for name, one_split, ds_, sptr in FWD_FORMS:
                    meta = lse_meta(dtype, d, True, False, False, False, precision, True, ds_,
                                    one_split, sptr, has_labels=True)
                    for cfg in labels_configs("fwd", d, dtype, precision):
                        yield _variant(_lse_fwd_kernel, f"labels/{name}", dtype, d, precision,
                                       meta, cfg, sptr, f"dscale={ds_} scale_ptr={sptr}")
                for name, use_a, use_b, sptr in GRAD_FORMS:
                    meta = grad_meta(dtype, d, True, use_a, use_b, False, False, precision,
                                     sptr, has_labels=True)
                    for cfg in labels_configs("grad", d, dtype, precision):
                        yield _variant(_grad_kernel, f"labels/{name}", dtype, d, precision,
                                       meta, cfg, sptr, f"scale_ptr={sptr}")
    constexprs = dict(SCALE_PTR=True, WITH_DSCALE=True, HAS_LABELS=True, EXP2=EXP2,
                      BLOCK=COMBINE_BLOCK)
    sig = _signature(_combine_kernel, torch.float32, constexprs, "*fp64")
    yield dict(kernel=_combine_kernel, signature=sig, constexprs=constexprs,
               options=dict(num_warps=4, num_stages=1), label="labels/combine dscale scale_ptr")
