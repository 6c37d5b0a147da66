"""Compile every variant of fastcl's Triton kernels for NVIDIA GPUs, ahead of time, on a machine
without one: ``python tests/triton_aot.py`` prints one line per variant and exits non-zero if
any fails. Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset
when the kernel module is imported, and the rest of the test session interprets).

The interpreter that runs the kernels in CI is lenient where the compiler is not (loop-carried
types, names bound inside loops, constexpr branches); this catches such errors without a GPU.
The constexpr sets come from the launchers' own ``lse_meta`` / ``grad_meta``; the momentum
kernels (EMA over an address table, queue push) and BYOL's cosine-loss kernels are compiled
for each storage dtype.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcl.kernels import triton_contrastive as tc  # noqa: E402
from fastcl.kernels import triton_cosine as tcos  # noqa: E402
from fastcl.kernels import triton_momentum as tm  # noqa: E402

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_INPUT_PTRS = {"Q", "K", "KP", "A", "B"}
_LSE_PTRS = {"LSE", "LSE_A", "LSE_B"}
_OPTIONS = ("num_warps", "num_stages")

# (positive_rows, exclude_diag, pos_in_columns): NT-Xent, in-batch InfoNCE, InfoNCE with a queue,
# and the positive-free block of the distributed losses.
LSE_CASES = {"nt_xent": (False, True, True), "in_batch": (False, False, True),
             "queue": (True, False, False), "no_positive": (False, False, False)}
# (use_a, use_b, exclude_diag, pos_in_columns)
GRAD_CASES = {"nt_xent": (True, True, True, True), "in_batch_dq": (True, False, False, True),
              "in_batch_dk": (False, True, False, True), "queue_dq": (True, False, False, False),
              "queue_dneg": (False, True, False, False)}


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# Each compile takes seconds, so the list covers each code path once rather than the full
# product: fp32 tiles (normalized on load, IEEE or TF32 dots) vs half types (raw tiles; bf16
# casts the weights for the second product), one- vs multi-chunk D, each positive layout.
VARIANTS = [
    # (arch, kernel, case, dtype, d, precision)
    (90, "lse", "nt_xent", F32, 64, "ieee"), (90, "lse", "nt_xent", F32, 200, "tf32"),
    (90, "lse", "nt_xent", BF16, 64, "ieee"), (90, "lse", "nt_xent", BF16, 200, "ieee"),
    (90, "lse", "queue", F32, 64, "ieee"), (90, "lse", "queue", BF16, 200, "ieee"),
    (90, "lse", "in_batch", F16, 200, "ieee"), (90, "lse", "in_batch", F32, 200, "ieee"),
    (90, "grad", "nt_xent", F32, 200, "ieee"), (90, "grad", "nt_xent", BF16, 200, "ieee"),
    (90, "grad", "nt_xent", F16, 64, "ieee"), (90, "grad", "in_batch_dk", F32, 64, "tf32"),
    (90, "grad", "queue_dq", BF16, 200, "ieee"), (90, "grad", "queue_dneg", F32, 200, "ieee"),
    (80, "lse", "nt_xent", BF16, 200, "ieee"), (80, "grad", "nt_xent", BF16, 200, "ieee"),
    (90, "lse", "no_positive", F32, 64, "ieee"), (90, "lse", "no_positive", BF16, 200, "ieee"),
]


# The momentum kernels: (arch, kernel name, storage dtype, momentum on the device).
MOMENTUM_VARIANTS = [
    (90, "ema", F32, False), (90, "ema", BF16, True), (90, "ema", F16, False),
    (80, "ema", BF16, False), (90, "queue", F32, None), (90, "queue", BF16, None),
]


def _signature_variants():
    """Momentum and cosine-loss kernels: (arch, kernel, label, signature, constexprs) with the
    launchers' own argument types."""
    for arch, which, dtype, on_device in MOMENTUM_VARIANTS:
        if which == "ema":
            constexprs = {"M_ON_DEVICE": on_device, "DTYPE": tm._TL_DTYPES[dtype],
                          "BLOCK": 4096}
            sig = {"t_addr": "*i64", "s_addr": "*i64", "sizes": "*i64", "block_tensor": "*i32",
                   "block_start": "*i64", "m_ptr": "*fp64" if on_device else _PTR[dtype],
                   "m_val": "fp32", "om_val": "fp32"}
            label = f"ema {str(dtype)[6:]} momentum on {'device' if on_device else 'host'}"
            kernel = tm._ema_kernel
        else:
            constexprs = {"BLOCK_D": 128}
            sig = {"queue": _PTR[dtype], "ptr": "*i64", "keys": _PTR[dtype], "K": "i32",
                   "D": "i32", "first": "i32"}
            label = f"queue_push {str(dtype)[6:]}"
            kernel = tm._queue_push_kernel
        sig.update({k: "constexpr" for k in constexprs})
        yield arch, kernel, label, sig, constexprs
    # BYOL's cosine loss, forward and backward (float32 statistics and gradient).
    for arch, dtype in ((90, F32), (90, BF16), (80, F16)):
        common = {"B": "i32", "F": "i32", "stride_p": "i32", "stride_z": "i32"}
        blocks = {"BLOCK_M": tcos._BLOCK_M, "BLOCK_F": tcos._block_f(256)}
        fwd = dict(blocks, EPS_=tcos.EPS)
        sig = {"p_ptr": _PTR[dtype], "z_ptr": _PTR[dtype], "loss_ptr": "*fp32",
               "stats_ptr": "*fp32", **common, **{k: "constexpr" for k in fwd}}
        yield arch, tcos._cosine_fwd_kernel, f"cosine_fwd {str(dtype)[6:]}", sig, fwd
        bwd = dict(blocks, INV_EPS=1.0 / tcos.EPS)
        sig = {"g_ptr": "*fp32", "p_ptr": _PTR[dtype], "z_ptr": _PTR[dtype],
               "stats_ptr": "*fp32", "dp_ptr": "*fp32", **common,
               **{k: "constexpr" for k in bwd}}
        yield arch, tcos._cosine_bwd_kernel, f"cosine_bwd {str(dtype)[6:]}", sig, bwd


