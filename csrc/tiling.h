// The tiling machinery shared by fastcl's pairwise-similarity kernels (contrastive.cpp, clip.cpp:
// CLIP's row + column statistics, sigmoid.cpp: SigLIP's pairs; labels.cpp: SupCon's labels).
//
// Every kernel walks (tile x tile) blocks of a similarity matrix s = scale * rhat chat^T. A tile's
// logits come from one BLAS product (ATen's matmul, single-threaded inside the parallel region;
// for bf16 rows on CPUs with 16-bit dot products, a bf16 product with float32 sums: Rows and
// bf16.h) into a per-thread scratch buffer that stays in the core's L2 cache; the max / exp / sum
// work on it runs in vectorized loops (fast_exp.h); at::parallel_for spreads tiles over the
// cores. Nothing of size N x N is ever allocated. Arithmetic is in float32 for
// float32/bfloat16/float16 inputs (the Python side passes float32 norms), float64 for float64.
//
// Three loops: for_each_symmetric_tile (C = R: only tiles with J >= I, each feeding its rows' and
// its columns' statistics, scheduled in rounds of disjoint block pairs so that no two threads
// ever write the same rows), for_each_tile_by_diagonals (C != R, every tile feeding both its
// rows and its columns: rounds of wrapped block diagonals, square or rectangular) and
// for_each_row_block (row blocks owned by one thread each, walking all column tiles in order).
// None needs atomics for its data, and each row's accumulation order is fixed
// by the shapes alone: results are bitwise reproducible and independent of the thread count.
//
// Header-only (templates and inline functions) in namespace fastcl::tiling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "fast_exp.h"

namespace fastcl {
namespace tiling {

// Tiles are tile x tile logits; fastcl/kernels/cpp.py passes 128 (measured best on a 2-core
// Zen 4 at N = 1024..4096, D = 128: 256 was 10-20% slower at N = 1024, equal at 4096), tests pass
// small ones to cross many tile boundaries on small inputs.
constexpr int64_t kMaxTile = 4096;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Off-diagonal NT-Xent tiles need exp(s - x_r) for their rows and exp(s - x_c) for their columns
// (x a running max or an lse). When every such exponent lies within kExpRange of every other,
// one exp per element does: exp(s - x_c) = exp(s - x_r) * exp(x_r - ref) * exp(ref - x_c) with
// factors that neither overflow nor leave the normal range. Logits are cosines over tau, so
// |s| <= 1/tau, and lse <= max + log(n): the spread is at most 2/tau + log(n). Beyond that
// (tau below about 0.03 in float32) the tiles take two exps per element.
template <typename T>
constexpr double kExpRange = 80.0;  // exp(-80) = 1.8e-35 > FLT_MIN = 1.2e-38
template <>
constexpr double kExpRange<double> = 700.0;

template <typename T>
inline bool one_exp(double inv_temp, int64_t n) {
  return 2.0 * inv_temp + std::log(static_cast<double>(std::max<int64_t>(n, 1))) + 1.0 <=
         kExpRange<T>;
}

// ------------------------------------------------------------------------------ helpers ---

// The kernels' arithmetic for rows of x's dtype: float64 for float64, float32 for float32,
// bfloat16 and float16.
inline at::ScalarType arith_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows divided by their clamped norms, as F.normalize does, contiguous, in the norms' dtype.
inline at::Tensor normalized(const at::Tensor& x, const at::Tensor& norm) {
  return (x.to(norm.scalar_type()) / norm.unsqueeze(1)).contiguous();
}

inline void check_tile(int64_t tile) {
  TORCH_CHECK(tile >= 1 && tile <= kMaxTile, "fastcl_cpu: tile must be in [1, ", kMaxTile,
              "], got ", tile);
}

inline void check_rows(const at::Tensor& x, const at::Tensor& norm, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && norm.device().is_cpu(), "fastcl_cpu: ", name,
              " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "fastcl_cpu: ", name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == x.size(0), "fastcl_cpu: the norms of ", name,
              " must have shape (", x.size(0), ",)");
  TORCH_CHECK(norm.scalar_type() == at::kFloat || norm.scalar_type() == at::kDouble,
              "fastcl_cpu: norms must be float32 or float64");
}

// Two row sets that one pass pairs (rows against columns): each checked by check_rows, of
// the same width, their norms of one dtype.
inline void check_pair(const at::Tensor& a, const at::Tensor& na, const char* a_name,
                       const at::Tensor& b, const at::Tensor& nb, const char* b_name) {
  check_rows(a, na, a_name);
  check_rows(b, nb, b_name);
  TORCH_CHECK(a.size(1) == b.size(1), "fastcl_cpu: ", a_name, " and ", b_name,
              " must have the same width");
  TORCH_CHECK(na.scalar_type() == nb.scalar_type(), "fastcl_cpu: the norms of ", a_name,
              " and ", b_name, " must share a dtype");
}

inline at::Tensor row_vector(const at::Tensor& v, const at::Tensor& like_norm, int64_t n,
                      const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "fastcl_cpu: ", name, " must have shape (", n,
              ",)");
  return v.to(like_norm.scalar_type()).contiguous();
}

