// Tests of csrc/cpu/router_kernel.h: router_forward and router_backward against naive references.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "router_kernel.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;
using moefast::cpu::router_backward;
using moefast::cpu::router_forward;
using moefast::cpu::select_topk;

namespace {

struct ModeCase {
  RouterMode mode;
  bool normalize;
  const char* name;
};

const ModeCase kTopkModes[] = {
    {RouterMode::kSoftmaxTopk, false, "softmax_topk"},
    {RouterMode::kSoftmaxTopk, true, "softmax_topk+normalize"},
    {RouterMode::kTopkSoftmax, false, "topk_softmax"},
};

// Differentiable modes (k is free for the first three, k == E for kDense).
const ModeCase kDiffModes[] = {
    {RouterMode::kSoftmaxTopk, false, "softmax_topk"},
    {RouterMode::kSoftmaxTopk, true, "softmax_topk+normalize"},
    {RouterMode::kTopkSoftmax, false, "topk_softmax"},
    {RouterMode::kDense, false, "dense"},
};

template <typename S>
double tol_for() {
  return std::is_same_v<S, float> ? 3e-6 : 1e-13;
}

// Indices of row[0..E) sorted by "NaN first, then descending value", stable (ties keep index
// order).
template <typename S>
std::vector<int32_t> naive_order(const S* row, int64_t E) {
  std::vector<int32_t> idx(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) idx[e] = static_cast<int32_t>(e);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
    const bool an = std::isnan(row[a]), bn = std::isnan(row[b]);
    if (an || bn) return an && !bn;
    return row[a] > row[b];
  });
  return idx;
}

// Naive router for one row, in double: ids and weights.
template <typename S>
void naive_router_row(const S* row, int64_t E, int64_t k, RouterMode mode, bool normalize,
                      std::vector<int32_t>& ids, std::vector<double>& w) {
  ids.assign(static_cast<size_t>(k), 0);
  w.assign(static_cast<size_t>(k), 0.0);
  if (mode == RouterMode::kDense) {
    for (int64_t e = 0; e < k; ++e) ids[e] = static_cast<int32_t>(e);
  } else {
    const auto order = naive_order(row, E);
    for (int64_t j = 0; j < k; ++j) ids[j] = order[j];
  }
  if (mode == RouterMode::kHard) {
    w[0] = 1.0;
    return;
  }
  // Full softmax p over all E, and softmax q over the picked ones.
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(row[e]));
  std::vector<double> p(static_cast<size_t>(E));
  double z = 0;
  for (int64_t e = 0; e < E; ++e) z += p[e] = std::exp(static_cast<double>(row[e]) - m);
  for (auto& x : p) x /= z;
  double picked = 0;
  for (int64_t j = 0; j < k; ++j) picked += p[ids[j]];
  for (int64_t j = 0; j < k; ++j) {
    const double pj = p[ids[j]];
    if (mode == RouterMode::kSoftmaxTopk) {
      w[j] = normalize ? pj / picked : pj;
    } else {
      w[j] = pj / picked;  // softmax over the picked logits == p renormalised over them
    }
  }
}

template <typename S>
struct RouterOut {
  std::vector<S> weights;
  std::vector<int32_t> ids;
};

template <typename S, typename PF>
RouterOut<S> run_forward(const std::vector<S>& logits, int64_t T, int64_t E, int64_t k,
                         RouterMode mode, bool normalize, PF pf) {
  // Sentinels, so that an output the kernel does not write is noticed.
  RouterOut<S> out{std::vector<S>(static_cast<size_t>(T * k), S(-123.5)),
                   std::vector<int32_t>(static_cast<size_t>(T * k), -7)};
  router_forward<S, S>(logits.data(), T, E, k, mode, normalize, out.weights.data(), out.ids.data(),
                       pf);
  return out;
}

// Logits: continuous for even rows, small integers (many ties) for odd rows.
template <typename S>
std::vector<S> mixed_logits(Rng& rng, int64_t T, int64_t E) {
  auto cont = uniform<S>(rng, static_cast<size_t>(T * E), -4, 4);
  auto ties = small_ints<S>(rng, static_cast<size_t>(T * E), -2, 2);
  for (int64_t t = 1; t < T; t += 2) {
    std::copy(ties.begin() + t * E, ties.begin() + (t + 1) * E, cont.begin() + t * E);
  }
  return cont;
}

