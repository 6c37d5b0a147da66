// Fused, tiled kernels for label positives (SupCon, SupContrast's SupConLoss) on the CPU: forward
// and backward, symmetric (contrast_mode="all": rows = columns) and general (rows a block of the
// columns at an offset: contrast_mode="one", the distributed loss). The contract is
// labels_forward / labels_grad / labels_sym_forward / labels_sym_grad in
// fastcl/kernels/__init__.py; the registration is in registration.cpp; the tiles, their
// schedules, the online logsumexp and the symmetric tiles' softmax work are in tiling.h, shared
// with NT-Xent (contrastive.cpp).
//
// Row i's logits are every column but its own; its positives are the other columns with its
// label, compared inside each tile (the row's label against each column's). Per row the forward
// keeps the online lse state (and, for dscale, the centred moment t), and the sum of its positive
// logits, each the very float its max and sum saw: summed per tile in the arithmetic dtype and
// across tiles in float64. The counts of positives come from the labels alone (a sort), not
// from the tiles.
//
// The symmetric kernels compute each tile pair once (J >= I), as NT-Xent's do: the forward feeds
// both its rows' and its columns' statistics (the label relation is symmetric too), the backward
// forms W_ij + W_ji from one tile. Scheduled in tiling.h's rounds of disjoint block pairs: no
// atomics, and results independent of the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "tiling.h"

namespace fastcl {
namespace {

using namespace tiling;

// ----------------------------------------------------------------------- label ids --------

// Labels are any int64 values, compared for equality only. The tiles compare int32 ids instead
// (the width of a float32 lane, for the vectorized loops): col ids are the ranks of the columns'
// labels among their distinct values, a row's the rank of its label there, or -1 when no column
// has it (equal to no column's). freq[id]: how many columns carry it.
struct LabelIds {
  std::vector<int32_t> rows, cols;
  std::vector<int64_t> freq;
};

inline void check_labels(const at::Tensor& labels, int64_t n, const char* name) {
  TORCH_CHECK(labels.device().is_cpu(), "fastcl_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastcl_cpu: ", name, " must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "fastcl_cpu: ", name,
              " must have shape (", n, ",)");
}

LabelIds label_ids(const at::Tensor& row_labels, const at::Tensor& col_labels) {
  const auto rl = row_labels.contiguous();
  const auto cl = col_labels.contiguous();
  const int64_t* r = rl.data_ptr<int64_t>();
  const int64_t* c = cl.data_ptr<int64_t>();
  const int64_t n = rl.numel(), m = cl.numel();
  std::vector<int64_t> values(c, c + m);
  std::sort(values.begin(), values.end());
  LabelIds ids;
  std::vector<int64_t> uniq;
  for (int64_t k = 0; k < m; ++k) {
    if (k == 0 || values[k] != values[k - 1]) {
      uniq.push_back(values[k]);
      ids.freq.push_back(0);
    }
    ++ids.freq.back();
  }
  auto id_of = [&](int64_t v) -> int32_t {
    const auto it = std::lower_bound(uniq.begin(), uniq.end(), v);
    return it != uniq.end() && *it == v ? static_cast<int32_t>(it - uniq.begin()) : -1;
  };
  ids.cols.resize(m);
  ids.rows.resize(n);
  for (int64_t j = 0; j < m; ++j) ids.cols[j] = id_of(c[j]);
  for (int64_t i = 0; i < n; ++i) ids.rows[i] = id_of(r[i]);
  return ids;
}

// count_i = the columns with row i's label, but its own column i + offset.
at::Tensor positive_counts(const LabelIds& ids, int64_t offset, const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(ids.rows.size());
  std::vector<double> count(n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = ids.rows[i];
    count[i] = id < 0 ? 0.0
                      : static_cast<double>(ids.freq[id] - (ids.cols[i + offset] == id ? 1 : 0));
  }
  return at::tensor(count, at::TensorOptions().dtype(at::kDouble)).to(opts.dtype());
}

// loss_i = (m_i - sp_i / count_i) + log l_i, lse_i = m_i + log l_i (float64), dscale_i = (t_i /
// l_i + (m_i - sp_i / count_i)) / inv_temp, in float64 and returned in m's dtype (lse float64);
// loss and dscale 0 where count_i = 0 (no positive, no loss; also the rows with no column at all,
// whose m = -inf, l = 0 and lse = -inf).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_labels(
    const at::Tensor& m, const at::Tensor& l, const at::Tensor& t, const at::Tensor& sp,
    const at::Tensor& count, double inv_temp, bool with_dscale) {
  const auto md = m.to(at::kDouble);
  const auto cd = count.to(at::kDouble);
  const auto has = cd > 0;
  const auto log_l = at::log(l);
  const auto gap = md - sp / cd.clamp_min(1.0);  // m - mean of the positive logits
  const auto zero = at::zeros_like(md);
  auto loss = at::where(has, gap + log_l, zero).to(m.scalar_type());
  auto lse = md + log_l;
  auto dscale = with_dscale
                    ? at::where(has, (t / l + gap).div_(inv_temp), zero).to(m.scalar_type())
                    : at::empty({0}, m.options());
  return {loss, lse, dscale, count};
}

// ------------------------------------------------------------------------ symmetric -------

// A tile's positive sums, before its statistics: row r's sum of its logits s_rc over the columns
// with its label (on the diagonal, but its own: c != r), into sp[i0 + r]; off the diagonal the
// columns' too (the relation is symmetric), summed over the tile's rows in col_ps, then into
// sp[j0 + c]. Per tile in T, across tiles in float64.
template <typename T>
void symmetric_positive_sums(bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                             const T* s, const int32_t* lab, double* sp, T* col_ps) {
  const int32_t* lc = lab + j0;
  if (diagonal) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* sr = s + r * cols;
      const int32_t lr = lab[i0 + r];
      T ps = 0;
#pragma omp simd reduction(+ : ps)
      for (int64_t c = 0; c < cols; ++c) ps += (lc[c] == lr && c != r) ? sr[c] : T(0);
      sp[i0 + r] += static_cast<double>(ps);
    }
    return;
  }
  for (int64_t c = 0; c < cols; ++c) col_ps[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* sr = s + r * cols;
    const int32_t lr = lab[i0 + r];
    T ps = 0;
#pragma omp simd reduction(+ : ps)
    for (int64_t c = 0; c < cols; ++c) {
      const T v = lc[c] == lr ? sr[c] : T(0);
      ps += v;
      col_ps[c] += v;
    }
    sp[i0 + r] += static_cast<double>(ps);
  }
  for (int64_t c = 0; c < cols; ++c) sp[j0 + c] += static_cast<double>(col_ps[c]);
}

