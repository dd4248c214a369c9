// The SwiGLU expert MLP, y = swiglu(x W1_e + b1_e) W2_e + b2_e on each expert's rows (offs:
// cumulative row ends, as grouped_mm): on the CPU one expert at a time; on CUDA the composition of
// the CUDA kernels (at the end of this file).
//
// Numerically the same as grouped_mm -> swiglu -> grouped_mm and their backwards (the same BLAS
// calls and the same SwiGLU rows); what changes is the order of the work and the memory it takes:
//   - forward: an expert's [gate | up] block is turned into its activation while it is still in
//     cache, before the next expert's GEMM;
//   - backward: the activation gradient and the pre-activation gradient of an expert live only in
//     a scratch block of the largest group's size, reused from expert to expert (and, through the
//     CPU output cache, from call to call), instead of in two [N, H] / [N, 2H] tensors; each
//     expert's five GEMMs run back to back, so its weights, gradients and rows are read while warm.
//
// In bfloat16, on a CPU with AVX512-BF16, the GEMMs that read a weight (x W1, act W2, grad_y W2^T,
// dh W1^T) and the weight gradients (act^T grad_y, x^T dh) run on moefast's own kernel
// (csrc/cpu/bf16_gemm_kernel.h) with SwiGLU fused into the first (h and act in one pass) and
// SwiGLU's backward into the third (dact never reaches memory). cpu_bf16_gemm_flag() (common.h)
// switches back to the oneDNN + SwiGLU-pass path, which float32 and every other CPU always take.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "grouped.h"

namespace moefast {

// csrc/cpu/swiglu.cpp
void swiglu_into(const at::Tensor& h, at::Tensor& out);
void swiglu_backward_into(const at::Tensor& grad, const at::Tensor& h, at::Tensor& dh);

bool cpu_bf16_gemm_available() {
  return cpu::bf16_gemm::available();
}

namespace {

using cpu_grouped::check_offs;
using cpu_grouped::for_each_group;
namespace bg = cpu::bf16_gemm;
using cpu_grouped::as_b;
using cpu_grouped::bf;
using cpu_grouped::bf_mut;
using cpu_grouped::bf_or_null;
using cpu_grouped::contiguous_or_none;
using cpu_grouped::kMaxBf16TnRows;
using cpu_grouped::use_bf16_gemm;

// Checks of the shared arguments: x [N, d], w1 [E, d, 2H], w2 [E, H, d], offs [E].
void check_mlp_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                    const at::Tensor& offs, const char* op) {
  check_grouped_mm_args(x, w1, offs, c10::nullopt, op);
  TORCH_CHECK_VALUE(w1.size(2) % 2 == 0, "moefast.", op,
                    ": w1 must have an even number of output columns [gate | up], got w1 ",
                    w1.sizes());
  check_dim(w2, 3, op, "w2", "[E, H, d]");
  TORCH_CHECK_TYPE(w2.scalar_type() == x.scalar_type(), "moefast.", op,
                   ": w2 must have the dtype of x, ", x.scalar_type(), ", got ", w2.scalar_type());
  check_same_device(x, w2, op, "x", "w2");
  TORCH_CHECK_VALUE(
      w2.size(0) == w1.size(0) && w2.size(1) == w1.size(2) / 2 && w2.size(2) == x.size(1),
      "moefast.", op, ": w2 must be [E, H, d] = [", w1.size(0), ", ", w1.size(2) / 2, ", ",
      x.size(1), "] for w1 ", w1.sizes(), ", got ", w2.sizes());
}

void check_bias(const c10::optional<at::Tensor>& b, const at::Tensor& x, int64_t E, int64_t M,
                const char* op, const char* name) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), "moefast.", op, ": ", name,
                   " must have the dtype of x, ", x.scalar_type(), ", got ", b->scalar_type());
  check_same_device(x, *b, op, "x", name);
  TORCH_CHECK_VALUE(b->dim() == 2 && b->size(0) == E && b->size(1) == M, "moefast.", op, ": ", name,
                    " must be [", E, ", ", M, "], got ", b->sizes());
}

