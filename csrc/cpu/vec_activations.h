// AVX-512 versions of the host float activations of csrc/include/timerec/activations.h, on 16
// floats at once: the same input clamp, range reduction and polynomials (timerec::poly), with two
// steps the compiler cannot find in the scalar code:
//   * 2^n applied by vscalefps (the scalar code builds it from the exponent bits: 4 instructions);
//   * 1/d from a 14-bit reciprocal estimate and one Newton step (relative error ~2^-28 before the
//     final rounding, within an ulp of the division) instead of vdivps, which issues one zmm
//     division every ~8 cycles on one port.
// NaN in gives NaN out (vminps/vmaxps return their second operand, x, when it is NaN).
// The fused LSTM forward applies the cell to each tile with these (LstmFusedEpilogueAvx512): the
// gate math was ~20% of its loop at (256, 50, 128, 128), ~37 instructions per sigmoid. In one
// process alternating with the scalar epilogue, 2 threads, median of 16-30 pairs: forward
// (256, 50, 64, 64) 1.08-1.09x, (256, 50, 128, 128) 1.04x, (64, 200, 128, 256) 1.02x, B = 1
// 1.04x; training (256, 50, 64, 64) 1.03x, (256, 50, 128, 128) 1.01x. The GRU's
// (GruFusedEpilogueAvx512, gru_cpu.cpp), the same way: forward (256, 50, 64, 64) 1.09x,
// (256, 50, 128, 128) 1.06x, training at 128 1.01x. Over 2^20 inputs in
// [-120, 120] plus NaN, +-inf, +-0 and the branch edges, against the fp64 functions: at most 2.38
// ulp (sigmoid) and 1.29 ulp (tanh) wherever the result is above 2e-38, the same as the scalar
// code; sigmoid below -87 returns 1.6e-38 (the scalar code a subnormal).
#pragma once

#include "../include/timerec/activations.h"
#include "../include/timerec/time_lstm_cell.h"  // kTimeLstm1..3
#include "gate_panels.h"  // TRF_HAVE_PANELS, TRF_TARGET_AVX512

#if TRF_HAVE_PANELS
#include <immintrin.h>

