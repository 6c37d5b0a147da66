// SigLIP's sigmoid loss on the CPU: every pair (i, j) of images x (n, D) and texts y (m, D) is
// an independent binary term, z_ij = scale * (x_i . y_j) + bias, label t_ij = +1 for the positive
// j = i + pos_offset (when 0 <= j < m; no positive with pos_offset = None), -1 otherwise:
//
//   l_ij = softplus(-t_ij z_ij),  w_ij = d l_ij / d z_ij = -t_ij sigmoid(-t_ij z_ij)
//   forward   loss_i = sum_j l_ij, dscale_i = sum_j w_ij (x_i . y_j), dbias_i = sum_j w_ij;
//             with grads: dx = scale W y, dy = scale W^T x (the gradients of sum_i loss_i)
//   grad      dx = scale (g o W) y, dy = scale (g o W)^T x  (g per row; the logits recomputed)
//
// The contract is fastcl/kernels/cpp.py's sigmoid_forward / sigmoid_grad (the same as the
// chunked and Triton backends'). No row statistic couples the pairs, so the forward forms the
// input gradients too: each tile (I, J) of raw products p = x_I y_J^T (one BLAS product) gives,
// in place, the weights W of its pairs, and two more products W y_J (row block I's dx) and
// W^T x_I (column block J's dy): three n x m x D products in all for forward-with-grads, the
// backward of reduction "none" two besides the recompute. Tiles run in the wrapped-diagonal
// rounds of tiling::for_each_tile_by_diagonals (rectangular when n != m), so no two threads
// write the same rows of dx or the same rows of dy, and every sum's order is fixed by the shapes:
// bitwise reproducible whatever fastcl's thread count (the products themselves aside: MKL).
//
// The epilogue takes one exp a pair: with e = exp(-|z|) (never overflows),
//   softplus(u) = max(u, 0) + log1p(e),  sigmoid(u) = 1 / (1 + e) for u >= 0, e / (1 + e) else,
// for u = -t z (|u| = |z|): finite at any |z|, and the positive's weight -sigmoid(-z) is never
// formed as sigmoid(z) - 1. In float32 exp_f and log1p_unit (fast_exp.h) keep the loop
// vectorized. Each row's loss, dscale and dbias are summed per tile in the arithmetic dtype and
// across tiles in float64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "tiling.h"

namespace fastcl {
namespace {

using namespace tiling;

// One pair's loss term l and weight w: sign = +1 for a negative (u = z), -1 for the positive
// (u = -z); w = sign * sigmoid(u).
template <typename T>
FASTCL_INLINE void pair_terms(T p, T scale, T bias, T sign, T& l, T& w) {
  const T z = scale * p + bias;
  const T u = sign * z;
  const T e = exp_f(-std::abs(z));
  const T q = T(1) / (T(1) + e);
  const T sig = u >= T(0) ? q : e * q;
  l = (u > T(0) ? u : T(0)) + log1p_unit(e);
  w = sign * sig;
}

// Running sums of a row's terms over a tile.
template <typename T>
struct RowSums {
  T loss = 0, dscale = 0, dbias = 0;
};

// Columns [c0, c1) of a row of raw products s, all negatives: their sums added to acc; with
// kWrite, s[c] <- g * w (the weights the products W y and W^T x take).
template <typename T, bool kStats, bool kWrite>
FASTCL_INLINE void negatives(T* s, int64_t c0, int64_t c1, T scale, T bias, T g,
                             RowSums<T>& acc) {
  T ls = 0, ds = 0, bs = 0;
#pragma omp simd reduction(+ : ls, ds, bs)
  for (int64_t c = c0; c < c1; ++c) {
    T l, w;
    pair_terms(s[c], scale, bias, T(1), l, w);
    if constexpr (kStats) {
      ls += l;
      ds += w * s[c];
      bs += w;
    }
    if constexpr (kWrite) s[c] = g * w;
  }
  acc.loss += ls;
  acc.dscale += ds;
  acc.dbias += bs;
}

// A tile's epilogue: rows x cols raw products s (row-major), row r's positive in column
// pos0 + r when that lies in [0, cols) (has_pos). The rows' sums go to loss/dscale/dbias
// (float64, entries of the tile's rows) with kStats; with kWrite, s becomes g_r w_rc (g null:
// w_rc).
template <typename T, bool kStats, bool kWrite>
void sigmoid_tile(T* s, int64_t rows, int64_t cols, bool has_pos, int64_t pos0, T scale, T bias,
                  const T* g, double* loss, double* dscale, double* dbias) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * cols;
    const T gr = g != nullptr ? g[r] : T(1);
    const int64_t pc = has_pos ? pos0 + r : -1;
    RowSums<T> acc;
    if (pc >= 0 && pc < cols) {
      negatives<T, kStats, kWrite>(sr, 0, pc, scale, bias, gr, acc);
      T l, w;
      pair_terms(sr[pc], scale, bias, T(-1), l, w);
      if constexpr (kStats) {
        acc.loss += l;
        acc.dscale += w * sr[pc];
        acc.dbias += w;
      }
      if constexpr (kWrite) sr[pc] = gr * w;
      negatives<T, kStats, kWrite>(sr, pc + 1, cols, scale, bias, gr, acc);
    } else {
      negatives<T, kStats, kWrite>(sr, 0, cols, scale, bias, gr, acc);
    }
    if constexpr (kStats) {
      loss[r] += static_cast<double>(acc.loss);
      dscale[r] += static_cast<double>(acc.dscale);
      dbias[r] += static_cast<double>(acc.dbias);
    }
  }
}

