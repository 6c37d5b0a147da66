// Fused, tiled similarity + log-softmax kernels for the CPU: NT-Xent and InfoNCE, forward and
// backward. The contract is the one in fastcl/kernels/__init__.py; the registration is in
// registration.cpp.
//
// Every kernel walks (tile x tile) blocks of the similarity matrix. A tile's logits come from one
// BLAS product (ATen's matmul, single-threaded inside the parallel region) into a per-thread
// scratch buffer that stays in the core's L2 cache; the max / exp / sum work on it runs in
// vectorized loops (fast_exp.h); at::parallel_for spreads tiles over the cores. Nothing of size
// N x N is ever allocated. Arithmetic is in float32 for float32/bfloat16/float16 inputs (the
// Python side passes float32 norms), float64 for float64.
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
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "fast_exp.h"

namespace fastcl {
namespace {

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
bool one_exp(double inv_temp, int64_t n) {
  return 2.0 * inv_temp + std::log(static_cast<double>(std::max<int64_t>(n, 1))) + 1.0 <=
         kExpRange<T>;
}

// ------------------------------------------------------------------------------ helpers ---

// Rows divided by their clamped norms, as F.normalize does, contiguous, in the norms' dtype.
at::Tensor normalized(const at::Tensor& x, const at::Tensor& norm) {
  return (x.to(norm.scalar_type()) / norm.unsqueeze(1)).contiguous();
}

void check_tile(int64_t tile) {
  TORCH_CHECK(tile >= 1 && tile <= kMaxTile, "fastcl_cpu: tile must be in [1, ", kMaxTile,
              "], got ", tile);
}

void check_rows(const at::Tensor& x, const at::Tensor& norm, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && norm.device().is_cpu(), "fastcl_cpu: ", name,
              " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "fastcl_cpu: ", name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == x.size(0), "fastcl_cpu: the norms of ", name,
              " must have shape (", x.size(0), ",)");
  TORCH_CHECK(norm.scalar_type() == at::kFloat || norm.scalar_type() == at::kDouble,
              "fastcl_cpu: norms must be float32 or float64");
}

at::Tensor row_vector(const at::Tensor& v, const at::Tensor& like_norm, int64_t n,
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
std::pair<at::Tensor, at::Tensor> split_lse(const at::Tensor& lse, const at::Tensor& like_norm,
                                            int64_t n, const char* name) {
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "fastcl_cpu: ", name, " must have shape (", n,
              ",)");
  auto hi = lse.to(like_norm.scalar_type()).contiguous();
  auto lo = (lse.to(at::kDouble) - hi.to(at::kDouble)).to(like_norm.scalar_type()).contiguous();
  return {hi, lo};
}

// Per-thread scratch: one tile of logits plus a few tile-length vectors.
template <typename T>
struct Scratch {
  Scratch(int64_t threads, int64_t rows, int64_t cols)
      : len(std::max(rows, cols)), tiles(threads, std::vector<T>(rows * cols)),
        vecs(threads, std::vector<T>(kVecs * len)) {}
  static constexpr int kVecs = 4;
  T* tile() { return tiles[at::get_thread_num()].data(); }
  T* vec(int k) { return vecs[at::get_thread_num()].data() + k * len; }
  int64_t len;
  std::vector<std::vector<T>> tiles, vecs;
};

// A (rows x len) view of contiguous rows of x starting at `start`, without a copy.
template <typename T>
at::Tensor rows_view(const T* base, int64_t start, int64_t rows, int64_t len,
                     const at::TensorOptions& opts) {
  return at::from_blob(const_cast<T*>(base) + start * len, {rows, len}, opts);
}

// c (m x n, contiguous) = alpha * a @ b^T, a (m x d) and b (n x d) row-major.
template <typename T>
void logits_tile(const T* a, int64_t m, const T* b, int64_t n, int64_t d, double alpha, T* c,
                 const at::TensorOptions& opts) {
  auto out = at::from_blob(c, {m, n}, opts);
  at::addmm_out(out, out, at::from_blob(const_cast<T*>(a), {m, d}, opts),
                at::from_blob(const_cast<T*>(b), {n, d}, opts).t(), /*beta=*/0, alpha);
}

// out (m x d, contiguous rows) += w (m x n, contiguous; transposed when trans) @ b (n x d).
template <typename T>
void accumulate_tile(T* out, const T* w, int64_t m, int64_t n, bool trans, const T* b, int64_t d,
                     const at::TensorOptions& opts) {
  auto o = at::from_blob(out, {m, d}, opts);
  auto wt = trans ? at::from_blob(const_cast<T*>(w), {n, m}, opts).t()
                  : at::from_blob(const_cast<T*>(w), {m, n}, opts);
  at::addmm_out(o, o, wt, at::from_blob(const_cast<T*>(b), {n, d}, opts));
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

// The shift for a running max: 0 while nothing finite has been seen (keeps exp(-inf + inf) away).
template <typename T>
T shift_of(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// Online log-sum-exp state of a set of rows: running max m and sum l of exp(s - m).
template <typename T>
struct OnlineLSE {
  T* m;
  double* l;
  // Row i's new running max `new_m` (its old one merged with a block's) and the block's sum
  // of exp(s - shift_of(new_m)).
  void merge(int64_t i, T new_m, T sum) {
    const T old = m[i];
    l[i] = l[i] * static_cast<double>(exp_f(old - shift_of(new_m))) + static_cast<double>(sum);
    m[i] = new_m;
  }
};

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

// Block pairs of the symmetric NT-Xent schedule. Round 0 holds the diagonal tiles (I, I); the
// other rounds are the circle method's: each round pairs every block with at most one other, so
// the tiles of a round touch disjoint rows and run in parallel without synchronization.
std::vector<std::vector<std::pair<int64_t, int64_t>>> symmetric_rounds(int64_t blocks) {
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
      for (int64_t p = b; p < e; ++p) tile(round[p].first, round[p].second);
    });
  }
}

