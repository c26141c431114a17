// CUDA elementwise kernels of the training masked linear (see masked_linear_cpu.cpp): W*M into a scratch buffer,
// and the fused dW = G*M, dM = G*W pass over G = g^T x. Grid-stride loops; math in float, one rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cap_cuda.h"
#include "cuda_types.cuh"

namespace cap {
namespace cuda {

namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 8 ? b : 65535 * 8);
}

template <typename T>
__global__ void masked_mul_kernel(const T* __restrict__ w, const T* __restrict__ m, T* __restrict__ out,
                                  int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_float<T>(to_float(w[i]) * to_float(m[i]));
  }
}

template <typename T>
__global__ void masked_grads_kernel(T* __restrict__ g, const T* __restrict__ w, const T* __restrict__ m,
                                    T* __restrict__ dm, int64_t n, bool want_w, bool want_m) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = to_float(g[i]);
    if (want_m) dm[i] = from_float<T>(gi * to_float(w[i]));
    if (want_w) g[i] = from_float<T>(gi * to_float(m[i]));
  }
}

template <typename T>
cudaError_t launch_mul(const void* w, const void* m, void* out, int64_t n, cudaStream_t stream) {
  masked_mul_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T*>(w), static_cast<const T*>(m),
                                                               static_cast<T*>(out), n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grads(void* g, const void* w, const void* m, void* dm, int64_t n, bool want_w, bool want_m,
                         cudaStream_t stream) {
  masked_grads_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<T*>(g), static_cast<const T*>(w), static_cast<const T*>(m), static_cast<T*>(dm), n, want_w,
      want_m);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_mul(DType dtype, const void* w, const void* m, void* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kHalf: return launch_mul<__half>(w, m, out, n, stream);
    case DType::kBFloat16: return launch_mul<__nv_bfloat16>(w, m, out, n, stream);
    default: return launch_mul<float>(w, m, out, n, stream);
  }
}

cudaError_t masked_grads(DType dtype, void* g, const void* w, const void* m, void* dm, int64_t n, bool want_w,
                         bool want_m, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kHalf: return launch_grads<__half>(g, w, m, dm, n, want_w, want_m, stream);
    case DType::kBFloat16: return launch_grads<__nv_bfloat16>(g, w, m, dm, n, want_w, want_m, stream);
    default: return launch_grads<float>(g, w, m, dm, n, want_w, want_m, stream);
  }
}

}  // namespace cuda
}  // namespace cap
