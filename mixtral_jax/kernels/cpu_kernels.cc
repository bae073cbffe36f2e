// Decode-time matrix products (and decode attention) on CPU as XLA FFI custom calls (see mixtral_jax/kernels/__init__.py).
//
// Decode reads every weight once per step for a handful of activation rows, so it is bound by
// memory bandwidth; XLA:CPU's dots reach it for float32 only and run bfloat16/int8 weights at a
// small fraction of it (DESIGN.md §2). These kernels widen bf16/int8 weights to float32 in
// registers (exactly: products are the pure-JAX path's `q * scale` dequantisation up to the
// summation order; one exception, int8 rows against a single activation row on AVX2, rounds that
// row to int16: `avx2::dot_i16`) and spread output rows over a small pool of spinning workers
// (`SpinPool`).
//
// Two weight orientations, as the parameter layout has them:
//   kn: w [K, N] (x @ w; attention projections, lm_head): each task owns a column tile and walks
//       down the rows four at a time, accumulating in L1; for one activation row, each task owns
//       a block of whole rows instead and the tasks' partial sums are added after.
//   nk: w [N, K] (the CPU layout's per-expert matrices): each task owns output rows and takes dot
//       products along contiguous weight rows. For a prompt chunk's many rows the MoE layer turns
//       to outer products instead (`nk_panel`): each weight broadcast against 8-64 tokens (8-24 on
//       AVX2) held k-major, which makes it bound by arithmetic rather than by memory.
// Decode attention (`attend_part`) reads a float32 or bfloat16 KV cache in its own [rows, slots,
// K, H] layout: each row's visible slots in parts of whole slots (keys and values read once for all heads), a
// softmax per part, then the parts merged.
// The body is compiled once per instruction set (AVX-512, AVX2+FMA, generic) and chosen at run
// time, so one build runs on any x86-64 processor.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class WType { kF32, kBF16, kI8 };
template <WType T> constexpr int64_t kBytes = T == WType::kF32 ? 4 : T == WType::kBF16 ? 2 : 1;

// The row loops (`kn_accumulate`, `nk_block`) prefetch the weight rows they will read four rows
// on. Decode's weights do not fit the cache, and with two cores the hardware prefetchers alone
// left int8 rows (1 KB, a quarter page) at half of float32's bytes/s: measured over 1 GB of
// weights, int8 went from 1.8x to 3-3.5x float32's speed, float32 itself unchanged (BENCHMARKS.md).
// Whole float32 rows streamed by one row block (`kn_rows`) go without: there it cost ~8%.
constexpr int64_t kAhead = 4;

// Rows of activations one call handles (the Python side falls back to XLA above it).
constexpr int64_t kMaxRows = 16;

// An 8-lane panel's vectors in the groups `nk_panel8`'s register blocks take: threes, then twos,
// so that no group is a lone vector after others (6 rows x 1 vector broadcasts a weight per FMA).
constexpr int64_t GroupVectors(int64_t left) { return left >= 6 ? 3 : left >= 4 ? 2 : left; }