template <typename T, bool kScaleGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> labels_sym_forward_impl(
    const at::Tensor& z, const at::Tensor& nz, const at::Tensor& labels, double inv_temp,
    int64_t tile) {
  const Rows<T> zr(z, nz, low_products(z, z, nz.scalar_type()));
  const int64_t n = zr.n;
  const at::TensorOptions opts = zr.opts;
  const auto ids = label_ids(labels, labels);
  auto count = positive_counts(ids, 0, opts);
  at::Tensor m = at::full({n}, neg_inf<T>(), opts);
  auto l = at::zeros({n}, opts.dtype(at::kDouble));
  auto t = at::zeros({kScaleGrad ? n : 0}, opts.dtype(at::kDouble));
  auto sp = at::zeros({n}, opts.dtype(at::kDouble));
  OnlineLSE<T> st{m.data_ptr<T>(), l.data_ptr<double>(),
                  kScaleGrad ? t.data_ptr<double>() : nullptr};
  double* spp = sp.data_ptr<double>();
  const int32_t* lab = ids.rows.data();
  // the one-exp tiles only where every exponent stays in range (norms of ones: any length)
  const bool fast = one_exp<T>(symmetric_logit_bound(zr, inv_temp), n);

  auto tile_fn = [&](bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s,
                     Scratch<T>& scratch) {
    // vec(5): symmetric_lse_tile uses 0..4
    symmetric_positive_sums(diagonal, i0, rows, j0, cols, s, lab, spp, scratch.vec(5));
    symmetric_lse_tile<T, kScaleGrad>(diagonal, i0, rows, j0, cols, s, scratch, st, fast);
  };
  for_each_symmetric_tile(zr, inv_temp, tile, tile_fn);
  return finish_labels<T>(m, l, t, sp, count, inv_temp, kScaleGrad);
}

