// Grouped GEMM on the CPU: one BLAS call per expert on views of a, b and the output.
//
// Contract (that of torch._grouped_mm, 2D x 3D): a [N, K], b [E, K, M], offs [E] int32 cumulative
// row ends; rows offs[e-1]:offs[e] of the output are a[rows] @ b[e]; rows past offs[E-1] are zero.
// The weight gradient grad_b[e] = a[rows]^T @ grad_out[rows] is a grouped GEMM whose reduction
// length varies by group; an expert with no rows gets zeros.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "grouped.h"

namespace moefast {

// csrc/cpu/swiglu.cpp
at::Tensor swiglu_cpu_impl(const at::Tensor& h);

namespace {

using cpu_grouped::check_offs;
using cpu_grouped::for_each_group;

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                          const c10::optional<at::Tensor>& bias_opt) {
  const KernelGuard guard;
  const char* op = "grouped_mm";
  check_grouped_mm_args(a, b, offs, bias_opt, op);
  const int64_t N = a.size(0);
  const int64_t E = b.size(0);
  const int64_t K = a.size(1);
  const int64_t M = b.size(2);
  check_offs(offs, E, N, op);
  at::Tensor out = new_output({N, M}, a.options());
  const at::Tensor o = offs.contiguous();
  const int32_t* ends = o.const_data_ptr<int32_t>();
  const int64_t used = E == 0 ? 0 : ends[E - 1];
  for_each_group(ends, E, K, M, [&](int64_t e) {
    const int64_t begin = group_begin(ends, e);
    const int64_t end = group_end(ends, e);
    if (end == begin) return;
    at::Tensor dst = out.narrow(0, begin, end - begin);
    cpu_grouped::group_mm_out(dst, a.narrow(0, begin, end - begin), b, bias_opt, e);
  });
  if (used < N) out.narrow(0, used, N - used).zero_();
  return out;
}

at::Tensor grouped_bias_grad_cpu(const at::Tensor& grad_out, const at::Tensor& offs) {
  const KernelGuard guard;
  const char* op = "grouped_mm (bias gradient)";
  check_bias_grad_args(grad_out, offs);
  const int64_t E = offs.size(0);
  check_offs(offs, E, grad_out.size(0), op);
  at::Tensor grad_bias = new_output({E, grad_out.size(1)}, grad_out.options());
  const at::Tensor o = offs.contiguous();
  const int32_t* ends = o.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = group_begin(ends, e);
    at::Tensor dst = grad_bias.select(0, e);
    if (group_end(ends, e) == begin) {
      dst.zero_();
    } else {
      at::sum_out(dst, grad_out.narrow(0, begin, group_end(ends, e) - begin), {0});
    }
  }
  return grad_bias;
}

at::Tensor grouped_mm_weight_grad_cpu(const at::Tensor& a, const at::Tensor& grad_out,
                                      const at::Tensor& offs) {
  const KernelGuard guard;
  const char* op = "grouped_mm (weight gradient)";
  check_weight_grad_args(a, grad_out, offs, op);
  const int64_t N = a.size(0);
  const int64_t E = offs.size(0);
  const int64_t K = a.size(1);
  const int64_t M = grad_out.size(1);
  check_offs(offs, E, N, op);
  at::Tensor grad_b = new_output({E, K, M}, a.options());
  const at::Tensor o = offs.contiguous();
  const int32_t* ends = o.const_data_ptr<int32_t>();
  for_each_group(ends, E, K, M, [&](int64_t e) {
    const int64_t begin = group_begin(ends, e);
    const int64_t end = group_end(ends, e);
    at::Tensor dst = grad_b.select(0, e);
    if (end == begin) {
      dst.zero_();
      return;
    }
    at::mm_out(dst, a.narrow(0, begin, end - begin).t(), grad_out.narrow(0, begin, end - begin));
  });
  return grad_b;
}

// grouped_mm followed by the activation, in place on each group's rows while they are in cache;
// swiglu halves the width: out[:, :H] = silu(gate) * up from the [gate | up] product.
at::Tensor grouped_mm_act_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                              const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const KernelGuard guard;
  const char* op = "grouped_mm_act";
  const GemmActivation act = parse_gemm_activation(std::string(activation), op);
  check_grouped_mm_args(a, b, offs, bias, op);
  TORCH_CHECK_VALUE(act != GemmActivation::kSwiglu || b.size(2) % 2 == 0, "moefast.", op,
                    ": swiglu needs an even number of output columns [gate | up], got b ",
                    b.sizes());
  at::Tensor pre = grouped_mm_cpu(a, b, offs, bias);
  const int64_t N = pre.size(0);
  const int64_t M = pre.size(1);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(M, 1));
  switch (act) {
    case GemmActivation::kNone:
      return pre;
    case GemmActivation::kRelu:
      return pre.relu_();
    case GemmActivation::kGelu:
    case GemmActivation::kSilu: {
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        const KernelGuard inner;
        at::Tensor rows = pre.narrow(0, begin, end - begin);
        if (act == GemmActivation::kGelu) {
          rows.copy_(at::gelu(rows));
        } else {
          at::silu_(rows);
        }
      });
      return pre;
    }
    case GemmActivation::kSwiglu:
      return swiglu_cpu_impl(pre);
  }
  return pre;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("grouped_mm_act", &grouped_mm_act_cpu);
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_cpu);
  m.impl("grouped_bias_grad", &grouped_bias_grad_cpu);
}

}  // namespace moefast
