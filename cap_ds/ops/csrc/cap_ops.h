// cap_masked_gemm: kernels for CAP pruning (training masked linear) and pruned-model inference (sparse linear).
//
// Training:  y = x @ (W*M)^T + b, with the backward returning dx = g @ (W*M), dW = (g^T x) * M and
//            dM = (g^T x) * W (straight-through to the mask scores). W*M is never kept between forward and
//            backward; the two weight-shaped gradients come out of one fused pass over g^T x.
// Inference: y = x @ W^T + b with W [N, K] stored as CSR (int32 row_ptr/col_idx, values in W's dtype).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace cap {

// ---- device kernels (elementwise, contiguous inputs of equal shape and dtype)
void masked_mul_cpu(const at::Tensor& w, const at::Tensor& m, at::Tensor& out);
// g holds g^T x on entry; afterwards g = g*m (dW) when want_w, and dm_out = g_in * w when want_m.
void masked_grads_cpu(at::Tensor& g, const at::Tensor& w, const at::Tensor& m, at::Tensor& dm_out, bool want_w,
                      bool want_m);
// A CSR weight as the ops take it (int32 row_ptr [out + 1] and col_idx [nnz], values [nnz], optional bias [out]).
struct CsrArrays {
  at::Tensor row_ptr, col_idx, values;
  std::optional<at::Tensor> bias;
  int64_t out_features;
};
// An optional LayerNorm over the output features, after the bias and the residual: none unless eps is set;
// weight and bias (each optional) contiguous [out_features] in x's dtype.
struct LayerNormArgs {
  std::optional<at::Tensor> weight, bias;
  std::optional<double> eps;
};
// y = LN(x @ W^T + b (+ residual)): residual nullopt or contiguous [tokens, out_features], added in the
// write-back; LN (when set) on each tile's rows while they are in cache.
at::Tensor csr_linear_cpu(const at::Tensor& x, const CsrArrays& weight, const std::optional<at::Tensor>& residual,
                          const LayerNormArgs& layer_norm);
// The activation between a fused FFN's two products: none, exact (erf) GELU, ReLU.
constexpr int64_t kActNone = 0, kActGelu = 1, kActRelu = 2;
// y = LN(act(x @ W1^T + b1) @ W2^T + b2 (+ residual, contiguous [tokens, out])) with both weights in CSR, one
// token tile at a time: the [tokens, hidden] intermediate never leaves the core's cache.
at::Tensor csr_ffn_cpu(const at::Tensor& x, const CsrArrays& first, int64_t activation, const CsrArrays& second,
                       const std::optional<at::Tensor>& residual, const LayerNormArgs& layer_norm);
// A BERT-style self-attention block, its four weights in CSR (CPU): x [batch * seq, hidden] (seq = rows / batch),
// y = LN(SDPA(x Wq^T + bq, x Wk^T + bk, x Wv^T + bv; heads, scale, mask) Wo^T + bo (+ residual)). mask: as SDPA
// takes it ([batch or 1, heads or 1, seq or 1, seq], bool or additive in x's dtype) or nullopt.
at::Tensor csr_attention_cpu(const at::Tensor& x, int64_t batch, const CsrArrays& query, const CsrArrays& key,
                             const CsrArrays& value, const CsrArrays& out, int64_t heads, double scale,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& residual,
                             const LayerNormArgs& layer_norm);
// Who runs the CPU sparse kernels' tasks: 0 = ATen's OpenMP team (default), 1 = cap_ds's TaskPool.
void set_cpu_threading(int64_t mode);

#ifdef CAP_WITH_CUDA
void masked_mul_cuda(const at::Tensor& w, const at::Tensor& m, at::Tensor& out);
void masked_grads_cuda(at::Tensor& g, const at::Tensor& w, const at::Tensor& m, at::Tensor& dm_out, bool want_w,
                       bool want_m);
at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                           const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features);
#endif

}  // namespace cap