// NT-Xent's loop: every tile (I, J >= I) of the symmetric logits, in the rounds above.
// tile_fn(diagonal, i0, rows, j0, cols, s, scratch) gets s = inv_temp * zhat_I zhat_J^T
// (rows x cols, in per-thread scratch it may overwrite).
template <typename T, typename TileFn>
void for_each_symmetric_tile(const T* zp, int64_t n, int64_t d, double inv_temp, int64_t tile,
                             const at::TensorOptions& opts, TileFn&& tile_fn) {
  const int64_t blocks = (n + tile - 1) / tile;
  Scratch<T> scratch(at::get_num_threads(), tile, tile);
  run_rounds(symmetric_rounds(blocks), [&](int64_t bi, int64_t bj) {
    const int64_t i0 = bi * tile, rows = std::min(tile, n - i0);
    const int64_t j0 = bj * tile, cols = std::min(tile, n - j0);
    T* s = scratch.tile();
    logits_tile(zp + i0 * d, rows, zp + j0 * d, cols, d, inv_temp, s, opts);
    tile_fn(bi == bj, i0, rows, j0, cols, s, scratch);
  });
}

// The general kernels' blocks: row blocks of at most `tile` rows, small enough that a MoCo batch
// (few rows, many negatives) still gives several blocks to share out over the cores, derived
// from the shape alone so that results do not depend on the thread count; column tiles of
// 4 x tile, so that each product is large enough to run BLAS near its peak (N = 256, M = 16384:
// 128-wide tiles spent more time in per-call overhead than in arithmetic).
int64_t row_block(int64_t rows, int64_t tile) {
  const int64_t target = (rows + 3) / 4;
  return std::min<int64_t>(tile, std::max<int64_t>(16, (target + 15) / 16 * 16));
}

constexpr int64_t kColumnTiles = 4;

// The general kernels' loop: row blocks of a in parallel, each walking all column tiles of b in
// order. tile_fn(i0, rows, j0, cols, s) gets the logits s = inv_temp * ahat_I bhat_J^T (rows x
// cols, in per-thread scratch it may overwrite); block_end(i0, rows) runs after a block's last
// tile. Each row block is owned by one thread: its outputs need no synchronization.
template <typename T, typename TileFn, typename EndFn>
void for_each_row_block(const T* ap, int64_t nr, const T* bp, int64_t nc, int64_t d,
                        double inv_temp, int64_t tile, const at::TensorOptions& opts,
                        TileFn&& tile_fn, EndFn&& block_end) {
  const int64_t rb = row_block(nr, tile), blocks = (nr + rb - 1) / rb;
  const int64_t cw = kColumnTiles * tile;
  Scratch<T> scratch(at::get_num_threads(), rb, cw);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    T* s = scratch.tile();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * rb, rows = std::min(rb, nr - i0);
      for (int64_t j0 = 0; j0 < nc; j0 += cw) {
        const int64_t cols = std::min(cw, nc - j0);
        logits_tile(ap + i0 * d, rows, bp + j0 * d, cols, d, inv_temp, s, opts);
        tile_fn(i0, rows, j0, cols, s);
      }
      block_end(i0, rows);
    }
  });
}

