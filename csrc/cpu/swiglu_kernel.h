// SwiGLU on the CPU, one pass per direction: h = [gate | up] (rows of width 2H) ->
// out = silu(gate) * up (rows of width H), and its backward, which writes both halves of the
// gradient in place of the [gate | up] layout, so nothing is concatenated afterwards.
//
// Three implementations of the same row loop:
//   - a portable one (any element type, math in acc_t),
//   - an x86-64 AVX2 + FMA one for float32 and bfloat16 (8 lanes, float math), and
//   - an x86-64 AVX-512 (F, BW, VL) one for float32 and bfloat16 (16 lanes; the row tail is a
//     masked vector, not a scalar loop),
// the vector ones compiled with function-level target attributes so that the rest of the
// extension keeps the baseline ISA; the caller picks one at run time with best_isa().
// Framework-free (no ATen), so that the native tests check both against a double reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEFAST_SWIGLU_X86 1
#define MOEFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MOEFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#else
#define MOEFAST_SWIGLU_X86 0
#endif

namespace moefast::cpu {

// bfloat16 as its bits, with the conversions torch uses (round to nearest even, NaN stays NaN).
struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  explicit Bf16(float f) : bits(from_float(f)) {}
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};
static_assert(sizeof(Bf16) == 2, "Bf16 must be two bytes, like c10::BFloat16");

// Rows per parallel chunk: about 16k output elements.
inline int64_t swiglu_grain(int64_t H) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
}

// ---------------------------------------------------------------------------- portable rows

template <typename acc_t>
inline acc_t swiglu_sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

template <typename scalar_t, typename acc_t>
void swiglu_forward_rows(const scalar_t* h, scalar_t* out, int64_t begin, int64_t end, int64_t H,
                         int64_t c0 = 0) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* gate = h + r * 2 * H;
    const scalar_t* up = gate + H;
    scalar_t* o = out + r * H;
    for (int64_t c = c0; c < H; ++c) {
      const acc_t g = static_cast<acc_t>(gate[c]);
      const acc_t u = static_cast<acc_t>(up[c]);
      o[c] = static_cast<scalar_t>(g * swiglu_sigmoid(g) * u);
    }
  }
}

// d gate = grad * up * s * (1 + gate * (1 - s)), d up = grad * gate * s, s = sigmoid(gate).
template <typename scalar_t, typename acc_t>
void swiglu_backward_rows(const scalar_t* grad, const scalar_t* h, scalar_t* dh, int64_t begin,
                          int64_t end, int64_t H, int64_t c0 = 0) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* gate = h + r * 2 * H;
    const scalar_t* up = gate + H;
    const scalar_t* go = grad + r * H;
    scalar_t* dgate = dh + r * 2 * H;
    scalar_t* dup = dgate + H;
    for (int64_t c = c0; c < H; ++c) {
      const acc_t g = static_cast<acc_t>(gate[c]);
      const acc_t u = static_cast<acc_t>(up[c]);
      const acc_t d = static_cast<acc_t>(go[c]);
      const acc_t e = std::exp(-g);
      const acc_t s = acc_t(1) / (acc_t(1) + e);
      const acc_t ds = d * s;
      // 1 - s as e * s where s > 1/2: no cancellation where the sigmoid saturates.
      const acc_t one_minus_s = e > acc_t(1) ? acc_t(1) - s : e * s;
      dgate[c] = static_cast<scalar_t>(ds * u * (acc_t(1) + g * one_minus_s));
      dup[c] = static_cast<scalar_t>(ds * g);
    }
  }
}

// ---------------------------------------------------------------------------- AVX2 rows

inline bool cpu_has_avx2_fma() {
#if MOEFAST_SWIGLU_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if MOEFAST_SWIGLU_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// Which row loop the float32 / bfloat16 kernels run (other element types always run kPortable).
enum class Isa { kPortable, kAvx2, kAvx512 };

inline bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return true;
    case Isa::kAvx2:
      return cpu_has_avx2_fma();
    case Isa::kAvx512:
      return cpu_has_avx512();
  }
  return false;
}

// The widest row loop this CPU runs.
inline Isa best_isa() {
  if (cpu_has_avx512()) return Isa::kAvx512;
  if (cpu_has_avx2_fma()) return Isa::kAvx2;
  return Isa::kPortable;
}

