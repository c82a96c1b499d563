// Host-side helpers shared by every cell and device: the packed-sequence schedule and argument checks.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "include/timerec/time_lstm_cell.h"

namespace timerec {

// cuDNN-style packed layout: step t owns rows [offset[t], offset[t] + batch_sizes[t]) of the
// (N, features) data, batch_sizes non-increasing. A padded time-major (T, B) batch is the special
// case batch_sizes = [B] * T, so one code path serves both and no compute is spent on padding.
struct Schedule {
  std::vector<int64_t> batch_sizes;
  std::vector<int64_t> offsets;
  int64_t steps = 0;
  int64_t rows = 0;
  int64_t batch = 0;
  bool reverse = false;

  // Time index of the k-th processed step.
  int64_t time_at(int64_t k) const { return reverse ? steps - 1 - k : k; }
  // How many rows of the k-th processed step continue a sequence from the step processed before
  // it; the remaining rows start from the initial state.
  int64_t carried_rows(int64_t k) const {
    if (k == 0) return 0;
    return std::min(batch_sizes[time_at(k)], batch_sizes[time_at(k - 1)]);
  }
};

inline Schedule make_schedule(const at::Tensor& batch_sizes, int64_t rows, int64_t batch,
                              bool reverse) {
  TORCH_CHECK(batch_sizes.dim() == 1,
              "timerec_fast: batch_sizes must be 1-D, got ", batch_sizes.dim(), "-D");
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong,
              "timerec_fast: batch_sizes must be an int64 CPU tensor (as in PackedSequence), got ",
              batch_sizes.scalar_type(), " on ", batch_sizes.device());
  Schedule s;
  s.steps = batch_sizes.size(0);
  s.rows = rows;
  s.batch = batch;
  s.reverse = reverse;
  auto bs = batch_sizes.contiguous();
  const int64_t* p = bs.data_ptr<int64_t>();
  s.batch_sizes.assign(p, p + s.steps);
  s.offsets.resize(s.steps);
  int64_t total = 0;
  for (int64_t t = 0; t < s.steps; ++t) {
    TORCH_CHECK(p[t] > 0, "timerec_fast: batch_sizes must be positive (empty sequences are not "
                "allowed), got batch_sizes[", t, "] = ", p[t]);
    TORCH_CHECK(t == 0 || p[t] <= p[t - 1],
                "timerec_fast: batch_sizes must be non-increasing, got batch_sizes[", t - 1,
                "] = ", p[t - 1], " < batch_sizes[", t, "] = ", p[t]);
    s.offsets[t] = total;
    total += p[t];
  }
  TORCH_CHECK(total == rows, "timerec_fast: batch_sizes sum to ", total,
              " but the input has ", rows, " rows");
  TORCH_CHECK(s.steps == 0 || p[0] == batch, "timerec_fast: batch_sizes[0] = ",
              s.steps ? p[0] : 0, " must equal the batch size of the initial state, ", batch);
  return s;
}

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                         const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "timerec_fast: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "timerec_fast: ", name, " must have dtype ",
              like.scalar_type(), " like the input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "timerec_fast: ", name, " must be on ", like.device(),
              " like the input, got ", t.device());
}

inline void check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t size,
                         const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, "timerec_fast: ", name,
              " must have shape (", size, "), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == like.scalar_type() && t->device() == like.device(),
              "timerec_fast: ", name, " must be ", like.scalar_type(), " on ", like.device(),
              ", got ", t->scalar_type(), " on ", t->device());
}

// Gradient tensors from autograd may be absent (None) when an output was not used.
inline at::Tensor grad_or_zeros(const c10::optional<at::Tensor>& g, at::IntArrayRef shape,
                                const at::Tensor& like) {
  if (g.has_value() && g->defined()) return g->contiguous();
  return at::zeros(shape, like.options());
}

// The input projection of every step as one GEMM: input (N, I) @ w_ih^T + (b_a + b_b), contiguous.
inline at::Tensor input_projection(const at::Tensor& input, const at::Tensor& w_ih,
                                   const c10::optional<at::Tensor>& b_a,
                                   const c10::optional<at::Tensor>& b_b = c10::nullopt) {
  const bool has_a = b_a.has_value() && b_a->defined();
  const bool has_b = b_b.has_value() && b_b->defined();
  if (!has_a && !has_b) return at::mm(input, w_ih.t()).contiguous();
  at::Tensor bias = has_a && has_b ? *b_a + *b_b : (has_a ? *b_a : *b_b);
  return at::addmm(bias, input, w_ih.t()).contiguous();
}

