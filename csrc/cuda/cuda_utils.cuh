// Small device helpers shared by the CUDA kernels: conversions to and from float, 16-byte vector
// loads and stores, warp reductions, launch checks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvtx3.hpp>

#include <cstdint>

#include "moefast/index_math.h"

namespace moefast::cuda {

constexpr int kWarpSize = 32;

// NVTX ranges in the "moefast" domain around every op's launch code, so an Nsight profile reads by
// op name (free when no profiler is attached).
struct NvtxDomain {
  static constexpr const char* name{"moefast"};
};
#define MOEFAST_NVTX_RANGE(NAME)                                                    \
  const ::nvtx3::scoped_range_in<::moefast::cuda::NvtxDomain> moefast_nvtx_range_ { \
    NAME                                                                            \
  }

// Conversions through float for every element type the kernels take.
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The accumulation type of an element type: double for double, float otherwise.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return to_float(v);
}
template <>
__device__ __forceinline__ double to_acc<double>(double v) {
  return v;
}
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}

// A 16-byte chunk of kVec elements, loaded and stored with one vector instruction.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  Vec16<T> out;
  *reinterpret_cast<uint4*>(&out) = __ldg(reinterpret_cast<const uint4*>(p));
  return out;
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

// True when rows of d elements starting at these pointers can all be moved in 16-byte vectors.
template <typename T>
inline bool rows_are_16b_aligned(int64_t d, const void* a, const void* b) {
  return (d * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2)
    v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024 threads); every thread gets the
// result. `scratch` holds at least 32 values; the call ends with a barrier, so scratch can be
// reused.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = lane < warps ? scratch[lane] : A(0);
  total = warp_sum(total);
  __syncthreads();
  return total;
}

inline int64_t grid_size(int64_t work, int64_t per_block) {
  return ceil_div<int64_t>(work, per_block);
}

}  // namespace moefast::cuda
