// The Hopper (sm_90a) tensor-core grouped GEMM, on CUTLASS 3.x's pointer-array grouped kernel:
// wgmma fed by TMA loads, a warp-specialised producer / two consumer warp groups ("cooperative"),
// persistent CTAs and CUTLASS's group tile scheduler, which walks the per-group problem shapes in
// device memory (no host copy of the shapes is passed, so nothing depends on the host knowing the
// group sizes). TMA descriptors are patched per group on the device.
//
// The epilogue is an epilogue visitor tree: D = act(acc + bias[e]) with the bias a per-group row
// broadcast (null when there is none) and the activation chosen at run time, stored by TMA; the
// gated variant (the second GEMM of a fused swiglu) computes D = silu(C) * acc with C, the gate's
// pre-activation, loaded by TMA. A "prepare" kernel writes the per-group problem shapes, pointers
// and strides from offs. Included by grouped_mm_sm90_{bf16,f16}.cu and
// grouped_mm_sm90_gated_{bf16,f16}.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "grouped_mm.cuh"
#include "grouped_mm_epilogue.cuh"

namespace moefast::cuda::sm90 {

using namespace cute;

template <typename Element, typename LayoutA, typename LayoutB, bool kGated = false>
struct Grouped {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // act(acc + bias[e][n]): the bias row comes through an array of per-group pointers.
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element*, float,
                                                           Stride<_0, _1, _0>, kAlign, true>;
  using AddBias = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, Bias>;
  using Activate = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<RuntimeActivation, Element, float, kRound>, AddBias>;
  // silu(C) * acc, C the gate's pre-activation.
  using Gated = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<GatedSilu, Element, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, cutlass::epilogue::fusion::Sm90SrcFetch<Element>>;
  using Fusion = cute::conditional_t<kGated, Gated, Activate>;
  using ElementC = cute::conditional_t<kGated, Element, void>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC,
      cutlass::layout::RowMajor*, kAlign, Element, cutlass::layout::RowMajor*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
};

// A packed CuTe stride with its one dynamic mode set to the leading dimension.
template <typename Stride>
__device__ __forceinline__ Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_same_v<cute::remove_cvref_t<decltype(get<0>(s))>, int64_t>) {
    get<0>(s) = ld;
  } else {
    get<1>(s) = ld;
  }
  return s;
}

template <typename G, typename Element>
__global__ void prepare_kernel(GroupedGemmArgs p, Shape<int, int, int>* problems,
                               const Element** ptr_a, const Element** ptr_b, Element** ptr_d,
                               const Element** ptr_bias, const Element** ptr_c,
                               typename G::StrideA* stride_a, typename G::StrideB* stride_b,
                               typename G::StrideC* stride_c, typename G::StrideD* stride_d) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.E) return;
  int64_t begin, end;
  group_rows(p.offs, e, p.N, &begin, &end);
  const int64_t rows = end - begin;
  const auto* a = static_cast<const Element*>(p.a);
  const auto* b = static_cast<const Element*>(p.b);
  auto* d = static_cast<Element*>(p.d);
  if (p.kind == GemmKind::kWeightGrad) {
    // D_e [K, M] = A_e^T (column-major, ld K) @ G_e (row-major, ld M); an empty group gets no
    // tiles (a zero-length reduction would leave the accumulators unset) and is zeroed apart.
    problems[e] = rows > 0 ? Shape<int, int, int>{static_cast<int>(p.K), static_cast<int>(p.M),
                                                  static_cast<int>(rows)}
                           : Shape<int, int, int>{0, 0, 0};
    ptr_a[e] = a + begin * p.K;
    ptr_b[e] = b + begin * p.M;
    ptr_d[e] = d + e * p.K * p.M;
    stride_a[e] = leading_stride<typename G::StrideA>(p.K);
    stride_b[e] = leading_stride<typename G::StrideB>(p.M);
    stride_d[e] = leading_stride<typename G::StrideD>(p.M);
    return;
  }
  problems[e] =
      Shape<int, int, int>{static_cast<int>(rows), static_cast<int>(p.M), static_cast<int>(p.K)};
  ptr_a[e] = a + begin * p.K;
  ptr_b[e] = b + e * p.b_stride_e;
  ptr_d[e] = d + begin * p.M;
  if (ptr_bias != nullptr) ptr_bias[e] = static_cast<const Element*>(p.bias) + e * p.M;
  if (ptr_c != nullptr) {  // the gated variant: C is the gate's pre-activation, laid out as D
    ptr_c[e] = static_cast<const Element*>(p.gate) + begin * p.M;
    stride_c[e] = leading_stride<typename G::StrideC>(p.M);
  }
  stride_a[e] = leading_stride<typename G::StrideA>(p.K);
  // Row-major B_e: its row stride; column-major B_e (data gradient): its column stride.
  stride_b[e] = leading_stride<typename G::StrideB>(p.kind == GemmKind::kForward ? p.b_stride_k
                                                                                 : p.b_stride_m);
  stride_d[e] = leading_stride<typename G::StrideD>(p.M);
}

inline int64_t align_up(int64_t n) {
  return (n + 255) / 256 * 256;
}