// A row lse (float64, or the norms' dtype) as hi + lo in the norms' dtype, hi the nearest float
// and lo the rest. Softmax weights are exp((s - hi) - lo): s - hi is exact wherever the weight
// is not negligible (s within a factor 2 of hi), so lse carries no rounding of its own into
// them. That rounding, half an ulp of |lse| ~ 1/tau, would shift every weight of a row by up
// to 5e-4 at tau = 1e-4 in float32: a one-hot row's weight 1/l would come out exp(-log l
// rounded to a multiple of 1e-3), eager's ~1e-7 error made ~1e4 times larger.
inline std::pair<at::Tensor, at::Tensor> split_lse(const at::Tensor& lse,
                                                   const at::Tensor& like_norm, int64_t n,
                                                   const char* name) {
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "fastcl_cpu: ", name, " must have shape (", n,
              ",)");
  auto hi = lse.to(like_norm.scalar_type()).contiguous();
  auto lo = (lse.to(at::kDouble) - hi.to(at::kDouble)).to(like_norm.scalar_type()).contiguous();
  return {hi, lo};
}

// Per-thread scratch: one tile of logits plus a few (kVecs) tile-length vectors.
template <typename T>
struct Scratch {
  Scratch(int64_t threads, int64_t rows, int64_t cols)
      : len(std::max(rows, cols)), tiles(threads, std::vector<T>(rows * cols)),
        vecs(threads, std::vector<T>(kVecs * len)) {}
  static constexpr int kVecs = 6;
  T* tile() { return tiles[at::get_thread_num()].data(); }
  T* vec(int k) { return vecs[at::get_thread_num()].data() + k * len; }
  int64_t len;
  std::vector<std::vector<T>> tiles, vecs;
};

// A set of rows as the tiles' products see them: xhat_i = x_i / norm_i (F.normalize's rows), or
// x_i as given (no norms: SigLIP's features).
//   widened (float32, float64, float16 rows; bf16 rows when bf16::enabled() is false): hat,
//     the rows divided by their norms, contiguous, in T (the norms' dtype);
//   low (bf16 rows and a build with bf16 products, csrc/bf16.h): the rows as given (raw), their
//     transpose (raw_t, for the right side of a logits product) and the inverse norms (inv;
//     null without norms). Products take the raw rows and scale afterwards: logits
//     alpha * inv_i inv_j (x_i . y_j), the weights of a gradient product W_ij inv_j rounded to
//     bf16 (as FlashAttention rounds P), every product summed in float32. No float32 copy of
//     the rows is made (a MoCo queue of 65536 x 128 would be 32 MiB, written on every call).
template <typename T>
struct Rows {
  int64_t n = 0, d = 0;
  bool low = false;
  bool vnni = false;  // low with AMX (bf16::amx()) and an even d: raw_t and raw_v in VNNI layout
  const T* hat = nullptr;
  const at::BFloat16* raw = nullptr;
  const at::BFloat16* raw_t = nullptr;
  const at::BFloat16* raw_v = nullptr;
  const float* inv = nullptr;
  at::TensorOptions opts;  // T's
  at::Tensor keep_hat, keep_raw, keep_t, keep_v, keep_inv;

  // x (n x d); norm (n,) in T's dtype, or undefined for rows used as given. low: take the
  // bf16 products (the caller checks low_products for both sides of a pass).
  Rows(const at::Tensor& x, const at::Tensor& norm, bool low_path)
      : n(x.size(0)), d(x.size(1)), low(low_path) {
    const auto dtype = norm.defined() ? norm.scalar_type() : arith_type(x);
    opts = x.options().dtype(low ? at::kFloat : dtype);
    if (!low) {
      keep_hat = norm.defined() ? normalized(x, norm) : x.to(dtype).contiguous();
      hat = keep_hat.data_ptr<T>();
      return;
    }
    keep_raw = x.contiguous();
    raw = keep_raw.data_ptr<at::BFloat16>();
#if FASTCL_BF16_PRODUCTS
    vnni = bf16::amx() && d % 2 == 0;
    if (vnni) {
      keep_t = bf16::vnni_transposed(keep_raw);
      keep_v = bf16::vnni_rows(keep_raw);
      raw_v = keep_v.data_ptr<at::BFloat16>();
    } else {
      keep_t = bf16::transposed(keep_raw);
    }
#endif
    raw_t = keep_t.data_ptr<at::BFloat16>();
    if (norm.defined()) {
      keep_inv = norm.to(at::kFloat).reciprocal().contiguous();
      inv = keep_inv.data_ptr<float>();
    }
  }
};

// The bound on |s_ij| = |scale| |xhat_i . xhat_j| <= |scale| max_i |xhat_i|^2 (Cauchy-Schwarz)
// of a symmetric pass's logits, for one_exp: |scale| for unit rows (NT-Xent's), but rows used as
// given (norms of ones) may be longer or shorter. 0 for no rows.
template <typename T>
double symmetric_logit_bound(const Rows<T>& z, double scale) {
  if (z.n == 0) return 0.0;
  if (!z.low) return std::abs(scale) * (z.keep_hat * z.keep_hat).sum(1).max().template item<double>();
  auto len = at::linalg_vector_norm(z.keep_raw, 2, 1, false, at::kFloat);
  if (z.inv) len = len * z.keep_inv;
  return std::abs(scale) * (len * len).max().template item<double>();
}

