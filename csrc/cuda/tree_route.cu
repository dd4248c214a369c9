// Routing down a tree of hyperplanes on CUDA (see csrc/cpu/tree_route.cpp for the semantics). One
// warp walks one row: the lanes split the dot product with the current node's normal, a shuffle
// reduction gives every lane the sum, and all lanes take the same branch. A walk that leaves the
// tree (a child index >= n, or no leaf within depth levels) writes -1 instead of raising, since
// raising would need a host synchronisation; routing_plan then drops that row.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void tree_route_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ b, const int64_t* __restrict__ child,
                                  int64_t B, int64_t d, int64_t n, int64_t depth,
                                  int32_t* __restrict__ out) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarpSize;
       r < B; r += warps) {
    const T* row = x + r * d;
    int64_t node = n == 0 ? -1 : 0;
    for (int64_t level = 0; level < depth && node >= 0; ++level) {
      const T* normal = w + node * d;
      A s = 0;
      for (int64_t i = lane; i < d; i += kWarpSize) s += to_acc(row[i]) * to_acc(normal[i]);
      s = warp_sum(s);
      node = child[node * 2 + (s > to_acc(b[node]) ? 1 : 0)];
      if (node >= n) break;
    }
    if (lane == 0) {
      const int64_t leaf = -(node + 1);
      out[r] = (node >= 0 || leaf > INT32_MAX) ? -1 : static_cast<int32_t>(leaf);
    }
  }
}

at::Tensor tree_route_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in,
                           const at::Tensor& child_in, int64_t depth) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::tree_route");
  check_tree_route_args(x_in, w_in, b_in, child_in, depth);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor child = child_in.contiguous();
  const int64_t B = x.size(0);
  at::Tensor out = new_output({B}, x.options().dtype(at::kInt));
  if (B == 0) return out;
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(B, kWarpsPerBlock), 65535 * 8);
  const auto stream = at::cuda::getCurrentCUDAStream();
  MOEFAST_DISPATCH_FLOATING(x.scalar_type(), "tree_route_cuda", [&] {
    tree_route_kernel<cuda_t<scalar_t>><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        cptr<scalar_t>(x), cptr<scalar_t>(w), cptr<scalar_t>(b), child.const_data_ptr<int64_t>(), B,
        x.size(1), w.size(0), depth, out.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("tree_route", &tree_route_cuda);
}

}  // namespace moefast::cuda
