// Row-major GEMM through cuBLAS on the current stream and the current handle (which PyTorch has
// already bound to that stream, given its graph-safe workspace and set its TF32 math mode).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <cublas_v2.h>

namespace timerec::cuda {

template <typename T> struct CudaType;
template <> struct CudaType<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct CudaType<double> { static constexpr cudaDataType_t value = CUDA_R_64F; };
template <> struct CudaType<at::Half> { static constexpr cudaDataType_t value = CUDA_R_16F; };
template <> struct CudaType<at::BFloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

// Row-major C (M x N, row stride ldc) = alpha * op(A) op(B) + beta * C, where op(A) is M x K and
// op(B) is K x N; lda / ldb are the row strides of A and B as stored. A and B are T; C is T or
// at::opmath_type<T> (fp32 for half/bf16/float, fp64 for double): the accumulation is always in
// opmath precision (fp32 inputs use TF32 only when torch.backends.cuda.matmul.allow_tf32 is set).
template <typename T, typename C>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
             const T* B, int64_t ldb, C* Cp, int64_t ldc, bool accumulate = false) {
  if (M == 0 || N == 0) return;
  using Acc = at::opmath_type<T>;
  static_assert(std::is_same<C, T>::value || std::is_same<C, Acc>::value, "C must be T or opmath");
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasComputeType_t compute;
  if (std::is_same<T, double>::value) {
    compute = CUBLAS_COMPUTE_64F;
  } else if (std::is_same<T, float>::value && at::globalContext().allowTF32CuBLAS()) {
    compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  } else {
    compute = CUBLAS_COMPUTE_32F;
  }
  const Acc alpha = Acc(1), beta = accumulate ? Acc(1) : Acc(0);
  // Column-major view: C^T (N x M) = op(B)^T op(A)^T.
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B,
      CudaType<T>::value, static_cast<int>(ldb), A, CudaType<T>::value, static_cast<int>(lda),
      &beta, Cp, CudaType<C>::value, static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace timerec::cuda
