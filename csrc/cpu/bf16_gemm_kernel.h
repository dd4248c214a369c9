// A bfloat16 GEMM for one expert's rows on CPUs with AVX512-BF16 (vdpbf16ps), built for the
// SwiGLU expert MLP (csrc/cpu/swiglu_mlp.cpp), with its epilogues fused:
//
//   gemm             out = A @ B (+ bias)                     [M, N], any N
//   gemm_swiglu      h = A @ W1 (+ b1) = [gate | up], act = silu(gate) * up, in one pass
//   gemm_swiglu_bwd  dact = A @ W2^T, rounded to bfloat16 as a stored tensor would be, then
//                    dh = [dgate | dup] from dact and h, without dact ever reaching memory
//
// How: B's columns are cut into blocks of kCols = 64. A thread packs a block into pairs along K
// (the layout vdpbf16ps reads: {B[2i][c], B[2i+1][c]} as one 32-bit lane), a block at a time
// into a buffer of its own that stays in L2, then runs all of A's rows through it in register
// tiles of kRows x 64 (24 float accumulators), and hands each finished tile, still in L1, to the
// epilogue. Blocks go to threads whole, so no two threads pack or write the same columns; A is
// read in place (rows with K contiguous, any leading dimension), B through any two strides, so a
// weight and its transpose pack from the same memory.
//
// Why not oneDNN: torch's bfloat16 matmul is one oneDNN call per expert; it packs the weight
// inside every call, and SwiGLU then needs a second pass over h (and, backward, dact) through
// memory. See bench/README.md for the measurements that motivated this.
//
// Numerics: float accumulation (vdpbf16ps: products of bfloat16 pairs added in float, bfloat16
// denormal inputs read as zero), bfloat16 results rounded to nearest even; the SwiGLU math is
// swiglu_kernel.h's AVX-512 rows, on the rounded values, so act and dh carry the same bits as
// the unfused path given the same h and dact.
//
// Framework-free, like the other *_kernel.h: the native tests check it against a double GEMM.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "swiglu_kernel.h"

#if MOEFAST_SWIGLU_X86
#define MOEFAST_BF16_GEMM_X86 1
#define MOEFAST_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define MOEFAST_BF16_GEMM_X86 0
#endif

namespace moefast::cpu::bf16_gemm {

constexpr int64_t kCols = 64;  // columns of one packed block: four vectors of 16 floats
constexpr int kRows = 6;       // rows of one register tile: 6 x 4 accumulators

// Whether this CPU runs the kernels below (AVX-512 F/BW/VL/DQ and BF16).
inline bool available() {
#if MOEFAST_BF16_GEMM_X86
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// uint16 elements of one packed block of a K-deep B.
inline int64_t block_elems(int64_t K) {
  return (K + 1) / 2 * kCols * 2;
}

inline int64_t num_blocks(int64_t N) {
  return (N + kCols - 1) / kCols;
}

// B [K, N] seen through two strides: element (k, n) at p[k * sk + n * sn].
struct Strided {
  const Bf16* p;
  int64_t sk, sn;
};

// Packs columns [c0, c0 + nc) of B (nc <= kCols) into `out` (block_elems(K) elements): row i of
// the block holds, for each column c, the pair {B[2i][c], B[2i + 1][c]}; columns past nc and the
// row past an odd K are zeros. Portable; the AVX-512 version below gives the same bits.
inline void pack_block_portable(Strided B, int64_t K, int64_t c0, int64_t nc, uint16_t* out) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t i = 0; i < K2; ++i) {
    for (int64_t c = 0; c < kCols; ++c) {
      uint16_t lo = 0, hi = 0;
      if (c < nc) {
        lo = B.p[(2 * i) * B.sk + (c0 + c) * B.sn].bits;
        if (2 * i + 1 < K) hi = B.p[(2 * i + 1) * B.sk + (c0 + c) * B.sn].bits;
      }
      out[(i * kCols + c) * 2] = lo;
      out[(i * kCols + c) * 2 + 1] = hi;
    }
  }
}

