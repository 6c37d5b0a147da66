// BYOL's loss, fused: per row, 2 - 2 cos(p_i, z_i) in one pass over p and z, and its gradient
// with respect to p in one more. Registered in registration.cpp; fastcl/ops/cosine.py wraps it.
//
// The norms are clamped at eps = 1e-12 as F.normalize clamps them, so the values and the
// gradient are those of eager `2 - 2 * (F.normalize(p) * F.normalize(z)).sum(1)`, a zero row
// included. Arithmetic in float32 (float64 for float64) whatever the storage type.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace fastcl {
namespace {

constexpr double kEps = 1e-12;

template <typename T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check(const at::Tensor& p, const at::Tensor& z) {
  TORCH_CHECK(p.device().is_cpu() && z.device().is_cpu(), "fastcl_cpu cosine: CPU tensors only");
  TORCH_CHECK(p.dim() == 2 && p.sizes() == z.sizes(),
              "fastcl_cpu cosine: p and z must be (B, F) of one shape, got ", p.sizes(), " and ",
              z.sizes());
  TORCH_CHECK(p.scalar_type() == z.scalar_type(), "fastcl_cpu cosine: dtypes differ");
}

// Rows per thread share: about 16K elements, so small batches stay on one thread.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

template <typename T>
void forward_rows(const T* pp, const T* zp, AccOf<T>* lp, AccOf<T>* sp, int64_t b, int64_t d) {
  using Acc = AccOf<T>;
  at::parallel_for(0, b, grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = pp + r * d;
      const T* y = zp + r * d;
      Acc dot = 0, xx = 0, yy = 0;
#pragma omp simd reduction(+ : dot, xx, yy)
      for (int64_t j = 0; j < d; ++j) {
        const Acc a = static_cast<Acc>(x[j]), c = static_cast<Acc>(y[j]);
        dot += a * c;
        xx += a * a;
        yy += c * c;
      }
      const Acc ip = Acc(1) / std::max(std::sqrt(xx), static_cast<Acc>(kEps));
      const Acc iz = Acc(1) / std::max(std::sqrt(yy), static_cast<Acc>(kEps));
      const Acc cos = dot * ip * iz;
      lp[r] = Acc(2) - Acc(2) * cos;
      sp[3 * r] = ip;
      sp[3 * r + 1] = iz;
      sp[3 * r + 2] = cos;
    }
  });
}

template <typename T>
void backward_rows(const AccOf<T>* gp, const T* pp, const T* zp, const AccOf<T>* sp,
                   AccOf<T>* out, int64_t b, int64_t d) {
  using Acc = AccOf<T>;
  at::parallel_for(0, b, grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Acc ip = sp[3 * r], iz = sp[3 * r + 1], cos = sp[3 * r + 2];
      const Acc scale = Acc(-2) * gp[r] * ip;
      const Acc wz = scale * iz;
      // The clamp is active when |p| <= eps, i.e. ip >= 1 / eps: no projection term then.
      const Acc wp = ip < static_cast<Acc>(1.0 / kEps) ? -scale * cos * ip : Acc(0);
      const T* x = pp + r * d;
      const T* y = zp + r * d;
      Acc* o = out + r * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        o[j] = wz * static_cast<Acc>(y[j]) + wp * static_cast<Acc>(x[j]);
      }
    }
  });
}

// Calls f with a value of the storage type: float, double, Half or BFloat16.
template <typename F>
void dispatch(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, name, ": floating-point inputs only, got ", type);
  }
}

}  // namespace

// (loss (B,), stats (B, 3) = [1 / max(|p|, eps), 1 / max(|z|, eps), cos]) in the accumulation
// dtype; stats feed the backward.
std::tuple<at::Tensor, at::Tensor> cosine_forward(const at::Tensor& p_in, const at::Tensor& z_in) {
  check(p_in, z_in);
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t b = p.size(0), d = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({b}, p.options().dtype(acc));
  at::Tensor stats = at::empty({b, 3}, p.options().dtype(acc));
  dispatch(p.scalar_type(), "fastcl_cpu::cosine_forward", [&](auto tag) {
    using T = decltype(tag);
    using Acc = AccOf<T>;
    forward_rows<T>(p.data_ptr<T>(), z.data_ptr<T>(), loss.data_ptr<Acc>(),
                    stats.data_ptr<Acc>(), b, d);
  });
  return {loss, stats};
}

// d(sum_i g_i loss_i) / d p = -2 g_i ip_i (z_i iz_i - cos_i ip_i p_i): the derivative of
// p / max(|p|, eps), whose projection term vanishes where the clamp is active. z gets none.
at::Tensor cosine_backward(const at::Tensor& g_in, const at::Tensor& p_in, const at::Tensor& z_in,
                           const at::Tensor& stats_in) {
  check(p_in, z_in);
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t b = p.size(0), d = p.size(1);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = g_in.to(acc).contiguous(), stats = stats_in.to(acc).contiguous();
  TORCH_CHECK(g.numel() == b && stats.numel() == 3 * b, "fastcl_cpu::cosine_backward: ", b,
              " rows expected");
  at::Tensor dp = at::empty({b, d}, p.options().dtype(acc));
  dispatch(p.scalar_type(), "fastcl_cpu::cosine_backward", [&](auto tag) {
    using T = decltype(tag);
    using Acc = AccOf<T>;
    backward_rows<T>(g.data_ptr<Acc>(), p.data_ptr<T>(), z.data_ptr<T>(), stats.data_ptr<Acc>(),
                     dp.data_ptr<Acc>(), b, d);
  });
  return dp;
}

}  // namespace fastcl
