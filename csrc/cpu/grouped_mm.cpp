// Grouped GEMM on the CPU: one BLAS call per expert on views of a, b and the output; in bfloat16
// on a CPU with AVX512-BF16, one call of moefast's own GEMM per expert instead
// (csrc/cpu/bf16_gemm_kernel.h: each thread packs 64-column blocks of b[e] as part of its tiling,
// where oneDNN reorders the whole weight per call), switched by cpu_bf16_gemm_flag (common.h).
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

using cpu_grouped::bf;
using cpu_grouped::bf_mut;
using cpu_grouped::check_offs;
using cpu_grouped::for_each_group;
namespace bg = cpu::bf16_gemm;

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
  if (cpu_grouped::use_bf16_gemm(a)) {
    // The kernel reads rows of a with unit column stride, b[e] with any strides (b.transpose(1, 2)
    // in the data gradient included) and the bias rows contiguous.
    const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
    const c10::optional<at::Tensor> bias = cpu_grouped::contiguous_or_none(bias_opt);
    for_each_group(ends, E, K, M, [&](int64_t e) {
      const int64_t begin = group_begin(ends, e);
      const int64_t n = group_end(ends, e) - begin;
      if (n == 0) return;
      bg::gemm(bf(ac) + begin * ac.stride(0), ac.stride(0), n, K,
               cpu_grouped::as_b(b.select(0, e), false), M, cpu_grouped::bf_or_null(bias, e),
               bf_mut(out) + begin * M, M, ATenParallelFor{});
    });
  } else {
    for_each_group(ends, E, K, M, [&](int64_t e) {
      const int64_t begin = group_begin(ends, e);
      const int64_t end = group_end(ends, e);
      if (end == begin) return;
      at::Tensor dst = out.narrow(0, begin, end - begin);
      cpu_grouped::group_mm_out(dst, a.narrow(0, begin, end - begin), b, bias_opt, e);
    });
  }
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
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e)
    largest = std::max<int64_t>(largest, group_end(ends, e) - group_begin(ends, e));
  // The AVX512-BF16 kernel packs each group's rows of a into a workspace: one slot per worker
  // (for_each_group runs small groups in parallel), from the CPU output cache.
  const bool fast = cpu_grouped::use_bf16_gemm(a) && largest <= cpu_grouped::kMaxBf16TnRows;
  const bool parallel = cpu_grouped::groups_in_parallel(ends, E, K, M);
  const at::Tensor ac = fast ? a.contiguous() : a, gc = fast ? grad_out.contiguous() : grad_out;
  const int64_t slot = fast ? (bg::tn_workspace_elems(largest, K) + 31) / 32 * 32 : 0;
  at::Tensor workspace =
      fast ? empty_cpu_cached({(parallel ? at::get_num_threads() : 1) * slot}, at::kBFloat16)
           : at::Tensor();
  for_each_group(ends, E, K, M, [&](int64_t e) {
    const int64_t begin = group_begin(ends, e);
    const int64_t end = group_end(ends, e);
    at::Tensor dst = grad_b.select(0, e);
    if (end == begin) {
      dst.zero_();
      return;
    }
    if (fast) {
      uint16_t* ws = reinterpret_cast<uint16_t*>(workspace.data_ptr<at::BFloat16>()) +
                     (parallel ? at::get_thread_num() : 0) * slot;
      bg::gemm_tn(bf(ac) + begin * K, K, bf(gc) + begin * M, M, end - begin, K, M, bf_mut(dst), M,
                  ws, ATenParallelFor{});
      return;
    }
    at::mm_out(dst, ac.narrow(0, begin, end - begin).t(), gc.narrow(0, begin, end - begin));
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
