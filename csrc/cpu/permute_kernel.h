// Dispatch (permute) and combine (unpermute) on the CPU, and the gradient of the combine weights.
//
// Both directions run over tokens, so each token row is read or written once and every permuted
// row is touched by exactly one token: position is a permutation of [0, T * k), no two threads
// ever write the same row.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "moefast/index_math.h"

namespace moefast::cpu {

// Grain (in tokens) for a row length d: aim at ~32 KiB of copying per task.
inline int64_t token_grain(int64_t d) {
  const int64_t g = 8192 / (d > 0 ? d : 1);
  return g > 0 ? g : 1;
}

// out[position[t, j]] = x[t] * (weights ? weights[t, j] : 1), out has T * k rows of d.
template <typename scalar_t, typename acc_t, typename ParallelFor>
void permute_forward(const scalar_t* x, int64_t T, int64_t d, int64_t k, const int32_t* position,
                     const acc_t* weights, scalar_t* out, ParallelFor pf) {
  pf(0, T, token_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* src = x + t * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = slot_index(t, j, k);
        scalar_t* dst = out + static_cast<int64_t>(position[slot]) * d;
        if (weights == nullptr) {
          std::memcpy(dst, src, sizeof(scalar_t) * static_cast<size_t>(d));
        } else {
          const acc_t w = weights[slot];
          for (int64_t c = 0; c < d; ++c) {
            dst[c] = static_cast<scalar_t>(w * static_cast<acc_t>(src[c]));
          }
        }
      }
    }
  });
}

// out[t] = sum_j (weights ? weights[t, j] : 1) * y[position[t, j]], summed in acc_t.
template <typename scalar_t, typename acc_t, typename ParallelFor>
void unpermute_forward(const scalar_t* y, int64_t T, int64_t d, int64_t k, const int32_t* position,
                       const acc_t* weights, scalar_t* out, ParallelFor pf) {
  pf(0, T, token_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(d));
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c = 0; c < d; ++c) acc[c] = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = slot_index(t, j, k);
        const scalar_t* src = y + static_cast<int64_t>(position[slot]) * d;
        const acc_t w = weights == nullptr ? acc_t(1) : weights[slot];
        for (int64_t c = 0; c < d; ++c) acc[c] += w * static_cast<acc_t>(src[c]);
      }
      scalar_t* dst = out + t * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// <a, b> over n elements in acc_t, as kLanes independent partial sums added pairwise at the end:
// a single running sum chains every add on the one before and runs at the add's latency.
template <typename scalar_t, typename acc_t>
acc_t dot_product(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t p0 = 0, p1 = 0, p2 = 0, p3 = 0, p4 = 0, p5 = 0, p6 = 0, p7 = 0;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    p0 += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
    p1 += static_cast<acc_t>(a[c + 1]) * static_cast<acc_t>(b[c + 1]);
    p2 += static_cast<acc_t>(a[c + 2]) * static_cast<acc_t>(b[c + 2]);
    p3 += static_cast<acc_t>(a[c + 3]) * static_cast<acc_t>(b[c + 3]);
    p4 += static_cast<acc_t>(a[c + 4]) * static_cast<acc_t>(b[c + 4]);
    p5 += static_cast<acc_t>(a[c + 5]) * static_cast<acc_t>(b[c + 5]);
    p6 += static_cast<acc_t>(a[c + 6]) * static_cast<acc_t>(b[c + 6]);
    p7 += static_cast<acc_t>(a[c + 7]) * static_cast<acc_t>(b[c + 7]);
  }
  acc_t dot = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7));
  for (; c < n; ++c) dot += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return dot;
}

// grad_weights[t, j] = <grad_out[t], y[position[t, j]]>, in acc_t.
template <typename scalar_t, typename acc_t, typename ParallelFor>
void unpermute_weight_grad(const scalar_t* grad_out, const scalar_t* y, int64_t T, int64_t d,
                           int64_t k, const int32_t* position, acc_t* grad_weights,
                           ParallelFor pf) {
  pf(0, T, token_grain(d * k), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* g = grad_out + t * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = slot_index(t, j, k);
        const scalar_t* src = y + static_cast<int64_t>(position[slot]) * d;
        grad_weights[slot] = dot_product<scalar_t, acc_t>(g, src, d);
      }
    }
  });
}

}  // namespace moefast::cpu