// Compares router_forward with the naive router on every row, with the serial and the threaded
// ParallelFor (bitwise identical).
template <typename S>
void check_forward(const std::vector<S>& logits, int64_t T, int64_t E, int64_t k, RouterMode mode,
                   bool normalize, const char* what, bool check_weights = true) {
  const auto got = run_forward(logits, T, E, k, mode, normalize, SerialFor{});
  std::vector<int32_t> ids;
  std::vector<double> w;
  bool ids_ok = true, w_ok = true;
  for (int64_t t = 0; t < T; ++t) {
    naive_router_row(logits.data() + t * E, E, k, mode, normalize, ids, w);
    for (int64_t j = 0; j < k; ++j) {
      ids_ok &= got.ids[t * k + j] == ids[j];
      if (check_weights) w_ok &= near(got.weights[t * k + j], w[j], tol_for<S>());
    }
  }
  if (!CHECK(ids_ok) || !CHECK(w_ok)) {
    std::fprintf(stderr, "    %s: E=%lld k=%lld\n", what, static_cast<long long>(E),
                 static_cast<long long>(k));
  }
  for (const auto& pf : threaded_variants()) {
    const auto thr = run_forward(logits, T, E, k, mode, normalize, pf);
    if (!CHECK(same_bits(thr.weights, got.weights) && thr.ids == got.ids)) {
      std::fprintf(stderr, "    %s: E=%lld k=%lld, %d threads, %lld chunks\n", what,
                   static_cast<long long>(E), static_cast<long long>(k), pf.num_threads,
                   static_cast<long long>(pf.num_chunks));
    }
  }
}

template <typename S>
void forward_all_modes() {
  Rng rng(std::is_same_v<S, float> ? 11 : 12);
  const int64_t T = 37;
  for (int64_t E : {1, 2, 3, 7, 16, 17, 24, 40}) {
    const auto logits = mixed_logits<S>(rng, T, E);
    for (int64_t k = 1; k <= E; ++k) {  // k <= 16: insertion path; k > 16: partial_sort path
      for (const auto& mc : kTopkModes)
        check_forward(logits, T, E, k, mc.mode, mc.normalize, mc.name);
    }
    check_forward(logits, T, E, 1, RouterMode::kHard, false, "hard");
    check_forward(logits, T, E, E, RouterMode::kDense, false, "dense");
  }
}

}  // namespace

MOEFAST_TEST(router_forward_all_modes_float) {
  forward_all_modes<float>();
}
MOEFAST_TEST(router_forward_all_modes_double) {
  forward_all_modes<double>();
}

// Every logit equal: the top k are the k lowest indices, weights uniform.
MOEFAST_TEST(router_forward_ties_go_to_lower_index) {
  for (int64_t E : {4, 20, 33}) {
    std::vector<float> logits(static_cast<size_t>(3 * E), 0.75f);
    for (int64_t k = 1; k <= E; ++k) {
      const auto out = run_forward(logits, 3, E, k, RouterMode::kSoftmaxTopk, true, SerialFor{});
      bool ok = true;
      for (int64_t t = 0; t < 3; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          ok &= out.ids[t * k + j] == j;
          ok &= near(out.weights[t * k + j], 1.0 / static_cast<double>(k), 1e-6);
        }
      }
      CHECK(ok);
    }
  }
  // Ties between the best two among others.
  const std::vector<double> row = {1, 3, 2, 3, 3, -1};
  const auto out = run_forward(row, 1, 6, 4, RouterMode::kTopkSoftmax, false, SerialFor{});
  CHECK(out.ids == (std::vector<int32_t>{1, 3, 4, 2}));
}

