// The C++ CPU kernels' operator library, "fastcl_cpu". fastcl's public custom ops ("fastcl::...",
// fastcl/ops/) call these on CPU tensors; the schemas mirror the backend contracts in
// fastcl/kernels/__init__.py (contrastive.cpp, clip.cpp, labels.cpp: SupCon's, dense.cpp;
// sigmoid.cpp: SigLIP's, in fastcl/kernels/cpp.py), fastcl/ops/momentum.py (momentum.cpp) and
// fastcl/ops/cosine.py (cosine.cpp). Their fake (meta) implementations are registered from
// Python (fastcl/ops/_cpp_meta.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include "bf16.h"

namespace fastcl {

std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_forward(const at::Tensor& z,
                                                               const at::Tensor& nz,
                                                               double inv_temp, int64_t tile,
                                                               bool positive_in_denominator,
                                                               bool with_dscale);
at::Tensor nt_xent_grad(const at::Tensor& z, const at::Tensor& nz, const at::Tensor& lse,
                        const at::Tensor& g, double inv_temp, int64_t tile);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const c10::optional<at::Tensor>& k_pos, const c10::optional<at::Tensor>& n_pos,
    double inv_temp, c10::optional<int64_t> pos_offset, bool with_grad, int64_t tile,
    bool positive_in_denominator, bool with_dscale);
at::Tensor grad_accumulate(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                           const at::Tensor& nb, const c10::optional<at::Tensor>& lse_a,
                           const c10::optional<at::Tensor>& g_a,
                           const c10::optional<at::Tensor>& lse_b,
                           const c10::optional<at::Tensor>& g_b, double inv_temp,
                           c10::optional<int64_t> pos_offset, int64_t tile);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_cols_forward(const at::Tensor& x,
                                                                 const at::Tensor& y,
                                                                 const at::Tensor& nx,
                                                                 const at::Tensor& ny,
                                                                 double inv_temp, int64_t tile,
                                                                 bool with_dscale);
std::tuple<at::Tensor, at::Tensor> rows_cols_grad(const at::Tensor& x, const at::Tensor& y,
                                                  const at::Tensor& nx, const at::Tensor& ny,
                                                  const at::Tensor& lse, const at::Tensor& g,
                                                  double inv_temp, int64_t tile);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> labels_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    const at::Tensor& lq, const at::Tensor& lk, double inv_temp, int64_t offset, int64_t tile,
    bool with_dscale);
at::Tensor labels_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& na,
                       const at::Tensor& nb, const at::Tensor& la, const at::Tensor& lb,
                       const c10::optional<at::Tensor>& lse_a,
                       const c10::optional<at::Tensor>& ga_a,
                       const c10::optional<at::Tensor>& gp_a,
                       const c10::optional<at::Tensor>& lse_b,
                       const c10::optional<at::Tensor>& ga_b,
                       const c10::optional<at::Tensor>& gp_b, double inv_temp, int64_t offset,
                       int64_t tile);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> labels_sym_forward(
    const at::Tensor& z, const at::Tensor& nz, const at::Tensor& labels, double inv_temp,
    int64_t tile, bool with_dscale);
at::Tensor labels_sym_grad(const at::Tensor& z, const at::Tensor& nz, const at::Tensor& labels,
                           const at::Tensor& lse, const at::Tensor& ga, const at::Tensor& gp,
                           double inv_temp, int64_t tile);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_forward(
    const at::Tensor& x, const at::Tensor& y, double scale, double bias,
    c10::optional<int64_t> pos_offset, bool with_grads, int64_t tile);
std::tuple<at::Tensor, at::Tensor> sigmoid_grad(const at::Tensor& x, const at::Tensor& y,
                                                double scale, double bias,
                                                c10::optional<int64_t> pos_offset,
                                                const at::Tensor& g, bool need_rows,
                                                bool need_cols, int64_t tile);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    double inv_temp, c10::optional<int64_t> pos_offset, bool positive_in_denominator,
    bool with_dscale, bool with_row_grad);
at::Tensor dense_grad_cols(const at::Tensor& probs, const at::Tensor& g, const at::Tensor& q,
                           const at::Tensor& nq, double inv_temp);