// Whether a pass over rows a against rows b takes the bf16 products: both bf16, float32
// arithmetic, and a build and switch that allow them (bf16.h).
inline bool low_products(const at::Tensor& a, const at::Tensor& b, at::ScalarType arith) {
  return bf16::enabled() && arith == at::kFloat && a.scalar_type() == at::kBFloat16 &&
         b.scalar_type() == at::kBFloat16;
}

// c (m x n, contiguous) = alpha * ahat_I bhat_J^T, I = a's rows i0.., J = b's rows j0...
template <typename T>
void logits_tile(const Rows<T>& a, int64_t i0, int64_t m, const Rows<T>& b, int64_t j0, int64_t n,
                 double alpha, T* c) {
  const int64_t d = a.d;
#if FASTCL_BF16_PRODUCTS
  if constexpr (std::is_same_v<T, float>) {
    if (a.low) {
      if (b.vnni) {
        bf16::gemm_vnni(m, n, d, a.raw + i0 * d, d, b.raw_t + j0 * 2, b.n, c, n, false);
      } else {
        bf16::gemm(m, n, d, a.raw + i0 * d, d, b.raw_t + j0, b.n, c, n, false);
      }
      const float* ib = b.inv ? b.inv + j0 : nullptr;
      for (int64_t r = 0; r < m; ++r) {
        const float fr = static_cast<float>(alpha * (a.inv ? a.inv[i0 + r] : 1.0f));
        float* cr = c + r * n;
        if (ib) {
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) cr[k] = (cr[k] * fr) * ib[k];
        } else {
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) cr[k] *= fr;
        }
      }
      return;
    }
  }
#endif
  auto out = at::from_blob(c, {m, n}, a.opts);
  at::addmm_out(out, out, at::from_blob(const_cast<T*>(a.hat + i0 * d), {m, d}, a.opts),
                at::from_blob(const_cast<T*>(b.hat + j0 * d), {n, d}, a.opts).t(), /*beta=*/0,
                alpha);
}

// out (m x d, contiguous rows) += W bhat_J, J = b's rows j0..j0 + n, W (m x n) the weights w
// (m x n, contiguous), or their transpose when trans (w then n x m).
template <typename T>
void accumulate_tile(T* out, const T* w, int64_t m, int64_t n, bool trans, const Rows<T>& b,
                     int64_t j0) {
  const int64_t d = b.d;
#if FASTCL_BF16_PRODUCTS
  if constexpr (std::is_same_v<T, float>) {
    if (b.low) {
      // W o inv_J as hi + lo in bf16 (16 significant bits: split_to_bf16), row-major
      // (m x kk; w transposed first in float32 when trans). Two products, summed in float32. In
      // the VNNI layout (rows paired from an even j0) kk = n rounded up to even, the pad column
      // of W zero (it meets b's next row, or the layout's zero row).
      const bool vnni = b.vnni && j0 % 2 == 0;
      const int64_t kk = vnni ? n + (n & 1) : n;
      at::BFloat16* hi = bf16::scratch(m * kk, 0);
      at::BFloat16* lo = bf16::scratch(m * kk, 1);
      const float* ib = b.inv ? b.inv + j0 : nullptr;
      const float* wr = w;  // W, row-major (m x n)
      if (trans) {
        float* wt = bf16::float_scratch(m * n);
        bf16::transpose32(w, n, m, m, wt, n);
        wr = wt;
      }
      for (int64_t r = 0; r < m; ++r)
        bf16::split_to_bf16(wr + r * n, ib, n, hi + r * kk, lo + r * kk);
      if (vnni) {
        if (kk != n) {
          for (int64_t r = 0; r < m; ++r) hi[r * kk + n] = lo[r * kk + n] = at::BFloat16(0.0f);
        }
        const at::BFloat16* bv = b.raw_v + (j0 / 2) * d * 2;
        bf16::gemm_vnni(m, d, kk, lo, kk, bv, d, out, d, true);
        bf16::gemm_vnni(m, d, kk, hi, kk, bv, d, out, d, true);
      } else {
        bf16::gemm(m, d, n, lo, n, b.raw + j0 * d, d, out, d, true);
        bf16::gemm(m, d, n, hi, n, b.raw + j0 * d, d, out, d, true);
      }
      return;
    }
  }
#endif
  auto o = at::from_blob(out, {m, d}, b.opts);
  auto wt = trans ? at::from_blob(const_cast<T*>(w), {n, m}, b.opts).t()
                  : at::from_blob(const_cast<T*>(w), {m, n}, b.opts);
  at::addmm_out(o, o, wt, at::from_blob(const_cast<T*>(b.hat + j0 * d), {n, d}, b.opts));
}

template <typename T>
T row_max(const T* s, int64_t n) {
  T mx = neg_inf<T>();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = s[c] > mx ? s[c] : mx;
  return mx;
}

// sum_c exp(s_c - shift)
template <typename T>
T row_exp_sum(const T* s, int64_t n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += exp_f(s[c] - shift);
  return sum;
}

// One term exp(x) * x of a centred sum t (x = s - shift, e = exp(x)), for the gradient of a
// softmax with respect to its scale: 0 for a masked logit (s = -inf), where e * x would be
// 0 * -inf = NaN. Branch-free (a select), so the loops that call it still vectorize; a NaN
// logit still gives NaN.
template <typename T>
FASTCL_INLINE T centred(T s, T e, T x) {
  return s == neg_inf<T>() ? T(0) : e * x;
}

