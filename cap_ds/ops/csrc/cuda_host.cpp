// at::Tensor adapters of the CUDA launchers (built only with CUDA): device guard, current stream, dtype, checks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cap_cuda.h"
#include "cap_ops.h"

namespace cap {

namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "cap_masked_gemm CUDA kernels support float32, float16 and bfloat16, not ",
                         t.scalar_type());
  }
}

void check(cudaError_t err) { C10_CUDA_CHECK(err); }

}  // namespace

void masked_mul_cuda(const at::Tensor& w, const at::Tensor& m, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(w.device());
  check(cuda::masked_mul(dtype_of(w), w.const_data_ptr(), m.const_data_ptr(), out.data_ptr(), w.numel(),
                         c10::cuda::getCurrentCUDAStream()));
}

void masked_grads_cuda(at::Tensor& g, const at::Tensor& w, const at::Tensor& m, at::Tensor& dm_out, bool want_w,
                       bool want_m) {
  const c10::cuda::CUDAGuard guard(g.device());
  check(cuda::masked_grads(dtype_of(g), g.data_ptr(), w.const_data_ptr(), m.const_data_ptr(),
                           want_m ? dm_out.data_ptr() : nullptr, g.numel(), want_w, want_m,
                           c10::cuda::getCurrentCUDAStream()));
}

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                           const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(row_ptr.device() == x.device() && col_idx.device() == x.device() && values.device() == x.device(),
              "csr_linear: CSR arrays must be on ", x.device());
  TORCH_CHECK((out_features + 7) / 8 <= 65535, "csr_linear: out_features too large for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = out_features;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xt = x.t().contiguous();  // [K, M]: coalesced token reads per nonzero
  const void* pb = (bias.has_value() && bias->defined()) ? bias->const_data_ptr() : nullptr;
  check(cuda::csr_linear(dtype_of(x), xt.const_data_ptr(), M, row_ptr.const_data_ptr<int>(),
                         col_idx.const_data_ptr<int>(), values.const_data_ptr(), pb, N, y.data_ptr(),
                         c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace cap
