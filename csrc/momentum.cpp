// Momentum-encoder and MoCo-queue kernels for the CPU: a fused multi-tensor EMA and an in-place
// ring-buffer push. Registered in registration.cpp; fastcl/ops/momentum.py wraps them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fastcl {
namespace {

// The smallest share of elements at::parallel_for hands a thread.
constexpr int64_t kChunk = 1 << 15;

// t <- m t + (1 - m) s, in float32 arithmetic (float64 for float64) whatever the storage type.
template <typename T, typename Acc>
void ema_range(T* t, const T* s, int64_t n, Acc m, Acc one_minus_m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Acc x = static_cast<Acc>(t[i]);
    const Acc y = static_cast<Acc>(s[i]);
    t[i] = static_cast<T>(x * m + y * one_minus_m);
  }
}

template <typename T>
void ema_group(const std::vector<at::Tensor>& targets, const std::vector<at::Tensor>& sources,
               double momentum) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Acc m = static_cast<Acc>(momentum);
  const Acc one_minus_m = static_cast<Acc>(1.0 - momentum);  // formed in float64
  const int64_t count = static_cast<int64_t>(targets.size());
  std::vector<int64_t> offset(count + 1, 0);  // the group as one virtual flat array
  std::vector<T*> tp(count);
  std::vector<const T*> sp(count);
  for (int64_t i = 0; i < count; ++i) {
    offset[i + 1] = offset[i] + targets[i].numel();
    tp[i] = targets[i].data_ptr<T>();
    sp[i] = sources[i].data_ptr<T>();
  }
  // Split by elements, not by tensors: a ResNet's small tensors come first and its large
  // ones last, so an even split of tensors would leave one core most of the bytes.
  at::parallel_for(0, offset[count], kChunk, [&](int64_t b, int64_t e) {
    int64_t i = std::upper_bound(offset.begin(), offset.end(), b) - offset.begin() - 1;
    for (; i < count && offset[i] < e; ++i) {
      const int64_t lo = std::max(b, offset[i]) - offset[i];
      const int64_t hi = std::min(e, offset[i + 1]) - offset[i];
      if (hi > lo) ema_range(tp[i] + lo, sp[i] + lo, hi - lo, m, one_minus_m);
    }
  });
}

// Storage order is element order for both tensors: the EMA may run over raw memory.
bool same_dense_layout(const at::Tensor& t, const at::Tensor& s) {
  return t.is_non_overlapping_and_dense() && s.is_non_overlapping_and_dense() &&
         t.strides() == s.strides();
}

}  // namespace

void ema_(at::TensorList targets, at::TensorList sources, const at::Tensor& momentum) {
  TORCH_CHECK(targets.size() == sources.size(), "fastcl_cpu::ema_: ", targets.size(),
              " targets but ", sources.size(), " sources");
  TORCH_CHECK(momentum.numel() == 1 && momentum.device().is_cpu(),
              "fastcl_cpu::ema_: momentum must be a one-element CPU tensor");
  const double m = momentum.item<double>();  // a CPU tensor: no device sync
  // Group by dtype; a pair whose layouts differ goes through ATen (correct, not fused).
  std::vector<at::Tensor> groups[4][2];
  const at::ScalarType kinds[4] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& t = targets[i];
    const at::Tensor& s = sources[i];
    TORCH_CHECK(t.device().is_cpu() && s.device().is_cpu(), "fastcl_cpu::ema_: tensor ", i,
                " is not on the CPU");
    TORCH_CHECK(t.sizes() == s.sizes(), "fastcl_cpu::ema_: tensor ", i, ": target shape ",
                t.sizes(), " != source shape ", s.sizes());
    TORCH_CHECK(t.scalar_type() == s.scalar_type(), "fastcl_cpu::ema_: tensor ", i,
                ": target dtype ", t.scalar_type(), " != source dtype ", s.scalar_type());
    const auto k = std::find(kinds, kinds + 4, t.scalar_type()) - kinds;
    TORCH_CHECK(k < 4, "fastcl_cpu::ema_: tensor ", i, " has dtype ", t.scalar_type(),
                "; floating-point tensors only");
    if (t.numel() == 0) continue;
    if (same_dense_layout(t, s)) {
      groups[k][0].push_back(t);
      groups[k][1].push_back(s);
    } else {
      at::Tensor acc = t.to(k == 1 ? at::kDouble : at::kFloat);
      acc.mul_(m).add_(s.to(acc.scalar_type()), 1.0 - m);
      t.copy_(acc);
    }
  }
  if (!groups[0][0].empty()) ema_group<float>(groups[0][0], groups[0][1], m);
  if (!groups[1][0].empty()) ema_group<double>(groups[1][0], groups[1][1], m);
  if (!groups[2][0].empty()) ema_group<c10::Half>(groups[2][0], groups[2][1], m);
  if (!groups[3][0].empty()) ema_group<c10::BFloat16>(groups[3][0], groups[3][1], m);
}

