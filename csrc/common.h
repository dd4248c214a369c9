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
#include <vector>

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

// Whether the bfloat16 SwiGLU expert MLP on the CPU runs on moefast's own AVX512-BF16 GEMM
// (csrc/cpu/bf16_gemm_kernel.h, where the CPU has it) instead of one oneDNN matmul per expert and
// separate SwiGLU passes. On by default; MOEFAST_CPU_BF16_GEMM=0 turns it off at load, and
// moefast._C.set_cpu_bf16_gemm(bool) at run time (the tests and benchmarks compare both paths).
inline std::atomic<bool>& cpu_bf16_gemm_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("MOEFAST_CPU_BF16_GEMM");
    return env == nullptr || env[0] != '0';
  }()};
  return flag;
}

// csrc/cpu_cache.cpp: an empty CPU tensor from moefast's caching allocator (large blocks are kept
// when freed and reused for the next output of the same size).
at::Tensor empty_cpu_cached(at::IntArrayRef sizes, at::ScalarType dtype);

// Allocates a kernel output (poisoned when the debug switch is on); CPU outputs come from the
// caching allocator.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = options.device().is_cpu() && options.layout() == at::kStrided
                       ? empty_cpu_cached(sizes, c10::typeMetaToScalarType(options.dtype()))
                       : at::empty(sizes, options);
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

inline void check_router_args(const at::Tensor& logits, int64_t k, RouterMode mode,
                              const char* op) {
  check_dim(logits, 2, op, "logits", "[T, E]");
  check_floating(logits, op, "logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1, "moefast.", op,
                    ": logits must have at least one expert column, got "
                    "shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "moefast.", op, ": k must be in [1, E] = [1, ", E,
                    "], got k=", k);
  TORCH_CHECK_VALUE(mode != RouterMode::kHard || k == 1, "moefast.", op,
                    ": mode 'hard' needs k == 1, got k=", k);
  TORCH_CHECK_VALUE(mode != RouterMode::kDense || k == E, "moefast.", op,
                    ": mode 'dense' needs k == E == ", E, ", got k=", k);
  TORCH_CHECK_VALUE(E < (int64_t{1} << 31), "moefast.", op, ": E must fit in int32");
}

// Checks router_backward's arguments; returns k.
inline int64_t check_router_backward_args(const at::Tensor& grad_weights_in,
                                          const at::Tensor& logits_in, const at::Tensor& ids_in,
                                          RouterMode mode) {
  const char* op = "route (backward)";
  check_dim(ids_in, 2, op, "expert_ids", "[T, k]");
  check_int32(ids_in, op, "expert_ids");
  const int64_t k = ids_in.size(1);
  check_router_args(logits_in, k, mode, op);
  check_same_device(logits_in, ids_in, op, "logits", "expert_ids");
  check_same_device(logits_in, grad_weights_in, op, "logits", "grad_weights");
  TORCH_CHECK_VALUE(ids_in.size(0) == logits_in.size(0), "moefast.route (backward): expert_ids ",
                    "must be [T, k] with T = ", logits_in.size(0), ", got ", ids_in.sizes());
  TORCH_CHECK_VALUE(grad_weights_in.sizes() == ids_in.sizes(),
                    "moefast.route (backward): ", "grad_weights must be [T, k] = ", ids_in.sizes(),
                    ", got ", grad_weights_in.sizes());
  return k;
}

// Checks a [T, k] int32 position tensor made by routing_plan.
inline void check_position(const at::Tensor& position, const char* op) {
  check_dim(position, 2, op, "position", "[T, k]");
  check_int32(position, op, "position");
  TORCH_CHECK_VALUE(position.numel() < (int64_t{1} << 31), "moefast.", op,
                    ": T * k must fit in int32, got ", position.numel());
}

// Checks routing_plan's arguments.
inline void check_plan_args(const at::Tensor& ids_in, int64_t num_experts) {
  const char* op = "routing_plan";
  check_dim(ids_in, 2, op, "expert_ids", "[T, k]");
  check_int32(ids_in, op, "expert_ids");
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts < (int64_t{1} << 31),
                    "moefast.routing_plan: num_experts must be in [1, 2^31), got ", num_experts);
  TORCH_CHECK_VALUE(ids_in.numel() < (int64_t{1} << 31),
                    "moefast.routing_plan: T * k must fit in int32, got ", ids_in.numel());
}

