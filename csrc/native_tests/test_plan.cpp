// Tests of csrc/cpu/plan_kernel.h: routing_plan against a naive stable counting sort.
#include <cstdint>
#include <limits>
#include <vector>

#include "plan_kernel.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;
using moefast::cpu::routing_plan;

namespace {

struct Plan {
  int64_t bad = -2;
  std::vector<int32_t> counts, offs, position, order;
  bool operator==(const Plan& o) const {
    return bad == o.bad && counts == o.counts && offs == o.offs && position == o.position &&
           order == o.order;
  }
};

template <typename PF>
Plan run_plan(const std::vector<int32_t>& ids, int64_t E, int64_t num_chunks, PF pf) {
  const size_t n = ids.size();
  Plan p;  // sentinels: every output must be written
  p.counts.assign(static_cast<size_t>(E), -5);
  p.offs.assign(static_cast<size_t>(E), -5);
  p.position.assign(n, -5);
  p.order.assign(n, -5);
  p.bad = routing_plan(ids.data(), static_cast<int64_t>(n), E, num_chunks, p.counts.data(),
                       p.offs.data(), p.position.data(), p.order.data(), pf);
  return p;
}

// Stable counting sort, one slot at a time.
Plan naive_plan(const std::vector<int32_t>& ids, int64_t E) {
  Plan p;
  p.bad = -1;
  p.counts.assign(static_cast<size_t>(E), 0);
  for (int32_t e : ids) ++p.counts[e];
  p.offs.assign(static_cast<size_t>(E), 0);
  std::vector<int32_t> next(static_cast<size_t>(E), 0);
  int32_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = run;
    p.offs[e] = run += p.counts[e];
  }
  p.position.assign(ids.size(), 0);
  p.order.assign(ids.size(), 0);
  for (size_t s = 0; s < ids.size(); ++s) {
    const int32_t row = next[ids[s]]++;
    p.position[s] = row;
    p.order[row] = static_cast<int32_t>(s);
  }
  return p;
}

// Properties that hold for any valid plan, checked without the naive reference.
void check_plan_properties(const std::vector<int32_t>& ids, int64_t E, const Plan& p) {
  const int64_t n = static_cast<int64_t>(ids.size());
  CHECK_EQ(p.bad, int64_t{-1});
  bool ok = true;
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    ok &= p.counts[e] >= 0;
    run += p.counts[e];
    ok &= p.offs[e] == run;
  }
  ok &= run == n;
  CHECK(ok);
  // position and order are inverse permutations of [0, n).
  bool perm = true;
  for (int64_t s = 0; s < n; ++s) {
    const int32_t r = p.position[s];
    perm &= r >= 0 && r < n && p.order[r] == s;
  }
  for (int64_t r = 0; r < n; ++r) {
    const int32_t s = p.order[r];
    perm &= s >= 0 && s < n && p.position[s] == r;
  }
  CHECK(perm);
  if (!perm) return;
  // Each row lies in its expert's range, and rows of one expert are in ascending slot order.
  bool grouped = true;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t e = group_of_row(p.offs.data(), E, r);
    grouped &= e < E && ids[p.order[r]] == e;
    if (r > 0 && group_of_row(p.offs.data(), E, r - 1) == e) grouped &= p.order[r - 1] < p.order[r];
  }
  CHECK(grouped);
}

// Runs the plan with every chunk count and ParallelFor; all must equal the naive plan exactly.
void check_plan(const std::vector<int32_t>& ids, int64_t E) {
  const Plan ref = naive_plan(ids, E);
  for (int64_t chunks : {1, 2, 3, 7, 64, 1000}) {
    const Plan serial = run_plan(ids, E, chunks, SerialFor{});
    check_plan_properties(ids, E, serial);
    if (!CHECK(serial == ref)) {
      std::fprintf(stderr, "    n=%zu E=%lld chunks=%lld\n", ids.size(), (long long)E,
                   (long long)chunks);
    }
    for (const auto& pf : threaded_variants()) CHECK(run_plan(ids, E, chunks, pf) == ref);
  }
}

}  // namespace

MOEFAST_TEST(routing_plan_random_matches_naive) {
  Rng rng(101);
  for (int64_t E : {1, 2, 3, 8, 33, 128}) {
    for (int64_t n : {1, 2, 5, 17, 64, 100, 1001}) {
      check_plan(random_ids(rng, static_cast<size_t>(n), static_cast<int32_t>(E)), E);
    }
  }
}

