"""Backend implementations of fastcl's kernel boundaries (contract version 2).

The engine's ops (``fastcl.ops.contrastive``, one op pair for every softmax-family loss of
``fastcl.engine``) call these functions; every backend module exposes the same ones. Rows of
``q``/``a``/``z`` are raw; ``n*`` are their float32 (float64) norms, clamped at eps as
``F.normalize`` does, so s_ij = (q_i / nq_i) . (k_j / nk_j) * inv_temp is the cosine similarity
times the scale, and d_ij = s_ij / inv_temp the raw cosine.

``inv_temp`` (the scale, 1/tau for a temperature) is a Python float, or a 0-dim floating tensor
on the inputs' device (a learnable scale on the GPU: never read on the host; Triton loads it
in the kernel). The C++ kernels are CPU-only and always get a float.

``lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, precision, positive_in_denominator=True, with_dscale=False) -> (loss, lse, dscale)``
    Each row's logits are {s_ij : j < n_k}, plus, when ``positive`` = (k_pos, n_pos) is given,
    the logit of row i against its own positive row k_pos[i]. The positive logit is column
    (i + pos_offset) mod n_k, or that extra logit when ``pos_offset`` is None. With neither
    (``positive`` and ``pos_offset`` both None) there is no positive: s_pos = 0 and loss = lse
    (the other ranks' block of a distributed loss).
    lse_i = logsumexp of the row's logits (without the positive's when
    ``positive_in_denominator`` is False: DCL); loss_i = (m_i - s_pos_i) + log l_i with m_i the
    row max and l_i = sum exp(s - m_i). Taking the positive from the same arithmetic as the max
    makes a confident row's loss as exact as eager cross-entropy's (no lse - s_pos cancellation).
    lse is float64 whatever the inputs' dtype (loss is float32, or float64 for float64).
    With ``with_dscale``: dscale_i = sum_j p_ij d_ij - d_pos_i = d loss_i / d inv_temp (p the
    row's softmax over its denominator, d_pos = s_pos / inv_temp), accumulated centred on the
    running max: t_i = sum_j exp(s_ij - m_i)(s_ij - m_i) online (rescaled to t' = exp(m - m')
    (t + (m - m') l) when the max moves; excluded logits add 0), dscale_i = (t_i / l_i + (m_i -
    s_pos_i)) / inv_temp: no cancellation when the positive dominates. Else an empty tensor.
``lse_forward_with_grad(...same...) -> (loss, lse, dscale, v)``
    Optional (``cpp``, ``chunked``): ``lse_forward`` plus v_i = inv_temp * sum_j P_ij khat_j over
    the non-positive columns (P = exp(s - lse)), accumulated online as FlashAttention accumulates
    its output. d loss_i / d qhat_i is g_i v_i plus the positive's term, so the backward needs no
    pass over the logits for the rows' gradient. Without it, the op gets v from
    ``grad_accumulate`` with g = 1 (the same pass, run in forward).
``grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, pos_offset, precision) -> out``
    out_a = inv_temp * sum_b W_ab * (b_b / nb_b), with s_ab as above and W_ab = g_a exp(s_ab -
    lse_a) when the lse belongs to a's rows, or g_b exp(s_ab - lse_b) when it belongs to b's
    (exactly one is given): dq for (a, b) = (q, k), dk for (k, q). Pairs with
    b == (a + pos_offset) mod n_b are skipped: the positive pair's weight (g (exp(-loss) - 1),
    or -g when the positive is not in the denominator) is added by the op layer.
``nt_xent_forward(z, nz, inv_temp, precision, positive_in_denominator=True, with_dscale=False) -> (loss, lse, dscale)``
    ``lse_forward`` with q = k = z, the diagonal excluded and positives at i + N (mod 2N).
``nt_xent_grad(z, nz, lse, g, inv_temp, precision) -> out``
    d/d zhat of sum_i g_i lse_i over the non-positive pairs, by symmetry: out = inv_temp *
    sum_j (g_i P_ij + g_j P_ji) zhat_j, diagonal and positive pairs skipped.

``rows_cols_forward(x, y, nx, ny, inv_temp, precision, with_dscale=False) -> (loss, lse, dscale)``
    The both-directions epilogue (CLIP, ``engine.CLIP``): x, y (n, D), s_ij = inv_temp *
    xhat_i . yhat_j, the positive of row i and of column i at (i, i). One pass over the tiles
    gives row losses lr_i = (m_i - s_ii) + log l_i and column losses lc_j likewise over column
    j, each from the very float its max and sum saw: loss = [lr ; lc] (2n), lse (2n, float64)
    and, with ``with_dscale``, dscale = [sum_j p^r_ij d_ij - d_ii ; sum_i p^c_ij d_ij - d_jj]
    accumulated centred on the running max as above; else an empty tensor. The op passes norms
    of ones for ``normalize=False`` (CLIP's features are used as given).
``rows_cols_grad(x, y, nx, ny, lse, g, inv_temp, precision) -> (dx_hat, dy_hat)``
    With W_ij = g_r_i exp(s_ij - lse_r_i) + g_c_j exp(s_ij - lse_c_j) over i != j (the diagonal
    skipped; ``lse`` and ``g`` are (2n,), [rows ; columns]): dx_hat = inv_temp W yhat, dy_hat =
    inv_temp W^T xhat, each logit recomputed by the forward's own product. The op layer adds
    the positives' term c_i = inv_temp (g_r_i expm1(-lr_i) + g_c_i expm1(-lc_i)) to both, then
    the normalization's backward when the spec normalizes.

``sigmoid_forward(x, y, scale, bias, pos_offset, with_grads, precision) -> (loss, dscale, dbias, dx, dy)``
    The sigmoid epilogue (SigLIP, ``engine.SIGLIP``; op layer ``fastcl.ops.sigmoid``): x (n, D)
    and y (m, D) used as given, z_ij = scale * x_i . y_j + bias, label t_ij = +1 for j = i +
    ``pos_offset`` where 0 <= j < m (``pos_offset`` None: no positive), else -1; pair loss
    l_ij = softplus(-t_ij z_ij) (max(u, 0) + log1p(exp(-|u|)): finite for any finite z) and
    weight w_ij = d l_ij / d z_ij = -t_ij sigmoid(-t_ij z_ij) (the positive's never formed as
    sigmoid(z) - 1). Per row: loss_i = sum_j l_ij, dscale_i = sum_j w_ij x_i . y_j (raw dots),
    dbias_i = sum_j w_ij, each summed per tile in the accumulation dtype and across tiles in
    float64. With ``with_grads``: the gradients of sum_i loss_i, dx = scale W y and dy = scale
    W^T x (C++ and chunked: from the same tile pass, 3 products; Triton: dy from a second pass
    that recomputes the logits); else empty. ``scale`` and ``bias``: floats, or (Triton) 0-dim
    device tensors read in the kernel. Everything in the accumulation dtype.
``sigmoid_grad(x, y, scale, bias, pos_offset, g, need_rows, need_cols, precision) -> (dx, dy)``
    dx = scale (g o W) y, dy = scale (g o W)^T x with per-row weights g, the logits recomputed
    (the backward of per-row losses); empty where not needed.

``labels_forward(q, k, nq, nk, lq, lk, inv_temp, offset, precision, with_dscale=False) -> (loss, lse, dscale, count)``
    The label positives (SupCon, ``engine.SUPCON_ROWS``): q (n, D), k (m, D), s_ij as above;
    ``lq`` (n,) and ``lk`` (m,) int64 labels; row i's own column i + ``offset`` (0 <= offset,
    offset + n <= m: the rows are k[offset:offset + n], passed separately) is excluded from
    everything; its positives are the other columns with lk[j] == lq[i], count_i of them
    (returned in the accumulation dtype). lse_i (float64) = logsumexp over every column but
    its own (-inf when there is none); loss_i = (m_i - sp_i / count_i) + log l_i with sp_i the
    sum of the positive logits (each the very float the max and sum saw), and loss_i = 0 when
    count_i = 0 (SupContrast's convention: no positive, no loss). With ``with_dscale``:
    dscale_i = (t_i / l_i + (m_i - sp_i / count_i)) / inv_temp = sum_j p_ij d_ij - mean of the
    positives' d_ij (t_i the centred moment above), 0 when count_i = 0; else empty.
``labels_grad(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b, gp_b, inv_temp, offset, precision) -> out_a``
    out_a = inv_temp * sum_b W_ab bhat_b over the label pass's pairs. With the statistics on
    a's side (lse_a, ga_a, gp_a given; the b ones None): W_ab = ga_a exp(s_ab - lse_a) -
    gp_a [la_a == lb_b], the pair (a, a + offset) excluded: the rows' gradient, (a, b) = (q,
    k). With them on b's side: W_ab = ga_b exp(s_ab - lse_b) - gp_b [la_a == lb_b], the pair
    (b + offset, b) excluded: the columns' gradient, (a, b) = (k, q). The op layer passes ga
    = g and gp = g / count, both 0 where count = 0.
``labels_sym_forward(z, nz, labels, inv_temp, precision, with_dscale=False) -> (loss, lse, dscale, count)``
    ``labels_forward`` with q = k = z, lq = lk = ``labels``, offset 0 (SupCon's
    ``contrast_mode="all"``, ``engine.SUPCON``): the logits are symmetric, so a backend may
    compute each tile pair once.
``labels_sym_grad(z, nz, labels, lse, ga, gp, inv_temp, precision) -> out``
    d/d zhat of the symmetric pass: out = inv_temp * sum_j (W_ij + W_ji) zhat_j with W_ij =
    ga_i exp(s_ij - lse_i) - gp_i [l_i == l_j] over i != j: one pass over the tiles on and
    above the diagonal gives both (the positives are inside the tiles: no separate term).

Optional, C++ only: the dense path for small in-batch passes (``dense_forward``,
``dense_grad_cols``, ``dense_backward``, ``dense_fits``; see ``fastcl.kernels.cpp``). While the
(n x m) logits fit ``DENSE_CAP_BYTES`` (16 MiB) the op keeps the probabilities from the forward
for the columns' gradient: 3 products for forward + backward instead of 4; beyond the cap, the
tiled passes above (memory O(N*D)). The choice is the op layer's, from the shape alone.

The backward passes need nothing new for DCL: they skip positive pairs already, and the lse they
are given is the one the forward computed (without the positive).

Low temperatures (tested down to tau = 1e-4 in float32, tests/test_temperature.py): logits are
~1/tau, and one float32 ulp of them (~1e-3 at 1e-4) is as large as the differences the softmax
weights depend on. The backward passes therefore (1) take each logit from the very product the
forward's lse came from (same tile, same operand order: a BLAS product's rounding may depend on
its shape and on which operand comes first), and (2) exponentiate (s - hi) - lo with the float64
lse = hi + lo, hi its nearest float, never s - (lse rounded to a float of size 1/tau).

None ever holds the full similarity matrix. ``triton_contrastive`` holds the Triton kernels
(imported lazily so that ``TRITON_INTERPRET`` can be set first), ``chunked`` a tiled PyTorch
version. Modules here hold kernels and launchers only: no autograd, no torch.library.
"""
