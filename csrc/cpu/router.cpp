// ATen binding of the CPU router: argument checks, dtype dispatch, kernel call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "router_kernel.h"

namespace moefast {
namespace {

void check_router_args(const at::Tensor& logits, int64_t k, RouterMode mode, const char* op) {
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

std::tuple<at::Tensor, at::Tensor> router_cpu(const at::Tensor& logits_in, int64_t k,
                                              c10::string_view mode_str, bool normalize) {
  const KernelGuard guard;
  const RouterMode mode = parse_router_mode(std::string(mode_str));
  check_router_args(logits_in, k, mode, "route");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  at::Tensor weights = new_output({T, k}, logits.options());
  at::Tensor ids = new_output({T, k}, logits.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "router_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        cpu::router_forward<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), T, E, k, mode,
                                             normalize, weights.mutable_data_ptr<scalar_t>(),
                                             ids.mutable_data_ptr<int32_t>(), ATenParallelFor{});
      });
  return {weights, ids};
}

at::Tensor router_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                               const at::Tensor& ids_in, c10::string_view mode_str,
                               bool normalize) {
  const KernelGuard guard;
  const RouterMode mode = parse_router_mode(std::string(mode_str));
  const int64_t k = ids_in.dim() == 2 ? ids_in.size(1) : 0;
  check_router_args(logits_in, k, mode, "route (backward)");
  check_int32(ids_in, "route (backward)", "expert_ids");
  TORCH_CHECK_VALUE(ids_in.dim() == 2 && ids_in.size(0) == logits_in.size(0),
                    "moefast.route "
                    "(backward): expert_ids must be [T, k] with T = ",
                    logits_in.size(0), ", got ", ids_in.sizes());
  TORCH_CHECK_VALUE(grad_weights_in.sizes() == ids_in.sizes(),
                    "moefast.route (backward): "
                    "grad_weights must be [T, k] = ",
                    ids_in.sizes(), ", got ", grad_weights_in.sizes());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.to(logits.scalar_type()).contiguous();
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  at::Tensor grad_logits = new_output(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "router_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        cpu::router_backward<scalar_t, acc_t>(
            grad_weights.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
            ids.const_data_ptr<int32_t>(), T, E, k, mode, normalize,
            grad_logits.mutable_data_ptr<scalar_t>(), ATenParallelFor{});
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("router", &router_cpu);
  m.impl("router_backward", &router_backward_cpu);
}

}  // namespace moefast
