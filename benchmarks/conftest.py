"""pytest set-up for fastcl's benchmarks (``pytest benchmarks --benchmark-only``).

- Collects ``bench_*.py`` here as test modules (pytest's default pattern is ``test_*.py``;
  the project's ``testpaths`` is ``tests``, so ``pytest`` alone never runs these); one named
  on the command line is pytest's own to collect (once).
- ``--fastcl-size=large`` adds N=16384 for fastcl alone (the eager reference would need
  several (2N)^2 float32 matrices, over 4 GiB each).
- ``--fastcl-no-memory`` skips the peak-memory subprocesses (faster; no ``peak_mem_mib``).
- ``memory_probe``: session-wide cache of peak memory per (case, provider, N, device, D); see
  ``memory_probe.py`` for the method.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastcl benchmarks")
    group.addoption(
        "--fastcl-size",
        choices=("default", "large"),
        default="default",
        help="large: also N=16384 for fastcl only",
    )
    group.addoption(
        "--fastcl-no-memory",
        action="store_true",
        default=False,
        help="do not measure peak memory (no subprocess probes)",
    )


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest's own python plugin already
    # (any name): collecting it here too would run every case twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def memory_probe(request):
    """``probe(case, provider, n, device, step) -> {"forward_mib", "full_mib", ...}`` or None.

    CPU: RSS growth in a fresh subprocess (memory_probe.py), cached per key. CUDA:
    max_memory_allocated growth over one call of ``step`` in this process (not cached: mode
    matters, and it is cheap).
    """
    cache = {}
    enabled = not request.config.getoption("--fastcl-no-memory")

    def probe(case, provider, n, device, step=None, mode="full", d=_common.D):
        if not enabled:
            return None
        if device == "cuda":
            step()  # warm-up (Triton/Inductor compilation) before the measured call
            return {f"{mode}_mib": round(_common.cuda_peak_mib(step), 1),
                    "method": "cuda max_memory_allocated delta"}
        key = (case, provider, n, device, d)
        if key not in cache:
            cache[key] = _common.probe_memory(case, provider, n, d=d, device=device)
        return cache[key]

    return probe
