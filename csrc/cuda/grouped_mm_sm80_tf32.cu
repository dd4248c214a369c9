// The sm_80 tensor-core grouped GEMM for one element type (tf32); see grouped_mm_sm80.cuh.
#include "grouped_mm.cuh"
#ifdef MOEFAST_WITH_CUTLASS
#include "grouped_mm_sm80.cuh"

namespace moefast::cuda {
void grouped_gemm_sm80_tf32(const GroupedGemmArgs& args) {
  sm80::dispatch<float, true>(args);
}
}  // namespace moefast::cuda
#endif
