// CLIP's row + column softmax statistics on the CPU, forward and backward, in one pass over the
// tiles of s = inv_temp * xhat yhat^T (x the images, y the texts, n rows each): the contract is
// fastcl/kernels/__init__.py's rows_cols_forward / rows_cols_grad:
//
//   forward   loss = [row losses lse_j(s_ij) - s_ii ; column losses lse_i(s_ij) - s_jj] (2n),
//             lse (2n, float64) likewise, dscale (2n) = d loss / d inv_temp on request.
//   backward  W_ij = g_r_i exp(s_ij - lse_r_i) + g_c_j exp(s_ij - lse_c_j), i != j;
//             dxhat = inv_temp W yhat, dyhat = inv_temp W^T xhat (the positives' terms are the
//             op layer's, from the exact losses).
//
// Each tile (I, J) is one BLAS product, read twice: its rows feed row block I's online
// log-sum-exp, its columns (a reduction over the tile's rows) column block J's. The backward
// recomputes the tile by the same product (same shape, same operand order: the very floats the
// forward's lse saw) and accumulates both gradients from one weight tile. Four products of
// n x n x D in all for forward + backward, no n x n buffer, no per-thread copies of the outputs.
//
// Schedule (tiling::for_each_tile_by_diagonals): round r holds the tiles (I, (I + r) mod B), which
// touch every row block and every column block once, so a round's tiles run in parallel without
// conflicting writes, and each row's and each column's accumulation order is fixed by the shape:
// results are bitwise reproducible and independent of fastcl's thread count (the products
// themselves aside: see tests/test_cpp.py on MKL).
//
// Two exps per logit (one about the row's shift, one about the column's): the one-exp trick of
// tiling.h needs all shifts within kExpRange of each other, which CLIP's logits (scale up to 100,
// features not necessarily unit vectors) do not promise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "tiling.h"

