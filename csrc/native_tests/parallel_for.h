// ParallelFor implementations for the native tests, with the contract of at::parallel_for as the
// kernels use it: pf(begin, end, grain, fn) calls fn(chunk_begin, chunk_end) on disjoint chunks
// that cover [begin, end) exactly once, and nothing at all when begin >= end.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace moefast::test {

// One call over the whole range on the calling thread.
struct SerialFor {
  template <typename Fn>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, const Fn& fn) const {
    if (begin < end) fn(begin, end);
  }
};

// Splits [begin, end) into `num_chunks` nearly equal contiguous chunks (fewer when the range is
// shorter; the kernel's grain is ignored on purpose so that small inputs are split too) and runs
// them on `num_threads` real std::threads that pull chunks from a shared counter, so that a data
// race or an out-of-bounds write shows up under the sanitizers.
struct ThreadedFor {
  int num_threads = 4;
  int64_t num_chunks = 8;

  template <typename Fn>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, const Fn& fn) const {
    if (begin >= end) return;
    const int64_t n = end - begin;
    const int64_t chunks = std::max<int64_t>(1, std::min(num_chunks, n));
    // Own chunk bounds (not moefast::chunk_range, which is under test).
    std::vector<int64_t> bounds(static_cast<size_t>(chunks + 1));
    for (int64_t c = 0; c <= chunks; ++c) bounds[c] = begin + (n * c) / chunks;
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        fn(bounds[c], bounds[c + 1]);
      }
    };
    const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), chunks));
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads));
    for (int i = 0; i < threads; ++i) pool.emplace_back(worker);
    for (auto& th : pool) th.join();
  }
};

// The ParallelFor variants every kernel test runs with; results must be bitwise identical.
inline std::vector<ThreadedFor> threaded_variants() {
  return {ThreadedFor{1, 1}, ThreadedFor{2, 2},  ThreadedFor{2, 3},
          ThreadedFor{4, 7}, ThreadedFor{3, 64}, ThreadedFor{8, 1000}};
}

// Bitwise equality of two buffers (NaN payloads included).
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace moefast::test