inline void check_rows_input(const at::Tensor& input, const char* cell) {
  TORCH_CHECK(input.dim() == 2, "timerec_fast.", cell, ": input must be 2-D (rows, features), got ",
              input.sizes());
  // torch.nn refuses input_size 0 too; the fused CPU forwards would read an empty W_ih panel.
  TORCH_CHECK(input.size(1) > 0, "timerec_fast.", cell,
              ": input must have at least one feature per row (input_size > 0), got shape ",
              input.sizes());
}

inline void check_delta_t(const at::Tensor& delta_t, const at::Tensor& input) {
  TORCH_CHECK(delta_t.dim() == 1 && delta_t.size(0) == input.size(0),
              "timerec_fast: delta_t must have one value per input row, shape (", input.size(0),
              "), got ", delta_t.sizes());
  TORCH_CHECK(delta_t.scalar_type() == input.scalar_type() && delta_t.device() == input.device(),
              "timerec_fast: delta_t must be ", input.scalar_type(), " on ", input.device(),
              " like the input, got ", delta_t.scalar_type(), " on ", delta_t.device());
}

// ---- per-cell argument checks, shared by the CPU and CUDA ops --------------------------------
// device_check(H) runs once the state width H is known and before the shape checks: each device
// checks its dtypes (and, on CUDA, the cuBLAS int limits) there.

struct LstmShapes {
  int64_t N, I, B, H, P;
  bool proj;
};

template <typename DeviceCheck>
LstmShapes check_lstm_shapes(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const c10::optional<at::Tensor>& w_hr,
                             const DeviceCheck& device_check) {
  check_rows_input(input, "LSTM");
  TORCH_CHECK(h0.dim() == 2 && c0.dim() == 2, "timerec_fast.lstm: h0 and c0 must be 2-D, got ",
              h0.sizes(), " and ", c0.sizes());
  LstmShapes d;
  d.N = input.size(0);
  d.I = input.size(1);
  d.B = h0.size(0);
  d.H = c0.size(1);
  device_check(d.H);
  d.proj = w_hr.has_value() && w_hr->defined();
  d.P = d.proj ? w_hr->size(0) : d.H;
  check_matrix(h0, "h0", d.B, d.P, input);
  check_matrix(c0, "c0", d.B, d.H, input);
  check_matrix(w_ih, "w_ih", 4 * d.H, d.I, input);
  check_matrix(w_hh, "w_hh", 4 * d.H, d.P, input);
  if (d.proj) check_matrix(*w_hr, "w_hr", d.P, d.H, input);
  return d;
}

// Returns H.
template <typename DeviceCheck>
int64_t check_gru_shapes(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const DeviceCheck& device_check) {
  check_rows_input(input, "GRU");
  TORCH_CHECK(h0.dim() == 2, "timerec_fast.GRU: h0 must be 2-D, got ", h0.sizes());
  const int64_t H = h0.size(1);
  device_check(H);
  check_matrix(w_ih, "w_ih", 3 * H, input.size(1), input);
  check_matrix(w_hh, "w_hh", 3 * H, H, input);
  check_matrix(h0, "h0", h0.size(0), H, input);
  return H;
}

inline TimeLstmLayout checked_time_lstm_layout(int64_t variant) {
  TORCH_CHECK(variant >= kTimeLstm1 && variant <= kTimeLstm3,
              "timerec_fast.TimeLSTM: variant must be 1, 2 or 3, got ", variant);
  return time_lstm_layout(static_cast<int>(variant));
}

struct TimeShapes {
  int64_t N, B, H;
};

// gates / h_gates: gate blocks in w_ih / w_hh.
template <typename DeviceCheck>
TimeShapes check_time_shapes(const char* cell, const at::Tensor& input, const at::Tensor& delta_t,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, int64_t gates, int64_t h_gates,
                             const DeviceCheck& device_check) {
  check_rows_input(input, cell);
  TORCH_CHECK(h0.dim() == 2, "timerec_fast.", cell, ": h0 must be 2-D, got ", h0.sizes());
  device_check(h0.size(1));
  check_delta_t(delta_t, input);
  TimeShapes d{input.size(0), h0.size(0), h0.size(1)};
  check_matrix(c0, "c0", d.B, d.H, input);
  check_matrix(h0, "h0", d.B, d.H, input);
  check_matrix(w_ih, "w_ih", gates * d.H, input.size(1), input);
  check_matrix(w_hh, "w_hh", h_gates * d.H, d.H, input);
  return d;
}

}  // namespace timerec