// Shape, dtype and device checks of permute's arguments.
inline void check_permute_args(const at::Tensor& x_in, const at::Tensor& position_in) {
  const char* op = "permute";
  check_dim(x_in, 2, op, "x", "[T, d]");
  check_floating(x_in, op, "x");
  check_position(position_in, op);
  check_same_device(x_in, position_in, op, "x", "position");
  TORCH_CHECK_VALUE(x_in.size(0) == position_in.size(0), "moefast.permute: x has ", x_in.size(0),
                    " rows but the routing has T = ", position_in.size(0), " tokens");
}

// Shape, dtype and device checks of unpermute's arguments.
inline void check_unpermute_args(const at::Tensor& y_in, const at::Tensor& position_in) {
  const char* op = "unpermute";
  check_dim(y_in, 2, op, "y", "[T * k, d]");
  check_floating(y_in, op, "y");
  check_position(position_in, op);
  check_same_device(y_in, position_in, op, "y", "position");
  TORCH_CHECK_VALUE(y_in.size(0) == position_in.numel(),
                    "moefast.unpermute: y must have T * k = ", position_in.numel(), " rows, got ",
                    y_in.size(0));
}

// Shape, dtype and device checks of unpermute_weight_grad's arguments.
inline void check_weight_grad_args(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                   const at::Tensor& position_in) {
  const char* op = "unpermute (weight gradient)";
  check_dim(grad_out_in, 2, op, "grad_out", "[T, d]");
  check_dim(y_in, 2, op, "y", "[T * k, d]");
  check_position(position_in, op);
  check_floating(y_in, op, "y");
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == y_in.scalar_type(), "moefast.", op,
                   ": grad_out and y must share a dtype, got ", grad_out_in.scalar_type(), " and ",
                   y_in.scalar_type());
  TORCH_CHECK_VALUE(y_in.size(0) == position_in.numel() &&
                        grad_out_in.size(0) == position_in.size(0) &&
                        grad_out_in.size(1) == y_in.size(1),
                    "moefast.", op,
                    ": expected grad_out [T, d] and y [T * k, d] with T, k = ", position_in.sizes(),
                    ", got ", grad_out_in.sizes(), " and ", y_in.sizes());
}

inline void check_mixture_args(const at::Tensor& gate, const at::Tensor& expert_out,
                               const char* op) {
  check_dim(gate, 2, op, "gate_logits", "[B, E]");
  check_dim(expert_out, 3, op, "expert_out", "[E, B, C]");
  check_floating(gate, op, "gate_logits");
  TORCH_CHECK_TYPE(gate.scalar_type() == expert_out.scalar_type(), "moefast.", op,
                   ": gate_logits and expert_out must share a dtype, got ", gate.scalar_type(),
                   " and ", expert_out.scalar_type());
  check_same_device(gate, expert_out, op, "gate_logits", "expert_out");
  TORCH_CHECK_VALUE(gate.size(1) >= 1, "moefast.", op,
                    ": gate_logits needs at least one expert column, got shape ", gate.sizes());
  TORCH_CHECK_VALUE(expert_out.size(0) == gate.size(1) && expert_out.size(1) == gate.size(0),
                    "moefast.", op, ": expert_out must be [E, B, C] with E, B = ", gate.size(1),
                    ", ", gate.size(0), " from gate_logits [B, E], got ", expert_out.sizes());
}