namespace {

// The push itself, on checked arguments: row (ptr + i) mod K of queue <- keys[i] (cast to
// queue's dtype), for the last min(B, K) keys (earlier ones would be overwritten within this
// push); then ptr <- (ptr + B) mod K. Two memcpys at most: no thread pool for 128 KiB.
void push_rows(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys) {
  const int64_t k = queue.size(0), b = keys.size(0), d = queue.size(1);
  int64_t* pp = ptr.data_ptr<int64_t>();
  const int64_t start = ((*pp % k) + k) % k;
  if (b > 0) {
    const int64_t first = std::max<int64_t>(0, b - k);  // keys before it are overwritten
    // keys as they are when they are already rows of queue's dtype: no ATen call, which costs
    // more than the copy itself when the caches are cold.
    const bool as_is = first == 0 && keys.scalar_type() == queue.scalar_type() &&
                       keys.is_contiguous();
    const at::Tensor src =
        as_is ? keys : keys.narrow(0, first, b - first).to(queue.scalar_type()).contiguous();
    const int64_t rows = b - first;
    const int64_t row_bytes = d * queue.element_size();
    const char* from = static_cast<const char*>(src.data_ptr());
    char* to = static_cast<char*>(queue.data_ptr());
    // Two contiguous runs: up to the end of the ring, then from its start.
    const int64_t dest = (start + first) % k;
    const int64_t run1 = std::min(rows, k - dest);
    std::memcpy(to + dest * row_bytes, from, run1 * row_bytes);
    if (rows > run1) std::memcpy(to, from + run1 * row_bytes, (rows - run1) * row_bytes);
  }
  *pp = (start + b) % k;
}

bool dense_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage();
}

}  // namespace

void queue_push_(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys) {
  TORCH_CHECK(queue.device().is_cpu() && ptr.device().is_cpu() && keys.device().is_cpu(),
              "fastcl_cpu::queue_push_: CPU tensors only");
  TORCH_CHECK(queue.dim() == 2 && keys.dim() == 2 && queue.size(1) == keys.size(1),
              "fastcl_cpu::queue_push_: queue (K, D) and keys (B, D) expected");
  TORCH_CHECK(ptr.numel() == 1 && ptr.scalar_type() == at::kLong,
              "fastcl_cpu::queue_push_: ptr must be a one-element int64 tensor");
  TORCH_CHECK(queue.is_contiguous(), "fastcl_cpu::queue_push_: queue must be contiguous");
  TORCH_CHECK(queue.size(0) > 0, "fastcl_cpu::queue_push_: the queue has no rows");
  push_rows(queue, ptr, keys);
}

// fastcl.queue_push_'s eager CPU path in one call: false, with nothing written, unless the
// arguments pass fastcl.functional.queue_push_'s checks and are dense CPU tensors (the caller
// then takes its checked path, which raises the documented errors or runs another backend).
// Otherwise marks queue and ptr modified in place (their autograd version counters, as
// PyTorch's in-place ops do; it raises, before writing, for an inference tensor outside
// InferenceMode), pushes, and returns true. Registered CompositeImplicitAutograd (see
// registration.cpp): a CUDA or meta argument gets false instead of a dispatch error.
bool queue_push_eager_(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys) {
  // Plain eager mode only: a dispatch mode (make_fx, FakeTensorMode, a logging mode), a
  // functorch transform or functionalization adds its keys to the thread's included set (which
  // otherwise holds BackendSelect and ADInplaceOrView), and the caller's checked path then
  // lets them see the push as an op.
  const c10::DispatchKeySet plain({c10::DispatchKey::BackendSelect,
                                   c10::DispatchKey::ADInplaceOrView});
  if (!(c10::impl::tls_local_dispatch_key_set().included_ - plain).empty()) return false;
  if (!(dense_cpu(queue) && dense_cpu(ptr) && dense_cpu(keys))) return false;
  if (!(at::isFloatingType(queue.scalar_type()) && queue.dim() == 2 && queue.size(0) > 0 &&
        queue.is_contiguous())) {
    return false;
  }
  if (!(ptr.numel() == 1 && ptr.scalar_type() == at::kLong)) return false;
  if (!(keys.dim() == 2 && keys.size(1) == queue.size(1))) return false;
  queue.unsafeGetTensorImpl()->bump_version();
  ptr.unsafeGetTensorImpl()->bump_version();
  push_rows(queue, ptr, keys);
  return true;
}

}  // namespace fastcl
