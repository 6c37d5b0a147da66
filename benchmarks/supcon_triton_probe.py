"""Probe: the Triton label-positive kernels (SupCon; fastcl/kernels/triton_labels.py) alone on a
GPU, correctness first, then speed. Not a test: run it by hand on a device.

    PYTHONPATH=. python benchmarks/supcon_triton_probe.py [--n 4096] [--d 128] [--classes 100]
        [--dtypes fp32,tf32,bf16] [--reps 20] [--device cuda|cpu]

For each configuration (fp32: IEEE products; tf32: torch.set_float32_matmul_precision("high"),
eager too; bf16): z (n, D) Gaussian rows with spread norms, n // classes-ish samples per label,
tau = 0.07.
- Correctness: ``labels_sym_forward`` (with dscale) against ``reference.label_pairs`` in float64,
  ``labels_sym_grad`` and the general ``labels_grad`` rows / columns passes (rows = z[n/4 :
  3n/4] against all of z, offset n/4) against the dense float64 W = ga P - gp Y, each within
  the 2x-eager rule of tests/tolerances.py (the baseline: the same dense formula in float32).
  Rows without a positive get ga = gp = 0 (the op layer's convention).
- Speed (CUDA events, medians of --reps after a warm-up): labels_sym_forward,
  labels_sym_grad, their sum, and the dense float32 formula (``reference.supcon_loss``'s
  logits, forward + backward through autograd) for scale.
Exit status 1 if a check fails. ``--device cpu`` (the Triton interpreter; use a small --n) is
a smoke test of the script itself.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def _dense(z, q_rows, labels, q_labels, scale, offset, ga, gp, dt):
    """(rows' gradient, columns' gradient) of the contract, densely in dtype dt: W = ga P -
    gp Y over the pairs but (i, i + offset)."""
    import torch
    import torch.nn.functional as F

    qh = F.normalize(q_rows.to(dt), dim=1)
    kh = F.normalize(z.to(dt), dim=1)
    n, m = qh.shape[0], kh.shape[0]
    s = (qh @ kh.T) * scale
    own = torch.zeros(n, m, dtype=torch.bool, device=z.device)
    idx = torch.arange(n, device=z.device)
    own[idx, idx + offset] = True
    y = (q_labels[:, None] == labels[None, :]) & ~own
    s = s.masked_fill(own, float("-inf"))
    p = torch.softmax(s, dim=1)
    w = ga.to(dt)[:, None] * p - gp.to(dt)[:, None] * y.to(dt)
    return scale * (w @ kh), scale * (w.T @ qh)


def _time(fn, reps, device):
    import torch

    fn()  # warm-up (compiles; the label passes have one config: no autotuning)
    if device.type != "cuda":
        return float("nan")
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dtypes", default="fp32,tf32,bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    import torch

    from fastcl import reference
    from fastcl.kernels import triton_contrastive as tc
    from tolerances import assert_within_rule

    dev = torch.device(args.device)
    n, d = args.n, args.d
    scale = 1 / 0.07
    configs = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"),
               "bf16": (torch.bfloat16, "highest")}
    failures = 0
    for name in args.dtypes.split(","):
        dtype, mm = configs[name]
        torch.set_float32_matmul_precision(mm)
        precision = "tf32" if mm == "high" else "ieee"
        gen = torch.Generator().manual_seed(0)
        z64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
        z64 = z64 * torch.exp(torch.randn(n, 1, generator=gen, dtype=torch.float64))
        z = z64.to(dtype).to(dev)
        labels = torch.randint(0, args.classes, (n,), generator=gen).to(dev)
        nz = z.float().norm(dim=1).clamp_min(1e-12)
        zd, zf = z.double(), z.float()

        def check(what, actual, oracle, base, rule_dtype):
            nonlocal failures
            try:
                assert torch.isfinite(actual).all(), f"{what}: not finite"
                assert_within_rule(actual.double().cpu(), oracle.cpu(), base.cpu(), rule_dtype,
                                   what)
                err = (actual.double() - oracle).abs().max().item()
                print(f"ok   {name} {what}: max error {err:.3g}", flush=True)
            except AssertionError as exc:
                failures += 1
                print(f"FAIL {name} {what}: {exc}", flush=True)

        loss, lse, dscale, count = tc.labels_sym_forward(z, nz, labels, scale, precision, True)
        oracle = reference.label_pairs(zd, zd, labels, labels, scale, 0)
        base = reference.label_pairs(zf, zf, labels, labels, scale, 0)
        if not torch.equal(count.double(), oracle[3]):
            failures += 1
            print(f"FAIL {name} count differs from the reference's")
        for what, a, o, b in (("loss", loss, oracle[0], base[0]), ("lse", lse, oracle[1],
                              base[1]), ("dscale", dscale, oracle[2], base[2])):
            check(f"sym forward {what}", a, o, b, torch.float32)
        has = oracle[3] > 0
        g = torch.rand(n, generator=gen, dtype=torch.float64).to(dev) + 0.5
        ga = torch.where(has, g, torch.zeros_like(g))
        gp = torch.where(has, g / oracle[3].clamp_min(1), torch.zeros_like(g))
        grad_dtype = torch.float32 if dtype == torch.float32 else dtype
        got = tc.labels_sym_grad(z, nz, labels, lse, ga.float(), gp.float(), scale, precision)
        o_r, o_c = _dense(zd, zd, labels, labels, scale, 0, ga, gp, torch.float64)
        b_r, b_c = _dense(zf, zf, labels, labels, scale, 0, ga, gp, torch.float32)
        check("sym grad", got, o_r + o_c, b_r + b_c, grad_dtype)
        # The general passes: rows z[off : off + n/2] against all of z.
        off, nq = n // 4, n // 2
        q, lq, nq_ = z[off:off + nq], labels[off:off + nq], nz[off:off + nq]
        lq_loss, lq_lse, _, lq_count = tc.labels_forward(q, z, nq_, nz, lq, labels, scale, off,
                                                         precision)
        o_q = reference.label_pairs(q.double(), zd, lq, labels, scale, off)
        b_q = reference.label_pairs(q.float(), zf, lq, labels, scale, off)
        check("rows forward loss", lq_loss, o_q[0], b_q[0], torch.float32)
        gaq, gpq = ga[:nq], torch.where(o_q[3] > 0, g[:nq] / o_q[3].clamp_min(1),
                                        torch.zeros_like(o_q[3]))
        gaq = torch.where(o_q[3] > 0, gaq, torch.zeros_like(gaq))
        d_rows = tc.labels_grad(q, z, nq_, nz, lq, labels, lq_lse, gaq.float(), gpq.float(),
                                None, None, None, scale, off, precision)
        d_cols = tc.labels_grad(z, q, nz, nq_, labels, lq, None, None, None, lq_lse,
                                gaq.float(), gpq.float(), scale, off, precision)
        o_r, o_c = _dense(zd, q.double(), labels, lq, scale, off, gaq, gpq, torch.float64)
        b_r, b_c = _dense(zf, q.float(), labels, lq, scale, off, gaq, gpq, torch.float32)
        check("rows grad", d_rows, o_r, b_r, grad_dtype)
        check("columns grad", d_cols, o_c, b_c, grad_dtype)

        # Speed.
        def fwd():
            return tc.labels_sym_forward(z, nz, labels, scale, precision, False)

        def bwd():
            return tc.labels_sym_grad(z, nz, labels, lse, ga.float(), gp.float(), scale,
                                      precision)

        def both():
            out = tc.labels_sym_forward(z, nz, labels, scale, precision, False)
            return tc.labels_sym_grad(z, nz, labels, out[1], ga.float(), gp.float(), scale,
                                      precision)

        zin = z.detach().clone().requires_grad_()

        def eager():
            zin.grad = None
            v = reference.supcon_loss(zin.float()[:, None], labels, 0.07)
            v.backward()

        t = {k: _time(f, args.reps, dev) for k, f in (("forward", fwd), ("grad", bwd),
                                                      ("forward+grad", both),
                                                      ("eager dense fwd+bwd", eager))}
        print(f"time {name} n={n} d={d}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in t.items()),
              flush=True)
    print(f"{failures} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
