"""``fastcl.distributed`` and the ``distributed=True`` flags, checked against one process holding
the whole global batch.

- In one process, on every backend: the per-rank row losses of ``fastcl.ops.distributed`` (own
  block + the other ranks' rows) against the single-process losses, and their gradients summed
  over the simulated ranks, which is what ``gather``'s backward delivers.
- With 2 and 3 real processes (gloo on the CPU, ``torch.multiprocessing``): each rank computes
  its shard's loss with ``distributed=True``; the parent compares every rank's loss and
  gradients with the single-process ones, on even and uneven shards; the queue stays identical
  across ranks through wrapping pushes; a short DDP SimCLR training matches single-process
  training on the same global batches.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastcl
from fastcl import models, reference
from fastcl.ops import distributed as dops
from tolerances import assert_within_rule

TAU = 0.2
D = 8
# Rows per rank: even shards, and uneven ones (a smaller last batch).
SHARDS = {2: {"even": [4, 4], "uneven": [5, 2]}, 3: {"even": [3, 3, 3], "uneven": [4, 1, 3]}}
QUEUE_K = 10
DDP_STEPS = 3


def _offsets(sizes):
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _global_inputs(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


# ----------------------------------------------------------------- one process, simulated ----


@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
       seed=st.integers(0, 2**31 - 1), tau=st.sampled_from([0.05, 0.2, 1.0]))
def test_rank_blocks_reproduce_the_global_loss(backend, sizes, seed, tau):
    """Each simulated rank's rows, against its own block plus the others' rows, equal the
    single-process rows; gradients summed over ranks equal the single-process gradients
    (random shard sizes, empty shards included). Against the float64 reference, within the
    suite's rule: at most twice eager PyTorch's own error in the same dtype (tolerances.py)."""
    dtype = torch.float32 if backend.name == "triton" else torch.float64
    n = sum(sizes)
    inputs = _global_inputs(n, seed=seed % 1000, dtype=dtype)
    z1, z2, q, k = (x.to(backend.device).requires_grad_(True) for x in inputs)
    w = torch.randn(2 * n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def single_process(z1, z2, q, k):
        """(NT-Xent rows, in-batch rows, gradients of the w-weighted sum) of the reference."""
        nt = reference.nt_xent(z1, z2, tau, "none")
        ib = reference.info_nce(q, k, None, tau, "none")
        ww = w.to(nt)
        return nt, ib, torch.autograd.grad((nt * ww).sum() + (ib * ww[:n]).sum(), [z1, z2, q, k])

    # The float64 oracle, and eager PyTorch in the inputs' dtype as the accuracy baseline.
    oracle = single_process(*(x.detach().double().requires_grad_(True) for x in (z1, z2, q, k)))
    baseline = single_process(z1, z2, q, k)

    def check(actual, pick, what):
        assert_within_rule(actual, pick(oracle), pick(baseline), dtype, what)

    off = _offsets(sizes)
    blocks = [torch.cat([z1[off[r]:off[r + 1]], z2[off[r]:off[r + 1]]]) for r in range(len(sizes))
              if sizes[r]]
    full = torch.cat(blocks)
    total = 0.0
    b_off = _offsets([2 * s for s in sizes])
    for r, s in enumerate(sizes):
        if s == 0:
            continue
        lo, hi = off[r], off[r + 1]
        z = torch.cat([z1[lo:hi], z2[lo:hi]])
        others = torch.cat([full[:b_off[r]], full[b_off[r + 1]:]])
        rows = dops.nt_xent_rows(z, others, tau)
        check(rows, lambda res: torch.cat([res[0][lo:hi], res[0][n + lo:n + hi]]),
              f"NT-Xent rows of rank {r}")
        ib = dops.in_batch_rows(q[lo:hi], k[lo:hi], torch.cat([k[:lo], k[hi:]]), tau)
        check(ib, lambda res: res[1][lo:hi], f"in-batch rows of rank {r}")
        wr = torch.cat([w[lo:hi], w[n + lo:n + hi]]).to(rows)
        total = total + (rows * wr).sum() + (ib * w[lo:hi].to(ib)).sum()
    grads = torch.autograd.grad(total, [z1, z2, q, k])
    for i, (g, name) in enumerate(zip(grads, ("z1", "z2", "q", "k"))):
        check(g, lambda res: res[2][i], f"gradient of {name}")


def test_lse_without_a_positive(backend):
    """The kernel contract's positive-free mode (the other ranks' block): lse is the row
    logsumexp over the columns alone, and loss = lse."""
    from fastcl.ops._backend import implementation
    from fastcl.ops.contrastive import _norm

    dtype = torch.float32 if backend.name == "triton" else torch.float64
    q, k = (x.to(backend.device) for x in _global_inputs(7, seed=3, dtype=dtype)[:2])
    k = torch.cat([k, k[:4] * 2])  # 11 columns
    loss, lse = implementation(q).lse_forward(q, k, _norm(q), _norm(k), None, 1 / TAU, None,
                                              "ieee")[:2]  # contract v2 backends add dscale
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    expect = torch.logsumexp(qn @ kn.T / TAU, dim=1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.to(dtype), expect, **tol)
    torch.testing.assert_close(loss.to(dtype), expect, **tol)


def test_needs_a_process_group():
    z = torch.randn(4, D)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcl.nt_xent(z, z, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcl.nn.NegativeQueue(8, D).push(z, distributed=True)
    with fastcl.use_backend("reference"), pytest.raises(ValueError, match="reference"):
        fastcl.info_nce(z, z, distributed=True)


def test_descriptor_disagreements_in_one_process():
    """The messages ``check_ranks`` builds from the ranks' descriptors: a tensor's shape is not
    compared when its number of dimensions differs, NaN matches NaN (every rank then fails the
    local check alike), and a string outside its choices is shown as such."""
    from fastcl.distributed import _disagreements, _record

    def desc(**fields):
        return [0.0, 3.0] + [v for name, value in fields.items() for v in _record(name, value)]

    a = desc(negative_keys=torch.zeros(3, 5, D), temperature=float("nan"), reduction="mean")
    b = desc(negative_keys=torch.zeros(3, D, dtype=torch.float16), temperature=float("nan"),
             reduction="avg")
    assert _disagreements([a, b, a], ["negative_keys", "temperature", "reduction"]) == [
        "dimensions (negative_keys.dim()): rank 0 has 3, rank 1 has 2, rank 2 has 3",
        "dtype (negative_keys.dtype): rank 0 has torch.float32, rank 1 has torch.float16, "
        "rank 2 has torch.float32",
        "reduction: rank 0 has 'mean', rank 1 has none of ('mean', 'sum', 'none'), "
        "rank 2 has 'mean'",
    ]
    assert _disagreements([a, a], ["negative_keys", "temperature", "reduction"]) == []


# ------------------------------------------------------------------- real processes --------


def _ddp_model(seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 12))
    model = models.SimCLR(backbone, 12, projection_dim=6, hidden_dim=10, temperature=TAU)
    # Without BatchNorm: DDP keeps BN statistics per rank (SyncBatchNorm would be needed), which
    # a single process cannot reproduce.
    model.projector = models.mlp(12, 10, 6, bn=False)
    return model


def _ddp_batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g))
            for _ in range(DDP_STEPS)]


def _shard(x, sizes, rank):
    off = _offsets(sizes)
    return x[off[rank]:off[rank + 1]]


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    out = {}
    try:
        for kind, sizes in SHARDS[world].items():
            n = sum(sizes)
            z1g, z2g, qg, kg = _global_inputs(n, seed=world)
            queue = torch.nn.functional.normalize(_global_inputs(7, seed=99)[0], dim=1)
            z1, z2, q, k = (_shard(x, sizes, rank).clone().requires_grad_(True)
                            for x in (z1g, z2g, qg, kg))
            for reduction in ("mean", "sum"):
                loss = fastcl.nt_xent(z1, z2, TAU, reduction, distributed=True)
                g1, g2 = torch.autograd.grad(loss, [z1, z2])
                out[f"nt_xent/{kind}/{reduction}"] = (loss.detach(), g1, g2)
                loss = fastcl.info_nce(q, k, temperature=TAU, reduction=reduction,
                                       distributed=True)
                gq, gk = torch.autograd.grad(loss, [q, k])
                out[f"in_batch/{kind}/{reduction}"] = (loss.detach(), gq, gk)
            loss = fastcl.info_nce(q, k, queue, temperature=TAU, distributed=True)
            out[f"queue/{kind}/mean"] = (loss.detach(), torch.autograd.grad(loss, q)[0])
            rows = fastcl.nt_xent(z1, z2, TAU, "none", distributed=True)
            out[f"nt_xent/{kind}/none"] = (rows.detach(),)
            # The queue: uneven pushes that wrap around K=10.
            torch.manual_seed(0)
            nq = fastcl.nn.NegativeQueue(QUEUE_K, D)
            for step in range(4):
                keys = torch.full((sizes[rank], D), float(100 * step + 10 * rank))
                keys += torch.arange(sizes[rank], dtype=torch.float32)[:, None]
                nq.push(keys, distributed=True)
            out[f"queue_state/{kind}"] = (nq.queue.clone(), nq.ptr.clone())
        # gather itself, uneven: rank r holds r + 1 rows of value r; each rank's loss weights
        # the gathered rows by w (the same on every rank), so each shard's gradient is the
        # sum over ranks: world * w[its rows].
        from fastcl import distributed as fdist

        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        y = fdist.gather(x)
        w = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape)
        (y * w).sum().backward()
        out["gather"] = (y.detach(), x.grad)
        # An empty shard on the last rank: every rank raises the same error, none hangs.
        z = torch.randn(0 if rank == world - 1 else 3, D)
        for name, call in (("z1", lambda: fastcl.nt_xent(z, z, TAU, distributed=True)),
                           ("query", lambda: fastcl.info_nce(z, z, distributed=True))):
            try:
                call()
                out[f"empty/{name}"] = "no error"
            except ValueError as exc:
                out[f"empty/{name}"] = str(exc)
        # DDP training: SimCLR, distributed NT-Xent, the same global batches as the parent.
        model = torch.nn.parallel.DistributedDataParallel(_ddp_model())
        model.module.distributed = True
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sizes = SHARDS[world]["even"]
        losses = []
        for x1, x2 in _ddp_batches(sum(sizes)):
            loss = model(_shard(x1, sizes, rank), _shard(x2, sizes, rank))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        out["ddp"] = (torch.stack(losses), {k: v.detach().clone()
                                           for k, v in model.module.state_dict().items()})
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """Run the worker on ``world`` gloo processes once per module; their saved results."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _single_process(kind_sizes, world):
    """The single-process losses and input gradients of the global batch."""
    n = sum(kind_sizes)
    z1, z2, q, k = (x.clone().requires_grad_(True) for x in _global_inputs(n, seed=world))
    queue = torch.nn.functional.normalize(_global_inputs(7, seed=99)[0], dim=1)
    out = {}
    for reduction in ("mean", "sum"):
        loss = fastcl.nt_xent(z1, z2, TAU, reduction)
        out[f"nt_xent/{reduction}"] = (loss.detach(), *torch.autograd.grad(loss, [z1, z2]))
        loss = fastcl.info_nce(q, k, temperature=TAU, reduction=reduction)
        out[f"in_batch/{reduction}"] = (loss.detach(), *torch.autograd.grad(loss, [q, k]))
    loss = fastcl.info_nce(q, k, queue, temperature=TAU)
    out["queue/mean"] = (loss.detach(), torch.autograd.grad(loss, q)[0])
    out["nt_xent/none"] = (fastcl.nt_xent(z1, z2, TAU, "none").detach(),)
    return out