#define MJ_KERNEL_BODY                                                                             \
  typedef float f32x8v __attribute__((vector_size(32)));                                           \
  typedef int32_t i32x8v __attribute__((vector_size(32)));                                         \
                                                                                                   \
  template <WType T>                                                                               \
  inline f32x16 load16(const void* base, int64_t i) {                                              \
    if constexpr (T == WType::kF32) {                                                              \
      return loadf(static_cast<const float*>(base) + i);                                           \
    } else if constexpr (T == WType::kBF16) {                                                      \
      return widen_bf16(static_cast<const uint16_t*>(base) + i);                                   \
    } else {                                                                                       \
      return widen_i8(static_cast<const int8_t*>(base) + i);                                       \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* acc[m * lda + j] += sum_{k in [k0, k1)} x[m, k] w[k, n0 + j] for j < nt, weight rows four at a */\
  /* time (shared by column tiles and row blocks), prefetching the next four rows when Ahead. */   \
  template <WType T, bool Ahead>                                                                   \
  void kn_accumulate(const float* x, int64_t m_rows, int64_t k_dim, const void* w, int64_t n_dim,  \
                     int64_t k0, int64_t k1, int64_t n0, int64_t nt, float* acc, int64_t lda) {    \
    for (int64_t k = k0; k < k1; k += 4) {                                                         \
      const int64_t r0 = k * n_dim + n0;                                                           \
      for (int64_t j = 0; j < nt; j += 16) {                                                       \
        if (Ahead && ((j * kBytes<T>) & 63) == 0)                                                  \
          for (int r = 0; r < 4; ++r)                                                              \
            __builtin_prefetch(static_cast<const char*>(w) + (r0 + (kAhead + r) * n_dim + j) * kBytes<T>, 0, 3);\
        const f32x16 w0 = load16<T>(w, r0 + j), w1 = load16<T>(w, r0 + n_dim + j);                 \
        const f32x16 w2 = load16<T>(w, r0 + 2 * n_dim + j), w3 = load16<T>(w, r0 + 3 * n_dim + j); \
        for (int64_t m = 0; m < m_rows; ++m) {                                                     \
          const float* xm = x + m * k_dim + k;                                                     \
          float* a = acc + m * lda + j;                                                            \
          f32x16 s = loadf(a);                                                                     \
          s += xm[0] * w0 + xm[1] * w1 + xm[2] * w2 + xm[3] * w3;                                  \
          storef(a, s);                                                                            \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* y[m, n] = sum_k x[m, k] w[k, n] (* scale[n]) for n in [n0, n0 + nt); m_rows * nt <= kMaxRows * kTile. */\
  template <WType T>                                                                               \
  void kn_tile(const float* x, int64_t m_rows, int64_t k_dim, const void* w, int64_t n_dim,        \
               const float* scale, int64_t n0, int64_t nt, float* y) {                             \
    alignas(64) float acc[kMaxRows * kTile];                                                       \
    std::memset(acc, 0, sizeof(float) * m_rows * nt);                                              \
    kn_accumulate<T, true>(x, m_rows, k_dim, w, n_dim, 0, k_dim, n0, nt, acc, nt);                 \
    for (int64_t m = 0; m < m_rows; ++m)                                                           \
      for (int64_t j = 0; j < nt; ++j)                                                             \
        y[m * n_dim + n0 + j] = acc[m * nt + j] * (scale ? scale[n0 + j] : 1.f);                   \
  }                                                                                                \
                                                                                                   \
  /* acc[m, n] = sum_{k in [k0, k1)} x[m, k] w[k, n] for every n: whole weight rows, so each task */\
  /* streams one contiguous block of w. float32 rows go without software prefetch: on the AVX2 */  \
  /* machine a [1024, 32000] lm_head read at 37-38 GB/s without it and 34-35 with it (BENCHMARKS.md, */\
  /* "AVX2 machine, 2026-12-03 (morning)"); bf16 and int8 rows keep it (int8 read ~2x faster). */  \
  template <WType T>                                                                               \
  void kn_rows(const float* x, int64_t m_rows, int64_t k_dim, const void* w, int64_t n_dim,        \
               int64_t k0, int64_t k1, float* acc) {                                               \
    std::memset(acc, 0, sizeof(float) * m_rows * n_dim);                                           \
    kn_accumulate<T, T != WType::kF32>(x, m_rows, k_dim, w, n_dim, k0, k1, 0, n_dim, acc, n_dim);  \
  }                                                                                                \
                                                                                                   \
  /* y[m * ldy + r] = sum_k x[m, k] w[n + r, k] (* scale[n + r]) for r < 4. */                     \
  template <WType T, int MB>                                                                       \
  void nk_block(const float* x, int64_t k_dim, const void* w, const float* scale, int64_t n,       \
                float* y, int64_t ldy) {                                                           \
    f32x16 acc[MB][4] = {};                                                                        \
    for (int64_t k = 0; k < k_dim; k += 16) {                                                      \
      f32x16 wr[4];                                                                                \
      if (((k * kBytes<T>) & 63) == 0)  /* once per cache line */                                  \
        for (int r = 0; r < 4; ++r) __builtin_prefetch(static_cast<const char*>(w) + ((n + kAhead + r) * k_dim + k) * kBytes<T>, 0, 3);\
      for (int r = 0; r < 4; ++r) wr[r] = load16<T>(w, (n + r) * k_dim + k);                       \
      for (int m = 0; m < MB; ++m) {                                                               \
        const f32x16 xv = loadf(x + m * k_dim + k);                                                \
        for (int r = 0; r < 4; ++r) acc[m][r] += xv * wr[r];                                       \
      }                                                                                            \
    }                                                                                              \
    for (int m = 0; m < MB; ++m)                                                                   \
      for (int r = 0; r < 4; ++r)                                                                  \
        y[m * ldy + r] = hsum(acc[m][r]) * (scale ? scale[n + r] : 1.f);                           \
  }                                                                                                \
                                                                                                   \
  /* c[i * ldc + l] += sum_{k < kc} w[i * ldw + k] xt[k * ldx + l] for i < NR, l < 16 MV: NR float32 */\
  /* weight rows times an activation panel stored k-major (16 tokens per vector); the NR x MV */   \
  /* accumulators stay in registers, each weight broadcast once per k. */                          \
  template <int NR, int MV>                                                                        \
  void op_block(const float* w, int64_t ldw, const float* xt, int64_t ldx, int64_t kc, float* c,   \
                int64_t ldc) {                                                                     \
    f32x16 acc[NR][MV];                                                                            \
    for (int i = 0; i < NR; ++i)                                                                   \
      for (int j = 0; j < MV; ++j) acc[i][j] = loadf(c + i * ldc + 16 * j);                        \
    for (int64_t k = 0; k < kc; ++k) {                                                             \
      f32x16 xv[MV];                                                                               \
      for (int j = 0; j < MV; ++j) xv[j] = loadf(xt + k * ldx + 16 * j);                           \
      for (int i = 0; i < NR; ++i) {                                                               \
        const float wi = w[i * ldw + k];                                                           \
        for (int j = 0; j < MV; ++j) acc[i][j] += wi * xv[j];                                      \
      }                                                                                            \
    }                                                                                              \
    for (int i = 0; i < NR; ++i)                                                                   \
      for (int j = 0; j < MV; ++j) storef(c + i * ldc + 16 * j, acc[i][j]);                        \
  }                                                                                                \
                                                                                                   \
  /* Rows [n, n + rows) of w [N, K], k in [kb, kb + kc), as float32 rows with stride ldw: float32 */\
  /* in place, bf16/int8 widened into scratch [rows, kc]. */                                       \
  template <WType T>                                                                               \
  const float* weight_block(const void* w, int64_t k_dim, int64_t n, int64_t rows, int64_t kb, int64_t kc,\
                            float* scratch, int64_t& ldw) {                                        \
    if constexpr (T == WType::kF32) {                                                              \
      ldw = k_dim;                                                                                 \
      return static_cast<const float*>(w) + n * k_dim + kb;                                        \
    }                                                                                              \
    for (int64_t i = 0; i < rows; ++i)                                                             \
      for (int64_t k = 0; k < kc; k += 16) storef(scratch + i * kc + k, load16<T>(w, (n + i) * k_dim + kb + k));\
    ldw = kc;                                                                                      \
    return scratch;                                                                                \
  }                                                                                                \
                                                                                                   \
  /* `op_block` in 8-lane vectors (kLanes8): NR x NV accumulators of one register each. */         \
  template <int NR, int NV>                                                                        \
  void op_ymm(const float* w, int64_t ldw, const float* xt, int64_t ldx, int64_t kc, float* c, int64_t ldc) {\
    f32x8v acc[NR][NV];                                                                            \
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; ++i)                                          \
      _Pragma("GCC unroll 16") for (int j = 0; j < NV; ++j) std::memcpy(&acc[i][j], c + i * ldc + 8 * j, 32);\
    for (int64_t k = 0; k < kc; ++k) {                                                             \
      f32x8v xv[NV];                                                                               \
      _Pragma("GCC unroll 16") for (int j = 0; j < NV; ++j) std::memcpy(&xv[j], xt + k * ldx + 8 * j, 32);\
      _Pragma("GCC unroll 16") for (int i = 0; i < NR; ++i) {                                      \
        const float wi = w[i * ldw + k];                                                           \
        _Pragma("GCC unroll 16") for (int j = 0; j < NV; ++j) acc[i][j] += wi * xv[j];             \
      }                                                                                            \
    }                                                                                              \
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; ++i)                                          \
      _Pragma("GCC unroll 16") for (int j = 0; j < NV; ++j) std::memcpy(c + i * ldc + 8 * j, &acc[i][j], 32);\
  }                                                                                                \
                                                                                                   \
  /* `op_ymm` over `rows` weight rows, NR at a time, the rest in one smaller block. */             \
  template <int NR, int NV>                                                                        \
  void rows_ymm(const float* w, int64_t ldw, const float* xt, int64_t ldx, int64_t kc, float* c, int64_t ldc,\
                int64_t rows) {                                                                    \
    int64_t i = 0;                                                                                 \
    for (; i + NR <= rows; i += NR) op_ymm<NR, NV>(w + i * ldw, ldw, xt, ldx, kc, c + i * ldc, ldc);\
    if constexpr (NR > 1)                                                                          \
      if (i < rows) rows_ymm<NR - 1, NV>(w + i * ldw, ldw, xt, ldx, kc, c + i * ldc, ldc, rows - i);\
  }                                                                                                \
                                                                                                   \
  /* `nk_panel` in 8-lane vectors (kLanes8), for any number of them: k in blocks, rows in blocks */ \
  /* of 12 (whose block of weights stays in L1), and for each row block the tokens' vectors in */  \
  /* groups of up to three (`GroupVectors`), each in the register block that suits it with 16 */   \
  /* registers: 6 rows x 1 vector, 6 x 2 or 4 x 3. Hot, on one core: 67-97 GFLOP/s by panel */     \
  /* width, where 6 rows x 16-lane vectors with a one-register last half ran 55-85 */              \
  /* (BENCHMARKS.md, "AVX2 machine, 2026-12-03"). The panel is stored group by group */            \
  /* (`PanelBlocks`): the group of vectors [j, j + g) at xt + 8 j k_dim, k-major in rows of 8 g */ \
  /* floats, so that a register block reads one contiguous stream; in rows of all the tokens a */  \
  /* group's k block was 8 g floats in each of kc rows up to 1 KB apart, and one layer ran 1.08x */ \
  /* slower at 264 tokens, 1.10x at 512, 1.15x at 1024. float32 k blocks: whole rows (up to 4096) */ \
  /* for at most 24 tokens, so that their weights, each used once, stream in whole 12-row blocks */ \
  /* rather than pieces 4-14 KB apart, the panel's block (at most 384 KB) staying in L2 */         \
  /* (`small`'s layers, weights from memory: 16 and 24 tokens 66-82 -> 74-89 GFLOP/s a core); */   \
  /* 1024 above, where a group's contiguous block streams from L2 as well as it sat in L1 and the */ \
  /* accumulators pass through memory 8x less often than with the 128 that rows of all the tokens */ \
  /* needed (one layer 1.08x at 512 tokens, 1.09x at 1024). bf16/int8 blocks are widened into */   \
  /* `scratch`, 256 at most. (BENCHMARKS.md, "AVX2 machine, 2026-12-03 (day)" and "(afternoon)".) */ \
  template <WType T>                                                                               \
  void nk_panel8(const void* w, int64_t k_dim, int64_t n0, int64_t n1, const float* xt, int64_t lanes,\
                 float* c, int64_t ldc) {                                                          \
    constexpr int64_t kRowBlock = 12;                                                              \
    alignas(64) float scratch[kRowBlock * 2 * kKc];                                                \
    const int64_t kcb = T == WType::kF32 && lanes <= 24 ? std::min<int64_t>(k_dim, 4096)           \
                        : T == WType::kF32                ? 8 * kKc                                \
                        : lanes <= 24                     ? 2 * kKc                                \
                                                          : kKc;                                   \
    const int nv = static_cast<int>(lanes / 8);                                                    \
    for (int64_t kb = 0; kb < k_dim; kb += kcb) {                                                  \
      const int64_t kc = std::min(kcb, k_dim - kb);                                                \
      for (int64_t n = n0; n < n1; n += kRowBlock) {                                               \
        const int64_t rows = std::min(kRowBlock, n1 - n);                                          \
        int64_t ldw;                                                                               \
        const float* wr = weight_block<T>(w, k_dim, n, rows, kb, kc, scratch, ldw);                \
        for (int j = 0; j < nv;) {                                                                 \
          const int group = static_cast<int>(GroupVectors(nv - j));                                \
          const float* xj = xt + 8 * j * k_dim + kb * 8 * group;                                   \
          float* cj = c + (n - n0) * ldc + 8 * j;                                                  \
          switch (group) {                                                                         \
            case 1: rows_ymm<6, 1>(wr, ldw, xj, 8, kc, cj, ldc, rows); break;                      \
            case 2: rows_ymm<6, 2>(wr, ldw, xj, 16, kc, cj, ldc, rows); break;                     \
            default: rows_ymm<4, 3>(wr, ldw, xj, 24, kc, cj, ldc, rows); break;                    \
          }                                                                                        \
          j += group;                                                                              \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* c[(n - n0) * ldc + l] += sum_k w[n, k] xt[k * ldx + l] for n in [n0, n1), l < lanes: weight */\
  /* rows of w [N, K] times an activation panel (tokens along the lanes: whole vectors of 16, up to */\
  /* kPanel of them; on AVX2 any number of 8-lane vectors stored in groups, `nk_panel8`, which */   \
  /* takes no ldx), k in blocks of kKc (the */                                                     \
  /* panel's block stays in L1 while the rows pass); bf16/int8 rows are widened block by block, */ \
  /* and the next row group's block is prefetched while this one computes. Register blocks with 32 */\
  /* vector registers (kWide): 8 rows x up to 3 vectors of 16 tokens, or 4 x 4; with 16 and */     \
  /* 16-lane vectors (generic): 6 rows x one vector, vector by vector (BLIS's 6x16). */            \
  template <WType T>                                                                               \
  void nk_panel(const void* w, int64_t k_dim, int64_t n0, int64_t n1, const float* xt, int64_t ldx,\
                int64_t lanes, float* c, int64_t ldc) {                                            \
    if constexpr (kLanes8) return nk_panel8<T>(w, k_dim, n0, n1, xt, lanes, c, ldc);               \
    alignas(64) float scratch[8 * kKc];                                                            \
    const int mv = static_cast<int>(lanes / 16);                                                   \
    const int64_t nr = kWide ? (mv <= 3 ? 8 : 4) : 6;                                              \
    const int64_t kcb = (kWide ? mv == 4 : mv >= 3) ? kKc / 2 : kKc;                               \
    for (int64_t kb = 0; kb < k_dim; kb += kcb) {                                                  \
      const int64_t kc = std::min(kcb, k_dim - kb);                                                \
      for (int64_t n = n0; n < n1; n += nr) {                                                      \
        const int64_t rows = std::min(nr, n1 - n);                                                 \
        const int64_t pn = n + nr < n1 ? n + nr : n0, pk = n + nr < n1 ? kb : kb + kcb;            \
        if (pk < k_dim)                                                                            \
          for (int64_t i = 0; i < std::min(nr, n1 - pn); ++i)                                      \
            for (int64_t b = 0; b < kc * kBytes<T>; b += 64)                                       \
              __builtin_prefetch(static_cast<const char*>(w) + ((pn + i) * k_dim + pk) * kBytes<T> + b, 0, 2);\
        int64_t ldw;                                                                               \
        const float* wr = weight_block<T>(w, k_dim, n, rows, kb, kc, scratch, ldw);                \
        float* cn = c + (n - n0) * ldc;                                                            \
        const float* xk = xt + kb * ldx;                                                           \
        if constexpr (kWide) {                                                                     \
          switch (mv) {                                                                            \
            case 1: op_block<8, 1>(wr, ldw, xk, ldx, kc, cn, ldc); break;                          \
            case 2: op_block<8, 2>(wr, ldw, xk, ldx, kc, cn, ldc); break;                          \
            case 3: op_block<8, 3>(wr, ldw, xk, ldx, kc, cn, ldc); break;                          \
            default: op_block<4, 4>(wr, ldw, xk, ldx, kc, cn, ldc); break;                         \
          }                                                                                        \
        } else {                                                                                   \
          for (int j = 0; j < mv; ++j) {                                                           \
            const float* xj = xk + 16 * j;                                                         \
            float* cj = cn + 16 * j;                                                               \
            switch (rows) {                                                                        \
              case 6: op_block<6, 1>(wr, ldw, xj, ldx, kc, cj, ldc); break;                        \
              case 5: op_block<5, 1>(wr, ldw, xj, ldx, kc, cj, ldc); break;                        \
              case 4: op_block<4, 1>(wr, ldw, xj, ldx, kc, cj, ldc); break;                        \
              case 3: op_block<3, 1>(wr, ldw, xj, ldx, kc, cj, ldc); break;                        \
              case 2: op_block<2, 1>(wr, ldw, xj, ldx, kc, cj, ldc); break;                        \
              default: op_block<1, 1>(wr, ldw, xj, ldx, kc, cj, ldc); break;                       \
            }                                                                                      \
          }                                                                                        \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* y = sum_k x[k] w[n, k] (* scale[n]), one weight row, four vectors in flight. Without 32 vector */\
  /* registers one activation row reads its weight rows one at a time: `nk_block`'s four rows */   \
  /* are four short streams a page apart (an int8 expert row is 1 KB), which AMD's prefetchers */  \
  /* follow worse than one (BENCHMARKS.md, "AVX2 machine"). */                                     \
  template <WType T>                                                                               \
  void nk_row1(const float* x, int64_t k_dim, const void* w, const float* scale, int64_t n, float* y) {\
    f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};                                                     \
    const int64_t base = n * k_dim;                                                                \
    int64_t k = 0;                                                                                 \
    for (; k + 64 <= k_dim; k += 64) {                                                             \
      a0 += loadf(x + k) * load16<T>(w, base + k);                                                 \
      a1 += loadf(x + k + 16) * load16<T>(w, base + k + 16);                                       \
      a2 += loadf(x + k + 32) * load16<T>(w, base + k + 32);                                       \
      a3 += loadf(x + k + 48) * load16<T>(w, base + k + 48);                                       \
    }                                                                                              \
    for (; k < k_dim; k += 16) a0 += loadf(x + k) * load16<T>(w, base + k);                        \
    *y = hsum((a0 + a1) + (a2 + a3)) * (scale ? scale[n] : 1.f);                                   \
  }                                                                                                \
                                                                                                   \
  /* y0[n - n0] = x0 . w0[n, :] (* s0[n]) and y1[n - n0] = x1 . w1[n, :] (* s1[n]) for n in [n0, n1): */\
  /* `nk_row1` over two matrices' rows side by side: on the AVX2 machine two weight streams per */ \
  /* core read ~8% faster than one (BENCHMARKS.md, "AVX2 machine, 2026-12-03 (morning)"). */       \
  template <WType T>                                                                               \
  void nk_row_pair(const float* x0, const void* w0, const float* s0, const float* x1, const void* w1,\
                   const float* s1, int64_t k_dim, int64_t n0, int64_t n1, float* y0, float* y1) { \
    for (int64_t n = n0; n < n1; ++n) {                                                            \
      f32x16 a0 = {}, a1 = {}, b0 = {}, b1 = {};                                                   \
      const int64_t base = n * k_dim;                                                              \
      int64_t k = 0;                                                                               \
      for (; k + 32 <= k_dim; k += 32) {                                                           \
        a0 += loadf(x0 + k) * load16<T>(w0, base + k);                                             \
        b0 += loadf(x1 + k) * load16<T>(w1, base + k);                                             \
        a1 += loadf(x0 + k + 16) * load16<T>(w0, base + k + 16);                                   \
        b1 += loadf(x1 + k + 16) * load16<T>(w1, base + k + 16);                                   \
      }                                                                                            \
      if (k < k_dim) {                                                                             \
        a0 += loadf(x0 + k) * load16<T>(w0, base + k);                                             \
        b0 += loadf(x1 + k) * load16<T>(w1, base + k);                                             \
      }                                                                                            \
      y0[n - n0] = hsum(a0 + a1) * (s0 ? s0[n] : 1.f);                                             \
      y1[n - n0] = hsum(b0 + b1) * (s1 ? s1[n] : 1.f);                                             \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* Whether one activation row reads [N, K] weight rows one at a time (`nk_row1`; in the MoE */  \
  /* layer two, `nk_row_pair`) rather than in `nk_block`'s four-row blocks: everywhere but int8 */ \
  /* with 32 vector registers. On Zen 5 (a C copy of `small`'s batch-1 MoE layers, alternating in */\
  /* one process) row pairs read float32 and bf16 1.09-1.21x faster than four-row blocks with */   \
  /* their prefetches, int8 0.85-0.98x (BENCHMARKS.md, "Zen 5 machine, third session"). */          \
  template <WType T>                                                                               \
  constexpr bool RowByRow() { return !kWide || T != WType::kI8; }                                  \
                                                                                                   \
  /* y[m * ldy + (n - n0)] = sum_k x[m, k] w[n, k] (* scale[n]) for n in [n0, n1). */              \
  template <WType T>                                                                               \
  void nk_rows(const float* x, int64_t m_rows, int64_t k_dim, const void* w, const float* scale,   \
               int64_t n0, int64_t n1, float* y, int64_t ldy) {                                    \
    if (RowByRow<T>() && m_rows == 1) {                                                            \
      for (int64_t n = n0; n < n1; ++n) nk_row1<T>(x, k_dim, w, scale, n, y + (n - n0));           \
      return;                                                                                      \
    }                                                                                              \
    for (int64_t n = n0; n < n1; n += 4) {                                                         \
      float* yn = y + (n - n0);                                                                    \
      int64_t m = 0;                                                                               \
      for (; m + 4 <= m_rows; m += 4)                                                              \
        nk_block<T, 4>(x + m * k_dim, k_dim, w, scale, n, yn + m * ldy, ldy);                      \
      switch (m_rows - m) {                                                                        \
        case 3: nk_block<T, 3>(x + m * k_dim, k_dim, w, scale, n, yn + m * ldy, ldy); break;       \
        case 2: nk_block<T, 2>(x + m * k_dim, k_dim, w, scale, n, yn + m * ldy, ldy); break;       \
        case 1: nk_block<T, 1>(x + m * k_dim, k_dim, w, scale, n, yn + m * ldy, ldy); break;       \
        default: break;                                                                            \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  /* e^(f ln 2) for f in [-0.5, 0.5] by its Taylor series to degree 7 (relative error ~1e-7); V is \
     float or a vector of floats. */                                                               \
  template <typename V>                                                                            \
  inline V exp2_fraction(V f) {                                                                    \
    V p = f * 1.52527338e-5f + 1.54035304e-4f;                                                     \
    p = p * f + 1.33335581e-3f;                                                                    \
    p = p * f + 9.61812911e-3f;                                                                    \
    p = p * f + 5.55041087e-2f;                                                                    \
    p = p * f + 2.40226507e-1f;                                                                    \
    p = p * f + 6.93147181e-1f;                                                                    \
    return p * f + 1.f;                                                                            \
  }                                                                                                \
                                                                                                   \
  /* e^x, branch-free so that loops over it vectorize: 2^n 2^f with n = round(x log2 e); x is      \
     clamped to [-87.3, 88.3], so the result stays a normal float (e^-87.3 ~ 1e-38, e^88.3 ~       \
     2e38). */                                                                                     \
  inline float exp_clamped(float x) {                                                              \
    const float t = std::min(std::max(x, -87.3f), 88.3f) * 1.44269504f;                            \
    const float n = (t + 12582912.f) - 12582912.f; /* round to nearest: 1.5 * 2^23 */              \
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;                                    \
    float scale;                                                                                   \
    std::memcpy(&scale, &bits, 4);                                                                 \
    return exp2_fraction(t - n) * scale;                                                           \
  }                                                                                                \
                                                                                                   \
  /* exp_clamped on eight lanes (GCC vector extensions: one instruction per operation with AVX2,   \
     two with SSE2). */                                                                            \
  inline f32x8v exp_clamped8(f32x8v x) {                                                           \
    const f32x8v lo = f32x8v{} - 87.3f, hi = f32x8v{} + 88.3f;                                     \
    x = x < lo ? lo : x;                                                                           \
    x = x > hi ? hi : x;                                                                           \
    const f32x8v t = x * 1.44269504f, n = (t + 12582912.f) - 12582912.f;                           \
    const i32x8v bits = (__builtin_convertvector(n, i32x8v) + 127) << 23;                          \
    return exp2_fraction(t - n) * (f32x8v)bits;  /* a cast between vector types keeps the bits */  \
  }                                                                                                \
                                                                                                   \
  /* h[l] = silu(g[l] a) (u[l] b) for l < n (SwiGLU's product; a, b int8 scales or 1), eight lanes \
     at a time: with the C library's scalar expf this took ~6% of a 264-token MoE layer. */        \
  void swiglu(const float* g, const float* u, int64_t n, float a, float b, float* h) {             \
    int64_t l = 0;                                                                                 \
    for (; l + 8 <= n; l += 8) {                                                                   \
      f32x8v gv, uv;                                                                               \
      std::memcpy(&gv, g + l, 32);                                                                 \
      std::memcpy(&uv, u + l, 32);                                                                 \
      const f32x8v v = gv * a, hv = v / (1.f + exp_clamped8(-v)) * (uv * b);                       \
      std::memcpy(h + l, &hv, 32);                                                                 \
    }                                                                                              \
    for (; l < n; ++l) {                                                                           \
      const float v = g[l] * a;                                                                    \
      h[l] = v / (1.f + exp_clamped(-v)) * (u[l] * b);                                             \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* Decode attention of one query row (N heads over K kv heads) over n consecutive slots of its   \
     cache row (slot s's K x H keys at k + s * stride, contiguous; H a multiple of 16), as a part  \
     of a split softmax: per head, its scores' max m, l = sum_s exp(score - m) and the unnormalised\
     acc [N, H] = sum_s exp(score - m) v[s]. Every slot's keys and values are read once, whole, for\
     all heads; eight heads' dot products are summed across lanes together (`hsum8`). sc: [N, n]   \
     scratch. k and v are float32 or bfloat16 (T), stride in elements. */                          \
  template <WType T>                                                                               \
  void attend_part(const float* q, const void* k, const void* v, int64_t stride, int64_t n,        \
                   int64_t n_heads, int64_t g_dim, int64_t h_dim, float scale, float* sc, float* m,\
                   float* l, float* acc) {                                                         \
    std::fill(m, m + n_heads, -std::numeric_limits<float>::infinity());                            \
    for (int64_t s = 0; s < n; ++s) {                                                              \
      for (int64_t h0 = 0; h0 < n_heads; h0 += 8) {                                                \
        const int64_t c = std::min<int64_t>(8, n_heads - h0);                                      \
        f32x16 d[8] = {};                                                                          \
        for (int64_t i = 0; i < c; ++i) {                                                          \
          const float* qh = q + (h0 + i) * h_dim;                                                  \
          const int64_t kh = s * stride + ((h0 + i) / g_dim) * h_dim;                              \
          d[i] = loadf(qh) * load16<T>(k, kh);                                                     \
          for (int64_t j = 16; j < h_dim; j += 16) d[i] += loadf(qh + j) * load16<T>(k, kh + j);   \
        }                                                                                          \
        float dots[8];                                                                             \
        hsum8(d, dots);                                                                            \
        for (int64_t i = 0; i < c; ++i) {                                                          \
          const float score = dots[i] * scale;                                                     \
          sc[(h0 + i) * n + s] = score;                                                            \
          m[h0 + i] = std::max(m[h0 + i], score);                                                  \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    for (int64_t h = 0; h < n_heads; ++h) {                                                        \
      float* row = sc + h * n;                                                                     \
      const float mh = m[h];                                                                       \
      for (int64_t s = 0; s < n; ++s) row[s] = exp_clamped(row[s] - mh);                           \
      f32x16 sum = {};                                                                             \
      int64_t s = 0;                                                                               \
      for (; s + 16 <= n; s += 16) sum += loadf(row + s);                                          \
      float total = hsum(sum);                                                                     \
      for (; s < n; ++s) total += row[s];                                                          \
      l[h] = total;                                                                                \
    }                                                                                              \
    std::fill(acc, acc + n_heads * h_dim, 0.f);                                                    \
    for (int64_t s = 0; s < n; ++s) {                                                              \
      for (int64_t h = 0; h < n_heads; ++h) {                                                      \
        const float p = sc[h * n + s];                                                             \
        const int64_t vh = s * stride + (h / g_dim) * h_dim;                                       \
        float* ah = acc + h * h_dim;                                                               \
        for (int64_t j = 0; j < h_dim; j += 16) storef(ah + j, loadf(ah + j) + p * load16<T>(v, vh + j));\
      }                                                                                            \
    }                                                                                              \
  }

constexpr int64_t kTile = 512;
// int8 rows against one activation row on AVX2 (avx2::dot_i16): the row's int16 rounding blocks,
// and how far ahead each weight stream is prefetched.
constexpr int64_t kQBlock = 64;
constexpr int64_t kRowAhead = 8192;
// The MoE layer for more rows than kMaxRows (prompt chunks): 16-lane activation panels of up to
// kPanel tokens per expert, k in blocks of kKc, half that for a 64-token panel (blocks of 16-24 KB
// stay in L1 beside the weight rows; 64-token panels ran 5-9% faster at 264-384 tokens with 64 than
// 128); 8-lane panels (`nk_panel8`) choose their own blocks.
constexpr int64_t kPanel = 64;
constexpr int64_t kKc = 128;
// Activation rows up to which [in, out] products split the weight rows over tasks (`kn_rows`),
// and tasks per thread there. One row (batch-1 decode): a [1024, 1024] projection read at
// 20 GB/s in column tiles (a few hundred bytes of each 4 KB row, then a jump) and 25-28 GB/s in
// row blocks; at 4 and 8 rows the partials' traffic made row blocks the slower (13-17 GB/s).
constexpr int64_t kKnSplitRows = 1;
constexpr int64_t kKnSplitTasks = 2;

// kn column tile for `rows` activation rows: 4 KB of each float32 weight row while the
// accumulators fit L1 (1024 beat 512 up to 4 rows), narrower until every thread gets about four
// tiles (a [1024, 1024] projection in one tile would run on one core).
int64_t KnTileWidth(int64_t rows, int64_t n, int64_t threads) {
  int64_t width = rows <= 4 ? 2 * kTile : kTile;
  while (width > 64 && n < 4 * threads * width) width /= 2;
  return width;
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
constexpr bool kWide = true;  // 32 vector registers
constexpr bool kLanes8 = false;  // panels in whole 16-lane vectors, up to kPanel tokens
typedef float f32x16 __attribute__((vector_size(64)));
inline f32x16 loadf(const float* p) {
  f32x16 r;
  std::memcpy(&r, p, 64);
  return r;
}
inline void storef(float* p, f32x16 v) { std::memcpy(p, &v, 64); }
inline f32x16 widen_i8(const int8_t* p) {
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline f32x16 widen_bf16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (f32x16)_mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline float hsum(f32x16 v) { return _mm512_reduce_add_ps((__m512)v); }
inline void hsum8(const f32x16* d, float* out) {
  for (int i = 0; i < 8; ++i) out[i] = hsum(d[i]);
}
MJ_KERNEL_BODY
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr bool kWide = false;
// Panels in 8-lane vectors (one register; `nk_panel8`): an expert's tokens are padded to 8, not 16
// (a 128-token chunk's experts average 32 tokens and were padded ~25% beyond them), and each
// expert's tokens make one panel however many.
constexpr bool kLanes8 = true;
// Sixteen lanes as two ymm registers. GCC lowers a 64-byte vector_size type without AVX-512
// through the stack (each FMA of a register block stored and reloaded in 16-byte pieces: the
// panel kernel ran 6x slower than XLA); as a pair of 32-byte vectors every operation is one
// instruction per half and the blocks stay in registers.
typedef float f32x8 __attribute__((vector_size(32)));
struct f32x16 {
  f32x8 lo, hi;
  float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
};
inline f32x16 operator+(f32x16 a, f32x16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline f32x16 operator*(f32x16 a, f32x16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline f32x16 operator*(float s, f32x16 b) { return {s * b.lo, s * b.hi}; }
inline f32x16& operator+=(f32x16& a, f32x16 b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
inline f32x16 loadf(const float* p) { return {(f32x8)_mm256_loadu_ps(p), (f32x8)_mm256_loadu_ps(p + 8)}; }
inline void storef(float* p, f32x16 v) {
  _mm256_storeu_ps(p, (__m256)v.lo);
  _mm256_storeu_ps(p + 8, (__m256)v.hi);
}
inline f32x16 widen_i8(const int8_t* p) {
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  return {(f32x8)lo, (f32x8)hi};
}
inline f32x16 widen_bf16(const uint16_t* p) {
  const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16);
  return {(f32x8)_mm256_castsi256_ps(lo), (f32x8)_mm256_castsi256_ps(hi)};
}
inline float hsum(f32x16 v) {
  const __m256 s8 = (__m256)(v.lo + v.hi);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// out[i] = hsum(d[i]) for eight vectors at once: a tree of horizontal adds, ~10 instructions where
// eight `hsum`s take ~50.
inline void hsum8(const f32x16* d, float* out) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = (__m256)(d[i].lo + d[i].hi);
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
MJ_KERNEL_BODY

// One activation row against int8 [N, K] rows (decode at batch 1), the row rounded to int16 per
// block of kQBlock (`quantize_i16`; within 2^-16 of the block's largest value, 2^8 finer than the
// weights' own rounding) and multiplied by `vpmaddwd` on the weights widened to int16: one
// widening instruction per 16 weights where the float path takes four (widen to int32, convert,
// for both halves), which on this processor left the weight stream at 65-73% of a bare read. Each
// 64-product block is summed in int32 (at most 4 * 2 * 32767 * 128, far from overflow) and scaled
// into float32. Rows are prefetched kRowAhead bytes on: with the lighter loop the hardware
// prefetchers alone no longer kept up. Measured with a C copy of the MoE decode pattern (8 layers
// x 2 experts of `small`, 2 threads, alternating in one process): 1.27-1.30x the float path's
// speed, at 84-98% of a bare threaded read of the same bytes; in the library, the MoE layers
// 1.14x and batch-1 int8 decode 1.15x (BENCHMARKS.md, "AVX2 machine").

// q[i] = round(x[i] / s[i / kQBlock]), s = the block's largest |x| / 32767; false (q, s unusable)
// when x holds a NaN or an infinity, which rounding would hide.
bool quantize_i16(const float* x, int64_t k, int16_t* q, float* s) {
  for (int64_t b = 0; b < k; b += kQBlock) {
    const int64_t n = std::min(kQBlock, k - b);
    float most = 0.f;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      finite &= std::isfinite(x[b + i]);
      most = std::max(most, std::fabs(x[b + i]));
    }
    if (!finite) return false;
    const float scale = most > 0.f ? most / 32767.f : 1.f, inv = 1.f / scale;
    s[b / kQBlock] = scale;
    for (int64_t i = 0; i < n; ++i) q[b + i] = static_cast<int16_t>(std::lrintf(x[b + i] * inv));
  }
  return true;
}

inline __m256i madd16(const int16_t* q, const int8_t* w) {
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}

// sum_{i < n} q[i] w[i] in eight int32 lanes (n a multiple of 16, at most kQBlock).
inline __m256i block_sum(const int16_t* q, const int8_t* w, int64_t n) {
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 16) sum = _mm256_add_epi32(sum, madd16(q + i, w + i));
  return sum;
}

// sum_k q[k] s[k / kQBlock] w[k] (k a multiple of 16), two blocks in flight.
float dot_i16(const int16_t* q, const float* s, const int8_t* w, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 * kQBlock <= k; b += 2 * kQBlock) {
    __builtin_prefetch(w + b + kRowAhead, 0, 3);
    __builtin_prefetch(w + b + kRowAhead + 64, 0, 3);
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sum(q + b, w + b, kQBlock)), _mm256_set1_ps(s[b / kQBlock]), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sum(q + b + kQBlock, w + b + kQBlock, kQBlock)),
                         _mm256_set1_ps(s[b / kQBlock + 1]), a1);
  }
  for (; b < k; b += kQBlock)
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sum(q + b, w + b, std::min(kQBlock, k - b))),
                         _mm256_set1_ps(s[b / kQBlock]), a0);
  return hsum({(f32x8)a0, (f32x8)a1});
}
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace generic {
constexpr bool kWide = false;
constexpr bool kLanes8 = false;
typedef float f32x16 __attribute__((vector_size(64)));
inline f32x16 loadf(const float* p) {
  f32x16 r;
  std::memcpy(&r, p, 64);
  return r;
}
inline void storef(float* p, f32x16 v) { std::memcpy(p, &v, 64); }
inline f32x16 widen_i8(const int8_t* p) {
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = p[i];
  return r;
}
inline f32x16 widen_bf16(const uint16_t* p) {
  f32x16 r;
  for (int i = 0; i < 16; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&r[0] + i, &bits, 4);
  }
  return r;
}
inline float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
inline void hsum8(const f32x16* d, float* out) {
  for (int i = 0; i < 8; ++i) out[i] = hsum(d[i]);
}
MJ_KERNEL_BODY
}  // namespace generic

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa DetectIsa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

const Isa kIsa = DetectIsa();

template <WType T>
void KnTile(const float* x, int64_t m, int64_t k, const void* w, int64_t n, const float* s, int64_t n0,
            int64_t nt, float* y) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::kn_tile<T>(x, m, k, w, n, s, n0, nt, y);
  if (kIsa == Isa::kAvx2) return avx2::kn_tile<T>(x, m, k, w, n, s, n0, nt, y);
#endif
  generic::kn_tile<T>(x, m, k, w, n, s, n0, nt, y);
}

template <WType T>
void KnRows(const float* x, int64_t m, int64_t k, const void* w, int64_t n, int64_t k0, int64_t k1, float* acc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::kn_rows<T>(x, m, k, w, n, k0, k1, acc);
  if (kIsa == Isa::kAvx2) return avx2::kn_rows<T>(x, m, k, w, n, k0, k1, acc);
#endif
  generic::kn_rows<T>(x, m, k, w, n, k0, k1, acc);
}

template <WType T>
void NkPanel(const void* w, int64_t k, int64_t n0, int64_t n1, const float* xt, int64_t ldx, int64_t lanes, float* c,
             int64_t ldc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::nk_panel<T>(w, k, n0, n1, xt, ldx, lanes, c, ldc);
  if (kIsa == Isa::kAvx2) return avx2::nk_panel<T>(w, k, n0, n1, xt, ldx, lanes, c, ldc);
#endif
  generic::nk_panel<T>(w, k, n0, n1, xt, ldx, lanes, c, ldc);
}

// The token granularity of `NkPanel`'s panels on this processor (8 where they are made of 8-lane
// vectors, and each expert's tokens make one panel).
int64_t PanelLanes() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::kLanes8 ? 8 : 16;
  if (kIsa == Isa::kAvx2) return avx2::kLanes8 ? 8 : 16;
#endif
  return generic::kLanes8 ? 8 : 16;
}

template <WType T>
void NkRows(const float* x, int64_t m, int64_t k, const void* w, const float* s, int64_t n0, int64_t n1,
            float* y, int64_t ldy) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::nk_rows<T>(x, m, k, w, s, n0, n1, y, ldy);
  if (kIsa == Isa::kAvx2) return avx2::nk_rows<T>(x, m, k, w, s, n0, n1, y, ldy);
#endif
  generic::nk_rows<T>(x, m, k, w, s, n0, n1, y, ldy);
}

template <WType T>
void NkRowPair(const float* x0, const void* w0, const float* s0, const float* x1, const void* w1, const float* s1,
               int64_t k, int64_t n0, int64_t n1, float* y0, float* y1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::nk_row_pair<T>(x0, w0, s0, x1, w1, s1, k, n0, n1, y0, y1);
  if (kIsa == Isa::kAvx2) return avx2::nk_row_pair<T>(x0, w0, s0, x1, w1, s1, k, n0, n1, y0, y1);
#endif
  generic::nk_row_pair<T>(x0, w0, s0, x1, w1, s1, k, n0, n1, y0, y1);
}

void SwiGlu(const float* g, const float* u, int64_t n, float a, float b, float* h) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512) return avx512::swiglu(g, u, n, a, b, h);
  if (kIsa == Isa::kAvx2) return avx2::swiglu(g, u, n, a, b, h);
#endif
  generic::swiglu(g, u, n, a, b, h);
}

// One activation row rounded for `DotI16`, where the processor takes the int16 path for int8
// weights: AVX2 only, where it was measured (AVX-512's four-row blocks already read int8 at
// llama.cpp q8_0's speed; BENCHMARKS.md). `ok` false: take the float path.
struct QuantizedRow {
  std::vector<int16_t> q;
  std::vector<float> s;
  int64_t k = 0;
  bool ok = false;
};

QuantizedRow QuantizeRow(const float* x, int64_t k) {
  QuantizedRow r;
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx2) {
    r.q.resize(k);
    r.s.resize((k + kQBlock - 1) / kQBlock);
    r.k = k;
    r.ok = avx2::quantize_i16(x, k, r.q.data(), r.s.data());
  }
#endif
  return r;
}

// sum_k x[k] w[k] for the row `r` rounds (r.ok) and one int8 weight row w [r.k].
float DotI16(const QuantizedRow& r, const int8_t* w) {
#if defined(__x86_64__) && defined(__GNUC__)
  return avx2::dot_i16(r.q.data(), r.s.data(), w, r.k);
#else
  return 0.f;  // not reached: QuantizeRow leaves ok false
#endif
}

// Workers that spin between the many short parallel loops of a decode step. Handing each loop to
// XLA's intra-op pool woke a sleeping thread every time (six loops per layer); spinning workers,
// as llama.cpp's, start within microseconds (int8 and bf16 decode ~10% faster, float32 unchanged:
// it is bound by memory). A worker spins for `kSpin` after a loop, then sleeps.
class SpinPool {
 public:
  static SpinPool& Get() {
    static SpinPool* pool = new SpinPool();  // never destroyed: detached workers hold it
    return *pool;
  }
  int64_t workers() const { return workers_; }

  // fn(0..n-1) on the caller and the workers; returns when all are done. Each loop has its own
  // counters: a worker that arrives late claims past the end and leaves without calling fn.
  void Run(int64_t n, const std::function<void(int64_t)>& fn) {
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->Work();
    while (job->done.load(std::memory_order_acquire) < n) Pause();
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        (*fn)(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  static int64_t Cores() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }
  SpinPool() : workers_(Cores() - 1) {
    for (int64_t i = 0; i < workers_; ++i) std::thread([this] { Loop(); }).detach();
  }
  static void Pause() {
#if defined(__x86_64__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins)
        if (spins % 64 == 0 && std::chrono::steady_clock::now() > until) break;
        else Pause();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        job = job_;
      }
      job->Work();
    }
  }

  // Longer than the gaps between a decode step's loops (tens of microseconds), short enough
  // not to take a core from XLA's own threads for long when the step goes on to a prompt chunk.
  static constexpr std::chrono::microseconds kSpin{200};
  const int64_t workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
};

template <typename F>
void ParallelFor(int64_t n, const F& fn) {
  SpinPool& pool = SpinPool::Get();
  if (n <= 1 || pool.workers() == 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool.Run(n, std::function<void(int64_t)>(std::cref(fn)));
}

WType WeightType(ffi::DataType t) {
  if (t == ffi::DataType::BF16) return WType::kBF16;
  if (t == ffi::DataType::S8) return WType::kI8;
  return WType::kF32;
}

bool SupportedWeight(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::S8;
}

template <typename Fn>
void WithType(WType t, const Fn& fn) {
  if (t == WType::kF32) fn(std::integral_constant<WType, WType::kF32>());
  else if (t == WType::kBF16) fn(std::integral_constant<WType, WType::kBF16>());
  else fn(std::integral_constant<WType, WType::kI8>());
}

// Whether one activation row's MoE layer reads its single weight rows in pairs (`MoeRowPairs`):
// where `nk_rows` reads them one at a time (`RowByRow`).
bool RowPairs(WType t) {
  bool pairs = false;
  WithType(t, [&](auto tc) {
    constexpr WType T = decltype(tc)::value;
#if defined(__x86_64__) && defined(__GNUC__)
    if (kIsa == Isa::kAvx512) pairs = avx512::RowByRow<T>();
    else if (kIsa == Isa::kAvx2) pairs = avx2::RowByRow<T>();
    else
#endif
      pairs = generic::RowByRow<T>();
  });
  return pairs;
}

// x [M, K] float32; w [K, N] (nk = false) or [N, K] (nk = true) in f32/bf16/s8; scale [N] float32
// (ignored unless w is s8); y [M, N] float32.
ffi::Error LinearImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool nk) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("mj_linear: x and w must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != k || m > kMaxRows || k % 16 || n % 16 || !SupportedWeight(w.element_type()))
    return ffi::Error::InvalidArgument("mj_linear: unsupported shapes or weight type");
  const WType t = WeightType(w.element_type());
  const float* s = t == WType::kI8 ? scale.typed_data() : nullptr;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const void* wp = w.untyped_data();
  WithType(t, [&](auto tc) {
    constexpr WType T = decltype(tc)::value;
    if (nk) {
      const int64_t rows = 64, tasks = (n + rows - 1) / rows;
      if constexpr (T == WType::kI8) {
        const QuantizedRow qx = m == 1 ? QuantizeRow(xp, k) : QuantizedRow();
        if (qx.ok) {
          const int8_t* wi = static_cast<const int8_t*>(wp);
          ParallelFor(tasks, [&](int64_t i) {
            for (int64_t r = i * rows; r < std::min(n, (i + 1) * rows); ++r) yp[r] = DotI16(qx, wi + r * k) * s[r];
          });
          return;
        }
      }
      ParallelFor(tasks, [&](int64_t i) {
        NkRows<T>(xp, m, k, wp, s, i * rows, std::min(n, (i + 1) * rows), yp + i * rows, n);
      });
    } else if (m <= kKnSplitRows) {
      // Tasks over blocks of weight rows, each summing its block into its own partial [m, n];
      // the partials are added after, over column blocks.
      const int64_t threads = SpinPool::Get().workers() + 1;
      const int64_t per = std::max<int64_t>(16, (k / (kKnSplitTasks * threads) + 15) / 16 * 16);
      const int64_t tasks = (k + per - 1) / per;
      thread_local std::vector<float> partial;
      if (static_cast<int64_t>(partial.size()) < tasks * m * n) partial.resize(tasks * m * n);
      float* pp = partial.data();
      ParallelFor(tasks, [&](int64_t i) {
        KnRows<T>(xp, m, k, wp, n, i * per, std::min(k, (i + 1) * per), pp + i * m * n);
      });
      const int64_t cols = 4096, blocks = (n + cols - 1) / cols;
      ParallelFor(blocks, [&](int64_t b) {
        const int64_t j0 = b * cols, j1 = std::min(n, j0 + cols);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = j0; j < j1; ++j) {
            float sum = 0.f;
            for (int64_t i = 0; i < tasks; ++i) sum += pp[(i * m + r) * n + j];
            yp[r * n + j] = sum * (s ? s[j] : 1.f);
          }
      });
    } else {
      const int64_t tile = KnTileWidth(m, n, SpinPool::Get().workers() + 1), tasks = (n + tile - 1) / tile;
      ParallelFor(tasks, [&](int64_t i) {
        KnTile<T>(xp, m, k, wp, n, s, i * tile, std::min(tile, n - i * tile), yp);
      });
    }
  });
  return ffi::Error::Success();
}

// Weight rows per MoE task (hidden rows in stage 1, output columns in stage 2), both MoE paths.
constexpr int64_t kRows = 64;

// A run of an expert's panel lanes stored k-major on its own: lanes [first, first + lanes), row k
// at first * K + k * stride floats (K the rows' length: D for the tokens, F for the hidden panel).
struct LaneBlock {
  int64_t first, lanes, stride;
};

// How `MoePanels` stores an expert's panel of mpad lanes for `NkPanel`. 8-lane panels: one block
// per register-block group of vectors (`nk_panel8`). 16-lane panels: one block of every lane, its
// rows 8 lanes further apart where mpad is a multiple of 32 from 64 up (rows a multiple of 128
// bytes apart fall in half of L1's sets or fewer: on AVX2 with the weights streaming from memory
// 96 tokens ran at 69 GFLOP/s a core against 81 with the 8 lanes more, 128 at 71-75 against 81-83;
// BENCHMARKS.md, "AVX2 machine, 2026-12-03 (day)").
std::vector<LaneBlock> PanelBlocks(int64_t mpad, bool grouped) {
  if (!grouped) return {{0, mpad, mpad + (mpad >= 64 && mpad % 32 == 0 ? 8 : 0)}};
  std::vector<LaneBlock> blocks;
  for (int64_t j = 0, nv = mpad / 8; j < nv;) {
    const int64_t g = GroupVectors(nv - j);
    blocks.push_back({8 * j, 8 * g, 8 * g});
    j += g;
  }
  return blocks;
}

// The MoE layer for many tokens (a prompt chunk), bound by arithmetic rather than memory: each
// expert's rows gathered transposed ([D, rows rounded up to `PanelLanes`, 8 or 16], tokens along
// the vector lanes), then register-blocked outer products (`nk_panel`) that use every weight
// broadcast for up to kPanel tokens (any number in 8-lane panels). No rows are padded beyond that
// rounding (XLA's `sorted` steps pad to 32).
// Stage 1 tasks: (expert, 64 hidden rows); stage 2 tasks: 64 output columns over all experts (128
// with 8-lane panels), so no two tasks add into the same output. Each stage-2 task reads every
// expert's hidden panel, [F, tokens]: at 512 tokens, 1.8 MB an expert, more than the task's
// weights, from L3; 128 columns halve that traffic (a 512-token layer 7% faster, one of 128 tokens
// within 2%: BENCHMARKS.md, "AVX2 machine, 2026-12-03").
void MoePanels(const float* x, int64_t t_dim, int64_t d, int64_t f, int64_t top, const float* g,
               const std::vector<std::vector<int64_t>>& rows, const std::vector<int64_t>& active,
               const std::vector<const void*>& wp, const std::vector<const float*>& sp, int64_t n_experts,
               WType t, float* y) {
  // mpad: an expert's tokens rounded up to whole vectors; blocks: how its panels are stored
  // (`PanelBlocks`).
  std::vector<int64_t> mpad(n_experts, 0);
  std::vector<std::vector<LaneBlock>> blocks(n_experts);
  // Uninitialised: every lane of ht is written in stage 1, and xt's padding lanes are zeroed below.
  std::vector<std::unique_ptr<float[]>> xt(n_experts), ht(n_experts);
  // With 16-lane vectors, each expert's vectors split into as few panels of at most kPanel tokens
  // as possible, evenly (5 vectors: 3 + 2, not 4 + 1: a one-vector panel broadcasts a weight per
  // FMA); with 8-lane vectors one panel of all of them. Panels as (first token, tokens).
  std::vector<std::vector<std::pair<int64_t, int64_t>>> panels(n_experts);
  const int64_t lanes = PanelLanes();
  const bool one_panel = lanes == 8;
  // The stride of a panel's products (one row of w per stride): the widest panel.
  int64_t ldc = one_panel ? 0 : kPanel;
  for (int64_t e : active) {
    const int64_t r = rows[e].size();
    mpad[e] = (r + lanes - 1) / lanes * lanes;
    if (one_panel) {
      panels[e].emplace_back(0, mpad[e]);
      ldc = std::max(ldc, mpad[e]);
    } else {
      const int64_t vecs = mpad[e] / 16, n = (mpad[e] + kPanel - 1) / kPanel;
      for (int64_t i = 0, at = 0; i < n; ++i) {
        const int64_t size = 16 * (vecs / n + (i < vecs % n));
        panels[e].emplace_back(at, size);
        at += size;
      }
    }
    blocks[e] = PanelBlocks(mpad[e], one_panel);
    const int64_t width = blocks[e].back().first + blocks[e].back().stride;
    xt[e].reset(new float[d * width]);
    ht[e].reset(new float[f * width]);
  }
  // Each expert's tokens transposed into its panel blocks, experts in parallel.
  ParallelFor(static_cast<int64_t>(active.size()), [&](int64_t i) {
    const int64_t e = active[i], r = rows[e].size();
    for (const LaneBlock& b : blocks[e]) {
      float* xb = xt[e].get() + b.first * d;
      const int64_t valid = std::clamp<int64_t>(r - b.first, 0, b.lanes);
      for (int64_t k = 0; k < d; ++k) std::fill(xb + k * b.stride + valid, xb + k * b.stride + b.lanes, 0.f);
      for (int64_t m = 0; m < valid; ++m) {
        const float* xm = x + (rows[e][b.first + m] / top) * d;
        for (int64_t k = 0; k < d; ++k) xb[k * b.stride + m] = xm[k];
      }
    }
  });
  std::memset(y, 0, sizeof(float) * t_dim * d);
  WithType(t, [&](auto tc) {
    constexpr WType T = decltype(tc)::value;
    const int64_t f_tasks = (f + kRows - 1) / kRows;
    ParallelFor(static_cast<int64_t>(active.size()) * f_tasks, [&](int64_t i) {
      const int64_t e = active[i / f_tasks], f0 = (i % f_tasks) * kRows, f1 = std::min(f, f0 + kRows);
      const float *sg = sp[e], *su = sp[n_experts + e];
      // All of the expert's panels against the gate rows, then against the up rows, so that each
      // task's 64 rows of one matrix (256 KB in float32) can stay in L2 from one panel to the next
      // (gate and up rows together fill a 512 KB L2).
      const int64_t np = static_cast<int64_t>(panels[e].size()), block = kRows * ldc;
      thread_local std::vector<float> cg, cu;
      cg.assign(np * block, 0.f);
      cu.assign(np * block, 0.f);
      const int64_t ld = blocks[e][0].stride;  // 16-lane panels: their one block's
      for (int64_t j = 0; j < np; ++j)
        NkPanel<T>(wp[e], d, f0, f1, xt[e].get() + panels[e][j].first, ld, panels[e][j].second, &cg[j * block], ldc);
      for (int64_t j = 0; j < np; ++j)
        NkPanel<T>(wp[n_experts + e], d, f0, f1, xt[e].get() + panels[e][j].first, ld, panels[e][j].second,
                   &cu[j * block], ldc);
      // Each panel's lanes into the hidden panel's blocks they fall in (one panel in 8-lane blocks,
      // or 16-lane panels in one block).
      for (int64_t j = 0; j < np; ++j) {
        const auto [p0, size] = panels[e][j];
        for (const LaneBlock& b : blocks[e]) {
          const int64_t lo = std::max(p0, b.first), hi = std::min(p0 + size, b.first + b.lanes);
          if (lo >= hi) continue;
          float* hb = ht[e].get() + b.first * f + (lo - b.first);
          for (int64_t n = f0; n < f1; ++n)
            SwiGlu(&cg[j * block + (n - f0) * ldc + lo - p0], &cu[j * block + (n - f0) * ldc + lo - p0], hi - lo,
                   sg ? sg[n] : 1.f, su ? su[n] : 1.f, hb + n * b.stride);
        }
      }
    });
    const int64_t d_rows = one_panel ? 2 * kRows : kRows, d_tasks = (d + d_rows - 1) / d_rows;
    ParallelFor(d_tasks, [&](int64_t i) {
      const int64_t d0 = i * d_rows, d1 = std::min(d, d0 + d_rows);
      thread_local std::vector<float> c;
      c.resize(d_rows * ldc);
      for (int64_t e : active) {
        const float* sd = sp[2 * n_experts + e];
        const int64_t r = rows[e].size();
        for (const auto& [p0, size] : panels[e]) {
          std::fill(c.begin(), c.end(), 0.f);
          NkPanel<T>(wp[2 * n_experts + e], f, d0, d1, ht[e].get() + p0, blocks[e][0].stride, size, c.data(), ldc);
          for (int64_t l = 0; l < std::min(size, r - p0); ++l) {
            const int64_t a = rows[e][p0 + l];
            float* yt = y + (a / top) * d;
            for (int64_t n = d0; n < d1; ++n) yt[n] += g[a] * c[(n - d0) * ldc + l] * (sd ? sd[n] : 1.f);
          }
        }
      }
    });
  });
}

// `MoeImpl` for one token and int8 experts on the int16 path: each gate row followed by its up row
// (both streams run ahead of their prefetches), then the hidden rows rounded for stage 2. False,
// y untouched, when a hidden row is not finite (the float path then redoes the layer).
bool MoeRowI16(const QuantizedRow& qx, int64_t d, int64_t f, const std::vector<std::vector<int64_t>>& rows,
               const std::vector<int64_t>& active, const float* g, const std::vector<const void*>& wp,
               const std::vector<const float*>& sp, int64_t n_experts, float* y) {
  const auto w = [&](int64_t i) { return static_cast<const int8_t*>(wp[i]); };
  std::vector<std::vector<float>> hs(n_experts);
  for (int64_t e : active) hs[e].resize(f);
  const int64_t f_tasks = (f + kRows - 1) / kRows;
  ParallelFor(static_cast<int64_t>(active.size()) * f_tasks, [&](int64_t i) {
    const int64_t e = active[i / f_tasks], f0 = (i % f_tasks) * kRows, f1 = std::min(f, f0 + kRows);
    float gate[kRows], up[kRows];
    for (int64_t n = f0; n < f1; ++n) {
      gate[n - f0] = DotI16(qx, w(e) + n * d) * sp[e][n];
      up[n - f0] = DotI16(qx, w(n_experts + e) + n * d) * sp[n_experts + e][n];
    }
    SwiGlu(gate, up, f1 - f0, 1.f, 1.f, &hs[e][f0]);
  });
  std::vector<QuantizedRow> qh(n_experts);
  std::vector<float> weight(n_experts, 0.f);  // the token's gate for each expert
  for (int64_t e : active) {
    qh[e] = QuantizeRow(hs[e].data(), f);
    if (!qh[e].ok) return false;
    for (int64_t a : rows[e]) weight[e] += g[a];
  }
  const int64_t d_tasks = (d + kRows - 1) / kRows;
  ParallelFor(d_tasks, [&](int64_t i) {
    for (int64_t n = i * kRows; n < std::min(d, (i + 1) * kRows); ++n) {
      float sum = 0.f;
      for (int64_t e : active) sum += weight[e] * (DotI16(qh[e], w(2 * n_experts + e) + n * f) * sp[2 * n_experts + e][n]);
      y[n] = sum;
    }
  });
  return true;
}

// `MoeImpl` for one token where `RowPairs`: each gate row read beside its up row, and in stage 2
// the experts' down rows two at a time (two weight streams per core; the MoE layers of batch-1
// decode ~8% faster on the AVX2 machine: BENCHMARKS.md, "AVX2 machine, 2026-12-03 (morning)").
void MoeRowPairs(const float* x, int64_t d, int64_t f, const std::vector<std::vector<int64_t>>& rows,
                 const std::vector<int64_t>& active, const float* g, const std::vector<const void*>& wp,
                 const std::vector<const float*>& sp, int64_t n_experts, WType t, float* y) {
  std::vector<std::vector<float>> hs(n_experts);
  std::vector<float> weight(n_experts, 0.f);  // the token's gate for each expert
  for (int64_t e : active) {
    hs[e].resize(f);
    for (int64_t a : rows[e]) weight[e] += g[a];
  }
  WithType(t, [&](auto tc) {
    constexpr WType T = decltype(tc)::value;
    const int64_t f_tasks = (f + kRows - 1) / kRows;
    ParallelFor(static_cast<int64_t>(active.size()) * f_tasks, [&](int64_t i) {
      const int64_t e = active[i / f_tasks], f0 = (i % f_tasks) * kRows, f1 = std::min(f, f0 + kRows);
      float gate[kRows], up[kRows];
      NkRowPair<T>(x, wp[e], sp[e], x, wp[n_experts + e], sp[n_experts + e], d, f0, f1, gate, up);
      SwiGlu(gate, up, f1 - f0, 1.f, 1.f, &hs[e][f0]);
    });
    const int64_t d_tasks = (d + kRows - 1) / kRows, n_active = static_cast<int64_t>(active.size());
    ParallelFor(d_tasks, [&](int64_t i) {
      const int64_t d0 = i * kRows, d1 = std::min(d, d0 + kRows);
      float out0[kRows], out1[kRows];
      const auto add = [&](int64_t e, const float* out) {
        for (int64_t n = d0; n < d1; ++n) y[n] += weight[e] * out[n - d0];
      };
      std::fill(y + d0, y + d1, 0.f);
      for (int64_t j = 0; j < n_active; j += 2) {
        const int64_t e0 = active[j], w0 = 2 * n_experts + e0;
        if (j + 1 < n_active) {
          const int64_t e1 = active[j + 1], w1 = 2 * n_experts + e1;
          NkRowPair<T>(hs[e0].data(), wp[w0], sp[w0], hs[e1].data(), wp[w1], sp[w1], f, d0, d1, out0, out1);
          add(e0, out0);
          add(e1, out1);
        } else {  // the last of an odd number of experts
          NkRows<T>(hs[e0].data(), 1, f, wp[w0], sp[w0], d0, d1, out0, kRows);
          add(e0, out0);
        }
      }
    });
  });
}

// The MoE layer for a few tokens: y[t] = sum_x gate[t, x] * SwiGLU_{e[t, x]}(x[t]), reading only
// the selected experts. x [T, D] f32; experts [T, X] s32 (-1: skip); gates [T, X] f32; then
// w_gate[0..E), w_up[0..E) ([F, D]), w_down[0..E) ([D, F]) and, when quantized, their scales
// ([F] or [D] f32) in the same order. y [T, D] f32.
ffi::Error MoeImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> experts,
                   ffi::Buffer<ffi::F32> gates, ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> y,
                   int64_t n_experts) {
  const int64_t t_dim = x.dimensions()[0], d = x.dimensions()[1], top = experts.dimensions()[1];
  const bool quantized = static_cast<int64_t>(rest.size()) == 6 * n_experts;
  if (static_cast<int64_t>(rest.size()) != (quantized ? 6 : 3) * n_experts)
    return ffi::Error::InvalidArgument("mj_moe: expected 3 or 6 weight operands per expert");
  // Weight and scale pointers, decoded once: [0, E) gate, [E, 2E) up, [2E, 3E) down.
  const ffi::AnyBuffer w0 = rest.get<ffi::AnyBuffer>(0).value();
  const int64_t f = w0.dimensions()[0];
  if (d % 16 || f % 16 || !SupportedWeight(w0.element_type()) || w0.dimensions()[1] != d)
    return ffi::Error::InvalidArgument("mj_moe: unsupported shapes or weight type");
  const WType t = WeightType(w0.element_type());
  std::vector<const void*> wp(3 * n_experts);
  std::vector<const float*> sp(3 * n_experts, nullptr);
  for (int64_t i = 0; i < 3 * n_experts; ++i) {
    wp[i] = rest.get<ffi::AnyBuffer>(i).value().untyped_data();
    if (quantized) sp[i] = rest.get<ffi::AnyBuffer>(3 * n_experts + i).value().typed_data<float>();
  }

  // Assignments grouped by expert; each active expert gets its rows gathered once.
  const int32_t* ex = experts.typed_data();
  const float* g = gates.typed_data();
  std::vector<std::vector<int64_t>> rows(n_experts);
  for (int64_t i = 0; i < t_dim * top; ++i)
    if (ex[i] >= 0 && ex[i] < n_experts) rows[ex[i]].push_back(i);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < n_experts; ++e)
    if (!rows[e].empty()) active.push_back(e);
  // One token against int8 experts on AVX2: its row rounded once for every expert (`DotI16`).
  if (t == WType::kI8 && quantized && t_dim == 1) {
    const QuantizedRow qx = QuantizeRow(x.typed_data(), d);
    if (qx.ok && MoeRowI16(qx, d, f, rows, active, g, wp, sp, n_experts, y->typed_data()))
      return ffi::Error::Success();
  }
  if (t_dim == 1 && RowPairs(t)) {
    MoeRowPairs(x.typed_data(), d, f, rows, active, g, wp, sp, n_experts, t, y->typed_data());
    return ffi::Error::Success();
  }
  if (t_dim > kMaxRows) {
    MoePanels(x.typed_data(), t_dim, d, f, top, g, rows, active, wp, sp, n_experts, t, y->typed_data());
    return ffi::Error::Success();
  }
  std::vector<std::vector<float>> xs(n_experts), hs(n_experts);
  for (int64_t e : active) {
    xs[e].resize(rows[e].size() * d);
    hs[e].resize(rows[e].size() * f);
    for (size_t r = 0; r < rows[e].size(); ++r)
      std::memcpy(&xs[e][r * d], x.typed_data() + (rows[e][r] / top) * d, sizeof(float) * d);
  }
  float* yp = y->typed_data();
  std::memset(yp, 0, sizeof(float) * t_dim * d);

  WithType(t, [&](auto tc) {
    constexpr WType T = decltype(tc)::value;
    // Stage 1: h = silu(x w_gate^T) * (x w_up^T), tasks over (expert, 64 hidden rows).
    const int64_t f_tasks = (f + kRows - 1) / kRows;
    ParallelFor(static_cast<int64_t>(active.size()) * f_tasks, [&](int64_t i) {
      const int64_t e = active[i / f_tasks], f0 = (i % f_tasks) * kRows, f1 = std::min(f, f0 + kRows);
      const int64_t r = rows[e].size();
      float gate_out[kMaxRows * kRows], up_out[kMaxRows * kRows];
      for (int64_t r0 = 0; r0 < r; r0 += kMaxRows) {
        const int64_t rb = std::min<int64_t>(kMaxRows, r - r0);
        NkRows<T>(&xs[e][r0 * d], rb, d, wp[e], sp[e], f0, f1, gate_out, kRows);
        NkRows<T>(&xs[e][r0 * d], rb, d, wp[n_experts + e], sp[n_experts + e], f0, f1, up_out, kRows);
        for (int64_t q = 0; q < rb; ++q)
          SwiGlu(&gate_out[q * kRows], &up_out[q * kRows], f1 - f0, 1.f, 1.f, &hs[e][(r0 + q) * f + f0]);
      }
    });
    // Stage 2: y[t] += gate * (h w_down^T), tasks over 64 output columns (all experts each).
    const int64_t d_tasks = (d + kRows - 1) / kRows;
    ParallelFor(d_tasks, [&](int64_t i) {
      const int64_t d0 = i * kRows, d1 = std::min(d, d0 + kRows);
      float out[kMaxRows * kRows];
      for (int64_t e : active) {
        const int64_t r = rows[e].size();
        for (int64_t r0 = 0; r0 < r; r0 += kMaxRows) {
          const int64_t rb = std::min<int64_t>(kMaxRows, r - r0);
          NkRows<T>(&hs[e][r0 * f], rb, f, wp[2 * n_experts + e], sp[2 * n_experts + e], d0, d1, out, kRows);
          for (int64_t q = 0; q < rb; ++q) {
            const int64_t a = rows[e][r0 + q];
            float* yt = yp + (a / top) * d;
            for (int64_t j = d0; j < d1; ++j) yt[j] += g[a] * out[q * kRows + j - d0];
          }
        }
      }
    });
  });
  return ffi::Error::Success();
}

template <WType T>
void AttendPart(const float* q, const void* k, const void* v, int64_t stride, int64_t n, int64_t n_heads,
                int64_t g_dim, int64_t h_dim, float scale, float* sc, float* m, float* l, float* acc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == Isa::kAvx512)
    return avx512::attend_part<T>(q, k, v, stride, n, n_heads, g_dim, h_dim, scale, sc, m, l, acc);
  if (kIsa == Isa::kAvx2)
    return avx2::attend_part<T>(q, k, v, stride, n, n_heads, g_dim, h_dim, scale, sc, m, l, acc);
#endif
  generic::attend_part<T>(q, k, v, stride, n, n_heads, g_dim, h_dim, scale, sc, m, l, acc);
}

// Slots of one cache row per decode-attention task. The first version took one task per (row, kv
// head) and read each head's 256 bytes of every slot's 1 KB: a strided walk that read a long row at
// ~2 GB/s, and one row on as many tasks as kv heads. Parts of kAttendSlots whole slots read the
// cache as one stream and split a long row over every core (BENCHMARKS.md, "AVX2 machine,
// 2026-12-02 (evening)").
// Fewer slots than that in all make smaller parts, so that short rows use every core too.
constexpr int64_t kAttendSlots = 256, kAttendMinSlots = 32;

// Decode attention (one query per row) straight from a float32 or bfloat16 cache (a bfloat16 model's
// default; its keys and values widened in registers): q [B, N, H] float32; k, v [R, S, K, H]
// (a server's cache of every slot; row rows[b] for query row b, out of range: no keys); q_pos,
// kv_len [B]; query b sees slot s when s <= q_pos[b], s < kv_len[b] and, with window > 0,
// q_pos[b] - s < window. out [B, N, H]; a row that sees nothing gets zeros. Each row's visible
// slots are split into parts of up to kAttendSlots (one task each, `attend_part`), whose softmax
// partials are then merged per (row, head): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
ffi::Error AttendImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                      ffi::ResultBuffer<ffi::F32> out, int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument("mj_attend: q must be [B, N, H] and k, v [R, S, K, H]");
  const int64_t b_dim = qd[0], n_heads = qd[1], h_dim = qd[2];
  const int64_t r_dim = kd[0], s_dim = kd[1], kv_heads = kd[2];
  if (kd[3] != h_dim || h_dim % 16 || kv_heads == 0 || n_heads % kv_heads)
    return ffi::Error::InvalidArgument("mj_attend: unsupported shapes");
  if (k.element_type() != v.element_type() ||
      (k.element_type() != ffi::DataType::F32 && k.element_type() != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("mj_attend: k and v must both be float32 or both bfloat16");
  const bool bf16 = k.element_type() == ffi::DataType::BF16;
  const int64_t g_dim = n_heads / kv_heads, stride = kv_heads * h_dim;
  const float scale = 1.f / std::sqrt(static_cast<float>(h_dim));
  const int32_t *rp = rows.typed_data(), *pp = q_pos.typed_data(), *lp = kv_len.typed_data();
  // Each row's visible slots [lo, hi) (empty for a row that sees nothing), the slots per part
  // (halved down to kAttendMinSlots until every thread has a few parts) and each row's first part.
  std::vector<int64_t> lo(b_dim), hi(b_dim), first(b_dim + 1, 0);
  int64_t visible = 0, per = kAttendSlots;
  for (int64_t b = 0; b < b_dim; ++b) {
    hi[b] = std::min<int64_t>({static_cast<int64_t>(pp[b]) + 1, lp[b], s_dim});
    lo[b] = window > 0 ? std::max<int64_t>(0, pp[b] - window + 1) : 0;
    if (rp[b] < 0 || rp[b] >= r_dim || hi[b] < lo[b]) hi[b] = lo[b];
    visible += hi[b] - lo[b];
  }
  while (per > kAttendMinSlots && visible < 4 * per * (SpinPool::Get().workers() + 1)) per /= 2;
  for (int64_t b = 0; b < b_dim; ++b) first[b + 1] = first[b] + (hi[b] - lo[b] + per - 1) / per;
  const int64_t parts = first[b_dim], width = n_heads * (h_dim + 2);
  std::vector<float> partial(parts * width);  // per part: m [N], l [N], acc [N, H]
  std::vector<int64_t> row_of(parts);
  for (int64_t b = 0; b < b_dim; ++b) std::fill(row_of.begin() + first[b], row_of.begin() + first[b + 1], b);
  ParallelFor(parts, [&](int64_t i) {
    const int64_t b = row_of[i], s0 = lo[b] + (i - first[b]) * per;
    const int64_t n = std::min(per, hi[b] - s0), base = (rp[b] * s_dim + s0) * stride;
    thread_local std::vector<float> sc;
    sc.resize(n_heads * per);
    float* part = partial.data() + i * width;
    const float* qb = q.typed_data() + b * n_heads * h_dim;
    if (bf16)
      AttendPart<WType::kBF16>(qb, static_cast<const uint16_t*>(k.untyped_data()) + base,
                               static_cast<const uint16_t*>(v.untyped_data()) + base, stride, n, n_heads, g_dim,
                               h_dim, scale, sc.data(), part, part + n_heads, part + 2 * n_heads);
    else
      AttendPart<WType::kF32>(qb, static_cast<const float*>(k.untyped_data()) + base,
                              static_cast<const float*>(v.untyped_data()) + base, stride, n, n_heads, g_dim,
                              h_dim, scale, sc.data(), part, part + n_heads, part + 2 * n_heads);
  });
  ParallelFor(b_dim, [&](int64_t b) {
    float* o = out->typed_data() + b * n_heads * h_dim;
    std::fill(o, o + n_heads * h_dim, 0.f);
    for (int64_t h = 0; h < n_heads; ++h) {
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t i = first[b]; i < first[b + 1]; ++i) top = std::max(top, partial[i * width + h]);
      for (int64_t i = first[b]; i < first[b + 1]; ++i) {
        const float* part = partial.data() + i * width;
        const float w = std::exp(part[h] - top);
        total += w * part[n_heads + h];
        const float* acc = part + 2 * n_heads + h * h_dim;
        for (int64_t j = 0; j < h_dim; ++j) o[h * h_dim + j] += w * acc[j];
      }
      for (int64_t j = 0; j < h_dim && total > 0.f; ++j) o[h * h_dim + j] /= total;
    }
  });
  return ffi::Error::Success();
}

// A multi-threaded streaming read (the bandwidth probe): out[0] = sum of x.
ffi::Error ReadProbeImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t n = x.element_count(), chunk = 1 << 16, tasks = (n + chunk - 1) / chunk;
  std::vector<float> part(tasks);
  const float* p = x.typed_data();
  ParallelFor(tasks, [&](int64_t i) {
    float s[16] = {};
    const int64_t lo = i * chunk, hi = std::min(n, lo + chunk);
    int64_t j = lo;
    for (; j + 16 <= hi; j += 16)
      for (int l = 0; l < 16; ++l) s[l] += p[j + l];
    for (; j < hi; ++j) s[0] += p[j];
    float total = 0.f;
    for (float v : s) total += v;
    part[i] = total;
  });
  float total = 0.f;
  for (float v : part) total += v;
  out->typed_data()[0] = total;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(mj_linear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("nk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(mj_moe, MoeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_experts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(mj_attend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(mj_read_probe, ReadProbeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Which instruction set the kernels run with: 0 generic, 1 AVX2+FMA, 2 AVX-512.
extern "C" int mj_isa() { return static_cast<int>(kIsa); }