template <typename T>
at::Tensor labels_sym_grad_impl(const at::Tensor& z, const at::Tensor& nz,
                                const at::Tensor& labels, const at::Tensor& lse_in,
                                const at::Tensor& ga_in, const at::Tensor& gp_in,
                                double inv_temp, int64_t tile) {
  const Rows<T> zr(z, nz, low_products(z, z, nz.scalar_type()));
  const int64_t n = zr.n, d = zr.d;
  const at::TensorOptions opts = zr.opts;
  const auto ids = label_ids(labels, labels);
  const auto [lse_t, lo_t] = split_lse(lse_in, nz, n, "lse");
  const auto ga_t = row_vector(ga_in, nz, n, "ga");
  const auto gp_t = row_vector(gp_in, nz, n, "gp");
  const T* lse = lse_t.data_ptr<T>();
  const T* lo = lo_t.data_ptr<T>();
  const T* ga = ga_t.data_ptr<T>();
  const T* gp = gp_t.data_ptr<T>();
  const int32_t* lab = ids.rows.data();
  auto out = at::zeros({n, d}, opts);
  T* op = out.data_ptr<T>();
  // the one-exp tiles only where every exponent stays in range (norms of ones: any length)
  const bool fast = one_exp<T>(symmetric_logit_bound(zr, inv_temp), n);

  auto tile_fn = [&](bool diagonal, int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* w,
                     Scratch<T>& scratch) {
    // ga_r P_rc + ga_c P_cr - (gp_r + gp_c) [l_r == l_c]: the positives inside the tile.
    symmetric_weights_tile<T, true>(diagonal, i0, rows, j0, cols, w, scratch, lse, lo, ga, fast,
                                    lab, gp);
    // Self-pairs: none (also where a lone row's lse = -inf made its masked weight NaN).
    if (diagonal) {
      for (int64_t r = 0; r < rows; ++r) w[r * cols + r] = 0;
    }
    accumulate_tile(op + i0 * d, w, rows, cols, false, zr, j0);
    if (!diagonal) accumulate_tile(op + j0 * d, w, cols, rows, true, zr, i0);
  };
  for_each_symmetric_tile(zr, inv_temp, tile, tile_fn);
  return out.mul_(inv_temp);
}

// ------------------------------------------------------------------------ general ---------

// Rows q (n) against columns k (m), row i's own column i + offset: tiling.h's row blocks, each
// walking all column tiles in order (lse_forward's loop). In each tile, the positive sum first
// (own column skipped), then the own column masked (-inf) for the max and the sums.
template <typename T, bool kScaleGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> labels_forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const at::Tensor& lq, const at::Tensor& lk, double inv_temp, int64_t offset, int64_t tile) {
  const bool low = low_products(q, k, nq.scalar_type());
  const Rows<T> qr(q, nq, low), kr(k, nk, low);
  const int64_t nr = qr.n;
  const at::TensorOptions opts = qr.opts;
  const auto ids = label_ids(lq, lk);
  auto count = positive_counts(ids, offset, opts);
  at::Tensor m = at::full({nr}, neg_inf<T>(), opts);
  auto l = at::zeros({nr}, opts.dtype(at::kDouble));
  auto t = at::zeros({kScaleGrad ? nr : 0}, opts.dtype(at::kDouble));
  auto sp = at::zeros({nr}, opts.dtype(at::kDouble));
  OnlineLSE<T> st{m.data_ptr<T>(), l.data_ptr<double>(),
                  kScaleGrad ? t.data_ptr<double>() : nullptr};
  double* spp = sp.data_ptr<double>();
  const int32_t* rlab = ids.rows.data();
  const int32_t* clab = ids.cols.data();

  auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* s) {
    const int32_t* lc = clab + j0;
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s + r * cols;
      const int32_t lr = rlab[i0 + r];
      const int64_t own = i0 + r + offset - j0;  // may lie outside [0, cols): then no c is own
      T ps = 0;
#pragma omp simd reduction(+ : ps)
      for (int64_t c = 0; c < cols; ++c) ps += (lc[c] == lr && c != own) ? sr[c] : T(0);
      spp[i0 + r] += static_cast<double>(ps);
      if (own >= 0 && own < cols) sr[own] = neg_inf<T>();
      const T new_m = std::max(st.m[i0 + r], row_max(sr, cols));
      const T shift = shift_of(new_m);
      if constexpr (kScaleGrad) {
        T ts;
        const T sum = row_exp_sum(sr, cols, shift, ts);
        st.merge(i0 + r, new_m, sum, ts);
      } else {
        st.merge(i0 + r, new_m, row_exp_sum(sr, cols, shift));
      }
    }
  };
  for_each_row_block(qr, kr, inv_temp, tile, tile_fn, [](int64_t, int64_t) {});
  return finish_labels<T>(m, l, t, sp, count, inv_temp, kScaleGrad);
}

