// Softmax attention on the CPU in fp32, for csr_attention (spmm_cpu.cpp): one sequence's heads at a time.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "cpu_vec.h"

namespace cap {
namespace {

// ---- softmax attention for one sequence's heads, fp32 in registers (head size a multiple of 16, at most 128)
//
// Why our own: ATen's CPU flash SDPA runs MiniLM's heads (32 wide) at about half of what the FMA units give,
// and it is a quarter to a third of a 90 %-sparse forward. Per head: K^T packed to fp32 through 16 x 16 register
// transposes (S x D floats, in L1/L2; V is read in place, or widened once for half types), then per block of
// query rows the scores over all S keys (exact softmax, two passes over a row of S floats, no online
// rescaling), and P V. Scores: 4 query rows x 64 keys of accumulators per step of d; P V: 16 / (D / 16) rows x D
// outputs.

// An attention mask as SDPA takes it, [batch|1, heads|1, seq|1, seq], bool (false: masked) or additive.
struct MaskView {
  const void* data = nullptr;  // nullptr: none
  bool is_bool = false;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;  // element strides, 0 on broadcast dimensions
};

inline MaskView mask_view(const std::optional<at::Tensor>& mask) {
  MaskView m;
  if (!mask.has_value()) return m;
  const at::Tensor& t = *mask;
  m.data = t.const_data_ptr();
  m.is_bool = t.scalar_type() == at::kBool;
  m.sb = t.size(0) == 1 ? 0 : t.stride(0);
  m.sh = t.size(1) == 1 ? 0 : t.stride(1);
  m.si = t.size(2) == 1 ? 0 : t.stride(2);
  m.sj = t.stride(3);
  return m;
}

constexpr int64_t kScoreRows = 4, kScoreVecs = 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// sc[r][j0 .. j0 + NVJ*16) = sum_d q[r][d] * kt[d][j] for the kScoreRows rows of q (fp32, scaled, D each).
template <int NVJ>
inline void score_block(const float* q, int64_t D, const float* kt, int64_t Sp, int64_t j0, float* sc) {
  vf a[kScoreRows][NVJ];
  for (int r = 0; r < kScoreRows; ++r)
    for (int v = 0; v < NVJ; ++v) a[r][v] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf k[NVJ];
    for (int v = 0; v < NVJ; ++v) k[v] = load(kt + d * Sp + j0 + v * kLanes);
    for (int r = 0; r < kScoreRows; ++r) {
      const float qv = q[r * D + d];
      for (int v = 0; v < NVJ; ++v) a[r][v] += qv * k[v];
    }
  }
  for (int r = 0; r < kScoreRows; ++r)
    for (int v = 0; v < NVJ; ++v) store(sc + r * Sp + j0 + v * kLanes, a[r][v]);
}

// out rows (stride ldo) = p rows (Sp floats each, the softmax numerators) @ v ([S][D] fp32, row stride ldv) * inv[r].
template <int NVD, typename scalar_t>
inline void pv_block(const float* p, int64_t Sp, int64_t S, int64_t nrows, const float* vp, int64_t ldv,
                     const float* inv, scalar_t* out, int64_t ldo) {
  constexpr int R = 16 / NVD;
  vf a[R][NVD];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NVD; ++v) a[r][v] = vf{};
  for (int64_t j = 0; j < S; ++j) {
    vf x[NVD];
    for (int v = 0; v < NVD; ++v) x[v] = loadu(vp + j * ldv + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * Sp + j];
      for (int v = 0; v < NVD; ++v) a[r][v] += pr * x[v];
    }
  }
  for (int r = 0; r < nrows; ++r) {
    for (int v = 0; v < NVD; ++v) {
      const vf o = a[r][v] * inv[r];
      if constexpr (std::is_same_v<scalar_t, float>) {
        storeu(out + r * ldo + v * kLanes, o);
      } else {
        for (int64_t i = 0; i < kLanes; ++i) out[r * ldo + v * kLanes + i] = static_cast<scalar_t>(o[i]);
      }
    }
  }
}

inline float lane_max(vf v) {
  for (int i = 0; i < kLanes; ++i) v[0] = std::max(v[0], v[i]);
  return v[0];
}

// Floats of work memory attention_head needs: K^T and V packed, and one block of score rows.
inline int64_t attention_work(int64_t S, int64_t D) {
  const int64_t Sp = round_up(S, kLanes);
  return 2 * Sp * D + 16 * Sp + 16 * D + 16;
}

