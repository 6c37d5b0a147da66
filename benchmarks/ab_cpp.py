"""A/B of the C++ kernels of two checkouts (kernel contract v2 against v1), interleaved.

    python benchmarks/ab_cpp.py OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]

Two extension builds cannot share one process (same operator namespace), so each checkout gets
one long-lived worker (ab_cpp_worker.py, PYTHONPATH = the checkout); per round every case runs
`reps` times in each worker, alternating which goes first. Medians over the timed reps (the
first round is a warm-up); ratios new/old, and new with_dscale over new plain. An old checkout
has no with_dscale: its "dscale" cases time the plain call. fp32, NT-Xent 2N = 8192 x 128,
MoCo 256 rows against a 65536 x 128 queue, tau = 0.1.
"""
import json, os, statistics, subprocess, sys
from pathlib import Path

old_path, new_path = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
PY = sys.executable
WORKER = str(Path(__file__).with_name("ab_cpp_worker.py"))
def start(path):
    env = dict(os.environ, PYTHONPATH=path)
    p = subprocess.Popen([PY, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    print(path, p.stdout.readline().strip(), flush=True)
    return p
w = {"old": start(old_path), "new": start(new_path)}
cases = [("nt_xent fwd+bwd (public, 2N=8192)", 2), ("nt_xent_forward kernel", 2), ("nt_xent_forward kernel dscale", 2),
         ("moco lse_forward kernel", 5), ("moco lse_forward kernel dscale", 5),
         ("moco lse_forward_with_grad kernel", 5), ("moco lse_forward_with_grad kernel dscale", 5)]
res = {(c, v): [] for c, _ in cases for v in w}
for r in range(rounds + 1):
    for c, reps in cases:
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for v in order:
            w[v].stdin.write(f"{c} {reps}\n"); w[v].stdin.flush()
            ts = json.loads(w[v].stdout.readline())
            if r > 0:
                res[(c, v)] += ts
print(f"{'case':45s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s}")
for c, _ in cases:
    o, n = statistics.median(res[(c, 'old')]) * 1e3, statistics.median(res[(c, 'new')]) * 1e3
    print(f"{c:45s} {o:9.2f} {n:9.2f} {n/o:8.3f}")
# new dscale vs new plain (same process)
for a, b in [("nt_xent_forward kernel", "nt_xent_forward kernel dscale"), ("moco lse_forward kernel", "moco lse_forward kernel dscale"),
             ("moco lse_forward_with_grad kernel", "moco lse_forward_with_grad kernel dscale")]:
    x, y = statistics.median(res[(a, 'new')]), statistics.median(res[(b, 'new')])
    print(f"new: {b} / plain = {y/x:.3f}")
for p in w.values():
    p.stdin.close(); p.wait()
