// Python bindings and device dispatch of cap_masked_gemm (see cap_ops.h). GEMMs go to ATen (MKL/oneDNN on CPU,
// cuBLAS on CUDA) exactly as F.linear's autograd does; our kernels do the masking and the sparse products.
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <cmath>
#include <tuple>

#include "cap_ops.h"

namespace cap {

namespace {

void check_pair(const at::Tensor& w, const at::Tensor& m) {
  TORCH_CHECK(w.sizes() == m.sizes(), "cap_masked_gemm: weight ", w.sizes(), " and mask ", m.sizes(),
              " differ in shape");
  TORCH_CHECK(w.scalar_type() == m.scalar_type(), "cap_masked_gemm: mask must be in the weight dtype");
  TORCH_CHECK(w.device() == m.device(), "cap_masked_gemm: weight and mask on different devices");
}

at::Tensor masked_weight(const at::Tensor& w_in, const at::Tensor& m_in) {
  check_pair(w_in, m_in);
  const at::Tensor w = w_in.contiguous(), m = m_in.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  if (w.is_cuda()) {
#ifdef CAP_WITH_CUDA
    masked_mul_cuda(w, m, out);
#else
    TORCH_CHECK(false, "cap_masked_gemm was built without CUDA");
#endif
  } else {
    masked_mul_cpu(w, m, out);
  }
  return out;
}

// y = x @ (W*M)^T + b. The masked weight is a temporary: it is not saved for the backward.
at::Tensor masked_linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& m,
                                 const std::optional<at::Tensor>& bias) {
  RECORD_FUNCTION("cap::masked_linear_forward", std::vector<c10::IValue>({x, w}));
  return at::linear(x, masked_weight(w, m), bias);
}

// Gradients of masked_linear_forward: [dx, dW, dM, db], None where not wanted.
std::vector<std::optional<at::Tensor>> masked_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& w_in, const at::Tensor& m_in,
                                                              bool want_x, bool want_w, bool want_m,
                                                              bool want_b) {
  RECORD_FUNCTION("cap::masked_linear_backward", std::vector<c10::IValue>({grad, x, w_in}));
  check_pair(w_in, m_in);
  const at::Tensor w = w_in.contiguous(), m = m_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor g2 = grad.reshape({-1, N});
  std::vector<std::optional<at::Tensor>> out(4);
  if (want_x) {
    // dx first, so that the masked-weight scratch is freed before the weight-shaped gradients exist.
    out[0] = g2.mm(masked_weight(w, m)).view(x.sizes());
  }
  if (want_w || want_m) {
    at::Tensor gw = g2.t().mm(x.reshape({-1, K}));  // [N, K] = g^T x, contiguous; becomes dW in place
    at::Tensor dm = want_m ? at::empty_like(gw) : at::Tensor();
    if (gw.is_cuda()) {
#ifdef CAP_WITH_CUDA
      masked_grads_cuda(gw, w, m, dm, want_w, want_m);
#else
      TORCH_CHECK(false, "cap_masked_gemm was built without CUDA");
#endif
    } else {
      masked_grads_cpu(gw, w, m, dm, want_w, want_m);
    }
    if (want_w) out[1] = gw;
    if (want_m) out[2] = dm;
  }
  if (want_b) out[3] = g2.sum(0);
  return out;
}

// A residual for the write-back: [tokens, out_features] in x's dtype and device, contiguous.
std::optional<at::Tensor> residual_for(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                       int64_t out_features) {
  if (!residual.has_value() || !residual->defined()) return std::nullopt;
  TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device() &&
                  residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == out_features,
              op, ": residual must be [tokens, out_features] in x's dtype and device");
  return residual->contiguous();
}

// The optional LayerNorm after the write-back, checked against x and out_features (errors name `op`).
LayerNormArgs layer_norm_for(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, std::optional<double> eps, int64_t out_features) {
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  if (!eps.has_value()) {
    TORCH_CHECK(!has_w && !has_b, op, ": ln_weight / ln_bias given without ln_eps (ln_eps turns the LayerNorm on)");
    return {};
  }
  TORCH_CHECK(std::isfinite(*eps) && *eps >= 0, op, ": ln_eps must be a finite number >= 0, got ", *eps);
  LayerNormArgs ln{std::nullopt, std::nullopt, eps};
  for (auto [t, name, out] : {std::tuple{&weight, "ln_weight", &ln.weight}, std::tuple{&bias, "ln_bias", &ln.bias}}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.device() == x.device() && v.numel() == out_features, op,
                ": ", name, " must be [out_features] in x's dtype and device");
    *out = v.contiguous();
  }
  return ln;
}

