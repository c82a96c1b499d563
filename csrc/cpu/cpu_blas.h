// Row-major GEMM on raw pointers for the per-step recurrent products.
//
// A per-step at::addmm costs several microseconds of dispatcher and tensor bookkeeping, which is
// most of a step at batch size 1. When the BLAS that libtorch links exports the Fortran symbols
// (MKL in the x86 wheels does), call it directly; otherwise fall back to at::addmm_ on views, so
// the extension never fails to load for a missing symbol.
#pragma once

#include <ATen/ATen.h>

#include "cpu_kernels.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace timerec::cpu {

inline bool fits_int(int64_t v) { return v <= static_cast<int64_t>(INT32_MAX); }

template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                   const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // op(A) is m x k: stored row-major as m x k (lda) or, transposed, as k x m (lda).
  at::Tensor A = trans_a ? at::from_blob(const_cast<T*>(a), {m, k}, {1, lda}, opts)
                         : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor B = trans_b ? at::from_blob(const_cast<T*>(b), {k, n}, {1, ldb}, opts)
                         : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    C.zero_();
  }
  C.addmm_(A, B, beta == T(0) ? T(1) : beta, alpha);
}

// C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C, all row-major.
// beta == 0 overwrites C (its old contents, NaN included, are ignored, as in BLAS).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
        .mul_(beta);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const bool small = fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
                     fits_int(ldc);
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr && small) {
      sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr && small) {
      dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
      return;
    }
  }
  gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---- input projection ------------------------------------------------------------------------
// gates = input @ W_ih^T + b_a + b_b for every step at once. Large products go to oneDNN's linear
// (what torch.nn.LSTM uses, the fastest large fp32 GEMM here); up to kDirectProjectionMacs
// multiply-adds, one direct BLAS call on bias-initialised rows instead, because oneDNN builds its
// primitive on every call (~10 us of descriptors and mallocs, a fifth of a B = 1 forward op).
constexpr int64_t kDirectProjectionMacs = int64_t{1} << 22;

inline at::Tensor cpu_input_projection(const at::Tensor& input, const at::Tensor& w_ih,
                                       const c10::optional<at::Tensor>& b_a,
                                       const c10::optional<at::Tensor>& b_b = c10::nullopt) {
  const bool has_a = b_a.has_value() && b_a->defined();
  const bool has_b = b_b.has_value() && b_b->defined();
  if (input.size(0) * w_ih.size(0) * w_ih.size(1) <= kDirectProjectionMacs) {
    const at::Tensor x = input.contiguous(), w = w_ih.contiguous();
    const at::Tensor ba = has_a ? b_a->contiguous() : at::Tensor();
    const at::Tensor bb = has_b ? b_b->contiguous() : at::Tensor();
    const int64_t N = x.size(0), G = w.size(0), I = w.size(1);
    at::Tensor out = at::empty({N, G}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "timerec_fast_input_projection", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      const scalar_t* pa = has_a ? ba.data_ptr<scalar_t>() : nullptr;
      const scalar_t* pb = has_b ? bb.data_ptr<scalar_t>() : nullptr;
      if (has_a || has_b) {  // every row starts as b_a + b_b; the GEMM accumulates onto it
        for (int64_t j = 0; j < G; ++j)
          o[j] = (pa != nullptr ? pa[j] : scalar_t(0)) + (pb != nullptr ? pb[j] : scalar_t(0));
        for (int64_t r = 1; r < N; ++r) std::memcpy(o + r * G, o, G * sizeof(scalar_t));
      }
      gemm<scalar_t>(false, true, N, G, I, scalar_t(1), x.data_ptr<scalar_t>(), I,
                     w.data_ptr<scalar_t>(), I, (has_a || has_b) ? scalar_t(1) : scalar_t(0), o, G);
    });
    return out;
  }
  static const c10::optional<c10::OperatorHandle> onednn_linear =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (!onednn_linear.has_value() || input.scalar_type() != at::kFloat ||
      !onednn_linear->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    return input_projection(input, w_ih, b_a, b_b);
  }
  c10::optional<at::Tensor> bias;
  if (has_a || has_b) bias = has_a && has_b ? *b_a + *b_b : (has_a ? *b_a : *b_b);
  torch::jit::Stack stack{input.contiguous(), w_ih.contiguous(), bias, std::string("none"),
                          c10::List<c10::optional<at::Scalar>>(),
                          c10::optional<std::string>(std::string(""))};
  onednn_linear->callBoxed(stack);
  return stack[0].toTensor().contiguous();
}