// select_topk's insertion path (k <= 16) and partial_sort path (k > 16) agree with each other and
// with a naive stable sort, NaNs and infinities included.
MOEFAST_TEST(select_topk_paths_agree) {
  Rng rng(21);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (int rep = 0; rep < 40; ++rep) {
    const int64_t E = 17 + rep;
    auto v = rep % 2 ? small_ints<double>(rng, static_cast<size_t>(E), -3, 3)
                     : uniform<double>(rng, static_cast<size_t>(E), -1, 1);
    std::uniform_int_distribution<int64_t> pos(0, E - 1);
    if (rep % 3 == 0) v[pos(rng)] = nan;
    if (rep % 3 == 0) v[pos(rng)] = nan;
    if (rep % 4 == 1) v[pos(rng)] = inf;
    if (rep % 5 == 2) v[pos(rng)] = -inf;
    const auto naive = naive_order(v.data(), E);
    std::vector<int64_t> scratch;
    for (int64_t k = 1; k <= E; ++k) {
      std::vector<int64_t> sel(static_cast<size_t>(k), -1);
      select_topk(v.data(), E, k, sel.data(), scratch);
      bool ok = true;
      for (int64_t j = 0; j < k; ++j) ok &= sel[j] == naive[j];
      if (!CHECK(ok)) std::fprintf(stderr, "    E=%lld k=%lld\n", (long long)E, (long long)k);
    }
  }
}

// NaN and infinite logits: ids follow ranks_before (NaN first); a NaN makes every weight NaN.
MOEFAST_TEST(router_forward_nan_and_inf) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Rng rng(31);
  for (int64_t E : {5, 24}) {
    const int64_t T = 6;
    auto logits = uniform<float>(rng, static_cast<size_t>(T * E), -2, 2);
    logits[0 * E + 2] = nan;  // row 0: one NaN
    logits[1 * E + 1] = nan;  // row 1: two NaNs
    logits[1 * E + E - 1] = nan;
    logits[2 * E + 3] = inf;   // row 2: +inf
    logits[3 * E + 0] = -inf;  // row 3: -inf (finite weights)
    logits[4 * E + 4] = -inf;  // row 4: NaN and -inf
    logits[4 * E + 0] = nan;
    for (int64_t k : {int64_t{1}, int64_t{3}, E}) {
      for (const auto& mc : kTopkModes) {
        // ids on every row; weights only on the rows without NaN or +inf.
        check_forward(logits, T, E, k, mc.mode, mc.normalize, mc.name, /*check_weights=*/false);
        const auto out = run_forward(logits, T, E, k, mc.mode, mc.normalize, SerialFor{});
        bool ok = true;
        for (int64_t t : {0, 1, 4}) {
          for (int64_t j = 0; j < k; ++j) ok &= std::isnan(out.weights[t * k + j]);
        }
        CHECK(ok);
        CHECK_EQ(out.ids[0 * k], 2);  // NaN ranks first
        CHECK_EQ(out.ids[1 * k], 1);  // two NaNs: the lower index first
        if (k > 1) CHECK_EQ(out.ids[1 * k + 1], static_cast<int32_t>(E - 1));
        CHECK_EQ(out.ids[2 * k], 3);
        CHECK_EQ(out.ids[4 * k], 0);
        std::vector<int32_t> ids;
        std::vector<double> w;
        for (int64_t t : {3, 5}) {
          naive_router_row(logits.data() + t * E, E, k, mc.mode, mc.normalize, ids, w);
          for (int64_t j = 0; j < k; ++j) ok &= near(out.weights[t * k + j], w[j], 3e-6);
        }
        CHECK(ok);
      }
      const auto hard = run_forward(logits, T, E, 1, RouterMode::kHard, false, SerialFor{});
      CHECK_EQ(hard.ids[0], 2);
      CHECK_EQ(hard.weights[0], 1.0f);
      const auto dense = run_forward(logits, T, E, E, RouterMode::kDense, false, SerialFor{});
      CHECK(std::isnan(dense.weights[0]) && std::isnan(dense.weights[E - 1]));
    }
  }
}

