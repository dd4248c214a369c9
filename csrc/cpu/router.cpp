// ATen binding of the CPU router: argument checks, dtype dispatch, kernel call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "router_kernel.h"

namespace moefast {
namespace {

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
  const int64_t k = check_router_backward_args(grad_weights_in, logits_in, ids_in, mode);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  // The ids index the logits row: out-of-range ones would read and write out of bounds.
  if (ids.numel() > 0) {
    const auto [lo, hi] = at::aminmax(ids);
    const int64_t lo_v = lo.item<int64_t>();
    const int64_t hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < logits.size(1), "moefast.route (backward): expert_ids ",
                      "must be in [0, E) = [0, ", logits.size(1), "), got values in [", lo_v, ", ",
                      hi_v, "]");
  }
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
