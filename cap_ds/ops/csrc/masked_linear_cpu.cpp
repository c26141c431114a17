// CPU elementwise kernels of the training masked linear: W*M into a scratch buffer, and the fused gradient pass
// dW = G*M, dM = G*W over G = g^T x (one read of G, W and M instead of two separate multiplies).
#include <ATen/Parallel.h>

#include "cap_ops.h"

namespace cap {

namespace {

constexpr int64_t kGrain = 1 << 15;

// Same rounding as ATen's mul: reduced precision types are multiplied in float and rounded once.
template <typename T>
inline T mul(T a, T b) {
  return static_cast<T>(static_cast<float>(a) * static_cast<float>(b));
}
template <>
inline float mul<float>(float a, float b) {
  return a * b;
}

template <typename T>
void mul_kernel(const T* __restrict__ w, const T* __restrict__ m, T* __restrict__ out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) out[i] = mul(w[i], m[i]);
  });
}

template <typename T>
void grads_kernel(T* __restrict__ g, const T* __restrict__ w, const T* __restrict__ m, T* __restrict__ dm,
                  int64_t n, bool want_w, bool want_m) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if (want_m && want_w) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) {
        const T gi = g[i];
        dm[i] = mul(gi, w[i]);
        g[i] = mul(gi, m[i]);
      }
    } else if (want_m) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) dm[i] = mul(g[i], w[i]);
    } else if (want_w) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) g[i] = mul(g[i], m[i]);
    }
  });
}

}  // namespace

void masked_mul_cpu(const at::Tensor& w, const at::Tensor& m, at::Tensor& out) {
  const int64_t n = w.numel();
  switch (w.scalar_type()) {
    case at::kFloat:
      return mul_kernel(w.const_data_ptr<float>(), m.const_data_ptr<float>(), out.data_ptr<float>(), n);
    case at::kBFloat16:
      return mul_kernel(w.const_data_ptr<at::BFloat16>(), m.const_data_ptr<at::BFloat16>(),
                        out.data_ptr<at::BFloat16>(), n);
    case at::kHalf:
      return mul_kernel(w.const_data_ptr<at::Half>(), m.const_data_ptr<at::Half>(), out.data_ptr<at::Half>(), n);
    default: out.copy_(w * m);  // float64 and friends: ATen itself
  }
}

void masked_grads_cpu(at::Tensor& g, const at::Tensor& w, const at::Tensor& m, at::Tensor& dm_out, bool want_w,
                      bool want_m) {
  const int64_t n = g.numel();
  switch (g.scalar_type()) {
    case at::kFloat:
      return grads_kernel(g.data_ptr<float>(), w.const_data_ptr<float>(), m.const_data_ptr<float>(),
                          want_m ? dm_out.data_ptr<float>() : nullptr, n, want_w, want_m);
    case at::kBFloat16:
      return grads_kernel(g.data_ptr<at::BFloat16>(), w.const_data_ptr<at::BFloat16>(),
                          m.const_data_ptr<at::BFloat16>(), want_m ? dm_out.data_ptr<at::BFloat16>() : nullptr,
                          n, want_w, want_m);
    case at::kHalf:
      return grads_kernel(g.data_ptr<at::Half>(), w.const_data_ptr<at::Half>(), m.const_data_ptr<at::Half>(),
                          want_m ? dm_out.data_ptr<at::Half>() : nullptr, n, want_w, want_m);
    default:
      if (want_m) dm_out.copy_(g * w);
      if (want_w) g.mul_(m);
  }
}

}  // namespace cap
