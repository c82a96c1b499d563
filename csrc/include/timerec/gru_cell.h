// GRU cell math for one hidden unit, shared by the CPU loop and the CUDA kernels.
//
// torch.nn.GRU gate order r, z, n:
//   r = sigmoid(x W_ir + b_ir + h W_hr + b_hr), z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
//   n = tanh(x W_in + b_in + r * (h W_hn + b_hn)),  h' = (1 - z) * n + z * h
// The input side (x W_ih^T + b_ih) and the hidden side (h W_hh^T + b_hh) arrive separately because
// r multiplies only the hidden part of n.
#pragma once

#include "activations.h"

namespace timerec {

// xr, xz, xn: input-side pre-activations, overwritten with r, z, n. hr, hz, hn: hidden side
// (biases included). Returns h'.
template <typename T>
TRF_HD T gru_cell_forward(T& xr, T& xz, T& xn, T hr, T hz, T hn, T h_prev) {
  xr = sigmoid_act(xr + hr);
  xz = sigmoid_act(xz + hz);
  xn = tanh_act(xn + xr * hn);
  return (T(1) - xz) * xn + xz * h_prev;
}

// dh: gradient reaching h'. Writes the gradients of the input-side pre-activations (dxr, dxz,
// dxn) and of the hidden side (the r and z parts equal dxr and dxz; dhn differs), and returns the
// part of dh_prev that bypasses W_hh (dh * z).
template <typename T>
TRF_HD T gru_cell_backward(T r, T z, T n, T hn, T h_prev, T dh, T& dxr, T& dxz, T& dxn, T& dhn) {
  const T dn = dh * (T(1) - z);
  const T dz = dh * (h_prev - n);
  dxn = dn * (T(1) - n * n);
  dhn = dxn * r;
  dxr = dxn * hn * r * (T(1) - r);
  dxz = dz * z * (T(1) - z);
  return dh * z;
}

}  // namespace timerec