// -> (y [N, d], h [N, 2H], act [N, H]); h and act are what the backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_mlp_cpu(
    const at::Tensor& x_in, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
    const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& offs) {
  const KernelGuard guard;
  const char* op = "grouped_swiglu_mlp";
  check_mlp_args(x_in, w1, w2, offs, op);
  const int64_t N = x_in.size(0), d = x_in.size(1), E = w1.size(0), H2 = w1.size(2), H = H2 / 2;
  check_bias(b1, x_in, E, H2, op, "b1");
  check_bias(b2, x_in, E, d, op, "b2");
  check_offs(offs, E, N, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = new_output({N, d}, x.options());
  at::Tensor h = new_output({N, H2}, x.options());
  at::Tensor act = new_output({N, H}, x.options());
  const at::Tensor o = offs.contiguous();
  const int32_t* ends = o.const_data_ptr<int32_t>();
  const int64_t used = E == 0 ? 0 : ends[E - 1];
  const bool fast = use_bf16_gemm(x);
  const c10::optional<at::Tensor> b1c = contiguous_or_none(b1), b2c = contiguous_or_none(b2);
  for_each_group(ends, E, d, 2 * H2, [&](int64_t e) {
    const int64_t begin = group_begin(ends, e), n = group_end(ends, e) - begin;
    if (n == 0) return;
    const at::Tensor xe = x.narrow(0, begin, n);
    at::Tensor he = h.narrow(0, begin, n);
    at::Tensor ae = act.narrow(0, begin, n);
    at::Tensor ye = y.narrow(0, begin, n);
    if (fast) {
      bg::gemm_swiglu(bf(xe), d, n, d, as_b(w1.select(0, e), false), H, bf_or_null(b1c, e),
                      bf_mut(he), bf_mut(ae), ATenParallelFor{});
      bg::gemm(bf(ae), H, n, H, as_b(w2.select(0, e), false), d, bf_or_null(b2c, e), bf_mut(ye), d,
               ATenParallelFor{});
      return;
    }
    cpu_grouped::group_mm_out(he, xe, w1, b1, e);
    swiglu_into(he, ae);
    cpu_grouped::group_mm_out(ye, ae, w2, b2, e);
  });
  if (used < N) {
    y.narrow(0, used, N - used).zero_();
    h.narrow(0, used, N - used).zero_();
    act.narrow(0, used, N - used).zero_();
  }
  return {y, h, act};
}

// -> (grad_x [N, d], grad_w1 [E, d, 2H], grad_w2 [E, H, d], grad_b1 [E, 2H], grad_b2 [E, d]);
// grad_x has no rows unless `input_grad`, the bias gradients none unless `bias`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> swiglu_mlp_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& offs, const at::Tensor& h_in, const at::Tensor& act_in, bool input_grad,
    bool bias) {
  const KernelGuard guard;
  const char* op = "grouped_swiglu_mlp_backward";
  check_mlp_args(x_in, w1, w2, offs, op);
  const int64_t N = x_in.size(0), d = x_in.size(1), E = w1.size(0), H2 = w1.size(2), H = H2 / 2;
  auto check_like = [&](const at::Tensor& t, const char* name, int64_t cols) {
    check_dim(t, 2, op, name, "[N, cols]");
    TORCH_CHECK_TYPE(t.scalar_type() == x_in.scalar_type(), "moefast.", op, ": ", name,
                     " must have the dtype of x, ", x_in.scalar_type(), ", got ", t.scalar_type());
    check_same_device(x_in, t, op, "x", name);
    TORCH_CHECK_VALUE(t.size(0) == N && t.size(1) == cols, "moefast.", op, ": ", name, " must be [",
                      N, ", ", cols, "], got ", t.sizes());
  };
  check_like(grad_y_in, "grad_y", d);
  check_like(h_in, "h", H2);
  check_like(act_in, "act", H);
  check_offs(offs, E, N, op);
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), h = h_in.contiguous(),
                   act = act_in.contiguous();
  at::Tensor grad_x = new_output({input_grad ? N : 0, d}, x.options());
  at::Tensor grad_w1 = new_output({E, d, H2}, x.options());
  at::Tensor grad_w2 = new_output({E, H, d}, x.options());
  at::Tensor grad_b1 = new_output({bias ? E : 0, H2}, x.options());
  at::Tensor grad_b2 = new_output({bias ? E : 0, d}, x.options());
  const at::Tensor o = offs.contiguous();
  const int32_t* ends = o.const_data_ptr<int32_t>();
  const int64_t used = E == 0 ? 0 : ends[E - 1];
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e) {
    largest = std::max<int64_t>(largest, group_end(ends, e) - group_begin(ends, e));
  }
  // [dact | dh] of the expert in flight, one slot per worker (one slot when the experts run one
  // after the other), sized for the largest group: one allocation per call, which the CPU output
  // cache (csrc/cpu_cache.cpp) hands back on the next call.
  const bool parallel = cpu_grouped::groups_in_parallel(ends, E, d, 3 * H2);
  const bool fast = use_bf16_gemm(x);
  const bool fast_tn = fast && largest <= kMaxBf16TnRows;
  // ... and, for them, the packed x or act of the expert in flight, in bfloat16 elements.
  const int64_t tn_numel =
      fast_tn ? (bg::tn_workspace_elems(largest, std::max(d, H)) + 1) / 2 * 2 : 0;
  const int64_t slot_numel = largest * (H + H2) + tn_numel;
  at::Tensor scratch =
      empty_cpu_cached({(parallel ? at::get_num_threads() : 1) * slot_numel}, x.scalar_type());
  for_each_group(ends, E, d, 3 * H2, [&](int64_t e) {
    const int64_t begin = group_begin(ends, e), n = group_end(ends, e) - begin;
    at::Tensor gw1 = grad_w1.select(0, e), gw2 = grad_w2.select(0, e);
    if (n == 0) {
      gw1.zero_();
      gw2.zero_();
      if (bias) {
        grad_b1.select(0, e).zero_();
        grad_b2.select(0, e).zero_();
      }
      return;
    }
    at::Tensor buf =
        scratch.narrow(0, (parallel ? at::get_thread_num() : 0) * slot_numel, slot_numel);
    at::Tensor dact = buf.narrow(0, 0, n * H).view({n, H});
    at::Tensor dh = buf.narrow(0, largest * H, n * H2).view({n, H2});
    const at::Tensor gy = grad_y.narrow(0, begin, n), xe = x.narrow(0, begin, n);
    if (fast) {
      bg::gemm_swiglu_bwd(bf(gy), d, n, d, as_b(w2.select(0, e), true), H,
                          bf(h.narrow(0, begin, n)), bf_mut(dh), ATenParallelFor{});
      uint16_t* tn_ws =
          reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>()) + largest * (H + H2);
      if (fast_tn) {
        bg::gemm_tn(bf(act.narrow(0, begin, n)), H, bf(gy), d, n, H, d, bf_mut(gw2), d, tn_ws,
                    ATenParallelFor{});
      } else {
        at::mm_out(gw2, act.narrow(0, begin, n).t(), gy);
      }
      if (bias) {
        at::Tensor gb2 = grad_b2.select(0, e);
        at::sum_out(gb2, gy, {0});
      }
      if (input_grad) {
        at::Tensor gx = grad_x.narrow(0, begin, n);
        bg::gemm(bf(dh), H2, n, H2, as_b(w1.select(0, e), true), d, nullptr, bf_mut(gx), d,
                 ATenParallelFor{});
      }
      if (fast_tn) {
        bg::gemm_tn(bf(xe), d, bf(dh), H2, n, d, H2, bf_mut(gw1), H2, tn_ws, ATenParallelFor{});
      } else {
        at::mm_out(gw1, xe.t(), dh);
      }
      if (bias) {
        at::Tensor gb1 = grad_b1.select(0, e);
        at::sum_out(gb1, dh, {0});
      }
      return;
    }
    at::mm_out(dact, gy, w2.select(0, e).t());
    at::mm_out(gw2, act.narrow(0, begin, n).t(), gy);
    if (bias) {
      at::Tensor gb2 = grad_b2.select(0, e);
      at::sum_out(gb2, gy, {0});
    }
    swiglu_backward_into(dact, h.narrow(0, begin, n), dh);
    if (input_grad) {
      at::Tensor gx = grad_x.narrow(0, begin, n);
      at::mm_out(gx, dh, w1.select(0, e).t());
    }
    at::mm_out(gw1, xe.t(), dh);
    if (bias) {
      at::Tensor gb1 = grad_b1.select(0, e);
      at::sum_out(gb1, dh, {0});
    }
  });
  if (input_grad && used < N) grad_x.narrow(0, used, N - used).zero_();
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