// ---- small-batch product ----------------------------------------------------------------------
// C[rows x n] (= or +=) A[rows x k] @ W[k x n], W row-major with leading dimension ldw. For a handful of rows a BLAS call
// costs more in fixed overhead than in arithmetic; this streams W once per group of rows, keeping
// a strip of C in registers. Used for the recurrent product when a step has few rows.

template <typename T, int R, int NB>
TRF_ALWAYS_INLINE void small_gemm_strip(const T* a, int64_t lda, const T* w, int64_t ldw, int64_t k,
                                        T* c, int64_t ldc, bool accumulate, int64_t n0, int64_t nb) {
  T acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NB; ++i) acc[r][i] = (accumulate && i < nb) ? c[r * ldc + n0 + i] : T(0);
  if (nb == NB) {
    for (int64_t kk = 0; kk < k; ++kk) {
      const T* wk = w + kk * ldw + n0;
      for (int r = 0; r < R; ++r) {
        const T av = a[r * lda + kk];
        for (int i = 0; i < NB; ++i) acc[r][i] += av * wk[i];
      }
    }
  } else {
    for (int64_t kk = 0; kk < k; ++kk) {
      const T* wk = w + kk * ldw + n0;
      for (int r = 0; r < R; ++r) {
        const T av = a[r * lda + kk];
        for (int i = 0; i < nb; ++i) acc[r][i] += av * wk[i];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < nb; ++i) c[r * ldc + n0 + i] = acc[r][i];
}

// 64-byte GCC vector types: one zmm, two ymm or four xmm depending on the clone being compiled.
typedef float vec64f __attribute__((vector_size(64)));
typedef double vec64d __attribute__((vector_size(64)));
template <typename T> struct Vec64;
template <> struct Vec64<float> { using type = vec64f; static constexpr int lanes = 16; };
template <> struct Vec64<double> { using type = vec64d; static constexpr int lanes = 8; };

// Full strip of NV vectors per row; 8 independent accumulators in total hide the FMA latency.
template <typename T, int R, int NV>
TRF_ALWAYS_INLINE void small_gemm_strip_vec(const T* a, int64_t lda, const T* w, int64_t ldw,
                                            int64_t k, T* c, int64_t ldc, bool accumulate,
                                            int64_t n0) {
  using V = typename Vec64<T>::type;
  constexpr int L = Vec64<T>::lanes;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      if (accumulate) std::memcpy(&acc[r][v], c + r * ldc + n0 + v * L, sizeof(V));
      else acc[r][v] = V{};
    }
  for (int64_t kk = 0; kk < k; ++kk) {
    const T* wk = w + kk * ldw + n0;
    V wv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&wv[v], wk + v * L, sizeof(V));
    for (int r = 0; r < R; ++r) {
      const T av = a[r * lda + kk];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(c + r * ldc + n0 + v * L, &acc[r][v], sizeof(V));
}

template <typename T, int R>
TRF_ALWAYS_INLINE void small_gemm_rows(const T* a, int64_t lda, const T* w, int64_t ldw, int64_t k,
                                       int64_t n, T* c, int64_t ldc, bool accumulate) {
  constexpr int NV = 8 / R;
  constexpr int L = Vec64<T>::lanes;
  int64_t n0 = 0;
  for (; n0 + NV * L <= n; n0 += NV * L)
    small_gemm_strip_vec<T, R, NV>(a, lda, w, ldw, k, c, ldc, accumulate, n0);
  if constexpr (NV > 4) {
    for (; n0 + 4 * L <= n; n0 += 4 * L)
      small_gemm_strip_vec<T, R, 4>(a, lda, w, ldw, k, c, ldc, accumulate, n0);
  }
  if constexpr (NV > 2) {
    for (; n0 + 2 * L <= n; n0 += 2 * L)
      small_gemm_strip_vec<T, R, 2>(a, lda, w, ldw, k, c, ldc, accumulate, n0);
  }
  for (; n0 < n; n0 += L)
    small_gemm_strip<T, R, L>(a, lda, w, ldw, k, c, ldc, accumulate, n0,
                              std::min<int64_t>(L, n - n0));
}

template <typename T>
TRF_ALWAYS_INLINE void small_gemm_impl(int64_t rows, int64_t k, int64_t n, const T* a, int64_t lda,
                                       const T* w, int64_t ldw, T* c, int64_t ldc,
                                       bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    small_gemm_rows<T, 4>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
  for (; r + 2 <= rows; r += 2)
    small_gemm_rows<T, 2>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
  for (; r < rows; ++r)
    small_gemm_rows<T, 1>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
}

TRF_CPU_CLONES static void small_gemm(int64_t rows, int64_t k, int64_t n, const float* a,
                                      int64_t lda, const float* w, int64_t ldw, float* c, int64_t ldc,
                                      bool accumulate) {
  small_gemm_impl<float>(rows, k, n, a, lda, w, ldw, c, ldc, accumulate);
}

TRF_CPU_CLONES static void small_gemm(int64_t rows, int64_t k, int64_t n, const double* a,
                                      int64_t lda, const double* w, int64_t ldw, double* c, int64_t ldc,
                                      bool accumulate) {
  small_gemm_impl<double>(rows, k, n, a, lda, w, ldw, c, ldc, accumulate);
}

// ---- small-batch product on W as PyTorch stores it ---------------------------------------------
// C[rows x n] (= or +=) A[rows x k] @ W^T, W (n x k) row-major with leading dimension ldw: the
// forward's recurrent product read straight from the weight, so no call pays for a W^T copy first
// (~15 us for a (4H, H) fp32 weight at H = 128: the whole op at T = 1). Each output is a dot
// product over k. L accumulators (one vector each; L = lanes, 16 fp32 or 8 fp64) hold R rows x
// L / R outputs, and a transpose-and-add tree folds them into one vector of L results; k beyond
// the last full vector is added in scalar.
#if defined(__GNUC__) && !defined(__clang__)
template <typename T> struct LaneIndex;
template <> struct LaneIndex<float> { typedef int32_t type __attribute__((vector_size(64))); };
template <> struct LaneIndex<double> { typedef int64_t type __attribute__((vector_size(64))); };

// [pairwise sums of x's lanes | pairwise sums of y's lanes]
template <typename T>
TRF_ALWAYS_INLINE typename Vec64<T>::type fold_pairs(typename Vec64<T>::type x,
                                                     typename Vec64<T>::type y) {
  constexpr int L = Vec64<T>::lanes;
  typename LaneIndex<T>::type even, odd;
  for (int j = 0; j < L / 2; ++j) {
    even[j] = 2 * j;
    odd[j] = 2 * j + 1;
    even[j + L / 2] = L + 2 * j;
    odd[j + L / 2] = L + 2 * j + 1;
  }
  return __builtin_shuffle(x, y, even) + __builtin_shuffle(x, y, odd);
}

// Lane i of the result = the sum of v[i]'s lanes (v is overwritten).
template <typename T>
TRF_ALWAYS_INLINE typename Vec64<T>::type sum_each(typename Vec64<T>::type* v) {
  constexpr int L = Vec64<T>::lanes;
  for (int width = L; width > 1; width /= 2)
    for (int i = 0; i < width / 2; ++i) v[i] = fold_pairs<T>(v[2 * i], v[2 * i + 1]);
  return v[0];
}
#endif

template <typename T, int R>
TRF_ALWAYS_INLINE void small_gemm_nt_rows(const T* a, int64_t lda, const T* w, int64_t ldw,
                                          int64_t k, int64_t n, T* c, int64_t ldc,
                                          bool accumulate) {
  using V = typename Vec64<T>::type;
  constexpr int L = Vec64<T>::lanes;
  constexpr int NB = L / R;  // outputs per row per block
#if defined(__GNUC__) && !defined(__clang__)
  const int64_t k_full = k - k % L;
#else
  const int64_t k_full = 0;
#endif
  for (int64_t n0 = 0; n0 < n; n0 += NB) {
    const int64_t nb = std::min<int64_t>(NB, n - n0);
    const T* wr[NB];  // a ragged last block repeats its last row and drops the extra results
    for (int j = 0; j < NB; ++j) wr[j] = w + (n0 + std::min<int64_t>(j, nb - 1)) * ldw;
    T sums[L] = {};
#if defined(__GNUC__) && !defined(__clang__)
    if (k_full > 0) {
      V acc[L];  // acc[r * NB + j]: row r, output n0 + j
      for (int i = 0; i < L; ++i) acc[i] = V{};
      for (int64_t kk = 0; kk < k_full; kk += L) {
        V av[R];
        for (int r = 0; r < R; ++r) std::memcpy(&av[r], a + r * lda + kk, sizeof(V));
        for (int j = 0; j < NB; ++j) {
          V wv;
          std::memcpy(&wv, wr[j] + kk, sizeof(V));
          for (int r = 0; r < R; ++r) acc[r * NB + j] += av[r] * wv;
        }
      }
      const V total = sum_each<T>(acc);
      std::memcpy(sums, &total, sizeof(V));
    }
#endif
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < nb; ++j) {
        T v = sums[r * NB + j];
        for (int64_t kk = k_full; kk < k; ++kk) v += a[r * lda + kk] * wr[j][kk];
        T* dst = c + r * ldc + n0 + j;
        *dst = accumulate ? *dst + v : v;
      }
  }
}

