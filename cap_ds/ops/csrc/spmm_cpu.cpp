// CPU sparse linear: y[M, N] = x[M, K] @ W^T + b with W [N, K] in CSR (int32 indices).
//
// Why this layout: a dot product of a sparse row of W with a token would gather x at random k's. Instead x is
// packed into fp32 tiles of T = 32 or 64 tokens (kTile) laid out [K][T] (x^T per tile, transposed 16x16 in
// registers), so every nonzero (n, k) becomes an axpy  acc[0:T] += W[n,k] * xt[k, 0:T]  over contiguous, aligned
// memory: two or four 16-wide FMAs, accumulators in registers, one broadcast per nonzero. A tile of x^T
// (K*T*4 bytes) stays in L1 or L2 while all rows sweep it. Each block of 16 rows is accumulated in a small L1
// buffer and written back transposed (16 consecutive outputs per token, 16x16 in registers), with the bias
// added there (and a residual, when given). A short input gets narrower tiles (16 or 32 tokens), one per thread.
// csr_ffn chains two products per tile: the first writes its rows straight into a [N][T] tile (the packed layout
// the second one reads), the activation runs on it there, and only the second product is written back.
// csr_attention runs a BERT attention block per sequence: the three products into one buffer in cache, softmax
// attention on it (softmax_attention.h), the output product with the residual and the LayerNorm.
// Vectors are GCC vector extensions (cpu_vec.h): zmm with -march supporting AVX-512, ymm pairs on AVX2, NEON on ARM.
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cap_ops.h"
#include "cpu_vec.h"
#include "softmax_attention.h"
#include "task_pool.h"