// sum_c exp(s_c - shift), and t += sum_c exp(s_c - shift) * (s_c - shift)
template <typename T>
T row_exp_sum(const T* s, int64_t n, T shift, T& t) {
  T sum = 0, ts = 0;
#pragma omp simd reduction(+ : sum, ts)
  for (int64_t c = 0; c < n; ++c) {
    const T x = s[c] - shift;
    const T e = exp_f(x);
    sum += e;
    ts += centred(s[c], e, x);
  }
  t = ts;
  return sum;
}

// The shift for a running max: 0 while nothing finite has been seen (keeps exp(-inf + inf) away).
template <typename T>
T shift_of(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// Online log-sum-exp state of a set of rows: running max m and sum l of exp(s - m); and,
// optionally (t not null), the centred sum t = sum exp(s - m) * (s - m), from which the
// softmax's mean logit is m + t / l (what the gradient with respect to the scale needs:
// sum_j p_ij s_ij = m_i + t_i / l_i, with no cancellation between large logits).
template <typename T>
struct OnlineLSE {
  T* m;
  double* l;
  double* t = nullptr;
  // Row i's new running max `new_m` (its old one merged with a block's) and the block's sum
  // of exp(s - shift_of(new_m)).
  //
  // l is updated with an explicit fma: for T = double, l * rescale + f * col_sum (a column's
  // merge) offers the compiler two products to contract, and which one it picks may change with
  // the surrounding code; both merges below must give bitwise the same l.
  void merge(int64_t i, T new_m, T sum) {
    const T old = m[i];
    l[i] = std::fma(l[i], static_cast<double>(exp_f(old - shift_of(new_m))),
                    static_cast<double>(sum));
    m[i] = new_m;
  }
  // The same with the block's centred sum tsum = sum exp(s - new_m) * (s - new_m). When the
  // max moves from m_old to m_new, t <- exp(m_old - m_new) * (t + (m_old - m_new) * l_old);
  // a row that has seen nothing finite yet (m_old = -inf, l = t = 0) just takes the block's.
  void merge(int64_t i, T new_m, T sum, T tsum) {
    const T old = m[i];
    const T shift = shift_of(new_m);
    const double rescale = static_cast<double>(exp_f(old - shift));
    if (old != neg_inf<T>()) {
      t[i] = rescale * (t[i] + (static_cast<double>(old) - static_cast<double>(shift)) * l[i]);
    }
    t[i] += static_cast<double>(tsum);
    l[i] = std::fma(l[i], rescale, static_cast<double>(sum));
    m[i] = new_m;
  }
};

// The start of a tile's row + column update: row_m[r] = max(running_row_m[r], the tile row's
// max), col_m[c] = max(running_col_m[c], the tile column's max), and the columns' sums col_sum
// (and col_t, when not null) zeroed.
template <typename T>
void tile_maxima(const T* s, int64_t rows, int64_t cols, const T* running_row_m,
                 const T* running_col_m, T* row_m, T* col_m, T* col_sum, T* col_t) {
  for (int64_t c = 0; c < cols; ++c) {
    col_m[c] = running_col_m[c];
    col_sum[c] = 0;
  }
  if (col_t != nullptr) {
    for (int64_t c = 0; c < cols; ++c) col_t[c] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* sr = s + r * cols;
    row_m[r] = std::max(running_row_m[r], row_max(sr, cols));
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) col_m[c] = sr[c] > col_m[c] ? sr[c] : col_m[c];
  }
}