// exp(x) on float lanes, shared by the vector rows: clamp x to [kMin, kMax], x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two for an exact n ln2), exp(r) = 1 + r + r^2 p(r) with p of
// degree 5 (Cephes' expf coefficients, about 1 ulp), times 2^n.
namespace expf_poly {
constexpr float kMin = -88.3762626647949f;  // exp underflows to 0 below
constexpr float kMax = 88.0f;               // exp stays finite (at most 1.7e38)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace expf_poly

#if MOEFAST_SWIGLU_X86
namespace avx2 {

// exp(x) for 8 floats (expf_poly), 2^n put into the exponent bits. The clamp keeps exp finite, so
// that the reciprocal in sigmoid() never sees an infinity.
MOEFAST_TARGET_AVX2 inline __m256 exp(__m256 x) {
  using namespace expf_poly;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kMin)), _mm256_set1_ps(kMax));
  const __m256 n =
      _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 y = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// s = 1 / (1 + e) with e = exp(-g): the hardware reciprocal estimate (about 12 bits) and two
// Newton steps (full float precision), cheaper than a division. Also returns 1 - s without
// cancellation: e * s where s > 1/2 (so that where the sigmoid saturates, s rounds to 1, the
// backward's g * (1 - s) is still accurate), 1 - s elsewhere. For g < -88, e is at most 1.7e38, the
// estimate flushes to 0 and the Newton steps keep it there (0 * (2 - d * 0) = 0).
MOEFAST_TARGET_AVX2 inline __m256 sigmoid(__m256 g, __m256* complement = nullptr) {
  const __m256 e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
  const __m256 two = _mm256_set1_ps(2.0f);
  __m256 r = _mm256_rcp_ps(d);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, two));
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, two));
  if (complement != nullptr) {
    const __m256 one = _mm256_set1_ps(1.0f);
    *complement = _mm256_blendv_ps(_mm256_mul_ps(e, r), _mm256_sub_ps(one, r),
                                   _mm256_cmp_ps(e, one, _CMP_GT_OQ));
  }
  return r;
}

MOEFAST_TARGET_AVX2 inline __m256 load(const float* p) {
  return _mm256_loadu_ps(p);
}
MOEFAST_TARGET_AVX2 inline void store(float* p, __m256 v) {
  _mm256_storeu_ps(p, v);
}

MOEFAST_TARGET_AVX2 inline __m256 load(const Bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// Round to nearest even, NaN -> 0x7fc0, as Bf16::from_float.
MOEFAST_TARGET_AVX2 inline void store(Bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  // Lanes hold 16-bit values in 32-bit slots: pack (per 128-bit half) and gather the halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename T>
MOEFAST_TARGET_AVX2 void forward_rows(const T* h, T* out, int64_t begin, int64_t end, int64_t H) {
  const int64_t H8 = H - H % 8;
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = h + r * 2 * H;
    const T* up = gate + H;
    T* o = out + r * H;
    for (int64_t c = 0; c < H8; c += 8) {
      const __m256 g = load(gate + c);
      store(o + c, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid(g)), load(up + c)));
    }
  }
  if (H8 < H) swiglu_forward_rows<T, float>(h, out, begin, end, H, H8);
}

template <typename T>
MOEFAST_TARGET_AVX2 void backward_rows(const T* grad, const T* h, T* dh, int64_t begin, int64_t end,
                                       int64_t H) {
  const int64_t H8 = H - H % 8;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = h + r * 2 * H;
    const T* up = gate + H;
    const T* go = grad + r * H;
    T* dgate = dh + r * 2 * H;
    T* dup = dgate + H;
    for (int64_t c = 0; c < H8; c += 8) {
      const __m256 g = load(gate + c);
      __m256 one_minus_s;
      const __m256 s = sigmoid(g, &one_minus_s);
      const __m256 ds = _mm256_mul_ps(load(go + c), s);
      const __m256 t = _mm256_fmadd_ps(g, one_minus_s, one);  // 1 + g (1 - s)
      store(dgate + c, _mm256_mul_ps(_mm256_mul_ps(ds, load(up + c)), t));
      store(dup + c, _mm256_mul_ps(ds, g));
    }
  }
  if (H8 < H) swiglu_backward_rows<T, float>(grad, h, dh, begin, end, H, H8);
}

}  // namespace avx2

// ---------------------------------------------------------------------------- AVX-512 rows

// The same math as the AVX2 rows, 16 lanes wide: exp's 2^n by scalef, the sigmoid's reciprocal
// by the 14-bit estimate and one Newton step (full float precision), the bfloat16 rounding with
// the same integer steps (so both vector paths store the same bits), and the last cols % 16
// columns of a row as one masked vector.
// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined pass-through operands
// (_mm512_undefined_*) as uninitialised once they are inlined (GCC bug 105593); silence that here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace avx512 {