namespace cap {

namespace {

// Tokens per tile (2 or 4 vectors), fixed at load: 32 where the L1 data cache holds 48 KiB or more, else 64. The
// tile of x^T (K * tile * 4 bytes) is what every nonzero reads from: at 32 tokens MiniLM's K = 384 tile (48 KiB)
// sits in such an L1, and on the AMX Xeon (48 KiB) 32 measured 4-25 % faster than 64 for MiniLM's and BERT-base's
// shapes at 128-4,096 tokens, 2 threads (2026-12-06); on the EPYC VM (32 KiB) 64 had measured best (32, 128 slower).
// CAP_DS_CSR_TILE=32 or 64 overrides (tests run both).
int64_t pick_tile() {
  if (const char* env = std::getenv("CAP_DS_CSR_TILE")) {
    const std::string v(env);
    if (v == "32" || v == "64") return std::stoi(v);
  }
#ifdef _SC_LEVEL1_DCACHE_SIZE
  const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  if (l1 >= 48 * 1024) return 32;
#endif
  return 64;
}
const int64_t kTile = pick_tile();
constexpr int64_t kRowBlock = 16;  // output features accumulated before the transposed write-back

// One CSR weight as the kernels' loops take it.
template <typename scalar_t>
struct CsrWeight {
  const int32_t* row_ptr;
  const int32_t* col;
  const scalar_t* val;
  const scalar_t* bias;  // nullptr: none
  int64_t n;             // rows (out features)
};

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
CsrWeight<scalar_t> weight_of(const CsrArrays& a) {
  return {a.row_ptr.const_data_ptr<int32_t>(), a.col_idx.const_data_ptr<int32_t>(),
          a.values.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(a.bias), a.out_features};
}

inline int64_t tile_width(int64_t M, int64_t m0, int64_t T) { return std::min(T, round_up(M - m0, kLanes)); }

// Packs tokens mg..mg+15, columns k0..k1 of x (any strides) into the fp32 tile of the T tokens from m0 (mg is
// one of them): tile[k * w + i] = x[m0 + i, k], w = tile width (a multiple of 16, zero padded). 16x16 transposes.
template <typename scalar_t>
void pack_group(const scalar_t* x, int64_t M, int64_t sm, int64_t sk, int64_t mg, int64_t k0, int64_t k1,
                float* tile, int64_t T) {
  const int64_t m0 = mg / T * T, w = tile_width(M, m0, T), i0 = mg - m0;
  vf r[kLanes];
  for (int64_t kk = k0; kk < k1; kk += kLanes) {
    const int64_t kc = std::min(kLanes, k1 - kk);
    for (int64_t i = 0; i < kLanes; ++i) r[i] = mg + i < M ? load_x(x + (mg + i) * sm + kk * sk, sk, kc) : vf{};
    transpose16(r);  // r[k] = tokens mg..mg+15 of column kk+k
    for (int64_t k = 0; k < kc; ++k) store(tile + (kk + k) * w + i0, r[k]);
  }
}

// Packs the T tokens from m0 (all K columns; fewer at the end of x) into their fp32 tile.
template <typename scalar_t>
void pack_tile(const scalar_t* x, int64_t M, int64_t sm, int64_t sk, int64_t K, int64_t m0, float* tile, int64_t T) {
  for (int64_t mg = m0; mg < std::min(M, m0 + T); mg += kLanes) pack_group(x, M, sm, sk, mg, 0, K, tile, T);
}

// a[0 : NV] += sum over p in [p0, p1) of val[p] * xt[idx[p], 0 : NV*16]: one row's accumulators in registers.
template <int NV, typename scalar_t>
inline void accumulate(const float* __restrict__ xt, const int32_t* __restrict__ idx,
                       const scalar_t* __restrict__ val, int64_t p0, int64_t p1, vf* a) {
  constexpr int64_t w = NV * kLanes;
  for (int64_t p = p0; p < p1; ++p) {
    const float v = static_cast<float>(val[p]);
    const float* x = xt + static_cast<int64_t>(idx[p]) * w;
    for (int j = 0; j < NV; ++j) a[j] += v * load(x + j * kLanes);
  }
}

// out[0 : NV*16] = sum_p val[p] * xt[idx[p], 0 : NV*16] for one row. The rows go two at a time through
// sparse_row2; this one takes the odd row of a block.
template <int NV, typename scalar_t>
inline void sparse_row(const float* __restrict__ xt, const int32_t* __restrict__ idx,
                       const scalar_t* __restrict__ val, int64_t nnz, float* __restrict__ out, float init = 0.f) {
  vf a[NV];
  for (int j = 0; j < NV; ++j) a[j] = vf{} + init;
  accumulate<NV>(xt, idx, val, 0, nnz, a);
  for (int j = 0; j < NV; ++j) store(out + j * kLanes, a[j]);
}

// Two rows at once, their nonzeros interleaved: 2 * NV independent FMA chains instead of NV. On an AMX Xeon
// (two 512-bit FMA ports, 4-cycle latency) one row's 4 chains left ports idle: 1-9 % faster per layer
// for MiniLM's shapes at 4,096 tokens, 2 threads (2026-12-06); on the EPYC VM (AVX-512 on 256-bit units) a
// second set had measured no faster. Software prefetch measured no faster either.
template <int NV, typename scalar_t>
inline void sparse_row2(const float* __restrict__ xt, const int32_t* __restrict__ i0, const scalar_t* __restrict__ v0,
                        int64_t n0, const int32_t* __restrict__ i1, const scalar_t* __restrict__ v1, int64_t n1,
                        float* __restrict__ o0, float* __restrict__ o1, float init0 = 0.f, float init1 = 0.f) {
  constexpr int64_t w = NV * kLanes;
  vf a[NV], b[NV];
  for (int j = 0; j < NV; ++j) {
    a[j] = vf{} + init0;
    b[j] = vf{} + init1;
  }
  const int64_t common = std::min(n0, n1);
  for (int64_t p = 0; p < common; ++p) {
    const float va = static_cast<float>(v0[p]), vb = static_cast<float>(v1[p]);
    const float* xa = xt + static_cast<int64_t>(i0[p]) * w;
    const float* xb = xt + static_cast<int64_t>(i1[p]) * w;
    for (int j = 0; j < NV; ++j) {
      a[j] += va * load(xa + j * kLanes);
      b[j] += vb * load(xb + j * kLanes);
    }
  }
  accumulate<NV>(xt, i0, v0, common, n0, a);  // the longer row's rest
  accumulate<NV>(xt, i1, v1, common, n1, b);
  for (int j = 0; j < NV; ++j) {
    store(o0 + j * kLanes, a[j]);
    store(o1 + j * kLanes, b[j]);
  }
}

// Rows [rb0 * 16, rb1 * 16) of one tile's product, written to y (the tile's first token's row; ldy elements
// between tokens) plus the bias and the residual (same layout, ldr), when given.
template <int NV, typename scalar_t>
void tile_rows(const float* xt, int64_t valid, int64_t rb0, int64_t rb1, int64_t N, const int32_t* row_ptr,
               const int32_t* col, const scalar_t* val, const scalar_t* bias, scalar_t* y, int64_t ldy,
               const scalar_t* residual, int64_t ldr) {
  constexpr int64_t w = NV * kLanes;
  alignas(64) float buf[kRowBlock][w];
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t n0 = rb * kRowBlock, nb = std::min(kRowBlock, N - n0);
    int64_t r = 0;
    for (; r + 1 < nb; r += 2) {
      const int64_t n = n0 + r;
      sparse_row2<NV>(xt, col + row_ptr[n], val + row_ptr[n], row_ptr[n + 1] - row_ptr[n],
                      col + row_ptr[n + 1], val + row_ptr[n + 1], row_ptr[n + 2] - row_ptr[n + 1], buf[r], buf[r + 1]);
    }
    for (; r < nb; ++r) {
      const int64_t n = n0 + r;
      sparse_row<NV>(xt, col + row_ptr[n], val + row_ptr[n], row_ptr[n + 1] - row_ptr[n], buf[r]);
    }
    // Write back transposed, 16 tokens x 16 features at a time, adding the bias.
    alignas(64) float bb[kRowBlock];
    for (int64_t r = 0; r < kRowBlock; ++r) bb[r] = (bias && r < nb) ? static_cast<float>(bias[n0 + r]) : 0.f;
    const vf bv = load(bb);
    vf t[kLanes];
    for (int64_t i0 = 0; i0 < valid; i0 += kLanes) {
      for (int64_t r = 0; r < kRowBlock; ++r) t[r] = r < nb ? load(buf[r] + i0) : vf{};
      transpose16(t);  // t[i] = features n0..n0+15 of token m0+i0+i
      const int64_t ni = std::min(kLanes, valid - i0);
      for (int64_t i = 0; i < ni; ++i) {
        scalar_t* yrow = y + (i0 + i) * ldy + n0;
        vf out = t[i] + bv;
        if (residual != nullptr) out += load_x(residual + (i0 + i) * ldr + n0, 1, nb);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (nb == kRowBlock) {
            storeu(yrow, out);
            continue;
          }
        }
        for (int64_t r = 0; r < nb; ++r) yrow[r] = static_cast<scalar_t>(out[r]);
      }
    }
  }
}