std::tuple<at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& probs, const at::Tensor& v, const at::Tensor& g, const at::Tensor& c,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& nq, const at::Tensor& nk,
    double inv_temp, bool need_rows, bool need_cols);

void ema_(at::TensorList targets, at::TensorList sources, const at::Tensor& momentum);
void queue_push_(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys);
bool queue_push_eager_(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys);

std::tuple<at::Tensor, at::Tensor> cosine_forward(const at::Tensor& p, const at::Tensor& z);
at::Tensor cosine_backward(const at::Tensor& g, const at::Tensor& p, const at::Tensor& z,
                           const at::Tensor& stats);

}  // namespace fastcl

TORCH_LIBRARY(fastcl_cpu, m) {
  // positive_in_denominator=False: DCL (the positive logit out of the row's max and sum).
  // with_dscale: also d loss_i / d inv_temp per row (else an empty tensor).
  m.def(
      "nt_xent_forward(Tensor z, Tensor nz, float inv_temp, int tile, "
      "bool positive_in_denominator=True, bool with_dscale=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "nt_xent_grad(Tensor z, Tensor nz, Tensor lse, Tensor g, float inv_temp, int tile) "
      "-> Tensor");
  m.def(
      "lse_forward(Tensor q, Tensor k, Tensor nq, Tensor nk, Tensor? k_pos, Tensor? n_pos, "
      "float inv_temp, int? pos_offset, bool with_grad, int tile, "
      "bool positive_in_denominator=True, bool with_dscale=False) "
      "-> (Tensor loss, Tensor lse, Tensor v, Tensor dscale)");
  m.def(
      "grad_accumulate(Tensor a, Tensor b, Tensor na, Tensor nb, Tensor? lse_a, Tensor? g_a, "
      "Tensor? lse_b, Tensor? g_b, float inv_temp, int? pos_offset, int tile) -> Tensor");
  // clip.cpp: CLIP's row + column statistics (x images, y texts, n rows each); loss, lse and
  // dscale are [rows ; columns] (2n), g too.
  m.def(
      "rows_cols_forward(Tensor x, Tensor y, Tensor nx, Tensor ny, float inv_temp, int tile, "
      "bool with_dscale=False) -> (Tensor loss, Tensor lse, Tensor dscale)");
  m.def(
      "rows_cols_grad(Tensor x, Tensor y, Tensor nx, Tensor ny, Tensor lse, Tensor g, "
      "float inv_temp, int tile) -> (Tensor, Tensor)");
  // labels.cpp: SupCon's label positives (int64 labels; row i's own column i + offset
  // excluded); loss, lse (float64), dscale (empty unless with_dscale), count per row.
  m.def(
      "labels_forward(Tensor q, Tensor k, Tensor nq, Tensor nk, Tensor lq, Tensor lk, "
      "float inv_temp, int offset, int tile, bool with_dscale=False) "
      "-> (Tensor loss, Tensor lse, Tensor dscale, Tensor count)");
  m.def(
      "labels_grad(Tensor a, Tensor b, Tensor na, Tensor nb, Tensor la, Tensor lb, "
      "Tensor? lse_a, Tensor? ga_a, Tensor? gp_a, Tensor? lse_b, Tensor? ga_b, Tensor? gp_b, "
      "float inv_temp, int offset, int tile) -> Tensor");
  m.def(
      "labels_sym_forward(Tensor z, Tensor nz, Tensor labels, float inv_temp, int tile, "
      "bool with_dscale=False) -> (Tensor loss, Tensor lse, Tensor dscale, Tensor count)");
  m.def(
      "labels_sym_grad(Tensor z, Tensor nz, Tensor labels, Tensor lse, Tensor ga, Tensor gp, "
      "float inv_temp, int tile) -> Tensor");
  // sigmoid.cpp: SigLIP's pairs (x images (n, D), y texts (m, D)); loss, dscale, dbias per row;
  // dx, dy empty (shape (0,)) unless with_grads (need_rows / need_cols).
  m.def(
      "sigmoid_forward(Tensor x, Tensor y, float scale, float bias, int? pos_offset, "
      "bool with_grads, int tile) -> (Tensor loss, Tensor dscale, Tensor dbias, Tensor dx, "
      "Tensor dy)");
  m.def(
      "sigmoid_grad(Tensor x, Tensor y, float scale, float bias, int? pos_offset, Tensor g, "
      "bool need_rows, bool need_cols, int tile) -> (Tensor, Tensor)");
  // dense.cpp: the materialized-logits path for small inputs (fastcl.kernels.cpp.DENSE_CAP_BYTES).
  m.def(
      "dense_forward(Tensor q, Tensor k, Tensor nq, Tensor nk, float inv_temp, int? pos_offset, "
      "bool positive_in_denominator, bool with_dscale, bool with_row_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dense_grad_cols(Tensor probs, Tensor g, Tensor q, Tensor nq, float inv_temp) -> Tensor");
  m.def(
      "dense_backward(Tensor probs, Tensor v, Tensor g, Tensor c, Tensor q, Tensor k, Tensor nq, "
      "Tensor nk, float inv_temp, bool need_rows, bool need_cols) -> (Tensor, Tensor)");
  m.def("ema_(Tensor(a!)[] targets, Tensor[] sources, Tensor momentum) -> ()");
  m.def("queue_push_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> ()");
  m.def("queue_push_eager_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> bool");
  m.def("cosine_forward(Tensor p, Tensor z) -> (Tensor, Tensor)");
  m.def("cosine_backward(Tensor g, Tensor p, Tensor z, Tensor stats) -> Tensor");
  // Row norms of bf16 rows without a float32 copy (bf16.h).
  m.def("row_norms(Tensor x, float eps) -> Tensor");
  // Whether the bf16 products take AMX's VNNI layout (bf16.h); `enable` sets its switch first.
  m.def("bf16_amx(bool? enable=None) -> bool", [](c10::optional<bool> enable) {
    if (enable.has_value()) fastcl::bf16::amx_switch().store(*enable);
    return fastcl::bf16::enabled() && fastcl::bf16::amx();
  });
  // Whether bf16 rows are multiplied as bf16 (csrc/bf16.h): built in, and the switch on;
  // `enable` sets the switch first (it cannot turn on what the build lacks).
  m.def("bf16_products(bool? enable=None) -> bool", [](c10::optional<bool> enable) {
    if (enable.has_value()) fastcl::bf16::switch_on().store(*enable);
    return fastcl::bf16::enabled();
  });
}