MOEFAST_TARGET_AVX512 inline __m512 exp(__m512 x) {
  using namespace expf_poly;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kMin)), _mm512_set1_ps(kMax));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 y = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kP[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

MOEFAST_TARGET_AVX512 inline __m512 sigmoid(__m512 g, __m512* complement = nullptr) {
  const __m512 e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  if (complement != nullptr) {
    const __mmask16 big = _mm512_cmp_ps_mask(e, one, _CMP_GT_OQ);
    *complement = _mm512_mask_sub_ps(_mm512_mul_ps(e, r), big, one, r);
  }
  return r;
}

// Loads and stores of `m` lanes (a full vector is m = 0xffff); masked-off lanes read as zero and
// are not written.
MOEFAST_TARGET_AVX512 inline __m512 load(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
MOEFAST_TARGET_AVX512 inline void store(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
MOEFAST_TARGET_AVX512 inline __m512 load(const Bf16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
// Round to nearest even, NaN -> 0x7fc0, as Bf16::from_float.
MOEFAST_TARGET_AVX512 inline void store(Bf16* p, __m512 v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

MOEFAST_TARGET_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

template <typename T>
MOEFAST_TARGET_AVX512 void forward_rows(const T* h, T* out, int64_t begin, int64_t end, int64_t H) {
  const __mmask16 tail = tail_mask(H % 16);
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = h + r * 2 * H;
    const T* up = gate + H;
    T* o = out + r * H;
    for (int64_t c = 0; c < H; c += 16) {
      const __mmask16 m = c + 16 <= H ? static_cast<__mmask16>(0xffff) : tail;
      const __m512 g = load(gate + c, m);
      store(o + c, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), load(up + c, m)), m);
    }
  }
}

template <typename T>
MOEFAST_TARGET_AVX512 void backward_rows(const T* grad, const T* h, T* dh, int64_t begin,
                                         int64_t end, int64_t H) {
  const __mmask16 tail = tail_mask(H % 16);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = h + r * 2 * H;
    const T* up = gate + H;
    const T* go = grad + r * H;
    T* dgate = dh + r * 2 * H;
    T* dup = dgate + H;
    for (int64_t c = 0; c < H; c += 16) {
      const __mmask16 m = c + 16 <= H ? static_cast<__mmask16>(0xffff) : tail;
      const __m512 g = load(gate + c, m);
      __m512 one_minus_s;
      const __m512 s = sigmoid(g, &one_minus_s);
      const __m512 ds = _mm512_mul_ps(load(go + c, m), s);
      const __m512 t = _mm512_fmadd_ps(g, one_minus_s, one);  // 1 + g (1 - s)
      store(dgate + c, _mm512_mul_ps(_mm512_mul_ps(ds, load(up + c, m)), t), m);
      store(dup + c, _mm512_mul_ps(ds, g), m);
    }
  }
}

}  // namespace avx512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// ---------------------------------------------------------------------------- entry points

// h [N, 2H] -> out [N, H], rows contiguous. isa: the row loop for float and Bf16 (one that
// isa_available() says this CPU runs; other element types always take the portable rows).
template <typename scalar_t, typename acc_t, typename ParallelFor>
void swiglu_forward(const scalar_t* h, scalar_t* out, int64_t N, int64_t H, Isa isa,
                    ParallelFor pf) {
  pf(0, N, swiglu_grain(H), [&](int64_t begin, int64_t end) {
#if MOEFAST_SWIGLU_X86
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, Bf16>) {
      if (isa == Isa::kAvx512) {
        avx512::forward_rows<scalar_t>(h, out, begin, end, H);
        return;
      }
      if (isa == Isa::kAvx2) {
        avx2::forward_rows<scalar_t>(h, out, begin, end, H);
        return;
      }
    }
#endif
    (void)isa;
    swiglu_forward_rows<scalar_t, acc_t>(h, out, begin, end, H);
  });
}

// grad [N, H], h [N, 2H] -> dh [N, 2H].
template <typename scalar_t, typename acc_t, typename ParallelFor>
void swiglu_backward(const scalar_t* grad, const scalar_t* h, scalar_t* dh, int64_t N, int64_t H,
                     Isa isa, ParallelFor pf) {
  pf(0, N, swiglu_grain(H), [&](int64_t begin, int64_t end) {
#if MOEFAST_SWIGLU_X86
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, Bf16>) {
      if (isa == Isa::kAvx512) {
        avx512::backward_rows<scalar_t>(grad, h, dh, begin, end, H);
        return;
      }
      if (isa == Isa::kAvx2) {
        avx2::backward_rows<scalar_t>(grad, h, dh, begin, end, H);
        return;
      }
    }
#endif
    (void)isa;
    swiglu_backward_rows<scalar_t, acc_t>(grad, h, dh, begin, end, H);
  });
}

}  // namespace moefast::cpu