// Tokens per tile: kTile, or narrower (a multiple of 16) so that each thread gets a tile of a short input (e.g. one
// sentence of 32 tokens on 2 threads: two 16-token tiles instead of the row split).
int64_t tile_tokens(int64_t M, int64_t threads) {
  if (threads > 1 && (M + kTile - 1) / kTile < threads && M > kLanes) {
    return std::max(kLanes, round_up((M + threads - 1) / threads, kLanes));
  }
  return kTile;
}

// LayerNorm over the N features of rows just written (their tile's outputs, still in L1/L2): on a served model
// this replaces a separate pass of ATen's LayerNorm over the whole [tokens, N] output in memory (12 such passes per
// MiniLM forward). Two passes over each row in fp32 (mean, then the mean square of x - mean), as exact as
// ATen's. Half types normalize the rounded sum, as the unfused LayerNorm does.
struct LayerNormF {
  std::vector<float> weight, bias;  // empty: none (weight 1, bias 0)
  float eps = 0.f;
  bool on = false;
};

template <typename scalar_t>
LayerNormF layer_norm_of(const LayerNormArgs& a, int64_t N) {
  LayerNormF ln;
  if (!a.eps.has_value()) return ln;
  ln.on = true;
  ln.eps = static_cast<float>(*a.eps);
  auto floats = [&](const std::optional<at::Tensor>& t, std::vector<float>& out) {
    if (const scalar_t* p = data_or_null<scalar_t>(t)) {
      out.resize(N);
      for (int64_t k = 0; k < N; ++k) out[k] = static_cast<float>(p[k]);
    }
  };
  floats(a.weight, ln.weight);
  floats(a.bias, ln.bias);
  return ln;
}

// sum over k of f(r[k]) for a row of n floats (f: vf -> vf, lanes past n are never read): four independent
// accumulator chains, so the adds' latency overlaps (a row of MiniLM's 384 features is 24 vectors).
template <typename F>
inline float row_sum(const float* r, int64_t n, const F& f) {
  vf a0{}, a1{}, a2{}, a3{};
  int64_t k = 0;
  for (; k + 4 * kLanes <= n; k += 4 * kLanes) {
    a0 += f(loadu(r + k));
    a1 += f(loadu(r + k + kLanes));
    a2 += f(loadu(r + k + 2 * kLanes));
    a3 += f(loadu(r + k + 3 * kLanes));
  }
  for (; k + kLanes <= n; k += kLanes) a0 += f(loadu(r + k));
  float tail = 0.f;
  if (k < n) {
    alignas(64) float tmp[kLanes] = {};
    for (int64_t i = k; i < n; ++i) tmp[i - k] = r[i];
    const vf t = f(load(tmp));
    for (int64_t i = 0; i < n - k; ++i) tail += t[i];
  }
  return lane_sum((a0 + a1) + (a2 + a3)) + tail;
}

