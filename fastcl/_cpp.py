"""Build and load fastcl's C++ CPU kernels (``csrc/``) on first use.

The kernels are compiled with ``torch.utils.cpp_extension`` and ninja into a cache directory
keyed by everything the binary depends on: the sources, the compiler flags, the torch and Python
versions and the CPU's instruction set (the build targets the machine it runs on). The first
build prints one line and takes about half a minute; later processes load the cached library
without a compiler. Concurrent first builds (DDP ranks, test workers) wait on one another
through cpp_extension's lock file.

Loading registers the ``torch.ops.fastcl_cpu`` operators. ``load()`` raises
:class:`CppUnavailable` when they cannot be built (no compiler, no ninja), saying how to get them.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional

import torch

from fastcl import _config

_SOURCES = ("contrastive.cpp", "clip.cpp", "labels.cpp", "sigmoid.cpp", "dense.cpp", "momentum.cpp",
            "cosine.cpp", "registration.cpp")
_HEADERS = ("bf16.h", "fast_exp.h", "tiling.h")
_HOW_TO = (
    "the C++ CPU kernels need a C++ compiler (g++ or clang++, found as $CXX or c++) and ninja "
    "(`pip install ninja`)"
)

_loaded: Optional[Path] = None
_error: Optional[BaseException] = None


class CppUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded."""


def source_dir() -> Path:
    """``csrc/`` of a source checkout or editable install, else the copy packaged in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise CppUnavailable(f"fastcl's C++ sources are missing (looked in {here.parent / 'csrc'})")


def _cpu_fingerprint() -> str:
    """The instruction-set flags of this CPU: the build uses -march=native."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cflags() -> List[str]:
    """-O3 -march=native (the build targets the machine it runs on). ``FASTCL_CPU_BF16=0``
    leaves out the 16-bit dot-product instructions (AVX512-BF16, AMX-BF16): the build then
    widens bfloat16 rows to float32, as on a CPU without them (csrc/bf16.h)."""
    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")
        if os.environ.get("FASTCL_CPU_BF16", "1") == "0" and machine in ("x86_64", "amd64"):
            flags += ["-mno-avx512bf16", "-mno-amx-bf16"]
    return flags


def _build_name(src: Path, cflags: List[str]) -> str:
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    for part in (*cflags, torch.__version__, sys.version, platform.machine(), _cpu_fingerprint()):
        h.update(str(part).encode())
    return f"fastcl_cpu_{h.hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    root = _config.cpp_build_root()
    return Path(root) / name


def _library_file(directory: Path, name: str) -> Path:
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return directory / f"{name}{suffix}"


def _build(src: Path, name: str, directory: Path, cflags: List[str]) -> Path:
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    directory.mkdir(parents=True, exist_ok=True)
    print(
        f"fastcl: building the C++ CPU kernels, once (about 30 s), into {directory}",
        file=sys.stderr,
        flush=True,
    )
    cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return _library_file(directory, name)


def loaded() -> bool:
    """Whether the C++ kernels are loaded in this process (no build is started)."""
    return _loaded is not None


def load() -> Path:
    """Load the C++ kernels, building them first if no cached build exists; the library path.

    Raises :class:`CppUnavailable` (once per process it tries; later calls re-raise at once).
    """
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if _error is not None:
        raise CppUnavailable(f"{_error}; {_HOW_TO}") from _error
    try:
        src = source_dir()
        cflags = _cflags()
        name = _build_name(src, cflags)
        directory = build_directory(name)
        library = _library_file(directory, name)
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            library = _build(src, name, directory, cflags)
    except Exception as exc:  # no compiler, no ninja, a failed compile or load
        _error = exc
        raise CppUnavailable(f"{exc}; {_HOW_TO}") from exc
    _loaded = library
    return library