template <typename Element, typename LayoutA, typename LayoutB, bool kGated = false>
void run(const GroupedGemmArgs& p) {
  using G = Grouped<Element, LayoutA, LayoutB, kGated>;
  using Gemm = typename G::Gemm;
  if (p.E == 0) return;
  TORCH_CHECK(p.N < (int64_t{1} << 31) && p.K < (int64_t{1} << 31) && p.M < (int64_t{1} << 31),
              "moefast.grouped_mm: sizes past 2^31 are not supported by the tensor-core path");
  const int64_t E = p.E;
  const bool has_bias = p.bias != nullptr && p.kind != GemmKind::kWeightGrad;
  const int64_t b_shape = align_up(E * static_cast<int64_t>(sizeof(Shape<int, int, int>)));
  const int64_t b_ptr = align_up(E * static_cast<int64_t>(sizeof(void*)));
  const int64_t b_sa = align_up(E * static_cast<int64_t>(sizeof(typename G::StrideA)));
  const int64_t b_sb = align_up(E * static_cast<int64_t>(sizeof(typename G::StrideB)));
  const int64_t b_sc = align_up(E * static_cast<int64_t>(sizeof(typename G::StrideC)));
  const int64_t b_sd = align_up(E * static_cast<int64_t>(sizeof(typename G::StrideD)));
  const int64_t arrays = b_shape + 5 * b_ptr + b_sa + b_sb + b_sc + b_sd;

  cutlass::KernelHardwareInfo hw;
  hw.device_id = at::cuda::current_device();
  hw.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  // The arrays' addresses are known before they are written, so the arguments (and the size of
  // CUTLASS's own workspace, which holds the per-SM TMA descriptors) can be set up first.
  auto make_args = [&](char* w) {
    auto* problems = reinterpret_cast<Shape<int, int, int>*>(w);
    char* q = w + b_shape;
    auto** ptr_a = reinterpret_cast<const Element**>(q);
    auto** ptr_b = reinterpret_cast<const Element**>(q + b_ptr);
    auto** ptr_d = reinterpret_cast<Element**>(q + 2 * b_ptr);
    auto** ptr_bias = reinterpret_cast<const Element**>(q + 3 * b_ptr);
    auto** ptr_c = reinterpret_cast<const Element**>(q + 4 * b_ptr);
    q += 5 * b_ptr;
    auto* stride_a = reinterpret_cast<typename G::StrideA*>(q);
    auto* stride_b = reinterpret_cast<typename G::StrideB*>(q + b_sa);
    auto* stride_c = reinterpret_cast<typename G::StrideC*>(q + b_sa + b_sb);
    auto* stride_d = reinterpret_cast<typename G::StrideD*>(q + b_sa + b_sb + b_sc);
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {static_cast<int>(E), problems, nullptr};
    args.mainloop = {ptr_a, stride_a, ptr_b, stride_b};
    args.hw_info = hw;
    args.epilogue.ptr_D = ptr_d;
    args.epilogue.dD = stride_d;
    if constexpr (kGated) {
      args.epilogue.ptr_C = ptr_c;
      args.epilogue.dC = stride_c;
      args.epilogue.thread = {{}, {}, {}};  // {acc, C, silu(C) * acc}
    } else {
      // {{acc, bias row, plus}, activation}
      args.epilogue.thread = {{{}, {has_bias ? ptr_bias : nullptr, Element(0), {}}, {}},
                              {ActivationArguments{static_cast<int>(p.act)}}};
    }
    return std::make_tuple(args, problems, ptr_a, ptr_b, ptr_d, ptr_bias, ptr_c, stride_a, stride_b,
                           stride_c, stride_d);
  };
  // CUTLASS's workspace size does not depend on the array addresses: ask with a null base.
  const int64_t cutlass_bytes =
      static_cast<int64_t>(Gemm::get_workspace_size(std::get<0>(make_args(nullptr))));
  at::Tensor workspace = at::empty({arrays + align_up(cutlass_bytes) + 256},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  char* w = static_cast<char*>(workspace.mutable_data_ptr());
  auto [args, problems, ptr_a, ptr_b, ptr_d, ptr_bias, ptr_c, stride_a, stride_b, stride_c,
        stride_d] = make_args(w);
  prepare_kernel<G, Element><<<static_cast<unsigned>((E + 127) / 128), 128, 0, p.stream>>>(
      p, problems, ptr_a, ptr_b, ptr_d, has_bias ? ptr_bias : nullptr, kGated ? ptr_c : nullptr,
      stride_a, stride_b, stride_c, stride_d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "moefast.grouped_mm: the sm_90 kernel cannot ",
              "take these arguments: ", cutlass::cutlassGetStatusString(status));
  status = gemm.initialize(args, w + arrays, p.stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "moefast.grouped_mm: sm_90 initialize failed: ",
              cutlass::cutlassGetStatusString(status));
  status = gemm.run(p.stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess,
              "moefast.grouped_mm: sm_90 launch failed: ", cutlass::cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element>
void dispatch(const GroupedGemmArgs& p) {
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  switch (p.kind) {
    case GemmKind::kForward:
      run<Element, Row, Row>(p);
      break;
    case GemmKind::kDataGrad:
      run<Element, Row, Col>(p);
      break;
    case GemmKind::kWeightGrad:
      run<Element, Col, Row>(p);
      break;
  }
}

// The second GEMM of a fused swiglu (forward layout only).
template <typename Element>
void dispatch_gated(const GroupedGemmArgs& p) {
  using Row = cutlass::layout::RowMajor;
  TORCH_CHECK(p.kind == GemmKind::kForward && p.gate != nullptr,
              "moefast.grouped_mm: the gated sm_90 kernel is for the forward swiglu only");
  run<Element, Row, Row, true>(p);
}

}  // namespace moefast::cuda::sm90