// rows x N values, ld elements between rows.
template <typename scalar_t>
void layer_norm_rows(scalar_t* y, int64_t rows, int64_t N, int64_t ld, const LayerNormF& ln) {
  if (!ln.on) return;
  thread_local std::vector<float> widened;
  const float* g = ln.weight.empty() ? nullptr : ln.weight.data();
  const float* b = ln.bias.empty() ? nullptr : ln.bias.data();
  const float inv_n = 1.f / static_cast<float>(N);
  for (int64_t m = 0; m < rows; ++m) {
    scalar_t* out = y + m * ld;
    float* r;
    if constexpr (std::is_same_v<scalar_t, float>) {
      r = out;
    } else {
      widened.resize(N);
      for (int64_t k = 0; k < N; ++k) widened[k] = static_cast<float>(out[k]);
      r = widened.data();
    }
    const float mean = row_sum(r, N, [](vf v) { return v; }) * inv_n;
    const float var = row_sum(r, N, [mean](vf v) { return (v - mean) * (v - mean); }) * inv_n;
    const float rstd = 1.f / std::sqrt(var + ln.eps);
    for (int64_t k = 0; k < N; k += kLanes) {
      const int64_t n = std::min(kLanes, N - k);
      vf v = (load_x(r + k, 1, n) - mean) * rstd;
      if (g != nullptr) v *= load_x(g + k, 1, n);
      if (b != nullptr) v += load_x(b + k, 1, n);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (n == kLanes) {
          storeu(out + k, v);
          continue;
        }
      }
      for (int64_t i = 0; i < n; ++i) out[k + i] = static_cast<scalar_t>(v[i]);
    }
  }
}

struct AlignedFree {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using AlignedBuf = std::unique_ptr<float[], AlignedFree>;
inline AlignedBuf aligned_floats(int64_t n) {
  return AlignedBuf(static_cast<float*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(float),
                                                         std::align_val_t(64))));
}

// Per-thread packing buffer kept between calls (pool threads persist): a fresh multi-MB allocation per call
// costs page faults that are a visible share of a 97%-sparse product.
float* scratch(int64_t n) {
  thread_local AlignedBuf buf;
  thread_local int64_t capacity = 0;
  if (n > capacity) {
    buf.reset();
    capacity = std::max<int64_t>(n, capacity * 5 / 4);
    buf = aligned_floats(capacity);
  }
  return buf.get();
}

// One tile's product (tokens m0.. of M, x packed in xt) for row blocks [rb0, rb1) of a weight: y and residual
// are the [M, *] matrices (row strides ldy, ldr).
template <typename scalar_t>
void run_tile(const float* xt, int64_t M, int64_t m0, int64_t T, int64_t rb0, int64_t rb1, int64_t N,
              const int32_t* row_ptr, const int32_t* col, const scalar_t* val, const scalar_t* bias, scalar_t* y,
              int64_t ldy, const scalar_t* residual = nullptr, int64_t ldr = 0) {
  const int64_t w = tile_width(M, m0, T), valid = std::min(T, M - m0);
  scalar_t* yt = y + m0 * ldy;
  const scalar_t* rt = residual != nullptr ? residual + m0 * ldr : nullptr;
  switch (w / kLanes) {
    case 1: return tile_rows<1>(xt, valid, rb0, rb1, N, row_ptr, col, val, bias, yt, ldy, rt, ldr);
    case 2: return tile_rows<2>(xt, valid, rb0, rb1, N, row_ptr, col, val, bias, yt, ldy, rt, ldr);
    case 3: return tile_rows<3>(xt, valid, rb0, rb1, N, row_ptr, col, val, bias, yt, ldy, rt, ldr);
    default: return tile_rows<4>(xt, valid, rb0, rb1, N, row_ptr, col, val, bias, yt, ldy, rt, ldr);
  }
}

template <typename scalar_t>
void run_tile(const float* xt, int64_t M, int64_t m0, int64_t T, const CsrWeight<scalar_t>& wt, scalar_t* y,
              int64_t ldy, const scalar_t* residual = nullptr, int64_t ldr = 0) {
  run_tile(xt, M, m0, T, 0, (wt.n + kRowBlock - 1) / kRowBlock, wt.n, wt.row_ptr, wt.col, wt.val, wt.bias, y, ldy,
           residual, ldr);
}