template <typename T>
TRF_ALWAYS_INLINE void small_gemm_nt_impl(int64_t rows, int64_t k, int64_t n, const T* a,
                                          int64_t lda, const T* w, int64_t ldw, T* c, int64_t ldc,
                                          bool accumulate) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8)
    small_gemm_nt_rows<T, 8>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
  for (; r + 4 <= rows; r += 4)
    small_gemm_nt_rows<T, 4>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
  for (; r + 2 <= rows; r += 2)
    small_gemm_nt_rows<T, 2>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
  for (; r < rows; ++r)
    small_gemm_nt_rows<T, 1>(a + r * lda, lda, w, ldw, k, n, c + r * ldc, ldc, accumulate);
}

TRF_CPU_CLONES static void small_gemm_nt(int64_t rows, int64_t k, int64_t n, const float* a,
                                         int64_t lda, const float* w, int64_t ldw, float* c,
                                         int64_t ldc, bool accumulate) {
  small_gemm_nt_impl<float>(rows, k, n, a, lda, w, ldw, c, ldc, accumulate);
}

TRF_CPU_CLONES static void small_gemm_nt(int64_t rows, int64_t k, int64_t n, const double* a,
                                         int64_t lda, const double* w, int64_t ldw, double* c,
                                         int64_t ldc, bool accumulate) {
  small_gemm_nt_impl<double>(rows, k, n, a, lda, w, ldw, c, ldc, accumulate);
}

