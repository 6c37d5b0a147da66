# Worker of benchmarks/ab_cpp.py: one long-lived process per checkout (PYTHONPATH picks it).
# runs it `reps` times, prints the times (seconds) as one JSON line.
import json, sys, time, inspect
import torch
import fastcl
from fastcl.kernels import cpp
from fastcl.ops import contrastive

fastcl.set_backend("cpp")
NEW = "with_dscale" in inspect.signature(cpp.nt_xent_forward).parameters
g = torch.Generator().manual_seed(0)
N, D, B, K = 4096, 128, 256, 65536
z1 = torch.randn(N, D, generator=g); z2 = torch.randn(N, D, generator=g)
z = torch.cat([z1, z2]); nz = contrastive._norm(z)
q = torch.randn(B, D, generator=g); k = torch.randn(B, D, generator=g)
queue = torch.randn(K, D, generator=g)
nq, nk, nqu = contrastive._norm(q), contrastive._norm(k), contrastive._norm(queue)
inv = 1 / 0.1

def nt_full():
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    fastcl.nt_xent(a, b, 0.1).backward()

def kw(dscale):
    return dict(with_dscale=True) if dscale else {}

CASES = {
    "nt_xent fwd+bwd (public, 2N=8192)": nt_full,
    "nt_xent_forward kernel": lambda: cpp.nt_xent_forward(z, nz, inv),
    "nt_xent_forward kernel dscale": lambda: cpp.nt_xent_forward(z, nz, inv, **kw(True)),
    "moco lse_forward kernel": lambda: cpp.lse_forward(q, queue, nq, nqu, (k, nk), inv, None),
    "moco lse_forward kernel dscale": lambda: cpp.lse_forward(q, queue, nq, nqu, (k, nk), inv, None, **kw(True)),
    "moco lse_forward_with_grad kernel": lambda: cpp.lse_forward_with_grad(q, queue, nq, nqu, (k, nk), inv, None),
    "moco lse_forward_with_grad kernel dscale": lambda: cpp.lse_forward_with_grad(q, queue, nq, nqu, (k, nk), inv, None, **kw(True)),
}
print(json.dumps({"ready": True, "new": NEW, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    name, reps = line.rstrip("\n").rsplit(" ", 1)
    if name.endswith("dscale") and not NEW:
        name = name[: -len(" dscale")]  # old: the plain call, as the baseline
    fn = CASES[name]
    ts = []
    for _ in range(int(reps)):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    print(json.dumps(ts), flush=True)