// Who runs the tasks: 0 (default) ATen's OpenMP team, 1 cap_ds's TaskPool (CAP_DS_CPU_THREADING=taskpool, or
// set_cpu_threading). On an idle machine OpenMP is faster (2.8x vs 1.8x over dense for the 90 % MiniLM at batch
// 32, 2 threads): its threads are already spinning after the ATen op before, and no third thread competes with
// them for the cores. TaskPool only wins on a machine other processes keep busy (see task_pool.h).
int initial_threading() {
  const char* env = std::getenv("CAP_DS_CPU_THREADING");
  return env != nullptr && std::string(env) == "taskpool" ? 1 : 0;
}
std::atomic<int> g_threading{initial_threading()};

// fn(task) for every task in [0, ntasks) on `threads` workers claiming tasks one at a time.
template <typename F>
void run_tasks(int64_t ntasks, int64_t threads, const F& fn) {
  if (g_threading.load(std::memory_order_relaxed) == 1) {
    TaskPool::get().run(ntasks, threads, fn);
    return;
  }
  const int64_t workers = std::min(threads, ntasks);
  if (workers <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) fn(t);
  });
}

// One task per tile of T tokens of x: the tile packed into the thread's buffer (K * T floats, then `extra`
// floats for the caller), then fn(tile, m0, m1) for its tokens [m0, m1).
template <typename scalar_t, typename F>
void for_each_packed_tile(const at::Tensor& x, int64_t T, int64_t threads, int64_t extra, const F& fn) {
  const int64_t M = x.size(0), K = x.size(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  run_tasks((M + T - 1) / T, threads, [&](int64_t t) {
    float* tile = scratch(K * T + extra);
    const int64_t m0 = t * T;
    pack_tile(px, M, x.stride(0), x.stride(1), K, m0, tile, T);
    fn(tile, m0, std::min(M, m0 + T));
  });
}

// Two schedules, both on run_tasks (dynamic claiming). At least one token tile per thread: one task per tile;
// a task packs its tile into its thread's buffer and multiplies it against all rows (no barrier between packing
// and compute, the tile hot in that core's L1 or L2, memory O(threads * K * T)). Fewer tiles than threads: x is
// packed once (it is small), then the rows are split into chunks of equal nonzero counts. (The row split used to
// take up to 2 tiles per thread: at 128 tokens on 2 threads the tile split measured 1.5-1.9x faster for
// MiniLM's shapes, AMX Xeon, 2026-12-06: one parallel region instead of two, no barrier.)
// y: [M, N] with row stride ldy (a contiguous output, or a column slice of a wider one); residual [M, N]
// contiguous or nullptr.
template <typename scalar_t>
void csr_linear_kernel(const at::Tensor& x, const CsrWeight<scalar_t>& wt, const scalar_t* residual,
                       const LayerNormF& ln, scalar_t* py, int64_t ldy) {
  const int32_t *row_ptr = wt.row_ptr, *col = wt.col;
  const scalar_t *val = wt.val, *bias = wt.bias;
  const int64_t N = wt.n;
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t T = tile_tokens(M, threads), ntiles = (M + T - 1) / T;

  if (threads == 1 || ntiles >= threads) {
    for_each_packed_tile<scalar_t>(x, T, threads, 0, [&](float* tile, int64_t m0, int64_t m1) {
      run_tile(tile, M, m0, T, wt, py, ldy, residual, N);
      layer_norm_rows(py + m0 * ldy, m1 - m0, N, ldy, ln);  // the tile's rows are complete and in cache
    });
    return;
  }

  float* xp = scratch(round_up(M, kLanes) * K);  // tile from m0 at xp + m0 * K
  const int64_t ngroups = round_up(M, kLanes) / kLanes;
  constexpr int64_t kb = 256;
  const int64_t nkb = (K + kb - 1) / kb;
  run_tasks(ngroups * nkb, threads, [&](int64_t it) {
    const int64_t mg = (it / nkb) * kLanes, k0 = (it % nkb) * kb;
    pack_group(px, M, sm, sk, mg, k0, std::min(K, k0 + kb), xp + mg / T * T * K, T);
  });
  const int64_t parts = std::max<int64_t>(1, std::min(4 * threads, nblocks));
  const int64_t nnz = row_ptr[N];
  std::vector<int64_t> bounds(parts + 1, nblocks);
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    const int64_t target = nnz * t / parts;
    const int64_t row = std::upper_bound(row_ptr, row_ptr + N + 1, static_cast<int32_t>(target)) - row_ptr - 1;
    bounds[t] = std::max(bounds[t - 1], std::min(nblocks, (row + kRowBlock / 2) / kRowBlock));
  }
  run_tasks(parts, threads, [&](int64_t t) {
    if (bounds[t] >= bounds[t + 1]) return;
    for (int64_t m0 = 0; m0 < M; m0 += T) {
      run_tile(xp + m0 * K, M, m0, T, bounds[t], bounds[t + 1], N, row_ptr, col, val, bias, py, ldy, residual, N);
    }
  });
  layer_norm_rows(py, M, N, ldy, ln);  // rows were split across threads: normalize once all are written (few tokens)
}

