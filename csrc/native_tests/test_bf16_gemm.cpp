// Tests of csrc/cpu/bf16_gemm_kernel.h, the AVX512-BF16 GEMM behind the CPU SwiGLU expert MLP:
//   - the B packers: the packed layout of the portable one, and the AVX-512 one giving the same
//     bits for row-major, transposed and general strided views of B (odd K, partial blocks);
//   - the entry points gemm, gemm_swiglu, gemm_swiglu_bwd and gemm_tn against a double reference
//     computed from the same bfloat16 inputs, over shapes that cut the 6-row register tiles and
//     the 64-column blocks at every edge, with padded leading dimensions whose padding must be
//     neither read (inputs hold NaN there) nor written (outputs hold a sentinel there, and guard
//     zones around every output buffer must survive too);
//   - with small-integer inputs (float sums exact, whatever the order), results to the bit, and
//     the fused SwiGLU epilogues to the bits of swiglu_kernel.h's unfused AVX-512 rows;
//   - serial and threaded runs giving identical bits.
// Every test of an AVX-512 kernel is skipped on a CPU without AVX512-BF16.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "bf16_gemm_kernel.h"
#include "swiglu_kernel.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;
using moefast::cpu::Bf16;
namespace bg = moefast::cpu::bf16_gemm;

namespace {

constexpr uint16_t kNanBits = 0x7fc0;       // unused input padding: a read of it would show
constexpr uint16_t kSentinelBits = 0xdead;  // output padding and guard zones: must survive

// GEMM outputs, relative to the sum of the magnitudes of their terms: rounding to bfloat16 (8
// significant bits) costs up to 2^-8 of the value, float accumulation orders of magnitude less;
// the tolerance is twice that bound.
constexpr double kGemmTol = 1.0 / 128;
// act against silu(gate) * up from the kernel's own h: one bfloat16 rounding, relative.
constexpr double kActTol = 1.0 / 128;
// dh: dact's bfloat16 rounding and dh's own (2 x 2^-8), relative to the magnitude of the terms.
constexpr double kBwdTol = 1.0 / 64;

Bf16 from_bits(uint16_t b) {
  Bf16 x;
  x.bits = b;
  return x;
}
uint16_t bits_of(Bf16 x) {
  return x.bits;
}
uint16_t bits_of(uint16_t x) {
  return x;
}

double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

// Error relative to `scale` (the size of the terms behind the value), with a floor; infinite for
// a result that is not finite (the references always are), so that a NaN is not lost in a max.
double rel_err(double got, double want, double scale) {
  if (!std::isfinite(got)) return std::numeric_limits<double>::infinity();
  return std::abs(got - want) / std::max(scale, 1e-3);
}

// Every test of a kernel starts here. The skip counts as a check, so that test_main does not
// report a skipped test as one that ran no checks.
bool skipped() {
  if (bg::available()) return false;
  std::printf("  (no AVX512-BF16 on this CPU: skipped)\n");
  CHECK(!bg::available());
  return true;
}

// An output buffer with a guard zone of sentinels on either side.
template <typename T>
struct Guarded {
  static constexpr int64_t kGuard = 64;
  std::vector<T> buf;
  explicit Guarded(int64_t n) : buf(static_cast<size_t>(n + 2 * kGuard), T{}) {
    for (auto& x : buf) std::memcpy(&x, &kSentinelBits, sizeof x);
  }
  T* data() { return buf.data() + kGuard; }
  const T& operator[](int64_t i) const { return buf[static_cast<size_t>(kGuard + i)]; }
  // Guard elements that no longer hold the sentinel.
  int64_t guards_changed() const {
    int64_t changed = 0;
    const int64_t n = static_cast<int64_t>(buf.size());
    for (int64_t i = 0; i < kGuard; ++i) {
      changed += bits_of(buf[static_cast<size_t>(i)]) != kSentinelBits;
      changed += bits_of(buf[static_cast<size_t>(n - 1 - i)]) != kSentinelBits;
    }
    return changed;
  }
};

enum class Data { kUniform, kSmallInts };

// n random values: uniform in [-range, range], or integers in [-4, 4] (any sum of up to 2^16
// products of them is exact in float).
std::vector<Bf16> values(Rng& rng, int64_t n, Data data, double range = 1.0) {
  return data == Data::kUniform ? uniform<Bf16>(rng, static_cast<size_t>(n), -range, range)
                                : small_ints<Bf16>(rng, static_cast<size_t>(n), -4, 4);
}

// `rows` rows of `cols` values (dense, row-major in `vals`) laid out `ld` apart, in a buffer that
// ends right after the last value (so that ASan sees any read past it); the padding is NaN.
std::vector<Bf16> with_ld(const std::vector<Bf16>& vals, int64_t rows, int64_t cols, int64_t ld) {
  const int64_t size = rows > 0 && cols > 0 ? (rows - 1) * ld + cols : 1;
  std::vector<Bf16> out(static_cast<size_t>(size), from_bits(kNanBits));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * ld + c] = vals[r * cols + c];
  }
  return out;
}