// A tile's terms in its rows' and its columns' online statistics, two exps a logit (NT-Xent's
// off-diagonal tiles at low temperature, CLIP's tiles): both maxima are known before the sums
// (tile_maxima), each logit's row term is taken about its row's new max and its column term
// about its column's, and merge() rescales the running sums. col_sum (and, with kScaleGrad,
// col_t: the columns' centred sums) zeroed by the caller; col_shift is scratch. The rows'
// states are row_state's entries i0.., the columns' col_state's entries j0.. (one object for
// both when the columns are the rows themselves).
template <typename T, bool kScaleGrad>
void tile_rows_cols(const T* s, int64_t rows, int64_t cols, const T* row_m, const T* col_m,
                    T* col_shift, T* col_sum, T* col_t, OnlineLSE<T>& row_state, int64_t i0,
                    OnlineLSE<T>& col_state, int64_t j0) {
  for (int64_t c = 0; c < cols; ++c) col_shift[c] = shift_of(col_m[c]);
  for (int64_t r = 0; r < rows; ++r) {
    const T* sr = s + r * cols;
    const T shift = shift_of(row_m[r]);
    T sum = 0;
    if constexpr (kScaleGrad) {
      T ts = 0;
#pragma omp simd reduction(+ : sum, ts)
      for (int64_t c = 0; c < cols; ++c) {
        const T xr = sr[c] - shift;
        const T er = exp_f(xr);
        sum += er;
        ts += centred(sr[c], er, xr);
        const T xc = sr[c] - col_shift[c];
        const T ec = exp_f(xc);
        col_sum[c] += ec;
        col_t[c] += centred(sr[c], ec, xc);
      }
      row_state.merge(i0 + r, row_m[r], sum, ts);
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) {
        sum += exp_f(sr[c] - shift);
        col_sum[c] += exp_f(sr[c] - col_shift[c]);
      }
      row_state.merge(i0 + r, row_m[r], sum);
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    if constexpr (kScaleGrad) {
      col_state.merge(j0 + c, col_m[c], col_sum[c], col_t[c]);
    } else {
      col_state.merge(j0 + c, col_m[c], col_sum[c]);
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> finish(const at::Tensor& m, const at::Tensor& l,
                                          const at::Tensor& s_pos) {
  // loss = (m - s_pos) + log l: exact when the positive is the max (no lse - s_pos cancellation).
  // lse = m + log l in float64 (l is float64 already): rounded to a float of size ~1/tau it
  // would shift every softmax weight of the backward by up to half an ulp of 1/tau (see
  // split_lse).
  auto log_l = at::log(l);
  return {(m - s_pos) + log_l.to(m.scalar_type()), m.to(at::kDouble) + log_l};
}

// d loss_i / d scale for loss_i = lse_i - s_pos_i: sum_j p_ij d_ij - d_pos_i with d = s / scale,
// computed as (t_i / l_i + (m_i - s_pos_i)) / scale (s_pos = 0 without a positive), in float64,
// returned in m's dtype.
inline at::Tensor scale_grad(const at::Tensor& m, const at::Tensor& l, const at::Tensor& t,
                             const at::Tensor& s_pos, double scale) {
  auto mean = t / l + (m.to(at::kDouble) - s_pos.to(at::kDouble));
  return mean.div_(scale).to(m.scalar_type());
}

// Block pairs of the symmetric NT-Xent schedule. Round 0 holds the diagonal tiles (I, I); the
// other rounds are the circle method's: each round pairs every block with at most one other, so
// the tiles of a round touch disjoint rows and run in parallel without synchronization.
inline std::vector<std::vector<std::pair<int64_t, int64_t>>> symmetric_rounds(int64_t blocks) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds(1);
  for (int64_t b = 0; b < blocks; ++b) rounds[0].emplace_back(b, b);
  const int64_t players = blocks + (blocks % 2);  // an odd count gets a "bye" player
  for (int64_t r = 0; r + 1 < players; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    auto add = [&](int64_t a, int64_t b) {
      if (a < blocks && b < blocks) round.emplace_back(std::min(a, b), std::max(a, b));
    };
    add(players - 1, r);
    for (int64_t k = 1; k < players / 2; ++k)
      add((r + k) % (players - 1), (r - k + players - 1) % (players - 1));
    if (!round.empty()) rounds.push_back(std::move(round));
  }
  return rounds;
}

template <typename F>
void run_rounds(const std::vector<std::vector<std::pair<int64_t, int64_t>>>& rounds, F&& tile) {
  for (const auto& round : rounds) {
    at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t b, int64_t e) {
      const bf16::TileRelease release(true);
      for (int64_t p = b; p < e; ++p) tile(round[p].first, round[p].second);
    });
  }
}

// NT-Xent's loop: every tile (I, J >= I) of the symmetric logits, in the rounds above.
// tile_fn(diagonal, i0, rows, j0, cols, s, scratch) gets s = inv_temp * zhat_I zhat_J^T
// (rows x cols, in per-thread scratch it may overwrite).
template <typename T, typename TileFn>
void for_each_symmetric_tile(const Rows<T>& z, double inv_temp, int64_t tile, TileFn&& tile_fn) {
  const int64_t n = z.n;
  const int64_t blocks = (n + tile - 1) / tile;
  Scratch<T> scratch(at::get_num_threads(), tile, tile);
  run_rounds(symmetric_rounds(blocks), [&](int64_t bi, int64_t bj) {
    const int64_t i0 = bi * tile, rows = std::min(tile, n - i0);
    const int64_t j0 = bj * tile, cols = std::min(tile, n - j0);
    T* s = scratch.tile();
    logits_tile(z, i0, rows, z, j0, cols, inv_temp, s);
    tile_fn(bi == bj, i0, rows, j0, cols, s, scratch);
  });
}

// Two-sided passes over a square (n x n) grid of tiles that feed both their rows' and their
// columns' statistics (CLIP's row + column softmax): round r holds the tiles (I, (I + r) mod B)
// of the r-th wrapped block diagonal, B = ceil(n / tile). Each round touches every row block and
// every column block exactly once, so its tiles run in parallel with no two threads writing the
// same rows or the same columns; row block I sees column blocks I, I + 1, ... and column block J
// sees row blocks J, J - 1, ... (mod B) in that order whatever the thread count. Round 0 is the
// diagonal (tiles (I, I)).
// tile_fn(i0, rows, j0, cols, s, scratch) gets s = inv_temp * (ahat_I bhat_J^T) (rows x cols, in
// per-thread scratch it may overwrite), a and b both n rows of width d: the product, then the
// scale, rounded as eager's `scale * (a @ b.T)` rounds them. (With the scale as BLAS's alpha,
// MKL rounds inside the product: for features that are not unit vectors, whose dot products
// may cancel, that was several times eager's error; tests/test_clip_kernels.py.)
template <typename T>
void scale_tile(T* s, int64_t len, double inv_temp) {
  const T a = static_cast<T>(inv_temp);
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) s[k] *= a;
}

