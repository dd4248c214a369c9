// The ATen bindings of the grouped GEMM on CUDA (grouped_mm, grouped_mm_act and
// grouped_mm_weight_grad) and the choice of implementation:
//   sm_90 (Hopper), bf16/fp16, aligned          -> CUTLASS 3.x wgmma + TMA (grouped_mm_sm90_*.cu)
//   sm_80 and newer (not sm_90), bf16/fp16      -> CUTLASS 2.x mma.sync (grouped_mm_sm80_*.cu)
//   fp32 with TF32 allowed (torch.backends.cuda.matmul.allow_tf32), sm_80+ -> CUTLASS 2.x TF32
//   anything else (fp64, fp32, unaligned sizes) -> CUDA cores (grouped_mm_simt.cu)
// "Aligned" means K and M multiples of 16 bytes' worth of elements, as TMA and cp.async need. The
// choice depends only on dtypes, shapes and the device's compute capability, never on the values
// in offs, which stay on the device.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "grouped_mm.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

int compute_capability() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major * 10 + prop->minor;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

enum class Backend { kSm90, kSm80, kSm80Tf32, kSimt };

Backend choose_backend(const GroupedGemmArgs& args, int sm) {
  if (!grouped_gemm_has_cutlass() || !grouped_gemm_tensor_core_ok(args, sm)) return Backend::kSimt;
  if (args.dtype == at::kBFloat16 || args.dtype == at::kHalf) {
    return sm == 90 ? Backend::kSm90 : Backend::kSm80;
  }
  return args.dtype == at::kFloat ? Backend::kSm80Tf32 : Backend::kSimt;
}

// Runs one grouped GEMM on the best implementation for it.
void run_grouped_gemm(const GroupedGemmArgs& args, int64_t out_cols) {
  const bool gated = args.gate != nullptr;
  const bool bf16 = args.dtype == at::kBFloat16;
  switch (choose_backend(args, compute_capability())) {
    case Backend::kSm90:
      if (gated) {
        bf16 ? grouped_gemm_sm90_gated_bf16(args) : grouped_gemm_sm90_gated_f16(args);
      } else {
        bf16 ? grouped_gemm_sm90_bf16(args) : grouped_gemm_sm90_f16(args);
      }
      break;
    case Backend::kSm80:
      bf16 ? grouped_gemm_sm80_bf16(args) : grouped_gemm_sm80_f16(args);
      break;
    case Backend::kSm80Tf32:
      grouped_gemm_sm80_tf32(args);
      break;
    case Backend::kSimt:
      grouped_gemm_simt(args);
      // The CUDA-core weight gradient writes every slab itself, empty groups included.
      if (args.kind == GemmKind::kWeightGrad) return;
      break;
  }
  grouped_gemm_zero_unwritten(args, out_cols);
}

// b as seen by the kernels: row-major per expert (stride(2) == 1) or column-major per expert (the
// transpose of a row-major weight, as the data gradient passes it); anything else is copied.
at::Tensor weight_operand(const at::Tensor& b, GemmKind* kind) {
  const int64_t K = b.size(1);
  const int64_t M = b.size(2);
  if (b.stride(2) == 1 && (b.stride(1) == M || K <= 1)) {
    *kind = GemmKind::kForward;
    return b;
  }
  if (b.stride(1) == 1 && (b.stride(2) == K || M <= 1)) {
    *kind = GemmKind::kDataGrad;
    return b;
  }
  *kind = GemmKind::kForward;
  return b.contiguous();
}

// The kernel arguments of grouped_mm on a contiguous a [N, K] and b = weight_operand(...) [E, K, M]
// (bias, offs, output and stream are the caller's).
GroupedGemmArgs forward_args(const at::Tensor& a, const at::Tensor& b, GemmKind kind) {
  GroupedGemmArgs args;
  args.kind = kind;
  args.dtype = a.scalar_type();
  args.E = b.size(0);
  args.N = a.size(0);
  args.K = a.size(1);
  args.M = b.size(2);
  args.a = a.const_data_ptr();
  args.a_stride_r = args.K;
  args.a_stride_k = 1;
  args.b = b.const_data_ptr();
  args.b_stride_e = b.stride(0);
  args.b_stride_k = b.stride(1);
  args.b_stride_m = b.stride(2);
  args.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  return args;
}

