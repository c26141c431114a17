// Vector helpers the CPU kernels share (spmm_cpu.cpp, softmax_attention.h): 16-float vectors as GCC vector
// extensions (one zmm with -march supporting AVX-512, two ymm on AVX2, NEON on ARM), loads and stores, the
// in-register 16x16 transpose, a lane sum and an exp for non-positive arguments.
#pragma once

#include <cstdint>
#include <type_traits>

namespace cap {
namespace {

typedef float vf __attribute__((vector_size(64)));  // 16 floats: one zmm on AVX-512, two ymm on AVX2
constexpr int64_t kLanes = 16;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }

typedef int vi __attribute__((vector_size(64)));

// In-register 16x16 transpose: four rounds swapping bit b of the row and column index (b = 1, 2, 4, 8).
template <int B>
inline void swap_round(vf* r) {
  constexpr vi lo = {0 & B ? 16 + 0 - B : 0, 1 & B ? 16 + 1 - B : 1, 2 & B ? 16 + 2 - B : 2,
                     3 & B ? 16 + 3 - B : 3, 4 & B ? 16 + 4 - B : 4, 5 & B ? 16 + 5 - B : 5,
                     6 & B ? 16 + 6 - B : 6, 7 & B ? 16 + 7 - B : 7, 8 & B ? 16 + 8 - B : 8,
                     9 & B ? 16 + 9 - B : 9, 10 & B ? 16 + 10 - B : 10, 11 & B ? 16 + 11 - B : 11,
                     12 & B ? 16 + 12 - B : 12, 13 & B ? 16 + 13 - B : 13, 14 & B ? 16 + 14 - B : 14,
                     15 & B ? 16 + 15 - B : 15};
  constexpr vi hi = {0 & B ? 16 + 0 : 0 + B, 1 & B ? 16 + 1 : 1 + B, 2 & B ? 16 + 2 : 2 + B,
                     3 & B ? 16 + 3 : 3 + B, 4 & B ? 16 + 4 : 4 + B, 5 & B ? 16 + 5 : 5 + B,
                     6 & B ? 16 + 6 : 6 + B, 7 & B ? 16 + 7 : 7 + B, 8 & B ? 16 + 8 : 8 + B,
                     9 & B ? 16 + 9 : 9 + B, 10 & B ? 16 + 10 : 10 + B, 11 & B ? 16 + 11 : 11 + B,
                     12 & B ? 16 + 12 : 12 + B, 13 & B ? 16 + 13 : 13 + B, 14 & B ? 16 + 14 : 14 + B,
                     15 & B ? 16 + 15 : 15 + B};
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const vf a = r[i], b = r[i + B];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + B] = __builtin_shuffle(a, b, hi);
  }
}

inline void transpose16(vf* r) {
  swap_round<1>(r);
  swap_round<2>(r);
  swap_round<4>(r);
  swap_round<8>(r);
}

inline vf loadu(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }

// 16 consecutive (stride sk) entries of x as floats; `count` < 16 zero-fills the rest.
template <typename scalar_t>
inline vf load_x(const scalar_t* src, int64_t sk, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sk == 1 && count == kLanes) return loadu(src);
  }
  alignas(64) float tmp[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) tmp[k] = k < count ? static_cast<float>(src[k * sk]) : 0.f;
  return load(tmp);
}

// The sum of a vector's 16 lanes: a tree of shuffles (4 dependent adds instead of 16).
inline float lane_sum(vf v) {
  v += __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// exp(a) for a <= 0 (below -87 taken as -87: ~1.6e-38): a = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), a
// degree-7 Taylor polynomial in r (relative error < 1e-8 before rounding), 2^n put into the exponent bits.
inline vf exp_nonpositive(vf a) {
  a = a < -87.f ? vf{} - 87.f : a;
  const vf magic = vf{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (a * 1.44269504088896341f + magic) - magic;
  const vf r = (a - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf p = vf{} + 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

}  // namespace
}  // namespace cap
