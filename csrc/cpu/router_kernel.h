// Fused router on the CPU: softmax (in acc_t), top-k and the routing weights, one pass per row.
//
// Framework-free: raw pointers in, raw pointers out, and a ParallelFor callable
// `pf(begin, end, grain, fn)` that calls fn(chunk_begin, chunk_end) over [begin, end). The ATen
// binding passes at::parallel_for; the native tests pass a serial loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moefast/index_math.h"

namespace moefast::cpu {

// Fills sel[0..k) with the indices of the k best entries of v[0..E) in ranks_before order.
template <typename acc_t>
inline void select_topk(const acc_t* v, int64_t E, int64_t k, int64_t* sel,
                        std::vector<int64_t>& scratch) {
  if (k <= 16) {
    // Insertion into a short sorted list: O(E) compares in the common case.
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (n == k && !ranks_before(v[e], e, v[sel[k - 1]], sel[k - 1])) {
        continue;
      }
      int64_t pos = n < k ? n++ : k - 1;
      while (pos > 0 && ranks_before(v[e], e, v[sel[pos - 1]], sel[pos - 1])) {
        sel[pos] = sel[pos - 1];
        --pos;
      }
      sel[pos] = e;
    }
    return;
  }
  scratch.resize(E);
  std::iota(scratch.begin(), scratch.end(), int64_t{0});
  std::partial_sort(scratch.begin(), scratch.begin() + k, scratch.end(),
                    [v](int64_t a, int64_t b) { return ranks_before(v[a], a, v[b], b); });
  std::copy(scratch.begin(), scratch.begin() + k, sel);
}

// logits [T, E] -> weights [T, k] (scalar_t), expert_ids [T, k] (int32).
template <typename scalar_t, typename acc_t, typename ParallelFor>
void router_forward(const scalar_t* logits, int64_t T, int64_t E, int64_t k, RouterMode mode,
                    bool normalize, scalar_t* weights, int32_t* expert_ids, ParallelFor pf) {
  pf(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(E);
    std::vector<int64_t> sel(k);
    std::vector<int64_t> scratch;
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * E;
      scalar_t* w = weights + t * k;
      int32_t* ids = expert_ids + t * k;
      for (int64_t e = 0; e < E; ++e) {
        v[e] = static_cast<acc_t>(row[e]);
      }
      if (mode == RouterMode::kDense) {
        acc_t m = v[0];
        for (int64_t e = 1; e < E; ++e) m = std::max(m, v[e]);
        acc_t z = 0;
        for (int64_t e = 0; e < E; ++e) z += std::exp(v[e] - m);
        for (int64_t e = 0; e < E; ++e) {
          w[e] = static_cast<scalar_t>(std::exp(v[e] - m) / z);
          ids[e] = static_cast<int32_t>(e);
        }
        continue;
      }
      select_topk(v.data(), E, k, sel.data(), scratch);
      for (int64_t j = 0; j < k; ++j) ids[j] = static_cast<int32_t>(sel[j]);
      if (mode == RouterMode::kHard) {
        w[0] = static_cast<scalar_t>(1);
        continue;
      }
      // The top-1 logit is the row maximum (or NaN, which makes every weight NaN, as it should).
      const acc_t m = v[sel[0]];
      acc_t sel_sum = 0;
      for (int64_t j = 0; j < k; ++j) sel_sum += std::exp(v[sel[j]] - m);
      acc_t denom = sel_sum;
      if (mode == RouterMode::kSoftmaxTopk && !normalize) {
        denom = 0;
        for (int64_t e = 0; e < E; ++e) denom += std::exp(v[e] - m);
      }
      for (int64_t j = 0; j < k; ++j) {
        w[j] = static_cast<scalar_t>(std::exp(v[sel[j]] - m) / denom);
      }
    }
  });
}

// Gradient of router_forward's weights with respect to the logits (modes other than kHard).
// grad_weights [T, k], logits [T, E], expert_ids [T, k] -> grad_logits [T, E].
template <typename scalar_t, typename acc_t, typename ParallelFor>
void router_backward(const scalar_t* grad_weights, const scalar_t* logits,
                     const int32_t* expert_ids, int64_t T, int64_t E, int64_t k, RouterMode mode,
                     bool normalize, scalar_t* grad_logits, ParallelFor pf) {
  pf(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(E);
    std::vector<acc_t> g(E);
    std::vector<acc_t> w(k);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * E;
      const scalar_t* gw = grad_weights + t * k;
      const int32_t* ids = expert_ids + t * k;
      scalar_t* out = grad_logits + t * E;
      if (mode == RouterMode::kHard) {
        for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(0);
        continue;
      }
      if (mode == RouterMode::kTopkSoftmax) {
        // w = softmax over the picked logits; d logit_sel = w * (g - <g, w>); zero elsewhere.
        acc_t m = static_cast<acc_t>(row[ids[0]]);
        for (int64_t j = 1; j < k; ++j) m = std::max(m, static_cast<acc_t>(row[ids[j]]));
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) {
          w[j] = std::exp(static_cast<acc_t>(row[ids[j]]) - m);
          s += w[j];
        }
        acc_t gw_dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          w[j] /= s;
          gw_dot += static_cast<acc_t>(gw[j]) * w[j];
        }
        for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(0);
        for (int64_t j = 0; j < k; ++j) {
          out[ids[j]] = static_cast<scalar_t>(w[j] * (static_cast<acc_t>(gw[j]) - gw_dot));
        }
        continue;
      }
      // Softmax over all E experts.
      acc_t m = static_cast<acc_t>(row[0]);
      for (int64_t e = 1; e < E; ++e) m = std::max(m, static_cast<acc_t>(row[e]));
      acc_t z = 0;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(static_cast<acc_t>(row[e]) - m);
        z += p[e];
      }
      for (int64_t e = 0; e < E; ++e) {
        p[e] /= z;
        g[e] = 0;
      }
      if (mode == RouterMode::kSoftmaxTopk && normalize) {
        // w_j = p_j / S with S the sum of the picked p: dL/dp_j = (g_j - <g, w>) / S.
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += p[ids[j]];
        acc_t gw_dot = 0;
        for (int64_t j = 0; j < k; ++j) gw_dot += static_cast<acc_t>(gw[j]) * (p[ids[j]] / s);
        for (int64_t j = 0; j < k; ++j) g[ids[j]] = (static_cast<acc_t>(gw[j]) - gw_dot) / s;
      } else {
        for (int64_t j = 0; j < k; ++j) g[ids[j]] = static_cast<acc_t>(gw[j]);
      }
      acc_t gp = 0;
      for (int64_t e = 0; e < E; ++e) gp += g[e] * p[e];
      for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(p[e] * (g[e] - gp));
    }
  });
}

}  // namespace moefast::cpu
