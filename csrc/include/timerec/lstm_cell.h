// LSTM cell math for one hidden unit, shared by the CPU loop and the CUDA kernels.
//
// Gate order follows torch.nn.LSTM: i, f, g, o. Pre-activations arrive as x W_ih^T + b_ih + b_hh
// + h W_hh^T; the forward overwrites them in place with the activations, which is exactly what the
// backward needs (together with c_prev and c).
#pragma once

#include "activations.h"

namespace timerec {

template <typename T>
TRF_HD void lstm_cell_forward(T& i, T& f, T& g, T& o, T c_prev, T& c, T& h) {
  i = sigmoid_act(i);
  f = sigmoid_act(f);
  g = tanh_act(g);
  o = sigmoid_act(o);
  c = f * c_prev + i * g;
  h = o * tanh_act(c);
}

// dh: gradient reaching h_t (from the output and from step t+1); dc: gradient reaching c_t from
// step t+1 (and c_n). Writes the pre-activation gate gradients and the gradient flowing to c_{t-1}.
template <typename T>
TRF_HD void lstm_cell_backward(T i, T f, T g, T o, T c_prev, T c, T dh, T dc,
                               T& di, T& df, T& dg, T& d_o, T& dc_prev) {
  const T tc = tanh_act(c);
  dc = dc + dh * o * (T(1) - tc * tc);
  d_o = dh * tc * o * (T(1) - o);
  di = dc * g * i * (T(1) - i);
  df = dc * c_prev * f * (T(1) - f);
  dg = dc * i * (T(1) - g * g);
  dc_prev = dc * f;
}

}  // namespace timerec
