"""Custom ops for the momentum family ("fastcl::ema_", "fastcl::queue_push_").

``fastcl::ema_(Tensor(a!)[] targets, Tensor[] sources, Tensor momentum) -> ()``
    targets[i] <- momentum * targets[i] + (1 - momentum) * sources[i], in place, float32
    arithmetic (float64 for float64). ``momentum`` is a 0-dim tensor: a new value every step
    does not recompile under torch.compile, and one on the device is never read on the host.
``fastcl::queue_push_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> ()``
    Row (ptr + i) mod K of ``queue`` <- keys[i] cast to queue's dtype (only the last K keys
    when B > K: the earlier ones would be overwritten); ``ptr`` <- (ptr + B) mod K. ``ptr`` is
    never read on the host.

Backends (``fastcl.ops._backend.implementation(t, "momentum")``): C++ on CPU, Triton on CUDA,
``fastcl.kernels.torch_momentum`` as the fallback. Arguments are checked in
``fastcl.functional``; these ops trust them.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from fastcl import _config
from fastcl.ops import _backend
from fastcl.ops._backend import implementation


@torch.library.custom_op("fastcl::ema_", mutates_args=("targets",))
def ema_(targets: List[Tensor], sources: List[Tensor], momentum: Tensor) -> None:
    if targets:
        implementation(targets[0], "momentum").ema_(list(targets), list(sources), momentum)


@ema_.register_fake
def _(targets, sources, momentum) -> None:
    return None


@torch.library.custom_op("fastcl::queue_push_", mutates_args=("queue", "ptr"))
def queue_push_(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    implementation(queue, "momentum").queue_push_(queue, ptr, keys)


@queue_push_.register_fake
def _(queue, ptr, keys) -> None:
    return None


def _bump_versions(tensors: List[Tensor]) -> None:
    """What the custom op's ADInplaceOrView step does: mark the tensors modified in place, so
    that autograd still catches a saved tensor that was changed."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def ema(targets: List[Tensor], sources: List[Tensor], momentum: Tensor) -> None:
    """``fastcl::ema_`` under tracing (torch.compile, export); in eager mode the same backend
    kernel called directly, with the version counters bumped as the op would. The custom op's
    Python dispatch costs about 1.6 us per tensor, 0.26 ms for a ResNet-50's 161 tensors."""
    if torch.compiler.is_compiling() or not targets:
        ema_(targets, sources, momentum)
        return
    implementation(targets[0], "momentum").ema_(list(targets), list(sources), momentum)
    _bump_versions(list(targets))


# Dynamo knows it by identity and answers True while tracing; export's and AOTAutograd's tracing
# (fake or functional tensor subclasses, dispatch modes) is turned away by the other checks.
# One Python frame, where torch.compiler.is_compiling is two (about 13 us with cold caches).
_is_compiling = torch.compiler.is_dynamo_compiling
_CPP_BACKENDS = ("auto", "cpp")  # the backends under which CPU tensors run the C++ kernels


def try_eager_cpu_push(queue, ptr, keys) -> bool:
    """``fastcl.queue_push_`` on plain CPU tensors in eager mode, in one call into the C++ op
    ``fastcl_cpu::queue_push_eager_``; False, with nothing done, where that path does not apply
    (tracing, another backend, the C++ kernels not loaded yet, tensor subclasses, another
    device, an active dispatch mode or functorch transform, arguments that fail
    ``fastcl.functional.queue_push_``'s checks, which then raise).

    Why: with its caches cold (a 32 MiB clone between pushes, or a training step) each Python
    check, ``detach``, backend look-up and version bump of the checked path cost 30-50 us on a
    2-core VM, several times the 128 KiB copy (see benchmarks/bench_queue.py).
    """
    cpp = _backend._cpp_module
    if (cpp is None or _config._backend not in _CPP_BACKENDS or _is_compiling()
            or type(queue) is not Tensor or type(ptr) is not Tensor or type(keys) is not Tensor):
        return False
    return cpp.queue_push_eager_(queue, ptr, keys)  # False for other devices too


def queue_push(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """``fastcl::queue_push_`` under tracing; the backend kernel directly in eager mode (see
    :func:`ema`)."""
    if torch.compiler.is_compiling():
        queue_push_(queue, ptr, keys)
        return
    implementation(queue, "momentum").queue_push_(queue, ptr, keys)
    _bump_versions([queue, ptr])