// The rows of an A tile past the matrix, and the column past an odd K, must read as zeros (a NaN
// there times a packed zero would still be NaN), so every load of A goes through these.
#if MOEFAST_BF16_GEMM_X86
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

MOEFAST_TARGET_AVX512_BF16 inline __mmask16 cols_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// The AVX-512 packer: B with unit column stride (a row-major weight) interleaves two rows, 16
// columns at a time; B with unit row stride (a transposed view of a row-major weight) and an
// even K gathers the 32-bit pairs, 16 columns at a time; anything else takes the portable loop.
MOEFAST_TARGET_AVX512_BF16 inline void pack_block(Strided B, int64_t K, int64_t c0, int64_t nc,
                                                  uint16_t* out) {
  const int64_t K2 = (K + 1) / 2;
  if (B.sn == 1) {
    for (int64_t i = 0; i < K2; ++i) {
      const uint16_t* r0 = &B.p[(2 * i) * B.sk + c0].bits;
      const bool has_r1 = 2 * i + 1 < K;
      const uint16_t* r1 = r0 + B.sk;
      for (int64_t c = 0; c < kCols; c += 16) {
        const __mmask16 m = c < nc ? cols_mask(nc - c) : static_cast<__mmask16>(0);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + c));
        const __m512i hi =
            has_r1
                ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + c)), 16)
                : _mm512_setzero_si512();
        _mm512_storeu_si512(out + (i * kCols + c) * 2, _mm512_or_si512(lo, hi));
      }
    }
    return;
  }
  const int64_t sn32 = B.sn;  // gather offsets are in bfloat16 elements (scale 2)
  if (B.sk == 1 && K % 2 == 0 && sn32 * kCols < (int64_t{1} << 30)) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t c = 0; c < kCols; c += 16) {
      const __mmask16 m = c < nc ? cols_mask(nc - c) : static_cast<__mmask16>(0);
      const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(sn32)));
      const uint16_t* base = &B.p[(c0 + c) * B.sn].bits;
      for (int64_t i = 0; i < K2; ++i) {
        const __m512i v =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, base + 2 * i, 2);
        _mm512_storeu_si512(out + (i * kCols + c) * 2, v);
      }
    }
    return;
  }
  pack_block_portable(B, K, c0, nc, out);
}

// acc[MR x 64] = A's MR rows @ block, over K2 pairs: the pair k of row r is the 32-bit lane at
// A + r * ra + k * ka, broadcast to all 16 lanes (a row-major A: ra = lda, ka = 2; an A packed
// like B: ra = 2, ka = 2 * kCols). With `odd`, one more step reads the single value at
// A + r * ra + K2 * ka (an odd K's last column) with a zero partner.
template <int MR>
MOEFAST_TARGET_AVX512_BF16 inline void tile(const Bf16* A, int64_t ra, int64_t ka, int64_t K2,
                                            bool odd, const uint16_t* Bp, float* acc) {
  __m512 c[MR][4];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_ps();
  }
  const __m512i* bp = reinterpret_cast<const __m512i*>(Bp);
  for (int64_t k = 0; k < K2; ++k, bp += 4) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 1);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bp + 2);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bp + 3);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * ra + k * ka, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      c[r][0] = _mm512_dpbf16_ps(c[r][0], b0, a);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], b1, a);
      c[r][2] = _mm512_dpbf16_ps(c[r][2], b2, a);
      c[r][3] = _mm512_dpbf16_ps(c[r][3], b3, a);
    }
  }
  if (odd) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 1);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bp + 2);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bp + 3);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a =
          (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(A[r * ra + K2 * ka].bits));
      c[r][0] = _mm512_dpbf16_ps(c[r][0], b0, a);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], b1, a);
      c[r][2] = _mm512_dpbf16_ps(c[r][2], b2, a);
      c[r][3] = _mm512_dpbf16_ps(c[r][3], b3, a);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + r * kCols + 16 * j, c[r][j]);
  }
}

