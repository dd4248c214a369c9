// The Python extension module moefast._C. Loading it registers the torch.ops.moefast ops (the
// other translation units hold the TORCH_LIBRARY blocks); this file exposes what is not an op.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "common.h"

#ifdef MOEFAST_WITH_CUDA
namespace moefast::cuda {
// csrc/cuda/grouped_mm.cu: which grouped GEMM implementation these operands would run on.
std::string grouped_mm_backend(const at::Tensor& a, const at::Tensor& b, bool weight_grad);
}  // namespace moefast::cuda
#endif

namespace moefast {
// csrc/cpu_cache.cpp
void cpu_cache_empty();
void cpu_cache_set_limit(int64_t bytes);
std::tuple<int64_t, int64_t, int64_t, int64_t> cpu_cache_stats();
// csrc/cpu/swiglu_mlp.cpp
bool cpu_bf16_gemm_available();
}  // namespace moefast

#ifndef MOEFAST_VERSION
#define MOEFAST_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "moefast native extension: registers torch.ops.moefast and exposes build facts";
  m.attr("__version__") = MOEFAST_VERSION;
#ifdef MOEFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef MOEFAST_WITH_CUTLASS
  m.attr("with_cutlass") = true;  // the tensor-core grouped GEMM paths (sm_80 and sm_90a)
#else
  m.attr("with_cutlass") = false;
#endif
#ifdef MOEFAST_WITH_CUDA
  m.def("grouped_mm_backend", &moefast::cuda::grouped_mm_backend, pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("weight_grad") = false,
        "The CUDA grouped GEMM implementation that grouped_mm(a, b, ...) (or, with weight_grad, "
        "its weight gradient with b = grad_out) would run on here: 'sm90', 'sm80', 'sm80_tf32' "
        "or 'simt'.");
#endif
  m.attr("router_modes") = pybind11::make_tuple("softmax_topk", "topk_softmax", "hard", "dense");
  m.def(
      "set_poison_outputs", [](bool on) { moefast::poison_outputs_flag().store(on); },
      "Debug switch: fill every kernel output with NaN / INT32_MIN before the kernel writes it.");
  m.def(
      "poison_outputs", []() { return moefast::poison_outputs_flag().load(); },
      "Whether kernel outputs are poisoned before they are written.");
  m.def(
      "set_cpu_bf16_gemm", [](bool on) { moefast::cpu_bf16_gemm_flag().store(on); },
      pybind11::arg("on"),
      "Whether the bfloat16 SwiGLU expert MLP on the CPU uses moefast's AVX512-BF16 GEMM with "
      "fused SwiGLU (where the CPU has AVX512-BF16) or oneDNN matmuls and separate SwiGLU passes.");
  m.def(
      "cpu_bf16_gemm", []() { return moefast::cpu_bf16_gemm_flag().load(); },
      "Whether the AVX512-BF16 GEMM path is switched on (see set_cpu_bf16_gemm).");
  m.def("cpu_bf16_gemm_available", &moefast::cpu_bf16_gemm_available,
        "Whether this CPU runs the AVX512-BF16 GEMM (AVX-512 F/BW/VL/DQ and BF16).");
  m.def("cpu_cache_empty", &moefast::cpu_cache_empty,
        "Frees the idle blocks of the caching allocator behind moefast's large CPU outputs.");
  m.def("cpu_cache_set_limit", &moefast::cpu_cache_set_limit, pybind11::arg("bytes"),
        "Caps the bytes of idle blocks the CPU output cache keeps (0: keep none); frees the idle "
        "blocks if they are over it.");
  m.def(
      "cpu_cache_stats",
      []() {
        auto [idle, cap, hits, misses] = moefast::cpu_cache_stats();
        pybind11::dict d;
        d["idle_bytes"] = idle;
        d["limit_bytes"] = cap;
        d["hits"] = hits;
        d["misses"] = misses;
        return d;
      },
      "The CPU output cache: idle bytes, the cap, and reuse hits and misses (blocks of 1 MiB and "
      "more).");
  m.def(
      "parallel_info", []() { return at::get_parallel_info(); },
      "ATen's description of its CPU threading (OpenMP, MKL, threads), as the kernels see it.");
}