// Large logits do not overflow: the softmax subtracts the row maximum.
MOEFAST_TEST(router_forward_large_logits_stable) {
  Rng rng(41);
  const int64_t T = 20, E = 12;
  const auto logits = uniform<float>(rng, static_cast<size_t>(T * E), -3e4, 3e4);
  for (int64_t k : {1, 4, 12}) {
    for (const auto& mc : kTopkModes)
      check_forward(logits, T, E, k, mc.mode, mc.normalize, mc.name);
  }
  check_forward(logits, T, E, E, RouterMode::kDense, false, "dense");
  const auto out = run_forward(logits, T, E, 4, RouterMode::kSoftmaxTopk, true, SerialFor{});
  bool finite = true;
  for (float w : out.weights) finite &= std::isfinite(w);
  CHECK(finite);
}

MOEFAST_TEST(router_forward_empty_batch) {
  std::vector<float> logits;
  std::vector<float> w;
  std::vector<int32_t> ids;
  router_forward<float, float>(logits.data(), 0, 8, 2, RouterMode::kSoftmaxTopk, false, w.data(),
                               ids.data(), SerialFor{});
  router_forward<float, float>(logits.data(), 0, 8, 2, RouterMode::kSoftmaxTopk, false, w.data(),
                               ids.data(), ThreadedFor{4, 8});
  std::vector<float> gl;
  router_backward<float, float>(w.data(), logits.data(), ids.data(), 0, 8, 2,
                                RouterMode::kSoftmaxTopk, false, gl.data(), ThreadedFor{4, 8});
  CHECK(true);  // nothing to do, and nothing touched
}

namespace {

// Logits whose entries are at least ~0.2 apart within a row, so that a finite-difference step
// never changes the selected experts.
std::vector<double> separated_logits(Rng& rng, int64_t T, int64_t E) {
  std::vector<double> out(static_cast<size_t>(T * E));
  std::uniform_real_distribution<double> noise(-0.05, 0.05);
  for (int64_t t = 0; t < T; ++t) {
    const auto perm = random_permutation(rng, static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      out[t * E + e] = 0.3 * (perm[e] - 0.5 * static_cast<double>(E)) + noise(rng);
    }
  }
  return out;
}

// sum_t,j gw[t, j] * w[t, j](logits).
double router_loss(const std::vector<double>& logits, const std::vector<double>& gw, int64_t T,
                   int64_t E, int64_t k, RouterMode mode, bool normalize,
                   const std::vector<int32_t>& expected_ids, bool& ids_stable) {
  const auto out = run_forward(logits, T, E, k, mode, normalize, SerialFor{});
  ids_stable &= out.ids == expected_ids;
  double loss = 0;
  for (size_t i = 0; i < gw.size(); ++i) loss += gw[i] * out.weights[i];
  return loss;
}

}  // namespace

MOEFAST_TEST(router_backward_matches_finite_differences) {
  Rng rng(51);
  const int64_t T = 5;
  const double h = 1e-5;
  for (int64_t E : {1, 2, 3, 8, 20}) {
    const auto logits = separated_logits(rng, T, E);
    for (const auto& mc : kDiffModes) {
      std::vector<int64_t> ks;
      if (mc.mode == RouterMode::kDense) {
        ks = {E};
      } else {
        for (int64_t k : {1, 2, 3, 8, 16, 17, 20}) {
          if (k <= E) ks.push_back(k);
        }
      }
      for (int64_t k : ks) {
        const auto fwd = run_forward(logits, T, E, k, mc.mode, mc.normalize, SerialFor{});
        const auto gw = uniform<double>(rng, static_cast<size_t>(T * k), -1, 1);
        std::vector<double> grad(static_cast<size_t>(T * E), -99.0);
        router_backward<double, double>(gw.data(), logits.data(), fwd.ids.data(), T, E, k, mc.mode,
                                        mc.normalize, grad.data(), SerialFor{});
        bool ok = true, stable = true;
        auto x = logits;
        for (int64_t i = 0; i < T * E; ++i) {
          x[i] = logits[i] + h;
          const double up = router_loss(x, gw, T, E, k, mc.mode, mc.normalize, fwd.ids, stable);
          x[i] = logits[i] - h;
          const double dn = router_loss(x, gw, T, E, k, mc.mode, mc.normalize, fwd.ids, stable);
          x[i] = logits[i];
          const double fd = (up - dn) / (2 * h);
          ok &= near(grad[i], fd, 1e-8);
        }
        CHECK(stable);
        if (!CHECK(ok)) {
          std::fprintf(stderr, "    %s: E=%lld k=%lld\n", mc.name, static_cast<long long>(E),
                       static_cast<long long>(k));
        }
        for (const auto& pf : threaded_variants()) {
          std::vector<double> g2(static_cast<size_t>(T * E), -99.0);
          router_backward<double, double>(gw.data(), logits.data(), fwd.ids.data(), T, E, k,
                                          mc.mode, mc.normalize, g2.data(), pf);
          CHECK(same_bits(g2, grad));
        }
      }
    }
  }
}

