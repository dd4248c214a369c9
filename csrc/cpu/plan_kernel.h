// Routing plan on the CPU: per-expert counts, cumulative offsets, and the stable permutation
// (position: slot -> row, order: row -> slot) from a parallel counting sort.
//
// The sort is stable: inside one expert, rows follow the flat slot order t * k + j, so the layout
// is deterministic and independent of the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moefast/index_math.h"

namespace moefast::cpu {

// expert_ids: n = T * k int32 ids. Writes counts[E], offs[E], position[n], order[n].
// Returns -1 on success, or the first slot whose id is outside [0, E) (nothing is guaranteed about
// the outputs then). num_chunks > 0 picks how many independent pieces the ids are counted in.
template <typename ParallelFor>
int64_t routing_plan(const int32_t* expert_ids, int64_t n, int64_t E, int64_t num_chunks,
                     int32_t* counts, int32_t* offs, int32_t* position, int32_t* order,
                     ParallelFor pf) {
  num_chunks = std::max<int64_t>(1, std::min(num_chunks, std::max<int64_t>(n, 1)));
  std::vector<int64_t> chunk_counts(static_cast<size_t>(num_chunks * E), 0);
  std::vector<int64_t> first_bad(static_cast<size_t>(num_chunks), -1);

  pf(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Range r = chunk_range(n, num_chunks, c);
      int64_t* cnt = chunk_counts.data() + c * E;
      for (int64_t s = r.begin; s < r.end; ++s) {
        const int32_t e = expert_ids[s];
        if (e < 0 || e >= E) {
          first_bad[c] = s;
          break;
        }
        ++cnt[e];
      }
    }
  });
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (first_bad[c] >= 0) return first_bad[c];
  }

  // Exclusive scan over (expert, chunk): chunk c of expert e starts where chunk c-1 ended.
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t total = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t cnt = chunk_counts[c * E + e];
      chunk_counts[c * E + e] = running;
      running += cnt;
      total += cnt;
    }
    counts[e] = static_cast<int32_t>(total);
    offs[e] = static_cast<int32_t>(running);
  }

  pf(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Range r = chunk_range(n, num_chunks, c);
      int64_t* next = chunk_counts.data() + c * E;
      for (int64_t s = r.begin; s < r.end; ++s) {
        const int64_t row = next[expert_ids[s]]++;
        position[s] = static_cast<int32_t>(row);
        order[row] = static_cast<int32_t>(s);
      }
    }
  });
  return -1;
}

}  // namespace moefast::cpu
