// The adaptive-fusion combine on CUDA: out[b] = sum_e softmax(gate[b])[e] * expert_out[e, b],
// softmax and weighted sum fused, one block per row b; the backward likewise.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kThreads = 128;

template <typename A>
__device__ __forceinline__ A block_max(A v, A* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A m = lane < static_cast<int>(blockDim.x / kWarpSize) ? scratch[lane] : A(-INFINITY);
  m = warp_max(m);
  __syncthreads();
  return m;
}

// p[0..E) = softmax(gate[0..E)) in shared memory; ends with a barrier.
template <typename T>
__device__ void block_softmax(const T* gate, int E, acc_t<T>* p, acc_t<T>* scratch) {
  using A = acc_t<T>;
  A m = -INFINITY;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    p[e] = to_acc(gate[e]);
    m = fmax(m, p[e]);
  }
  m = block_max(m, scratch);
  A z = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    p[e] = exp(p[e] - m);
    z += p[e];
  }
  z = block_sum(z, scratch);
  for (int e = threadIdx.x; e < E; e += blockDim.x) p[e] /= z;
  __syncthreads();
}

template <typename T>
__global__ void mixture_forward_kernel(const T* __restrict__ gate, const T* __restrict__ eo,
                                       int64_t B, int E, int64_t C, T* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ __align__(8) unsigned char smem[];
  A* p = reinterpret_cast<A*>(smem);
  __shared__ A scratch[kWarpSize];
  const int64_t b = blockIdx.x;
  block_softmax(gate + b * E, E, p, scratch);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A acc = 0;
    for (int e = 0; e < E; ++e) acc += p[e] * to_acc(eo[(e * B + b) * C + c]);
    out[b * C + c] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void mixture_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ gate,
                                        const T* __restrict__ eo, int64_t B, int E, int64_t C,
                                        T* __restrict__ grad_gate, T* __restrict__ grad_eo) {
  using A = acc_t<T>;
  extern __shared__ __align__(8) unsigned char smem[];
  A* p = reinterpret_cast<A*>(smem);
  A* dots = p + E;
  __shared__ A scratch[kWarpSize];
  const int64_t b = blockIdx.x;
  block_softmax(gate + b * E, E, p, scratch);
  const T* g = grad_out + b * C;
  for (int e = 0; e < E; ++e) {
    const T* src = eo + (e * B + b) * C;
    T* dst = grad_eo + (e * B + b) * C;
    A dot = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A gc = to_acc(g[c]);
      dot += gc * to_acc(src[c]);
      dst[c] = from_acc<T>(p[e] * gc);
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) dots[e] = dot;
  }
  __syncthreads();
  A pd = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) pd += p[e] * dots[e];
  pd = block_sum(pd, scratch);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    grad_gate[b * E + e] = from_acc<T>(p[e] * (dots[e] - pd));
  }
}

void check_mixture_shared_memory(int64_t bytes, int64_t E) {
  TORCH_CHECK_VALUE(bytes <= 48 * 1024, "moefast.mixture: E = ", E,
                    " experts do not fit the CUDA kernel's shared memory");
}

}  // namespace

template <typename T>
void launch_mixture_forward(const T* gate, const T* eo, int64_t B, int64_t E, int64_t C, T* out,
                            cudaStream_t stream) {
  if (B == 0 || C == 0) return;
  const int64_t bytes = E * static_cast<int64_t>(sizeof(acc_t<T>));
  check_mixture_shared_memory(bytes, E);
  mixture_forward_kernel<T>
      <<<B, kThreads, bytes, stream>>>(gate, eo, B, static_cast<int>(E), C, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_mixture_backward(const T* grad_out, const T* gate, const T* eo, int64_t B, int64_t E,
                             int64_t C, T* grad_gate, T* grad_eo, cudaStream_t stream) {
  if (B == 0) return;
  const int64_t bytes = 2 * E * static_cast<int64_t>(sizeof(acc_t<T>));
  check_mixture_shared_memory(bytes, E);
  mixture_backward_kernel<T><<<B, kThreads, bytes, stream>>>(
      grad_out, gate, eo, B, static_cast<int>(E), C, grad_gate, grad_eo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

at::Tensor mixture_cuda(const at::Tensor& gate_in, const at::Tensor& expert_out_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::mixture");
  check_mixture_args(gate_in, expert_out_in, "mixture");
  const c10::cuda::CUDAGuard device_guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor eo = expert_out_in.contiguous();
  const int64_t B = gate.size(0);
  const int64_t E = gate.size(1);
  const int64_t C = eo.size(2);
  at::Tensor out = new_output({B, C}, eo.options());
  MOEFAST_DISPATCH_FLOATING(gate.scalar_type(), "mixture_cuda", [&] {
    launch_mixture_forward(cptr<scalar_t>(gate), cptr<scalar_t>(eo), B, E, C, mptr<scalar_t>(out),
                           at::cuda::getCurrentCUDAStream());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mixture_backward_cuda(const at::Tensor& grad_out_in,
                                                         const at::Tensor& gate_in,
                                                         const at::Tensor& expert_out_in) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::mixture_backward");
  check_mixture_backward_args(grad_out_in, gate_in, expert_out_in);
  const c10::cuda::CUDAGuard device_guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor eo = expert_out_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(eo.scalar_type()).contiguous();
  const int64_t B = gate.size(0);
  const int64_t E = gate.size(1);
  const int64_t C = eo.size(2);
  at::Tensor grad_gate = new_output(gate.sizes(), gate.options());
  at::Tensor grad_eo = new_output(eo.sizes(), eo.options());
  MOEFAST_DISPATCH_FLOATING(gate.scalar_type(), "mixture_backward_cuda", [&] {
    launch_mixture_backward(cptr<scalar_t>(grad_out), cptr<scalar_t>(gate), cptr<scalar_t>(eo), B,
                            E, C, mptr<scalar_t>(grad_gate), mptr<scalar_t>(grad_eo),
                            at::cuda::getCurrentCUDAStream());
  });
  return {grad_gate, grad_eo};
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("mixture", &mixture_cuda);
  m.impl("mixture_backward", &mixture_backward_cuda);
}

}  // namespace moefast::cuda
