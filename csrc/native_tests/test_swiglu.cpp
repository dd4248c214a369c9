// Tests of csrc/cpu/swiglu_kernel.h: SwiGLU forward and backward, the portable rows and the AVX2
// and AVX-512 rows (where the CPU runs them) against a double reference; the bfloat16
// conversions.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "swiglu_kernel.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;
using moefast::cpu::Bf16;

namespace {

#if MOEFAST_SWIGLU_X86
MOEFAST_TARGET_AVX2 void store8(const float* in, Bf16* out) {
  cpu::avx2::store(out, _mm256_loadu_ps(in));
}
// n <= 16 values through the masked AVX-512 store.
MOEFAST_TARGET_AVX512 void store16(const float* in, Bf16* out, int64_t n) {
  const __mmask16 m = n == 16 ? static_cast<__mmask16>(0xffff) : cpu::avx512::tail_mask(n);
  cpu::avx512::store(out, cpu::avx512::load(in, m), m);
}
#endif

const char* isa_name(cpu::Isa isa) {
  return isa == cpu::Isa::kAvx512 ? "avx512" : isa == cpu::Isa::kAvx2 ? "avx2" : "portable";
}

double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

// Error relative to `scale` (the size of the terms that make `want`, so that a result that cancels
// to near zero is not held to a tighter bound than its inputs allow), with a floor.
double rel_err(double got, double want, double scale) {
  return std::abs(got - want) / std::max(scale, 1e-3);
}
double rel_err(double got, double want) {
  return rel_err(got, want, std::abs(want));
}

template <typename S>
double tol_for() {
  return std::is_same_v<S, Bf16> ? 1.0 / 128 : 4e-6;  // 16-bit output: 2^-8 relative, twice
}

template <typename S, typename PF>
void check_case(int64_t N, int64_t H, cpu::Isa isa, PF pf, uint32_t seed) {
  Rng rng(seed);
  const auto h = uniform<S>(rng, static_cast<size_t>(N * 2 * H), -9.0, 9.0);
  const auto g = uniform<S>(rng, static_cast<size_t>(N * H), -2.0, 2.0);
  std::vector<S> out(static_cast<size_t>(N * H), S(-77.0f));
  std::vector<S> dh(static_cast<size_t>(N * 2 * H), S(-77.0f));
  cpu::swiglu_forward<S, float>(h.data(), out.data(), N, H, isa, pf);
  cpu::swiglu_backward<S, float>(g.data(), h.data(), dh.data(), N, H, isa, pf);
  double worst_fwd = 0, worst_bwd = 0;
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t c = 0; c < H; ++c) {
      const double gate = static_cast<float>(h[r * 2 * H + c]);
      const double up = static_cast<float>(h[r * 2 * H + H + c]);
      const double go = static_cast<float>(g[r * H + c]);
      const double s = sigmoid(gate);
      worst_fwd = std::max(worst_fwd, rel_err(static_cast<float>(out[r * H + c]), gate * s * up));
      const double dgate = go * up * s * (1 + gate * (1 - s));
      const double dgate_scale = std::abs(go * up * s) * (1 + std::abs(gate * (1 - s)));
      worst_bwd =
          std::max(worst_bwd, rel_err(static_cast<float>(dh[r * 2 * H + c]), dgate, dgate_scale));
      worst_bwd =
          std::max(worst_bwd, rel_err(static_cast<float>(dh[r * 2 * H + H + c]), go * gate * s));
    }
  }
  CHECK(worst_fwd <= tol_for<S>());
  CHECK(worst_bwd <= tol_for<S>());
  if (worst_fwd > tol_for<S>() || worst_bwd > tol_for<S>()) {
    std::printf("  N=%lld H=%lld %s: worst forward %.3g, backward %.3g\n",
                static_cast<long long>(N), static_cast<long long>(H), isa_name(isa), worst_fwd,
                worst_bwd);
  }
}