// One weight's CSR arrays, checked against x (errors name `op`); the bias made contiguous.
CsrArrays csr_arrays(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(row_ptr.device() == x.device() && col_idx.device() == x.device() && values.device() == x.device(),
              op, ": x and the CSR arrays must be on the same device");
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt, op, ": indices must be int32");
  TORCH_CHECK(row_ptr.is_contiguous() && col_idx.is_contiguous() && values.is_contiguous(),
              op, ": CSR arrays must be contiguous");
  TORCH_CHECK(row_ptr.numel() == out_features + 1, op, ": row_ptr must have out_features + 1 entries");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": x (", x.scalar_type(), ") and weight values (",
              values.scalar_type(), ") must have the same dtype");
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == out_features,
                op, ": bias must be [out_features] in x's dtype");
    b = bias->contiguous();
  }
  return CsrArrays{row_ptr, col_idx, values, b, out_features};
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features,
                      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& ln_weight,
                      const std::optional<at::Tensor>& ln_bias, std::optional<double> ln_eps) {
  RECORD_FUNCTION("cap::csr_linear", std::vector<c10::IValue>({x, values}));
  TORCH_CHECK(x.dim() == 2, "csr_linear: x must be 2-D [tokens, in_features]");
  const CsrArrays weight = csr_arrays("csr_linear", x, row_ptr, col_idx, values, bias, out_features);
  const std::optional<at::Tensor> res = residual_for("csr_linear", x, residual, out_features);
  const LayerNormArgs ln = layer_norm_for("csr_linear", x, ln_weight, ln_bias, ln_eps, out_features);
  if (x.is_cuda()) {
#ifdef CAP_WITH_CUDA
    at::Tensor y = csr_linear_cuda(x, row_ptr, col_idx, values, weight.bias, out_features);
    if (res.has_value()) y.add_(*res);
    return ln.eps.has_value() ? at::layer_norm(y, {out_features}, ln.weight, ln.bias, *ln.eps) : y;
#else
    TORCH_CHECK(false, "cap_masked_gemm was built without CUDA");
#endif
  }
  return csr_linear_cpu(x, weight, res, ln);
}

at::Tensor csr_ffn(const at::Tensor& x, const at::Tensor& row_ptr1, const at::Tensor& col_idx1,
                   const at::Tensor& values1, const std::optional<at::Tensor>& bias1, int64_t hidden_features,
                   int64_t activation, const at::Tensor& row_ptr2, const at::Tensor& col_idx2,
                   const at::Tensor& values2, const std::optional<at::Tensor>& bias2, int64_t out_features,
                   int64_t hidden_in, const std::optional<at::Tensor>& residual,
                   const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                   std::optional<double> ln_eps) {
  RECORD_FUNCTION("cap::csr_ffn", std::vector<c10::IValue>({x, values1, values2}));
  TORCH_CHECK(x.dim() == 2, "csr_ffn: x must be 2-D [tokens, in_features]");
  TORCH_CHECK(x.device().is_cpu(), "csr_ffn: CPU only (on CUDA run the two csr_linear calls)");
  TORCH_CHECK(hidden_in == hidden_features, "csr_ffn: the second weight takes ", hidden_in,
              " inputs but the first gives ", hidden_features);
  TORCH_CHECK(activation >= kActNone && activation <= kActRelu, "csr_ffn: activation code ", activation,
              " (0 none, 1 gelu, 2 relu)");
  const std::optional<at::Tensor> res = residual_for("csr_ffn", x, residual, out_features);
  return csr_ffn_cpu(x, csr_arrays("csr_ffn", x, row_ptr1, col_idx1, values1, bias1, hidden_features), activation,
                     csr_arrays("csr_ffn", x, row_ptr2, col_idx2, values2, bias2, out_features), res,
                     layer_norm_for("csr_ffn", x, ln_weight, ln_bias, ln_eps, out_features));
}

// One weight of csr_attention as Python passes it: (row_ptr, col_idx, values, bias or None, out_features,
// in_features).
using CsrTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, int64_t, int64_t>;

CsrArrays csr_arrays_of(const char* name, const at::Tensor& x, const CsrTuple& w, int64_t in_features) {
  const auto& [row_ptr, col_idx, values, bias, out_features, in] = w;
  TORCH_CHECK(in == in_features, "csr_attention: ", name, " takes ", in, " inputs, expected ", in_features);
  return csr_arrays("csr_attention", x, row_ptr, col_idx, values, bias, out_features);
}

