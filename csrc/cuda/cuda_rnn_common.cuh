// Small helpers shared by the CUDA layer files (lstm_cuda.cu, gru_cuda.cu, time_lstm_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace timerec::cuda {

constexpr int kThreads = 256;

// Grid size for a grid-stride loop over `work` elements.
inline int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8)));
}

// Accumulation dtype: fp64 for double, fp32 for float, half and bf16.
inline at::ScalarType opmath_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// Device, dtype and cuBLAS int-size checks shared by the CUDA ops of every cell.
inline void check_cuda_input(const at::Tensor& input, const char* cell, int64_t gate_rows) {
  TORCH_CHECK(input.is_cuda(), "timerec_fast.", cell, ": CUDA kernel called with input on ",
              input.device());
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "timerec_fast.", cell,
              " on CUDA supports float16, bfloat16, float32 and float64, got ", st);
  TORCH_CHECK(input.size(0) < (int64_t(1) << 31) && input.size(1) < (int64_t(1) << 31) &&
                  gate_rows < (int64_t(1) << 31),
              "timerec_fast.", cell, " on CUDA: sizes must fit cuBLAS int dimensions");
}

// Sum of the optional bias vectors in opmath precision (contiguous), or an undefined tensor.
inline at::Tensor opmath_bias(const c10::optional<at::Tensor>& a,
                              const c10::optional<at::Tensor>& b, at::ScalarType acc) {
  const bool has_a = a.has_value() && a->defined();
  const bool has_b = b.has_value() && b->defined();
  if (!has_a && !has_b) return at::Tensor();
  at::Tensor bias = has_a ? a->to(acc) : b->to(acc);
  if (has_a && has_b) bias = bias + b->to(acc);
  return bias.contiguous();
}

}  // namespace timerec::cuda
