// Every operator schema of the library, in one place. Device implementations register themselves
// with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; autograd and fake (meta) kernels are
// registered from Python in timerec_fast/ops.py.
//
// Each op runs ONE layer in ONE direction over the whole (packed) sequence:
//   input (N, I) time-major packed rows, batch_sizes (T,) int64 on the CPU (PackedSequence layout;
//   a padded (T, B) batch is batch_sizes = [B] * T), initial state (B, ...), and the layer's weights.
// Forward ops also return what their backward needs ("saved" outputs, never differentiated).
#include <torch/library.h>
#include <Python.h>

// Lets `import timerec_fast._C` load this library (and so run the registrations below).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(timerec_fast, m) {
  // LSTM (torch.nn.LSTM gate order i, f, g, o), with optional projection w_hr (proj_size).
  // Saved: gates = activated gates (N, 4H), cells = c_t (N, H), hpre = o * tanh(c) (N, H) when
  // projecting, else empty.
  m.def(
      "lstm_forward(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor hpre)");
  // The same forward for inference: nothing saved for a backward (no autograd formula). The
  // CPU kernel then keeps no (N, 4H) gate matrix; other devices run lstm_forward and drop it.
  m.def(
      "lstm_inference(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n)");
  // grad_input is empty when input_grad is false; grad_w_hr is empty without projection.
  m.def(
      "lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor output, Tensor gates, Tensor cells, Tensor hpre, bool reverse, bool input_grad) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");

  // GRU (torch.nn.GRU gate order r, z, n). Saved: gates = activated r, z, n (N, 3H) and
  // hn = h W_hn^T + b_hn (N, H), which r multiplies.
  m.def(
      "gru_forward(Tensor input, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor gates, Tensor hn)");
  // The same forward for inference (no autograd formula): the CPU kernel then writes neither
  // saved matrix; other devices run gru_forward and drop them.
  m.def(
      "gru_inference(Tensor input, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def(
      "gru_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor batch_sizes, "
      "Tensor h0, Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, Tensor hn, bool reverse, "
      "bool input_grad) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");

  // Time-LSTM (Zhu et al. 2017), variant 1, 2 or 3. delta_t (N,) holds each row's elapsed time.
  // Gate rows of w_ih / bias: variant 1 [i, f, g, o, t], 2 [i, f, g, o, t1, t2],
  // 3 [i, g, o, t1, t2]; w_hh covers only the gates that see h (the leading [i, f, g, o] or
  // [i, g, o]). peep (3, H) = [p_i, p_f, p_o] (p_f unused by variant 3), time_w (3, H) =
  // [w_t1, w_t2, w_o] (w_t2 unused by variant 1). Saved: activated gates (N, G), the carried
  // cells c (N, H) and, for variants 2 and 3, the output cells ct (N, H) (else empty).
  m.def(
      "time_lstm_forward(Tensor input, Tensor delta_t, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor peep, Tensor time_w, int variant, "
      "bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, "
      "Tensor cts)");
  // The same forward for inference (no autograd formula): with >= 16 rows a step the CPU kernel
  // writes no gates, cells or cts; other devices run time_lstm_forward and drop them.
  m.def(
      "time_lstm_inference(Tensor input, Tensor delta_t, Tensor batch_sizes, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor peep, Tensor time_w, "
      "int variant, bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "time_lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor delta_t, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor peep, Tensor time_w, Tensor output, Tensor gates, Tensor cells, Tensor cts, "
      "int variant, bool reverse, bool input_grad) -> (Tensor grad_input, Tensor grad_delta_t, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_peep, Tensor grad_time_w)");

  // T-LSTM (Baytas et al. 2017): LSTM (gates i, f, g, o) whose previous cell is first discounted,
  // c* = c - cs + cs / log(e + dt) with cs = tanh(c W_d^T + b_d). Saved: activated gates (N, 4H),
  // cells (N, H), cs (N, H).
  m.def(
      "tlstm_forward(Tensor input, Tensor delta_t, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor w_d, Tensor? b_d, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor cs)");
  m.def(
      "tlstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor delta_t, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor w_d, Tensor output, Tensor gates, Tensor cells, Tensor cs, bool reverse, "
      "bool input_grad) -> (Tensor grad_input, Tensor grad_delta_t, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_d, "
      "Tensor grad_b_d)");
}