// How B [K, N] sits in memory.
enum class Layout {
  kRowMajor,    // [K, N + pad] row-major: sn == 1
  kTransposed,  // the transposed view of an [N, K + pad] row-major matrix: sk == 1
  kStrided,     // neither: sn == 2, sk == 2N + 1 + pad
};

const char* layout_name(Layout l) {
  return l == Layout::kRowMajor ? "row-major" : l == Layout::kTransposed ? "transposed" : "strided";
}

struct BMatrix {
  std::vector<Bf16> mem;  // ends right after B's last element; every other element NaN
  int64_t sk = 0, sn = 0;
  bg::Strided view() const { return bg::Strided{mem.data(), sk, sn}; }
};

// B [K, N] from its dense row-major values.
BMatrix make_b(const std::vector<Bf16>& vals, int64_t K, int64_t N, Layout layout, int64_t pad) {
  BMatrix b;
  switch (layout) {
    case Layout::kRowMajor:
      b.sk = N + pad, b.sn = 1;
      break;
    case Layout::kTransposed:
      b.sk = 1, b.sn = K + pad;
      break;
    case Layout::kStrided:
      b.sk = 2 * N + 1 + pad, b.sn = 2;
      break;
  }
  const int64_t size = K > 0 && N > 0 ? (K - 1) * b.sk + (N - 1) * b.sn + 1 : 1;
  b.mem.assign(static_cast<size_t>(size), from_bits(kNanBits));
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) b.mem[k * b.sk + n * b.sn] = vals[k * N + n];
  }
  return b;
}

// A @ B (+ bias) in double from dense row-major A [M, K] and B [K, N], and per element the sum of
// the magnitudes of its terms.
struct Reference {
  std::vector<double> val, scale;
};

Reference reference_gemm(const std::vector<Bf16>& A, const std::vector<Bf16>& B, const Bf16* bias,
                         int64_t M, int64_t K, int64_t N) {
  Reference ref{std::vector<double>(static_cast<size_t>(M * N)),
                std::vector<double>(static_cast<size_t>(M * N))};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double s = bias != nullptr ? static_cast<float>(bias[n]) : 0.0;
      double mag = std::abs(s);
      for (int64_t k = 0; k < K; ++k) {
        const double t = static_cast<double>(static_cast<float>(A[m * K + k])) *
                         static_cast<float>(B[k * N + n]);
        s += t;
        mag += std::abs(t);
      }
      ref.val[m * N + n] = s;
      ref.scale[m * N + n] = mag;
    }
  }
  return ref;
}

// What the kernels must give for an exact value: it rounded to bfloat16 (to nearest even).
float rounded(double exact) {
  return static_cast<float>(Bf16(static_cast<float>(exact)));
}

// Bitwise equality of two guarded buffers (outputs, padding and guards).
template <typename T>
bool same_bits(const Guarded<T>& a, const Guarded<T>& b) {
  return moefast::test::same_bits(a.buf, b.buf);
}

// Elements of the packed block `out` (block_elems(K)) that differ from the layout of columns
// [c0, c0 + nc) of B (dense [K, N]): element (i * 64 + c) * 2 + j is B[2i + j][c0 + c], zero for
// c >= nc and for 2i + j >= K.
int64_t layout_mismatches(const uint16_t* out, const std::vector<Bf16>& B, int64_t K, int64_t N,
                          int64_t c0, int64_t nc) {
  int64_t bad = 0;
  for (int64_t i = 0; i < (K + 1) / 2; ++i) {
    for (int64_t c = 0; c < bg::kCols; ++c) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t k = 2 * i + j;
        const uint16_t want = c < nc && k < K ? B[k * N + c0 + c].bits : uint16_t{0};
        bad += out[(i * bg::kCols + c) * 2 + j] != want;
      }
    }
  }
  return bad;
}

