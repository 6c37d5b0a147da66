// The dense (materialized-logits) path of the general softmax pass, for inputs whose logits are
// small: the whole (n x m) matrix in one buffer (fastcl/kernels/cpp.py keeps it under
// DENSE_CAP_BYTES; beyond, the tiled kernels of contrastive.cpp run). The contract is
// fastcl/kernels/__init__.py's lse_forward_with_grad, plus the softmax weights themselves,
// kept for the backward, which then needs one product for the columns' gradient instead of a
// recomputation of every logit and an accumulation:
//
//   forward   S = inv_temp * qhat khat^T         one BLAS product (multi-threaded)
//             per row: max, exp, sum, lse, loss, dscale; S overwritten with P = exp(s - lse)
//             v = inv_temp * P khat                one BLAS product (with_row_grad)
//   backward  d khat = inv_temp * P^T (g o qhat)  one BLAS product (dense_grad_cols)
//             dense_backward: that, the positive pairs' terms and the normalizations'
//             backward for both sides in one call (the op layer's ~20 elementwise ATen ops
//             on (n x d) tensors cost ~1.5 ms at N = 1024 on one core: as much as half a product)
//
// three products in all, as eager autograd, against four for the tiled kernels (which recompute
// the logits in the backward). At N = M = 1024 the buffer is 4 MiB.
//
// Low temperature: the backward uses the very P the forward computed, so no logit is ever
// recomputed (no rounding can differ between the passes), and P = exp(s - m) / l with m the row
// max: s - m is exact wherever the weight is not negligible, and the division adds one rounding.
//
// Deterministic: rows are shared out over threads, each row's statistics are computed by one
// thread in a fixed order (chunks of kChunk columns summed in float, then in double), no atomics;
// the products are single BLAS calls.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "fast_exp.h"

namespace fastcl {
namespace {

template <typename T>
constexpr T neg_inf_d() {
  return -std::numeric_limits<T>::infinity();
}

// Columns summed in the row's dtype before the partial sum goes into a double.
constexpr int64_t kChunk = 512;

constexpr double kEps = 1e-12;  // F.normalize's

// Norms may be passed empty: the kernels then compute them (fused into the pass that reads the
// rows anyway; the op layer's four vector_norm calls per step cost ~0.1 ms at N = 1024).
void check_rows_d(const at::Tensor& x, const at::Tensor& norm, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && norm.device().is_cpu(), "fastcl_cpu: ", name,
              " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "fastcl_cpu: ", name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(norm.dim() == 1 && (norm.size(0) == x.size(0) || norm.size(0) == 0),
              "fastcl_cpu: the norms of ", name, " must have shape (", x.size(0),
              ",) or be empty (computed here)");
  TORCH_CHECK(norm.scalar_type() == at::kFloat || norm.scalar_type() == at::kDouble,
              "fastcl_cpu: norms must be float32 or float64");
}

// Row norms as F.normalize takes them, max(|x_i|, eps): the given ones (contiguous), or, when
// `norm` is empty, computed from x's rows (sqrt of the sum of squares in T).
template <typename T>
at::Tensor norms_of(const at::Tensor& x, const at::Tensor& norm) {
  if (norm.numel() > 0 || x.size(0) == 0) return norm.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor xc = x.to(c10::CppTypeToScalarType<T>::value).contiguous();
  at::Tensor out = at::empty({n}, xc.options());
  const T* xp = xc.data_ptr<T>();
  T* np = out.data_ptr<T>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * d;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
      const T nr = std::sqrt(ss);
      np[r] = nr < T(kEps) ? T(kEps) : nr;  // NaN stays NaN (the comparison is false)
    }
  });
  return out;
}

at::Tensor normalized_rows(const at::Tensor& x, const at::Tensor& norm) {
  return (x.to(norm.scalar_type()) / norm.unsqueeze(1)).contiguous();
}

