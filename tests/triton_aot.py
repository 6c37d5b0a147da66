"""Compile every variant of fastcl's Triton kernels for NVIDIA GPUs, ahead of time, on a machine
without one: ``python tests/triton_aot.py`` prints one line per variant and exits non-zero if
any fails. Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset
when the kernel module is imported, and the rest of the test session interprets).

The interpreter that runs the kernels in CI is lenient where the compiler is not (loop-carried
types, names bound inside loops, constexpr branches); this catches such errors without a GPU.
The contrastive variants come from ``triton_contrastive.aot_variants()``; the momentum
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

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# The contrastive kernels list their own variants (``triton_contrastive.aot_variants``: every
# code path of the forward, combine and backward kernels with the launchers' constexprs and the
# autotuner's configs after pruning). Each compile takes seconds, so this compiles the first
# config of each code path on sm_90 for float32 IEEE at D = 200 (D streamed in chunks) and bf16
# at D = 64 (resident row tile) and D = 512 (D chunks); on sm_80 the NT-Xent paths of bf16 at
# D = 128.
CONTRASTIVE = [  # (arch, dtypes, ds, precisions, label filter)
    (90, (F32,), (200,), ("ieee",), ""),
    (90, (BF16,), (64, 512), ("ieee",), ""),
    (80, (BF16,), (128,), ("ieee",), "nt_xent"),
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
    """The contrastive kernels: (arch, kernel, label, signature, constexprs, options)."""
    seen = set()
    for arch, dtypes, ds, precisions, only in CONTRASTIVE:
        for v in tc.aot_variants(ds=ds, dtypes=dtypes, precisions=precisions,
                                 every_config=False):
            if only not in v["label"]:
                continue
            if v["kernel"] is tc._combine_kernel:  # dtype-free: once per arch
                if (arch, v["label"]) in seen:
                    continue
                seen.add((arch, v["label"]))
            yield arch, v["kernel"], v["label"], v["signature"], v["constexprs"], v["options"]


def main() -> int:
    failures = 0
    count = 0
    for arch, kernel, name, sig, constexprs, options in _variants():
        label = f"sm_{arch} {name}"
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
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