// ---------------------------------------------------------------------------- gemm

struct GemmCase {
  int64_t M, K, N;
  Layout layout;
  bool bias, padded;
  Data data;
};

void check_gemm(const GemmCase& cs, uint32_t seed) {
  const int64_t M = cs.M, K = cs.K, N = cs.N;
  const int64_t lda = cs.padded ? K + 3 : K, ldo = cs.padded ? N + 5 : N;
  Rng rng(seed);
  const auto a = values(rng, M * K, cs.data);
  const auto b = values(rng, K * N, cs.data);
  const auto bias = values(rng, N, cs.data);
  const auto A = with_ld(a, M, K, lda);
  const BMatrix B = make_b(b, K, N, cs.layout, cs.padded ? 3 : 0);
  const Bf16* bias_p = cs.bias ? bias.data() : nullptr;
  const Reference ref = reference_gemm(a, b, bias_p, M, K, N);

  Guarded<Bf16> out(M * ldo), out_t(M * ldo);
  bg::gemm(A.data(), lda, M, K, B.view(), N, bias_p, out.data(), ldo, SerialFor{});
  bg::gemm(A.data(), lda, M, K, B.view(), N, bias_p, out_t.data(), ldo, ThreadedFor{});

  double worst = 0;
  int64_t inexact = 0, padding = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldo; ++n) {
      const Bf16 got = out[m * ldo + n];
      if (n >= N) {
        padding += got.bits != kSentinelBits;
        continue;
      }
      const double want = ref.val[m * N + n];
      worst = std::max(worst, rel_err(static_cast<float>(got), want, ref.scale[m * N + n]));
      if (cs.data == Data::kSmallInts) inexact += static_cast<float>(got) != rounded(want);
    }
  }
  const int64_t failures_before = current().failures;
  CHECK(worst <= kGemmTol);
  CHECK_EQ(inexact, int64_t{0});
  CHECK_EQ(padding, int64_t{0});
  CHECK_EQ(out.guards_changed(), int64_t{0});
  CHECK(same_bits(out, out_t));
  if (current().failures > failures_before) {
    std::printf(
        "  gemm M=%lld K=%lld N=%lld B %s, bias %d, padded %d, %s: worst %.3g, inexact %lld,"
        " padding/guards changed %lld/%lld, threaded differs %d\n",
        static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(N),
        layout_name(cs.layout), cs.bias, cs.padded, cs.data == Data::kUniform ? "uniform" : "ints",
        worst, static_cast<long long>(inexact), static_cast<long long>(padding),
        static_cast<long long>(out.guards_changed()), !same_bits(out, out_t));
  }
}

