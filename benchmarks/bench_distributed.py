"""Distributed NT-Xent per rank: fastcl against gathering everything, on CPU processes (gloo).

    python benchmarks/bench_distributed.py [--world 2] [--sizes 1024,4096] [--d 128] [--steps 5]
        [--providers fastcl,gather_all,gather_local]
    python -m pytest benchmarks/bench_distributed.py --benchmark-only   # one rank's share

Each provider runs in its own fresh set of ``--world`` processes (``torch.multiprocessing``,
gloo, one thread each). The global batch is N pairs (2N rows), each rank holding N / world.
Providers (each returns the global-batch loss, with gradients for the rank's shard):

``fastcl``
    ``fastcl.nt_xent(z1, z2, distributed=True)``: all-gather of the (2N, D) embeddings; each
    rank's 2N/world rows against all 2N through the fused kernels; the backward all-reduces
    the (2N, D) column gradient (gloo has no reduce-scatter).
``gather_all``
    open_clip's non-local loss, in NT-Xent form: all-gather with gradient
    (``torch.distributed.nn.all_gather``), then every rank computes the whole (2N × 2N) eager
    loss over the global batch.
``gather_local``
    lightly's ``NTXentLoss(gather_distributed=True)`` in form: local rows against the gathered
    columns, an eager (2N/world × 2N) logit matrix per rank.

Per rank it reports the median step time (forward + backward) of ``--steps`` timed steps after
one warm-up, the peak resident-memory growth over one step (VmHWM after resetting it, as
``memory_probe.py``; glibc set to return freed memory), and the bytes each rank receives
through collectives (counted from the tensors exchanged, not measured on the wire).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import _common  # noqa: E402
from memory_probe import _reset_hwm, _status_kib  # noqa: E402

PROVIDERS = ("fastcl", "gather_all", "gather_local")
TAU = 0.2


def _eager_nt_xent(z, row_lo, row_hi, n_local, temperature=TAU):
    """NT-Xent mean over rows [row_lo, row_hi) of the global (2N, D) batch z, ordered by rank
    blocks [z1_r; z2_r] of 2 * n_local rows: an eager (rows × 2N) logit matrix, self excluded.
    Row j's partner in its block is j + n_local in the first half, else j - n_local."""
    zn = torch.nn.functional.normalize(z, dim=1)
    logits = zn[row_lo:row_hi] @ zn.T / temperature
    j = torch.arange(row_lo, row_hi)
    logits[torch.arange(row_hi - row_lo), j] = float("-inf")
    partner = torch.where(j % (2 * n_local) < n_local, j + n_local, j - n_local)
    return torch.nn.functional.cross_entropy(logits, partner)


def _step_fn(provider, rank, world, z1, z2):
    import fastcl

    n_local = z1.shape[0]
    if provider == "fastcl":
        return lambda: fastcl.nt_xent(z1, z2, TAU, distributed=True)

    import warnings

    from torch.distributed.nn.functional import all_gather

    # Deprecated in recent torch, but what open_clip and lightly call: gathered with gradient.
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)

    def global_rows():
        blocks = all_gather(torch.cat([z1, z2]))  # rank blocks [z1_r; z2_r], with gradient
        return torch.cat(blocks)

    if provider == "gather_all":
        def step():  # every rank computes the whole global loss
            z = global_rows()
            return _eager_nt_xent(z, 0, z.shape[0], n_local)
        return step

    def step():  # gather_local: this rank's rows against every row
        lo, hi = rank * 2 * n_local, (rank + 1) * 2 * n_local
        # The local mean: with the gather's summing backward and DDP's averaging, the global
        # mean's gradient (fastcl's convention too).
        return _eager_nt_xent(global_rows(), lo, hi, n_local)
    return step


def _worker(rank, world, init_file, provider, n, d, steps, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    n_local = n // world
    g = torch.Generator().manual_seed(rank)
    # Warm-up at a tiny size first (library set-up, thread pools), then the target size.
    for size in (4, n_local):
        z1 = torch.randn(size, d, generator=g).requires_grad_(True)
        z2 = torch.randn(size, d, generator=g).requires_grad_(True)
        fn = _step_fn(provider, rank, world, z1, z2)
        fn().backward()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - t0)
    z1.grad = z2.grad = None
    dist.barrier()
    if not _reset_hwm():
        raise RuntimeError("peak memory needs a writable /proc/self/clear_refs (Linux)")
    base = _status_kib("VmRSS")
    loss = fn()
    loss.backward()
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    gathered = 2 * n * d * 4  # the (2N, D) float32 embeddings, all ranks' blocks
    # gloo: fastcl's backward all-reduces dZ (a ring all-reduce receives 2x its share); on NCCL
    # it reduce-scatters, as the others do.
    recv = {"fastcl": gathered * (world - 1) / world * 3,
            "gather_all": gathered * (world - 1) / world * 2,  # gather + all-to-all of dZ
            "gather_local": gathered * (world - 1) / world * 2}[provider]
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"rank": rank, "median_s": statistics.median(times), "peak_mib": peak_mib,
                   "loss": float(loss.detach()), "recv_bytes": recv}, f)
    dist.destroy_process_group()


