// Fused, tiled similarity + log-softmax kernels for the CPU: NT-Xent and InfoNCE, forward and
// backward. The contract is the one in fastcl/kernels/__init__.py; the registration is in
// registration.cpp; the tiles, their schedules and the online logsumexp are in tiling.h.
//
// NT-Xent uses the symmetry of its similarity matrix: only tiles with J >= I are computed, each
// feeding its rows' and its columns' statistics (forward) or gradients (backward), which takes
// forward + backward from 3 matrix products to 2 and halves the tile passes. The tiles are
// scheduled in rounds of disjoint block pairs (the circle method of round-robin tournaments), so
// that no two threads ever write the same rows: no atomics, no per-thread copies of the outputs,
// and every row's accumulation order is fixed by the schedule alone, so results are bitwise
// reproducible and independent of the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "tiling.h"

namespace fastcl {
namespace {

using namespace tiling;

// ------------------------------------------------------------------------ NT-Xent ---------

// With positive_in_denominator false (DCL), the positive pairs are masked (-inf) in their tiles
// after their logits are read: the pair (i, i + N) is symmetric, so one mask takes the positive
// out of the row's and out of the column's statistics. With kScaleGrad, the centred sums t
// (OnlineLSE) of the rows and, off the diagonal, of the columns ride along in the same loops, for
// the gradient with respect to inv_temp (dscale); without it the loops are the plain ones.
template <typename T, bool kScaleGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_forward_impl(
    const at::Tensor& z, const at::Tensor& nz, double inv_temp, int64_t tile,
    bool positive_in_denominator) {
  const Rows<T> zr(z, nz, low_products(z, z, nz.scalar_type()));
  const int64_t n = zr.n, half = n / 2;
  const at::TensorOptions opts = zr.opts;
  at::Tensor m = at::full({n}, neg_inf<T>(), opts);
  auto l = at::zeros({n}, opts.dtype(at::kDouble));
  auto t = at::zeros({kScaleGrad ? n : 0}, opts.dtype(at::kDouble));
  auto s_pos = at::empty({n}, opts);
  OnlineLSE<T> st{m.data_ptr<T>(), l.data_ptr<double>(),
                  kScaleGrad ? t.data_ptr<double>() : nullptr};
  T* sp = s_pos.data_ptr<T>();
  const bool fast = one_exp<T>(inv_temp, n);

  auto tile_fn = [&](bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s,
                     Scratch<T>& scratch) {
    // Positives: row i's is column (i + N) mod 2N, taken from the very float its max sees.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = (i0 + r + half) % n - j0;
      if (c >= 0 && c < cols) sp[i0 + r] = s[r * cols + c];
    }
    if (!diagonal) {
      // Off the diagonal the tile also holds its columns' logits: rows j0.. as columns.
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t r = (j0 + c + half) % n - i0;
        if (r >= 0 && r < rows) sp[j0 + c] = s[r * cols + c];
      }
    }
    if (!positive_in_denominator) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = (i0 + r + half) % n - j0;
        if (c >= 0 && c < cols) s[r * cols + c] = neg_inf<T>();
      }
    }
    symmetric_lse_tile<T, kScaleGrad>(diagonal, i0, rows, j0, cols, s, scratch, st, fast);
  };
  for_each_symmetric_tile(zr, inv_temp, tile, tile_fn);
  auto [loss, lse] = finish<T>(m, l, s_pos);
  auto dscale = kScaleGrad ? scale_grad(m, l, t, s_pos, inv_temp) : at::empty({0}, opts);
  return {loss, lse, dscale};
}

