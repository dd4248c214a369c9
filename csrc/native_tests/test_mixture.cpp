// Tests of csrc/cpu/mixture_kernel.h: the softmax-weighted combine, forward and backward.
#include <cmath>
#include <cstdint>
#include <vector>

#include "mixture_kernel.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;
using moefast::cpu::mixture_backward;
using moefast::cpu::mixture_forward;

namespace {

template <typename S>
double tol_for() {
  return std::is_same_v<S, float> ? 3e-6 : 1e-13;
}

// Softmax of row[0..E) in double.
template <typename S>
std::vector<double> naive_softmax(const S* row, int64_t E) {
  double m = static_cast<double>(row[0]);
  for (int64_t e = 1; e < E; ++e) m = std::max(m, static_cast<double>(row[e]));
  std::vector<double> p(static_cast<size_t>(E));
  double z = 0;
  for (int64_t e = 0; e < E; ++e) z += p[e] = std::exp(static_cast<double>(row[e]) - m);
  for (auto& x : p) x /= z;
  return p;
}

template <typename S>
std::vector<double> naive_forward(const std::vector<S>& gate, const std::vector<S>& xo, int64_t B,
                                  int64_t E, int64_t C) {
  std::vector<double> out(static_cast<size_t>(B * C), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const auto p = naive_softmax(gate.data() + b * E, E);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t c = 0; c < C; ++c) out[b * C + c] += p[e] * xo[(e * B + b) * C + c];
    }
  }
  return out;
}

template <typename S, typename PF>
std::vector<S> run_forward(const std::vector<S>& gate, const std::vector<S>& xo, int64_t B,
                           int64_t E, int64_t C, PF pf) {
  std::vector<S> out(static_cast<size_t>(B * C), S(-55));
  mixture_forward<S, S>(gate.data(), xo.data(), B, E, C, out.data(), pf);
  return out;
}

template <typename S>
struct Grads {
  std::vector<S> gate, xo;
};

template <typename S, typename PF>
Grads<S> run_backward(const std::vector<S>& g, const std::vector<S>& gate, const std::vector<S>& xo,
                      int64_t B, int64_t E, int64_t C, PF pf) {
  Grads<S> out{std::vector<S>(static_cast<size_t>(B * E), S(-55)),
               std::vector<S>(static_cast<size_t>(E * B * C), S(-55))};
  mixture_backward<S, S>(g.data(), gate.data(), xo.data(), B, E, C, out.gate.data(), out.xo.data(),
                         pf);
  return out;
}

struct Shape {
  int64_t B, E, C;
};

const Shape kShapes[] = {{1, 1, 1},  {4, 1, 3},   {1, 5, 1},  {7, 3, 5},
                         {16, 8, 4}, {33, 2, 17}, {5, 40, 3}, {200, 4, 16}};

template <typename S>
void forward_case(Rng& rng, const Shape& s, double gate_scale) {
  const auto gate = uniform<S>(rng, static_cast<size_t>(s.B * s.E), -gate_scale, gate_scale);
  const auto xo = uniform<S>(rng, static_cast<size_t>(s.E * s.B * s.C), -2, 2);
  const auto got = run_forward(gate, xo, s.B, s.E, s.C, SerialFor{});
  const auto ref = naive_forward(gate, xo, s.B, s.E, s.C);
  bool ok = true;
  for (size_t i = 0; i < ref.size(); ++i) ok &= near(got[i], ref[i], tol_for<S>());
  if (!CHECK(ok)) {
    std::fprintf(stderr, "    B=%lld E=%lld C=%lld scale=%g\n", (long long)s.B, (long long)s.E,
                 (long long)s.C, gate_scale);
  }
  for (const auto& pf : threaded_variants()) {
    CHECK(same_bits(run_forward(gate, xo, s.B, s.E, s.C, pf), got));
  }
}

// Naive analytic gradients of L = <g, out>: d expert_out[e, b] = p[b, e] g[b];
// d gate[b, e] = p[b, e] (<g[b], expert_out[e, b]> - sum_f p[b, f] <g[b], expert_out[f, b]>).
template <typename S>
Grads<double> naive_backward(const std::vector<S>& g, const std::vector<S>& gate,
                             const std::vector<S>& xo, int64_t B, int64_t E, int64_t C) {
  Grads<double> out{std::vector<double>(static_cast<size_t>(B * E)),
                    std::vector<double>(static_cast<size_t>(E * B * C))};
  for (int64_t b = 0; b < B; ++b) {
    const auto p = naive_softmax(gate.data() + b * E, E);
    std::vector<double> dots(static_cast<size_t>(E), 0.0);
    double mean = 0;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t c = 0; c < C; ++c) {
        dots[e] += static_cast<double>(g[b * C + c]) * xo[(e * B + b) * C + c];
        out.xo[(e * B + b) * C + c] = p[e] * g[b * C + c];
      }
      mean += p[e] * dots[e];
    }
    for (int64_t e = 0; e < E; ++e) out.gate[b * E + e] = p[e] * (dots[e] - mean);
  }
  return out;
}

}  // namespace

MOEFAST_TEST(mixture_forward_matches_naive) {
  Rng rng(301);
  for (const auto& s : kShapes) {
    for (double scale : {0.5, 4.0}) {
      forward_case<float>(rng, s, scale);
      forward_case<double>(rng, s, scale);
    }
  }
}

// Large gates do not overflow (the softmax subtracts the row maximum).
MOEFAST_TEST(mixture_forward_large_gates_stable) {
  Rng rng(302);
  for (const auto& s : kShapes) {
    forward_case<float>(rng, s, 5e4);
    forward_case<double>(rng, s, 1e300);
  }
}