// ctx[i, h*D .. (h+1)*D) for every query i of one sequence's head h: q, k, v rows in buf (row stride ld, q at
// column h*D, k at E + h*D, v at 2E + h*D); ctx row stride ldc. work: attention_work(S, D) floats, 64-byte aligned.
template <int NVD, typename scalar_t>
void attention_head(const scalar_t* buf, int64_t S, int64_t E, int64_t ld, int64_t h, float scale,
                    const MaskView& mask, int64_t b, scalar_t* ctx, int64_t ldc, float* work) {
  constexpr int64_t D = NVD * kLanes;
  constexpr int R = 16 / NVD;  // query rows per block (P V's register block)
  const int64_t Sp = round_up(S, kLanes);
  float* kt = work;             // [D][Sp], zero past S
  float* vp = kt + D * Sp;      // [S][D]: V widened to fp32 (half types)
  float* sc = vp + Sp * D;      // [R rounded up to kScoreRows][Sp]
  float* qf = sc + 16 * Sp;     // [R][D]: this block's queries, fp32, times the scale
  float* inv = qf + 16 * D;     // [R]
  const scalar_t *qs = buf + h * D, *ks = buf + E + h * D, *vs = buf + 2 * E + h * D;
  // K^T through 16 x 16 register transposes; V used in place when it is fp32, else widened once.
  vf t[kLanes];
  for (int64_t j0 = 0; j0 < Sp; j0 += kLanes) {
    for (int v = 0; v < NVD; ++v) {
      for (int64_t i = 0; i < kLanes; ++i) t[i] = j0 + i < S ? load_x(ks + (j0 + i) * ld + v * kLanes, 1, kLanes) : vf{};
      transpose16(t);  // t[d] = keys j0..j0+15 of feature v*16 + d
      for (int64_t d = 0; d < kLanes; ++d) store(kt + (v * kLanes + d) * Sp + j0, t[d]);
    }
  }
  const float* vsrc;
  int64_t ldv;
  if constexpr (std::is_same_v<scalar_t, float>) {
    vsrc = vs;
    ldv = ld;
  } else {
    for (int64_t j = 0; j < S; ++j)
      for (int v = 0; v < NVD; ++v) store(vp + j * D + v * kLanes, load_x(vs + j * ld + v * kLanes, 1, kLanes));
    vsrc = vp;
    ldv = D;
  }
  const char* mbase = static_cast<const char*>(mask.data);
  for (int64_t i0 = 0; i0 < S; i0 += R) {
    const int64_t nr = std::min<int64_t>(R, S - i0);
    for (int64_t r = 0; r < std::max<int64_t>(R, kScoreRows); ++r)
      for (int v = 0; v < NVD; ++v)
        store(qf + r * D + v * kLanes, r < nr ? load_x(qs + (i0 + r) * ld + v * kLanes, 1, kLanes) * scale : vf{});
    for (int64_t r0 = 0; r0 < R; r0 += kScoreRows) {
      int64_t j0 = 0;
      for (; j0 + kScoreVecs * kLanes <= Sp; j0 += kScoreVecs * kLanes)
        score_block<kScoreVecs>(qf + r0 * D, D, kt, Sp, j0, sc + r0 * Sp);
      switch ((Sp - j0) / kLanes) {
        case 1: score_block<1>(qf + r0 * D, D, kt, Sp, j0, sc + r0 * Sp); break;
        case 2: score_block<2>(qf + r0 * D, D, kt, Sp, j0, sc + r0 * Sp); break;
        case 3: score_block<3>(qf + r0 * D, D, kt, Sp, j0, sc + r0 * Sp); break;
        default: break;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* row = sc + r * Sp;
      if (r >= nr) {  // past the last query: a zero row, never written out
        std::fill(row, row + Sp, 0.f);
        inv[r] = 0.f;
        continue;
      }
      for (int64_t j = S; j < Sp; ++j) row[j] = kNegInf;
      if (mbase != nullptr) {
        const int64_t off = b * mask.sb + h * mask.sh + (i0 + r) * mask.si;
        if (mask.is_bool) {
          const bool* m = reinterpret_cast<const bool*>(mbase) + off;
          for (int64_t j = 0; j < S; ++j) row[j] = m[j * mask.sj] ? row[j] : kNegInf;
        } else {
          const scalar_t* m = reinterpret_cast<const scalar_t*>(mbase) + off;
          for (int64_t j = 0; j < S; ++j) row[j] += static_cast<float>(m[j * mask.sj]);
        }
      }
      vf mx = vf{} + kNegInf;
      for (int64_t j = 0; j < Sp; j += kLanes) {
        const vf v = load(row + j);
        mx = v > mx ? v : mx;
      }
      const float m = lane_max(mx);
      if (m == kNegInf) {  // every key masked: a zero output row (SDPA's CPU kernel gives the same)
        std::fill(row, row + Sp, 0.f);
        inv[r] = 0.f;
        continue;
      }
      vf sum{};
      for (int64_t j = 0; j < Sp; j += kLanes) {
        const vf e = exp_nonpositive(load(row + j) - m);
        store(row + j, e);
        sum += e;
      }
      inv[r] = 1.f / lane_sum(sum);
    }
    pv_block<NVD>(sc, Sp, S, nr, vsrc, ldv, inv, ctx + i0 * ldc + h * D, ldc);
  }
}

// Heads [h0, h1) of sequence b (buf and ctx at that sequence's first row).
template <typename scalar_t>
void attention_heads(const scalar_t* buf, int64_t S, int64_t E, int64_t D, int64_t ld, float scale,
                     const MaskView& mask, int64_t b, int64_t h0, int64_t h1, scalar_t* ctx, int64_t ldc,
                     float* work) {
  for (int64_t h = h0; h < h1; ++h) {
    switch (D / kLanes) {
      case 1: attention_head<1>(buf, S, E, ld, h, scale, mask, b, ctx, ldc, work); break;
      case 2: attention_head<2>(buf, S, E, ld, h, scale, mask, b, ctx, ldc, work); break;
      case 4: attention_head<4>(buf, S, E, ld, h, scale, mask, b, ctx, ldc, work); break;
      default: attention_head<8>(buf, S, E, ld, h, scale, mask, b, ctx, ldc, work); break;
    }
  }
}

// Our attention kernel for this head size, unless CAP_DS_ATTENTION=aten asks for ATen's SDPA (to compare; read
// on every call).
inline bool own_attention(int64_t D) {
  const char* env = std::getenv("CAP_DS_ATTENTION");
  if (env != nullptr && std::string(env) == "aten") return false;
  return D == 16 || D == 32 || D == 64 || D == 128;
}

}  // namespace
}  // namespace cap
