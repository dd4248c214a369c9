// Tests of csrc/cpu/permute_kernel.h: permute_forward, unpermute_forward, unpermute_weight_grad.
#include <cstdint>
#include <vector>

#include "permute_kernel.h"
#include "plan_kernel.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;
using moefast::cpu::permute_forward;
using moefast::cpu::routing_plan;
using moefast::cpu::unpermute_forward;
using moefast::cpu::unpermute_weight_grad;

namespace {

template <typename S>
double tol_for() {
  return std::is_same_v<S, float> ? 2e-6 : 1e-14;
}

// Positions of a real routing plan (random expert ids), a permutation of [0, T * k).
std::vector<int32_t> plan_positions(Rng& rng, int64_t T, int64_t k, int32_t E) {
  const auto ids = random_ids(rng, static_cast<size_t>(T * k), E);
  std::vector<int32_t> counts(static_cast<size_t>(E)), offs(static_cast<size_t>(E));
  std::vector<int32_t> position(ids.size()), order(ids.size());
  routing_plan(ids.data(), T * k, E, 1, counts.data(), offs.data(), position.data(), order.data(),
               SerialFor{});
  return position;
}

struct Shape {
  int64_t T, d, k;
};

const Shape kShapes[] = {{1, 1, 1},  {5, 1, 2},  {7, 3, 1},   {7, 3, 4},    {16, 8, 2},
                         {33, 5, 3}, {64, 1, 8}, {40, 17, 2}, {3, 1025, 3}, {100, 64, 2}};

template <typename S, typename PF>
std::vector<S> run_permute(const std::vector<S>& x, const Shape& s, const std::vector<int32_t>& pos,
                           const S* w, PF pf) {
  std::vector<S> out(static_cast<size_t>(s.T * s.k * s.d), S(-77));
  permute_forward<S, S>(x.data(), s.T, s.d, s.k, pos.data(), w, out.data(), pf);
  return out;
}

template <typename S, typename PF>
std::vector<S> run_unpermute(const std::vector<S>& y, const Shape& s,
                             const std::vector<int32_t>& pos, const S* w, PF pf) {
  std::vector<S> out(static_cast<size_t>(s.T * s.d), S(-77));
  unpermute_forward<S, S>(y.data(), s.T, s.d, s.k, pos.data(), w, out.data(), pf);
  return out;
}

template <typename S, typename PF>
std::vector<S> run_weight_grad(const std::vector<S>& g, const std::vector<S>& y, const Shape& s,
                               const std::vector<int32_t>& pos, PF pf) {
  std::vector<S> out(static_cast<size_t>(s.T * s.k), S(-77));
  unpermute_weight_grad<S, S>(g.data(), y.data(), s.T, s.d, s.k, pos.data(), out.data(), pf);
  return out;
}

template <typename S>
void permute_forward_case(Rng& rng, const Shape& s, bool with_weights) {
  const int64_t n = s.T * s.k;
  const auto x = uniform<S>(rng, static_cast<size_t>(s.T * s.d), -3, 3);
  const auto w = uniform<S>(rng, static_cast<size_t>(n), 0.1, 1.5);
  const auto pos = (s.T % 2) ? plan_positions(rng, s.T, s.k, 5)
                             : random_permutation(rng, static_cast<size_t>(n));
  const S* wp = with_weights ? w.data() : nullptr;
  const auto got = run_permute(x, s, pos, wp, SerialFor{});
  bool ok = true;
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t slot = t * s.k + j;
      for (int64_t c = 0; c < s.d; ++c) {
        const double ref = with_weights ? static_cast<double>(w[slot]) * x[t * s.d + c]
                                        : static_cast<double>(x[t * s.d + c]);
        const S v = got[pos[slot] * s.d + c];
        ok &= with_weights ? near(v, ref, tol_for<S>()) : v == x[t * s.d + c];
      }
    }
  }
  if (!CHECK(ok)) {
    std::fprintf(stderr, "    T=%lld d=%lld k=%lld weights=%d\n", (long long)s.T, (long long)s.d,
                 (long long)s.k, with_weights);
  }
  for (const auto& pf : threaded_variants()) CHECK(same_bits(run_permute(x, s, pos, wp, pf), got));
}

template <typename S>
void unpermute_forward_case(Rng& rng, const Shape& s, bool with_weights) {
  const int64_t n = s.T * s.k;
  const auto y = uniform<S>(rng, static_cast<size_t>(n * s.d), -3, 3);
  const auto w = uniform<S>(rng, static_cast<size_t>(n), -1, 1.5);
  const auto pos = (s.T % 2) ? random_permutation(rng, static_cast<size_t>(n))
                             : plan_positions(rng, s.T, s.k, 7);
  const S* wp = with_weights ? w.data() : nullptr;
  const auto got = run_unpermute(y, s, pos, wp, SerialFor{});
  bool ok = true;
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t c = 0; c < s.d; ++c) {
      double ref = 0, mag = 0;
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t slot = t * s.k + j;
        const double term = (with_weights ? static_cast<double>(w[slot]) : 1.0) *
                            static_cast<double>(y[pos[slot] * s.d + c]);
        ref += term;
        mag += std::fabs(term);
      }
      // Scaled by the sum of magnitudes: cancellation is not the kernel's fault.
      ok &= std::fabs(got[t * s.d + c] - ref) <= tol_for<S>() * std::max(1.0, mag);
    }
  }
  if (!CHECK(ok)) {
    std::fprintf(stderr, "    T=%lld d=%lld k=%lld weights=%d\n", (long long)s.T, (long long)s.d,
                 (long long)s.k, with_weights);
  }
  for (const auto& pf : threaded_variants()) {
    CHECK(same_bits(run_unpermute(y, s, pos, wp, pf), got));
  }
}

