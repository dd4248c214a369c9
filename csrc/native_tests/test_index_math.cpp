// Tests of csrc/include/moefast/index_math.h, and of the test ParallelFor itself.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moefast/index_math.h"
#include "test_util.h"

using namespace moefast;
using namespace moefast::test;

static_assert(ceil_div(7, 2) == 4, "ceil_div is constexpr");
static_assert(static_cast<int>(RouterMode::kSoftmaxTopk) == 0 &&
                  static_cast<int>(RouterMode::kTopkSoftmax) == 1 &&
                  static_cast<int>(RouterMode::kHard) == 2 &&
                  static_cast<int>(RouterMode::kDense) == 3,
              "RouterMode values follow the order of the mode strings");

MOEFAST_TEST(ceil_div_matches_naive) {
  for (int64_t a = 0; a <= 300; ++a) {
    for (int64_t b = 1; b <= 40; ++b) {
      int64_t naive = 0;
      while (naive * b < a) ++naive;
      CHECK_EQ(ceil_div(a, b), naive);
      CHECK_EQ(ceil_div(static_cast<int32_t>(a), static_cast<int32_t>(b)),
               static_cast<int32_t>(naive));
    }
  }
  const int64_t big = int64_t{1} << 40;
  CHECK_EQ(ceil_div(big, int64_t{3}), (big + 2) / 3);
  CHECK_EQ(ceil_div(big + 1, big), int64_t{2});
  CHECK_EQ(ceil_div(int64_t{0}, big), int64_t{0});
}

MOEFAST_TEST(slot_index_token_of_slot_round_trip) {
  for (int64_t k = 1; k <= 9; ++k) {
    int64_t expected_slot = 0;
    for (int64_t t = 0; t < 50; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = slot_index(t, j, k);
        CHECK_EQ(s, expected_slot);  // slots enumerate [0, T * k) in (t, j) order
        CHECK_EQ(token_of_slot(s, k), t);
        CHECK_EQ(s - token_of_slot(s, k) * k, j);
        ++expected_slot;
      }
    }
  }
  // Beyond int32.
  const int64_t t = (int64_t{1} << 33) + 5;
  CHECK_EQ(slot_index(t, 3, 8), t * 8 + 3);
  CHECK_EQ(token_of_slot(slot_index(t, 7, 8), 8), t);
}

// Cumulative ends of `counts`.
static std::vector<int32_t> cumsum(const std::vector<int32_t>& counts) {
  std::vector<int32_t> offs(counts.size());
  int32_t run = 0;
  for (size_t e = 0; e < counts.size(); ++e) offs[e] = run += counts[e];
  return offs;
}

// The count vectors the group tests run on: random with empty experts, all empty, E = 1, ...
static std::vector<std::vector<int32_t>> count_cases() {
  Rng rng(1234);
  std::vector<std::vector<int32_t>> cases = {
      {5},       {0},          {0, 0, 0},    {0, 0, 4}, {4, 0, 0},    {1, 1, 1, 1},
      {0, 3, 0}, {2, 0, 0, 3}, {7, 0, 1, 0}, {0, 1},    {1000, 0, 1}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
  for (int rep = 0; rep < 30; ++rep) {
    std::uniform_int_distribution<int> e_dist(1, 40);
    std::uniform_int_distribution<int> c_dist(0, 6);
    std::bernoulli_distribution empty(0.3);
    std::vector<int32_t> counts(static_cast<size_t>(e_dist(rng)));
    for (auto& c : counts) c = empty(rng) ? 0 : c_dist(rng);
    cases.push_back(counts);
  }
  return cases;
}

MOEFAST_TEST(group_begin_end_size) {
  for (const auto& counts : count_cases()) {
    const auto offs = cumsum(counts);
    int64_t begin = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const int64_t ei = static_cast<int64_t>(e);
      CHECK_EQ(group_begin(offs.data(), ei), begin);
      CHECK_EQ(group_end(offs.data(), ei), begin + counts[e]);
      CHECK_EQ(group_size(offs.data(), ei), static_cast<int64_t>(counts[e]));
      begin += counts[e];
    }
  }
}

MOEFAST_TEST(group_of_row_matches_linear_scan) {
  for (const auto& counts : count_cases()) {
    const auto offs = cumsum(counts);
    const int64_t E = static_cast<int64_t>(counts.size());
    const int64_t total = offs.back();
    for (int64_t row = 0; row < total + 5; ++row) {
      int64_t naive = E;  // rows past the last offset belong to no expert
      for (int64_t e = 0; e < E; ++e) {
        if (row < offs[e]) {
          naive = e;
          break;
        }
      }
      const int64_t got = group_of_row(offs.data(), E, row);
      CHECK_EQ(got, naive);
      if (row < total) {
        // The owner is never an empty expert and its range holds the row.
        CHECK(group_size(offs.data(), got) > 0);
        CHECK(group_begin(offs.data(), got) <= row && row < group_end(offs.data(), got));
      } else {
        CHECK_EQ(got, E);
      }
    }
  }
  // E = 1.
  const int32_t one[1] = {3};
  CHECK_EQ(group_of_row(one, 1, 0), int64_t{0});
  CHECK_EQ(group_of_row(one, 1, 2), int64_t{0});
  CHECK_EQ(group_of_row(one, 1, 3), int64_t{1});
  const int32_t none[1] = {0};
  CHECK_EQ(group_of_row(none, 1, 0), int64_t{1});
}