// out_a = inv_temp * sum_b W_ab bhat_b. Statistics on a's side (the rows' gradient, (a, b) =
// (q, k)): the tiles of labels_forward(a, b), W_ab = ga_a exp(s_ab - lse_a) - gp_a [la_a ==
// lb_b], the own column a + offset skipped. On b's side (the columns' gradient, (a, b) = (k, q)):
// the tiles of labels_forward(b, a), that forward's own products (b's row blocks against a's
// column tiles, grad_accumulate's stacked layout, transposed when accumulated), W_ab = ga_b
// exp(s_ba - lse_b) - gp_b [la_a == lb_b], the pair (b + offset, b) skipped.
template <typename T>
at::Tensor labels_grad_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                            const at::Tensor& nb, const at::Tensor& la, const at::Tensor& lb,
                            const c10::optional<at::Tensor>& lse_a,
                            const c10::optional<at::Tensor>& ga_a,
                            const c10::optional<at::Tensor>& gp_a,
                            const c10::optional<at::Tensor>& lse_b,
                            const c10::optional<at::Tensor>& ga_b,
                            const c10::optional<at::Tensor>& gp_b, double inv_temp,
                            int64_t offset, int64_t tile) {
  const bool low = low_products(a, b, na.scalar_type());
  const Rows<T> ar(a, na, low), br(b, nb, low);
  const int64_t nr = ar.n, nc = br.n, d = ar.d;
  const at::TensorOptions opts = ar.opts;
  const bool by_row = lse_a.has_value();
  const int64_t ns = by_row ? nr : nc;  // the rows that hold the statistics
  const auto [lse_t, lo_t] =
      by_row ? split_lse(*lse_a, na, nr, "lse_a") : split_lse(*lse_b, na, nc, "lse_b");
  const auto ga_t = row_vector(by_row ? *ga_a : *ga_b, na, ns, by_row ? "ga_a" : "ga_b");
  const auto gp_t = row_vector(by_row ? *gp_a : *gp_b, na, ns, by_row ? "gp_a" : "gp_b");
  const T* lse = lse_t.data_ptr<T>();
  const T* lo = lo_t.data_ptr<T>();
  const T* ga = ga_t.data_ptr<T>();
  const T* gp = gp_t.data_ptr<T>();
  // ids: the statistics' rows as rows (equality is all that matters)
  const auto ids = by_row ? label_ids(la, lb) : label_ids(lb, la);
  const int32_t* slab = ids.rows.data();  // the statistics' side
  const int32_t* olab = ids.cols.data();  // the other side
  auto out = at::zeros({nr, d}, opts);
  T* op = out.data_ptr<T>();

  // Statistics' rows s0.. (rows x cols logits, row-major) against the other side's rows j0..
  // into weights, in place: ga exp((s - hi) - lo) - gp [same label], the own pair (s, s +
  // offset) 0.
  auto weigh = [&](T* w, int64_t s0, int64_t rows, int64_t j0, int64_t cols) {
    const int32_t* lc = olab + j0;
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = w + r * cols;
      const T shift = lse[s0 + r], lo_r = lo[s0 + r], gr = ga[s0 + r], pr = gp[s0 + r];
      const int32_t lr = slab[s0 + r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c)
        wr[c] = gr * exp_f((wr[c] - shift) - lo_r) - (lc[c] == lr ? pr : T(0));
      const int64_t own = s0 + r + offset - j0;
      if (own >= 0 && own < cols) wr[own] = 0;
    }
  };
  if (by_row) {
    auto tile_fn = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, T* w) {
      weigh(w, i0, rows, j0, cols);
      accumulate_tile(op + i0 * d, w, rows, cols, false, br, j0);
    };
    for_each_row_block(ar, br, inv_temp, tile, tile_fn,
                       [](int64_t, int64_t) {});
  } else {
    // On b's side: the tiles of labels_forward(b, a), as grad_accumulate's columns' pass.
    for_each_column_stack(ar, br, inv_temp, tile, op, weigh);
  }
  return out.mul_(inv_temp);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> labels_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const at::Tensor& lq, const at::Tensor& lk, double inv_temp, int64_t offset, int64_t tile,
    bool with_dscale) {
  check_tile(tile);
  check_pair(q, nq, "q", k, nk, "k");
  check_labels(lq, q.size(0), "lq");
  check_labels(lk, k.size(0), "lk");
  TORCH_CHECK(offset >= 0 && offset + q.size(0) <= k.size(0), "fastcl_cpu: offset must satisfy "
              "0 <= offset and offset + n <= m (the rows are k[offset:offset + n]), got offset ",
              offset, ", n ", q.size(0), ", m ", k.size(0));
  return dispatch(nq, [&](auto x) {
    using T = decltype(x);
    return with_dscale
               ? labels_forward_impl<T, true>(q, k, nq, nk, lq, lk, inv_temp, offset, tile)
               : labels_forward_impl<T, false>(q, k, nq, nk, lq, lk, inv_temp, offset, tile);
  });
}