// ---------------------------------------------------------------------------- other devices

// Elsewhere (CUDA) the two ops are the composition of the device's grouped_mm, swiglu and
// gradient kernels, called through the dispatcher; nothing reads offs on the host.
using OptTensor = c10::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor grouped_mm_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                         const OptTensor& bias) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const OptTensor&)>("moefast::grouped_mm");
  return op.call(a, b, offs, bias);
}

at::Tensor weight_grad_op(const at::Tensor& a, const at::Tensor& grad_out, const at::Tensor& offs) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "moefast::grouped_mm_weight_grad");
  return op.call(a, grad_out, offs);
}

at::Tensor bias_grad_op(const at::Tensor& grad_out, const at::Tensor& offs) {
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("moefast::grouped_bias_grad");
  return op.call(grad_out, offs);
}

at::Tensor swiglu_op(const at::Tensor& h) {
  static auto op = find_op<at::Tensor(const at::Tensor&)>("moefast::swiglu");
  return op.call(h);
}

at::Tensor swiglu_backward_op(const at::Tensor& grad, const at::Tensor& h) {
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("moefast::swiglu_backward");
  return op.call(grad, h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_mlp_composite(
    const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const at::Tensor& w2,
    const OptTensor& b2, const at::Tensor& offs) {
  const KernelGuard guard;
  const char* op = "grouped_swiglu_mlp";
  check_mlp_args(x, w1, w2, offs, op);
  check_bias(b1, x, w1.size(0), w1.size(2), op, "b1");
  check_bias(b2, x, w1.size(0), x.size(1), op, "b2");
  at::Tensor h = grouped_mm_op(x, w1, offs, b1);
  at::Tensor act = swiglu_op(h);
  at::Tensor y = grouped_mm_op(act, w2, offs, b2);
  return {y, h, act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
swiglu_mlp_backward_composite(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                              const at::Tensor& w2, const at::Tensor& offs, const at::Tensor& h,
                              const at::Tensor& act, bool input_grad, bool bias) {
  const KernelGuard guard;
  check_mlp_args(x, w1, w2, offs, "grouped_swiglu_mlp_backward");
  const int64_t d = x.size(1), H2 = w1.size(2);
  at::Tensor dact = grouped_mm_op(grad_y, w2.transpose(1, 2), offs, c10::nullopt);
  at::Tensor grad_w2 = weight_grad_op(act, grad_y, offs);
  at::Tensor dh = swiglu_backward_op(dact, h);
  at::Tensor grad_x =
      input_grad ? grouped_mm_op(dh, w1.transpose(1, 2), offs, c10::nullopt) : x.new_empty({0, d});
  at::Tensor grad_w1 = weight_grad_op(x, dh, offs);
  at::Tensor grad_b1 = bias ? bias_grad_op(dh, offs) : x.new_empty({0, H2});
  at::Tensor grad_b2 = bias ? bias_grad_op(grad_y, offs) : x.new_empty({0, d});
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("grouped_swiglu_mlp", &swiglu_mlp_cpu);
  m.impl("grouped_swiglu_mlp_backward", &swiglu_mlp_backward_cpu);
}

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("grouped_swiglu_mlp", &swiglu_mlp_composite);
  m.impl("grouped_swiglu_mlp_backward", &swiglu_mlp_backward_composite);
}

}  // namespace moefast