template <typename S>
void check_all_shapes(cpu::Isa isa) {
  uint32_t seed = 1;
  for (int64_t H : {1, 7, 8, 9, 15, 16, 17, 33, 64, 257}) {
    for (int64_t N : {1, 5, 40}) {
      check_case<S>(N, H, isa, SerialFor{}, seed++);
      check_case<S>(N, H, isa, ThreadedFor{}, seed++);
    }
  }
}

}  // namespace

MOEFAST_TEST(portable_float_matches_double_reference) {
  check_all_shapes<float>(cpu::Isa::kPortable);
}
MOEFAST_TEST(portable_bf16_matches_double_reference) {
  check_all_shapes<Bf16>(cpu::Isa::kPortable);
}

MOEFAST_TEST(avx2_float_matches_double_reference) {
  if (!cpu::cpu_has_avx2_fma()) {
    std::printf("  (no AVX2 + FMA on this CPU: skipped)\n");
    return;
  }
  check_all_shapes<float>(cpu::Isa::kAvx2);
}

MOEFAST_TEST(avx2_bf16_matches_double_reference) {
  if (!cpu::cpu_has_avx2_fma()) return;
  check_all_shapes<Bf16>(cpu::Isa::kAvx2);
}

MOEFAST_TEST(avx512_float_matches_double_reference) {
  if (!cpu::cpu_has_avx512()) {
    std::printf("  (no AVX-512 F/BW/VL on this CPU: skipped)\n");
    return;
  }
  check_all_shapes<float>(cpu::Isa::kAvx512);
}

MOEFAST_TEST(avx512_bf16_matches_double_reference) {
  if (!cpu::cpu_has_avx512()) return;
  check_all_shapes<Bf16>(cpu::Isa::kAvx512);
}

// The best ISA is one the CPU runs, and the vector paths are picked in order of width.
MOEFAST_TEST(best_isa_is_available) {
  const cpu::Isa best = cpu::best_isa();
  CHECK(cpu::isa_available(best));
  CHECK(cpu::isa_available(cpu::Isa::kPortable));
  if (cpu::cpu_has_avx512()) CHECK(best == cpu::Isa::kAvx512);
}

// Over the whole range of the gate, including where the sigmoid saturates and where exp over- or
// underflows, the AVX2 and the portable rows stay finite and within a few ulp of the double
// reference. (Near the saturation of the sigmoid, 1 + exp(-g) rounds to 1 or to 1 + 2^-23
// depending on the last bit of exp, so the two float paths may differ there by about g * 2^-23
// while both stay that close to the exact value.)
MOEFAST_TEST(vector_and_portable_over_the_gate_range) {
  const int64_t H = 4001;
  std::vector<float> h(static_cast<size_t>(2 * H)), g(static_cast<size_t>(H), 0.75f);
  for (int64_t c = 0; c < H; ++c) {
    h[c] = -200.0f + 400.0f * static_cast<float>(c) / static_cast<float>(H - 1);
    h[H + c] = 1.5f;
  }
  for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kPortable}) {
    if (!cpu::isa_available(isa)) continue;
    std::vector<float> o(H), d(2 * H);
    cpu::swiglu_forward<float, float>(h.data(), o.data(), 1, H, isa, SerialFor{});
    cpu::swiglu_backward<float, float>(g.data(), h.data(), d.data(), 1, H, isa, SerialFor{});
    for (int64_t c = 0; c < H; ++c) {
      const double x = h[c], s = sigmoid(x);
      const double fwd = x * s * 1.5, dgate = 0.75 * 1.5 * s * (1 + x * (1 - s)),
                   dup = 0.75 * x * s;
      CHECK(std::isfinite(o[c]) && std::isfinite(d[c]) && std::isfinite(d[H + c]));
      CHECK_NEAR(o[c], fwd, 2e-6 * std::max(1.0, std::abs(fwd)));
      CHECK_NEAR(d[c], dgate, 2e-6 * std::max(1.0, std::abs(dgate)));
      CHECK_NEAR(d[H + c], dup, 2e-6 * std::max(1.0, std::abs(dup)));
    }
  }
}