// ------------------------------------------------------------------------ NT-Xent ---------

template <typename T>
std::tuple<at::Tensor, at::Tensor> nt_xent_forward_impl(const at::Tensor& z, const at::Tensor& nz,
                                                        double inv_temp, int64_t tile) {
  const auto zh = normalized(z, nz);
  const int64_t n = zh.size(0), d = zh.size(1), half = n / 2;
  const auto opts = zh.options();
  at::Tensor m = at::full({n}, neg_inf<T>(), opts);
  auto l = at::zeros({n}, opts.dtype(at::kDouble));
  auto s_pos = at::empty({n}, opts);
  const T* zp = zh.data_ptr<T>();
  OnlineLSE<T> st{m.data_ptr<T>(), l.data_ptr<double>()};
  T* sp = s_pos.data_ptr<T>();
  const bool fast = one_exp<T>(inv_temp, n);

  auto tile_fn = [&](bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s,
                     Scratch<T>& scratch) {
    // Positives: row i's is column (i + N) mod 2N, taken from the very float its max sees.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = (i0 + r + half) % n - j0;
      if (c >= 0 && c < cols) sp[i0 + r] = s[r * cols + c];
    }
    if (diagonal) {
      for (int64_t r = 0; r < rows; ++r) s[r * cols + r] = neg_inf<T>();  // no self-pairs
      for (int64_t r = 0; r < rows; ++r) {
        const T* sr = s + r * cols;
        const T new_m = std::max(st.m[i0 + r], row_max(sr, cols));
        st.merge(i0 + r, new_m, row_exp_sum(sr, cols, shift_of(new_m)));
      }
      return;
    }
    // Off the diagonal the tile also holds its columns' logits: rows j0.. as columns.
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t r = (j0 + c + half) % n - i0;
      if (r >= 0 && r < rows) sp[j0 + c] = s[r * cols + c];
    }
    T* row_m = scratch.vec(0);
    T* col_m = scratch.vec(1);
    T* col_sum = scratch.vec(2);
    T* row_a = scratch.vec(3);
    for (int64_t c = 0; c < cols; ++c) {
      col_m[c] = st.m[j0 + c];
      col_sum[c] = 0;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * cols;
      row_m[r] = std::max(st.m[i0 + r], row_max(sr, cols));
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) col_m[c] = sr[c] > col_m[c] ? sr[c] : col_m[c];
    }
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
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cols; ++c) {
          const T e = exp_f(sr[c] - shift);
          sum += e;
          col_sum[c] += a * e;
        }
        st.merge(i0 + r, row_m[r], sum);
      }
      for (int64_t c = 0; c < cols; ++c)
        st.merge(j0 + c, col_m[c], exp_f(ref - shift_of(col_m[c])) * col_sum[c]);
      return;
    }
    for (int64_t c = 0; c < cols; ++c) row_a[c] = shift_of(col_m[c]);  // the columns' shifts
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * cols;
      const T shift = shift_of(row_m[r]);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) {
        sum += exp_f(sr[c] - shift);
        col_sum[c] += exp_f(sr[c] - row_a[c]);
      }
      st.merge(i0 + r, row_m[r], sum);
    }
    for (int64_t c = 0; c < cols; ++c) st.merge(j0 + c, col_m[c], col_sum[c]);
  };
  for_each_symmetric_tile(zp, n, d, inv_temp, tile, opts, tile_fn);
  return finish<T>(m, l, s_pos);
}