// The rectangular form: a (na x nb) grid of tiles, a's rows in blocks of ta and b's in blocks of
// tb, Ba = ceil(na / ta) and Bb = ceil(nb / tb). Round r (r < max(Ba, Bb)) holds min(Ba, Bb)
// tiles: (k, (k + r) mod Bb) for k < Ba when Ba <= Bb, else ((k + r) mod Ba, k) for k < Bb.
// Each round still touches every block of the smaller side once and at most once every block of
// the larger, and each row block (column block) sees the column (row) blocks in an order fixed
// by the shapes. With na = nb and ta = tb this is the square schedule above, tile for tile.
// inv_temp = 1 leaves the raw products (no scaling pass).
template <typename T, typename TileFn>
void for_each_tile_by_diagonals(const Rows<T>& a, int64_t ta, const Rows<T>& b, int64_t tb,
                                double inv_temp, TileFn&& tile_fn) {
  const int64_t na = a.n, nb = b.n;
  const int64_t ba = (na + ta - 1) / ta, bb = (nb + tb - 1) / tb;
  const int64_t rounds = std::max(ba, bb), per_round = std::min(ba, bb);
  const int64_t threads = at::get_num_threads();
  Scratch<T> scratch(threads, std::min(ta, na), std::min(tb, nb));
  for (int64_t r = 0; r < rounds; ++r) {
    // A round's tiles are handed out one at a time (a shared counter) rather than in fixed
    // shares: a thread the OS preempts (a busy machine, data-loader workers) holds up the
    // round by one tile, not by its whole share. Which thread runs a tile changes nothing in
    // its result (per-thread scratch only; disjoint outputs).
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, per_round), 1, [&](int64_t, int64_t) {
      const bf16::TileRelease release(a.low);
      for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < per_round;) {
        const int64_t bi = ba <= bb ? k : (k + r) % ba;
        const int64_t bj = ba <= bb ? (k + r) % bb : k;
        const int64_t i0 = bi * ta, rows = std::min(ta, na - i0);
        const int64_t j0 = bj * tb, cols = std::min(tb, nb - j0);
        T* s = scratch.tile();
        if (a.low) {
          logits_tile(a, i0, rows, b, j0, cols, inv_temp, s);  // scaled after the product
        } else {
          logits_tile(a, i0, rows, b, j0, cols, 1.0, s);
          if (inv_temp != 1.0) scale_tile(s, rows * cols, inv_temp);
        }
        tile_fn(i0, rows, j0, cols, s, scratch);
      }
    });
  }
}

template <typename T, typename TileFn>
void for_each_tile_by_diagonals(const Rows<T>& a, const Rows<T>& b, double inv_temp,
                                int64_t tile, TileFn&& tile_fn) {
  for_each_tile_by_diagonals(a, tile, b, tile, inv_temp, std::forward<TileFn>(tile_fn));
}

// The general kernels' blocks: row blocks of at most `tile` rows, small enough that a MoCo batch
// (few rows, many negatives) still gives several blocks to share out over the cores, derived
// from the shape alone so that results do not depend on the thread count; column tiles of
// 4 x tile, so that each product is large enough to run BLAS near its peak (N = 256, M = 16384:
// 128-wide tiles spent more time in per-call overhead than in arithmetic).
inline int64_t row_block(int64_t rows, int64_t tile) {
  const int64_t target = (rows + 3) / 4;
  return std::min<int64_t>(tile, std::max<int64_t>(16, (target + 15) / 16 * 16));
}

constexpr int64_t kColumnTiles = 4;

// The general kernels' loop: row blocks of a in parallel, each walking all column tiles of b in
// order. tile_fn(i0, rows, j0, cols, s) gets the logits s = inv_temp * ahat_I bhat_J^T (rows x
// cols, in per-thread scratch it may overwrite); block_end(i0, rows) runs after a block's last
// tile. Each row block is owned by one thread: its outputs need no synchronization.
template <typename T, typename TileFn, typename EndFn>
void for_each_row_block(const Rows<T>& a, const Rows<T>& b, double inv_temp, int64_t tile,
                        TileFn&& tile_fn, EndFn&& block_end) {
  const int64_t nr = a.n, nc = b.n;
  const int64_t rb = row_block(nr, tile), blocks = (nr + rb - 1) / rb;
  const int64_t cw = kColumnTiles * tile;
  Scratch<T> scratch(at::get_num_threads(), rb, cw);
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    const bf16::TileRelease release(a.low);
    T* s = scratch.tile();
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t i0 = blk * rb, rows = std::min(rb, nr - i0);
      for (int64_t j0 = 0; j0 < nc; j0 += cw) {
        const int64_t cols = std::min(cw, nc - j0);
        logits_tile(a, i0, rows, b, j0, cols, inv_temp, s);
        tile_fn(i0, rows, j0, cols, s);
      }
      block_end(i0, rows);
    }
  });
}

