// Autocast rules for the moefast ops: grouped_mm is a matrix product, so under torch.autocast it
// runs in the autocast dtype (bfloat16 or float16), as torch.matmul does. The other ops keep the
// dtype they are given (permute and unpermute move data; route, mixture and the losses compute in
// float32 internally anyway).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace moefast {
namespace {

template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor grouped_mm_autocast(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                               const c10::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moefast::grouped_mm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&)>();
  c10::optional<at::Tensor> cast_bias;
  if (bias.has_value() && bias->defined()) {
    cast_bias = at::autocast::cached_cast(dtype, *bias, device);
  }
  return op.call(at::autocast::cached_cast(dtype, a, device),
                 at::autocast::cached_cast(dtype, b, device), offs, cast_bias);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor grouped_mm_act_autocast(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                                   const c10::optional<at::Tensor>& bias,
                                   c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moefast::grouped_mm_act", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, c10::string_view)>();
  c10::optional<at::Tensor> cast_bias;
  if (bias.has_value() && bias->defined()) {
    cast_bias = at::autocast::cached_cast(dtype, *bias, device);
  }
  return op.call(at::autocast::cached_cast(dtype, a, device),
                 at::autocast::cached_cast(dtype, b, device), offs, cast_bias, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, AutocastCPU, m) {
  m.impl("grouped_mm", &grouped_mm_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("grouped_mm_act",
         &grouped_mm_act_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(moefast, AutocastCUDA, m) {
  m.impl("grouped_mm", &grouped_mm_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("grouped_mm_act",
         &grouped_mm_act_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace moefast
