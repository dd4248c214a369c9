// silu(gate) * up for h = [gate | up] on CUDA, one pass, and its backward (both halves of the
// gradient written in h's layout): the ops moefast::swiglu / swiglu_backward, and the last step of
// grouped_mm_act's swiglu when it cannot run in the GEMM's epilogue (with a bias). Grid-stride
// over the N x H outputs; float math for 16-bit inputs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cuda_utils.cuh"
#include "grouped_mm.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kThreads = 256;

// Output element i of an [N, H] result (row r = i / H, column c) reads h[r, c] (gate) and
// h[r, H + c] (up) of h = [gate | up]; returns the offset of the gate, loads both in float math.
template <typename T, typename A>
__device__ __forceinline__ int64_t load_gate_up(const T* __restrict__ h, int64_t i, int64_t H, A& g,
                                                A& u) {
  const int64_t r = i / H;
  const int64_t gate = r * 2 * H + (i - r * H);
  g = to_acc(h[gate]);
  u = to_acc(h[gate + H]);
  return gate;
}

template <typename T>
__global__ void swiglu_forward_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t N,
                                      int64_t H) {
  using A = acc_t<T>;
  const int64_t n = N * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A g, u;
    load_gate_up(h, i, H, g, u);
    out[i] = from_acc<T>(g / (A(1) + exp(-g)) * u);
  }
}

// d gate = grad * up * s * (1 + gate * (1 - s)), d up = grad * gate * s, s = sigmoid(gate).
template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h,
                                       T* __restrict__ dh, int64_t N, int64_t H) {
  using A = acc_t<T>;
  const int64_t n = N * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A g, u;
    const int64_t gate = load_gate_up(h, i, H, g, u);
    const A e = exp(-g);
    const A s = A(1) / (A(1) + e);
    const A one_minus_s = e > A(1) ? A(1) - s : e * s;  // no cancellation where s saturates
    const A ds = to_acc(grad[i]) * s;
    dh[gate] = from_acc<T>(ds * u * (A(1) + g * one_minus_s));
    dh[gate + H] = from_acc<T>(ds * g);
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(grid_size(n, kThreads), 8192)));
}

}  // namespace

at::Tensor swiglu_cuda(const at::Tensor& h_in) {
  const c10::cuda::CUDAGuard device_guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t N = h.size(0);
  const int64_t H = h.size(1) / 2;
  at::Tensor out = new_output({N, H}, h.options());
  if (N * H == 0) return out;
  MOEFAST_DISPATCH_FLOATING(h.scalar_type(), "swiglu_cuda", [&] {
    swiglu_forward_kernel<cuda_t<scalar_t>>
        <<<blocks_for(N * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            cptr<scalar_t>(h), mptr<scalar_t>(out), N, H);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

// The ops: h of any leading shape, flattened to rows of 2H.
at::Tensor swiglu_op_cuda(const at::Tensor& h_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::swiglu");
  check_swiglu_args(h_in, "swiglu");
  std::vector<int64_t> sizes = h_in.sizes().vec();
  const int64_t two_h = sizes.back();
  sizes.back() /= 2;
  if (h_in.numel() == 0) return new_output(sizes, h_in.options());
  return swiglu_cuda(h_in.reshape({-1, two_h})).view(sizes);
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::swiglu_backward");
  check_swiglu_backward_args(grad_in, h_in);
  const c10::cuda::CUDAGuard device_guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t H = h.size(-1) / 2;
  const int64_t N = H == 0 ? 0 : h.numel() / (2 * H);
  at::Tensor dh = new_output(h.sizes(), h.options());
  if (N * H == 0) return dh;
  MOEFAST_DISPATCH_FLOATING(h.scalar_type(), "swiglu_backward_cuda", [&] {
    swiglu_backward_kernel<cuda_t<scalar_t>>
        <<<blocks_for(N * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            cptr<scalar_t>(grad), cptr<scalar_t>(h), mptr<scalar_t>(dh), N, H);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("swiglu", &swiglu_op_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace moefast::cuda
