// Framework-independent activation functions shared by the CPU loops and the CUDA kernels.
//
// On the host, float uses branch-free polynomial exp/tanh (Cephes-style, ~1 ulp) so that the
// per-step gate loops vectorize; double uses the libm functions (fp64 is the reference/gradcheck
// precision). On the device, the CUDA libm functions are used for every type.
// NaN inputs give NaN outputs on every path (never clamped away).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TRF_HD __host__ __device__ __forceinline__
#else
#define TRF_HD inline __attribute__((always_inline))
#endif

namespace timerec {

#if !defined(__CUDA_ARCH__)
// Constants of the host float polynomials, also used by their AVX-512 versions
// (csrc/cpu/vec_activations.h).
namespace poly {
constexpr float kExpHi = 88.0f, kExpLo = -87.0f;  // exp's input clamp
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = 2.12194440e-4f;  // ln 2 = kLn2Hi - kLn2Lo
// e^r = 1 + r + r^2 (kExp[5] + r (kExp[4] + ... + r kExp[0]))
constexpr float kExp[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                           4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
constexpr float kTanhSmall = 0.625f;  // below: the odd polynomial, tanh(x) = x + x z P(z)
constexpr float kTanh[5] = {-5.70498872745E-3f, 2.06390887954E-2f, -5.37397155531E-2f,
                            1.33314422036E-1f, -3.33332819422E-1f};
}  // namespace poly

// exp(x) for float, vectorizable: range reduction x = n ln2 + r, degree-6 polynomial for e^r.
inline __attribute__((always_inline)) float exp_poly(float x) {
  float xc = x > poly::kExpHi ? poly::kExpHi : x;  // comparisons written so NaN passes through
  xc = xc < poly::kExpLo ? poly::kExpLo : xc;
  // Round to nearest with the 1.5 * 2^23 trick: vectorizes on any SSE level, unlike floorf.
  const float magic = 12582912.0f;
  float fx = (xc * poly::kLog2e + magic) - magic;
  float r = xc - fx * poly::kLn2Hi + fx * poly::kLn2Lo;
  float y = poly::kExp[0];
  y = y * r + poly::kExp[1];
  y = y * r + poly::kExp[2];
  y = y * r + poly::kExp[3];
  y = y * r + poly::kExp[4];
  y = y * r + poly::kExp[5];
  y = y * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(float));
  float result = y * pow2n;
  return x != x ? x : result;
}

inline __attribute__((always_inline)) float tanh_poly(float x) {
  float ax = std::fabs(x);
  // |x| < 0.625: odd polynomial (no cancellation near 0); else 1 - 2/(e^{2|x|}+1) with the sign.
  float z = x * x;
  float small = ((((poly::kTanh[0] * z + poly::kTanh[1]) * z + poly::kTanh[2]) * z +
                  poly::kTanh[3]) * z + poly::kTanh[4]) * z * x + x;
  float e = exp_poly(2.0f * ax);
  float large = 1.0f - 2.0f / (e + 1.0f);
  large = x < 0.0f ? -large : large;
  float result = ax < poly::kTanhSmall ? small : large;
  return x != x ? x : result;
}
#endif

TRF_HD float sigmoid_act(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + exp_poly(-x));
#endif
}

TRF_HD double sigmoid_act(double x) { return 1.0 / (1.0 + exp(-x)); }

TRF_HD float tanh_act(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return tanh_poly(x);
#endif
}

TRF_HD double tanh_act(double x) { return tanh(x); }

TRF_HD float exp_act(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_poly(x);
#endif
}

TRF_HD double exp_act(double x) { return exp(x); }

TRF_HD float log_act(float x) { return logf(x); }
TRF_HD double log_act(double x) { return log(x); }

}  // namespace timerec