def run(provider: str, world: int, n: int, d: int, steps: int):
    """Per-rank results of one provider in a fresh process group."""
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in _common.PROBE_ENV.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        out = os.path.join(tmp, "out")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), provider, n, d, steps, out),
                 nprocs=world, join=True)
        return [json.load(open(f"{out}.{r}")) for r in range(world)]


# ------------------------------------------------------ pytest-benchmark: one rank's share ----


def _share_inputs(n_pairs: int, d: int, seed: int = 0):
    """World 2 in one process: rank 0's (N, D) rows = [z1; z2] of its N/2 pairs, and the
    other rank's N rows, both requiring grad."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_pairs, d, generator=g).requires_grad_(True)
    others = torch.randn(n_pairs, d, generator=g).requires_grad_(True)
    return z, others


def _eager_share(z, others, temperature=TAU):
    """Rank 0's rows against every row, eagerly: lightly's gathered NT-Xent, (N × 2N) logits."""
    n = z.shape[0] // 2
    return _eager_nt_xent(torch.cat([z, others]), 0, 2 * n, n, temperature)


_compiled_share = None


def share_step(provider: str, n_pairs: int, d: int = 128):
    """Forward + backward of rank 0's share (mean over its rows), for ``provider``."""
    global _compiled_share
    from fastcl import engine

    z, others = _share_inputs(n_pairs, d)
    if provider == "fastcl":
        fn = lambda: engine.run(engine.NT_XENT, z, others=others,  # noqa: E731
                                temperature=TAU).mean()
    elif provider == "eager":
        fn = lambda: _eager_share(z, others)  # noqa: E731
    elif provider == "compile":
        _compiled_share = _compiled_share or torch.compile(_eager_share)
        fn = lambda: _compiled_share(z, others)  # noqa: E731
    else:
        raise ValueError(provider)
    return lambda: torch.autograd.grad(fn(), [z, others])


@pytest.mark.parametrize("n_pairs", (1024, 4096))
@pytest.mark.parametrize("provider", ("fastcl", "eager", "compile"))
def test_rank_share(benchmark, provider, n_pairs):
    """One rank's share of distributed NT-Xent at world size 2, in one process (no
    communication): its rows against its own block and the other rank's rows. fastcl's
    kernels (the engine's ops with other ranks' columns) against the eager (N × 2N) formulation and
    torch.compile of it. The multi-process run with memory and bytes is ``main()``."""
    import fastcl

    benchmark.group = f"distributed NT-Xent, one rank's share, {n_pairs} pairs, world 2"
    benchmark.extra_info.update(provider=provider, n_pairs=n_pairs, d=128, world=2)
    with fastcl.use_backend("cpp"):
        step = share_step(provider, n_pairs)
        benchmark.pedantic(step, rounds=8 if n_pairs <= 1024 else 3, warmup_rounds=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="1024,4096", help="N pairs in the global batch")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help="subset of " + ",".join(PROVIDERS) + " (fastcl first)")
    a = p.parse_args(argv)
    providers = a.providers.split(",")
    if providers[0] != "fastcl" or not set(providers) <= set(PROVIDERS):
        p.error(f"--providers: fastcl first, then any of {PROVIDERS}")
    _common.print_header(f"distributed NT-Xent, world {a.world} (gloo, 1 thread per rank), "
                         f"D={a.d}")
    for n in (int(s) for s in a.sizes.split(",")):
        res = {prov: run(prov, a.world, n, a.d, a.steps) for prov in providers}
        losses = {prov: r[0]["loss"] for prov, r in res.items()}
        print(f"N={n} pairs ({2 * n} rows, {2 * n // a.world} per rank); rank 0's loss: "
              + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
        for prov, ranks in res.items():
            med = max(r["median_s"] for r in ranks)
            peak = max(r["peak_mib"] for r in ranks)
            recv = ranks[0]["recv_bytes"] / 2**20
            ratio = med / max(x["median_s"] for x in res["fastcl"])
            print(f"  {prov:<13} step {med * 1e3:9.1f} ms ({ratio:5.2f}x fastcl's)   "
                  f"peak {peak:8.1f} MiB per rank   receives {recv:6.1f} MiB per rank")
    print("# gather_local returns its rank's mean (the global mean's gradient after DDP), the "
          "others the global mean")
    print(f"# load average at end: {_common.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
