// Launchers of the CUDA kernels, on raw pointers: the .cu files need only the CUDA toolkit (no torch headers),
// so they compile with a minimal nvcc install; cuda_host.cpp adapts them to at::Tensor and the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cap {
namespace cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

cudaError_t masked_mul(DType dtype, const void* w, const void* m, void* out, int64_t n, cudaStream_t stream);
cudaError_t masked_grads(DType dtype, void* g, const void* w, const void* m, void* dm, int64_t n, bool want_w,
                         bool want_m, cudaStream_t stream);
// y[M, N] = xt^T @ W^T + b, with xt = x^T [K, M] contiguous and W [N, K] in CSR; needs ceil(N / 8) <= 65535.
cudaError_t csr_linear(DType dtype, const void* xt, int64_t M, const int* row_ptr, const int* col,
                       const void* val, const void* bias, int64_t N, void* y, cudaStream_t stream);

}  // namespace cuda
}  // namespace cap
