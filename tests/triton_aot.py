"""Compile fastcl's Triton kernels for NVIDIA GPUs ahead of time, on a machine without one, as
the JIT would compile them, and check their resources: ``python tests/triton_aot.py`` prints one
line per variant (registers, spills, shared memory) and exits non-zero if any variant fails to
compile, spills, or needs more shared memory per block than its architecture allows. Run by
tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset when the kernel
modules are imported, and the rest of the test session interprets).

What is compiled: what the JIT compiles for a launch. Each variant gives the launcher's
arguments for a representative call (the benchmarks' sizes: N = 256 rows per view, a queue of
16384 keys, contiguous rows); they go through the JIT's own binder (``specialize_impl``), so
pointers get ``tt.divisibility = 16`` (torch allocations are 16-byte aligned, as triton's
MockTensor assumes), integers divisible by 16 (D, row strides, sizes) get it too, and integers
equal to 1 (the inner strides) become constants, exactly as ``JITFunction.run`` would do. Where
the binder or ``_pack_args`` is missing (another triton), the same rules are applied here.

The variants of the contrastive kernels come from the kernel module: if
``fastcl.kernels.triton_contrastive`` defines ``aot_variants(d, dtype)``, an iterable of
``(name, jit_function, signature, constexprs, options[, args])`` (signature: parameter name ->
triton type string such as ``"*fp32"`` or ``"i32"``; constexprs: name -> value; options:
``num_warps`` / ``num_stages``; args: name -> the representative runtime value of each integer
or float parameter; for float32, both the IEEE and the TF32 variants), those are compiled;
without ``args``, inner strides (``stride_*d``) are taken as 1 and other integers as multiples
of 16. Otherwise the variants are built from the
launchers' ``lse_meta`` / ``grad_meta``. The SigLIP sigmoid epilogue's kernels
(``triton_sigmoid.aot_variants``: the heaviest form of each pass), the momentum kernels (EMA over
an address table, queue push) and BYOL's cosine-loss kernels are added for each (D, dtype);
SupCon's label passes (``triton_labels.aot_variants``, HAS_LABELS forms of the contrastive
kernels) for sm_90 at D = 128 only (``LABELS_DIMS``: 11 compiles).

The matrix (documented choice, to stay near 2 minutes of CI on 2 cores): D in {64, 128, 256,
1024} x storage dtype in {float32 (IEEE and TF32 products), bfloat16, float16} x every code
path, all of it for sm_90 (the H100/H200 class the benchmarks run on); for sm_80 and sm_89 one
group per dtype, D rotating over {64, 128, 256} (group (D_i, dtype_j) goes to sm_80 when
(i + j) % 3 == 0 and to sm_89 when it is 1), so that each architecture sees every dtype and
every code path, and the two between them every tiling class (IEEE chunks; TF32 resident and
chunked; bf16/fp16 resident at 64 and 128 and chunked). D = 1024 is compiled for sm_90 only:
the contrastive kernels tile it as D = 256 (the same compiles), so elsewhere it would add only
the small momentum and cosine kernels. Each group compiles every code path with the first
autotune config the kernels' pruning keeps; for sm_90 at D = 128 (the benchmarks' width), every
kept config (the autotuner may pick any of them). Variants whose specialization is identical
(same arch, signature, constants, attributes and options: e.g. D = 256 and D = 1024, or every D
of the float32 IEEE path, whose tiles do not depend on D) are compiled once and reported on each
of their lines. The pipeline depths the kernels keep were chosen by compiling every depth of
every tiling class for all three architectures (see ``_stages`` in the kernel module): a spill
on one architecture removes that depth for all.

Resources: shared memory is the compiled kernel's ``metadata.shared`` (bytes per block,
including the dynamic part); registers and spills come from the cubin's resource usage
(``cuobjdump --dump-resource-usage``, shipped with triton): ``REG`` and the per-thread local
memory ``STACK + LOCAL`` in bytes, what the driver reports as the function's NUM_REGS and
LOCAL_SIZE_BYTES once it is loaded on a device (which needs a GPU), and triton as
``CompiledKernel.n_regs`` and ``n_spills`` (local bytes / 4). Any local memory fails: on
these kernels it is register spilling (ptxas -v: "N bytes spill stores").

    python tests/triton_aot.py [--archs 80,89,90] [--dims 64,128,256,1024] [--workers 2]
                               [--match sigmoid/]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, without a warning
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcl.kernels import triton_contrastive as tc  # noqa: E402
from fastcl.kernels import triton_cosine as tcos  # noqa: E402
from fastcl.kernels import triton_labels as tlab  # noqa: E402
from fastcl.kernels import triton_momentum as tm  # noqa: E402
from fastcl.kernels import triton_sigmoid as tsig  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ARCHS = (80, 89, 90)
DIMS = (64, 128, 256, 1024)
# Every autotune config the kernels' pruning keeps is compiled for sm_90 at this D (the
# benchmarks' width); the other (arch, D) groups compile each code path with its first config.
ALL_CONFIGS_D = 128
DTYPES = (F32, BF16, F16)
FULL_ARCH = 90  # every (D, dtype) group; the other archs get a rotating subset
# Shared memory per block (bytes), with the opt-in carve-out: A100, L4/RTX 40xx/L40, H100/H200.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# The benchmarks' sizes: rows per view, queue length.
N, K_QUEUE = 256, 16384

_PTR = {F32: "*fp32", BF16: "*bf16", F16: "*fp16", torch.float64: "*fp64"}
_TORCH = {"fp32": F32, "fp64": torch.float64, "bf16": BF16, "fp16": F16, "i64": torch.int64,
          "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
          "i1": torch.bool}


def _short(dtype) -> str:
    return {F32: "fp32", BF16: "bf16", F16: "fp16"}[dtype]


# ------------------------------------------------------------------------------ variants ----
# A variant: (name, jit_function, signature, constexprs, options, args).

# (positive_rows, exclude_diag, pos_in_columns): NT-Xent, in-batch InfoNCE, InfoNCE with a queue,
# and the positive-free block of the distributed losses.
LSE_CASES = {"nt_xent": (False, True, True), "in_batch": (False, False, True),
             "queue": (True, False, False), "no_positive": (False, False, False)}
# (use_a, use_b, exclude_diag, pos_in_columns)
GRAD_CASES = {"nt_xent": (True, True, True, True), "in_batch_dq": (True, False, False, True),
              "in_batch_dk": (False, True, False, True), "queue_dq": (True, False, False, False),
              "queue_dneg": (False, True, False, False)}
_OPTIONS = ("num_warps", "num_stages")


def _split(meta):
    return ({k: v for k, v in meta.items() if k not in _OPTIONS},
            {k: v for k, v in meta.items() if k in _OPTIONS})


def _legacy_contrastive_variants(d, dtype):
    """The launchers' own calls (``_lse`` / ``_grad``), argument by argument, for each code
    path; used while the kernel module has no ``aot_variants``."""
    x, nrm, f64 = _PTR[dtype], "*fp32", "*fp64"
    # Half types ignore the precision (their dots are native); float32 has both.
    precisions = ("ieee", "tf32") if dtype == F32 else ("tf32",)
    for precision in precisions:
        tag = f" {precision}" if dtype == F32 else ""
        for case, flags in LSE_CASES.items():
            n_q, n_k, pos = {"nt_xent": (2 * N, 2 * N, N), "in_batch": (N, N, 0),
                             "queue": (N, K_QUEUE, 0), "no_positive": (2 * N, 2 * N, 0)}[case]
            cx, opts = _split(tc.lse_meta(dtype, d, True, *flags, precision))
            sig = {"Q": x, "K": x, "NQ": nrm, "NK": nrm, "KP": x, "NP": nrm, "LOSS": "*fp32",
                   "LSE": f64}
            args = {"n_q": n_q, "n_k": n_k, "d": d, "pos_offset": pos,
                    "stride_qm": d, "stride_qd": 1, "stride_km": d, "stride_kd": 1,
                    "stride_pm": d, "stride_pd": 1, "inv_temp": 10.0}
            yield f"lse/{case}{tag}", tc._lse_fwd_kernel, sig, cx, opts, args
        for case, flags in GRAD_CASES.items():
            use_a, use_b = flags[0], flags[1]
            n_a, n_b, pos = {"nt_xent": (2 * N, 2 * N, N), "in_batch_dq": (N, N, 0),
                             "in_batch_dk": (N, N, 0), "queue_dq": (N, K_QUEUE, 0),
                             "queue_dneg": (K_QUEUE, N, 0)}[case]
            cx, opts = _split(tc.grad_meta(dtype, d, True, *flags, precision))
            # A missing lse / g is the norm tensor (float32) passed as a dummy, as in _grad.
            sig = {"A": x, "B": x, "NA": nrm, "NB": nrm, "LSE_A": f64 if use_a else nrm,
                   "G_A": nrm, "LSE_B": f64 if use_b else nrm, "G_B": nrm, "OUT": "*fp32"}
            args = {"n_a": n_a, "n_b": n_b, "d": d, "pos_offset": pos,
                    "stride_am": d, "stride_ad": 1, "stride_bm": d, "stride_bd": 1,
                    "stride_om": d, "inv_temp": 10.0}
            yield f"grad/{case}{tag}", tc._grad_kernel, sig, cx, opts, args


def _contrastive_variants(d, dtype, every_config=True):
    provided = getattr(tc, "aot_variants", None)
    if provided is None:
        yield from _legacy_contrastive_variants(d, dtype)
        return
    import inspect

    if "ds" in inspect.signature(provided).parameters:
        # The kernel module's form: dicts (kernel, signature, constexprs, options, label) for
        # the D values, dtypes, precisions and autotune configs asked for.
        for item in provided(ds=(d,), dtypes=(dtype,), precisions=("ieee", "tf32"),
                             every_config=every_config):
            fn = item["kernel"]
            while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
                fn = fn.fn
            yield (item["label"], fn, dict(item["signature"]), dict(item["constexprs"]),
                   dict(item["options"]), None)
        return
    for item in provided(d, dtype):
        name, fn, sig, cx, opts = item[:5]
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
            fn = fn.fn  # an Autotuner / Heuristics wrapper: the JITFunction inside
        args = dict(item[5]) if len(item) > 5 and item[5] is not None else None
        yield name, fn, dict(sig), dict(cx), dict(opts or {}), args


def _sigmoid_variants(d, dtype, every_config=True):
    """The SigLIP sigmoid epilogue's kernels (``triton_sigmoid.aot_variants``: the heaviest form
    of each pass, one config each, and the split combine), in the contrastive variants' form.
    ``full_arch_only`` names those compiled for FULL_ARCH alone (see ``build``)."""
    for item in tsig.aot_variants(ds=(d,), dtypes=(dtype,), precisions=("ieee", "tf32"),
                                  every_config=every_config):
        yield (item["label"], item["kernel"], dict(item["signature"]),
               dict(item["constexprs"]), dict(item["options"]), None)


# The label positives (SupCon; ``triton_labels.aot_variants``: HAS_LABELS forms of the
# contrastive kernels, one config per pass): compiled for FULL_ARCH at these D only (the
# benchmarks' width; the label code adds a few registers to tilings every D of which the
# contrastive variants compile), for float32 IEEE and bfloat16 every form, for TF32 the two
# heaviest (the split forward with dscale, the symmetric gradient): 11 compiles in all.
LABELS_DIMS = (128,)
LABELS_TF32 = ("labels/fwd/splits", "labels/grad/sym")


def _labels_variants(d, dtype, every_config=True):
    if d not in LABELS_DIMS or dtype not in (F32, BF16):
        return
    for item in tlab.aot_variants(ds=(d,), dtypes=(dtype,), precisions=("ieee", "tf32"),
                                  every_config=every_config):
        if " tf32 " in item["label"] and not item["label"].startswith(LABELS_TF32):
            continue
        yield (item["label"], item["kernel"], dict(item["signature"]),
               dict(item["constexprs"]), dict(item["options"]), None)


# Compiled for FULL_ARCH only: the sigmoid gradient-only pass, the lightest of the three
# (sm_90: 104-178 registers, against 138-255 for the rows passes). Compiled once (Triton 3.9)
# for every sm_80 / sm_89 group of the rotation, with the config it runs: 100-140 registers,
# no spills; there it would add 8 compiles (~12 CPU s) to every CI run.
FULL_ARCH_ONLY = ("sigmoid/grad/", "labels/")


def full_arch_only(name: str) -> bool:
    return name.startswith(FULL_ARCH_ONLY)


def _other_variants(d, dtype):
    """The momentum and cosine-loss kernels, as their launchers call them (default launch
    options: the launchers pass none)."""
    x = _PTR[dtype]
    for on_device in (False, True):  # momentum as a host float / as a device tensor
        cx = {"M_ON_DEVICE": on_device, "DTYPE": tm._TL_DTYPES[dtype], "BLOCK": tm._block()}
        sig = {"t_addr": "*i64", "s_addr": "*i64", "sizes": "*i64", "block_tensor": "*i32",
               "block_start": "*i64", "m_ptr": "*fp64" if on_device else x,
               "m_val": "fp32", "om_val": "fp32"}
        args = {"m_val": 0.0, "om_val": 0.0} if on_device else {"m_val": 0.99, "om_val": 0.01}
        yield f"ema momentum on {'device' if on_device else 'host'}", tm._ema_kernel, sig, cx, \
            {}, args
    cx = {"BLOCK_D": min(triton.next_power_of_2(d), 1024)}
    sig = {"queue": x, "ptr": "*i64", "keys": x, "K": "i32", "D": "i32", "first": "i32"}
    yield "queue_push", tm._queue_push_kernel, sig, cx, {}, {"K": K_QUEUE, "D": d, "first": 0}
    blocks = {"BLOCK_M": tcos._BLOCK_M, "BLOCK_F": tcos._block_f(d)}
    ints = {"B": N, "F": d, "stride_p": d, "stride_z": d}
    sig = {"p_ptr": x, "z_ptr": x, "loss_ptr": "*fp32", "stats_ptr": "*fp32",
           "B": "i32", "F": "i32", "stride_p": "i32", "stride_z": "i32"}
    yield "cosine_fwd", tcos._cosine_fwd_kernel, sig, dict(blocks, EPS_=tcos.EPS), {}, ints
    sig = {"g_ptr": "*fp32", "p_ptr": x, "z_ptr": x, "stats_ptr": "*fp32", "dp_ptr": "*fp32",
           "B": "i32", "F": "i32", "stride_p": "i32", "stride_z": "i32"}
    yield "cosine_bwd", tcos._cosine_bwd_kernel, sig, dict(blocks, INV_EPS=1.0 / tcos.EPS), \
        {}, ints


def archs_for(d_index: int, dtype_index: int, archs) -> list:
    """The architectures that compile group (D_i, dtype_j): FULL_ARCH always; for i < 3
    (D in {64, 128, 256}) sm_80 when (i + j) % 3 == 0, sm_89 when it is 1 (each then sees every
    dtype, and between them every tiling class). D = 1024 only on FULL_ARCH: its tiles are
    D = 256's (the contrastive kernels' compiles are the same), so on sm_80 / sm_89 it would add
    only the small momentum and cosine kernels."""
    out = []
    for arch in archs:
        if arch == FULL_ARCH or arch not in (80, 89):
            out.append(arch)
        elif d_index < 3 and (d_index + dtype_index) % 3 == (0 if arch == 80 else 1):
            out.append(arch)
    return out


# --------------------------------------------------------------------- specialization ----


def _default_int(name: str, d: int) -> int:
    """Without the launcher's value (aot_variants gave no args): the inner stride is 1 (rows
    are contiguous), every other integer a multiple of 16."""
    return 1 if name.startswith("stride_") and name.endswith("d") else d


def _mock_args(fn, sig, cx, args, d):
    """Positional runtime arguments in the kernel's parameter order (constexprs go as keywords):
    pointers as 16-byte aligned mock tensors of their dtype, scalars as given."""
    from triton.runtime.jit import MockTensor
    out = []
    for name in fn.arg_names:
        if name in cx:
            continue
        ty = sig.get(name)
        if ty is None and (args is None or name not in args):
            raise KeyError(f"no type and no value for parameter {name!r}")
        if ty is not None and ty.startswith("*"):
            out.append(MockTensor(_TORCH[ty.lstrip("*k")]))
        elif args is not None and name in args:
            out.append(args[name])
        elif ty.startswith(("fp", "bf")):  # the JIT does not specialize floats
            out.append(1.0)
        else:
            out.append(_default_int(name, d))
    return out


def jit_specialization(fn, sig, cx, opts, args, d, target):
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` builds them for a launch
    with these arguments on ``target``."""
    from triton.compiler import make_backend
    backend = make_backend(target)
    positional = _mock_args(fn, sig, cx, args, d)
    kwargs = dict(cx, **opts)
    try:
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*positional, **kwargs)
    except (ImportError, TypeError, AttributeError):
        return _manual_specialization(fn, positional, cx, opts, backend)
    if hasattr(fn, "_pack_args"):  # triton >= 3.7: the JIT's own packing
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                             specialization, options)
        return signature, constexprs, attrs, options.__dict__
    # triton 3.5 / 3.6: run() does the same inline.
    names = [p.name for p in fn.params]
    values = list(bound.values())
    signature = {n: s[0] for n, s in zip(names, specialization)}
    constexprs = {(i,): values[i] for i, s in enumerate(specialization) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(specialization)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    return signature, constexprs, attrs, backend.parse_options(kwargs).__dict__


def _manual_specialization(fn, positional, cx, opts, backend):
    """The JIT's rules, written out: 16-byte aligned pointers and integers divisible by 16 get
    ``tt.divisibility = 16``; integers equal to 1 become constants."""
    signature, constexprs, attrs = {}, {}, {}
    it = iter(positional)
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            signature[name] = "constexpr"
            constexprs[(i,)] = cx[name]
            continue
        value = next(it)
        if hasattr(value, "data_ptr"):
            ty = _PTR.get(value.dtype) or "*" + {torch.int64: "i64", torch.int32: "i32"}[value.dtype]
            signature[name], attrs[(i,)] = ty, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, backend.parse_options(dict(cx, **opts)).__dict__


# ----------------------------------------------------------------------------- resources ----

_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _tool(name):
    try:
        return getattr(triton.knobs.nvidia, name).path
    except Exception:  # older knobs: the binary shipped with the backend
        import triton.backends.nvidia as nv
        return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def resources(compiled):
    """(registers, local memory bytes per thread, shared memory bytes per block); triton 3.9
    leaves n_regs / n_spills unset until a kernel is loaded on a device."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", fh.name],
                             capture_output=True, text=True, check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {out[-300:]!r}")
    regs, stack, _static_smem, local = map(int, m.groups())
    return regs, stack + local, int(compiled.metadata.shared)


# ------------------------------------------------------------------------------- driver ----

_JOBS: list = []  # filled before the pool forks; workers get indices


def _compile(index):
    arch, fn, signature, constexprs, attrs, options = _JOBS[index]
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin")
        regs, spills, smem = resources(compiled)
        return {"regs": regs, "spills": spills, "smem": smem,
                "warps": compiled.metadata.num_warps, "s": time.perf_counter() - t0}
    except Exception as exc:  # report every failing variant, then fail
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        return {"error": msg, "s": time.perf_counter() - t0}


def build(archs=ARCHS, dims=DIMS, match=None):
    """[(label, job index)] and the distinct jobs, in a fixed order (only the variants whose
    label contains ``match``, when given)."""
    lines, keys = [], {}
    for i, d in enumerate(dims):
        for j, dtype in enumerate(DTYPES):
            targets = archs_for(DIMS.index(d) if d in DIMS else i, j, archs)
            by_configs = {}
            for every in {arch == FULL_ARCH and d == ALL_CONFIGS_D for arch in targets}:
                try:
                    by_configs[every] = (list(_contrastive_variants(d, dtype, every))
                                         + list(_sigmoid_variants(d, dtype, every))
                                         + list(_labels_variants(d, dtype, every)))
                except Exception as exc:  # aot_variants itself failed: one failing line
                    lines.append((f"aot_variants({d}, {_short(dtype)})",
                                  f"{type(exc).__name__}: {exc}".splitlines()[0]))
                    by_configs[every] = []
            others = list(_other_variants(d, dtype))
            for arch in targets:
                target = GPUTarget("cuda", arch, 32)
                variants = by_configs[arch == FULL_ARCH and d == ALL_CONFIGS_D] + others
                for name, fn, sig, cx, opts, args in variants:
                    label = f"sm_{arch} {name} {_short(dtype)} d={d}"
                    if match is not None and match not in label:
                        continue
                    if arch != FULL_ARCH and full_arch_only(name):
                        continue
                    try:
                        spec = jit_specialization(fn, sig, cx, opts, args, d, target)
                    except Exception as exc:
                        lines.append((label, f"specialization failed: {type(exc).__name__}: "
                                             f"{exc}".splitlines()[0]))
                        continue
                    signature, constexprs, attrs, options = spec
                    key = (arch, id(fn), repr(sorted(signature.items())),
                           repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                           repr(sorted(options.items())))
                    if key not in keys:
                        keys[key] = len(_JOBS)
                        _JOBS.append((arch, fn, signature, constexprs, attrs, options))
                    lines.append((label, keys[key]))
    return lines


def check(res, arch):
    """Why a compiled variant fails the resource check, or None."""
    if "error" in res:
        return res["error"]
    problems = []
    if res["spills"]:
        problems.append(f"spills: {res['spills']} bytes of local memory per thread")
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and res["smem"] > limit:
        problems.append(f"shared memory {res['smem']} > {limit} bytes per block on sm_{arch}")
    return "; ".join(problems) or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)))
    ap.add_argument("--dims", default=",".join(map(str, DIMS)))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--match", default=None,
                    help="compile only the variants whose label contains this string")
    ns = ap.parse_args(argv)
    archs = [int(a) for a in ns.archs.split(",")]
    dims = [int(d) for d in ns.dims.split(",")]
    t0 = time.perf_counter()
    lines = build(archs, dims, ns.match)
    source = "aot_variants" if hasattr(tc, "aot_variants") else "lse_meta/grad_meta"
    print(f"matrix: {len(lines)} variants ({len(_JOBS)} distinct compiles), D in {dims}, "
          f"archs {['sm_%d' % a for a in archs]}, contrastive variants from {source}, "
          f"triton {triton.__version__}", flush=True)
    if ns.workers > 1 and len(_JOBS) > 1:
        ctx = multiprocessing.get_context("fork")  # workers inherit _JOBS
        with ctx.Pool(ns.workers) as pool:
            results = pool.map(_compile, range(len(_JOBS)), chunksize=1)
    else:
        results = [_compile(i) for i in range(len(_JOBS))]
    failures, seen = 0, set()
    for label, job in lines:
        if isinstance(job, str):
            failures += 1
            print(f"FAIL {label}: {job}")
            continue
        arch = _JOBS[job][0]
        res = results[job]
        why = check(res, arch)
        same = "  (same compile as above)" if job in seen else ""
        seen.add(job)
        stats = ("" if "error" in res else
                 f"regs={res['regs']:3d} spills={res['spills']} smem={res['smem']}/"
                 f"{SMEM_LIMIT.get(arch, '?')} warps={res['warps']} {res['s']:.1f}s")
        if why:
            failures += 1
            print(f"FAIL {label:<44} {stats}: {why}{same}")
        else:
            print(f"ok   {label:<44} {stats}{same}")
    compiled = sum(1 for r in results if "error" not in r)
    print(f"compiled {compiled} of {len(_JOBS)} distinct kernels for {len(lines)} variants; "
          f"{failures} failed the check; {time.perf_counter() - t0:.0f} s with {ns.workers} "
          f"workers (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
