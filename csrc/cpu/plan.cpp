// ATen binding of the CPU routing plan.
#include <torch/library.h>

#include "common.h"
#include "plan_kernel.h"

namespace moefast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_plan_cpu(
    const at::Tensor& ids_in, int64_t num_experts) {
  const KernelGuard guard;
  check_plan_args(ids_in, num_experts);
  const at::Tensor ids = ids_in.contiguous();
  const auto opts = ids.options().dtype(at::kInt);
  const int64_t n = ids.numel();
  at::Tensor counts = new_output({num_experts}, opts);
  at::Tensor offs = new_output({num_experts}, opts);
  at::Tensor position = new_output(ids.sizes(), opts);
  at::Tensor order = new_output({n}, opts);
  // About 16k slots per chunk keeps the per-chunk counters small next to the work.
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), ceil_div<int64_t>(n, 16384));
  const int32_t* id_ptr = ids.const_data_ptr<int32_t>();
  const int64_t bad =
      cpu::routing_plan(id_ptr, n, num_experts, chunks, counts.mutable_data_ptr<int32_t>(),
                        offs.mutable_data_ptr<int32_t>(), position.mutable_data_ptr<int32_t>(),
                        order.mutable_data_ptr<int32_t>(), ATenParallelFor{});
  TORCH_CHECK_VALUE(bad < 0, "moefast.routing_plan: expert_ids must be in [0, num_experts) = [0, ",
                    num_experts, "), got ", (bad < 0 ? 0 : id_ptr[bad]), " at token ",
                    (bad < 0 ? 0 : bad / std::max<int64_t>(ids.size(1), 1)), ", slot ",
                    (bad < 0 ? 0 : bad % std::max<int64_t>(ids.size(1), 1)));
  return {counts, offs, position, order};
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("routing_plan", &routing_plan_cpu);
}

}  // namespace moefast