// Whether any row has its positive among the m columns, and the column of row 0's positive.
struct Positives {
  bool any;
  int64_t offset;
};

Positives positives(c10::optional<int64_t> pos_offset, int64_t n, int64_t m) {
  if (!pos_offset.has_value()) return {false, 0};
  const int64_t off = *pos_offset;
  // j = i + off for some 0 <= i < n and 0 <= j < m: -n < off < m (and then |off| is small).
  if (off <= -n || off >= m) return {false, 0};
  return {true, off};
}

// The block edges: `tile`, or smaller for a short side (at least about 4 blocks a side, multiples
// of 16, as tiling::row_block), so that a round, which holds min(blocks of x, blocks of y)
// tiles, still gives every core work when one side is short (a rank's images against every
// rank's texts). Derived from the shapes alone: results stay independent of the thread count.
int64_t block_edge(int64_t len, int64_t tile) { return row_block(len, tile); }

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_forward_impl(
    const at::Tensor& x_in, const at::Tensor& y_in, double scale_d, double bias_d,
    c10::optional<int64_t> pos_offset, bool with_grads, int64_t tile) {
  const bool low = low_products(x_in, y_in, arith_type(x_in));
  const Rows<T> xr(x_in, at::Tensor(), low), yr(y_in, at::Tensor(), low);
  const int64_t n = xr.n, m = yr.n, d = xr.d;
  const at::TensorOptions opts = xr.opts;
  const auto dopts = opts.dtype(at::kDouble);
  auto loss = at::zeros({n}, dopts);
  auto dscale = at::zeros({n}, dopts);
  auto dbias = at::zeros({n}, dopts);
  auto dx = with_grads ? at::zeros({n, d}, opts) : at::empty({0}, opts);
  auto dy = with_grads ? at::zeros({m, d}, opts) : at::empty({0}, opts);
  T* dxp = with_grads ? dx.data_ptr<T>() : nullptr;
  T* dyp = with_grads ? dy.data_ptr<T>() : nullptr;
  double* lp = loss.data_ptr<double>();
  double* sp = dscale.data_ptr<double>();
  double* bp = dbias.data_ptr<double>();
  const auto pos = positives(pos_offset, n, m);
  const T scale = static_cast<T>(scale_d), bias = static_cast<T>(bias_d);

  auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s, Scratch<T>&) {
    const int64_t pos0 = i0 + pos.offset - j0;
    if (with_grads) {
      sigmoid_tile<T, true, true>(s, rows, cols, pos.any, pos0, scale, bias, nullptr, lp + i0,
                                  sp + i0, bp + i0);
      accumulate_tile(dxp + i0 * d, s, rows, cols, false, yr, j0);
      accumulate_tile(dyp + j0 * d, s, cols, rows, true, xr, i0);
    } else {
      sigmoid_tile<T, true, false>(s, rows, cols, pos.any, pos0, scale, bias, nullptr, lp + i0,
                                   sp + i0, bp + i0);
    }
  };
  for_each_tile_by_diagonals(xr, block_edge(n, tile), yr, block_edge(m, tile), 1.0, tile_fn);
  if (with_grads) {
    dx.mul_(scale_d);
    dy.mul_(scale_d);
  }
  const auto acc = opts.dtype().toScalarType();
  return {loss.to(acc), dscale.to(acc), dbias.to(acc), dx, dy};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> sigmoid_grad_impl(const at::Tensor& x_in,
                                                     const at::Tensor& y_in, double scale_d,
                                                     double bias_d,
                                                     c10::optional<int64_t> pos_offset,
                                                     const at::Tensor& g_in, bool need_rows,
                                                     bool need_cols, int64_t tile) {
  const bool low = low_products(x_in, y_in, arith_type(x_in));
  const Rows<T> xr(x_in, at::Tensor(), low), yr(y_in, at::Tensor(), low);
  const int64_t n = xr.n, m = yr.n, d = xr.d;
  const at::TensorOptions opts = xr.opts;
  auto dx = need_rows ? at::zeros({n, d}, opts) : at::empty({0}, opts);
  auto dy = need_cols ? at::zeros({m, d}, opts) : at::empty({0}, opts);
  if (!need_rows && !need_cols) return {dx, dy};
  const auto g = g_in.to(opts.dtype()).contiguous();
  const T* gp = g.data_ptr<T>();
  T* dxp = need_rows ? dx.data_ptr<T>() : nullptr;
  T* dyp = need_cols ? dy.data_ptr<T>() : nullptr;
  const auto pos = positives(pos_offset, n, m);
  const T scale = static_cast<T>(scale_d), bias = static_cast<T>(bias_d);

  auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s, Scratch<T>&) {
    sigmoid_tile<T, false, true>(s, rows, cols, pos.any, i0 + pos.offset - j0, scale, bias,
                                 gp + i0, nullptr, nullptr, nullptr);
    if (need_rows) accumulate_tile(dxp + i0 * d, s, rows, cols, false, yr, j0);
    if (need_cols) accumulate_tile(dyp + j0 * d, s, cols, rows, true, xr, i0);
  };
  for_each_tile_by_diagonals(xr, block_edge(n, tile), yr, block_edge(m, tile), 1.0, tile_fn);
  if (need_rows) dx.mul_(scale_d);
  if (need_cols) dy.mul_(scale_d);
  return {dx, dy};
}

