// Fused router on CUDA: softmax (float32, or float64 for float64 logits), top-k and the routing
// weights, one warp per row, the row staged in shared memory. Ties go to the lower index and NaN
// ranks first, exactly as on the CPU (moefast/index_math.h: ranks_before).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "cuda_utils.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kMaxWarpsPerBlock = 4;
constexpr int64_t kSharedBudget = 48 * 1024;

// Shared memory per warp for a row of E: values (acc), taken flags (one byte each), padded to 8.
template <typename A>
MOEFAST_HOST_DEVICE int64_t row_bytes(int64_t E) {
  return ceil_div<int64_t>(E * static_cast<int64_t>(sizeof(A) + 1), 8) * 8;
}

// Candidate (value, index) with index -1 meaning "none yet".
template <typename A>
__device__ __forceinline__ bool better(A v, int i, A bv, int bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  return ranks_before(v, i, bv, bi);
}

// Warp-wide arg-best of the untaken entries of vals[0..E): every lane gets the winner's index.
template <typename A>
__device__ __forceinline__ int warp_argbest(const A* vals, const unsigned char* taken, int E) {
  const int lane = threadIdx.x % kWarpSize;
  A best_v = A(0);
  int best_i = -1;
  for (int e = lane; e < E; e += kWarpSize) {
    if (!taken[e] && better(vals[e], e, best_v, best_i)) {
      best_v = vals[e];
      best_i = e;
    }
  }
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const A ov = __shfl_xor_sync(0xffffffffu, best_v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, off);
    if (better(ov, oi, best_v, best_i)) {
      best_v = ov;
      best_i = oi;
    }
  }
  return best_i;
}

template <typename T>
__global__ void router_forward_kernel(const T* __restrict__ logits, int64_t T_rows, int E, int k,
                                      RouterMode mode, bool normalize, T* __restrict__ weights,
                                      int32_t* __restrict__ expert_ids) {
  using A = acc_t<T>;
  extern __shared__ __align__(8) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (row >= T_rows) return;  // whole warps leave together
  A* vals = reinterpret_cast<A*>(smem + warp * row_bytes<A>(E));
  unsigned char* taken = reinterpret_cast<unsigned char*>(vals + E);
  const T* src = logits + row * E;
  T* w = weights + row * k;
  int32_t* ids = expert_ids + row * k;
  for (int e = lane; e < E; e += kWarpSize) {
    vals[e] = to_acc(src[e]);
    taken[e] = 0;
  }
  __syncwarp();

  if (mode == RouterMode::kDense) {
    A m = -INFINITY;
    for (int e = lane; e < E; e += kWarpSize) m = fmax(m, vals[e]);
    m = warp_max(m);
    A z = 0;
    for (int e = lane; e < E; e += kWarpSize) z += exp(vals[e] - m);
    z = warp_sum(z);
    for (int e = lane; e < E; e += kWarpSize) {
      w[e] = from_acc<T>(exp(vals[e] - m) / z);
      ids[e] = e;
    }
    return;
  }

  // k passes of a warp arg-best; lane 0 records the picks, every lane keeps the top-1 value.
  A top = A(0);
  for (int j = 0; j < k; ++j) {
    const int best = warp_argbest(vals, taken, E);
    if (j == 0) top = vals[best];
    if (lane == 0) {
      taken[best] = 1;
      ids[j] = best;
    }
    __syncwarp();
  }
  if (mode == RouterMode::kHard) {
    if (lane == 0) w[0] = from_acc<T>(A(1));
    return;
  }
  // The top-1 logit is the row maximum (or NaN, which makes every weight NaN, as on the CPU).
  A sel_sum = 0;
  A all_sum = 0;
  for (int e = lane; e < E; e += kWarpSize) {
    const A p = exp(vals[e] - top);
    all_sum += p;
    if (taken[e]) sel_sum += p;
  }
  sel_sum = warp_sum(sel_sum);
  all_sum = warp_sum(all_sum);
  const A denom = (mode == RouterMode::kSoftmaxTopk && !normalize) ? all_sum : sel_sum;
  for (int j = lane; j < k; j += kWarpSize) {
    w[j] = from_acc<T>(exp(vals[ids[j]] - top) / denom);
  }
}

