// The sm_80 tensor-core grouped GEMM, on CUTLASS 2.x's grouped kernel (mma.sync, ldmatrix and a
// multi-stage cp.async pipeline). Its problem visitor is the device-side tile scheduler: each
// persistent CTA walks the per-group problem sizes in device memory to find its next
// (group, tile), so the group sizes never reach the host (GroupScheduleMode::kDeviceOnly).
//
// A "prepare" kernel writes the per-group problem sizes, pointers and leading dimensions from offs.
// The epilogue (Epilogue below) has three run-time modes: D = act(acc); D = act(acc + C) with the
// bias fused as C = bias[e] broadcast over the rows (leading dimension 0); and the gated mode of a
// fused swiglu, D = silu(C) * acc with C the gate's pre-activation. The source C is only read in
// the last two modes.
// Included by grouped_mm_sm80_{bf16,f16,tf32}.cu, one element type each, so ninja compiles them
// in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <mutex>

#include "cutlass/array.h"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/numeric_conversion.h"
#include "grouped_mm.cuh"
#include "grouped_mm_epilogue.cuh"

namespace moefast::cuda::sm80 {

// Tile configurations: bf16/fp16 128x128x32 tiles of 64x64 warps, 4 stages (64 KiB of shared
// memory); fp32 as TF32 128x128x16, 4 stages.
template <typename Element>
struct Config {
  using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;
  using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kStages = 4;
};
template <>
struct Config<float> {
  using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 16>;
  using WarpShape = cutlass::gemm::GemmShape<64, 64, 16>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 8>;
  static constexpr int kStages = 4;
};

// The thread-level epilogue operator, in the protocol of CUTLASS 2.x's epilogues.
template <typename ElementOutput_, int Count>
class Epilogue {
 public:
  using ElementOutput = ElementOutput_;
  using ElementAccumulator = float;
  using ElementCompute = float;
  static int const kCount = Count;
  static bool const kIsHeavy = true;
  using FragmentOutput = cutlass::Array<ElementOutput, kCount>;
  using FragmentAccumulator = cutlass::Array<float, kCount>;
  using FragmentSource = cutlass::Array<ElementOutput, kCount>;
  using FragmentCompute = cutlass::Array<float, kCount>;

  struct Params {
    int act = 0;              // an Activation code (plain and bias modes)
    bool add_source = false;  // D = act(acc + C): the bias row
    bool gated = false;       // D = silu(C) * acc: the swiglu gate
  };

  CUTLASS_HOST_DEVICE explicit Epilogue(Params const& params) : params_(params) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return params_.add_source || params_.gated; }

  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}  // no split-K here

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc,
                                                FragmentOutput const& source) const {
    cutlass::NumericArrayConverter<float, ElementOutput, kCount> to_compute;
    cutlass::NumericArrayConverter<ElementOutput, float, kCount> to_output;
    const FragmentCompute c = to_compute(source);
    FragmentCompute d;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      d[i] =
          params_.gated ? silu_times(c[i], acc[i]) : apply_activation(acc[i] + c[i], params_.act);
    }
    return to_output(d);
  }

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc) const {
    cutlass::NumericArrayConverter<ElementOutput, float, kCount> to_output;
    FragmentCompute d;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) d[i] = apply_activation(acc[i], params_.act);
    return to_output(d);
  }

 private:
  Params params_;
};

template <typename Element, typename LayoutA, typename LayoutB>
struct Grouped {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using Epilogue = sm80::Epilogue<Element, kAlign>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlign, Element, LayoutB,
      cutlass::ComplexTransform::kNone, kAlign, Element, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename Config<Element>::ThreadblockShape, typename Config<Element>::WarpShape,
      typename Config<Element>::InstructionShape, Epilogue,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, Config<Element>::kStages,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
};

#if defined(__CUDA_ARCH__)
constexpr int kDeviceArch = __CUDA_ARCH__;
#else
constexpr int kDeviceArch = 0;
#endif

// The kernel entry. kOnHopper = false leaves the sm_90 body empty: the dispatcher sends bf16/fp16
// to the sm_90 kernels on Hopper, so only the TF32 kernel is compiled for it.
template <typename Kernel, bool kOnHopper>
__global__ void grouped_kernel(typename Kernel::Params params) {
  if constexpr (kDeviceArch >= 800 && (kOnHopper || kDeviceArch != 900)) {
    extern __shared__ int4 smem[];
    auto* storage = reinterpret_cast<typename Kernel::SharedStorage*>(smem);
    Kernel op;
    op(params, *storage);
  }
}

