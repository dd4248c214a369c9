// The sm_90a gated grouped GEMM for one element type (f16): the second GEMM of a fused swiglu,
// D = silu(gate) * (A @ B_e); see grouped_mm_sm90.cuh.
#include "grouped_mm.cuh"
#ifdef MOEFAST_WITH_CUTLASS
#include "grouped_mm_sm90.cuh"

namespace moefast::cuda {
void grouped_gemm_sm90_gated_f16(const GroupedGemmArgs& args) {
  sm90::dispatch_gated<cutlass::half_t>(args);
}
}  // namespace moefast::cuda
#endif
