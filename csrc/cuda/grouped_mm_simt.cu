// The CUDA-core grouped GEMM: every dtype (float64 included), any strides, any sizes. It is the
// path for what the tensor-core kernels do not take (float64, float32 without TF32, unaligned
// shapes, strided operands) and the reference the tensor-core paths are tested against on the GPU.
//
// Forward / data gradient: a CTA computes one 64 x 64 output tile. The grid has one slot per
// possible row tile, ceil(N / 64) + E of them (each group adds at most one partial tile); a CTA
// finds its (group, row tile) by walking the per-group tile counts from offs on the device, and
// slots past the last tile exit. Weight gradient: a CTA owns one 64 x 64 tile of one expert's
// gradient and loops over that expert's rows; an expert with no rows writes zeros.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "cuda_utils.cuh"
#include "grouped_mm.cuh"
#include "grouped_mm_epilogue.cuh"
#include "type_map.cuh"

namespace moefast::cuda {
namespace {

constexpr int kTile = 64;      // output tile, rows and columns
constexpr int kStep = 16;      // reduction step staged in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    simt_forward_kernel(const T* __restrict__ a, int64_t a_sr, int64_t a_sk,
                        const T* __restrict__ b, int64_t b_se, int64_t b_sk, int64_t b_sm,
                        const T* __restrict__ bias, const T* __restrict__ gate, T* __restrict__ d,
                        const int32_t* __restrict__ offs, int64_t E, int64_t N, int64_t K,
                        int64_t M, int act) {
  using A = acc_t<T>;
  __shared__ A as[kStep][kTile];
  __shared__ A bs[kStep][kTile];
  __shared__ int64_t group_info[3];  // expert, first row, end row
  const int tid = threadIdx.x;
  if (tid == 0) {
    int64_t slot = blockIdx.x;
    group_info[0] = -1;
    for (int64_t e = 0; e < E; ++e) {
      int64_t begin, end;
      group_rows(offs, e, N, &begin, &end);
      const int64_t tiles = (end - begin + kTile - 1) / kTile;
      if (slot < tiles) {
        group_info[0] = e;
        group_info[1] = begin + slot * kTile;
        group_info[2] = end;
        break;
      }
      slot -= tiles;
    }
  }
  __syncthreads();
  const int64_t e = group_info[0];
  if (e < 0) return;
  const int64_t row0 = group_info[1];
  const int64_t row_end = group_info[2];
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const T* be = b + e * b_se;
  const int tx = tid % 16;
  const int ty = tid / 16;
  A acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kStep) {
    for (int i = tid; i < kStep * kTile; i += kThreads) {
      // a: consecutive threads walk k (coalesced for row-major a); b: they walk columns.
      const int ar = i / kStep;
      const int ak = i % kStep;
      const int64_t r = row0 + ar;
      as[ak][ar] = (r < row_end && k0 + ak < K) ? to_acc(a[r * a_sr + (k0 + ak) * a_sk]) : A(0);
      const int bk = i / kTile;
      const int64_t c = col0 + i % kTile;
      bs[bk][i % kTile] = (c < M && k0 + bk < K) ? to_acc(be[(k0 + bk) * b_sk + c * b_sm]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      A av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + ty * 4 + i;
    if (r >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx * 4 + j;
      if (c >= M) continue;
      A v = acc[i][j];
      if (gate != nullptr) {  // the second half of a fused swiglu
        d[r * M + c] = from_acc<T>(silu_times(to_acc(gate[r * M + c]), v));
        continue;
      }
      if (bias != nullptr) v += to_acc(bias[e * M + c]);
      d[r * M + c] = from_acc<T>(apply_activation(v, act));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    simt_weight_grad_kernel(const T* __restrict__ a, int64_t a_sr, int64_t a_sk,
                            const T* __restrict__ g, int64_t g_sr, int64_t g_sm, T* __restrict__ d,
                            const int32_t* __restrict__ offs, int64_t N, int64_t K, int64_t M) {
  using A = acc_t<T>;
  __shared__ A as[kStep][kTile];
  __shared__ A gs[kStep][kTile];
  const int64_t e = blockIdx.z;
  const int64_t k_base = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t m_base = static_cast<int64_t>(blockIdx.x) * kTile;
  int64_t begin, end;
  group_rows(offs, e, N, &begin, &end);
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  A acc[4][4] = {};
  for (int64_t r0 = begin; r0 < end; r0 += kStep) {
    for (int i = tid; i < kStep * kTile; i += kThreads) {
      const int rr = i / kTile;
      const int cc = i % kTile;
      const int64_t r = r0 + rr;
      const int64_t k = k_base + cc;
      const int64_t m = m_base + cc;
      as[rr][cc] = (r < end && k < K) ? to_acc(a[r * a_sr + k * a_sk]) : A(0);
      gs[rr][cc] = (r < end && m < M) ? to_acc(g[r * g_sr + m * g_sm]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kStep; ++rr) {
      A av[4], gv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[rr][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) gv[j] = gs[rr][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * gv[j];
    }
    __syncthreads();
  }
  T* de = d + e * K * M;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t k = k_base + ty * 4 + i;
    if (k >= K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m_base + tx * 4 + j;
      if (m < M) de[k * M + m] = from_acc<T>(acc[i][j]);
    }
  }
}

// Forward: zero rows [offs[E-1], N) of d [N, cols]. Weight gradient: zero d[e] [K, M] of every
// group with no rows. Grid-stride over the output; reads only offs.
template <typename T>
__global__ void zero_unwritten_kernel(T* __restrict__ d, const int32_t* __restrict__ offs,
                                      int64_t E, int64_t N, int64_t cols, int64_t slab,
                                      bool weight_grad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!weight_grad) {
    int64_t used = 0;
    if (E > 0) {
      int64_t begin;
      group_rows(offs, E - 1, N, &begin, &used);
    }
    for (int64_t i = used * cols + start; i < N * cols; i += stride)
      d[i] = from_acc<T>(acc_t<T>(0));
    return;
  }
  const int64_t e = blockIdx.y;
  int64_t begin, end;
  group_rows(offs, e, N, &begin, &end);
  if (end > begin) return;
  for (int64_t i = start; i < slab; i += stride) d[e * slab + i] = from_acc<T>(acc_t<T>(0));
}

template <typename T>
void launch_simt(const GroupedGemmArgs& p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* d = static_cast<T*>(p.d);
  if (p.kind == GemmKind::kWeightGrad) {
    if (p.E == 0 || p.K == 0 || p.M == 0) return;
    TORCH_CHECK(p.E <= 65535, "moefast.grouped_mm: the CUDA-core weight gradient takes at most ",
                "65535 groups, got ", p.E);
    const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.M, kTile)),
                    static_cast<unsigned>(ceil_div<int64_t>(p.K, kTile)),
                    static_cast<unsigned>(p.E));
    TORCH_CHECK(grid.y <= 65535, "moefast.grouped_mm: K = ", p.K, " is too large");
    simt_weight_grad_kernel<T><<<grid, kThreads, 0, p.stream>>>(
        a, p.a_stride_r, p.a_stride_k, b, p.b_stride_k, p.b_stride_m, d, p.offs, p.N, p.K, p.M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (p.E == 0 || p.N == 0 || p.M == 0) return;
  const int64_t slots = ceil_div<int64_t>(p.N, kTile) + p.E;
  const int64_t col_tiles = ceil_div<int64_t>(p.M, kTile);
  TORCH_CHECK(col_tiles <= 65535, "moefast.grouped_mm: M = ", p.M, " is too large");
  TORCH_CHECK(slots < (int64_t{1} << 31), "moefast.grouped_mm: N = ", p.N, " is too large");
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(col_tiles));
  simt_forward_kernel<T><<<grid, kThreads, 0, p.stream>>>(
      a, p.a_stride_r, p.a_stride_k, b, p.b_stride_e, p.b_stride_k, p.b_stride_m,
      static_cast<const T*>(p.bias), static_cast<const T*>(p.gate), d, p.offs, p.E, p.N, p.K, p.M,
      static_cast<int>(p.act));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_zero(const GroupedGemmArgs& p, int64_t cols) {
  T* d = static_cast<T*>(p.d);
  if (p.kind == GemmKind::kWeightGrad) {
    const int64_t slab = p.K * p.M;
    if (p.E == 0 || slab == 0) return;
    TORCH_CHECK(p.E <= 65535, "moefast.grouped_mm: at most 65535 groups, got ", p.E);
    const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(slab, kThreads * 4), 64);
    zero_unwritten_kernel<T><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p.E)),
                               kThreads, 0, p.stream>>>(d, p.offs, p.E, p.N, cols, slab, true);
  } else {
    if (p.N == 0 || cols == 0) return;
    const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(p.N * cols, kThreads * 4), 1024);
    zero_unwritten_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, p.stream>>>(
        d, p.offs, p.E, p.N, cols, 0, false);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void grouped_gemm_simt(const GroupedGemmArgs& args) {
  MOEFAST_DISPATCH_FLOATING(args.dtype, "grouped_gemm_simt",
                            [&] { launch_simt<cuda_t<scalar_t>>(args); });
}

void grouped_gemm_zero_unwritten(const GroupedGemmArgs& args, int64_t out_cols) {
  MOEFAST_DISPATCH_FLOATING(args.dtype, "grouped_gemm_zero_unwritten",
                            [&] { launch_zero<cuda_t<scalar_t>>(args, out_cols); });
}

}  // namespace moefast::cuda