// One row of logits s (m entries) -> its statistics, and s overwritten with the softmax weights
// (the positive's set to 0: its weight is added by the op layer from the exact loss).
template <typename T>
struct RowOut {
  T loss;
  double lse;
  T dscale;
};

template <typename T>
RowOut<T> softmax_row(T* s, int64_t m, int64_t pos, bool in_denominator, bool with_dscale,
                      double inv_temp) {
  T s_pos = 0;
  if (pos >= 0) {
    s_pos = s[pos];
    if (!in_denominator) s[pos] = neg_inf_d<T>();  // DCL: not in the row's logsumexp
  }
  T mx = neg_inf_d<T>();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < m; ++c) mx = s[c] > mx ? s[c] : mx;
  // 0 when nothing finite is in the row (every logit excluded): exp(-inf - 0) = 0.
  const T shift = mx == neg_inf_d<T>() ? T(0) : mx;
  double l = 0, t = 0;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t c1 = std::min(m, c0 + kChunk);
    T sum = 0, tsum = 0;
    if (with_dscale) {
#pragma omp simd reduction(+ : sum, tsum)
      for (int64_t c = c0; c < c1; ++c) {
        const T x = s[c] - shift;
        const T e = exp_f(x);
        s[c] = e;
        sum += e;
        tsum += e == T(0) ? T(0) : e * x;  // excluded logits (x = -inf) add 0, not NaN
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = c0; c < c1; ++c) {
        const T e = exp_f(s[c] - shift);
        s[c] = e;
        sum += e;
      }
    }
    l += static_cast<double>(sum);
    t += static_cast<double>(tsum);
  }
  const double log_l = std::log(l);
  const T inv_l = static_cast<T>(1.0 / l);
#pragma omp simd
  for (int64_t c = 0; c < m; ++c) s[c] *= inv_l;
  if (pos >= 0) s[pos] = 0;
  RowOut<T> out;
  out.loss = (mx - s_pos) + static_cast<T>(log_l);
  out.lse = static_cast<double>(mx) + log_l;
  out.dscale = with_dscale ? static_cast<T>((t / l + static_cast<double>(mx - s_pos)) / inv_temp)
                           : T(0);
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    double inv_temp, c10::optional<int64_t> pos_offset, bool in_denominator, bool with_dscale,
    bool with_row_grad) {
  const at::Tensor qh = normalized_rows(q, norms_of<T>(q, nq));
  const at::Tensor kh = normalized_rows(k, norms_of<T>(k, nk));
  const int64_t n = qh.size(0), m = kh.size(0);
  const auto opts = qh.options();
  // S = inv_temp * qhat khat^T: one product, ATen's threads. (Strips of rows kept in L2 through
  // the product, the softmax and v's product measured 5-7% slower on one core at N = 1024:
  // MKL's smaller products lose more than the cache saves.)
  auto probs = at::empty({n, m}, opts);
  at::addmm_out(probs, probs, qh, kh.t(), /*beta=*/0, inv_temp);
  auto loss = at::empty({n}, opts);
  auto lse = at::empty({n}, opts.dtype(at::kDouble));
  auto dscale = with_dscale ? at::empty({n}, opts) : at::empty({0}, opts);
  T* pp = probs.data_ptr<T>();
  T* lp = loss.data_ptr<T>();
  double* ep = lse.data_ptr<double>();
  T* dp = with_dscale ? dscale.data_ptr<T>() : nullptr;
  // Rows of 1024 logits are ~2 us of work each: 16 a task keeps scheduling overhead small.
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = pos_offset.has_value() && m > 0 ? ((r + *pos_offset) % m + m) % m : -1;
      const auto st = softmax_row<T>(pp + r * m, m, pos, in_denominator, with_dscale, inv_temp);
      lp[r] = st.loss;
      ep[r] = st.lse;
      if (with_dscale) dp[r] = st.dscale;
    }
  });
  // v = inv_temp * P khat, the positive's column zeroed in P.
  auto v = with_row_grad ? at::empty({n, qh.size(1)}, opts) : at::empty({0}, opts);
  if (with_row_grad) at::addmm_out(v, v, probs, kh, /*beta=*/0, inv_temp);
  return {loss, lse, dscale, v, probs};
}