void check_pair(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(),
              "fastcl_cpu: x and y must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "fastcl_cpu: x and y must be 2-D, got ", x.dim(),
              "-D and ", y.dim(), "-D");
  TORCH_CHECK(x.size(1) == y.size(1), "fastcl_cpu: x and y must have the same feature size, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fastcl_cpu: x and y must have the same dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kBFloat16,
              "fastcl_cpu: x and y must be float32 or float64 (or bfloat16)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_forward(
    const at::Tensor& x, const at::Tensor& y, double scale, double bias,
    c10::optional<int64_t> pos_offset, bool with_grads, int64_t tile) {
  check_tile(tile);
  check_pair(x, y);
  if (arith_type(x) == at::kDouble) {
    return sigmoid_forward_impl<double>(x, y, scale, bias, pos_offset, with_grads, tile);
  }
  return sigmoid_forward_impl<float>(x, y, scale, bias, pos_offset, with_grads, tile);
}

std::tuple<at::Tensor, at::Tensor> sigmoid_grad(const at::Tensor& x, const at::Tensor& y,
                                                double scale, double bias,
                                                c10::optional<int64_t> pos_offset,
                                                const at::Tensor& g, bool need_rows,
                                                bool need_cols, int64_t tile) {
  check_tile(tile);
  check_pair(x, y);
  TORCH_CHECK(g.dim() == 1 && g.size(0) == x.size(0), "fastcl_cpu: g must have shape (",
              x.size(0), ",)");
  if (arith_type(x) == at::kDouble) {
    return sigmoid_grad_impl<double>(x, y, scale, bias, pos_offset, g, need_rows, need_cols,
                                     tile);
  }
  return sigmoid_grad_impl<float>(x, y, scale, bias, pos_offset, g, need_rows, need_cols, tile);
}

}  // namespace fastcl
