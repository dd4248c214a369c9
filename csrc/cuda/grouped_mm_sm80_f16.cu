// The sm_80 tensor-core grouped GEMM for one element type (f16); see grouped_mm_sm80.cuh.
#include "grouped_mm.cuh"
#ifdef MOEFAST_WITH_CUTLASS
#include "grouped_mm_sm80.cuh"

namespace moefast::cuda {
void grouped_gemm_sm80_f16(const GroupedGemmArgs& args) {
  sm80::dispatch<cutlass::half_t, false>(args);
}
}  // namespace moefast::cuda
#endif
