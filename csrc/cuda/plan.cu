// Routing plan on CUDA, entirely on the device: per-expert counts (a histogram), their inclusive
// scan into offs, and the stable order of the slots by expert from a radix sort (CUB's radix sort
// is stable, so inside one expert the slots keep their t * k + j order, as on the CPU).
//
// Checking that every id lies in [0, E) would need a host synchronisation, so the device path
// does not raise on a bad id: such a slot is counted for no expert and sorted past offs[E-1],
// where grouped_mm computes nothing (its row is still written by permute). The CPU path raises.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include "common.h"
#include "cuda_utils.cuh"

namespace moefast::cuda {
namespace {

constexpr int kThreads = 256;

// keys[s] = the slot's expert, or E for an id outside [0, E); values[s] = s; counts histogram.
__global__ void plan_prepare_kernel(const int32_t* __restrict__ ids, int64_t n, int32_t E,
                                    int32_t* __restrict__ keys, int32_t* __restrict__ slots,
                                    int32_t* __restrict__ counts) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < n;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = ids[s];
    const bool valid = e >= 0 && e < E;
    keys[s] = valid ? e : E;
    slots[s] = static_cast<int32_t>(s);
    if (valid) atomicAdd(counts + e, 1);
  }
}

// offs = inclusive scan of counts, one block, any E (chunks of blockDim with a running carry).
__global__ void plan_scan_kernel(const int32_t* __restrict__ counts, int32_t E,
                                 int32_t* __restrict__ offs) {
  __shared__ int32_t buf[kThreads];
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int32_t base = 0; base < E; base += kThreads) {
    const int32_t e = base + threadIdx.x;
    buf[threadIdx.x] = e < E ? counts[e] : 0;
    __syncthreads();
    // Hillis-Steele scan inside the chunk.
    for (int off = 1; off < kThreads; off *= 2) {
      const int32_t add = threadIdx.x >= off ? buf[threadIdx.x - off] : 0;
      __syncthreads();
      buf[threadIdx.x] += add;
      __syncthreads();
    }
    if (e < E) offs[e] = carry + buf[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == kThreads - 1) carry += buf[kThreads - 1];
    __syncthreads();
  }
}

// position[order[r]] = r.
__global__ void plan_invert_kernel(const int32_t* __restrict__ order, int64_t n,
                                   int32_t* __restrict__ position) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    position[order[r]] = static_cast<int32_t>(r);
  }
}

int64_t grid_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(grid_size(n, kThreads), 65535));
}

int end_bit_for(int64_t num_keys) {
  int bits = 1;
  while ((int64_t{1} << bits) <= num_keys) ++bits;
  return bits;
}

}  // namespace

// ids [n] -> counts [E], offs [E], position [n], order [n]; scratch comes from the caching
// allocator.
void launch_routing_plan(const int32_t* ids, int64_t n, int64_t E, int32_t* counts, int32_t* offs,
                         int32_t* position, int32_t* order, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * E, stream));
  auto& allocator = *c10::cuda::CUDACachingAllocator::get();
  const int64_t buf_n = std::max<int64_t>(n, 1);
  auto keys_in = allocator.allocate(sizeof(int32_t) * buf_n);
  auto keys_out = allocator.allocate(sizeof(int32_t) * buf_n);
  auto slots = allocator.allocate(sizeof(int32_t) * buf_n);
  auto* k_in = static_cast<int32_t*>(keys_in.get());
  auto* k_out = static_cast<int32_t*>(keys_out.get());
  auto* s_in = static_cast<int32_t*>(slots.get());
  if (n > 0) {
    plan_prepare_kernel<<<grid_for(n), kThreads, 0, stream>>>(ids, n, static_cast<int32_t>(E), k_in,
                                                              s_in, counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  plan_scan_kernel<<<1, kThreads, 0, stream>>>(counts, static_cast<int32_t>(E), offs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (n == 0) return;
  const int end_bit = end_bit_for(E);  // keys lie in [0, E]
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, k_in, k_out, s_in, order,
                                                 static_cast<int>(n), 0, end_bit, stream));
  auto temp = allocator.allocate(std::max<size_t>(temp_bytes, 1));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.get(), temp_bytes, k_in, k_out, s_in, order,
                                                 static_cast<int>(n), 0, end_bit, stream));
  plan_invert_kernel<<<grid_for(n), kThreads, 0, stream>>>(order, n, position);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_plan_cuda(
    const at::Tensor& ids_in, int64_t num_experts) {
  const KernelGuard guard;
  MOEFAST_NVTX_RANGE("moefast::routing_plan");
  check_plan_args(ids_in, num_experts);
  const c10::cuda::CUDAGuard device_guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  const auto opts = ids.options().dtype(at::kInt);
  const int64_t n = ids.numel();
  at::Tensor counts = new_output({num_experts}, opts);
  at::Tensor offs = new_output({num_experts}, opts);
  at::Tensor position = new_output(ids.sizes(), opts);
  at::Tensor order = new_output({n}, opts);
  launch_routing_plan(ids.const_data_ptr<int32_t>(), n, num_experts,
                      counts.mutable_data_ptr<int32_t>(), offs.mutable_data_ptr<int32_t>(),
                      position.mutable_data_ptr<int32_t>(), order.mutable_data_ptr<int32_t>(),
                      at::cuda::getCurrentCUDAStream());
  return {counts, offs, position, order};
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CUDA, m) {
  m.impl("routing_plan", &routing_plan_cuda);
}

}  // namespace moefast::cuda
