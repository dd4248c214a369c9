// Index math shared by the CPU kernels, the CUDA kernels and the native unit tests.
//
// Everything here is a small inline function with no dependency on PyTorch, so that the same
// definition compiles for the host (C++17) and for the device (nvcc), and can be unit-tested on
// its own (see csrc/native_tests).
//
// Vocabulary used across moefast:
//   T       number of tokens (rows of the router logits)
//   k       experts per token (slots per token)
//   E       number of experts
//   slot    flat index t * k + j of the j-th choice of token t, in [0, T * k)
//   row     index of a row of the permuted tensor, in [0, T * k); rows are grouped by expert
//   offs    int32 cumulative row ends per expert: expert e owns rows [offs[e-1], offs[e])
//           (offs[-1] is taken as 0), the convention of torch._grouped_mm
//   position[slot] = row     where the slot's copy of its token lives in the permuted tensor
//   order[row]     = slot    the inverse permutation
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOEFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOEFAST_HOST_DEVICE inline
#endif

namespace moefast {

// ceil(a / b) for a >= 0, b > 0.
template <typename T>
MOEFAST_HOST_DEVICE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Flat slot index of choice j of token t.
MOEFAST_HOST_DEVICE int64_t slot_index(int64_t token, int64_t j, int64_t k) {
  return token * k + j;
}

// Token that a slot belongs to.
MOEFAST_HOST_DEVICE int64_t token_of_slot(int64_t slot, int64_t k) {
  return slot / k;
}

// First row of expert e.
MOEFAST_HOST_DEVICE int64_t group_begin(const int32_t* offs, int64_t e) {
  return e == 0 ? 0 : static_cast<int64_t>(offs[e - 1]);
}

// One past the last row of expert e.
MOEFAST_HOST_DEVICE int64_t group_end(const int32_t* offs, int64_t e) {
  return static_cast<int64_t>(offs[e]);
}

// Number of rows of expert e.
MOEFAST_HOST_DEVICE int64_t group_size(const int32_t* offs, int64_t e) {
  return group_end(offs, e) - group_begin(offs, e);
}

// Expert that owns `row`: the smallest e with row < offs[e] (binary search over the cumulative
// ends, so empty experts are skipped). Returns num_experts for rows past offs[num_experts - 1].
MOEFAST_HOST_DEVICE int64_t group_of_row(const int32_t* offs, int64_t num_experts, int64_t row) {
  int64_t lo = 0;
  int64_t hi = num_experts;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (row < static_cast<int64_t>(offs[mid])) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Half-open range [begin, end) of chunk c when n items are split into num_chunks nearly equal
// contiguous chunks (the first n % num_chunks chunks get one item more).
struct Range {
  int64_t begin;
  int64_t end;
};

MOEFAST_HOST_DEVICE Range chunk_range(int64_t n, int64_t num_chunks, int64_t c) {
  const int64_t base = n / num_chunks;
  const int64_t extra = n % num_chunks;
  const int64_t begin = c * base + (c < extra ? c : extra);
  const int64_t len = base + (c < extra ? 1 : 0);
  return Range{begin, begin + len};
}

// Ordering used by top-k: is candidate (a, ia) ranked before (b, ib)?
// Larger value first; NaN ranks above every number (as in torch.sort); equal values go to the
// lower index, so the choice is deterministic and identical on every device.
template <typename acc_t>
MOEFAST_HOST_DEVICE bool ranks_before(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan != b_nan) {
    return a_nan;
  }
  if (!a_nan && a != b) {
    return a > b;
  }
  return ia < ib;
}

// Routing modes, in the order of the `mode` strings accepted by the ops.
enum class RouterMode : int {
  kSoftmaxTopk = 0,  // softmax over all E, keep the top k (optionally renormalised)
  kTopkSoftmax = 1,  // pick the top k logits, softmax over those k
  kHard = 2,         // argmax, weight 1, k == 1
  kDense = 3,        // every expert, in index order, softmax over all E, k == E
};

}  // namespace moefast
