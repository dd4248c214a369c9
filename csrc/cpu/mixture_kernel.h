// The adaptive-fusion combine on the CPU: out[b] = sum_e softmax(gate[b])[e] * expert_out[e, b],
// softmax and weighted sum fused per row, forward and backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moefast::cpu {

// Softmax of gate[0..E) into p (acc_t).
template <typename scalar_t, typename acc_t>
inline void softmax_row(const scalar_t* gate, int64_t E, acc_t* p) {
  acc_t m = static_cast<acc_t>(gate[0]);
  for (int64_t e = 1; e < E; ++e) m = std::max(m, static_cast<acc_t>(gate[e]));
  acc_t z = 0;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(static_cast<acc_t>(gate[e]) - m);
    z += p[e];
  }
  for (int64_t e = 0; e < E; ++e) p[e] /= z;
}

inline int64_t mixture_grain(int64_t E, int64_t C) {
  const int64_t g = 16384 / std::max<int64_t>(E * C, 1);
  return std::max<int64_t>(g, 1);
}

// gate [B, E], expert_out [E, B, C] -> out [B, C].
template <typename scalar_t, typename acc_t, typename ParallelFor>
void mixture_forward(const scalar_t* gate, const scalar_t* expert_out, int64_t B, int64_t E,
                     int64_t C, scalar_t* out, ParallelFor pf) {
  pf(0, B, mixture_grain(E, C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(static_cast<size_t>(E));
    std::vector<acc_t> acc(static_cast<size_t>(C));
    for (int64_t b = begin; b < end; ++b) {
      softmax_row(gate + b * E, E, p.data());
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* src = expert_out + (e * B + b) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += p[e] * static_cast<acc_t>(src[c]);
      }
      for (int64_t c = 0; c < C; ++c) out[b * C + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// grad_out [B, C] -> grad_gate [B, E], grad_expert_out [E, B, C].
template <typename scalar_t, typename acc_t, typename ParallelFor>
void mixture_backward(const scalar_t* grad_out, const scalar_t* gate, const scalar_t* expert_out,
                      int64_t B, int64_t E, int64_t C, scalar_t* grad_gate,
                      scalar_t* grad_expert_out, ParallelFor pf) {
  pf(0, B, mixture_grain(E, C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(static_cast<size_t>(E));
    std::vector<acc_t> dots(static_cast<size_t>(E));
    for (int64_t b = begin; b < end; ++b) {
      softmax_row(gate + b * E, E, p.data());
      const scalar_t* g = grad_out + b * C;
      acc_t pd = 0;
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* src = expert_out + (e * B + b) * C;
        scalar_t* dst = grad_expert_out + (e * B + b) * C;
        acc_t dot = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gc = static_cast<acc_t>(g[c]);
          dot += gc * static_cast<acc_t>(src[c]);
          dst[c] = static_cast<scalar_t>(p[e] * gc);
        }
        dots[e] = dot;
        pd += p[e] * dot;
      }
      for (int64_t e = 0; e < E; ++e) {
        grad_gate[b * E + e] = static_cast<scalar_t>(p[e] * (dots[e] - pd));
      }
    }
  });
}

}  // namespace moefast::cpu