// The per-group arrays the kernel reads, written on the device from offs.
template <typename Element, typename LayoutA, typename LayoutB>
__global__ void prepare_kernel(GroupedGemmArgs p, cutlass::gemm::GemmCoord* problems,
                               Element** ptr_a, Element** ptr_b, Element** ptr_c, Element** ptr_d,
                               int64_t* lda, int64_t* ldb, int64_t* ldc, int64_t* ldd) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.E) return;
  int64_t begin, end;
  group_rows(p.offs, e, p.N, &begin, &end);
  const int64_t rows = end - begin;
  auto* a = const_cast<Element*>(static_cast<const Element*>(p.a));
  auto* b = const_cast<Element*>(static_cast<const Element*>(p.b));
  auto* d = static_cast<Element*>(p.d);
  if (p.kind == GemmKind::kWeightGrad) {
    // D_e [K, M] = A_e^T [K, rows] (A_e row-major = A_e^T column-major, ld K) @ G_e [rows, M]. An
    // empty group gets no tiles; grouped_gemm_zero_unwritten writes its zeros.
    problems[e] = rows > 0 ? cutlass::gemm::GemmCoord(static_cast<int>(p.K), static_cast<int>(p.M),
                                                      static_cast<int>(rows))
                           : cutlass::gemm::GemmCoord(0, 0, 0);
    ptr_a[e] = a + begin * p.K;
    ptr_b[e] = b + begin * p.M;
    ptr_d[e] = d + e * p.K * p.M;
    ptr_c[e] = ptr_d[e];
    lda[e] = p.K;
    ldb[e] = p.M;
    ldc[e] = p.M;
    ldd[e] = p.M;
    return;
  }
  problems[e] = cutlass::gemm::GemmCoord(static_cast<int>(rows), static_cast<int>(p.M),
                                         static_cast<int>(p.K));
  ptr_a[e] = a + begin * p.K;
  ptr_b[e] = b + e * p.b_stride_e;
  ptr_d[e] = d + begin * p.M;
  if (p.gate != nullptr) {
    ptr_c[e] = const_cast<Element*>(static_cast<const Element*>(p.gate)) + begin * p.M;
    ldc[e] = p.M;
  } else if (p.bias != nullptr) {
    ptr_c[e] = const_cast<Element*>(static_cast<const Element*>(p.bias)) + e * p.M;
    ldc[e] = 0;  // every row reads the same bias row
  } else {
    ptr_c[e] = ptr_d[e];
    ldc[e] = p.M;
  }
  lda[e] = p.K;
  // Row-major B_e: its row stride; column-major B_e (data gradient): its column stride.
  ldb[e] = p.kind == GemmKind::kForward ? p.b_stride_k : p.b_stride_m;
  ldd[e] = p.M;
}

inline int64_t align_up(int64_t n) {
  return (n + 255) / 256 * 256;
}

template <typename Element, typename LayoutA, typename LayoutB, bool kOnHopper>
void run(const GroupedGemmArgs& p) {
  using G = Grouped<Element, LayoutA, LayoutB>;
  using Kernel = typename G::Kernel;
  if (p.E == 0) return;
  TORCH_CHECK(p.N < (int64_t{1} << 31) && p.K < (int64_t{1} << 31) && p.M < (int64_t{1} << 31),
              "moefast.grouped_mm: sizes past 2^31 are not supported by the tensor-core path");
  const int smem = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  auto* kernel = grouped_kernel<Kernel, kOnHopper>;
  // CTAs per SM, asked once per process (a host query, no synchronisation with the stream).
  static int ctas_per_sm = [&] {
    if (smem >= (48 << 10)) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    int n = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Kernel::kThreadCount, smem));
    return n > 0 ? n : 1;
  }();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t E = p.E;
  // One workspace for the per-group arrays: problems, 4 pointer arrays, 4 leading dimensions.
  const int64_t bytes_problems =
      align_up(E * static_cast<int64_t>(sizeof(cutlass::gemm::GemmCoord)));
  const int64_t bytes_ptrs = align_up(E * static_cast<int64_t>(sizeof(void*)));
  const int64_t bytes_ld = align_up(E * static_cast<int64_t>(sizeof(int64_t)));
  at::Tensor workspace = at::empty({bytes_problems + 4 * bytes_ptrs + 4 * bytes_ld},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  char* w = static_cast<char*>(workspace.mutable_data_ptr());
  auto* problems = reinterpret_cast<cutlass::gemm::GemmCoord*>(w);
  char* q = w + bytes_problems;
  auto** ptr_a = reinterpret_cast<Element**>(q);
  auto** ptr_b = reinterpret_cast<Element**>(q + bytes_ptrs);
  auto** ptr_c = reinterpret_cast<Element**>(q + 2 * bytes_ptrs);
  auto** ptr_d = reinterpret_cast<Element**>(q + 3 * bytes_ptrs);
  q += 4 * bytes_ptrs;
  auto* lda = reinterpret_cast<int64_t*>(q);
  auto* ldb = reinterpret_cast<int64_t*>(q + bytes_ld);
  auto* ldc = reinterpret_cast<int64_t*>(q + 2 * bytes_ld);
  auto* ldd = reinterpret_cast<int64_t*>(q + 3 * bytes_ld);
  prepare_kernel<Element, LayoutA, LayoutB>
      <<<static_cast<unsigned>((E + 127) / 128), 128, 0, p.stream>>>(
          p, problems, ptr_a, ptr_b, ptr_c, ptr_d, lda, ldb, ldc, ldd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  typename G::Epilogue::Params epilogue;
  epilogue.act = static_cast<int>(p.act);
  epilogue.gated = p.gate != nullptr;
  epilogue.add_source = p.gate == nullptr && p.bias != nullptr;
  const int ctas = sms * ctas_per_sm;
  typename Kernel::Arguments args(problems, static_cast<int>(E), ctas, epilogue, ptr_a, ptr_b,
                                  ptr_c, ptr_d, lda, ldb, ldc, ldd);
  typename Kernel::Params params(args, nullptr, 0);
  kernel<<<ctas, Kernel::kThreadCount, smem, p.stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the layouts of the operation: forward (row, row), data gradient (row, column), weight
// gradient (column, row).
template <typename Element, bool kOnHopper>
void dispatch(const GroupedGemmArgs& p) {
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  switch (p.kind) {
    case GemmKind::kForward:
      run<Element, Row, Row, kOnHopper>(p);
      break;
    case GemmKind::kDataGrad:
      run<Element, Row, Col, kOnHopper>(p);
      break;
    case GemmKind::kWeightGrad:
      run<Element, Col, Row, kOnHopper>(p);
      break;
  }
}

}  // namespace moefast::cuda::sm80