namespace timerec::cpu::vec {

#define TRF_VEC_INLINE TRF_TARGET_AVX512 __attribute__((always_inline)) inline

// All lanes. The zero-masked forms of min/max/rcp14/scalef/roundscale are used because GCC 12's
// unmasked ones pass _mm512_undefined_ps() through and warn -Wmaybe-uninitialized at every use.
constexpr __mmask16 kAll = 0xFFFF;

TRF_VEC_INLINE __m512 exp16(__m512 x) {
  __m512 xc = _mm512_maskz_min_ps(kAll, _mm512_set1_ps(poly::kExpHi), x);
  xc = _mm512_maskz_max_ps(kAll, _mm512_set1_ps(poly::kExpLo), xc);
  const __m512 n = _mm512_maskz_roundscale_ps(kAll, _mm512_mul_ps(xc, _mm512_set1_ps(poly::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(poly::kLn2Hi), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(poly::kLn2Lo), r);
  __m512 y = _mm512_set1_ps(poly::kExp[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(poly::kExp[i]));
  y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(kAll, y, n);
}

TRF_VEC_INLINE __m512 recip16(__m512 d) {
  const __m512 r = _mm512_maskz_rcp14_ps(kAll, d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
}

// Inputs are clamped so that no intermediate is subnormal (each subnormal operand or result costs a
// microcode assist, ~100 cycles: a saturated tanh measured 15x slower before): sigmoid's below
// -87 (results < 1.7e-38 there, the scalar code's are < 1e-38), tanh's |x| above 20 (tanh is
// 1.0f from |x| > 9.1 on).
TRF_VEC_INLINE __m512 sigmoid16(__m512 x) {
  const __m512 x_min = _mm512_maskz_max_ps(kAll, _mm512_set1_ps(-87.0f), x);
  const __m512 neg_x = _mm512_sub_ps(_mm512_setzero_ps(), x_min);
  return recip16(_mm512_add_ps(_mm512_set1_ps(1.0f), exp16(neg_x)));
}

TRF_VEC_INLINE __m512 tanh16(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 ax = _mm512_andnot_ps(sign, x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(poly::kTanh[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(poly::kTanh[i]));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __m512 e = exp16(_mm512_maskz_min_ps(kAll, _mm512_set1_ps(40.0f), _mm512_add_ps(ax, ax)));
  __m512 large = _mm512_fnmadd_ps(_mm512_set1_ps(2.0f),
                                  recip16(_mm512_add_ps(e, _mm512_set1_ps(1.0f))),
                                  _mm512_set1_ps(1.0f));
  large = _mm512_or_ps(large, _mm512_and_ps(x, sign));  // tanh is odd
  const __mmask16 is_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(poly::kTanhSmall), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, large, small);
}

// timerec::lstm_cell_forward (csrc/include/timerec/lstm_cell.h) on 16 units: the gates are
// overwritten with their activations, c and h returned.
TRF_VEC_INLINE void lstm_cell_forward16(__m512& i, __m512& f, __m512& g, __m512& o, __m512 c_prev,
                                        __m512& c, __m512& h) {
  i = sigmoid16(i);
  f = sigmoid16(f);
  g = tanh16(g);
  o = sigmoid16(o);
  c = _mm512_add_ps(_mm512_mul_ps(f, c_prev), _mm512_mul_ps(i, g));
  h = _mm512_mul_ps(o, tanh16(c));
}

// timerec::gru_cell_forward (csrc/include/timerec/gru_cell.h) on 16 units: x* are the input-side
// pre-activations (overwritten with r, z, n), h* the hidden side; returns h'.
TRF_VEC_INLINE __m512 gru_cell_forward16(__m512& xr, __m512& xz, __m512& xn, __m512 hr, __m512 hz,
                                         __m512 hn, __m512 h_prev) {
  xr = sigmoid16(_mm512_add_ps(xr, hr));
  xz = sigmoid16(_mm512_add_ps(xz, hz));
  xn = tanh16(_mm512_add_ps(xn, _mm512_mul_ps(xr, hn)));
  return _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), xz), xn),
                       _mm512_mul_ps(xz, h_prev));
}

// The per-unit vectors of timerec::TimeLstmUnitWeights (csrc/include/timerec/time_lstm_cell.h)
// for 16 units.
struct TimeLstmUnitWeights16 {
  __m512 p_i, p_f, p_o, w_t1, w_t2, w_o;
};

// peep and time_w are (3, H): rows (p_i, p_f, p_o) and (w_t1, w_t2, w_o).
TRF_VEC_INLINE TimeLstmUnitWeights16 load_time_unit_weights16(const float* peep,
                                                              const float* time_w, int64_t H,
                                                              int64_t j) {
  return {_mm512_loadu_ps(peep + j),         _mm512_loadu_ps(peep + H + j),
          _mm512_loadu_ps(peep + 2 * H + j), _mm512_loadu_ps(time_w + j),
          _mm512_loadu_ps(time_w + H + j),   _mm512_loadu_ps(time_w + 2 * H + j)};
}

// timerec::time_lstm_cell_forward on 16 units, variant V (kTimeLstm1..3): the same operations.
// Gates are overwritten with their activations (f = 0 in variant 3, t2 = t1 in variant 1, as the
// scalar code leaves them).
template <int V>
TRF_VEC_INLINE void time_lstm_cell_forward16(__m512& i, __m512& f, __m512& g, __m512& o,
                                             __m512& t1, __m512& t2, __m512 c, __m512 dt,
                                             const TimeLstmUnitWeights16& w, __m512& c_next,
                                             __m512& ct, __m512& h) {
  i = sigmoid16(_mm512_fmadd_ps(w.p_i, c, i));
  g = tanh16(g);
  t1 = sigmoid16(_mm512_add_ps(t1, sigmoid16(_mm512_mul_ps(dt, w.w_t1))));
  if constexpr (V == kTimeLstm3) {
    f = _mm512_setzero_ps();
    t2 = sigmoid16(_mm512_add_ps(t2, sigmoid16(_mm512_mul_ps(dt, w.w_t2))));
    ct = _mm512_fmadd_ps(_mm512_mul_ps(i, t1), _mm512_sub_ps(g, c), c);
    c_next = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), i), c,
                             _mm512_mul_ps(_mm512_mul_ps(i, t2), g));
  } else {
    f = sigmoid16(_mm512_fmadd_ps(w.p_f, c, f));
    const __m512 fc = _mm512_mul_ps(f, c);
    ct = _mm512_fmadd_ps(_mm512_mul_ps(i, t1), g, fc);
    if constexpr (V == kTimeLstm1) {
      t2 = t1;
      c_next = ct;
    } else {
      t2 = sigmoid16(_mm512_add_ps(t2, sigmoid16(_mm512_mul_ps(dt, w.w_t2))));
      c_next = _mm512_fmadd_ps(_mm512_mul_ps(i, t2), g, fc);
    }
  }
  o = sigmoid16(_mm512_fmadd_ps(w.p_o, ct, _mm512_fmadd_ps(dt, w.w_o, o)));
  h = _mm512_mul_ps(o, tanh16(ct));
}

#undef TRF_VEC_INLINE

}  // namespace timerec::cpu::vec
#endif
