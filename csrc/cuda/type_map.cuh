// Maps ATen element types to the CUDA types the kernels use, and dispatches on them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moefast::cuda {

template <typename AtenT>
struct CudaType {
  using type = AtenT;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename AtenT>
using cuda_t = typename CudaType<AtenT>::type;

template <typename AtenT>
inline const cuda_t<AtenT>* cptr(const at::Tensor& t) {
  return reinterpret_cast<const cuda_t<AtenT>*>(t.const_data_ptr<AtenT>());
}

template <typename AtenT>
inline cuda_t<AtenT>* mptr(at::Tensor& t) {
  return reinterpret_cast<cuda_t<AtenT>*>(t.mutable_data_ptr<AtenT>());
}

}  // namespace moefast::cuda

// Runs the body with `scalar_t` set to the ATen type of TYPE (float, double, Half, BFloat16).
#define MOEFAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
