// CUDA sparse linear (unstructured): y[M, N] = x[M, K] @ W^T + b with W [N, K] in CSR (int32 indices).
//
// The caller transposes x once to xt [K, M] so that, for a nonzero (n, k), the 32 lanes of a warp read 32
// consecutive tokens of xt[k, :] (coalesced). One warp owns one output feature n and kPerLane*32 tokens; the
// row's (k, w) pairs are read 32 at a time (one per lane) and broadcast with shuffles. The block's results go
// through shared memory so that y is written kRows consecutive features per token. Math in float.
// 2:4 weights take torch's semi-structured path instead (see cap_ds/sparse.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cap_cuda.h"
#include "cuda_types.cuh"

namespace cap {
namespace cuda {

namespace {

constexpr int kRows = 8;     // warps per block = output features per block
constexpr int kPerLane = 4;  // tokens per lane
constexpr int kTokens = 32 * kPerLane;

template <typename T>
__global__ void __launch_bounds__(kRows * 32)
    csr_linear_kernel(const T* __restrict__ xt, int64_t M, const int* __restrict__ row_ptr,
                      const int* __restrict__ col, const T* __restrict__ val, const T* __restrict__ bias,
                      int64_t N, T* __restrict__ y) {
  __shared__ float tile[kTokens][kRows + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t n = n0 + warp;
  float acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc[t] = 0.f;

  if (n < N) {  // uniform per warp: full-mask shuffles are safe
    const int p0 = row_ptr[n], p1 = row_ptr[n + 1];
    for (int base = p0; base < p1; base += 32) {
      const int p = base + lane;
      int c = 0;
      float v = 0.f;
      if (p < p1) {
        c = col[p];
        v = to_float(val[p]);
      }
      const int cnt = min(32, p1 - base);
      for (int j = 0; j < cnt; ++j) {
        const int cj = __shfl_sync(0xffffffffu, c, j);
        const float vj = __shfl_sync(0xffffffffu, v, j);
        const T* xr = xt + static_cast<int64_t>(cj) * M + m0 + lane;
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
          if (m0 + lane + 32 * t < M) acc[t] += vj * to_float(xr[32 * t]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) tile[lane + 32 * t][warp] = acc[t];
  __syncthreads();
  for (int e = threadIdx.x; e < kTokens * kRows; e += blockDim.x) {
    const int tok = e / kRows, r = e % kRows;
    const int64_t m = m0 + tok, nn = n0 + r;
    if (m < M && nn < N) {
      const float b = bias != nullptr ? to_float(bias[nn]) : 0.f;
      y[m * N + nn] = from_float<T>(tile[tok][r] + b);
    }
  }
}

template <typename T>
cudaError_t launch(const void* xt, int64_t M, const int* row_ptr, const int* col, const void* val,
                   const void* bias, int64_t N, void* y, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + kTokens - 1) / kTokens), static_cast<unsigned>((N + kRows - 1) / kRows));
  csr_linear_kernel<T><<<grid, kRows * 32, 0, stream>>>(static_cast<const T*>(xt), M, row_ptr, col,
                                                       static_cast<const T*>(val), static_cast<const T*>(bias), N,
                                                       static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t csr_linear(DType dtype, const void* xt, int64_t M, const int* row_ptr, const int* col,
                       const void* val, const void* bias, int64_t N, void* y, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if ((N + kRows - 1) / kRows > 65535) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kHalf: return launch<__half>(xt, M, row_ptr, col, val, bias, N, y, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(xt, M, row_ptr, col, val, bias, N, y, stream);
    default: return launch<float>(xt, M, row_ptr, col, val, bias, N, y, stream);
  }
}

}  // namespace cuda
}  // namespace cap