TORCH_LIBRARY_IMPL(fastcl_cpu, CPU, m) {
  m.impl("nt_xent_forward", &fastcl::nt_xent_forward);
  m.impl("nt_xent_grad", &fastcl::nt_xent_grad);
  m.impl("lse_forward", &fastcl::lse_forward);
  m.impl("grad_accumulate", &fastcl::grad_accumulate);
  m.impl("rows_cols_forward", &fastcl::rows_cols_forward);
  m.impl("rows_cols_grad", &fastcl::rows_cols_grad);
  m.impl("labels_forward", &fastcl::labels_forward);
  m.impl("labels_grad", &fastcl::labels_grad);
  m.impl("labels_sym_forward", &fastcl::labels_sym_forward);
  m.impl("labels_sym_grad", &fastcl::labels_sym_grad);
  m.impl("sigmoid_forward", &fastcl::sigmoid_forward);
  m.impl("sigmoid_grad", &fastcl::sigmoid_grad);
  m.impl("dense_forward", &fastcl::dense_forward);
  m.impl("dense_grad_cols", &fastcl::dense_grad_cols);
  m.impl("dense_backward", &fastcl::dense_backward);
  m.impl("ema_", &fastcl::ema_);
  m.impl("queue_push_", &fastcl::queue_push_);
  m.impl("cosine_forward", &fastcl::cosine_forward);
  m.impl("cosine_backward", &fastcl::cosine_backward);
  m.impl("row_norms", &fastcl::bf16::row_norms);
}

// Every backend, and the autograd keys too (no boxed autograd fallback on the way, which with
// cold caches costs more than the 128 KiB copy): the kernel answers false for what is not a
// dense CPU tensor, bumps the version counters itself and has nothing to differentiate.
TORCH_LIBRARY_IMPL(fastcl_cpu, CompositeImplicitAutograd, m) {
  m.impl("queue_push_eager_", &fastcl::queue_push_eager_);
}
