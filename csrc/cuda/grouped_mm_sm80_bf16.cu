// The sm_80 tensor-core grouped GEMM for one element type (bf16); see grouped_mm_sm80.cuh.
#include "grouped_mm.cuh"
#ifdef MOEFAST_WITH_CUTLASS
#include "grouped_mm_sm80.cuh"

namespace moefast::cuda {
void grouped_gemm_sm80_bf16(const GroupedGemmArgs& args) {
  sm80::dispatch<cutlass::bfloat16_t, false>(args);
}
}  // namespace moefast::cuda
#endif
