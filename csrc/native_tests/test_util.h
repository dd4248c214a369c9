// Shared helpers of the native tests: fixed-seed pseudo-random data.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "parallel_for.h"
#include "test_harness.h"

namespace moefast::test {

// Deterministic generator; every test seeds its own.
using Rng = std::mt19937;

template <typename T>
std::vector<T> uniform(Rng& rng, size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

// Small integers in [lo, hi] as floating point: many exact ties.
template <typename T>
std::vector<T> small_ints(Rng& rng, size_t n, int lo, int hi) {
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

inline std::vector<int32_t> random_ids(Rng& rng, size_t n, int32_t E) {
  std::uniform_int_distribution<int32_t> dist(0, E - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// A uniformly random permutation of [0, n).
inline std::vector<int32_t> random_permutation(Rng& rng, size_t n) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int32_t>(i);
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

}  // namespace moefast::test
