// ATen binding of the CPU mixture (adaptive-fusion combine), forward and backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "mixture_kernel.h"

namespace moefast {
namespace {

at::Tensor mixture_cpu(const at::Tensor& gate_in, const at::Tensor& expert_out_in) {
  const KernelGuard guard;
  check_mixture_args(gate_in, expert_out_in, "mixture");
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor eo = expert_out_in.contiguous();
  const int64_t B = gate.size(0);
  const int64_t E = gate.size(1);
  const int64_t C = eo.size(2);
  at::Tensor out = new_output({B, C}, eo.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "mixture_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::mixture_forward<scalar_t, acc_t>(gate.const_data_ptr<scalar_t>(),
                                          eo.const_data_ptr<scalar_t>(), B, E, C,
                                          out.mutable_data_ptr<scalar_t>(), ATenParallelFor{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mixture_backward_cpu(const at::Tensor& grad_out_in,
                                                        const at::Tensor& gate_in,
                                                        const at::Tensor& expert_out_in) {
  const KernelGuard guard;
  check_mixture_backward_args(grad_out_in, gate_in, expert_out_in);
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor eo = expert_out_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(eo.scalar_type()).contiguous();
  const int64_t B = gate.size(0);
  const int64_t E = gate.size(1);
  const int64_t C = eo.size(2);
  at::Tensor grad_gate = new_output(gate.sizes(), gate.options());
  at::Tensor grad_eo = new_output(eo.sizes(), eo.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate.scalar_type(), "mixture_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        cpu::mixture_backward<scalar_t, acc_t>(
            grad_out.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
            eo.const_data_ptr<scalar_t>(), B, E, C, grad_gate.mutable_data_ptr<scalar_t>(),
            grad_eo.mutable_data_ptr<scalar_t>(), ATenParallelFor{});
      });
  return {grad_gate, grad_eo};
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("mixture", &mixture_cpu);
  m.impl("mixture_backward", &mixture_backward_cpu);
}

}  // namespace moefast
