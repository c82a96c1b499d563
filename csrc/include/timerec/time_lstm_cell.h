// Time-aware LSTM cell math for one hidden unit, shared by the CPU loop and the CUDA kernels.
//
// Time-LSTM (Zhu et al., IJCAI 2017), dt = elapsed time of the step, c = c_{t-1}:
//   i  = sigmoid(a_i + p_i c)              f = sigmoid(a_f + p_f c)      g = tanh(a_g)
//   T1 = sigmoid(a_t1 + sigmoid(dt w_t1))  T2 = sigmoid(a_t2 + sigmoid(dt w_t2))
//   variant 1: one time gate T (= T1 = T2);      c' = f c + i T g;        ct = c'
//   variant 2: ct = f c + i T1 g;                 c' = f c + i T2 g
//   variant 3: no forget gate, coupled with i:    ct = (1 - i T1) c + i T1 g;  c' = (1 - i) c + i T2 g
//   o  = sigmoid(a_o + dt w_o + p_o ct),   h = o tanh(ct);   c' is carried to the next step.
// a_* are the GEMM pre-activations x W_ih^T + h W_hh^T + b (time gates have no h term).
//
// T-LSTM (Baytas et al., KDD 2017): the short-term memory of c_{t-1} is discounted before an
// ordinary LSTM step: cs = tanh(W_d c + b_d), c* = c - cs + cs g(dt), g(dt) = 1 / log(e + dt).
#pragma once

#include "activations.h"

namespace timerec {

enum TimeLstmVariant : int { kTimeLstm1 = 1, kTimeLstm2 = 2, kTimeLstm3 = 3 };

// Column blocks (in units of H) of each gate inside a gates row; -1 when the variant lacks it.
// Gates that see h come first, so the recurrent GEMM writes one contiguous prefix of the row.
// Rows of w_ih / bias: variant 1 [i, f, g, o, t], 2 [i, f, g, o, t1, t2], 3 [i, g, o, t1, t2].
struct TimeLstmLayout {
  int i, f, g, o, t1, t2;
  int h_gates, gates;
};

TRF_HD constexpr TimeLstmLayout time_lstm_layout(int variant) {
  return variant == kTimeLstm1   ? TimeLstmLayout{0, 1, 2, 3, 4, -1, 4, 5}
         : variant == kTimeLstm2 ? TimeLstmLayout{0, 1, 2, 3, 4, 5, 4, 6}
                                 : TimeLstmLayout{0, -1, 1, 2, 3, 4, 3, 5};
}

// Per-unit weights that are vectors, not matrices.
template <typename T>
struct TimeLstmUnitWeights {
  T p_i, p_f, p_o;   // peepholes (p_f unused in variant 3)
  T w_t1, w_t2, w_o; // time weights (w_t2 unused in variant 1)
};

// Activated gates of one unit (what the backward needs, with c and ct).
template <typename T>
struct TimeLstmGates {
  T i, f, g, o, t1, t2;
};

// In: pre-activations in `a` (f ignored in variant 3, t2 ignored in variant 1). Out: activations in
// `a`, the carried cell c_next, the output cell ct and h.
template <typename T>
TRF_HD void time_lstm_cell_forward(int variant, TimeLstmGates<T>& a, T c, T dt,
                                   const TimeLstmUnitWeights<T>& w, T& c_next, T& ct, T& h) {
  a.i = sigmoid_act(a.i + w.p_i * c);
  a.g = tanh_act(a.g);
  a.t1 = sigmoid_act(a.t1 + sigmoid_act(dt * w.w_t1));
  if (variant == kTimeLstm3) {
    a.f = T(0);
    a.t2 = sigmoid_act(a.t2 + sigmoid_act(dt * w.w_t2));
    ct = c + a.i * a.t1 * (a.g - c);
    c_next = (T(1) - a.i) * c + a.i * a.t2 * a.g;
  } else {
    a.f = sigmoid_act(a.f + w.p_f * c);
    a.t2 = variant == kTimeLstm1 ? a.t1 : sigmoid_act(a.t2 + sigmoid_act(dt * w.w_t2));
    ct = a.f * c + a.i * a.t1 * a.g;
    c_next = variant == kTimeLstm1 ? ct : a.f * c + a.i * a.t2 * a.g;
  }
  a.o = sigmoid_act(a.o + dt * w.w_o + w.p_o * ct);
  h = a.o * tanh_act(ct);
}

// dh: gradient reaching h; dc_next: gradient reaching the carried cell c_next. Writes the
// gradients of the pre-activations into `d` and returns the gradient reaching c (= c_{t-1}).
// Gradients of the per-unit vectors and of dt are reductions of these, done after the loop.
template <typename T>
TRF_HD T time_lstm_cell_backward(int variant, const TimeLstmGates<T>& a, T c, T ct, T dh,
                                 T dc_next, const TimeLstmUnitWeights<T>& w,
                                 TimeLstmGates<T>& d) {
  const T tct = tanh_act(ct);
  d.o = dh * tct * a.o * (T(1) - a.o);
  T dct = dh * a.o * (T(1) - tct * tct) + d.o * w.p_o;
  T dcn = dc_next;
  if (variant == kTimeLstm1) {  // ct and c_next are the same cell
    dct += dcn;
    dcn = T(0);
  }
  T di, dt1, dt2, dc;
  if (variant == kTimeLstm3) {
    // ct = c + i T1 (g - c);  c_next = (1 - i) c + i T2 g
    const T gc = a.g - c;
    di = dct * a.t1 * gc + dcn * (a.t2 * a.g - c);
    d.g = (dct * a.t1 + dcn * a.t2) * a.i * (T(1) - a.g * a.g);
    dt1 = dct * a.i * gc;
    dt2 = dcn * a.i * a.g;
    dc = dct * (T(1) - a.i * a.t1) + dcn * (T(1) - a.i);
    d.f = T(0);
  } else {
    const T df = (dct + dcn) * c;
    di = (dct * a.t1 + dcn * a.t2) * a.g;
    d.g = (dct * a.t1 + dcn * a.t2) * a.i * (T(1) - a.g * a.g);
    dt1 = dct * a.i * a.g;
    dt2 = dcn * a.i * a.g;
    dc = (dct + dcn) * a.f;
    d.f = df * a.f * (T(1) - a.f);
    dc += d.f * w.p_f;
  }
  d.i = di * a.i * (T(1) - a.i);
  dc += d.i * w.p_i;
  d.t1 = dt1 * a.t1 * (T(1) - a.t1);
  d.t2 = variant == kTimeLstm1 ? T(0) : dt2 * a.t2 * (T(1) - a.t2);
  return dc;
}

// T-LSTM time decay g(dt) = 1 / log(e + dt) and its derivative.
template <typename T>
TRF_HD T tlstm_decay(T dt) {
  return T(1) / log_act(T(2.718281828459045) + dt);
}

template <typename T>
TRF_HD T tlstm_decay_grad(T dt) {
  const T l = log_act(T(2.718281828459045) + dt);
  return -T(1) / (l * l * (T(2.718281828459045) + dt));
}

// T-LSTM: the discounted previous cell c* from c_{t-1} and cs = tanh(W_d c_{t-1} + b_d).
template <typename T>
TRF_HD T tlstm_adjusted_cell(T c, T cs, T decay) {
  return c - cs + cs * decay;
}

}  // namespace timerec
