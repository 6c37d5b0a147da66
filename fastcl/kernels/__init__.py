"""Backend implementations of fastcl's kernel boundaries.

Every backend module exposes the same two functions for the similarity + log-softmax family:

``lse_forward(q, k, rq, rk, extra, inv_temp, exclude_diag, precision) -> lse``
    lse_i = logsumexp over j of s_ij = (q_i . k_j) * rq_i * rk_j * inv_temp, skipping j == i when
    ``exclude_diag``; ``extra`` (one logit per row, or None) joins each row's logsumexp.
``grad_accumulate(a, b, ra, rb, lse_a, g_a, lse_b, g_b, inv_temp, exclude_diag, precision) -> out``
    out_a = inv_temp * sum_b W_ab * (rb_b * b_b), with s_ab as above and
    W_ab = g_a exp(s_ab - lse_a) [if lse_a given] + g_b exp(s_ab - lse_b) [if lse_b given],
    excluded entries zero: the gradient with respect to the normalized rows of ``a``.

Neither ever holds the full similarity matrix. ``triton_contrastive`` holds the Triton kernels
(imported lazily so that ``TRITON_INTERPRET`` can be set first), ``chunked`` a row-chunked
PyTorch version. Modules here hold kernels and launchers only: no autograd, no torch.library.
"""
