// The grouped GEMM on CUDA: one description of a launch, shared by the three implementations.
//
//   grouped_mm_simt.cu      every dtype (float64 too), any strides and sizes; CUDA cores.
//   grouped_mm_sm80_*.cu    CUTLASS 2.x grouped GEMM on mma.sync / ldmatrix / cp.async (sm_80+),
//                           bf16 and fp16, and fp32 as TF32 when TF32 is allowed.
//   grouped_mm_sm90_*.cu    CUTLASS 3.x pointer-array grouped GEMM on wgmma / TMA, warp-specialised
//                           and persistent (sm_90a), bf16 and fp16; *_gated_* is the variant whose
//                           epilogue reads the swiglu gate.
//
// Every implementation reads the group sizes from `offs` on the device: a small "prepare" kernel
// turns offs into the per-group problem sizes, pointers and strides that the tile scheduler reads,
// so nothing travels to the host and the launch can be captured in a CUDA graph. Rows past
// offs[-1] are zeroed by a separate kernel that also reads offs on the device.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moefast/index_math.h"

namespace moefast::cuda {

// What the GEMM of one group computes.
//   kForward    D[rows_e, M] = act(A[rows_e, K] @ B_e[K, M] + bias[e])   B_e row-major per expert
//   kDataGrad   the same with B_e column-major (b.transpose(1, 2) of a row-major weight): the data
//               gradient grad_out @ w[e]^T, read without a copy
//   kWeightGrad D_e[K, M] = A[rows_e, K]^T @ G[rows_e, M], a reduction whose length varies by group
enum class GemmKind : int { kForward = 0, kDataGrad = 1, kWeightGrad = 2 };

// Activation applied in the epilogue (after the bias). Codes shared with the Python layer.
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

struct GroupedGemmArgs {
  GemmKind kind = GemmKind::kForward;
  at::ScalarType dtype = at::kFloat;
  int64_t E = 0, N = 0, K = 0, M = 0;
  // A: [N, K]; element (r, k) at a[r * a_stride_r + k * a_stride_k].
  const void* a = nullptr;
  int64_t a_stride_r = 0, a_stride_k = 1;
  // Forward and data gradient: B_e element (k, m) at b[e * b_stride_e + k * b_stride_k + m *
  // b_stride_m]. Weight gradient: G [N, M], element (r, m) at b[r * b_stride_k + m * b_stride_m].
  const void* b = nullptr;
  int64_t b_stride_e = 0, b_stride_k = 0, b_stride_m = 1;
  const void* bias = nullptr;  // [E, M] contiguous, or null
  // Gated epilogue (the "up" half of swiglu): D = silu(gate) * (A @ B_e), gate [N, M] contiguous,
  // the pre-activation of the gate half computed by an earlier grouped GEMM. Null otherwise.
  const void* gate = nullptr;
  void* d = nullptr;  // forward: [N, M]; weight gradient: [E, K, M]; contiguous
  const int32_t* offs = nullptr;
  Activation act = Activation::kNone;
  bool allow_tf32 = false;
  cudaStream_t stream = nullptr;
};

// The clamped row range [begin, end) of group e: offs values outside [0, N] or decreasing (which
// the CPU op rejects, but a device op cannot see without a synchronisation) never lead to an
// access out of bounds.
__device__ __forceinline__ void group_rows(const int32_t* offs, int64_t e, int64_t N,
                                           int64_t* begin, int64_t* end) {
  const int64_t b = e == 0 ? 0 : offs[e - 1];
  const int64_t c = offs[e];
  const int64_t lo = b < 0 ? 0 : (b > N ? N : b);
  int64_t hi = c < 0 ? 0 : (c > N ? N : c);
  if (hi < lo) hi = lo;
  *begin = lo;
  *end = hi;
}

// Implementations. Each returns having queued its kernels on args.stream; none synchronises.
void grouped_gemm_simt(const GroupedGemmArgs& args);
// True when the tensor-core paths can take these arguments (dtype, alignment, strides).
bool grouped_gemm_tensor_core_ok(const GroupedGemmArgs& args, int sm);
void grouped_gemm_sm80_bf16(const GroupedGemmArgs& args);
void grouped_gemm_sm80_f16(const GroupedGemmArgs& args);
void grouped_gemm_sm80_tf32(const GroupedGemmArgs& args);
void grouped_gemm_sm90_bf16(const GroupedGemmArgs& args);
void grouped_gemm_sm90_f16(const GroupedGemmArgs& args);
void grouped_gemm_sm90_gated_bf16(const GroupedGemmArgs& args);
void grouped_gemm_sm90_gated_f16(const GroupedGemmArgs& args);
// Zeroes rows [offs[E-1], N) of a forward output, and the gradient slabs of the empty groups of a
// weight gradient (the tensor-core paths skip both).
void grouped_gemm_zero_unwritten(const GroupedGemmArgs& args, int64_t out_cols);
// silu(gate) * up of h = [gate | up] [N, 2H], one pass (csrc/cuda/swiglu.cu).
at::Tensor swiglu_cuda(const at::Tensor& h);
// Whether this build carries the CUTLASS paths (MOEFAST_WITH_CUTLASS).
bool grouped_gemm_has_cutlass();

}  // namespace moefast::cuda