MOEFAST_TARGET_AVX512_BF16 inline void run_tile(int mr, const Bf16* A, int64_t ra, int64_t ka,
                                                int64_t K2, bool odd, const uint16_t* Bp,
                                                float* acc) {
  switch (mr) {
    case 6:
      tile<6>(A, ra, ka, K2, odd, Bp, acc);
      break;
    case 5:
      tile<5>(A, ra, ka, K2, odd, Bp, acc);
      break;
    case 4:
      tile<4>(A, ra, ka, K2, odd, Bp, acc);
      break;
    case 3:
      tile<3>(A, ra, ka, K2, odd, Bp, acc);
      break;
    case 2:
      tile<2>(A, ra, ka, K2, odd, Bp, acc);
      break;
    default:
      tile<1>(A, ra, ka, K2, odd, Bp, acc);
      break;
  }
}

// A row-major A [mr rows, K] (rows lda apart) through tile<>.
MOEFAST_TARGET_AVX512_BF16 inline void run_tile(int mr, const Bf16* A, int64_t lda, int64_t K,
                                                const uint16_t* Bp, float* acc) {
  run_tile(mr, A, lda, 2, K / 2, K % 2 != 0, Bp, acc);
}

// Asks for the cache lines of `bytes` bytes at p (for writing: `write`), so that the epilogue
// of a tile finds the rows of h, act and dh it touches (rows 2H apart, a page or more) in cache
// instead of waiting on each; issued before the tile's GEMM, which takes thousands of cycles.
MOEFAST_TARGET_AVX512_BF16 inline void prefetch(const void* p, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
    if (write) {
      _mm_prefetch(c + o, _MM_HINT_ET0);
    } else {
      _mm_prefetch(c + o, _MM_HINT_T0);
    }
  }
}

// The float value of x rounded to bfloat16 (as avx512::store would store it).
MOEFAST_TARGET_AVX512_BF16 inline __m512 round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r =
      _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)),
                       _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7fc00000));
  return _mm512_castsi512_ps(r);
}

// One block of out = A @ B (+ bias): columns [c0, c0 + nc).
MOEFAST_TARGET_AVX512_BF16 inline void block_store(const Bf16* A, int64_t lda, int64_t M, int64_t K,
                                                   const uint16_t* Bp, const Bf16* bias, Bf16* out,
                                                   int64_t ldo, int64_t c0, int64_t nc,
                                                   float* acc) {
  __m512 bv[4];
  for (int j = 0; j < 4; ++j) {
    const __mmask16 m = 16 * j < nc ? cols_mask(nc - 16 * j) : static_cast<__mmask16>(0);
    bv[j] = bias != nullptr ? avx512::load(bias + c0 + 16 * j, m) : _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < M; r += kRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kRows, M - r));
    for (int i = 0; i < mr; ++i) prefetch(out + (r + i) * ldo + c0, nc * 2, true);
    run_tile(mr, A + r * lda, lda, K, Bp, acc);
    for (int i = 0; i < mr; ++i) {
      Bf16* o = out + (r + i) * ldo + c0;
      for (int j = 0; j < 4 && 16 * j < nc; ++j) {
        const __mmask16 m = cols_mask(nc - 16 * j);
        avx512::store(o + 16 * j, _mm512_add_ps(_mm512_loadu_ps(acc + i * kCols + 16 * j), bv[j]),
                      m);
      }
    }
  }
}