// The columns' side of a gradient pass whose statistics belong to b's rows (grad_accumulate's
// dk / dneg, labels_grad's columns' gradient): out_a (op, nr x d) += W^T bhat with each logit
// the very float that the forward over (b, a) exponentiated, and a BLAS product's rounding may
// depend on its shape and on which operand comes first (thin edge tiles go through other
// kernels). So the tiles are that forward's own products (for_each_row_block's over b against
// a: b's row blocks against a's column tiles), transposed when accumulated. Threads share out
// a's column tiles: each owns its rows of out. Several row blocks (up to kGroupRows rows) are
// stacked before each accumulation, so that its inner dimension is not just one (possibly
// 16-row) block. weigh(w, g0, g_rows, j0, cols) turns the stacked logits (g_rows x cols,
// row-major: b's rows g0.. against a's rows j0..) into the weights W in place.
template <typename T, typename WeighFn>
void for_each_column_stack(const Rows<T>& a, const Rows<T>& b, double inv_temp, int64_t tile,
                           T* op, WeighFn&& weigh) {
  const int64_t nr = a.n, nc = b.n, d = a.d;
  constexpr int64_t kGroupRows = 256;
  const int64_t rb = row_block(nc, tile), cw = kColumnTiles * tile;
  const int64_t group = std::max<int64_t>(1, kGroupRows / rb) * rb;
  const int64_t chunks = (nr + cw - 1) / cw;
  Scratch<T> scratch(at::get_num_threads(), group, cw);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const bf16::TileRelease release(a.low);
    T* w = scratch.tile();
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t j0 = ch * cw, cols = std::min(cw, nr - j0);
      for (int64_t g0 = 0; g0 < nc; g0 += group) {
        const int64_t g_rows = std::min(group, nc - g0);
        for (int64_t i0 = g0; i0 < g0 + g_rows; i0 += rb) {
          const int64_t rows = std::min(rb, nc - i0);
          // Row-major rows x cols at row i0 - g0 of the stack: the forward's own call and layout.
          logits_tile(b, i0, rows, a, j0, cols, inv_temp, w + (i0 - g0) * cols);
        }
        weigh(w, g0, g_rows, j0, cols);
        accumulate_tile(op + j0 * d, w, cols, g_rows, true, b, g0);
      }
    }
  });
}

// ------------------------------------------------------- symmetric tiles' common work ---

// The symmetric pass's statistics for one tile (I, J >= I) of logits s (for_each_symmetric_tile):
// on the diagonal (I == J) the self-pairs are masked (-inf) here and the tile feeds its rows;
// off it, both its rows' and its columns' (rows j0..) online statistics in st. fast
// (one_exp): one exp a logit, the columns' sums rescaled by exp(m_r - ref) exp(ref - m_c); else
// two (tile_rows_cols). Logits already -inf (masked by the caller) add nothing. s is read only
// (but for the self-pairs). NT-Xent's forward (contrastive.cpp) and SupCon's (labels.cpp).
template <typename T, bool kScaleGrad>
void symmetric_lse_tile(bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s,
                        Scratch<T>& scratch, OnlineLSE<T>& st, bool fast) {
  if (diagonal) {
    for (int64_t r = 0; r < rows; ++r) s[r * cols + r] = neg_inf<T>();  // no self-pairs
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * cols;
      const T new_m = std::max(st.m[i0 + r], row_max(sr, cols));
      if constexpr (kScaleGrad) {
        T ts;
        const T sum = row_exp_sum(sr, cols, shift_of(new_m), ts);
        st.merge(i0 + r, new_m, sum, ts);
      } else {
        st.merge(i0 + r, new_m, row_exp_sum(sr, cols, shift_of(new_m)));
      }
    }
    return;
  }
  T* row_m = scratch.vec(0);
  T* col_m = scratch.vec(1);
  T* col_sum = scratch.vec(2);
  T* row_a = scratch.vec(3);
  T* col_t = scratch.vec(4);  // the columns' centred sums (kScaleGrad only)
  tile_maxima(s, rows, cols, st.m + i0, st.m + j0, row_m, col_m, col_sum,
              kScaleGrad ? col_t : nullptr);
  // Both maxima are known before the sums: the rows' and the columns' centred terms are taken
  // about them directly (s - row_m, s - col_m), and merge() rescales the running sums.
  if (fast) {
    // col_sum_c = exp(ref - m_c) * sum_r exp(m_r - ref) * exp(s_rc - m_r): one exp a logit.
    T ref = neg_inf<T>();
    for (int64_t r = 0; r < rows; ++r) ref = std::max(ref, row_m[r]);
    ref = shift_of(ref);
    for (int64_t r = 0; r < rows; ++r) row_a[r] = exp_f(row_m[r] - ref);
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * cols;
      const T shift = shift_of(row_m[r]), a = row_a[r];
      T sum = 0;
      if constexpr (kScaleGrad) {
        T ts = 0;
#pragma omp simd reduction(+ : sum, ts)
        for (int64_t c = 0; c < cols; ++c) {
          const T x = sr[c] - shift;
          const T e = exp_f(x);
          sum += e;
          ts += centred(sr[c], e, x);
          // a * e exactly as the plain loop forms it (one use: a contracted multiply-add
          // there), so that loss and lse stay bitwise those of with_dscale=False.
          col_sum[c] += a * e;
          col_t[c] += a * centred(sr[c], e, sr[c] - col_m[c]);
        }
        st.merge(i0 + r, row_m[r], sum, ts);
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cols; ++c) {
          const T e = exp_f(sr[c] - shift);
          sum += e;
          col_sum[c] += a * e;
        }
        st.merge(i0 + r, row_m[r], sum);
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      // A column with nothing finite yet (DCL: its one logit here was its masked positive)
      // adds nothing; exp(ref - 0) could overflow and make 0 * inf.
      const T f = col_m[c] == neg_inf<T>() ? T(0) : exp_f(ref - col_m[c]);
      if constexpr (kScaleGrad) {
        st.merge(j0 + c, col_m[c], f * col_sum[c], f * col_t[c]);
      } else {
        st.merge(j0 + c, col_m[c], f * col_sum[c]);
      }
    }
    return;
  }
  // row_a as the columns' shifts
  tile_rows_cols<T, kScaleGrad>(s, rows, cols, row_m, col_m, row_a, col_sum, col_t, st, i0, st,
                                j0);
}