at::Tensor labels_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                       const at::Tensor& nb, const at::Tensor& la, const at::Tensor& lb,
                       const c10::optional<at::Tensor>& lse_a,
                       const c10::optional<at::Tensor>& ga_a,
                       const c10::optional<at::Tensor>& gp_a,
                       const c10::optional<at::Tensor>& lse_b,
                       const c10::optional<at::Tensor>& ga_b,
                       const c10::optional<at::Tensor>& gp_b, double inv_temp, int64_t offset,
                       int64_t tile) {
  check_tile(tile);
  check_pair(a, na, "a", b, nb, "b");
  check_labels(la, a.size(0), "la");
  check_labels(lb, b.size(0), "lb");
  TORCH_CHECK(lse_a.has_value() == ga_a.has_value() && lse_a.has_value() == gp_a.has_value() &&
                  lse_b.has_value() == ga_b.has_value() && lse_b.has_value() == gp_b.has_value(),
              "fastcl_cpu: each lse comes with its ga and gp");
  TORCH_CHECK(lse_a.has_value() != lse_b.has_value(),
              "fastcl_cpu: give exactly one of (lse_a, ga_a, gp_a) and (lse_b, ga_b, gp_b)");
  // The statistics' rows are the block k[offset:offset + n] of the other side's.
  const int64_t ns = lse_a.has_value() ? a.size(0) : b.size(0);
  const int64_t no = lse_a.has_value() ? b.size(0) : a.size(0);
  TORCH_CHECK(offset >= 0 && offset + ns <= no, "fastcl_cpu: offset must satisfy 0 <= offset "
              "and offset + n <= m (n the rows with the statistics), got offset ", offset,
              ", n ", ns, ", m ", no);
  return dispatch(na, [&](auto t) {
    return labels_grad_impl<decltype(t)>(a, b, na, nb, la, lb, lse_a, ga_a, gp_a, lse_b, ga_b,
                                         gp_b, inv_temp, offset, tile);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> labels_sym_forward(
    const at::Tensor& z, const at::Tensor& nz, const at::Tensor& labels, double inv_temp,
    int64_t tile, bool with_dscale) {
  check_tile(tile);
  check_rows(z, nz, "z");
  check_labels(labels, z.size(0), "labels");
  return dispatch(nz, [&](auto x) {
    using T = decltype(x);
    return with_dscale ? labels_sym_forward_impl<T, true>(z, nz, labels, inv_temp, tile)
                       : labels_sym_forward_impl<T, false>(z, nz, labels, inv_temp, tile);
  });
}

at::Tensor labels_sym_grad(const at::Tensor& z, const at::Tensor& nz, const at::Tensor& labels,
                           const at::Tensor& lse, const at::Tensor& ga, const at::Tensor& gp,
                           double inv_temp, int64_t tile) {
  check_tile(tile);
  check_rows(z, nz, "z");
  check_labels(labels, z.size(0), "labels");
  return dispatch(nz, [&](auto t) {
    return labels_sym_grad_impl<decltype(t)>(z, nz, labels, lse, ga, gp, inv_temp, tile);
  });
}

}  // namespace fastcl