// E = 1: the softmax is 1, out == expert_out and the gate gradient is exactly 0.
MOEFAST_TEST(mixture_single_expert) {
  Rng rng(303);
  const int64_t B = 9, C = 6;
  const auto gate = uniform<float>(rng, B, -100, 100);
  const auto xo = uniform<float>(rng, static_cast<size_t>(B * C), -3, 3);
  const auto g = uniform<float>(rng, static_cast<size_t>(B * C), -3, 3);
  CHECK(run_forward(gate, xo, B, 1, C, ThreadedFor{3, 4}) == xo);
  const auto grads = run_backward(g, gate, xo, B, 1, C, ThreadedFor{3, 4});
  CHECK(grads.gate == std::vector<float>(B, 0.0f));
  CHECK(grads.xo == g);
}

MOEFAST_TEST(mixture_empty_batch) {
  const std::vector<float> empty;
  for (int64_t E : {1, 4}) {
    CHECK(run_forward(empty, empty, 0, E, 3, SerialFor{}).empty());
    CHECK(run_forward(empty, empty, 0, E, 3, ThreadedFor{4, 8}).empty());
    const auto grads = run_backward(empty, empty, empty, 0, E, 3, ThreadedFor{4, 8});
    CHECK(grads.gate.empty() && grads.xo.empty());
  }
}

MOEFAST_TEST(mixture_backward_matches_naive_analytic) {
  Rng rng(304);
  for (const auto& s : kShapes) {
    const auto gate = uniform<double>(rng, static_cast<size_t>(s.B * s.E), -3, 3);
    const auto xo = uniform<double>(rng, static_cast<size_t>(s.E * s.B * s.C), -2, 2);
    const auto g = uniform<double>(rng, static_cast<size_t>(s.B * s.C), -1, 1);
    const auto ref = naive_backward(g, gate, xo, s.B, s.E, s.C);
    const auto got = run_backward(g, gate, xo, s.B, s.E, s.C, SerialFor{});
    bool ok = true;
    for (size_t i = 0; i < ref.gate.size(); ++i) ok &= near(got.gate[i], ref.gate[i], 1e-13);
    for (size_t i = 0; i < ref.xo.size(); ++i) ok &= near(got.xo[i], ref.xo[i], 1e-14);
    CHECK(ok);
    for (const auto& pf : threaded_variants()) {
      const auto thr = run_backward(g, gate, xo, s.B, s.E, s.C, pf);
      CHECK(same_bits(thr.gate, got.gate) && same_bits(thr.xo, got.xo));
    }
    // Float against the double reference of the same (float-rounded) inputs.
    const std::vector<float> gate_f(gate.begin(), gate.end()), xo_f(xo.begin(), xo.end()),
        g_f(g.begin(), g.end());
    const auto ref_f = naive_backward(g_f, gate_f, xo_f, s.B, s.E, s.C);
    const auto got_f = run_backward(g_f, gate_f, xo_f, s.B, s.E, s.C, SerialFor{});
    bool ok_f = true;
    for (size_t i = 0; i < ref_f.gate.size(); ++i) ok_f &= near(got_f.gate[i], ref_f.gate[i], 1e-5);
    for (size_t i = 0; i < ref_f.xo.size(); ++i) ok_f &= near(got_f.xo[i], ref_f.xo[i], 1e-6);
    CHECK(ok_f);
    for (const auto& pf : threaded_variants()) {
      const auto thr = run_backward(g_f, gate_f, xo_f, s.B, s.E, s.C, pf);
      CHECK(same_bits(thr.gate, got_f.gate) && same_bits(thr.xo, got_f.xo));
    }
  }
}

// Central finite differences of L = <g, mixture_forward(gate, expert_out)> in double.
MOEFAST_TEST(mixture_backward_matches_finite_differences) {
  Rng rng(305);
  const double h = 1e-5;
  const Shape shapes[] = {{1, 1, 1}, {3, 1, 2}, {2, 4, 3}, {5, 3, 7}, {4, 9, 2}};
  for (const auto& s : shapes) {
    auto gate = uniform<double>(rng, static_cast<size_t>(s.B * s.E), -2, 2);
    auto xo = uniform<double>(rng, static_cast<size_t>(s.E * s.B * s.C), -2, 2);
    const auto g = uniform<double>(rng, static_cast<size_t>(s.B * s.C), -1, 1);
    auto loss = [&]() {
      const auto out = run_forward(gate, xo, s.B, s.E, s.C, SerialFor{});
      double l = 0;
      for (size_t i = 0; i < out.size(); ++i) l += g[i] * out[i];
      return l;
    };
    const auto got = run_backward(g, gate, xo, s.B, s.E, s.C, ThreadedFor{2, 3});
    bool ok = true;
    for (size_t i = 0; i < gate.size(); ++i) {
      const double x0 = gate[i];
      gate[i] = x0 + h;
      const double up = loss();
      gate[i] = x0 - h;
      const double dn = loss();
      gate[i] = x0;
      ok &= near(got.gate[i], (up - dn) / (2 * h), 1e-8);
    }
    for (size_t i = 0; i < xo.size(); ++i) {
      const double x0 = xo[i];
      xo[i] = x0 + h;
      const double up = loss();
      xo[i] = x0 - h;
      const double dn = loss();
      xo[i] = x0;
      ok &= near(got.xo[i], (up - dn) / (2 * h), 1e-8);
    }
    if (!CHECK(ok)) {
      std::fprintf(stderr, "    B=%lld E=%lld C=%lld\n", (long long)s.B, (long long)s.E,
                   (long long)s.C);
    }
  }
}
