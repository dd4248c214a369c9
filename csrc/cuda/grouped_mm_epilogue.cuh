// The epilogue activation of the grouped GEMM, selected at run time so that one kernel
// instantiation serves every activation (the switch is uniform across a launch and costs nothing
// next to the GEMM). Written against CUTLASS's activation-functor protocol: an `Arguments` type and
// `operator()(value, arguments)` for a scalar and for a cutlass::Array fragment; the scalar form is
// also what the CUDA-core kernel calls.
#pragma once

#include <cuda_runtime.h>

#include "grouped_mm.cuh"

#ifdef MOEFAST_WITH_CUTLASS
#include "cutlass/array.h"
#endif

namespace moefast::cuda {

// GELU is the exact (erf) form, as torch.nn.functional.gelu's default.
template <typename A>
__host__ __device__ __forceinline__ A apply_activation(A x, int kind) {
  switch (kind) {
    case static_cast<int>(Activation::kRelu):
      return x > A(0) ? x : A(0);
    case static_cast<int>(Activation::kGelu):
      return A(0.5) * x * (A(1) + erf(x * A(0.70710678118654752440)));
    case static_cast<int>(Activation::kSilu):
      return x / (A(1) + exp(-x));
    default:
      return x;
  }
}

struct ActivationArguments {
  int kind = 0;  // an Activation code
};

template <typename T>
struct RuntimeActivation {
  using Arguments = ActivationArguments;
  static const bool kIsHeavy = true;
  __host__ __device__ T operator()(T const& x, Arguments const& args) const {
    return apply_activation(x, args.kind);
  }
};

template <typename A>
__host__ __device__ __forceinline__ A silu_times(A gate, A up) {
  return gate / (A(1) + exp(-gate)) * up;
}

// The second half of a fused swiglu: silu(gate) * up, with up the accumulator and gate the
// epilogue's source (C). Two-input compute node of the sm_90 epilogue visitor tree.
template <typename T>
struct GatedSilu {
  __host__ __device__ T operator()(T const& up, T const& gate) const {
    return silu_times(gate, up);
  }
};

#ifdef MOEFAST_WITH_CUTLASS
template <typename T, int N>
struct GatedSilu<cutlass::Array<T, N>> {
  __host__ __device__ cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& up,
                                                      cutlass::Array<T, N> const& gate) const {
    cutlass::Array<T, N> y;
#pragma unroll
    for (int i = 0; i < N; ++i) y[i] = silu_times(gate[i], up[i]);
    return y;
  }
};

template <typename T, int N>
struct RuntimeActivation<cutlass::Array<T, N>> {
  using Arguments = ActivationArguments;
  static const bool kIsHeavy = true;
  __host__ __device__ cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x,
                                                      Arguments const& args) const {
    cutlass::Array<T, N> y;
#pragma unroll
    for (int i = 0; i < N; ++i) y[i] = apply_activation(x[i], args.kind);
    return y;
  }
};
#endif

}  // namespace moefast::cuda