template <typename T>
at::Tensor nt_xent_grad_impl(const at::Tensor& z, const at::Tensor& nz, const at::Tensor& lse_in,
                             const at::Tensor& g_in, double inv_temp, int64_t tile) {
  const Rows<T> zr(z, nz, low_products(z, z, nz.scalar_type()));
  const int64_t n = zr.n, d = zr.d, half = n / 2;
  const at::TensorOptions opts = zr.opts;
  const auto [lse_t, lo_t] = split_lse(lse_in, nz, n, "lse");
  const auto g_t = row_vector(g_in, nz, n, "g");
  const T* lse = lse_t.data_ptr<T>();
  const T* lo = lo_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  auto out = at::zeros({n, d}, opts);
  T* op = out.data_ptr<T>();
  const bool fast = one_exp<T>(inv_temp, n);

  auto tile_fn = [&](bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* w,
                     Scratch<T>& scratch) {
    symmetric_weights_tile(diagonal, i0, rows, j0, cols, w, scratch, lse, lo, g, fast);
    // Positive pairs: their weight is added by the caller, from the exact loss.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = (i0 + r + half) % n - j0;
      if (c >= 0 && c < cols) w[r * cols + c] = 0;
    }
    if (diagonal) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = (i0 + r + half) % n - j0;
        if (c >= 0 && c < cols) w[c * cols + r] = 0;
      }
    }
    accumulate_tile(op + i0 * d, w, rows, cols, false, zr, j0);
    if (!diagonal) accumulate_tile(op + j0 * d, w, cols, rows, true, zr, i0);
  };
  for_each_symmetric_tile(zr, inv_temp, tile, tile_fn);
  return out.mul_(inv_temp);
}

// ------------------------------------------------------------------------ general ---------

// With with_grad, also the rows' gradient direction v_i = inv_temp * sum_j P_ij khat_j over the
// non-positive columns, accumulated online as FlashAttention accumulates its output (rescaled
// whenever a row's max moves). d loss_i / d qhat_i = g_i v_i + (positive term): the backward
// needs no pass over the (N x M) logits for dq, which saves one of three matrix products.
//
// positive_in_denominator false (DCL): the positive column is masked (-inf) once its logit is
// read; an explicit key's logit starts nothing (m, l = -inf, 0 instead of s_pos, 1).
// kScaleGrad: the centred sums t ride along (see OnlineLSE), for dscale.
template <typename T, bool kScaleGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const c10::optional<at::Tensor>& k_pos, const c10::optional<at::Tensor>& n_pos,
    double inv_temp, c10::optional<int64_t> pos_offset, bool with_grad, int64_t tile,
    bool positive_in_denominator) {
  const bool low = low_products(q, k, nq.scalar_type());
  const Rows<T> qr(q, nq, low), kr(k, nk, low);
  const int64_t nr = qr.n, nc = kr.n, d = qr.d;
  const at::TensorOptions opts = qr.opts;
  at::Tensor m = at::full({nr}, neg_inf<T>(), opts);
  auto l = at::zeros({nr}, opts.dtype(at::kDouble));
  auto t = at::zeros({kScaleGrad ? nr : 0}, opts.dtype(at::kDouble));
  at::Tensor v = with_grad ? at::zeros({nr, d}, opts) : at::empty({0}, opts);
  at::Tensor s_pos;
  if (k_pos.has_value()) {
    // The extra positive logit q_i . kpos_i, scaled exactly as the columns are.
    const auto ph = normalized(*k_pos, *n_pos);
    s_pos = ((low ? normalized(q, nq) : qr.keep_hat) * ph).sum(1).mul_(inv_temp).contiguous();
    if (positive_in_denominator) {
      m.copy_(s_pos);  // t starts at 0: exp(0) * 0
      l.fill_(1.0);
    }
  } else {
    s_pos = at::zeros({nr}, opts);  // stays 0 without a positive: loss = lse
  }
  OnlineLSE<T> st{m.data_ptr<T>(), l.data_ptr<double>(),
                  kScaleGrad ? t.data_ptr<double>() : nullptr};
  T* sp = s_pos.data_ptr<T>();
  T* vp = with_grad ? v.data_ptr<T>() : nullptr;

  auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s) {
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s + r * cols;
      int64_t pos = -1;
      if (pos_offset.has_value()) {
        const int64_t c = (i0 + r + *pos_offset) % nc - j0;
        if (c >= 0 && c < cols) {
          sp[i0 + r] = sr[c];
          pos = c;
          if (!positive_in_denominator) sr[c] = neg_inf<T>();
        }
      }
      const T old_m = st.m[i0 + r];
      const T new_m = std::max(old_m, row_max(sr, cols));
      const T shift = shift_of(new_m);
      if (!with_grad) {
        if constexpr (kScaleGrad) {
          T ts;
          const T sum = row_exp_sum(sr, cols, shift, ts);
          st.merge(i0 + r, new_m, sum, ts);
        } else {
          st.merge(i0 + r, new_m, row_exp_sum(sr, cols, shift));
        }
        continue;
      }
      T sum = 0;
      T ts = 0;
      if constexpr (kScaleGrad) {
#pragma omp simd reduction(+ : sum, ts)
        for (int64_t c = 0; c < cols; ++c) {
          const T x = sr[c] - shift;
          const T e = exp_f(x);
          ts += centred(sr[c], e, x);
          sr[c] = e;
          sum += e;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cols; ++c) {
          const T e = exp_f(sr[c] - shift);
          sr[c] = e;
          sum += e;
        }
      }
      if (pos >= 0) sr[pos] = 0;  // the positive's weight is added by the caller
      const T rescale = exp_f(old_m - shift);
      T* vr = vp + (i0 + r) * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) vr[c] *= rescale;
      if constexpr (kScaleGrad) {
        st.merge(i0 + r, new_m, sum, ts);
      } else {
        st.merge(i0 + r, new_m, sum);
      }
    }
    if (with_grad) accumulate_tile(vp + i0 * d, s, rows, cols, false, kr, j0);
  };
  auto block_end = [&](int64_t i0, int64_t rows) {
    if (!with_grad) return;
    for (int64_t r = i0; r < i0 + rows; ++r) {
      const T scale = static_cast<T>(inv_temp / st.l[r]);
      T* vr = vp + r * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) vr[c] *= scale;
    }
  };
  for_each_row_block(qr, kr, inv_temp, tile, tile_fn, block_end);
  auto [loss, lse] = finish<T>(m, l, s_pos);
  auto dscale = kScaleGrad ? scale_grad(m, l, t, s_pos, inv_temp) : at::empty({0}, opts);
  return {loss, lse, v, dscale};
}