namespace fastcl {
namespace {

using namespace tiling;

template <typename T, bool kScaleGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_cols_forward_impl(const at::Tensor& x,
                                                                      const at::Tensor& y,
                                                                      const at::Tensor& nx,
                                                                      const at::Tensor& ny,
                                                                      double inv_temp,
                                                                      int64_t tile) {
  const bool low = low_products(x, y, nx.scalar_type());
  const Rows<T> xr(x, nx, low), yr(y, ny, low);
  const int64_t n = xr.n;
  const at::TensorOptions opts = xr.opts;
  // [rows ; columns]: the row statistics in the first n entries, the columns' in the last n.
  at::Tensor m = at::full({2 * n}, neg_inf<T>(), opts);
  auto l = at::zeros({2 * n}, opts.dtype(at::kDouble));
  auto t = at::zeros({kScaleGrad ? 2 * n : 0}, opts.dtype(at::kDouble));
  auto s_pos = at::empty({n}, opts);
  T* sp = s_pos.data_ptr<T>();
  double* tp = kScaleGrad ? t.data_ptr<double>() : nullptr;
  OnlineLSE<T> rs{m.data_ptr<T>(), l.data_ptr<double>(), tp};
  OnlineLSE<T> cs{m.data_ptr<T>() + n, l.data_ptr<double>() + n, kScaleGrad ? tp + n : nullptr};

  auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s,
                     Scratch<T>& scratch) {
    if (i0 == j0) {
      // The positives s_ii, from the very floats both maxima see.
      for (int64_t k = 0; k < rows; ++k) sp[i0 + k] = s[k * cols + k];
    }
    T* row_m = scratch.vec(0);
    T* col_m = scratch.vec(1);
    T* col_sum = scratch.vec(2);
    T* col_shift = scratch.vec(3);
    T* col_t = scratch.vec(4);  // the columns' centred sums (kScaleGrad only)
    tile_maxima(s, rows, cols, rs.m + i0, cs.m + j0, row_m, col_m, col_sum,
                kScaleGrad ? col_t : nullptr);
    tile_rows_cols<T, kScaleGrad>(s, rows, cols, row_m, col_m, col_shift, col_sum, col_t, rs, i0,
                                  cs, j0);
  };
  for_each_tile_by_diagonals(xr, yr, inv_temp, tile, tile_fn);
  // Row i's positive is s_ii, column j's is s_jj: the same n floats for both halves.
  const auto s_pos2 = s_pos.repeat({2});
  auto [loss, lse] = finish<T>(m, l, s_pos2);
  auto dscale = kScaleGrad ? scale_grad(m, l, t, s_pos2, inv_temp) : at::empty({0}, opts);
  return {loss, lse, dscale};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> rows_cols_grad_impl(const at::Tensor& x, const at::Tensor& y,
                                                       const at::Tensor& nx, const at::Tensor& ny,
                                                       const at::Tensor& lse_in,
                                                       const at::Tensor& g_in, double inv_temp,
                                                       int64_t tile) {
  const bool low = low_products(x, y, nx.scalar_type());
  const Rows<T> xr(x, nx, low), yr(y, ny, low);
  const int64_t n = xr.n, d = xr.d;
  const at::TensorOptions opts = xr.opts;
  // lse = [rows ; columns] as hi + lo (split_lse): the weights are exp((s - hi) - lo).
  const auto [hi_t, lo_t] = split_lse(lse_in, nx, 2 * n, "lse");
  const auto g_t = row_vector(g_in, nx, 2 * n, "g");
  const T* hi_r = hi_t.data_ptr<T>();
  const T* lo_r = lo_t.data_ptr<T>();
  const T* g_r = g_t.data_ptr<T>();
  const T* hi_c = hi_r + n;
  const T* lo_c = lo_r + n;
  const T* g_c = g_r + n;
  auto dx = at::zeros({n, d}, opts);
  auto dy = at::zeros({n, d}, opts);
  T* dxp = dx.data_ptr<T>();
  T* dyp = dy.data_ptr<T>();

  auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* w, Scratch<T>&) {
    const T* hc = hi_c + j0;
    const T* lc = lo_c + j0;
    const T* gc = g_c + j0;
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = w + r * cols;
      const T hr = hi_r[i0 + r], lr = lo_r[i0 + r], gr = g_r[i0 + r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const T s = wr[c];
        wr[c] = gr * exp_f((s - hr) - lr) + gc[c] * exp_f((s - hc[c]) - lc[c]);
      }
    }
    if (i0 == j0) {
      for (int64_t k = 0; k < rows; ++k) w[k * cols + k] = 0;  // the positives: the op layer's
    }
    accumulate_tile(dxp + i0 * d, w, rows, cols, false, yr, j0);
    accumulate_tile(dyp + j0 * d, w, cols, rows, true, xr, i0);
  };
  for_each_tile_by_diagonals(xr, yr, inv_temp, tile, tile_fn);
  dx.mul_(inv_temp);
  dy.mul_(inv_temp);
  return {dx, dy};
}

void check_pair(const at::Tensor& x, const at::Tensor& y, const at::Tensor& nx,
                const at::Tensor& ny) {
  check_rows(x, nx, "x");
  check_rows(y, ny, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "fastcl_cpu: x and y must have the same shape (n, D), got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(nx.scalar_type() == ny.scalar_type(),
              "fastcl_cpu: nx and ny must have the same dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_cols_forward(const at::Tensor& x,
                                                                 const at::Tensor& y,
                                                                 const at::Tensor& nx,
                                                                 const at::Tensor& ny,
                                                                 double inv_temp, int64_t tile,
                                                                 bool with_dscale) {
  check_tile(tile);
  check_pair(x, y, nx, ny);
  return dispatch(nx, [&](auto v) {
    using T = decltype(v);
    return with_dscale ? rows_cols_forward_impl<T, true>(x, y, nx, ny, inv_temp, tile)
                       : rows_cols_forward_impl<T, false>(x, y, nx, ny, inv_temp, tile);
  });
}

std::tuple<at::Tensor, at::Tensor> rows_cols_grad(const at::Tensor& x, const at::Tensor& y,
                                                  const at::Tensor& nx, const at::Tensor& ny,
                                                  const at::Tensor& lse, const at::Tensor& g,
                                                  double inv_temp, int64_t tile) {
  check_tile(tile);
  check_pair(x, y, nx, ny);
  return dispatch(nx, [&](auto v) {
    return rows_cols_grad_impl<decltype(v)>(x, y, nx, ny, lse, g, inv_temp, tile);
  });
}

}  // namespace fastcl
