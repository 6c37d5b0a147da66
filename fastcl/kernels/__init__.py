"""Backend implementations of fastcl's kernel boundaries.

Every backend module exposes the same four functions for the similarity + log-softmax family.
Rows of ``q``/``a``/``z`` are raw; ``n*`` are their float32 (float64) norms, clamped at eps as
``F.normalize`` does, so s_ij = (q_i / nq_i) . (k_j / nk_j) * inv_temp is the cosine similarity
over temperature.

``lse_forward(q, k, nq, nk, positive, inv_temp, pos_offset, precision) -> (loss, lse)``
    Each row's logits are {s_ij : j < n_k}, plus, when ``positive`` = (k_pos, n_pos) is given,
    the logit of row i against its own positive row k_pos[i]. The positive logit is column
    (i + pos_offset) mod n_k, or that extra logit when ``pos_offset`` is None. With neither
    (``positive`` and ``pos_offset`` both None) there is no positive: s_pos = 0 and loss = lse
    (the other ranks' block of a distributed loss).
    lse_i = logsumexp of the row's logits; loss_i = (m_i - s_pos_i) + log l_i with m_i the row
    max and l_i = sum exp(s - m_i). Taking the positive from the same arithmetic as the max
    makes a confident row's loss as exact as eager cross-entropy's (no lse - s_pos cancellation).
    lse is float64 whatever the inputs' dtype (loss is float32, or float64 for float64).
``lse_forward_with_grad(q, k, nq, nk, positive, inv_temp, pos_offset, precision) -> (loss, lse, v)``
    Optional (``cpp``, ``chunked``): ``lse_forward`` plus v_i = inv_temp * sum_j P_ij khat_j over
    the non-positive columns (P = exp(s - lse)), accumulated online as FlashAttention accumulates
    its output. d loss_i / d qhat_i is g_i v_i plus the positive's term, so the backward needs no
    pass over the logits for the rows' gradient. Without it, the op gets v from
    ``grad_accumulate`` with g = 1 (the same pass, run in forward).
``grad_accumulate(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp, pos_offset, precision) -> out``
    out_a = inv_temp * sum_b W_ab * (b_b / nb_b), with s_ab as above and W_ab = g_a exp(s_ab -
    lse_a) when the lse belongs to a's rows, or g_b exp(s_ab - lse_b) when it belongs to b's
    (exactly one is given): dq for (a, b) = (q, k), dk for (k, q). Pairs with
    b == (a + pos_offset) mod n_b are skipped: the positive pair's weight, g (exp(-loss) - 1),
    is added by the caller with expm1.
``nt_xent_forward(z, nz, inv_temp, precision) -> (loss, lse)``
    ``lse_forward`` with q = k = z, the diagonal excluded and positives at i + N (mod 2N).
``nt_xent_grad(z, nz, lse, g, inv_temp, precision) -> out``
    d/d zhat of sum_i g_i lse_i over the non-positive pairs, by symmetry: out = inv_temp *
    sum_j (g_i P_ij + g_j P_ji) zhat_j, diagonal and positive pairs skipped.

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