@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_loss_and_gradients_equal_the_single_process_ones(ranks, kind):
    """Every rank returns the global loss; its shard's gradient is world_size times the
    single-process gradient of its rows (DDP then averages to exactly that gradient)."""
    world, results = ranks
    sizes = SHARDS[world][kind]
    ref = _single_process(sizes, world)
    tol = dict(rtol=2e-5, atol=2e-6)
    for rank, res in enumerate(results):
        for name in ("nt_xent/mean", "nt_xent/sum", "in_batch/mean", "in_batch/sum",
                     "queue/mean"):
            loss, *grads = res[f"{name.split('/')[0]}/{kind}/{name.split('/')[1]}"]
            ref_loss, *ref_grads = ref[name]
            torch.testing.assert_close(loss, ref_loss, **tol, msg=f"{name} rank {rank}")
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g, world * _shard(rg, sizes, rank), **tol,
                                           msg=f"{name} gradient, rank {rank}")
        rows, = res[f"nt_xent/{kind}/none"]
        ref_rows, = ref["nt_xent/none"]
        n = sum(sizes)
        expect = torch.cat([_shard(ref_rows[:n], sizes, rank), _shard(ref_rows[n:], sizes, rank)])
        torch.testing.assert_close(rows, expect, **tol)


@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_queue_stays_identical_across_ranks(ranks, kind):
    """Four uneven pushes into a queue of 10 (it wraps): every rank holds the queue a single
    process gets by pushing all ranks' keys in rank order."""
    world, results = ranks
    sizes = SHARDS[world][kind]
    torch.manual_seed(0)
    single = fastcl.nn.NegativeQueue(QUEUE_K, D)
    for step in range(4):
        keys = torch.cat([torch.full((s, D), float(100 * step + 10 * r))
                          + torch.arange(s, dtype=torch.float32)[:, None]
                          for r, s in enumerate(sizes)])
        single.push(keys)
    for rank, res in enumerate(results):
        queue, ptr = res[f"queue_state/{kind}"]
        assert torch.equal(queue, single.queue), rank
        assert torch.equal(ptr, single.ptr)
    assert int(single.ptr) == (4 * sum(sizes)) % QUEUE_K