template <typename T>
__global__ void router_backward_kernel(const T* __restrict__ grad_weights,
                                       const T* __restrict__ logits,
                                       const int32_t* __restrict__ expert_ids, int64_t T_rows,
                                       int E, int k, RouterMode mode, bool normalize,
                                       T* __restrict__ grad_logits) {
  using A = acc_t<T>;
  extern __shared__ __align__(8) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (row >= T_rows) return;
  // Two rows of E accumulators per warp: the probabilities and the scattered weight gradients.
  A* p = reinterpret_cast<A*>(smem + warp * 2 * row_bytes<A>(E));
  A* g = p + E;
  const T* src = logits + row * E;
  const T* gw = grad_weights + row * k;
  const int32_t* ids = expert_ids + row * k;
  T* out = grad_logits + row * E;
  if (mode == RouterMode::kHard) {
    for (int e = lane; e < E; e += kWarpSize) out[e] = from_acc<T>(A(0));
    return;
  }
  // An id outside [0, E) (only a hand-made expert_ids can hold one: checking it would need a host
  // synchronisation) is skipped, so nothing is read or written out of bounds.
  auto valid = [E](int id) { return id >= 0 && id < E; };
  if (mode == RouterMode::kTopkSoftmax) {
    // w = softmax over the picked logits; d logit_sel = w * (g - <g, w>); zero elsewhere.
    A m = -INFINITY;
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) m = fmax(m, to_acc(src[ids[j]]));
    }
    m = warp_max(m);
    A s = 0;
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) s += exp(to_acc(src[ids[j]]) - m);
    }
    s = warp_sum(s);
    A gw_dot = 0;
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) gw_dot += to_acc(gw[j]) * exp(to_acc(src[ids[j]]) - m) / s;
    }
    gw_dot = warp_sum(gw_dot);
    for (int e = lane; e < E; e += kWarpSize) out[e] = from_acc<T>(A(0));
    __syncwarp();
    for (int j = lane; j < k; j += kWarpSize) {
      if (!valid(ids[j])) continue;
      const A wj = exp(to_acc(src[ids[j]]) - m) / s;
      out[ids[j]] = from_acc<T>(wj * (to_acc(gw[j]) - gw_dot));
    }
    return;
  }
  A m = -INFINITY;
  for (int e = lane; e < E; e += kWarpSize) {
    p[e] = to_acc(src[e]);
    g[e] = 0;
    m = fmax(m, p[e]);
  }
  m = warp_max(m);
  A z = 0;
  for (int e = lane; e < E; e += kWarpSize) {
    p[e] = exp(p[e] - m);
    z += p[e];
  }
  z = warp_sum(z);
  for (int e = lane; e < E; e += kWarpSize) p[e] /= z;
  __syncwarp();
  if (mode == RouterMode::kSoftmaxTopk && normalize) {
    // w_j = p_j / S with S the sum of the picked p: dL/dp_j = (g_j - <g, w>) / S.
    A s = 0;
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) s += p[ids[j]];
    }
    s = warp_sum(s);
    A gw_dot = 0;
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) gw_dot += to_acc(gw[j]) * p[ids[j]] / s;
    }
    gw_dot = warp_sum(gw_dot);
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) g[ids[j]] = (to_acc(gw[j]) - gw_dot) / s;
    }
  } else {
    for (int j = lane; j < k; j += kWarpSize) {
      if (valid(ids[j])) g[ids[j]] = to_acc(gw[j]);
    }
  }
  __syncwarp();
  A gp = 0;
  for (int e = lane; e < E; e += kWarpSize) gp += g[e] * p[e];
  gp = warp_sum(gp);
  for (int e = lane; e < E; e += kWarpSize) out[e] = from_acc<T>(p[e] * (g[e] - gp));
}

