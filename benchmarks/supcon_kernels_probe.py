"""Probe: the C++ SupCon kernels (csrc/labels.cpp) against NT-Xent's at the same N, and the eager
dense SupCon formula, interleaved in one process, medians.

    PYTHONPATH=. python benchmarks/supcon_kernels_probe.py [threads=2] [reps=15]

N = 4096 rows (2048 samples x 2 views), D = 128, 100 classes (labels = randint(0, 100,
(2048,)).repeat(2)), float32, tau = 0.07. One repetition times, in turn: labels_sym_forward +
labels_sym_grad (with the op layer's ga / gp); nt_xent_forward + nt_xent_grad; each of the four
alone; reference.supcon_loss forward + backward (eager). Prints medians, minima and the ratios.
Not a test: timings only.
"""
import statistics
import sys
import time

import torch

from fastcl import reference
from fastcl.kernels import cpp

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 15
torch.manual_seed(0)
B, D = 2048, 128
N = 2 * B
inv_temp = 1 / 0.07
z = torch.randn(N, D)
nz = torch.linalg.vector_norm(z, dim=1)
labels = torch.randint(0, 100, (B,)).repeat(2)
g = torch.full((N,), 1.0 / N)


def supcon_kernels():
    loss, lse, _, count = cpp.labels_sym_forward(z, nz, labels, inv_temp)
    has = count > 0
    ga = torch.where(has, g, torch.zeros_like(g))
    gp = torch.where(has, g / count.clamp_min(1), torch.zeros_like(g))
    return cpp.labels_sym_grad(z, nz, labels, lse, ga, gp, inv_temp)


def supcon_fwd():
    return cpp.labels_sym_forward(z, nz, labels, inv_temp)


_, LSE, _, COUNT = supcon_fwd()
GA = torch.where(COUNT > 0, g, torch.zeros_like(g))
GP = torch.where(COUNT > 0, g / COUNT.clamp_min(1), torch.zeros_like(g))


def supcon_bwd():
    return cpp.labels_sym_grad(z, nz, labels, LSE, GA, GP, inv_temp)


def ntxent_kernels():
    loss, lse, _ = cpp.nt_xent_forward(z, nz, inv_temp)
    return cpp.nt_xent_grad(z, nz, lse, g, inv_temp)


def ntxent_fwd():
    return cpp.nt_xent_forward(z, nz, inv_temp)


_, NLSE, _ = ntxent_fwd()


def ntxent_bwd():
    return cpp.nt_xent_grad(z, nz, NLSE, g, inv_temp)


feats = z.view(2, B, D).transpose(0, 1).contiguous()
lab_b = labels[:B]


def eager():
    f = feats.clone().requires_grad_()
    loss = reference.supcon_loss(f, lab_b, temperature=0.07)
    loss.backward()
    return f.grad


cases = {"supcon_kernels": supcon_kernels, "ntxent_kernels": ntxent_kernels,
         "supcon_fwd": supcon_fwd, "ntxent_fwd": ntxent_fwd,
         "supcon_bwd": supcon_bwd, "ntxent_bwd": ntxent_bwd, "eager": eager}
for f in cases.values():
    f()
times = {k: [] for k in cases}
for _ in range(reps):
    for k, f in cases.items():
        t0 = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in med.items():
    print(f"{k:16s} median {v * 1e3:8.1f} ms   (min {min(times[k]) * 1e3:.1f})")
print(f"supcon/ntxent (fwd+bwd): {med['supcon_kernels'] / med['ntxent_kernels']:.3f}")
print(f"supcon/ntxent fwd: {med['supcon_fwd'] / med['ntxent_fwd']:.3f}  "
      f"bwd: {med['supcon_bwd'] / med['ntxent_bwd']:.3f}")
print(f"eager/supcon: {med['eager'] / med['supcon_kernels']:.2f}x")
