// Host-side helpers shared by the ATen bindings of every op (CPU now, CUDA later).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>

#include "moefast/index_math.h"

namespace moefast {

// Debug switch: when on, every output a kernel allocates is filled with NaN (floating) or INT32_MIN
// (integer) before the kernel writes it, so a test that compares against the reference proves that
// every element was written. Off by default; MOEFAST_POISON_OUTPUTS=1 turns it on at load, and
// moefast._C.set_poison_outputs(bool) at run time.
inline std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("MOEFAST_POISON_OUTPUTS");
    return env != nullptr && env[0] == '1';
  }()};
  return flag;
}

// Allocates a kernel output (poisoned when the debug switch is on).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs_flag().load(std::memory_order_relaxed)) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(std::numeric_limits<int32_t>::min());
    }
  }
  return out;
}

// Every kernel entry point holds one: the ATen calls inside a kernel (contiguous(), mm_out, ...)
// run below autograd, which has already been handled by the op's registered autograd.
using KernelGuard = at::AutoDispatchBelowADInplaceOrView;

// Adapts at::parallel_for to the ParallelFor callable that the framework-free kernels take.
struct ATenParallelFor {
  template <typename Fn>
  void operator()(int64_t begin, int64_t end, int64_t grain, const Fn& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

inline RouterMode parse_router_mode(const std::string& mode) {
  if (mode == "softmax_topk") return RouterMode::kSoftmaxTopk;
  if (mode == "topk_softmax") return RouterMode::kTopkSoftmax;
  if (mode == "hard") return RouterMode::kHard;
  if (mode == "dense") return RouterMode::kDense;
  TORCH_CHECK_VALUE(false,
                    "moefast: mode must be one of 'softmax_topk', 'topk_softmax', 'hard', "
                    "'dense'; got '",
                    mode, "'");
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "moefast.", op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, "moefast.", op, ": ", name, " must be ", dim, "-D ", shape,
                    ", got shape ", t.sizes());
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "moefast.", op, ": ", name, " must be int32, got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "moefast.", op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

// Checks a [T, k] int32 position tensor made by routing_plan.
inline void check_position(const at::Tensor& position, const char* op) {
  check_dim(position, 2, op, "position", "[T, k]");
  check_int32(position, op, "position");
  TORCH_CHECK_VALUE(position.numel() < (int64_t{1} << 31), "moefast.", op,
                    ": T * k must fit in int32, got ", position.numel());
}

// Optional [T, k] weights -> contiguous tensor in the accumulation dtype of `like`.
inline at::Tensor weights_as_acc(const c10::optional<at::Tensor>& weights,
                                 const at::Tensor& position, const at::Tensor& like,
                                 const char* op) {
  if (!weights.has_value()) return at::Tensor();
  const at::Tensor& w = *weights;
  check_floating(w, op, "weights");
  check_same_device(w, position, op, "weights", "position");
  TORCH_CHECK_VALUE(w.sizes() == position.sizes(), "moefast.", op,
                    ": weights must have the shape of position [T, k] = ", position.sizes(),
                    ", got ", w.sizes());
  const auto acc = at::toOpMathType(like.scalar_type());
  return w.to(acc).contiguous();
}

}  // namespace moefast