MOEFAST_TEST(routing_plan_skewed_and_empty_experts) {
  Rng rng(102);
  // Only even experts used: every odd expert is empty (first, last and middle ones included).
  for (int64_t E : {2, 5, 16}) {
    auto ids = random_ids(rng, 300, static_cast<int32_t>((E + 1) / 2));
    for (auto& x : ids) x *= 2;
    check_plan(ids, E);
    const Plan p = run_plan(ids, E, 3, ThreadedFor{3, 3});
    for (int64_t e = 1; e < E; e += 2) CHECK_EQ(p.counts[e], 0);
  }
  // Only the last expert / only the first expert.
  check_plan(std::vector<int32_t>(50, 9), 10);
  check_plan(std::vector<int32_t>(50, 0), 10);
  // Mostly one expert.
  auto ids = random_ids(rng, 500, 6);
  for (size_t i = 0; i < ids.size(); i += 7) ids[i] = 3;
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = i % 10 ? 2 : ids[i];
  check_plan(ids, 6);
}

MOEFAST_TEST(routing_plan_all_ids_equal) {
  for (int64_t n : {1, 7, 64, 65}) {
    const std::vector<int32_t> ids(static_cast<size_t>(n), 2);
    check_plan(ids, 4);
    const Plan p = run_plan(ids, 4, 7, ThreadedFor{4, 7});
    CHECK((p.counts == std::vector<int32_t>{0, 0, static_cast<int32_t>(n), 0}));
    bool identity = true;  // stable: rows in slot order
    for (int64_t s = 0; s < n; ++s) identity &= p.position[s] == s && p.order[s] == s;
    CHECK(identity);
  }
}

MOEFAST_TEST(routing_plan_single_expert) {
  for (int64_t n : {0, 1, 9, 200}) check_plan(std::vector<int32_t>(static_cast<size_t>(n), 0), 1);
}

MOEFAST_TEST(routing_plan_empty_input) {
  for (int64_t E : {1, 4}) {
    for (int64_t chunks : {1, 2, 64}) {
      const Plan p = run_plan({}, E, chunks, SerialFor{});
      CHECK_EQ(p.bad, int64_t{-1});
      CHECK(p.counts == std::vector<int32_t>(static_cast<size_t>(E), 0));
      CHECK(p.offs == std::vector<int32_t>(static_cast<size_t>(E), 0));
      CHECK(run_plan({}, E, chunks, ThreadedFor{4, 8}) == p);
    }
  }
}

// The kernel treats num_chunks < 1 as 1 and more chunks than slots as one per slot.
MOEFAST_TEST(routing_plan_chunk_count_clamped) {
  Rng rng(104);
  const auto ids = random_ids(rng, 10, 3);
  const Plan ref = naive_plan(ids, 3);
  for (int64_t chunks : {0, -3, 10, 11, 1 << 20}) {
    CHECK(run_plan(ids, 3, chunks, SerialFor{}) == ref);
    CHECK(run_plan(ids, 3, chunks, ThreadedFor{4, 16}) == ref);
  }
}

// An id outside [0, E) makes routing_plan return the first such slot.
MOEFAST_TEST(routing_plan_reports_first_bad_slot) {
  Rng rng(105);
  const int64_t E = 6;
  const int32_t bad_values[] = {-1, static_cast<int32_t>(E), static_cast<int32_t>(E + 100),
                                std::numeric_limits<int32_t>::min(),
                                std::numeric_limits<int32_t>::max()};
  for (int64_t n : {1, 2, 13, 100}) {
    for (int32_t bad : bad_values) {
      for (int64_t where : {int64_t{0}, n / 2, n - 1}) {
        auto ids = random_ids(rng, static_cast<size_t>(n), static_cast<int32_t>(E));
        ids[where] = bad;
        for (int64_t chunks : {1, 2, 3, 7, 64}) {
          CHECK_EQ(run_plan(ids, E, chunks, SerialFor{}).bad, where);
          for (const auto& pf : threaded_variants())
            CHECK_EQ(run_plan(ids, E, chunks, pf).bad, where);
        }
        // A second bad id later on does not change the answer; one earlier does.
        if (where + 1 < n) {
          ids[n - 1] = -2;
          for (int64_t chunks : {1, 3, 64})
            CHECK_EQ(run_plan(ids, E, chunks, ThreadedFor{4, 8}).bad, where);
        }
        if (where > 0) {
          ids[0] = static_cast<int32_t>(E);
          for (int64_t chunks : {1, 3, 64})
            CHECK_EQ(run_plan(ids, E, chunks, ThreadedFor{4, 8}).bad, int64_t{0});
        }
      }
    }
  }
  // Several bad ids in different chunks: the smallest slot wins.
  auto ids = random_ids(rng, 70, static_cast<int32_t>(E));
  ids[65] = -1;
  ids[40] = 99;
  ids[23] = -7;
  for (int64_t chunks : {1, 2, 3, 7, 64})
    CHECK_EQ(run_plan(ids, E, chunks, ThreadedFor{4, 64}).bad, int64_t{23});
  // Fine plans report -1.
  CHECK_EQ(run_plan(random_ids(rng, 70, static_cast<int32_t>(E)), E, 7, SerialFor{}).bad,
           int64_t{-1});
}