// The symmetric backward's softmax weights for one tile (I, J >= I), in place of its logits w:
// W_rc = g_r P_rc + g_c P_cr with P_ij = exp((s_ij - hi_i) - lo_i) (lse = hi + lo, split_lse).
// On the diagonal, E_rc = g_r P_rc from row r's own floats (self-pairs masked first: E_rr = 0
// wherever the row's lse is finite), then W = E + E^T; off it, S is symmetric, so both come from
// this tile: fast (one_exp) with one exp a logit, P_cr = P_rc exp(lse_r - ref) exp(ref - lse_c),
// the products staying below 1 before g multiplies them (g may be large: loss scaling).
// kLabels (SupCon's label positives): also - (gp_r + gp_c) [lab_r == lab_c] in the same loops
// (on the diagonal E_rc - gp_r [lab_r == lab_c] before W = E + E^T; E_rr = -gp_r then: the
// caller zeroes the self-pairs). NT-Xent's backward (contrastive.cpp, kLabels false: lab and gp
// unused) and SupCon's (labels.cpp).
template <typename T, bool kLabels = false>
void symmetric_weights_tile(bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                            T* w, Scratch<T>& scratch, const T* lse, const T* lo, const T* g,
                            bool fast, const int32_t* lab = nullptr, const T* gp = nullptr) {
  const int32_t* lc = kLabels ? lab + j0 : nullptr;
  const T* gpc = kLabels ? gp + j0 : nullptr;
  if (diagonal) {
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = w + r * cols;
      wr[r] = neg_inf<T>();  // self-similarity: excluded, and exp must not overflow
      const T shift = lse[i0 + r], lo_r = lo[i0 + r], gr = g[i0 + r];
      if constexpr (kLabels) {
        const int32_t lr = lab[i0 + r];
        const T pr = gp[i0 + r];
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
          wr[c] = gr * exp_f((wr[c] - shift) - lo_r) - (lc[c] == lr ? pr : T(0));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) wr[c] = gr * exp_f((wr[c] - shift) - lo_r);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = r + 1; c < cols; ++c) {
        const T t = w[r * cols + c] + w[c * cols + r];
        w[r * cols + c] = t;
        w[c * cols + r] = t;
      }
    return;
  }
  const T* lj = lse + j0;
  const T* loj = lo + j0;
  const T* gj = g + j0;
  if (fast) {
    T* row_a = scratch.vec(0);
    T* col_b = scratch.vec(1);
    T ref = neg_inf<T>();
    for (int64_t r = 0; r < rows; ++r) ref = std::max(ref, lse[i0 + r]);
    for (int64_t c = 0; c < cols; ++c) ref = std::max(ref, lj[c]);
    for (int64_t r = 0; r < rows; ++r) row_a[r] = exp_f((lse[i0 + r] - ref) + lo[i0 + r]);
    for (int64_t c = 0; c < cols; ++c) col_b[c] = exp_f((ref - lj[c]) - loj[c]);
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = w + r * cols;
      const T shift = lse[i0 + r], lo_r = lo[i0 + r], gr = g[i0 + r], a = row_a[r];
      if constexpr (kLabels) {
        const int32_t lr = lab[i0 + r];
        const T pr = gp[i0 + r];
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const T e = exp_f((wr[c] - shift) - lo_r);
          wr[c] = (gr * e + ((e * a) * col_b[c]) * gj[c]) - (lc[c] == lr ? pr + gpc[c] : T(0));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const T e = exp_f((wr[c] - shift) - lo_r);
          wr[c] = gr * e + ((e * a) * col_b[c]) * gj[c];
        }
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* wr = w + r * cols;
    const T shift = lse[i0 + r], lo_r = lo[i0 + r], gr = g[i0 + r];
    if constexpr (kLabels) {
      const int32_t lr = lab[i0 + r];
      const T pr = gp[i0 + r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const T s = wr[c];
        wr[c] = (gr * exp_f((s - shift) - lo_r) + gj[c] * exp_f((s - lj[c]) - loj[c])) -
                (lc[c] == lr ? pr + gpc[c] : T(0));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const T s = wr[c];
        wr[c] = gr * exp_f((s - shift) - lo_r) + gj[c] * exp_f((s - lj[c]) - loj[c]);
      }
    }
  }
}

// ----------------------------------------------------------------- dtype dispatch ---------

// f(T{}) with T the kernels' arithmetic type: the norms' dtype.
template <typename F>
auto dispatch(const at::Tensor& norm, F&& f) {
  if (norm.scalar_type() == at::kDouble) return f(double{});
  return f(float{});
}

}  // namespace tiling
}  // namespace fastcl