at::Tensor csr_attention(const at::Tensor& x, int64_t batch, const CsrTuple& query, const CsrTuple& key,
                         const CsrTuple& value, const CsrTuple& out, int64_t heads, double scale,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                         std::optional<double> ln_eps) {
  RECORD_FUNCTION("cap::csr_attention", std::vector<c10::IValue>({x}));
  TORCH_CHECK(x.dim() == 2, "csr_attention: x must be 2-D [batch * seq, hidden]");
  TORCH_CHECK(x.device().is_cpu(), "csr_attention: CPU only");
  TORCH_CHECK(batch >= 1 && x.size(0) % batch == 0, "csr_attention: ", x.size(0), " rows are not ", batch,
              " sequences of equal length");
  const int64_t K = x.size(1), E = std::get<4>(query), S = x.size(0) / batch;
  const CsrArrays q = csr_arrays_of("query", x, query, K), k = csr_arrays_of("key", x, key, K),
                  v = csr_arrays_of("value", x, value, K), o = csr_arrays_of("out", x, out, E);
  TORCH_CHECK(k.out_features == E && v.out_features == E, "csr_attention: query, key and value must have the same "
              "out_features");
  TORCH_CHECK(heads >= 1 && E % heads == 0, "csr_attention: ", E, " features do not split into ", heads, " heads");
  TORCH_CHECK(std::isfinite(scale), "csr_attention: scale must be finite");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && (m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type()) &&
                    m.dim() == 4 && (m.size(0) == 1 || m.size(0) == batch) && (m.size(1) == 1 || m.size(1) == heads) &&
                    (m.size(2) == 1 || m.size(2) == S) && m.size(3) == S,
                "csr_attention: mask must be bool or x's dtype, [batch or 1, heads or 1, seq or 1, seq], got ",
                m.scalar_type(), " ", m.sizes());
  }
  const std::optional<at::Tensor> m =
      mask.has_value() && mask->defined() ? std::optional<at::Tensor>(*mask) : std::nullopt;
  return csr_attention_cpu(x, batch, q, k, v, o, heads, scale, m,
                           residual_for("csr_attention", x, residual, o.out_features),
                           layer_norm_for("csr_attention", x, ln_weight, ln_bias, ln_eps, o.out_features));
}

bool with_cuda() {
#ifdef CAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

}  // namespace cap

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cap_ds kernels: masked linear for pruning, CSR sparse linear for pruned inference";
  m.def("masked_weight", &cap::masked_weight, "W * M in one pass", py::arg("weight"), py::arg("mask"));
  m.def("masked_linear_forward", &cap::masked_linear_forward, "x @ (W*M)^T + b", py::arg("x"), py::arg("weight"),
        py::arg("mask"), py::arg("bias") = py::none());
  m.def("masked_linear_backward", &cap::masked_linear_backward, "[dx, dW, dM, db] of the masked linear",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("mask"), py::arg("want_x"), py::arg("want_w"),
        py::arg("want_m"), py::arg("want_b"));
  m.def("csr_linear", &cap::csr_linear, "LayerNorm(x @ W^T + b (+ residual)) with W in CSR (LayerNorm when ln_eps is set)",
        py::arg("x"), py::arg("row_ptr"), py::arg("col_idx"), py::arg("values"), py::arg("bias") = py::none(),
        py::arg("out_features"), py::arg("residual") = py::none(), py::arg("ln_weight") = py::none(),
        py::arg("ln_bias") = py::none(), py::arg("ln_eps") = py::none());
  m.def("csr_ffn", &cap::csr_ffn, "LayerNorm(act(x @ W1^T + b1) @ W2^T + b2 (+ residual)), both weights in CSR, fused per token tile (CPU)",
        py::arg("x"), py::arg("row_ptr1"), py::arg("col_idx1"), py::arg("values1"), py::arg("bias1"),
        py::arg("hidden_features"), py::arg("activation"), py::arg("row_ptr2"), py::arg("col_idx2"),
        py::arg("values2"), py::arg("bias2"), py::arg("out_features"), py::arg("hidden_in"),
        py::arg("residual") = py::none(), py::arg("ln_weight") = py::none(), py::arg("ln_bias") = py::none(),
        py::arg("ln_eps") = py::none());
  m.def("csr_attention", &cap::csr_attention,
        "LayerNorm(SDPA(x Wq^T + bq, x Wk^T + bk, x Wv^T + bv) Wo^T + bo (+ residual)), the four weights in CSR "
        "(each (row_ptr, col_idx, values, bias, out_features, in_features)), one sequence per task (CPU)",
        py::arg("x"), py::arg("batch"), py::arg("query"), py::arg("key"), py::arg("value"), py::arg("out"),
        py::arg("heads"), py::arg("scale"), py::arg("mask") = py::none(), py::arg("residual") = py::none(),
        py::arg("ln_weight") = py::none(), py::arg("ln_bias") = py::none(), py::arg("ln_eps") = py::none());
  m.def("set_cpu_threading", &cap::set_cpu_threading, "0 (default): CPU sparse kernels on ATen's OpenMP team, 1: on TaskPool",
        py::arg("mode"));
  m.def("with_cuda", &cap::with_cuda, "whether the CUDA kernels were compiled in");
}