template <typename T>
at::Tensor nt_xent_grad_impl(const at::Tensor& z, const at::Tensor& nz, const at::Tensor& lse_in,
                             const at::Tensor& g_in, double inv_temp, int64_t tile) {
  const auto zh = normalized(z, nz);
  const int64_t n = zh.size(0), d = zh.size(1), half = n / 2;
  const auto opts = zh.options();
  const auto [lse_t, lo_t] = split_lse(lse_in, nz, n, "lse");
  const auto g_t = row_vector(g_in, nz, n, "g");
  const T* lse = lse_t.data_ptr<T>();
  const T* lo = lo_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  auto out = at::zeros({n, d}, opts);
  const T* zp = zh.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool fast = one_exp<T>(inv_temp, n);

  auto tile_fn = [&](bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* w,
                     Scratch<T>& scratch) {
    if (diagonal) {
      // E_rc = g_r exp(s_rc - lse_r) from row r's own floats, then W = E + E^T.
      for (int64_t r = 0; r < rows; ++r) {
        T* wr = w + r * cols;
        wr[r] = neg_inf<T>();  // self-similarity: excluded, and exp must not overflow
        const T shift = lse[i0 + r], lo_r = lo[i0 + r], gr = g[i0 + r];
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) wr[c] = gr * exp_f((wr[c] - shift) - lo_r);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = r + 1; c < cols; ++c) {
          const T t = w[r * cols + c] + w[c * cols + r];
          w[r * cols + c] = t;
          w[c * cols + r] = t;
        }
    } else {
      // W_rc = g_i P_ij + g_j P_ji: S is symmetric, so both come from this tile.
      const T* lj = lse + j0;
      const T* loj = lo + j0;
      const T* gj = g + j0;
      if (fast) {
        // P_ji = P_ij * exp(lse_i - ref) * exp(ref - lse_j): one exp a logit, and the products
        // stay below 1 before g multiplies them (g may be large: loss scaling).
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
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) {
            const T e = exp_f((wr[c] - shift) - lo_r);
            wr[c] = gr * e + ((e * a) * col_b[c]) * gj[c];
          }
        }
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          T* wr = w + r * cols;
          const T shift = lse[i0 + r], lo_r = lo[i0 + r], gr = g[i0 + r];
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) {
            const T s = wr[c];
            wr[c] = gr * exp_f((s - shift) - lo_r) + gj[c] * exp_f((s - lj[c]) - loj[c]);
          }
        }
      }
    }
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
    accumulate_tile(op + i0 * d, w, rows, cols, false, zp + j0 * d, d, opts);
    if (!diagonal) accumulate_tile(op + j0 * d, w, cols, rows, true, zp + i0 * d, d, opts);
  };
  for_each_symmetric_tile(zp, n, d, inv_temp, tile, opts, tile_fn);
  return out.mul_(inv_temp);
}

// ------------------------------------------------------------------------ general ---------

// With with_grad, also the rows' gradient direction v_i = inv_temp * sum_j P_ij khat_j over the
// non-positive columns, accumulated online as FlashAttention accumulates its output (rescaled
// whenever a row's max moves). d loss_i / d qhat_i = g_i v_i + (positive term): the backward
// needs no pass over the (N x M) logits for dq, which saves one of three matrix products.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const c10::optional<at::Tensor>& k_pos, const c10::optional<at::Tensor>& n_pos,
    double inv_temp, c10::optional<int64_t> pos_offset, bool with_grad, int64_t tile) {
  const auto qh = normalized(q, nq);
  const auto kh = normalized(k, nk);
  const int64_t nr = qh.size(0), nc = kh.size(0), d = qh.size(1);
  const auto opts = qh.options();
  at::Tensor m = at::full({nr}, neg_inf<T>(), opts);
  auto l = at::zeros({nr}, opts.dtype(at::kDouble));
  at::Tensor v = with_grad ? at::zeros({nr, d}, opts) : at::empty({0}, opts);
  at::Tensor s_pos;
  if (k_pos.has_value()) {
    // The extra positive logit q_i . kpos_i, scaled exactly as the columns are.
    const auto ph = normalized(*k_pos, *n_pos);
    s_pos = (qh * ph).sum(1).mul_(inv_temp).contiguous();
    m.copy_(s_pos);
    l.fill_(1.0);
  } else {
    s_pos = at::zeros({nr}, opts);  // stays 0 without a positive: loss = lse
  }
  const T* qp = qh.data_ptr<T>();
  const T* kp = kh.data_ptr<T>();
  OnlineLSE<T> st{m.data_ptr<T>(), l.data_ptr<double>()};
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
        }
      }
      const T old_m = st.m[i0 + r];
      const T new_m = std::max(old_m, row_max(sr, cols));
      const T shift = shift_of(new_m);
      if (!with_grad) {
        st.merge(i0 + r, new_m, row_exp_sum(sr, cols, shift));
        continue;
      }
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) {
        const T e = exp_f(sr[c] - shift);
        sr[c] = e;
        sum += e;
      }
      if (pos >= 0) sr[pos] = 0;  // the positive's weight is added by the caller
      const T rescale = exp_f(old_m - shift);
      T* vr = vp + (i0 + r) * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) vr[c] *= rescale;
      st.merge(i0 + r, new_m, sum);
    }
    if (with_grad) accumulate_tile(vp + i0 * d, s, rows, cols, false, kp + j0 * d, d, opts);
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
  for_each_row_block(qp, nr, kp, nc, d, inv_temp, tile, opts, tile_fn, block_end);
  auto [loss, lse] = finish<T>(m, l, s_pos);
  return {loss, lse, v};
}

