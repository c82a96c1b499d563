// torch.autocast for the fused ops on CUDA, as PyTorch does for its own RNN ops (lstm/gru are on
// autocast's lower-precision list): inside an enabled CUDA autocast region, every floating CUDA
// tensor argument that autocast considers eligible (not fp64) is cast to the autocast dtype
// (fp16 by default, or bf16), then the op runs below the Autocast key. The casts go through
// at::autocast::cached_cast, so they are recorded by autograd (gradients reach fp32 parameters in
// fp32) and weight casts are cached for the region like torch's own.
//
// Registered for the forward ops that have CUDA kernels; backward ops are only called by autograd,
// outside autocast. Compiled only into CUDA builds (csrc/cuda/).
#include <ATen/autocast_mode.h>
#include <torch/library.h>
#include <torch/version.h>

namespace timerec::cuda {
namespace {

at::ScalarType autocast_cuda_dtype() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::autocast::get_autocast_dtype(at::kCUDA);
#else
  return at::autocast::get_autocast_gpu_dtype();
#endif
}

// Casts every eligible floating CUDA tensor argument to `dtype`, then runs the op below Autocast.
void autocast_cuda_cast_and_call(at::ScalarType dtype, const c10::OperatorHandle& op,
                                 torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  for (size_t i = stack->size() - num_args; i < stack->size(); ++i) {
    c10::IValue& value = (*stack)[i];
    if (value.isTensor()) {
      value = at::autocast::cached_cast(dtype, value.toTensor(), c10::DeviceType::CUDA);
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  op.callBoxed(stack);
}

// Lower-precision policy (autocast dtype), as torch does for its lstm/gru.
void autocast_cuda_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet /*ks*/,
                         torch::jit::Stack* stack) {
  autocast_cuda_cast_and_call(autocast_cuda_dtype(), op, stack);
}

// fp32 policy for the time-aware ops: their delta_t must share the input dtype, and elapsed times
// overflow fp16 (max 65504, under a day in seconds) or lose most digits in bf16, so inside an
// autocast region they run in fp32 (fp64 arguments stay fp64: autocast never casts those).
void autocast_cuda_fp32_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet /*ks*/,
                              torch::jit::Stack* stack) {
  autocast_cuda_cast_and_call(at::kFloat, op, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, AutocastCUDA, m) {
  m.impl("lstm_forward", torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_boxed>());
  m.impl("lstm_inference", torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_boxed>());
  m.impl("gru_forward", torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_boxed>());
  m.impl("gru_inference", torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_boxed>());
  m.impl("time_lstm_forward",
         torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_fp32_boxed>());
  m.impl("time_lstm_inference",
         torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_fp32_boxed>());
  m.impl("tlstm_forward", torch::CppFunction::makeFromBoxedFunction<&autocast_cuda_fp32_boxed>());
}

}  // namespace timerec::cuda
