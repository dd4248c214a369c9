// Helpers of the CPU grouped kernels (csrc/cpu/grouped_mm.cpp, csrc/cpu/swiglu_mlp.cpp): the check
// of offs' values, the loop over experts, and the bfloat16 views the AVX512-BF16 GEMM takes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "bf16_gemm_kernel.h"
#include "common.h"

namespace moefast {
namespace cpu_grouped {

// Checks offs against E groups and N rows: int32, 1-D, non-decreasing, within [0, N].
inline void check_offs(const at::Tensor& offs, int64_t E, int64_t N, const char* op) {
  check_dim(offs, 1, op, "offs", "[E]");
  check_int32(offs, op, "offs");
  TORCH_CHECK_VALUE(offs.size(0) == E, "moefast.", op,
                    ": offs must have one entry per group, E = ", E, ", got ", offs.size(0));
  const at::Tensor o = offs.contiguous();
  const int32_t* p = o.const_data_ptr<int32_t>();
  int32_t prev = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(p[e] >= prev, "moefast.", op, ": offs must be non-decreasing and >= 0, got ",
                      "offs[", e, "] = ", p[e], " after ", prev);
    prev = p[e];
  }
  TORCH_CHECK_VALUE(E == 0 || prev <= N, "moefast.", op, ": offs[-1] = ", prev,
                    " is past the number of rows N = ", N);
}

// dst = rows @ b[e] (+ bias[e]): one group's GEMM; with a bias, BLAS adds the broadcast bias row
// in the same pass (beta = 1).
inline void group_mm_out(at::Tensor& dst, const at::Tensor& rows, const at::Tensor& b,
                         const c10::optional<at::Tensor>& bias, int64_t e) {
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(dst, bias->select(0, e), rows, b.select(0, e));
  } else {
    at::mm_out(dst, rows, b.select(0, e));
  }
}

// Whether a call on x (the rows) runs its GEMMs on moefast's AVX512-BF16 kernel
// (csrc/cpu/bf16_gemm_kernel.h): bfloat16, the switch on (cpu_bf16_gemm_flag, common.h) and a CPU
// that has the instructions. Everything else takes oneDNN through at::mm.
inline bool use_bf16_gemm(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && cpu_bf16_gemm_flag().load(std::memory_order_relaxed) &&
         cpu::bf16_gemm::available();
}

// The kernel's weight gradients (gemm_tn) only up to this many rows per group: their packed
// operands grow with the rows (A in the caller's workspace, a 64-column block of the gradient per
// thread); larger groups take at::mm.
constexpr int64_t kMaxBf16TnRows = 32768;

inline const cpu::Bf16* bf(const at::Tensor& t) {
  return reinterpret_cast<const cpu::Bf16*>(t.const_data_ptr<at::BFloat16>());
}
inline cpu::Bf16* bf_mut(at::Tensor& t) {
  return reinterpret_cast<cpu::Bf16*>(t.mutable_data_ptr<at::BFloat16>());
}
// bias[e] of an optional [E, M] bias (contiguous rows), or null.
inline const cpu::Bf16* bf_or_null(const c10::optional<at::Tensor>& t, int64_t e) {
  return t.has_value() && t->defined() ? bf(t->select(0, e)) : nullptr;
}
// A 2-D weight w as the kernel's B [K, N]: w itself, or (transposed) its transpose; any strides.
inline cpu::bf16_gemm::Strided as_b(const at::Tensor& w, bool transposed) {
  return transposed ? cpu::bf16_gemm::Strided{bf(w), w.stride(1), w.stride(0)}
                    : cpu::bf16_gemm::Strided{bf(w), w.stride(0), w.stride(1)};
}
inline c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return t->contiguous();
}

// Whether for_each_group runs the groups in parallel (small groups) or one after the other.
inline bool groups_in_parallel(const int32_t* ends, int64_t E, int64_t K, int64_t M) {
  const int64_t rows = E == 0 ? 0 : ends[E - 1];
  const double flops_per_group = 2.0 * static_cast<double>(rows) * K * M / std::max<int64_t>(E, 1);
  return E > 1 && flops_per_group < 4.0e6;
}

// Runs fn(e) for every expert: in parallel over experts when groups are small (each BLAS call is
// then too small to use several threads well), otherwise one after the other with threaded BLAS.
// In parallel, each thread takes the largest group not yet started (longest-processing-time
// first), so that unequal groups still spread evenly.
template <typename Fn>
void for_each_group(const int32_t* ends, int64_t E, int64_t K, int64_t M, const Fn& fn) {
  if (!groups_in_parallel(ends, E, K, M)) {
    for (int64_t e = 0; e < E; ++e) fn(e);
    return;
  }
  std::vector<int64_t> order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return group_end(ends, x) - group_begin(ends, x) > group_end(ends, y) - group_begin(ends, y);
  });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), E);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const KernelGuard guard;  // dispatch-key TLS does not follow into the worker threads
    for (int64_t i = next.fetch_add(1); i < E; i = next.fetch_add(1)) fn(order[i]);
  });
}

}  // namespace cpu_grouped
}  // namespace moefast
