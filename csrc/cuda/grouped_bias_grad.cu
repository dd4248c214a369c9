// The bias gradient of grouped_mm on CUDA: grad_bias[e] = the sum of the rows of group e, read
// from offs on the device (no host synchronisation). A thread per (expert, column), coalesced
// across columns; an expert with no rows gets zeros.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void grouped_bias_grad_kernel(const T* __restrict__ grad_out, int64_t M,
                                         const int32_t* __restrict__ offs,
                                         T* __restrict__ grad_bias) {
  using A = acc_t<T>;
  const int64_t e = blockIdx.y;
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= M) return;
  const int64_t begin = group_begin(offs, e);
  const int64_t end = group_end(offs, e);
  A acc = 0;
  for (int64_t r = begin; r < end; ++r) acc += to_acc(grad_out[r * M + col]);
  grad_bias[e * M + col] = from_acc<T>(acc);
}

}  // namespace

template <typename T>
void launch_grouped_bias_grad(const T* grad_out, int64_t M, int64_t E, const int32_t* offs,
                              T* grad_bias, cudaStream_t stream) {
  if (E == 0 || M == 0) return;
  const dim3 grid(static_cast<unsigned>(grid_size(M, kThreads)), static_cast<unsigned>(E));
  grouped_bias_grad_kernel<T><<<grid, kThreads, 0, stream>>>(grad_out, M, offs, grad_bias);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

at::Tensor grouped_bias_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& offs_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::grouped_bias_grad");
  check_bias_grad_args(grad_out_in, offs_in);
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor offs = offs_in.contiguous();
  const int64_t E = offs.size(0);
  const int64_t M = grad_out.size(1);
  at::Tensor grad_bias = new_output({E, M}, grad_out.options());
  MOEFAST_DISPATCH_FLOATING(grad_out.scalar_type(), "grouped_bias_grad_cuda", [&] {
    launch_grouped_bias_grad(cptr<scalar_t>(grad_out), M, E, offs.const_data_ptr<int32_t>(),
                             mptr<scalar_t>(grad_bias), at::cuda::getCurrentCUDAStream());
  });
  return grad_bias;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("grouped_bias_grad", &grouped_bias_grad_cuda);
}

}  // namespace moefast::cuda