template <typename T>
at::Tensor grad_accumulate_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                                const at::Tensor& nb, const c10::optional<at::Tensor>& lse_a,
                                const c10::optional<at::Tensor>& g_a,
                                const c10::optional<at::Tensor>& lse_b,
                                const c10::optional<at::Tensor>& g_b, double inv_temp,
                                c10::optional<int64_t> pos_offset, int64_t tile) {
  const auto ah = normalized(a, na);
  const auto bh = normalized(b, nb);
  const int64_t nr = ah.size(0), nc = bh.size(0), d = ah.size(1);
  const auto opts = ah.options();
  const bool by_row = lse_a.has_value();
  const auto [lse_t, lo_t] =
      by_row ? split_lse(*lse_a, na, nr, "lse_a") : split_lse(*lse_b, na, nc, "lse_b");
  const auto g_t = by_row ? row_vector(*g_a, na, nr, "g_a") : row_vector(*g_b, na, nc, "g_b");
  const T* lse = lse_t.data_ptr<T>();
  const T* lo = lo_t.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  auto out = at::zeros({nr, d}, opts);
  const T* ap = ah.data_ptr<T>();
  const T* bp = bh.data_ptr<T>();
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
      accumulate_tile(op + i0 * d, w, rows, cols, false, bp + j0 * d, d, opts);
    };
    for_each_row_block(ap, nr, bp, nc, d, inv_temp, tile, opts, tile_fn,
                       [](int64_t, int64_t) {});
    return out.mul_(inv_temp);
  }

  // The lse belongs to b's rows (dk, dneg): the logits must be the very floats that
  // lse_forward(b, a) exponentiated, and a BLAS product's rounding may depend on its shape and
  // on which operand comes first (thin edge tiles go through other kernels). So the tiles here
  // are that forward's own products, b's row blocks against a's column tiles, transposed when
  // accumulated. Threads share out a's column tiles: each owns its rows of out. Several row
  // blocks (up to kGroupRows rows) are stacked before each accumulation, so that its inner
  // dimension is not just one (possibly 16-row) block.
  constexpr int64_t kGroupRows = 256;
  const int64_t rb = row_block(nc, tile), cw = kColumnTiles * tile;
  const int64_t group = std::max<int64_t>(1, kGroupRows / rb) * rb;
  const int64_t chunks = (nr + cw - 1) / cw;
  Scratch<T> scratch(at::get_num_threads(), group, cw);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    T* w = scratch.tile();
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t j0 = ch * cw, cols = std::min(cw, nr - j0);
      for (int64_t g0 = 0; g0 < nc; g0 += group) {
        const int64_t g_rows = std::min(group, nc - g0);
        for (int64_t i0 = g0; i0 < g0 + g_rows; i0 += rb) {
          const int64_t rows = std::min(rb, nc - i0);
          // Row-major rows x cols at row i0 - g0 of the stack: the forward's own call and layout.
          logits_tile(bp + i0 * d, rows, ap + j0 * d, cols, d, inv_temp, w + (i0 - g0) * cols,
                      opts);
        }
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
        accumulate_tile(op + j0 * d, w, cols, g_rows, true, bp + g0 * d, d, opts);
      }
    }
  });
  return out.mul_(inv_temp);
}

// ----------------------------------------------------------------- dtype dispatch ---------

template <typename F>
auto dispatch(const at::Tensor& norm, F&& f) {
  if (norm.scalar_type() == at::kDouble) return f(double{});
  return f(float{});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nt_xent_forward(const at::Tensor& z, const at::Tensor& nz,
                                                   double inv_temp, int64_t tile) {
  check_tile(tile);
  check_rows(z, nz, "z");
  TORCH_CHECK(z.size(0) % 2 == 0, "fastcl_cpu: z must hold 2N rows");
  return dispatch(nz, [&](auto t) {
    return nt_xent_forward_impl<decltype(t)>(z, nz, inv_temp, tile);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const c10::optional<at::Tensor>& k_pos, const c10::optional<at::Tensor>& n_pos,
    double inv_temp, c10::optional<int64_t> pos_offset, bool with_grad, int64_t tile) {
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
  return dispatch(nq, [&](auto t) {
    return lse_forward_impl<decltype(t)>(q, k, nq, nk, k_pos, n_pos, inv_temp, pos_offset,
                                         with_grad, tile);
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