void check_gemm_shapes(Data data, uint32_t seed) {
  // K out of order, so that a thread's scratch (grown, never shrunk) holds a larger stale block.
  for (Layout layout : {Layout::kRowMajor, Layout::kTransposed, Layout::kStrided}) {
    for (int64_t K : {129, 1, 64, 2, 7}) {
      for (int64_t M : {1, 5, 6, 7, 13, 64}) {
        for (int64_t N : {1, 16, 63, 64, 65, 130}) {
          for (int variant = 0; variant < 4; ++variant) {
            check_gemm(GemmCase{M, K, N, layout, (variant & 1) != 0, (variant & 2) != 0, data},
                       seed++);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- gemm_swiglu

struct SwigluCase {
  int64_t M, K, H;
  Layout layout;
  bool bias, padded;
  Data data;
};

void check_swiglu(const SwigluCase& cs, uint32_t seed) {
  const int64_t M = cs.M, K = cs.K, H = cs.H, H2 = 2 * H;
  const int64_t lda = cs.padded ? K + 1 : K;
  Rng rng(seed);
  const auto a = values(rng, M * K, cs.data);
  const auto w1 = values(rng, K * H2, cs.data);  // [K, 2H] = [gate | up]
  const auto b1 = values(rng, H2, cs.data);
  const auto A = with_ld(a, M, K, lda);
  const BMatrix W1 = make_b(w1, K, H2, cs.layout, cs.padded ? 2 : 0);
  const Bf16* b1_p = cs.bias ? b1.data() : nullptr;
  const Reference ref = reference_gemm(a, w1, b1_p, M, K, H2);

  Guarded<Bf16> h(M * H2), act(M * H), h_t(M * H2), act_t(M * H);
  bg::gemm_swiglu(A.data(), lda, M, K, W1.view(), H, b1_p, h.data(), act.data(), SerialFor{});
  bg::gemm_swiglu(A.data(), lda, M, K, W1.view(), H, b1_p, h_t.data(), act_t.data(), ThreadedFor{});

  // The unfused SwiGLU rows on the kernel's own h: act must carry the same bits.
  std::vector<Bf16> h_copy(static_cast<size_t>(M * H2)), act_unfused(static_cast<size_t>(M * H));
  for (int64_t i = 0; i < M * H2; ++i) h_copy[i] = h[i];
  cpu::swiglu_forward<Bf16, float>(h_copy.data(), act_unfused.data(), M, H, cpu::Isa::kAvx512,
                                   SerialFor{});

  double worst_h = 0, worst_act = 0;
  int64_t inexact = 0, act_differs = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < H2; ++c) {
      const double want = ref.val[m * H2 + c];
      const float got = static_cast<float>(h[m * H2 + c]);
      worst_h = std::max(worst_h, rel_err(got, want, ref.scale[m * H2 + c]));
      if (cs.data == Data::kSmallInts) inexact += got != rounded(want);
    }
    for (int64_t c = 0; c < H; ++c) {
      const double g = static_cast<float>(h[m * H2 + c]), u = static_cast<float>(h[m * H2 + H + c]);
      const double want = g * sigmoid(g) * u;
      worst_act =
          std::max(worst_act, rel_err(static_cast<float>(act[m * H + c]), want, std::abs(want)));
      act_differs += act[m * H + c].bits != act_unfused[m * H + c].bits;
    }
  }
  const int64_t failures_before = current().failures;
  CHECK(worst_h <= kGemmTol);
  CHECK(worst_act <= kActTol);
  CHECK_EQ(inexact, int64_t{0});
  CHECK_EQ(act_differs, int64_t{0});
  CHECK_EQ(h.guards_changed() + act.guards_changed(), int64_t{0});
  CHECK(same_bits(h, h_t) && same_bits(act, act_t));
  if (current().failures > failures_before) {
    std::printf(
        "  gemm_swiglu M=%lld K=%lld H=%lld W1 %s, bias %d, padded %d, %s: worst h %.3g, act"
        " %.3g, inexact %lld, act differs from unfused %lld, threaded differs %d\n",
        static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(H),
        layout_name(cs.layout), cs.bias, cs.padded, cs.data == Data::kUniform ? "uniform" : "ints",
        worst_h, worst_act, static_cast<long long>(inexact), static_cast<long long>(act_differs),
        !(same_bits(h, h_t) && same_bits(act, act_t)));
  }
}

void check_swiglu_shapes(Data data, uint32_t seed) {
  for (Layout layout : {Layout::kRowMajor, Layout::kTransposed}) {
    for (int64_t K : {129, 1, 64, 2, 7}) {
      for (int64_t M : {1, 5, 6, 7, 13, 64}) {
        for (int64_t H : {1, 5, 64, 70}) {
          for (int variant = 0; variant < 4; ++variant) {
            check_swiglu(SwigluCase{M, K, H, layout, (variant & 1) != 0, (variant & 2) != 0, data},
                         seed++);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- gemm_swiglu_bwd

struct BwdCase {
  int64_t M, K, H;
  Layout layout;  // of W2T [K, H]: kTransposed is the view of a row-major [H, K] w2
  bool padded;
  Data data;
};

void check_swiglu_bwd(const BwdCase& cs, uint32_t seed) {
  const int64_t M = cs.M, K = cs.K, H = cs.H, H2 = 2 * H;
  const int64_t lda = cs.padded ? K + 2 : K;
  Rng rng(seed);
  const auto a = values(rng, M * K, cs.data);    // the gradient of the MLP's output
  const auto w2t = values(rng, K * H, cs.data);  // W2T [K, H], dense
  const auto hv = values(rng, M * H2, Data::kUniform, 5.0);
  const auto A = with_ld(a, M, K, lda);
  const BMatrix W2T = make_b(w2t, K, H, cs.layout, cs.padded ? 3 : 0);
  const Reference dact = reference_gemm(a, w2t, nullptr, M, K, H);

  Guarded<Bf16> dh(M * H2), dh_t(M * H2);
  bg::gemm_swiglu_bwd(A.data(), lda, M, K, W2T.view(), H, hv.data(), dh.data(), SerialFor{});
  bg::gemm_swiglu_bwd(A.data(), lda, M, K, W2T.view(), H, hv.data(), dh_t.data(), ThreadedFor{});

  // With exact integer sums, dact is known to the bit (rounded to bfloat16), so dh must be the
  // unfused SwiGLU backward's of it, bit for bit.
  int64_t unfused_differs = 0;
  if (cs.data == Data::kSmallInts) {
    std::vector<Bf16> dact_bf(static_cast<size_t>(M * H)), dh_unfused(static_cast<size_t>(M * H2));
    for (int64_t i = 0; i < M * H; ++i) dact_bf[i] = Bf16(static_cast<float>(dact.val[i]));
    cpu::swiglu_backward<Bf16, float>(dact_bf.data(), hv.data(), dh_unfused.data(), M, H,
                                      cpu::Isa::kAvx512, SerialFor{});
    for (int64_t i = 0; i < M * H2; ++i) unfused_differs += dh[i].bits != dh_unfused[i].bits;
  }

  double worst = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < H; ++c) {
      const double g = static_cast<float>(hv[m * H2 + c]),
                   u = static_cast<float>(hv[m * H2 + H + c]);
      const double d = dact.val[m * H + c], d_scale = dact.scale[m * H + c], s = sigmoid(g);
      const double dgate = d * u * s * (1 + g * (1 - s));
      const double dgate_scale = d_scale * std::abs(u * s) * (1 + std::abs(g * (1 - s)));
      const double dup = d * g * s, dup_scale = d_scale * std::abs(g * s);
      worst = std::max(worst, rel_err(static_cast<float>(dh[m * H2 + c]), dgate, dgate_scale));
      worst = std::max(worst, rel_err(static_cast<float>(dh[m * H2 + H + c]), dup, dup_scale));
    }
  }
  const int64_t failures_before = current().failures;
  CHECK(worst <= kBwdTol);
  CHECK_EQ(unfused_differs, int64_t{0});
  CHECK_EQ(dh.guards_changed(), int64_t{0});
  CHECK(same_bits(dh, dh_t));
  if (current().failures > failures_before) {
    std::printf(
        "  gemm_swiglu_bwd M=%lld K=%lld H=%lld W2T %s, padded %d, %s: worst %.3g, differs"
        " from unfused %lld, threaded differs %d\n",
        static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(H),
        layout_name(cs.layout), cs.padded, cs.data == Data::kUniform ? "uniform" : "ints", worst,
        static_cast<long long>(unfused_differs), !same_bits(dh, dh_t));
  }
}

void check_swiglu_bwd_shapes(Data data, uint32_t seed) {
  for (Layout layout : {Layout::kTransposed, Layout::kRowMajor}) {
    for (int64_t K : {129, 1, 64, 2, 7}) {
      for (int64_t M : {1, 5, 6, 7, 13, 64}) {
        for (int64_t H : {1, 5, 64, 70}) {
          for (bool padded : {false, true}) {
            check_swiglu_bwd(BwdCase{M, K, H, layout, padded, data}, seed++);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- gemm_tn

struct TnCase {
  int64_t n, Kp, Np;
  bool padded;
  Data data;
};

void check_tn(const TnCase& cs, uint32_t seed) {
  const int64_t n = cs.n, Kp = cs.Kp, Np = cs.Np;
  const int64_t lda = cs.padded ? Kp + 3 : Kp, ldg = cs.padded ? Np + 1 : Np;
  const int64_t ldw = cs.padded ? Np + 4 : Np;
  Rng rng(seed);
  const auto a = values(rng, n * Kp, cs.data);  // A [n, Kp]
  const auto g = values(rng, n * Np, cs.data);  // G [n, Np]
  const auto A = with_ld(a, n, Kp, lda);
  const auto G = with_ld(g, n, Np, ldg);
  // A^T, dense [Kp, n], for the reference.
  std::vector<Bf16> at(static_cast<size_t>(Kp * n));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < Kp; ++i) at[i * n + r] = a[r * Kp + i];
  }
  const Reference ref = reference_gemm(at, g, nullptr, Kp, n, Np);

  // The caller's workspace, of exactly the size asked for (ASan sees a write past it), at an
  // offset that leaves it misaligned, holding garbage that must not leak into dW.
  const int64_t ws_elems = bg::tn_workspace_elems(n, Kp), off = seed % 32;
  std::vector<uint16_t> ws(static_cast<size_t>(off + ws_elems), kNanBits);
  std::vector<uint16_t> ws_t(static_cast<size_t>(off + ws_elems), kNanBits);

  Guarded<Bf16> dw(Kp * ldw), dw_t(Kp * ldw);
  bg::gemm_tn(A.data(), lda, G.data(), ldg, n, Kp, Np, dw.data(), ldw, ws.data() + off,
              SerialFor{});
  bg::gemm_tn(A.data(), lda, G.data(), ldg, n, Kp, Np, dw_t.data(), ldw, ws_t.data() + off,
              ThreadedFor{});

  double worst = 0;
  int64_t inexact = 0, padding = 0, nonzero = 0;
  for (int64_t i = 0; i < Kp; ++i) {
    for (int64_t j = 0; j < ldw; ++j) {
      const Bf16 got = dw[i * ldw + j];
      if (j >= Np) {
        padding += got.bits != kSentinelBits;
        continue;
      }
      const double want = ref.val[i * Np + j];
      worst = std::max(worst, rel_err(static_cast<float>(got), want, ref.scale[i * Np + j]));
      if (cs.data == Data::kSmallInts) inexact += static_cast<float>(got) != rounded(want);
      if (n == 0) nonzero += got.bits != 0;  // no rows: dW is all (positive) zeros
    }
  }
  const int64_t failures_before = current().failures;
  CHECK(worst <= kGemmTol);
  CHECK_EQ(inexact, int64_t{0});
  CHECK_EQ(nonzero, int64_t{0});
  CHECK_EQ(padding, int64_t{0});
  CHECK_EQ(dw.guards_changed(), int64_t{0});
  CHECK(same_bits(dw, dw_t));
  if (current().failures > failures_before) {
    std::printf(
        "  gemm_tn n=%lld Kp=%lld Np=%lld padded %d, %s: worst %.3g, inexact %lld, nonzero"
        " %lld, padding changed %lld, threaded differs %d\n",
        static_cast<long long>(n), static_cast<long long>(Kp), static_cast<long long>(Np),
        cs.padded, cs.data == Data::kUniform ? "uniform" : "ints", worst,
        static_cast<long long>(inexact), static_cast<long long>(nonzero),
        static_cast<long long>(padding), !same_bits(dw, dw_t));
  }
}

void check_tn_shapes(Data data, uint32_t seed) {
  for (int64_t n : {129, 0, 1, 64, 2, 3}) {
    for (int64_t Kp : {1, 6, 64, 70}) {
      for (int64_t Np : {1, 64, 100}) {
        for (bool padded : {false, true}) check_tn(TnCase{n, Kp, Np, padded, data}, seed++);
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------- packing

// The portable packer's layout on a tiny B, element by element, for every view of B; and the
// block sizes. Runs on any CPU.
MOEFAST_TEST(portable_pack_layout) {
  CHECK_EQ(bg::block_elems(0), int64_t{0});
  CHECK_EQ(bg::block_elems(1), 2 * bg::kCols);
  CHECK_EQ(bg::block_elems(3), 4 * bg::kCols);
  CHECK_EQ(bg::block_elems(4), 4 * bg::kCols);
  CHECK_EQ(bg::num_blocks(0), int64_t{0});
  CHECK_EQ(bg::num_blocks(1), int64_t{1});
  CHECK_EQ(bg::num_blocks(64), int64_t{1});
  CHECK_EQ(bg::num_blocks(65), int64_t{2});

  const int64_t K = 3, N = 5;
  std::vector<Bf16> b(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) b[k * N + n] = Bf16(static_cast<float>(1 + 10 * k + n));
  }
  for (Layout layout : {Layout::kRowMajor, Layout::kTransposed, Layout::kStrided}) {
    const BMatrix B = make_b(b, K, N, layout, 1);
    Guarded<uint16_t> out(bg::block_elems(K));
    bg::pack_block_portable(B.view(), K, 1, 3, out.data());  // columns 1, 2, 3
    auto at = [&](int64_t i, int64_t c, int64_t j) { return out[(i * bg::kCols + c) * 2 + j]; };
    CHECK_EQ(at(0, 0, 0), b[0 * N + 1].bits);  // {B[0][1], B[1][1]}
    CHECK_EQ(at(0, 0, 1), b[1 * N + 1].bits);
    CHECK_EQ(at(0, 2, 0), b[0 * N + 3].bits);  // {B[0][3], B[1][3]}
    CHECK_EQ(at(0, 2, 1), b[1 * N + 3].bits);
    CHECK_EQ(at(1, 1, 0), b[2 * N + 2].bits);  // {B[2][2], 0}: the row past an odd K is zero
    CHECK_EQ(at(1, 1, 1), uint16_t{0});
    CHECK_EQ(at(0, 3, 0), uint16_t{0});  // past nc
    CHECK_EQ(at(1, 63, 1), uint16_t{0});
    CHECK_EQ(layout_mismatches(out.data(), b, K, N, 1, 3), int64_t{0});
    CHECK_EQ(out.guards_changed(), int64_t{0});
  }
}

// The AVX-512 packer gives the portable one's bits (and the layout) for B row-major (interleaved
// rows), transposed with even K (gathered pairs) and odd K, and strided (the portable loop), over
// whole and partial blocks, including ones that end exactly at the end of B's memory.
MOEFAST_TEST(avx512_pack_matches_portable) {
  if (skipped()) return;
#if MOEFAST_BF16_GEMM_X86
  Rng rng(11);
  int64_t cases = 0, differ = 0, layout_bad = 0, guards = 0;
  for (Layout layout : {Layout::kRowMajor, Layout::kTransposed, Layout::kStrided}) {
    for (int64_t K : {1, 2, 3, 7, 8, 64, 129}) {
      for (int64_t N : {1, 5, 63, 64, 65, 130}) {
        for (int64_t pad : {0, 3}) {
          const auto b = values(rng, K * N, Data::kUniform);
          const BMatrix B = make_b(b, K, N, layout, pad);
          // Every block of B, then blocks of the last 1 and 17 columns.
          std::vector<std::pair<int64_t, int64_t>> blocks;
          for (int64_t c0 = 0; c0 < N; c0 += bg::kCols) {
            blocks.emplace_back(c0, std::min(bg::kCols, N - c0));
          }
          for (int64_t nc : {1, 17}) {
            if (nc <= N) blocks.emplace_back(N - nc, nc);
          }
          for (const auto& [c0, nc] : blocks) {
            const int64_t E = bg::block_elems(K);
            Guarded<uint16_t> fast(E), portable(E);
            bg::pack_block(B.view(), K, c0, nc, fast.data());
            bg::pack_block_portable(B.view(), K, c0, nc, portable.data());
            ++cases;
            differ += !same_bits(fast, portable);
            layout_bad += layout_mismatches(fast.data(), b, K, N, c0, nc) != 0;
            guards += fast.guards_changed() + portable.guards_changed();
            if (!same_bits(fast, portable)) {
              std::printf("  pack %s K=%lld N=%lld pad=%lld c0=%lld nc=%lld: AVX-512 differs\n",
                          layout_name(layout), static_cast<long long>(K), static_cast<long long>(N),
                          static_cast<long long>(pad), static_cast<long long>(c0),
                          static_cast<long long>(nc));
            }
          }
        }
      }
    }
  }
  CHECK(cases > 0);
  CHECK_EQ(differ, int64_t{0});
  CHECK_EQ(layout_bad, int64_t{0});
  CHECK_EQ(guards, int64_t{0});
#endif
}

// ---------------------------------------------------------------------------- entry points

MOEFAST_TEST(gemm_matches_double_reference) {
  if (skipped()) return;
  check_gemm_shapes(Data::kUniform, 1000);
}

MOEFAST_TEST(gemm_small_integers_exact) {
  if (skipped()) return;
  check_gemm_shapes(Data::kSmallInts, 5000);
}

MOEFAST_TEST(gemm_swiglu_matches_double_reference) {
  if (skipped()) return;
  check_swiglu_shapes(Data::kUniform, 9000);
}

MOEFAST_TEST(gemm_swiglu_small_integers_exact) {
  if (skipped()) return;
  check_swiglu_shapes(Data::kSmallInts, 13000);
}

MOEFAST_TEST(gemm_swiglu_bwd_matches_double_reference) {
  if (skipped()) return;
  check_swiglu_bwd_shapes(Data::kUniform, 17000);
}

MOEFAST_TEST(gemm_swiglu_bwd_matches_unfused_bits) {
  if (skipped()) return;
  check_swiglu_bwd_shapes(Data::kSmallInts, 21000);
}

MOEFAST_TEST(gemm_tn_matches_double_reference) {
  if (skipped()) return;
  check_tn_shapes(Data::kUniform, 25000);
}

MOEFAST_TEST(gemm_tn_small_integers_exact) {
  if (skipped()) return;
  check_tn_shapes(Data::kSmallInts, 29000);
}

// Shapes with many column blocks, under every threaded variant: the same bits as a serial run.
MOEFAST_TEST(threaded_variants_bitwise_identical) {
  if (skipped()) return;
  Rng rng(3);
  const int64_t M = 13, K = 37, N = 9 * bg::kCols + 5, H = N, n = 41, Kp = 5 * bg::kCols + 7;
  const auto a = values(rng, M * K, Data::kUniform);
  const auto b = values(rng, K * 2 * N, Data::kUniform);
  const auto bias = values(rng, 2 * N, Data::kUniform);
  const auto hv = values(rng, M * 2 * H, Data::kUniform, 5.0);
  const auto at = values(rng, n * Kp, Data::kUniform);
  const auto g = values(rng, n * N, Data::kUniform);
  const BMatrix B = make_b(b, K, 2 * N, Layout::kRowMajor, 0);
  const BMatrix BT = make_b(b, K, N, Layout::kTransposed, 0);

  struct Outputs {
    Guarded<Bf16> out, h, act, dh, dw;
  };
  auto run = [&](auto pf) {
    Outputs o{Guarded<Bf16>(M * N), Guarded<Bf16>(M * 2 * H), Guarded<Bf16>(M * H),
              Guarded<Bf16>(M * 2 * H), Guarded<Bf16>(Kp * N)};
    std::vector<uint16_t> ws(static_cast<size_t>(bg::tn_workspace_elems(n, Kp)));
    bg::gemm(a.data(), K, M, K, BT.view(), N, bias.data(), o.out.data(), N, pf);
    bg::gemm_swiglu(a.data(), K, M, K, B.view(), H, bias.data(), o.h.data(), o.act.data(), pf);
    bg::gemm_swiglu_bwd(a.data(), K, M, K, BT.view(), H, hv.data(), o.dh.data(), pf);
    bg::gemm_tn(at.data(), Kp, g.data(), N, n, Kp, N, o.dw.data(), N, ws.data(), pf);
    return o;
  };
  const Outputs serial = run(SerialFor{});
  for (const ThreadedFor& pf : threaded_variants()) {
    const Outputs t = run(pf);
    CHECK(same_bits(serial.out, t.out));
    CHECK(same_bits(serial.h, t.h));
    CHECK(same_bits(serial.act, t.act));
    CHECK(same_bits(serial.dh, t.dh));
    CHECK(same_bits(serial.dw, t.dw));
  }
}

// No rows or no columns: nothing is written.
MOEFAST_TEST(empty_shapes_write_nothing) {
  if (skipped()) return;
  Rng rng(5);
  const int64_t K = 8, N = 20;
  const auto a = values(rng, 4 * K, Data::kUniform);
  const auto b = values(rng, K * 2 * N, Data::kUniform);
  const BMatrix B = make_b(b, K, 2 * N, Layout::kRowMajor, 0);
  Guarded<Bf16> out(64), h(64), act(64), dh(64), dw(64);
  std::vector<uint16_t> ws(static_cast<size_t>(bg::tn_workspace_elems(4, 0)));
  for (auto pf : {ThreadedFor{}, ThreadedFor{1, 1}}) {
    bg::gemm(a.data(), K, 0, K, B.view(), N, nullptr, out.data(), N, pf);
    bg::gemm(a.data(), K, 4, K, B.view(), 0, nullptr, out.data(), N, pf);
    bg::gemm_swiglu(a.data(), K, 0, K, B.view(), N, nullptr, h.data(), act.data(), pf);
    bg::gemm_swiglu(a.data(), K, 4, K, B.view(), 0, nullptr, h.data(), act.data(), pf);
    bg::gemm_swiglu_bwd(a.data(), K, 0, K, B.view(), N, b.data(), dh.data(), pf);
    bg::gemm_swiglu_bwd(a.data(), K, 4, K, B.view(), 0, b.data(), dh.data(), pf);
    bg::gemm_tn(a.data(), K, b.data(), N, 4, 0, N, dw.data(), N, ws.data(), pf);
    bg::gemm_tn(a.data(), K, b.data(), N, 4, K, 0, dw.data(), N, ws.data(), pf);
  }
  for (const auto* g : {&out, &h, &act, &dh, &dw}) {
    int64_t changed = 0;
    for (const Bf16& x : g->buf) changed += x.bits != kSentinelBits;
    CHECK_EQ(changed, int64_t{0});
  }
}
