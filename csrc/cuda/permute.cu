// Dispatch (permute) and combine (unpermute) on CUDA, and the gradient of the combine weights.
//
// One block per token: the token's row is read once and written to its k permuted rows (permute),
// or its k permuted rows are read and summed with their weights in float32 (unpermute). Rows move
// in 16-byte vectors when their length and base pointers allow it, element by element otherwise.
// position comes from routing_plan and is a permutation of [0, T * k); an index outside that range
// (a hand-made position) is skipped rather than written out of bounds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, bool kVectorized>
__global__ void permute_kernel(const T* __restrict__ x, int64_t d, int k,
                               const int32_t* __restrict__ position,
                               const acc_t<T>* __restrict__ weights, int64_t rows,
                               T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t t = blockIdx.x;
  const T* src = x + t * d;
  const int32_t* pos = position + t * k;
  if constexpr (kVectorized) {
    constexpr int V = Vec16<T>::kVec;
    for (int64_t c = threadIdx.x * V; c < d; c += static_cast<int64_t>(blockDim.x) * V) {
      const Vec16<T> v = load16(src + c);
      for (int j = 0; j < k; ++j) {
        const int64_t r = pos[j];
        if (r < 0 || r >= rows) continue;
        if (weights == nullptr) {
          store16(out + r * d + c, v);
        } else {
          const A w = weights[t * k + j];
          Vec16<T> o;
#pragma unroll
          for (int i = 0; i < V; ++i) o.v[i] = from_acc<T>(w * to_acc(v.v[i]));
          store16(out + r * d + c, o);
        }
      }
    }
  } else {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const A v = to_acc(src[c]);
      for (int j = 0; j < k; ++j) {
        const int64_t r = pos[j];
        if (r < 0 || r >= rows) continue;
        const A w = weights == nullptr ? A(1) : weights[t * k + j];
        out[r * d + c] = from_acc<T>(w * v);
      }
    }
  }
}

template <typename T, bool kVectorized>
__global__ void unpermute_kernel(const T* __restrict__ y, int64_t d, int k,
                                 const int32_t* __restrict__ position,
                                 const acc_t<T>* __restrict__ weights, int64_t rows,
                                 T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t t = blockIdx.x;
  const int32_t* pos = position + t * k;
  T* dst = out + t * d;
  if constexpr (kVectorized) {
    constexpr int V = Vec16<T>::kVec;
    for (int64_t c = threadIdx.x * V; c < d; c += static_cast<int64_t>(blockDim.x) * V) {
      A acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0;
      for (int j = 0; j < k; ++j) {
        const int64_t r = pos[j];
        if (r < 0 || r >= rows) continue;
        const A w = weights == nullptr ? A(1) : weights[t * k + j];
        const Vec16<T> v = load16(y + r * d + c);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w * to_acc(v.v[i]);
      }
      Vec16<T> o;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = from_acc<T>(acc[i]);
      store16(dst + c, o);
    }
  } else {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      A acc = 0;
      for (int j = 0; j < k; ++j) {
        const int64_t r = pos[j];
        if (r < 0 || r >= rows) continue;
        const A w = weights == nullptr ? A(1) : weights[t * k + j];
        acc += w * to_acc(y[r * d + c]);
      }
      dst[c] = from_acc<T>(acc);
    }
  }
}

// grad_weights[t, j] = <grad_out[t], y[position[t, j]]>: one block per token, a block sum per j.
template <typename T>
__global__ void unpermute_weight_grad_kernel(const T* __restrict__ grad_out,
                                             const T* __restrict__ y, int64_t d, int k,
                                             const int32_t* __restrict__ position, int64_t rows,
                                             acc_t<T>* __restrict__ grad_weights) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize];
  const int64_t t = blockIdx.x;
  const T* g = grad_out + t * d;
  for (int j = 0; j < k; ++j) {
    const int64_t r = position[t * k + j];
    A dot = 0;
    if (r >= 0 && r < rows) {
      const T* src = y + r * d;
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dot += to_acc(g[c]) * to_acc(src[c]);
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) grad_weights[t * k + j] = dot;
  }
}

}  // namespace