MOEFAST_TEST(nan_gate_gives_nan) {
  for (cpu::Isa isa : {cpu::Isa::kPortable, cpu::Isa::kAvx2, cpu::Isa::kAvx512}) {
    if (!cpu::isa_available(isa)) continue;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> h(16, 1.0f), g(8, 1.0f), o(8), d(16);
    h[3] = nan;
    cpu::swiglu_forward<float, float>(h.data(), o.data(), 1, 8, isa, SerialFor{});
    cpu::swiglu_backward<float, float>(g.data(), h.data(), d.data(), 1, 8, isa, SerialFor{});
    CHECK(std::isnan(o[3]) && std::isnan(d[3]) && std::isnan(d[8 + 3]));
    CHECK(!std::isnan(o[2]) && !std::isnan(d[2]));
  }
}

// Bf16 rounds to nearest even like c10::BFloat16, and the AVX2 and AVX-512 stores round exactly
// like it (the AVX-512 one also through its masked tail).
MOEFAST_TEST(bf16_rounding) {
  auto bits = [](float f) { return Bf16(f).bits; };
  CHECK_EQ(bits(1.0f), uint16_t{0x3f80});
  uint32_t u = 0x3f808000u;  // exactly halfway between 0x3f80 and 0x3f81: ties to even (0x3f80)
  float f;
  std::memcpy(&f, &u, 4);
  CHECK_EQ(bits(f), uint16_t{0x3f80});
  u = 0x3f818000u;  // halfway between 0x3f81 and 0x3f82: ties to even (0x3f82)
  std::memcpy(&f, &u, 4);
  CHECK_EQ(bits(f), uint16_t{0x3f82});
  CHECK_EQ(bits(std::numeric_limits<float>::quiet_NaN()), uint16_t{0x7fc0});
  CHECK_EQ(bits(std::numeric_limits<float>::infinity()), uint16_t{0x7f80});
  CHECK(static_cast<float>(Bf16(3.0f)) == 3.0f);
#if MOEFAST_SWIGLU_X86
  if (!cpu::cpu_has_avx2_fma()) return;
  Rng rng(7);
  auto vals = uniform<float>(rng, 4096, -1e4, 1e4);
  for (size_t i = 0; i < 64; ++i) {  // exact ties, odd and even
    const uint32_t t = 0x3f800000u + (static_cast<uint32_t>(i) << 16) + 0x8000u;
    std::memcpy(&vals[i], &t, 4);
  }
  vals[64] = std::numeric_limits<float>::quiet_NaN();
  vals[65] = -std::numeric_limits<float>::infinity();
  vals[66] = std::numeric_limits<float>::max();
  vals[67] = std::numeric_limits<float>::denorm_min();
  std::vector<Bf16> out(vals.size());
  for (size_t i = 0; i < vals.size(); i += 8) store8(vals.data() + i, out.data() + i);
  int64_t differ = 0;
  for (size_t i = 0; i < vals.size(); ++i) differ += out[i].bits != Bf16::from_float(vals[i]);
  CHECK_EQ(differ, int64_t{0});
  if (!cpu::cpu_has_avx512()) return;
  // Full vectors, then a masked store of 5 lanes that must leave the 11 after it untouched.
  std::vector<Bf16> out16(vals.size() + 16, Bf16(-77.0f));
  for (size_t i = 0; i < vals.size(); i += 16) store16(vals.data() + i, out16.data() + i, 16);
  store16(vals.data(), out16.data() + vals.size(), 5);
  differ = 0;
  for (size_t i = 0; i < vals.size(); ++i) differ += out16[i].bits != Bf16::from_float(vals[i]);
  for (size_t i = 0; i < 5; ++i) differ += out16[vals.size() + i].bits != Bf16::from_float(vals[i]);
  for (size_t i = 5; i < 16; ++i) differ += out16[vals.size() + i].bits != Bf16(-77.0f).bits;
  CHECK_EQ(differ, int64_t{0});
#endif
}
