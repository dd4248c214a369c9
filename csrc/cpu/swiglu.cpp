// ATen binding of the CPU SwiGLU, forward and backward (csrc/cpu/swiglu_kernel.h). float32 and
// bfloat16 take the widest vector rows the CPU runs (AVX-512, else AVX2 + FMA); float64 and
// float16, or a CPU without either, take the portable rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "swiglu_kernel.h"

namespace moefast {
namespace {

// at::BFloat16 and cpu::Bf16 are both the raw 16 bits; the kernel works on the latter.
template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<at::BFloat16> {
  using type = cpu::Bf16;
};
static_assert(sizeof(at::BFloat16) == sizeof(cpu::Bf16));

template <typename scalar_t>
auto* kptr(const at::Tensor& t) {
  return reinterpret_cast<const typename KernelType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
auto* kmut(at::Tensor& t) {
  return reinterpret_cast<typename KernelType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

std::vector<int64_t> halved(const at::Tensor& h) {
  std::vector<int64_t> sizes = h.sizes().vec();
  sizes.back() /= 2;
  return sizes;
}

}  // namespace

// Row-contiguous [n, 2H] -> [n, H] and its backward into caller-owned outputs: the ops below and
// the per-expert steps of csrc/cpu/swiglu_mlp.cpp; no checks beyond the caller's.
void swiglu_into(const at::Tensor& h, at::Tensor& out) {
  const int64_t H = out.size(-1);
  const int64_t N = H == 0 ? 0 : out.numel() / H;
  if (N == 0) return;
  const cpu::Isa isa = cpu::best_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "swiglu_cpu", [&] {
    using kernel_t = typename KernelType<scalar_t>::type;
    using acc_t = at::opmath_type<scalar_t>;
    cpu::swiglu_forward<kernel_t, acc_t>(kptr<scalar_t>(h), kmut<scalar_t>(out), N, H, isa,
                                         ATenParallelFor{});
  });
}

void swiglu_backward_into(const at::Tensor& grad, const at::Tensor& h, at::Tensor& dh) {
  const int64_t H = grad.size(-1);
  const int64_t N = H == 0 ? 0 : grad.numel() / H;
  if (N == 0) return;
  const cpu::Isa isa = cpu::best_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "swiglu_backward_cpu", [&] {
        using kernel_t = typename KernelType<scalar_t>::type;
        using acc_t = at::opmath_type<scalar_t>;
        cpu::swiglu_backward<kernel_t, acc_t>(kptr<scalar_t>(grad), kptr<scalar_t>(h),
                                              kmut<scalar_t>(dh), N, H, isa, ATenParallelFor{});
      });
}

namespace {

at::Tensor swiglu_cpu(const at::Tensor& h_in) {
  const KernelGuard guard;
  check_swiglu_args(h_in, "swiglu");
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = new_output(halved(h), h.options());
  swiglu_into(h, out);
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& h_in) {
  const KernelGuard guard;
  check_swiglu_backward_args(grad_in, h_in);
  const at::Tensor h = h_in.contiguous();
  at::Tensor dh = new_output(h.sizes(), h.options());
  swiglu_backward_into(grad_in.contiguous(), h, dh);
  return dh;
}

}  // namespace

// Used by grouped_mm_act's swiglu epilogue (csrc/cpu/grouped_mm.cpp).
at::Tensor swiglu_cpu_impl(const at::Tensor& h) {
  return swiglu_cpu(h);
}

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace moefast