// The first product of a fused FFN for one tile: h[n * w + i] = b[n] + sum_k W[n, k] xt[k * w + i] for every row
// n, i.e. h is already the packed [N][w] tile the second product reads (no write-back, no transposes, no pack).
template <int NV, typename scalar_t>
void tile_to_tile(const float* xt, const CsrWeight<scalar_t>& wt, float* h) {
  constexpr int64_t w = NV * kLanes;
  const int32_t* rp = wt.row_ptr;
  auto b = [&](int64_t n) { return wt.bias ? static_cast<float>(wt.bias[n]) : 0.f; };
  int64_t n = 0;
  for (; n + 1 < wt.n; n += 2) {
    sparse_row2<NV>(xt, wt.col + rp[n], wt.val + rp[n], rp[n + 1] - rp[n], wt.col + rp[n + 1], wt.val + rp[n + 1],
                    rp[n + 2] - rp[n + 1], h + n * w, h + (n + 1) * w, b(n), b(n + 1));
  }
  if (n < wt.n) sparse_row<NV>(xt, wt.col + rp[n], wt.val + rp[n], rp[n + 1] - rp[n], h + n * w, b(n));
}

// GELU(x) = x/2 (1 + erf(x / sqrt 2)) with erf by Abramowitz and Stegun 7.1.26 (|error| <= 1.5e-7): for
// z = |x| / sqrt 2, t = 1 / (1 + p z), 1 - erf(z) = q = t P(t) exp(-z^2); GELU is x - x q / 2 for x >= 0 and
// x q / 2 below. Within 3.3e-7 of float64 GELU for |x| <= 12 (torch's fp32 GELU: 7e-7). Computed in cache on the
// fused FFN's tile, instead of a pass of ATen's GELU over the whole [tokens, 4 * hidden] activation in memory.
inline vf gelu(vf x) {
  const vf z = (vf)((vi)x & 0x7fffffff) * 0.70710678118654752f;
  const vf t = 1.f / (1.f + 0.3275911f * z);
  vf poly = vf{} + 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const vf half_xq = 0.5f * x * (t * poly * exp_nonpositive(-(z * z)));
  return x < 0.f ? half_xq : x - half_xq;
}

inline vf activation_of(vf x, int64_t activation) {
  switch (activation) {
    case kActGelu: return gelu(x);
    case kActRelu: return x < 0.f ? vf{} : x;
    default: return x;
  }
}

// In place on a tile: n a multiple of 16 (rows x tile width), h 64-byte aligned (the scratch buffer).
void activate(float* h, int64_t n, int64_t activation) {
  if (activation == kActNone) return;
  for (int64_t i = 0; i < n; i += kLanes) store(h + i, activation_of(load(h + i), activation));
}

template <typename scalar_t>
void csr_ffn_kernel(const at::Tensor& x, const CsrWeight<scalar_t>& w1, int64_t activation,
                    const CsrWeight<scalar_t>& w2, const scalar_t* residual, const LayerNormF& ln,
                    at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1);
  scalar_t* py = y.data_ptr<scalar_t>();
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t T = tile_tokens(M, threads);
  for_each_packed_tile<scalar_t>(x, T, threads, w1.n * T, [&](float* xt, int64_t m0, int64_t m1) {
    float* h = xt + K * T;
    const int64_t w = tile_width(M, m0, T);
    switch (w / kLanes) {
      case 1: tile_to_tile<1>(xt, w1, h); break;
      case 2: tile_to_tile<2>(xt, w1, h); break;
      case 3: tile_to_tile<3>(xt, w1, h); break;
      default: tile_to_tile<4>(xt, w1, h); break;
    }
    activate(h, w1.n * w, activation);
    run_tile(h, M, m0, T, w2, py, w2.n, residual, w2.n);
    layer_norm_rows(py + m0 * w2.n, m1 - m0, w2.n, w2.n, ln);
  });
}