// Steps with at most this many rows use small_gemm instead of BLAS.
constexpr int64_t kSmallGemmRows = 8;

// C (+)= A @ W where W is given both as W (k x n, row-major) for small_gemm and as the BLAS
// operand. `w_kn` must be the k x n row-major matrix.
template <typename T>
void recurrent_gemm(int64_t rows, int64_t k, int64_t n, const T* a, int64_t lda, const T* w_kn,
                    T* c, int64_t ldc, bool accumulate) {
  if (rows <= 0) return;
  if (rows <= kSmallGemmRows) {
    small_gemm(rows, k, n, a, lda, w_kn, n, c, ldc, accumulate);
  } else {
    gemm<T>(false, false, rows, n, k, T(1), a, lda, w_kn, n, accumulate ? T(1) : T(0), c, ldc);
  }
}

// C (+)= A @ W^T with W (n x k) row-major as PyTorch stores it (the forward's recurrent product).
template <typename T>
void recurrent_gemm_nt(int64_t rows, int64_t k, int64_t n, const T* a, int64_t lda, const T* w_nk,
                       T* c, int64_t ldc, bool accumulate) {
  if (rows <= 0) return;
  if (rows <= kSmallGemmRows) {
    small_gemm_nt(rows, k, n, a, lda, w_nk, k, c, ldc, accumulate);
  } else {
    gemm<T>(false, true, rows, n, k, T(1), a, lda, w_nk, k, accumulate ? T(1) : T(0), c, ldc);
  }
}

}  // namespace timerec::cpu
