// The sm_90a tensor-core grouped GEMM for one element type (bf16); see grouped_mm_sm90.cuh.
#include "grouped_mm.cuh"
#ifdef MOEFAST_WITH_CUTLASS
#include "grouped_mm_sm90.cuh"

namespace moefast::cuda {
void grouped_gemm_sm90_bf16(const GroupedGemmArgs& args) {
  sm90::dispatch<cutlass::bfloat16_t>(args);
}
}  // namespace moefast::cuda
#endif
