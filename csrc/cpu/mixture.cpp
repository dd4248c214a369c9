// ATen binding of the CPU mixture (adaptive-fusion combine), forward and backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "mixture_kernel.h"

namespace moefast {
namespace {

void check_mixture_args(const at::Tensor& gate, const at::Tensor& expert_out, const char* op) {
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
  const char* op = "mixture (backward)";
  check_mixture_args(gate_in, expert_out_in, op);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == gate_in.size(0) &&
                        grad_out_in.size(1) == expert_out_in.size(2),
                    "moefast.", op, ": grad_out must be [B, C], got ", grad_out_in.sizes());
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