template <typename S>
void weight_grad_case(Rng& rng, const Shape& s) {
  const int64_t n = s.T * s.k;
  const auto y = uniform<S>(rng, static_cast<size_t>(n * s.d), -2, 2);
  const auto g = uniform<S>(rng, static_cast<size_t>(s.T * s.d), -2, 2);
  const auto pos = plan_positions(rng, s.T, s.k, 4);
  const auto got = run_weight_grad(g, y, s, pos, SerialFor{});
  bool ok = true;
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t slot = t * s.k + j;
      double dot = 0, mag = 0;
      for (int64_t c = 0; c < s.d; ++c) {
        const double term = static_cast<double>(g[t * s.d + c]) * y[pos[slot] * s.d + c];
        dot += term;
        mag += std::fabs(term);
      }
      ok &= std::fabs(got[slot] - dot) <= tol_for<S>() * std::max(1.0, mag);
    }
  }
  if (!CHECK(ok)) {
    std::fprintf(stderr, "    T=%lld d=%lld k=%lld\n", (long long)s.T, (long long)s.d,
                 (long long)s.k);
  }
  for (const auto& pf : threaded_variants())
    CHECK(same_bits(run_weight_grad(g, y, s, pos, pf), got));
}

}  // namespace

MOEFAST_TEST(permute_forward_matches_naive) {
  Rng rng(201);
  for (const auto& s : kShapes) {
    for (bool w : {false, true}) {
      permute_forward_case<float>(rng, s, w);
      permute_forward_case<double>(rng, s, w);
    }
  }
}

MOEFAST_TEST(unpermute_forward_matches_naive) {
  Rng rng(202);
  for (const auto& s : kShapes) {
    for (bool w : {false, true}) {
      unpermute_forward_case<float>(rng, s, w);
      unpermute_forward_case<double>(rng, s, w);
    }
  }
}

MOEFAST_TEST(unpermute_weight_grad_matches_naive) {
  Rng rng(203);
  for (const auto& s : kShapes) {
    weight_grad_case<float>(rng, s);
    weight_grad_case<double>(rng, s);
  }
}

// Dispatch then combine, no weights: every token comes back k times.
MOEFAST_TEST(permute_then_unpermute_gives_k_times_x) {
  Rng rng(204);
  for (const auto& s : kShapes) {
    const auto pos = plan_positions(rng, s.T, s.k, 6);
    // Small integers: the sum of k copies is exact in float.
    const auto xi = small_ints<float>(rng, static_cast<size_t>(s.T * s.d), -50, 50);
    const auto yi = run_permute<float>(xi, s, pos, nullptr, ThreadedFor{3, 5});
    const auto back_i = run_unpermute<float>(yi, s, pos, nullptr, ThreadedFor{2, 3});
    bool exact = true;
    for (size_t i = 0; i < xi.size(); ++i) exact &= back_i[i] == static_cast<float>(s.k) * xi[i];
    CHECK(exact);
    const auto x = uniform<double>(rng, static_cast<size_t>(s.T * s.d), -3, 3);
    const auto y = run_permute<double>(x, s, pos, nullptr, SerialFor{});
    const auto back = run_unpermute<double>(y, s, pos, nullptr, ThreadedFor{4, 7});
    bool ok = true;
    for (size_t i = 0; i < x.size(); ++i)
      ok &= near(back[i], static_cast<double>(s.k) * x[i], 1e-15);
    CHECK(ok);
  }
}

// Weighted dispatch then unweighted combine == unweighted dispatch then weighted combine.
MOEFAST_TEST(weights_on_either_side_agree) {
  Rng rng(205);
  const Shape s{31, 9, 3};
  const auto pos = plan_positions(rng, s.T, s.k, 5);
  const auto x = uniform<double>(rng, static_cast<size_t>(s.T * s.d), -2, 2);
  const auto w = uniform<double>(rng, static_cast<size_t>(s.T * s.k), 0, 1);
  const auto a = run_unpermute<double>(run_permute<double>(x, s, pos, w.data(), SerialFor{}), s,
                                       pos, nullptr, SerialFor{});
  const auto b = run_unpermute<double>(run_permute<double>(x, s, pos, nullptr, SerialFor{}), s, pos,
                                       w.data(), SerialFor{});
  bool ok = true;
  for (size_t i = 0; i < a.size(); ++i) ok &= near(a[i], b[i], 1e-14);
  CHECK(ok);
}

MOEFAST_TEST(permute_empty_batch) {
  const Shape s{0, 4, 2};
  const std::vector<float> x, w;
  const std::vector<int32_t> pos;
  CHECK(run_permute<float>(x, s, pos, nullptr, SerialFor{}).empty());
  CHECK(run_permute<float>(x, s, pos, w.data(), ThreadedFor{4, 8}).empty());
  CHECK(run_unpermute<float>(x, s, pos, nullptr, ThreadedFor{4, 8}).empty());
  CHECK(run_unpermute<float>(x, s, pos, w.data(), SerialFor{}).empty());
  CHECK(run_weight_grad<float>(x, x, s, pos, ThreadedFor{4, 8}).empty());
}