def test_gather_concatenates_in_rank_order_and_sums_gradients(ranks):
    world, results = ranks
    sizes = [r + 1 for r in range(world)]
    expect = torch.cat([torch.full((s, 2), float(r)) for r, s in enumerate(sizes)])
    w = torch.arange(expect.numel(), dtype=torch.float32).reshape(expect.shape)
    for rank, res in enumerate(results):
        y, grad = res["gather"]
        assert torch.equal(y, expect)
        assert torch.equal(grad, world * _shard(w, sizes, rank))


def test_an_empty_shard_is_rejected_on_every_rank(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        for name in ("z1", "query"):
            msg = res[f"empty/{name}"]
            assert msg.startswith(f"{name} is empty on rank(s) [{world - 1}]"), (rank, msg)


def test_ddp_simclr_training_matches_one_process(ranks):
    """DDP (gloo) SimCLR with distributed NT-Xent, 3 SGD steps on shards of the global batch,
    against one process on the whole batch: the same losses and weights."""
    world, results = ranks
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for x1, x2 in _ddp_batches(sum(SHARDS[world]["even"])):
        loss = model(x1, x2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    for rank, res in enumerate(results):
        ddp_losses, state = res["ddp"]
        torch.testing.assert_close(ddp_losses, torch.stack(losses), rtol=1e-5, atol=1e-6)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------- ranks that disagree (real processes) --
#
# Rank 1 passes something different from the other ranks. Before the ranks exchanged a
# descriptor of their arguments, a different feature dimension or dtype aborted rank 1 in gloo
# (EnforceNotMet, exit -6) while the others waited, and a different temperature or reduction
# returned a silently mixed loss. Now every rank raises the same ValueError.

def _disagreement_cases(rank):
    """name -> a call whose arguments differ on rank 1 only."""
    odd = rank == 1
    g = torch.Generator().manual_seed(7)
    z1, z2, q, k = (torch.randn(3 + rank, D, generator=g) for _ in range(4))
    queue = torch.randn(5, D, generator=g)
    narrow = torch.randn(3, D - 2, generator=g)
    return {
        "nt_xent/features": lambda: fastcl.nt_xent(narrow if odd else z1, narrow if odd else z2,
                                                    TAU, distributed=True),
        "nt_xent/dtype": lambda: fastcl.nt_xent(z1.double() if odd else z1,
                                                 z2.double() if odd else z2, TAU,
                                                 distributed=True),
        "nt_xent/temperature": lambda: fastcl.nt_xent(z1, z2, 0.5 if odd else TAU,
                                                       distributed=True),
        "nt_xent/reduction": lambda: fastcl.nt_xent(z1, z2, TAU, "sum" if odd else "mean",
                                                     distributed=True),
        "info_nce/features": lambda: fastcl.info_nce(narrow if odd else q, narrow if odd else k,
                                                      temperature=TAU, distributed=True),
        "info_nce/dtype": lambda: fastcl.info_nce(q.double() if odd else q,
                                                   k.double() if odd else k, temperature=TAU,
                                                   distributed=True),
        "info_nce/temperature": lambda: fastcl.info_nce(q, k, temperature=0.5 if odd else TAU,
                                                         distributed=True),
        "info_nce/reduction": lambda: fastcl.info_nce(q, k, temperature=TAU,
                                                       reduction="none" if odd else "mean",
                                                       distributed=True),
        "info_nce/negatives": lambda: fastcl.info_nce(q, k, None if odd else queue,
                                                       temperature=TAU, distributed=True),
        "info_nce/negative_features": lambda: fastcl.info_nce(
            q, k, queue[:, :-1] if odd else queue, temperature=TAU, distributed=True),
        "calls": lambda: (fastcl.info_nce(q, k, temperature=TAU, distributed=True) if odd
                          else fastcl.nt_xent(z1, z2, TAU, distributed=True)),
        "not_a_tensor": lambda: fastcl.nt_xent(z1.tolist() if odd else z1, z2, TAU,
                                                distributed=True),
        "queue_push/features": lambda: fastcl.nn.NegativeQueue(4, D - 2 if odd else D).push(
            narrow if odd else z1, distributed=True),
        "queue_push/dtype": lambda: fastcl.nn.NegativeQueue(4, D).push(
            z1.double() if odd else z1, distributed=True),
    }


def _disagreement_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    # A short process-group timeout: a rank left waiting fails the run instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    out = {}
    try:
        for name, call in _disagreement_cases(rank).items():
            try:
                call()
                out[name] = "no error"
            except Exception as exc:  # noqa: BLE001 (the test compares every rank's outcome)
                out[name] = f"{type(exc).__name__}: {exc}"
        # The ranks are still in step: an agreeing call works.
        z = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
        out["after"] = fastcl.nt_xent(z, z.flip(0), TAU, distributed=True)
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _spawn_with_deadline(fn, world, tmp, seconds):
    """Run fn on ``world`` processes; fail (killing them) if they are not done in ``seconds``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(fn, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} ranks were still running after {seconds} s (a hang)")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def disagreeing_ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"disagree{world}")
    return world, _spawn_with_deadline(_disagreement_worker, world, tmp, seconds=120)


def _values(world, odd, even):
    return ", ".join(f"rank {r} has {odd if r == 1 else even}" for r in range(world))


def _expected_messages(world):
    v = lambda odd, even: _values(world, odd, even)  # noqa: E731
    head = "ValueError: distributed=True: the ranks disagree on "
    f32, f64 = "torch.float32", "torch.float64"
    return {
        "nt_xent/features": f"{head}features (z1.shape[1]): {v(D - 2, D)}; "
                            f"features (z2.shape[1]): {v(D - 2, D)}",
        "nt_xent/dtype": f"{head}dtype (z1.dtype): {v(f64, f32)}; dtype (z2.dtype): {v(f64, f32)}",
        "nt_xent/temperature": f"{head}temperature: {v(0.5, TAU)}",
        "nt_xent/reduction": f"{head}reduction: {v(repr('sum'), repr('mean'))}",
        "info_nce/features": f"{head}features (query.shape[1]): {v(D - 2, D)}; "
                             f"features (positive_key.shape[1]): {v(D - 2, D)}",
        "info_nce/dtype": f"{head}dtype (query.dtype): {v(f64, f32)}; "
                          f"dtype (positive_key.dtype): {v(f64, f32)}",
        "info_nce/temperature": f"{head}temperature: {v(0.5, TAU)}",
        "info_nce/reduction": f"{head}reduction: {v(repr('none'), repr('mean'))}",
        "info_nce/negatives": f"{head}negative_keys: {v('None', 'a tensor')}",
        "info_nce/negative_features": f"{head}features (negative_keys.shape[1]): "
                                      f"{v(D - 1, D)}",
        "calls": "ValueError: distributed=True: the ranks are in different calls: "
                 + _values(world, "in fastcl.info_nce", "in fastcl.nt_xent").replace(" has ", " "),
        "not_a_tensor": f"{head}z1: {v('another type', 'a tensor')}",
        "queue_push/features": f"{head}features (keys.shape[1]): {v(D - 2, D)}; "
                               f"features (queue.shape[1]): {v(D - 2, D)}",
        "queue_push/dtype": f"{head}dtype (keys.dtype): {v(f64, f32)}",
    }


@pytest.mark.parametrize("case", sorted(_expected_messages(2)))
def test_ranks_that_disagree_all_raise_the_same_error(disagreeing_ranks, case):
    """A different feature dimension, dtype, temperature, reduction, negatives, call or argument
    type on rank 1: every rank raises the same ValueError, naming the argument and each rank's
    value; none crashes or hangs (the run has a deadline, the process group a short timeout)."""
    world, results = disagreeing_ranks
    expect = _expected_messages(world)[case]
    for rank, res in enumerate(results):
        assert res[case] == expect, (rank, res[case])


def test_ranks_stay_in_step_after_a_disagreement(disagreeing_ranks):
    world, results = disagreeing_ranks
    z = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    expect = fastcl.nt_xent(torch.cat([z] * world), torch.cat([z.flip(0)] * world), TAU)
    for res in results:
        torch.testing.assert_close(res["after"], expect)