// A BERT-style self-attention block with its four weights in CSR. Enough sequences for every thread: one task
// per sequence, everything of it in the core's cache: x packed once per tile for all three projections, which
// are written into one [seq, 3 * hidden] buffer, softmax attention on it (softmax_attention.h, or ATen's SDPA,
// on this thread), the output projection with the residual and the LayerNorm. Unfused, Q, K, V and the context each go through memory between HF's
// separate calls (at 32 x 128 tokens, 6 MB each for MiniLM). Fewer sequences: three parallel phases
// (projections, attention over (sequence, head) tasks, output projection), without HF's Python between them.
template <typename scalar_t>
void csr_attention_kernel(const at::Tensor& x, int64_t B, const CsrWeight<scalar_t> (&qkv)[3],
                          const CsrWeight<scalar_t>& wo, int64_t H, double scale,
                          const std::optional<at::Tensor>& mask, const scalar_t* residual, const LayerNormF& ln,
                          at::Tensor& y) {
  const int64_t M = x.size(0), S = M / B, K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const int64_t E = qkv[0].n, D = E / H, N = wo.n, ld = 3 * E;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  scalar_t* py = y.data_ptr<scalar_t>();
  const int64_t threads = std::max(1, at::get_num_threads());
  // SDPA on sequences b0 .. b0 + nb of a [nb * S, 3E] buffer: the context as [nb * S, E] (a view where SDPA's
  // output layout allows, else a copy).
  auto attend = [&](scalar_t* buf, int64_t b0, int64_t nb) {
    const at::Tensor t = at::from_blob(buf, {nb, S, 3, H, D}, x.options());
    std::optional<at::Tensor> m;
    if (mask.has_value()) m = mask->size(0) == 1 ? *mask : mask->narrow(0, b0, nb);
    const at::Tensor ctx = at::scaled_dot_product_attention(t.select(2, 0).transpose(1, 2), t.select(2, 1).transpose(1, 2),
                                                            t.select(2, 2).transpose(1, 2), m, 0.0, false, scale);
    return ctx.transpose(1, 2).reshape({nb * S, E});
  };
  const bool per_sequence = B >= threads && (B % threads == 0 || B >= 4 * threads);
  const bool own = own_attention(D);
  const MaskView mv = mask_view(mask);
  const float fscale = static_cast<float>(scale);
  if (!per_sequence) {
    at::Tensor buf = at::empty({M, ld}, x.options());
    scalar_t* pb = buf.data_ptr<scalar_t>();
    const int64_t T = tile_tokens(M, threads), ntiles = (M + T - 1) / T;
    if (threads == 1 || ntiles >= threads) {  // csr_linear's tile split, x packed once for the three products
      for_each_packed_tile<scalar_t>(x, T, threads, 0, [&](float* tile, int64_t m0, int64_t) {
        for (int j = 0; j < 3; ++j) run_tile(tile, M, m0, T, qkv[j], pb + j * E, ld);
      });
    } else {
      for (int j = 0; j < 3; ++j) csr_linear_kernel<scalar_t>(x, qkv[j], nullptr, LayerNormF{}, pb + j * E, ld);
    }
    at::Tensor ctx;
    if (own) {  // one task per (sequence, head)
      ctx = at::empty({M, E}, x.options());
      scalar_t* pc = ctx.data_ptr<scalar_t>();
      run_tasks(B * H, threads, [&](int64_t t) {
        const int64_t b = t / H, h = t % H;
        attention_heads(pb + b * S * ld, S, E, D, ld, fscale, mv, b, h, h + 1, pc + b * S * E, E,
                        scratch(attention_work(S, D)));
      });
    } else {
      ctx = attend(pb, 0, B);
    }
    csr_linear_kernel(ctx, wo, residual, ln, py, N);
    return;
  }
  const int64_t T = kTile, tile_floats = round_up(std::max(K, E) * T, kLanes);
  const int64_t buf_floats = round_up((S * ld * static_cast<int64_t>(sizeof(scalar_t)) + 3) / 4, kLanes);
  const int64_t ctx_floats = round_up((S * E * static_cast<int64_t>(sizeof(scalar_t)) + 3) / 4, kLanes);
  run_tasks(B, threads, [&](int64_t b) {
    c10::ParallelGuard nested(true);  // ATen's ops below run on this thread (TaskPool threads are not OpenMP's)
    float* xt = scratch(tile_floats + buf_floats + ctx_floats + attention_work(S, D));
    scalar_t* buf = reinterpret_cast<scalar_t*>(xt + tile_floats);
    const scalar_t* xb = px + b * S * sm;
    for (int64_t m0 = 0; m0 < S; m0 += T) {
      pack_tile(xb, S, sm, sk, K, m0, xt, T);
      for (int j = 0; j < 3; ++j) run_tile(xt, S, m0, T, qkv[j], buf + j * E, ld);
    }
    at::Tensor ctx_t;
    const scalar_t* pc;
    int64_t sc0 = E, sc1 = 1;
    if (own) {
      scalar_t* c = reinterpret_cast<scalar_t*>(xt + tile_floats + buf_floats);
      attention_heads(buf, S, E, D, ld, fscale, mv, b, 0, H, c, E, xt + tile_floats + buf_floats + ctx_floats);
      pc = c;
    } else {
      ctx_t = attend(buf, b, 1);
      pc = ctx_t.const_data_ptr<scalar_t>();
      sc0 = ctx_t.stride(0);
      sc1 = ctx_t.stride(1);
    }
    scalar_t* yb = py + b * S * N;
    const scalar_t* rb = residual != nullptr ? residual + b * S * N : nullptr;
    for (int64_t m0 = 0; m0 < S; m0 += T) {
      const int64_t m1 = std::min(S, m0 + T);
      pack_tile(pc, S, sc0, sc1, E, m0, xt, T);
      run_tile(xt, S, m0, T, wo, yb, N, rb, N);
      layer_norm_rows(yb + m0 * N, m1 - m0, N, N, ln);
    }
  });
}