// One block pair of the SwiGLU forward: gate columns [c0, c0 + nc) of h and the same columns of
// its up half (H further on), and those columns of act.
MOEFAST_TARGET_AVX512_BF16 inline void block_swiglu(const Bf16* A, int64_t lda, int64_t M,
                                                    int64_t K, const uint16_t* Bgate,
                                                    const uint16_t* Bup, const Bf16* bias, Bf16* h,
                                                    Bf16* act, int64_t H, int64_t c0, int64_t nc,
                                                    float* acc) {
  float* acc_up = acc + kRows * kCols;
  __m512 bg[4], bu[4];
  for (int j = 0; j < 4; ++j) {
    const __mmask16 m = 16 * j < nc ? cols_mask(nc - 16 * j) : static_cast<__mmask16>(0);
    bg[j] = bias != nullptr ? avx512::load(bias + c0 + 16 * j, m) : _mm512_setzero_ps();
    bu[j] = bias != nullptr ? avx512::load(bias + H + c0 + 16 * j, m) : _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < M; r += kRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kRows, M - r));
    for (int i = 0; i < mr; ++i) {
      prefetch(h + (r + i) * 2 * H + c0, nc * 2, true);
      prefetch(h + (r + i) * 2 * H + H + c0, nc * 2, true);
      prefetch(act + (r + i) * H + c0, nc * 2, true);
    }
    run_tile(mr, A + r * lda, lda, K, Bgate, acc);
    run_tile(mr, A + r * lda, lda, K, Bup, acc_up);
    for (int i = 0; i < mr; ++i) {
      Bf16* hg = h + (r + i) * 2 * H + c0;
      Bf16* hu = hg + H;
      Bf16* a = act + (r + i) * H + c0;
      for (int j = 0; j < 4 && 16 * j < nc; ++j) {
        const __mmask16 m = cols_mask(nc - 16 * j);
        const __m512 g =
            round_bf16(_mm512_add_ps(_mm512_loadu_ps(acc + i * kCols + 16 * j), bg[j]));
        const __m512 u =
            round_bf16(_mm512_add_ps(_mm512_loadu_ps(acc_up + i * kCols + 16 * j), bu[j]));
        avx512::store(hg + 16 * j, g, m);
        avx512::store(hu + 16 * j, u, m);
        avx512::store(a + 16 * j, _mm512_mul_ps(_mm512_mul_ps(g, avx512::sigmoid(g)), u), m);
      }
    }
  }
}

// One block of the SwiGLU backward: dact columns [c0, c0 + nc) (of H), rounded to bfloat16, and
// with h's gate and up columns there, the same columns of dh's two halves.
MOEFAST_TARGET_AVX512_BF16 inline void block_swiglu_bwd(const Bf16* A, int64_t lda, int64_t M,
                                                        int64_t K, const uint16_t* Bp,
                                                        const Bf16* h, Bf16* dh, int64_t H,
                                                        int64_t c0, int64_t nc, float* acc) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < M; r += kRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kRows, M - r));
    for (int i = 0; i < mr; ++i) {
      prefetch(h + (r + i) * 2 * H + c0, nc * 2, false);
      prefetch(h + (r + i) * 2 * H + H + c0, nc * 2, false);
      prefetch(dh + (r + i) * 2 * H + c0, nc * 2, true);
      prefetch(dh + (r + i) * 2 * H + H + c0, nc * 2, true);
    }
    run_tile(mr, A + r * lda, lda, K, Bp, acc);
    for (int i = 0; i < mr; ++i) {
      const Bf16* hg = h + (r + i) * 2 * H + c0;
      const Bf16* hu = hg + H;
      Bf16* dg = dh + (r + i) * 2 * H + c0;
      Bf16* du = dg + H;
      for (int j = 0; j < 4 && 16 * j < nc; ++j) {
        const __mmask16 m = cols_mask(nc - 16 * j);
        const __m512 go = round_bf16(_mm512_loadu_ps(acc + i * kCols + 16 * j));
        const __m512 g = avx512::load(hg + 16 * j, m);
        __m512 one_minus_s;
        const __m512 s = avx512::sigmoid(g, &one_minus_s);
        const __m512 ds = _mm512_mul_ps(go, s);
        const __m512 t = _mm512_fmadd_ps(g, one_minus_s, one);  // 1 + g (1 - s)
        avx512::store(dg + 16 * j,
                      _mm512_mul_ps(_mm512_mul_ps(ds, avx512::load(hu + 16 * j, m)), t), m);
        avx512::store(du + 16 * j, _mm512_mul_ps(ds, g), m);
      }
    }
  }
}