MOEFAST_TEST(chunk_range_partitions_exactly_once) {
  std::vector<int64_t> ns;
  for (int64_t n = 0; n <= 70; ++n) ns.push_back(n);
  for (int64_t n : {97, 100, 128, 1000, 4097, 65537}) ns.push_back(n);
  std::vector<int64_t> chunk_counts;
  for (int64_t c = 1; c <= 33; ++c) chunk_counts.push_back(c);
  for (int64_t c : {64, 100, 127, 1000, 5000}) chunk_counts.push_back(c);
  for (int64_t n : ns) {
    for (int64_t chunks : chunk_counts) {
      std::vector<int> hits(static_cast<size_t>(n), 0);
      int64_t expected_begin = 0;
      int64_t min_len = std::numeric_limits<int64_t>::max();
      int64_t max_len = -1;
      bool ok = true;
      for (int64_t c = 0; c < chunks; ++c) {
        const Range r = chunk_range(n, chunks, c);
        ok &= r.begin == expected_begin;  // contiguous, in order
        ok &= r.begin <= r.end && r.end <= n;
        // The first n % chunks chunks are the longer ones.
        ok &= (r.end - r.begin) == n / chunks + (c < n % chunks ? 1 : 0);
        for (int64_t i = std::max<int64_t>(r.begin, 0); i < std::min(r.end, n); ++i) ++hits[i];
        min_len = std::min(min_len, r.end - r.begin);
        max_len = std::max(max_len, r.end - r.begin);
        expected_begin = r.end;
      }
      ok &= expected_begin == n;
      ok &= max_len - min_len <= 1;
      for (int h : hits) ok &= h == 1;
      if (!CHECK(ok)) {
        std::fprintf(stderr, "    chunk_range(n=%lld, num_chunks=%lld)\n",
                     static_cast<long long>(n), static_cast<long long>(chunks));
      }
      if (n < chunks) {
        // Short ranges: n chunks of one item, then empty chunks.
        for (int64_t c = 0; c < chunks; ++c) {
          const Range r = chunk_range(n, chunks, c);
          ok &= (r.end - r.begin) == (c < n ? 1 : 0);
        }
        CHECK(ok);
      }
    }
  }
}

template <typename T>
static void check_ranks_before_values() {
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T mx = std::numeric_limits<T>::max();
  const T lowest = std::numeric_limits<T>::lowest();
  const T denorm = std::numeric_limits<T>::denorm_min();
  // Larger first, whatever the indices.
  CHECK(ranks_before<T>(2, 5, 1, 0));
  CHECK(!ranks_before<T>(1, 0, 2, 5));
  CHECK(ranks_before<T>(-1, 9, -2, 1));
  CHECK(ranks_before<T>(denorm, 3, 0, 0));
  CHECK(ranks_before<T>(mx, 3, lowest, 0));
  CHECK(ranks_before<T>(inf, 3, mx, 0));
  CHECK(ranks_before<T>(lowest, 3, -inf, 0));
  CHECK(!ranks_before<T>(-inf, 0, lowest, 3));
  // NaN above every number, +inf included; a number never above NaN.
  for (T x : {-inf, lowest, T(-1), T(0), T(1), mx, inf}) {
    CHECK(ranks_before<T>(nan, 7, x, 0));
    CHECK(ranks_before<T>(nan, 0, x, 7));
    CHECK(!ranks_before<T>(x, 0, nan, 7));
    CHECK(!ranks_before<T>(x, 7, nan, 0));
    // Ties go to the lower index.
    CHECK(ranks_before<T>(x, 1, x, 2));
    CHECK(!ranks_before<T>(x, 2, x, 1));
    CHECK(!ranks_before<T>(x, 4, x, 4));
  }
  CHECK(ranks_before<T>(nan, 1, nan, 2));
  CHECK(!ranks_before<T>(nan, 2, nan, 1));
  CHECK(!ranks_before<T>(nan, 3, nan, 3));
  CHECK(ranks_before<T>(-nan, 1, nan, 2));  // the sign of a NaN does not matter
  CHECK(ranks_before<T>(nan, 1, -nan, 2));
  // -0 and +0 compare equal: a tie, broken by index.
  CHECK(ranks_before<T>(T(-0.0), 1, T(0.0), 2));
  CHECK(ranks_before<T>(T(0.0), 1, T(-0.0), 2));
  CHECK(!ranks_before<T>(T(0.0), 2, T(-0.0), 1));
}

MOEFAST_TEST(ranks_before_values) {
  check_ranks_before_values<float>();
  check_ranks_before_values<double>();
}