// run(scalar_t{}) for the kernels' dtypes (float, bfloat16, half), else one error naming the op.
template <typename F>
void for_each_dtype(const char* op, at::ScalarType dtype, const F& run) {
  switch (dtype) {
    case at::kFloat: return run(float{});
    case at::kBFloat16: return run(at::BFloat16{});
    case at::kHalf: return run(at::Half{});
    default: TORCH_CHECK(false, op, ": CPU kernel supports float32, bfloat16 and float16, not ", dtype);
  }
}

}  // namespace

void set_cpu_threading(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "set_cpu_threading: 0 (OpenMP) or 1 (TaskPool), not ", mode);
  g_threading.store(static_cast<int>(mode));
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const CsrArrays& weight, const std::optional<at::Tensor>& residual,
                          const LayerNormArgs& layer_norm) {
  const int64_t M = x.size(0), N = weight.out_features;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  for_each_dtype("csr_linear", x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    csr_linear_kernel<scalar_t>(x, weight_of<scalar_t>(weight), data_or_null<scalar_t>(residual),
                                layer_norm_of<scalar_t>(layer_norm, N), y.data_ptr<scalar_t>(), N);
  });
  return y;
}

at::Tensor csr_ffn_cpu(const at::Tensor& x, const CsrArrays& first, int64_t activation, const CsrArrays& second,
                       const std::optional<at::Tensor>& residual, const LayerNormArgs& layer_norm) {
  const int64_t M = x.size(0), N = second.out_features;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  for_each_dtype("csr_ffn", x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    csr_ffn_kernel<scalar_t>(x, weight_of<scalar_t>(first), activation, weight_of<scalar_t>(second),
                             data_or_null<scalar_t>(residual), layer_norm_of<scalar_t>(layer_norm, N), y);
  });
  return y;
}

at::Tensor csr_attention_cpu(const at::Tensor& x, int64_t batch, const CsrArrays& query, const CsrArrays& key,
                             const CsrArrays& value, const CsrArrays& out, int64_t heads, double scale,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& residual,
                             const LayerNormArgs& layer_norm) {
  const int64_t M = x.size(0), N = out.out_features;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  for_each_dtype("csr_attention", x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const CsrWeight<scalar_t> qkv[3] = {weight_of<scalar_t>(query), weight_of<scalar_t>(key),
                                        weight_of<scalar_t>(value)};
    csr_attention_kernel<scalar_t>(x, batch, qkv, weight_of<scalar_t>(out), heads, scale, mask,
                                   data_or_null<scalar_t>(residual), layer_norm_of<scalar_t>(layer_norm, N), y);
  });
  return y;
}

}  // namespace cap