// One column block of dW = A^T @ G: `Ap` holds A's columns packed in blocks of kCols like B
// (block i: A's columns [i kCols, (i + 1) kCols) as pairs of rows), Bp this block of G's columns;
// rows [0, Kp) of dW, columns [c0, c0 + nc).
MOEFAST_TARGET_AVX512_BF16 inline void block_tn(const uint16_t* Ap, int64_t n, int64_t Kp,
                                                const uint16_t* Bp, Bf16* dW, int64_t ldw,
                                                int64_t c0, int64_t nc, float* acc) {
  const int64_t K2 = (n + 1) / 2;
  for (int64_t i0 = 0; i0 < Kp; i0 += kCols) {
    const Bf16* a = reinterpret_cast<const Bf16*>(Ap + (i0 / kCols) * block_elems(n));
    const int64_t rows = std::min(kCols, Kp - i0);
    for (int64_t r = 0; r < rows; r += kRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kRows, rows - r));
      for (int i = 0; i < mr; ++i) prefetch(dW + (i0 + r + i) * ldw + c0, nc * 2, true);
      run_tile(mr, a + 2 * r, 2, 2 * kCols, K2, false, Bp, acc);
      for (int i = 0; i < mr; ++i) {
        Bf16* o = dW + (i0 + r + i) * ldw + c0;
        for (int j = 0; j < 4 && 16 * j < nc; ++j) {
          avx512::store(o + 16 * j, _mm512_loadu_ps(acc + i * kCols + 16 * j),
                        cols_mask(nc - 16 * j));
        }
      }
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // MOEFAST_BF16_GEMM_X86

// Per-thread scratch: one packed block (two for the SwiGLU pair) and the float tiles. Grown, never
// shrunk; the kernels run on the pool's threads, so each keeps its own.
struct Scratch {
  std::vector<uint16_t> packed;
  std::vector<float> acc;
  uint16_t* blocks(int64_t K, int n) {
    const size_t need = static_cast<size_t>(block_elems(K) * n + 32);
    if (packed.size() < need) packed.resize(need);
    // 64-byte aligned start: the packed rows are read as whole vectors.
    auto addr = reinterpret_cast<uintptr_t>(packed.data());
    return reinterpret_cast<uint16_t*>((addr + 63) & ~uintptr_t{63});
  }
  float* tiles() {
    if (acc.empty()) acc.resize(2 * kRows * kCols);
    return acc.data();
  }
};

inline Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// ---------------------------------------------------------------------------- entry points
// All require available(). pf(begin, end, grain, fn) splits the column blocks among threads (a
// caller already inside a parallel region passes a serial one, or ATen's, which then runs
// inline). A: M rows of K, `lda` apart; out and h / act / dh: contiguous rows.

// out [M, N] (rows `ldo` apart) = A @ B (+ bias [N]).
template <typename ParallelFor>
void gemm(const Bf16* A, int64_t lda, int64_t M, int64_t K, Strided B, int64_t N, const Bf16* bias,
          Bf16* out, int64_t ldo, ParallelFor pf) {
#if MOEFAST_BF16_GEMM_X86
  if (M == 0 || N == 0) return;
  pf(0, num_blocks(N), 1, [&](int64_t b0, int64_t b1) {
    Scratch& s = thread_scratch();
    uint16_t* Bp = s.blocks(K, 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols, nc = std::min(kCols, N - c0);
      pack_block(B, K, c0, nc, Bp);
      block_store(A, lda, M, K, Bp, bias, out, ldo, c0, nc, s.tiles());
    }
  });
#else
  (void)A, (void)lda, (void)M, (void)K, (void)B, (void)N, (void)bias, (void)out, (void)ldo,
      (void)pf;
#endif
}

// W1 [K, 2H] = [gate | up] columns: h [M, 2H] = A @ W1 (+ b1 [2H]), act [M, H] = silu(gate) * up.
template <typename ParallelFor>
void gemm_swiglu(const Bf16* A, int64_t lda, int64_t M, int64_t K, Strided W1, int64_t H,
                 const Bf16* b1, Bf16* h, Bf16* act, ParallelFor pf) {
#if MOEFAST_BF16_GEMM_X86
  if (M == 0 || H == 0) return;
  pf(0, num_blocks(H), 1, [&](int64_t b0, int64_t b1_) {
    Scratch& s = thread_scratch();
    uint16_t* Bg = s.blocks(K, 2);
    uint16_t* Bu = Bg + block_elems(K);
    for (int64_t b = b0; b < b1_; ++b) {
      const int64_t c0 = b * kCols, nc = std::min(kCols, H - c0);
      pack_block(W1, K, c0, nc, Bg);
      pack_block(W1, K, H + c0, nc, Bu);
      block_swiglu(A, lda, M, K, Bg, Bu, b1, h, act, H, c0, nc, s.tiles());
    }
  });
#else
  (void)A, (void)lda, (void)M, (void)K, (void)W1, (void)H, (void)b1, (void)h, (void)act, (void)pf;
#endif
}

// W2T [K, H] (the transposed view of an [H, K] weight): dact = A @ W2T rounded to bfloat16; with
// h [M, 2H], dh [M, 2H] = SwiGLU's backward (dgate | dup) from dact.
template <typename ParallelFor>
void gemm_swiglu_bwd(const Bf16* A, int64_t lda, int64_t M, int64_t K, Strided W2T, int64_t H,
                     const Bf16* h, Bf16* dh, ParallelFor pf) {
#if MOEFAST_BF16_GEMM_X86
  if (M == 0 || H == 0) return;
  pf(0, num_blocks(H), 1, [&](int64_t b0, int64_t b1) {
    Scratch& s = thread_scratch();
    uint16_t* Bp = s.blocks(K, 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols, nc = std::min(kCols, H - c0);
      pack_block(W2T, K, c0, nc, Bp);
      block_swiglu_bwd(A, lda, M, K, Bp, h, dh, H, c0, nc, s.tiles());
    }
  });
#else
  (void)A, (void)lda, (void)M, (void)K, (void)W2T, (void)H, (void)h, (void)dh, (void)pf;
#endif
}

// uint16 elements of the workspace gemm_tn packs A into (with room to align it to 64 bytes).
inline int64_t tn_workspace_elems(int64_t n, int64_t Kp) {
  return num_blocks(Kp) * block_elems(n) + 32;
}

// dW [Kp, Np] (rows ldw apart) = A^T @ G over n rows: A [n, Kp] (rows lda apart), G [n, Np]
// (rows ldg apart); the weight gradient of out = A @ W. A is packed first, by all threads, into
// `workspace` (tn_workspace_elems(n, Kp), the caller's, so that its size follows the call's and
// not the largest call a thread ever saw), then each thread packs its column blocks of G (n x 64
// values in its own buffer) and runs them.
template <typename ParallelFor>
void gemm_tn(const Bf16* A, int64_t lda, const Bf16* G, int64_t ldg, int64_t n, int64_t Kp,
             int64_t Np, Bf16* dW, int64_t ldw, uint16_t* workspace, ParallelFor pf) {
#if MOEFAST_BF16_GEMM_X86
  if (Kp == 0 || Np == 0) return;
  const int64_t per = block_elems(n);
  const auto addr = reinterpret_cast<uintptr_t>(workspace);
  uint16_t* Ap = reinterpret_cast<uint16_t*>((addr + 63) & ~uintptr_t{63});
  pf(0, num_blocks(Kp), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      pack_block(Strided{A, lda, 1}, n, b * kCols, std::min(kCols, Kp - b * kCols), Ap + b * per);
    }
  });
  pf(0, num_blocks(Np), 1, [&](int64_t b0, int64_t b1) {
    Scratch& s = thread_scratch();
    uint16_t* Bp = s.blocks(n, 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols, nc = std::min(kCols, Np - c0);
      pack_block(Strided{G, ldg, 1}, n, c0, nc, Bp);
      block_tn(Ap, n, Kp, Bp, dW, ldw, c0, nc, s.tiles());
    }
  });
#else
  (void)A, (void)lda, (void)G, (void)ldg, (void)n, (void)Kp, (void)Np, (void)dW, (void)ldw,
      (void)workspace, (void)pf;
#endif
}

}  // namespace moefast::cpu::bf16_gemm
