// ATen bindings of the CPU permute, unpermute and the gradient of the combine weights.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "permute_kernel.h"

namespace moefast {
namespace {

// position must be a valid row index for a [T * k] permuted tensor. The plan always makes such a
// position; a hand-built one is checked here, since a bad index would read or write out of bounds.
void check_position_values(const at::Tensor& position, const char* op) {
  const int64_t n = position.numel();
  if (n == 0) return;
  const auto [lo, hi] = at::aminmax(position);
  const int64_t lo_v = lo.item<int64_t>();
  const int64_t hi_v = hi.item<int64_t>();
  TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < n, "moefast.", op,
                    ": position must hold row indices in [0, T * k) = [0, ", n,
                    "), got values in [", lo_v, ", ", hi_v, "]");
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& position_in,
                       const c10::optional<at::Tensor>& weights) {
  const KernelGuard guard;
  const char* op = "permute";
  check_permute_args(x_in, position_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor position = position_in.contiguous();
  check_position_values(position, op);
  const at::Tensor w = weights_as_acc(weights, position, x, op);
  const int64_t T = x.size(0);
  const int64_t d = x.size(1);
  const int64_t k = position.size(1);
  at::Tensor out = new_output({T * k, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "permute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::permute_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), T, d, k,
                                          position.const_data_ptr<int32_t>(),
                                          w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                          out.mutable_data_ptr<scalar_t>(), ATenParallelFor{});
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& position_in,
                         const c10::optional<at::Tensor>& weights) {
  const KernelGuard guard;
  const char* op = "unpermute";
  check_unpermute_args(y_in, position_in);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor position = position_in.contiguous();
  check_position_values(position, op);
  const at::Tensor w = weights_as_acc(weights, position, y, op);
  const int64_t T = position.size(0);
  const int64_t k = position.size(1);
  const int64_t d = y.size(1);
  at::Tensor out = new_output({T, d}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::unpermute_forward<scalar_t, acc_t>(y.const_data_ptr<scalar_t>(), T, d, k,
                                            position.const_data_ptr<int32_t>(),
                                            w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                            out.mutable_data_ptr<scalar_t>(), ATenParallelFor{});
  });
  return out;
}

at::Tensor unpermute_weight_grad_cpu(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                     const at::Tensor& position_in) {
  const KernelGuard guard;
  const char* op = "unpermute (weight gradient)";
  check_weight_grad_args(grad_out_in, y_in, position_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor position = position_in.contiguous();
  check_position_values(position, op);
  const int64_t T = position.size(0);
  const int64_t k = position.size(1);
  const int64_t d = y.size(1);
  at::Tensor grad_w = new_output({T, k}, y.options().dtype(at::toOpMathType(y.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_weight_grad_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        cpu::unpermute_weight_grad<scalar_t, acc_t>(
            grad_out.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), T, d, k,
            position.const_data_ptr<int32_t>(), grad_w.mutable_data_ptr<acc_t>(),
            ATenParallelFor{});
      });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_weight_grad", &unpermute_weight_grad_cpu);
}

}  // namespace moefast
