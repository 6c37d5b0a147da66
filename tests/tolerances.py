"""Tolerance rule (after flash-attention's tests) and eager same-dtype baselines.

A fastcl result is compared with the float64 reference. Its error may be at most twice the
error of plain eager PyTorch (the "baseline"), plus a small atol: fastcl must be as accurate as
what users run today, whatever the dtype.

The baseline computes from the same inputs as fastcl (already rounded to their dtype) with
logits in the accumulation dtype: float32 for float32, bfloat16 and float16 inputs (as
autocast runs ``cross_entropy``), float64 for float64. Its loss is in that dtype and its
gradients, through the cast, in each input's dtype, as fastcl's are. The atol of a loss is
that of its accumulation dtype (``acc``); the atol of a gradient that of its input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcl import reference

# Floors for the comparison: float32 errors of eager PyTorch can be exactly 0 on tiny inputs.
# Relative to max(1, max |oracle|).
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of inputs in ``dtype`` (and of fastcl's loss)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _widen(*xs):
    return [None if x is None else x.to(acc(x.dtype)) for x in xs]


def eager_nt_xent(z1, z2, temperature, reduction="mean"):
    """NT-Xent as lightly computes it (the reference's formula), from the inputs as given with
    logits in the accumulation dtype."""
    logits, labels = reference.nt_xent_logits(*_widen(z1, z2), temperature)
    return F.cross_entropy(logits, labels, reduction=reduction)


def eager_info_nce(query, positive_key, negative_keys, temperature, reduction="mean",
                   negative_mode="unpaired"):
    """info-nce-pytorch's formulation (the reference's), from the inputs as given with logits
    in the accumulation dtype."""
    logits, labels = reference.info_nce_logits(*_widen(query, positive_key, negative_keys),
                                               temperature, negative_mode)
    return F.cross_entropy(logits, labels, reduction=reduction)


def max_err(a: torch.Tensor, oracle: torch.Tensor) -> float:
    return (a.detach().double() - oracle.detach().double()).abs().max().item()


def assert_within_rule(actual, oracle, baseline, dtype, what="value", floor=0.0):
    """|actual - oracle| <= 2 * |baseline - oracle| + atol(dtype) * max(1, |oracle|) (maxima),
    plus ``floor``: an absolute error no implementation in ``dtype`` can avoid (one rounding of
    logits of size 1/tau, where eager's own error is small only by the luck of correlated
    roundings)."""
    err = max_err(actual, oracle)
    base = max_err(baseline, oracle)
    scale = max(1.0, oracle.detach().double().abs().max().item()) if oracle.numel() else 1.0
    bound = 2.0 * base + ATOL[dtype] * scale + floor
    assert err <= bound, (
        f"{what}: fastcl error {err:.3g} exceeds 2 x eager {dtype} error {base:.3g} "
        f"+ atol {ATOL[dtype]:.1g}" + (f" + floor {floor:.2g}" if floor else "")
    )


# The C++ kernels' bf16 products (csrc/bf16.h, where the build has them): each gradient
# product's weights are split into two bfloat16 (16 significant bits, a relative rounding of at
# most 2^-17 where float32 has 2^-24), the logits are exact products summed in float32.
# Kernel-level float32 outputs from bf16 inputs may carry that much more error than eager
# float32's: a floor of 2^-14 of the output's size (the sums' growth over the tiles included).
BF16_PRODUCTS_FLOOR = 2.0 ** -14


def products_floor(module: str, dtype: torch.dtype, oracle: torch.Tensor) -> float:
    """The extra absolute error allowed a kernel-level output of ``module`` for ``dtype``
    inputs: the bf16 products' (above) for bf16 inputs to the C++ kernels with bf16 products
    on, else 0."""
    if module != "cpp" or dtype != torch.bfloat16:
        return 0.0
    from fastcl.kernels import cpp

    if not cpp.bf16_products():
        return 0.0
    return BF16_PRODUCTS_FLOOR * max(1.0, oracle.detach().double().abs().max().item())


def bf16_product_settings(module: str, dtype: torch.dtype):
    """The settings of the C++ kernels' bf16 products a kernel-level test of ``module`` with
    ``dtype`` inputs runs under: both (on, then off: the widening path of CPUs without them)
    for bf16 inputs to a build that has them, else just the build's own (None)."""
    if module != "cpp" or dtype != torch.bfloat16:
        return [None]
    from fastcl.kernels import cpp

    return [True, False] if cpp.bf16_products() else [None]


class bf16_products:
    """Context manager: the C++ kernels' bf16 products switched to ``enabled`` (None: left as
    they are), restored on exit."""

    def __init__(self, enabled):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled is not None:
            from fastcl.kernels import cpp

            self.before = cpp.bf16_products()
            cpp.bf16_products(self.enabled)
        return self

    def __exit__(self, *exc):
        if self.enabled is not None:
            from fastcl.kernels import cpp

            cpp.bf16_products(self.before)