def _variants():
    for arch, which, case, dtype, d, precision in VARIANTS:
        if which == "lse":
            meta = tc.lse_meta(dtype, d, True, *LSE_CASES[case], precision)
            yield arch, tc._lse_fwd_kernel, f"lse/{case}", dtype, d, meta, precision
        else:
            meta = tc.grad_meta(dtype, d, True, *GRAD_CASES[case], precision)
            yield arch, tc._grad_kernel, f"grad/{case}", dtype, d, meta, precision


def _signature(kernel, dtype, constexprs):
    sig = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in _INPUT_PTRS:
            sig[arg] = _PTR[dtype]
        elif arg in _LSE_PTRS:  # the row lse is float64 (see triton_contrastive)
            sig[arg] = "*fp64"
        elif arg.isupper():
            sig[arg] = "*fp32"
        elif arg == "inv_temp":
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return sig


def main() -> int:
    failures = 0
    count = 0
    for arch, kernel, name, dtype, d, meta, precision in _variants():
        constexprs = {k: v for k, v in meta.items() if k not in _OPTIONS}
        options = {k: v for k, v in meta.items() if k in _OPTIONS}
        label = f"sm_{arch} {name} {str(dtype)[6:]} d={d} {precision}"
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs),
                            constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm.get("cubin"), "no cubin"
            print(f"ok   {label}")
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}".splitlines()[0])
        count += 1
    for arch, kernel, name, sig, constexprs in _signature_variants():
        label = f"sm_{arch} {name}"
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": 4})
            assert compiled.asm.get("cubin"), "no cubin"
            print(f"ok   {label}")
        except Exception as exc:
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}".splitlines()[0])
        count += 1
    print(f"compiled {count - failures} of {count} variants (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