// The columns' gradient direction inv_temp * P^T (g o qhat): qhat's rows scaled by g (n x d)
// rather than P (n x m); P read transposed by BLAS itself, the result row-major (m x d). (MKL,
// N = 1024, D = 128, 2 threads: 1.69-1.83 ms against 1.83-2.06 ms for (g o qhat)^T P (d x m)
// plus 0.12-0.24 ms to transpose that back, interleaved, 2026-12-02.)
at::Tensor grad_cols(const at::Tensor& probs, const at::Tensor& g, const at::Tensor& q,
                     const at::Tensor& nq, double inv_temp) {
  const auto qg = q.to(nq.scalar_type()) * (g.to(nq.scalar_type()) / nq).unsqueeze(1);
  auto out = at::empty({probs.size(1), q.size(1)}, qg.options());
  at::addmm_out(out, out, probs.t(), qg, /*beta=*/0, inv_temp);
  return out;
}

// Row by row, into h (n x d, row-major): h_i <- d/dx_i through xhat_i = x_i / max(|x_i|, eps)
// of (u_i + c_i * yhat_i), yhat_i = y_i / ny_i (the positive pair's term, y the other side's
// rows); the op layer's _normalize_backward with the positive's term folded in, in one pass
// over the rows. The incoming gradient u is h itself (src null), or src (n x d) with row i
// scaled by scale[i] (the forward's v times g: no separate product).
template <typename T>
void normalize_backward_rows(T* h, const T* src, const T* scale, const T* x, const T* nx,
                             const T* y, const T* ny, const T* c, int64_t n, int64_t d) {
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* hr = h + r * d;
      const T* ur = src != nullptr ? src + r * d : hr;
      const T sr = src != nullptr ? scale[r] : T(1);
      const T* xr = x + r * d;
      const T* yr = y + r * d;
      const T nxr = nx[r], nyr = ny[r], cr = c[r];
      T radial = 0;
#pragma omp simd reduction(+ : radial)
      for (int64_t j = 0; j < d; ++j) {
        const T gh = ur[j] * sr + cr * (yr[j] / nyr);
        hr[j] = gh;
        radial += (xr[j] / nxr) * gh;
      }
      // Where the norm was clamped to eps, xhat = x / eps is linear in x: no projection.
      if (!(static_cast<double>(nxr) > kEps)) radial = 0;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) hr[j] = (hr[j] - (xr[j] / nxr) * radial) / nxr;
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> dense_backward_impl(
    const at::Tensor& probs, const at::Tensor& v, const at::Tensor& g_in, const at::Tensor& c_in,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq_in, const at::Tensor& nk_in,
    double inv_temp, bool need_rows, bool need_cols) {
  const int64_t n = q.size(0), d = q.size(1);
  const auto st = nq_in.scalar_type();
  const auto qc = q.to(st).contiguous(), kc = k.to(st).contiguous();
  const at::Tensor nq = norms_of<T>(qc, nq_in), nk = norms_of<T>(kc, nk_in.to(st));
  const auto g = g_in.to(st).contiguous(), c = c_in.to(st).contiguous();
  at::Tensor dq = at::empty({0}, q.options()), dk = at::empty({0}, k.options());
  if (need_rows) {
    // d qhat_i = g_i v_i + c_i khat_i
    const at::Tensor vc = v.to(st).contiguous();
    at::Tensor h = at::empty({n, d}, qc.options());
    normalize_backward_rows<T>(h.data_ptr<T>(), vc.data_ptr<T>(), g.data_ptr<T>(),
                               qc.data_ptr<T>(), nq.data_ptr<T>(), kc.data_ptr<T>(),
                               nk.data_ptr<T>(), c.data_ptr<T>(), n, d);
    dq = h.to(q.scalar_type());
  }
  if (need_cols) {
    // d khat_j = inv_temp * sum_i g_i P_ij qhat_i + c_j qhat_j (the positive of column j is
    // row j)
    at::Tensor h = grad_cols(probs, g, qc, nq, inv_temp);
    normalize_backward_rows<T>(h.data_ptr<T>(), nullptr, nullptr, kc.data_ptr<T>(),
                               nk.data_ptr<T>(), qc.data_ptr<T>(), nq.data_ptr<T>(),
                               c.data_ptr<T>(), n, d);
    dk = h.to(k.scalar_type());
  }
  return {dq, dk};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    double inv_temp, c10::optional<int64_t> pos_offset, bool positive_in_denominator,
    bool with_dscale, bool with_row_grad) {
  check_rows_d(q, nq, "q");
  check_rows_d(k, nk, "k");
  TORCH_CHECK(q.size(1) == k.size(1), "fastcl_cpu: q and k must have the same width");
  TORCH_CHECK(nq.scalar_type() == nk.scalar_type(), "fastcl_cpu: nq and nk must share a dtype");
  TORCH_CHECK(k.size(0) > 0, "fastcl_cpu: k must not be empty");
  TORCH_CHECK(positive_in_denominator || pos_offset.has_value(),
              "fastcl_cpu: positive_in_denominator=False needs a positive");
  if (nq.scalar_type() == at::kDouble)
    return dense_forward_impl<double>(q, k, nq, nk, inv_temp, pos_offset, positive_in_denominator,
                                      with_dscale, with_row_grad);
  return dense_forward_impl<float>(q, k, nq, nk, inv_temp, pos_offset, positive_in_denominator,
                                   with_dscale, with_row_grad);
}