// The kernel arguments of the weight gradient on contiguous a [N, K] and grad_out [N, M].
GroupedGemmArgs weight_grad_args(const at::Tensor& a, const at::Tensor& g, int64_t E) {
  GroupedGemmArgs args;
  args.kind = GemmKind::kWeightGrad;
  args.dtype = a.scalar_type();
  args.E = E;
  args.N = a.size(0);
  args.K = a.size(1);
  args.M = g.size(1);
  args.a = a.const_data_ptr();
  args.a_stride_r = args.K;
  args.a_stride_k = 1;
  args.b = g.const_data_ptr();
  args.b_stride_k = args.M;
  args.b_stride_m = 1;
  args.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  return args;
}

at::Tensor grouped_mm_impl(const at::Tensor& a_in, const at::Tensor& b_in,
                           const at::Tensor& offs_in, const c10::optional<at::Tensor>& bias_in,
                           GemmActivation act, const char* op) {
  check_grouped_mm_args(a_in, b_in, offs_in, bias_in, op);
  TORCH_CHECK_VALUE(act != GemmActivation::kSwiglu || b_in.size(2) % 2 == 0, "moefast.", op,
                    ": swiglu needs an even number of output columns [gate | up], got b ",
                    b_in.sizes());
  const c10::cuda::CUDAGuard device_guard(a_in.device());
  GemmKind kind = GemmKind::kForward;
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = weight_operand(b_in, &kind);
  const at::Tensor offs = offs_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->contiguous();
  GroupedGemmArgs args = forward_args(a, b, kind);
  args.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  args.offs = offs.const_data_ptr<int32_t>();
  args.stream = at::cuda::getCurrentCUDAStream();
  if (act == GemmActivation::kSwiglu && !bias.defined() && args.kind == GemmKind::kForward) {
    // Fused swiglu as two grouped GEMMs on the halves of b (strided views, no copy): the gate's
    // pre-activation, then the up half, whose epilogue reads the gate and writes silu(gate) * up,
    // so the up half's pre-activation never goes to memory.
    const int64_t H = args.M / 2;
    at::Tensor gate = at::empty({args.N, H}, a.options());
    GroupedGemmArgs first = args;
    first.M = H;
    first.d = gate.mutable_data_ptr();
    run_grouped_gemm(first, H);
    at::Tensor out = new_output({args.N, H}, a.options());
    GroupedGemmArgs second = args;
    second.M = H;
    second.b = static_cast<const char*>(args.b) +
               H * args.b_stride_m * static_cast<int64_t>(c10::elementSize(args.dtype));
    second.gate = gate.const_data_ptr();
    second.d = out.mutable_data_ptr();
    run_grouped_gemm(second, H);
    return out;
  }
  const bool fused =
      act == GemmActivation::kRelu || act == GemmActivation::kGelu || act == GemmActivation::kSilu;
  args.act = fused ? static_cast<Activation>(static_cast<int>(act)) : Activation::kNone;
  at::Tensor out = new_output({args.N, args.M}, a.options());
  args.d = out.mutable_data_ptr();
  run_grouped_gemm(args, args.M);
  if (act != GemmActivation::kSwiglu) return out;
  // swiglu with a bias (or a column-major b): the [gate | up] product, then silu(gate) * up in
  // one more pass.
  return swiglu_cuda(out);
}

at::Tensor grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                           const c10::optional<at::Tensor>& bias) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::grouped_mm");
  return grouped_mm_impl(a, b, offs, bias, GemmActivation::kNone, "grouped_mm");
}

at::Tensor grouped_mm_act_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                               const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::grouped_mm_act");
  const GemmActivation act = parse_gemm_activation(std::string(activation), "grouped_mm_act");
  return grouped_mm_impl(a, b, offs, bias, act, "grouped_mm_act");
}

at::Tensor grouped_mm_weight_grad_cuda(const at::Tensor& a_in, const at::Tensor& grad_out_in,
                                       const at::Tensor& offs_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::grouped_mm_weight_grad");
  const char* op = "grouped_mm (weight gradient)";
  check_weight_grad_args(a_in, grad_out_in, offs_in, op);
  const c10::cuda::CUDAGuard device_guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor offs = offs_in.contiguous();
  GroupedGemmArgs args = weight_grad_args(a, g, offs.size(0));
  args.offs = offs.const_data_ptr<int32_t>();
  args.stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_b = new_output({args.E, args.K, args.M}, a.options());
  args.d = grad_b.mutable_data_ptr();
  run_grouped_gemm(args, args.M);
  return grad_b;
}

}  // namespace