// Warps per block so that `per_warp` bytes of shared memory each fit the budget.
int warps_per_block(int64_t per_warp, const char* op, int64_t E) {
  const int64_t fit = kSharedBudget / per_warp;
  TORCH_CHECK_VALUE(fit >= 1, "moefast.", op, ": E = ", E,
                    " experts do not fit the CUDA router's shared memory; at most about ",
                    kSharedBudget / (2 * 9), " are supported");
  return static_cast<int>(std::min<int64_t>(fit, kMaxWarpsPerBlock));
}

}  // namespace

template <typename T>
void launch_router_forward(const T* logits, int64_t T_rows, int64_t E, int64_t k, RouterMode mode,
                           bool normalize, T* weights, int32_t* expert_ids, cudaStream_t stream) {
  if (T_rows == 0) return;
  const int64_t per_warp = row_bytes<acc_t<T>>(E);
  const int warps = warps_per_block(per_warp, "route", E);
  const dim3 grid(static_cast<unsigned>(grid_size(T_rows, warps)));
  router_forward_kernel<T><<<grid, warps * kWarpSize, warps * per_warp, stream>>>(
      logits, T_rows, static_cast<int>(E), static_cast<int>(k), mode, normalize, weights,
      expert_ids);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_router_backward(const T* grad_weights, const T* logits, const int32_t* expert_ids,
                            int64_t T_rows, int64_t E, int64_t k, RouterMode mode, bool normalize,
                            T* grad_logits, cudaStream_t stream) {
  if (T_rows == 0) return;
  const int64_t per_warp = 2 * row_bytes<acc_t<T>>(E);
  const int warps = warps_per_block(per_warp, "route (backward)", E);
  const dim3 grid(static_cast<unsigned>(grid_size(T_rows, warps)));
  router_backward_kernel<T><<<grid, warps * kWarpSize, warps * per_warp, stream>>>(
      grad_weights, logits, expert_ids, T_rows, static_cast<int>(E), static_cast<int>(k), mode,
      normalize, grad_logits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

std::tuple<at::Tensor, at::Tensor> router_cuda(const at::Tensor& logits_in, int64_t k,
                                               c10::string_view mode_str, bool normalize) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::router");
  const RouterMode mode = parse_router_mode(std::string(mode_str));
  check_router_args(logits_in, k, mode, "route");
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T_rows = logits.size(0);
  const int64_t E = logits.size(1);
  at::Tensor weights = new_output({T_rows, k}, logits.options());
  at::Tensor ids = new_output({T_rows, k}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MOEFAST_DISPATCH_FLOATING(logits.scalar_type(), "router_cuda", [&] {
    launch_router_forward(cptr<scalar_t>(logits), T_rows, E, k, mode, normalize,
                          mptr<scalar_t>(weights), ids.mutable_data_ptr<int32_t>(), stream);
  });
  return {weights, ids};
}

at::Tensor router_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                const at::Tensor& ids_in, c10::string_view mode_str,
                                bool normalize) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::router_backward");
  const RouterMode mode = parse_router_mode(std::string(mode_str));
  const int64_t k = check_router_backward_args(grad_weights_in, logits_in, ids_in, mode);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.to(logits.scalar_type()).contiguous();
  const int64_t T_rows = logits.size(0);
  const int64_t E = logits.size(1);
  at::Tensor grad_logits = new_output(logits.sizes(), logits.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MOEFAST_DISPATCH_FLOATING(logits.scalar_type(), "router_backward_cuda", [&] {
    launch_router_backward(cptr<scalar_t>(grad_weights), cptr<scalar_t>(logits),
                           ids.const_data_ptr<int32_t>(), T_rows, E, k, mode, normalize,
                           mptr<scalar_t>(grad_logits), stream);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("router", &router_cuda);
  m.impl("router_backward", &router_backward_cuda);
}

}  // namespace moefast::cuda
