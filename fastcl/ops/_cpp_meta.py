"""Fake (meta) implementations of the C++ kernels' operators, ``torch.ops.fastcl_cpu.*``.

fastcl's public ops call these from inside their own implementations, so tracing never reaches
them; the fakes exist so that the operators pass ``torch.library.opcheck`` on their own and can
be traced if called directly. Shapes only: the outputs are in the norms' dtype (float32, or
float64 for float64 inputs), except the row lse, always float64 (see csrc/contrastive.cpp);
dscale has one entry per row when requested, else shape (0,). SupCon's labels_* (csrc/labels.cpp)
also give the positives' count per row, in the norms' dtype. CLIP's rows_cols_forward
(csrc/clip.cpp) gives both directions' statistics: 2n entries each. SigLIP's sigmoid_forward /
sigmoid_grad (csrc/sigmoid.cpp) take x and y themselves (no norms): outputs in their dtype.
"""
from __future__ import annotations

import torch

_registered = False


def _rows(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return norm.new_empty(x.shape[0])


def _lse(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return norm.new_empty(x.shape[0], dtype=torch.float64)


def _dscale(x: torch.Tensor, norm: torch.Tensor, requested: bool) -> torch.Tensor:
    return norm.new_empty(x.shape[0] if requested else 0)


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("fastcl_cpu::nt_xent_forward")
    def _(z, nz, inv_temp, tile, positive_in_denominator=True, with_dscale=False):
        return _rows(z, nz), _lse(z, nz), _dscale(z, nz, with_dscale)

    @torch.library.register_fake("fastcl_cpu::nt_xent_grad")
    def _(z, nz, lse, g, inv_temp, tile):
        return nz.new_empty(z.shape)

    @torch.library.register_fake("fastcl_cpu::lse_forward")
    def _(q, k, nq, nk, k_pos, n_pos, inv_temp, pos_offset, with_grad, tile,
          positive_in_denominator=True, with_dscale=False):
        v = nq.new_empty(q.shape) if with_grad else nq.new_empty(0)
        return _rows(q, nq), _lse(q, nq), v, _dscale(q, nq, with_dscale)

    @torch.library.register_fake("fastcl_cpu::labels_forward")
    def _(q, k, nq, nk, lq, lk, inv_temp, offset, tile, with_dscale=False):
        return _rows(q, nq), _lse(q, nq), _dscale(q, nq, with_dscale), _rows(q, nq)

    @torch.library.register_fake("fastcl_cpu::labels_grad")
    def _(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b, gp_b, inv_temp, offset, tile):
        return na.new_empty(a.shape)

    @torch.library.register_fake("fastcl_cpu::labels_sym_forward")
    def _(z, nz, labels, inv_temp, tile, with_dscale=False):
        return _rows(z, nz), _lse(z, nz), _dscale(z, nz, with_dscale), _rows(z, nz)

    @torch.library.register_fake("fastcl_cpu::labels_sym_grad")
    def _(z, nz, labels, lse, ga, gp, inv_temp, tile):
        return nz.new_empty(z.shape)

    @torch.library.register_fake("fastcl_cpu::rows_cols_forward")
    def _(x, y, nx, ny, inv_temp, tile, with_dscale=False):
        n = x.shape[0]
        return (nx.new_empty(2 * n), nx.new_empty(2 * n, dtype=torch.float64),
                nx.new_empty(2 * n if with_dscale else 0))

    @torch.library.register_fake("fastcl_cpu::rows_cols_grad")
    def _(x, y, nx, ny, lse, g, inv_temp, tile):
        return nx.new_empty(x.shape), nx.new_empty(y.shape)

    @torch.library.register_fake("fastcl_cpu::sigmoid_forward")
    def _(x, y, scale, bias, pos_offset, with_grads, tile):
        n = x.shape[0]
        return (x.new_empty(n), x.new_empty(n), x.new_empty(n),
                x.new_empty(x.shape) if with_grads else x.new_empty(0),
                y.new_empty(y.shape) if with_grads else y.new_empty(0))

    @torch.library.register_fake("fastcl_cpu::sigmoid_grad")
    def _(x, y, scale, bias, pos_offset, g, need_rows, need_cols, tile):
        return (x.new_empty(x.shape) if need_rows else x.new_empty(0),
                y.new_empty(y.shape) if need_cols else y.new_empty(0))

    @torch.library.register_fake("fastcl_cpu::dense_forward")
    def _(q, k, nq, nk, inv_temp, pos_offset, positive_in_denominator, with_dscale,
          with_row_grad):
        dscale = _rows(q, nq) if with_dscale else nq.new_empty(0)
        v = nq.new_empty(q.shape) if with_row_grad else nq.new_empty(0)
        return (_rows(q, nq), _lse(q, nq), dscale, v,
                nq.new_empty((q.shape[0], k.shape[0])))

    @torch.library.register_fake("fastcl_cpu::dense_grad_cols")
    def _(probs, g, q, nq, inv_temp):
        return nq.new_empty((probs.shape[1], q.shape[1]))

    @torch.library.register_fake("fastcl_cpu::dense_backward")
    def _(probs, v, g, c, q, k, nq, nk, inv_temp, need_rows, need_cols):
        return (q.new_empty(q.shape) if need_rows else q.new_empty(0),
                k.new_empty(k.shape) if need_cols else k.new_empty(0))

    @torch.library.register_fake("fastcl_cpu::ema_")
    def _(targets, sources, momentum):
        return None

    @torch.library.register_fake("fastcl_cpu::queue_push_")
    def _(queue, ptr, keys):
        return None

    @torch.library.register_fake("fastcl_cpu::cosine_forward")
    def _(p, z):
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        return p.new_empty(p.shape[0], dtype=acc), p.new_empty((p.shape[0], 3), dtype=acc)

    @torch.library.register_fake("fastcl_cpu::cosine_backward")
    def _(g, p, z, stats):
        return p.new_empty(p.shape, dtype=stats.dtype)

    @torch.library.register_fake("fastcl_cpu::grad_accumulate")
    def _(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, pos_offset, tile):
        return na.new_empty(a.shape)