at::Tensor dense_grad_cols(const at::Tensor& probs, const at::Tensor& g, const at::Tensor& q,
                           const at::Tensor& nq, double inv_temp) {
  check_rows_d(q, nq, "q");
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == q.size(0),
              "fastcl_cpu: probs must have shape (", q.size(0), ", m)");
  TORCH_CHECK(probs.scalar_type() == nq.scalar_type(),
              "fastcl_cpu: probs must have the norms' dtype");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == q.size(0), "fastcl_cpu: g must have shape (",
              q.size(0), ",)");
  TORCH_CHECK(nq.numel() == q.size(0), "fastcl_cpu: dense_grad_cols needs the norms of q");
  return grad_cols(probs, g, q, nq, inv_temp);
}

std::tuple<at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& probs, const at::Tensor& v, const at::Tensor& g, const at::Tensor& c,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    double inv_temp, bool need_rows, bool need_cols) {
  check_rows_d(q, nq, "q");
  check_rows_d(k, nk, "k");
  const int64_t n = q.size(0);
  TORCH_CHECK(k.sizes() == q.sizes(), "fastcl_cpu: dense_backward's k must have q's shape "
              "(in-batch: the positive of row i is column i)");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == n && c.dim() == 1 && c.size(0) == n,
              "fastcl_cpu: g and c must have shape (", n, ",)");
  if (need_rows)
    TORCH_CHECK(v.sizes() == q.sizes(), "fastcl_cpu: v must have q's shape");
  if (need_cols)
    TORCH_CHECK(probs.dim() == 2 && probs.size(0) == n && probs.size(1) == k.size(0) &&
                    probs.scalar_type() == nq.scalar_type(),
                "fastcl_cpu: probs must be (", n, ", ", k.size(0), ") in the norms' dtype");
  if (nq.scalar_type() == at::kDouble)
    return dense_backward_impl<double>(probs.contiguous(), v, g, c, q, k, nq, nk, inv_temp,
                                       need_rows, need_cols);
  return dense_backward_impl<float>(probs.contiguous(), v, g, c, q, k, nq, nk, inv_temp,
                                    need_rows, need_cols);
}

}  // namespace fastcl