bool grouped_gemm_tensor_core_ok(const GroupedGemmArgs& p, int sm) {
  if (sm < 80 || p.E == 0) return false;
  int64_t align = 0;  // elements in 16 bytes
  if (p.dtype == at::kBFloat16 || p.dtype == at::kHalf) {
    align = 8;
  } else if (p.dtype == at::kFloat && p.allow_tf32) {
    align = 4;
  } else {
    return false;
  }
  // K = 0 (an empty reduction) would leave the tensor-core kernels' accumulators unset.
  if (p.K == 0 || p.M == 0 || p.K % align != 0 || p.M % align != 0) return false;
  if (p.a_stride_k != 1 || p.a_stride_r != p.K) return false;
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.d)) return false;
  if (p.bias != nullptr && !aligned16(p.bias)) return false;
  if (p.gate != nullptr && !aligned16(p.gate)) return false;
  // B_e may be a column slice of a wider weight (the halves of a swiglu [gate | up] weight): its
  // leading dimension need only be 16-byte aligned and at least its width.
  switch (p.kind) {
    case GemmKind::kForward:
      return p.b_stride_m == 1 && p.b_stride_k >= p.M && p.b_stride_k % align == 0 &&
             p.b_stride_e % align == 0;
    case GemmKind::kDataGrad:
      return p.b_stride_k == 1 && p.b_stride_m >= p.K && p.b_stride_m % align == 0 &&
             p.b_stride_e % align == 0;
    case GemmKind::kWeightGrad:
      return p.b_stride_m == 1 && p.b_stride_k == p.M;
  }
  return false;
}

// Which implementation grouped_mm (weight_grad = false: a [N, K] @ b [E, K, M]) or its weight
// gradient (weight_grad = true: b is grad_out [N, M]) would run on, for the current device:
// "sm90", "sm80", "sm80_tf32" or "simt". For tests and benchmarks, which should know what they
// measured.
std::string grouped_mm_backend(const at::Tensor& a, const at::Tensor& b, bool weight_grad) {
  TORCH_CHECK_VALUE(a.is_cuda() && b.is_cuda(), "moefast.grouped_mm_backend: a and b must be ",
                    "CUDA tensors, got ", a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == (weight_grad ? 2 : 3),
                    "moefast.grouped_mm_backend: a must be [N, K] and b ",
                    weight_grad ? "grad_out [N, M]" : "[E, K, M]", ", got ", a.sizes(), " and ",
                    b.sizes());
  const c10::cuda::CUDAGuard device_guard(a.device());
  // The operands as the ops pass them to the kernels (copies where the ops copy).
  const at::Tensor ac = a.contiguous();
  GroupedGemmArgs args;
  at::Tensor bw;
  if (weight_grad) {
    bw = b.contiguous();
    args = weight_grad_args(ac, bw, 1);
  } else {
    GemmKind kind = GemmKind::kForward;
    bw = weight_operand(b, &kind);
    args = forward_args(ac, bw, kind);
  }
  args.d = reinterpret_cast<void*>(uintptr_t{256});  // the output: a fresh, aligned allocation
  switch (choose_backend(args, compute_capability())) {
    case Backend::kSm90:
      return "sm90";
    case Backend::kSm80:
      return "sm80";
    case Backend::kSm80Tf32:
      return "sm80_tf32";
    case Backend::kSimt:
      break;
  }
  return "simt";
}

bool grouped_gemm_has_cutlass() {
#ifdef MOEFAST_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

#ifndef MOEFAST_WITH_CUTLASS
// Without the CUTLASS headers only the CUDA-core path is built; run_grouped_gemm never calls these.
#define MOEFAST_NO_CUTLASS(NAME)                         \
  void NAME(const GroupedGemmArgs&) {                    \
    TORCH_CHECK(false, #NAME ": built without CUTLASS"); \
  }
MOEFAST_NO_CUTLASS(grouped_gemm_sm80_bf16)
MOEFAST_NO_CUTLASS(grouped_gemm_sm80_f16)
MOEFAST_NO_CUTLASS(grouped_gemm_sm80_tf32)
MOEFAST_NO_CUTLASS(grouped_gemm_sm90_bf16)
MOEFAST_NO_CUTLASS(grouped_gemm_sm90_f16)
MOEFAST_NO_CUTLASS(grouped_gemm_sm90_gated_bf16)
MOEFAST_NO_CUTLASS(grouped_gemm_sm90_gated_f16)
#undef MOEFAST_NO_CUTLASS
#endif

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_act", &grouped_mm_act_cuda);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_cuda);
}

}  // namespace moefast::cuda