// Float backward agrees with the double one, on serial and threaded ParallelFor.
MOEFAST_TEST(router_backward_float_matches_double) {
  Rng rng(61);
  const int64_t T = 29;
  for (int64_t E : {6, 24}) {
    const auto logits_d = separated_logits(rng, T, E);
    std::vector<float> logits_f(logits_d.begin(), logits_d.end());
    std::vector<double> logits_fd(logits_f.begin(), logits_f.end());  // same values as the floats
    for (const auto& mc : kDiffModes) {
      const int64_t k = mc.mode == RouterMode::kDense ? E : std::min<int64_t>(E, 4 + E / 2);
      const auto fwd = run_forward(logits_f, T, E, k, mc.mode, mc.normalize, SerialFor{});
      const auto gw_d = uniform<double>(rng, static_cast<size_t>(T * k), -1, 1);
      std::vector<float> gw_f(gw_d.begin(), gw_d.end());
      std::vector<double> gw_fd(gw_f.begin(), gw_f.end());
      std::vector<double> ref(static_cast<size_t>(T * E));
      router_backward<double, double>(gw_fd.data(), logits_fd.data(), fwd.ids.data(), T, E, k,
                                      mc.mode, mc.normalize, ref.data(), SerialFor{});
      std::vector<float> got(static_cast<size_t>(T * E), -99.f);
      router_backward<float, float>(gw_f.data(), logits_f.data(), fwd.ids.data(), T, E, k, mc.mode,
                                    mc.normalize, got.data(), SerialFor{});
      bool ok = true;
      for (size_t i = 0; i < ref.size(); ++i) ok &= near(got[i], ref[i], 1e-5);
      CHECK(ok);
      for (const auto& pf : threaded_variants()) {
        std::vector<float> g2(static_cast<size_t>(T * E), -99.f);
        router_backward<float, float>(gw_f.data(), logits_f.data(), fwd.ids.data(), T, E, k,
                                      mc.mode, mc.normalize, g2.data(), pf);
        CHECK(same_bits(g2, got));
      }
    }
  }
}

MOEFAST_TEST(router_backward_hard_is_zero) {
  Rng rng(71);
  for (int64_t E : {1, 5, 30}) {
    const int64_t T = 13;
    const auto logits = uniform<float>(rng, static_cast<size_t>(T * E), -3, 3);
    const auto fwd = run_forward(logits, T, E, 1, RouterMode::kHard, false, SerialFor{});
    bool ok = true;
    for (int64_t t = 0; t < T; ++t) {
      ok &= fwd.weights[t] == 1.0f;
      ok &= fwd.ids[t] == naive_order(logits.data() + t * E, E)[0];
    }
    CHECK(ok);
    const auto gw = uniform<float>(rng, static_cast<size_t>(T), 0.5, 2);
    for (bool threaded : {false, true}) {
      std::vector<float> grad(static_cast<size_t>(T * E), 7.0f);
      if (threaded) {
        router_backward<float, float>(gw.data(), logits.data(), fwd.ids.data(), T, E, 1,
                                      RouterMode::kHard, false, grad.data(), ThreadedFor{4, 5});
      } else {
        router_backward<float, float>(gw.data(), logits.data(), fwd.ids.data(), T, E, 1,
                                      RouterMode::kHard, false, grad.data(), SerialFor{});
      }
      bool zero = true;
      for (float g : grad) zero &= g == 0.0f && !std::signbit(g);
      CHECK(zero);
    }
  }
}