template <typename T>
void launch_permute(const T* x, int64_t T_rows, int64_t d, int64_t k, const int32_t* position,
                    const acc_t<T>* weights, T* out, cudaStream_t stream) {
  if (T_rows == 0 || d == 0 || k == 0) return;
  const int64_t rows = T_rows * k;
  if (rows_are_16b_aligned<T>(d, x, out)) {
    permute_kernel<T, true>
        <<<T_rows, kThreads, 0, stream>>>(x, d, static_cast<int>(k), position, weights, rows, out);
  } else {
    permute_kernel<T, false>
        <<<T_rows, kThreads, 0, stream>>>(x, d, static_cast<int>(k), position, weights, rows, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_unpermute(const T* y, int64_t T_rows, int64_t d, int64_t k, const int32_t* position,
                      const acc_t<T>* weights, T* out, cudaStream_t stream) {
  if (T_rows == 0 || d == 0) return;
  const int64_t rows = T_rows * k;
  if (rows_are_16b_aligned<T>(d, y, out)) {
    unpermute_kernel<T, true>
        <<<T_rows, kThreads, 0, stream>>>(y, d, static_cast<int>(k), position, weights, rows, out);
  } else {
    unpermute_kernel<T, false>
        <<<T_rows, kThreads, 0, stream>>>(y, d, static_cast<int>(k), position, weights, rows, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_unpermute_weight_grad(const T* grad_out, const T* y, int64_t T_rows, int64_t d,
                                  int64_t k, const int32_t* position, acc_t<T>* grad_weights,
                                  cudaStream_t stream) {
  if (T_rows == 0 || k == 0) return;
  unpermute_weight_grad_kernel<T><<<T_rows, kThreads, 0, stream>>>(
      grad_out, y, d, static_cast<int>(k), position, T_rows * k, grad_weights);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

template <typename scalar_t>
const acc_t<cuda_t<scalar_t>>* weights_ptr(const at::Tensor& w) {
  return w.defined() ? w.const_data_ptr<acc_t<cuda_t<scalar_t>>>() : nullptr;
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& position_in,
                        const c10::optional<at::Tensor>& weights) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::permute");
  const char* op = "permute";
  check_permute_args(x_in, position_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor position = position_in.contiguous();
  const at::Tensor w = weights_as_acc(weights, position, x, op);
  const int64_t T_rows = x.size(0);
  const int64_t d = x.size(1);
  const int64_t k = position.size(1);
  at::Tensor out = new_output({T_rows * k, d}, x.options());
  MOEFAST_DISPATCH_FLOATING(x.scalar_type(), "permute_cuda", [&] {
    launch_permute(cptr<scalar_t>(x), T_rows, d, k, position.const_data_ptr<int32_t>(),
                   weights_ptr<scalar_t>(w), mptr<scalar_t>(out), at::cuda::getCurrentCUDAStream());
  });
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y_in, const at::Tensor& position_in,
                          const c10::optional<at::Tensor>& weights) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::unpermute");
  const char* op = "unpermute";
  check_unpermute_args(y_in, position_in);
  const c10::cuda::CUDAGuard device_guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor position = position_in.contiguous();
  const at::Tensor w = weights_as_acc(weights, position, y, op);
  const int64_t T_rows = position.size(0);
  const int64_t k = position.size(1);
  const int64_t d = y.size(1);
  at::Tensor out = new_output({T_rows, d}, y.options());
  MOEFAST_DISPATCH_FLOATING(y.scalar_type(), "unpermute_cuda", [&] {
    launch_unpermute(cptr<scalar_t>(y), T_rows, d, k, position.const_data_ptr<int32_t>(),
                     weights_ptr<scalar_t>(w), mptr<scalar_t>(out),
                     at::cuda::getCurrentCUDAStream());
  });
  return out;
}

at::Tensor unpermute_weight_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                      const at::Tensor& position_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::unpermute_weight_grad");
  check_weight_grad_args(grad_out_in, y_in, position_in);
  const c10::cuda::CUDAGuard device_guard(y_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor position = position_in.contiguous();
  const int64_t T_rows = position.size(0);
  const int64_t k = position.size(1);
  const int64_t d = y.size(1);
  at::Tensor grad_w = new_output({T_rows, k}, y.options().dtype(at::toOpMathType(y.scalar_type())));
  MOEFAST_DISPATCH_FLOATING(y.scalar_type(), "unpermute_weight_grad_cuda", [&] {
    using T = cuda_t<scalar_t>;
    launch_unpermute_weight_grad(cptr<scalar_t>(grad_out), cptr<scalar_t>(y), T_rows, d, k,
                                 position.const_data_ptr<int32_t>(),
                                 grad_w.mutable_data_ptr<acc_t<T>>(),
                                 at::cuda::getCurrentCUDAStream());
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_weight_grad", &unpermute_weight_grad_cuda);
}

}  // namespace moefast::cuda