inline void check_mixture_backward_args(const at::Tensor& grad_out_in, const at::Tensor& gate_in,
                                        const at::Tensor& expert_out_in) {
  const char* op = "mixture (backward)";
  check_mixture_args(gate_in, expert_out_in, op);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == gate_in.size(0) &&
                        grad_out_in.size(1) == expert_out_in.size(2),
                    "moefast.", op, ": grad_out must be [B, C], got ", grad_out_in.sizes());
}

// swiglu: h [..., 2H] = [gate | up] -> [..., H].
inline void check_swiglu_args(const at::Tensor& h, const char* op) {
  TORCH_CHECK_VALUE(h.dim() >= 1, "moefast.", op, ": h must have at least one dimension [..., 2H]");
  check_floating(h, op, "h");
  TORCH_CHECK_VALUE(h.size(-1) % 2 == 0, "moefast.", op,
                    ": the last dimension of h must be even, [gate | up], got shape ", h.sizes());
}

inline void check_swiglu_backward_args(const at::Tensor& grad_out, const at::Tensor& h) {
  const char* op = "swiglu_backward";
  check_swiglu_args(h, op);
  check_floating(grad_out, op, "grad_out");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == h.scalar_type(), "moefast.", op,
                   ": grad_out and h must share a dtype, got ", grad_out.scalar_type(), " and ",
                   h.scalar_type());
  check_same_device(grad_out, h, op, "grad_out", "h");
  std::vector<int64_t> want = h.sizes().vec();
  want.back() /= 2;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(want), "moefast.", op,
                    ": grad_out must have the shape of swiglu(h), ", at::IntArrayRef(want),
                    ", got ", grad_out.sizes());
}

// The epilogue activations of grouped_mm_act. kSwiglu reads a [gate | up] output of width 2H and
// returns H columns, silu(gate) * up.
enum class GemmActivation : int { kNone = 0, kRelu = 1, kGelu = 2, kSilu = 3, kSwiglu = 4 };

inline GemmActivation parse_gemm_activation(const std::string& name, const char* op) {
  if (name == "none") return GemmActivation::kNone;
  if (name == "relu") return GemmActivation::kRelu;
  if (name == "gelu") return GemmActivation::kGelu;
  if (name == "silu") return GemmActivation::kSilu;
  if (name == "swiglu") return GemmActivation::kSwiglu;
  TORCH_CHECK_VALUE(false, "moefast.", op,
                    ": activation must be one of 'none', 'relu', 'gelu', 'silu', 'swiglu'; got '",
                    name, "'");
}

// Shape, dtype and device checks of grouped_mm (the values of offs are checked on the CPU only:
// on a GPU that would take a synchronisation).
inline void check_grouped_mm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                                  const c10::optional<at::Tensor>& bias, const char* op) {
  check_dim(a, 2, op, "a", "[N, K]");
  check_dim(b, 3, op, "b", "[E, K, M]");
  check_floating(a, op, "a");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "moefast.", op,
                   ": a and b must share a dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  check_same_device(a, b, op, "a", "b");
  check_same_device(a, offs, op, "a", "offs");
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "moefast.", op,
                    ": a [N, K] and b [E, K, M] must agree on K, got a ", a.sizes(), " and b ",
                    b.sizes());
  check_dim(offs, 1, op, "offs", "[E]");
  check_int32(offs, op, "offs");
  TORCH_CHECK_VALUE(offs.size(0) == b.size(0), "moefast.", op,
                    ": offs must have one entry per group, E = ", b.size(0), ", got ",
                    offs.size(0));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == a.scalar_type(), "moefast.", op,
                     ": bias must have the dtype of a, ", a.scalar_type(), ", got ",
                     bias->scalar_type());
    check_same_device(a, *bias, op, "a", "bias");
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == b.size(0) && bias->size(1) == b.size(2),
                      "moefast.", op, ": bias must be [E, M] = [", b.size(0), ", ", b.size(2),
                      "], got ", bias->sizes());
  }
}

