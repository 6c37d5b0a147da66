"""The Triton kernels compile for real GPUs, as the JIT would specialize them, without spills
and within each architecture's shared memory; checked here without a GPU (see triton_aot.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernel_variants_compile_for_sm80_sm89_sm90():
    """Every code path of the contrastive kernels (from the module's ``aot_variants``, else the
    launchers' ``lse_meta`` / ``grad_meta``), the momentum and the cosine-loss kernels, for
    D in {64, 128, 256, 1024} and each dtype, through Triton's full NVIDIA pipeline to a cubin
    (ptxas ships with the triton wheel); no local memory, shared memory within the limit."""
    pytest.importorskip("triton")  # the package depends on triton on Linux: present in CI
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_aot.py"), "--workers", "2"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    out = proc.stdout + proc.stderr
    head = re.search(r"^matrix: (\d+) variants \((\d+) distinct compiles\)", out, re.M)
    tail = re.search(r"^compiled (\d+) of (\d+) distinct kernels for (\d+) variants; "
                     r"(\d+) failed", out, re.M)
    assert head and tail, out[-4000:]
    variants, distinct = int(head.group(1)), int(head.group(2))
    lines = re.findall(r"^(ok|FAIL) ", out, re.M)
    assert len(lines) == variants, f"{len(lines)} result lines for {variants} variants"
    assert (int(tail.group(2)), int(tail.group(3))) == (distinct, variants), out[-2000:]
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, (
        f"{len(failed)} of {variants} variants failed:\n" + "\n".join(failed[:40])
        + "\n" + out.splitlines()[-1])
    assert int(tail.group(1)) == distinct