template <typename T>
at::Tensor grad_accumulate_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                                const at::Tensor& nb, const c10::optional<at::Tensor>& lse_a,
                                const c10::optional<at::Tensor>& g_a,
                                const c10::optional<at::Tensor>& lse_b,
                                const c10::optional<at::Tensor>& g_b, double inv_temp,
                                c10::optional<int64_t> pos_offset, int64_t tile) {
  const bool low = low_products(a, b, na.scalar_type());
  const Rows<T> ar(a, na, low), br(b, nb, low);
  const int64_t nr = ar.n, nc = br.n, d = ar.d;
  const at::TensorOptions opts = ar.opts;
  const bool by_row = lse_a.has_value();
  const auto [lse_t, lo_t] =
      by_row ? split_lse(*lse_a, na, nr, "lse_a") : split_lse(*lse_b, na, nc, "lse_b");
  const auto g_t = by_row ? row_vector(*g_a, na, nr, "g_a") : row_vector(*g_b, na, nc, "g_b");
  const T* lse = lse_t.data_ptr<T>();
  const T* lo = lo_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  auto out = at::zeros({nr, d}, opts);
  T* op = out.data_ptr<T>();

  if (by_row) {
    // The tiles of lse_forward(a, b): each logit is the float its row's lse was taken from.
    auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* w) {
      for (int64_t r = 0; r < rows; ++r) {
        T* wr = w + r * cols;
        const T shift = lse[i0 + r], lo_r = lo[i0 + r], gr = g[i0 + r];
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) wr[c] = gr * exp_f((wr[c] - shift) - lo_r);
        if (pos_offset.has_value()) {
          const int64_t c = (i0 + r + *pos_offset) % nc - j0;
          if (c >= 0 && c < cols) wr[c] = 0;  // the positive: added by the caller
        }
      }
      accumulate_tile(op + i0 * d, w, rows, cols, false, br, j0);
    };
    for_each_row_block(ar, br, inv_temp, tile, tile_fn,
                       [](int64_t, int64_t) {});
    return out.mul_(inv_temp);
  }

  // The lse belongs to b's rows (dk, dneg): the tiles of lse_forward(b, a) (tiling.h).
  for_each_column_stack(ar, br, inv_temp, tile, op,
                        [&](T* w, int64_t g0, int64_t g_rows, int64_t j0, int64_t cols) {
    for (int64_t r = 0; r < g_rows; ++r) {
      T* wr = w + r * cols;
      const T shift = lse[g0 + r], lo_r = lo[g0 + r], gr = g[g0 + r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) wr[c] = gr * exp_f((wr[c] - shift) - lo_r);
    }
    if (pos_offset.has_value()) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t r = (j0 + c + *pos_offset) % nc - g0;
        if (r >= 0 && r < g_rows) w[r * cols + c] = 0;  // the positive: added by the caller
      }
    }
  });
  return out.mul_(inv_temp);
}


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_forward(const at::Tensor& z,
                                                               const at::Tensor& nz,
                                                               double inv_temp, int64_t tile,
                                                               bool positive_in_denominator,
                                                               bool with_dscale) {
  check_tile(tile);
  check_rows(z, nz, "z");
  TORCH_CHECK(z.size(0) % 2 == 0, "fastcl_cpu: z must hold 2N rows");
  return dispatch(nz, [&](auto x) {
    using T = decltype(x);
    return with_dscale
               ? nt_xent_forward_impl<T, true>(z, nz, inv_temp, tile, positive_in_denominator)
               : nt_xent_forward_impl<T, false>(z, nz, inv_temp, tile, positive_in_denominator);
  });
}