// Candidates (value, index) with many ties, NaNs, infinities and signed zeros.
template <typename T>
static std::vector<std::pair<T, int64_t>> ranking_sample(Rng& rng, int n) {
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const std::vector<T> specials = {nan, -nan, inf, -inf, T(-0.0), T(0.0)};
  std::uniform_int_distribution<int> pick(0, 9);
  std::uniform_int_distribution<int> small(-3, 3);
  std::uniform_real_distribution<double> real(-5, 5);
  std::uniform_int_distribution<int64_t> index(0, 20);
  std::vector<std::pair<T, int64_t>> out;
  for (int i = 0; i < n; ++i) {
    const int kind = pick(rng);
    T v = kind < 3 ? specials[static_cast<size_t>(pick(rng)) % specials.size()]
                   : (kind < 7 ? T(small(rng)) : static_cast<T>(real(rng)));
    out.emplace_back(v, index(rng));
  }
  return out;
}

template <typename T>
static void check_strict_weak_ordering() {
  Rng rng(77);
  const auto s = ranking_sample<T>(rng, 48);
  auto lt = [&](size_t a, size_t b) {
    return ranks_before<T>(s[a].first, s[a].second, s[b].first, s[b].second);
  };
  // Equivalent: neither ranks before the other.
  auto eq = [&](size_t a, size_t b) { return !lt(a, b) && !lt(b, a); };
  const size_t n = s.size();
  bool irreflexive = true, asymmetric = true, transitive = true, eq_transitive = true;
  bool total_on_distinct_index = true;
  for (size_t a = 0; a < n; ++a) {
    irreflexive &= !lt(a, a);
    for (size_t b = 0; b < n; ++b) {
      asymmetric &= !(lt(a, b) && lt(b, a));
      if (s[a].second != s[b].second) total_on_distinct_index &= lt(a, b) != lt(b, a);
      for (size_t c = 0; c < n; ++c) {
        if (lt(a, b) && lt(b, c)) transitive &= lt(a, c);
        if (eq(a, b) && eq(b, c)) eq_transitive &= eq(a, c);
      }
    }
  }
  CHECK(irreflexive);
  CHECK(asymmetric);
  CHECK(transitive);
  CHECK(eq_transitive);
  CHECK(total_on_distinct_index);  // ties always broken by the index
}

MOEFAST_TEST(ranks_before_is_strict_weak_ordering) {
  check_strict_weak_ordering<float>();
  check_strict_weak_ordering<double>();
}

// Sorting distinct indices with ranks_before gives: NaNs (by index), then numbers descending with
// ties by index, the order a stable sort by "NaN first, then descending value" gives.
MOEFAST_TEST(ranks_before_sort_matches_naive_stable_sort) {
  Rng rng(5);
  for (int rep = 0; rep < 50; ++rep) {
    const int n = 1 + rep;
    std::vector<double> v = small_ints<double>(rng, static_cast<size_t>(n), -4, 4);
    std::uniform_int_distribution<int> pos(0, n - 1);
    if (rep % 3 == 0) v[static_cast<size_t>(pos(rng))] = std::numeric_limits<double>::quiet_NaN();
    if (rep % 4 == 0) v[static_cast<size_t>(pos(rng))] = std::numeric_limits<double>::infinity();
    if (rep % 5 == 0) v[static_cast<size_t>(pos(rng))] = -std::numeric_limits<double>::infinity();
    std::vector<int64_t> got(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) got[i] = i;
    std::sort(got.begin(), got.end(),
              [&](int64_t a, int64_t b) { return ranks_before(v[a], a, v[b], b); });
    std::vector<int64_t> naive(got.size());
    for (int i = 0; i < n; ++i) naive[i] = i;
    std::stable_sort(naive.begin(), naive.end(), [&](int64_t a, int64_t b) {
      const bool an = std::isnan(v[a]), bn = std::isnan(v[b]);
      if (an || bn) return an && !bn;
      return v[a] > v[b];
    });
    CHECK(got == naive);
  }
}

// The test ParallelFor covers [begin, end) exactly once, on several threads.
MOEFAST_TEST(threaded_parallel_for_covers_range_once) {
  for (const ThreadedFor& pf : threaded_variants()) {
    for (int64_t begin : {0, 3}) {
      for (int64_t len : {0, 1, 2, 5, 63, 1000}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(begin + len));
        for (auto& h : hits) h = 0;
        std::atomic<int64_t> calls{0};
        pf(begin, begin + len, 1, [&](int64_t b, int64_t e) {
          ++calls;
          for (int64_t i = b; i < e; ++i) ++hits[i];
        });
        bool ok = true;
        for (int64_t i = 0; i < begin + len; ++i) ok &= hits[i] == (i >= begin ? 1 : 0);
        CHECK(ok);
        CHECK(calls <= std::max<int64_t>(1, pf.num_chunks));
        if (len == 0) CHECK_EQ(calls.load(), int64_t{0});
      }
    }
  }
  SerialFor serial;
  int64_t calls = 0;
  serial(2, 9, 1, [&](int64_t b, int64_t e) {
    ++calls;
    CHECK(b == 2 && e == 9);
  });
  CHECK_EQ(calls, int64_t{1});
}
