"""Accuracy report: fastcl's error against the float64 reference, per backend and dtype.

    python benchmarks/accuracy.py [--n 64] [--d 96] [--taus 0.07,0.5] [--dtypes ...]

For each loss (NT-Xent, in-batch InfoNCE, InfoNCE with a shared negatives queue), backend
(cpp and chunked on CPU; Triton on CUDA, or under TRITON_INTERPRET=1 on CPU) and input dtype,
prints the largest absolute error of the loss (reduction "none", every row) and of the input
gradients against ``fastcl.reference`` run in float64, next to the error eager PyTorch makes
computing the same formula from the same inputs with float32 logits (float64 for float64;
tests/tolerances.py; the tests allow fastcl 2x that, plus a small atol). Losses are float32 for
16-bit inputs (fastcl's dtype rule), gradients in the input dtype. Inputs are random with row norms spread over e^{+-2}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fastcl  # noqa: E402
from fastcl import reference  # noqa: E402
from tolerances import eager_info_nce, eager_nt_xent, max_err  # noqa: E402


def _inputs(case, n, d, dtype, device, gen):
    def rows(m):
        x = torch.randn(m, d, generator=gen, dtype=torch.float64)
        x = x * torch.exp(2 * torch.rand(m, 1, generator=gen, dtype=torch.float64) - 1)
        return x.to(dtype).to(device).requires_grad_()

    if case == "nt_xent":
        return [rows(n), rows(n)]
    if case == "info_nce in-batch":
        return [rows(n), rows(n)]
    return [rows(n), rows(n), rows(3 * n)]


def _fns(case, tau):
    if case == "nt_xent":
        return (lambda *t: fastcl.nt_xent(*t, temperature=tau, reduction="none"),
                lambda *t: reference.nt_xent(*t, temperature=tau, reduction="none"),
                lambda *t: eager_nt_xent(*t, tau, reduction="none"))
    return (lambda *t: fastcl.info_nce(*t, temperature=tau, reduction="none"),
            lambda *t: reference.info_nce(*t, temperature=tau, reduction="none"),
            lambda *t: eager_info_nce(*t[:2], t[2] if len(t) > 2 else None, tau,
                                      reduction="none"))


def _run(fn, tensors, cot):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, cot.to(out.dtype).to(out.device))
    return out, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--d", type=int, default=96)
    parser.add_argument("--taus", default="0.07,0.5",
                        help="comma-separated temperatures, e.g. 1e-4,1e-3,0.07")
    parser.add_argument("--dtypes", default="float64,float32,bfloat16,float16",
                        help="comma-separated input dtypes")
    args = parser.parse_args()
    taus = [float(t) for t in args.taus.split(",")]
    wanted = [getattr(torch, name) for name in args.dtypes.split(",")]
    triton_device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = [(name, "cpu", dt) for name in ("cpp", "chunked") for dt in wanted]
    configs += [("triton", triton_device, dt) for dt in wanted if dt != torch.float64]
    print(f"# fastcl accuracy vs float64 reference; n={args.n} d={args.d}; torch {torch.__version__}"
          f"; triton on {triton_device}{' (interpreter)' if triton_device == 'cpu' else ''}")
    print(f"{'case':<18} {'tau':>6} {'backend':<8} {'dtype':<9} "
          f"{'loss err':>9} {'eager':>9} {'grad err':>9} {'eager':>9}")
    for case in ("nt_xent", "info_nce in-batch", "info_nce queue"):
        for tau in taus:
            fast, oracle, eager = _fns(case, tau)
            for backend, device, dtype in configs:
                gen = torch.Generator().manual_seed(0)
                tensors = _inputs(case, args.n, args.d, dtype, device, gen)
                t64 = [t.detach().double().cpu().requires_grad_() for t in tensors]
                rows = 2 * args.n if case == "nt_xent" else args.n
                cot = torch.randn(rows, generator=gen, dtype=torch.float64)
                ref, ref_g = _run(oracle, t64, cot)
                with fastcl.use_backend(backend):
                    out, g = _run(fast, tensors, cot)
                e_out, e_g = _run(eager, tensors, cot)
                grad_err = max(max_err(a.cpu(), b) for a, b in zip(g, ref_g))
                eager_grad_err = max(max_err(a.cpu(), b) for a, b in zip(e_g, ref_g))
                print(f"{case:<18} {tau:>6g} {backend:<8} {str(dtype)[6:]:<9} "
                      f"{max_err(out.cpu(), ref):>9.2e} {max_err(e_out.cpu(), ref):>9.2e} "
                      f"{grad_err:>9.2e} {eager_grad_err:>9.2e}")


if __name__ == "__main__":
    main()