at::Tensor nt_xent_grad(const at::Tensor& z, const at::Tensor& nz, const at::Tensor& lse,
                        const at::Tensor& g, double inv_temp, int64_t tile) {
  check_tile(tile);
  check_rows(z, nz, "z");
  TORCH_CHECK(z.size(0) % 2 == 0, "fastcl_cpu: z must hold 2N rows");
  return dispatch(nz, [&](auto t) {
    return nt_xent_grad_impl<decltype(t)>(z, nz, lse, g, inv_temp, tile);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const c10::optional<at::Tensor>& k_pos, const c10::optional<at::Tensor>& n_pos,
    double inv_temp, c10::optional<int64_t> pos_offset, bool with_grad, int64_t tile,
    bool positive_in_denominator, bool with_dscale) {
  check_tile(tile);
  check_rows(q, nq, "q");
  check_rows(k, nk, "k");
  TORCH_CHECK(q.size(1) == k.size(1), "fastcl_cpu: q and k must have the same width");
  TORCH_CHECK(k_pos.has_value() == n_pos.has_value(),
              "fastcl_cpu: k_pos and n_pos come together");
  TORCH_CHECK(!(k_pos.has_value() && pos_offset.has_value()),
              "fastcl_cpu: give at most one of k_pos and pos_offset");
  if (k_pos.has_value()) {
    check_rows(*k_pos, *n_pos, "k_pos");
    TORCH_CHECK(k_pos->sizes() == q.sizes(), "fastcl_cpu: k_pos must have q's shape");
  }
  TORCH_CHECK(k.size(0) > 0 || k_pos.has_value(), "fastcl_cpu: k must not be empty");
  return dispatch(nq, [&](auto x) {
    using T = decltype(x);
    return with_dscale ? lse_forward_impl<T, true>(q, k, nq, nk, k_pos, n_pos, inv_temp,
                                                   pos_offset, with_grad, tile,
                                                   positive_in_denominator)
                       : lse_forward_impl<T, false>(q, k, nq, nk, k_pos, n_pos, inv_temp,
                                                    pos_offset, with_grad, tile,
                                                    positive_in_denominator);
  });
}

at::Tensor grad_accumulate(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                           const at::Tensor& nb, const c10::optional<at::Tensor>& lse_a,
                           const c10::optional<at::Tensor>& g_a,
                           const c10::optional<at::Tensor>& lse_b,
                           const c10::optional<at::Tensor>& g_b, double inv_temp,
                           c10::optional<int64_t> pos_offset, int64_t tile) {
  check_tile(tile);
  check_rows(a, na, "a");
  check_rows(b, nb, "b");
  TORCH_CHECK(a.size(1) == b.size(1), "fastcl_cpu: a and b must have the same width");
  TORCH_CHECK(lse_a.has_value() == g_a.has_value() && lse_b.has_value() == g_b.has_value(),
              "fastcl_cpu: each lse comes with its g");
  TORCH_CHECK(lse_a.has_value() != lse_b.has_value(),
              "fastcl_cpu: give exactly one of (lse_a, g_a) and (lse_b, g_b)");
  return dispatch(na, [&](auto t) {
    return grad_accumulate_impl<decltype(t)>(a, b, na, nb, lse_a, g_a, lse_b, g_b, inv_temp,
                                             pos_offset, tile);
  });
}

}  // namespace fastcl