// Shape, dtype and device checks of grouped_mm_weight_grad.
inline void check_weight_grad_args(const at::Tensor& a, const at::Tensor& grad_out,
                                   const at::Tensor& offs, const char* op) {
  check_dim(a, 2, op, "a", "[N, K]");
  check_dim(grad_out, 2, op, "grad_out", "[N, M]");
  check_floating(a, op, "a");
  TORCH_CHECK_TYPE(a.scalar_type() == grad_out.scalar_type(), "moefast.", op,
                   ": a and grad_out must share a dtype, got ", a.scalar_type(), " and ",
                   grad_out.scalar_type());
  check_same_device(a, grad_out, op, "a", "grad_out");
  check_same_device(a, offs, op, "a", "offs");
  TORCH_CHECK_VALUE(a.size(0) == grad_out.size(0), "moefast.", op,
                    ": a and grad_out must have the same rows, got ", a.sizes(), " and ",
                    grad_out.sizes());
  check_dim(offs, 1, op, "offs", "[E]");
  check_int32(offs, op, "offs");
}

// Shape, dtype and device checks of grouped_bias_grad (the values of offs are checked on the CPU).
inline void check_bias_grad_args(const at::Tensor& grad_out, const at::Tensor& offs) {
  const char* op = "grouped_mm (bias gradient)";
  check_dim(grad_out, 2, op, "grad_out", "[N, M]");
  check_floating(grad_out, op, "grad_out");
  check_dim(offs, 1, op, "offs", "[E]");
  check_same_device(grad_out, offs, op, "grad_out", "offs");
  check_int32(offs, op, "offs");
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

// Shape, dtype and device checks of tree_route's arguments (the child indices are checked while
// the CPU kernel walks the tree; the CUDA kernel marks a row that leaves the tree with -1).
inline void check_tree_route_args(const at::Tensor& x, const at::Tensor& node_w,
                                  const at::Tensor& node_b, const at::Tensor& node_child,
                                  int64_t depth) {
  const char* op = "tree_route";
  check_dim(x, 2, op, "x", "[B, d]");
  check_floating(x, op, "x");
  check_dim(node_w, 2, op, "node_w", "[n, d]");
  check_dim(node_b, 1, op, "node_b", "[n]");
  check_dim(node_child, 2, op, "node_child", "[n, 2]");
  TORCH_CHECK_TYPE(
      node_w.scalar_type() == x.scalar_type() && node_b.scalar_type() == x.scalar_type(),
      "moefast.tree_route: node_w and node_b must have x's dtype ", x.scalar_type(), ", got ",
      node_w.scalar_type(), " and ", node_b.scalar_type());
  TORCH_CHECK_TYPE(node_child.scalar_type() == at::kLong,
                   "moefast.tree_route: node_child must be int64, got ", node_child.scalar_type());
  const int64_t n = node_w.size(0);
  TORCH_CHECK_VALUE(node_w.size(1) == x.size(1),
                    "moefast.tree_route: node_w must be [n, d] with d = ", x.size(1),
                    " (x's width), got ", node_w.sizes());
  TORCH_CHECK_VALUE(node_b.size(0) == n && node_child.size(0) == n && node_child.size(1) == 2,
                    "moefast.tree_route: node_b must be [n] and node_child [n, 2] with n = ", n,
                    ", got ", node_b.sizes(), " and ", node_child.sizes());
  TORCH_CHECK_VALUE(n == 0 ? depth == 0 : (depth >= 1 && depth <= n),
                    "moefast.tree_route: depth must be in [1, n] = [1, ", n,
                    "] (0 for a tree with no nodes), got ", depth);
  TORCH_CHECK_VALUE(x.size(0) < (int64_t{1} << 31), "moefast.tree_route: B must fit in int32, got ",
                    x.size(0));
  check_same_device(x, node_w, op, "x", "node_w");
  check_same_device(x, node_b, op, "x", "node_b");
  check_same_device(x, node_child, op, "x", "node_child");
}

}  // namespace moefast
