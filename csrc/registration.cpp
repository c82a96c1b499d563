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
  // grad_input is empty when input_grad is false; grad_w_hr is empty without projection.
  m.def(
      "lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor output, Tensor gates, Tensor cells, Tensor hpre, bool reverse, bool input_grad) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
}
