// GRU layer, CPU. Same structure as the LSTM: one input GEMM for all steps; per step one recurrent
// GEMM (into a scratch row block, since r multiplies only the hidden part of n) and one fused
// pointwise pass; BPTT backward with the weight and input gradients as large GEMMs afterwards.
#include <torch/library.h>

#include "../include/timerec/gru_cell.h"
#include "cpu_blas.h"
#include "cpu_kernels.h"
#include "workspace.h"

namespace timerec::cpu {
namespace {

// xg: input-side pre-activations of the step (n, 3H), overwritten with r, z, n; hg: hidden-side
// products (n, 3H) without bias; b_hh may be null.
template <typename T>
TRF_ALWAYS_INLINE void gru_forward_rows_impl(int64_t r0, int64_t r1, int64_t H, T* xg,
                                             const T* hg, const T* b_hh, T* h_state, T* hn_out,
                                             T* h_out) {
  for (int64_t b = r0; b < r1; ++b) {
    T* x = xg + b * 3 * H;
    const T* hgr = hg + b * 3 * H;
    T* hs = h_state + b * H;
    T* hn = hn_out + b * H;
    T* ho = h_out + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T br = b_hh != nullptr ? b_hh[j] : T(0);
      const T bz = b_hh != nullptr ? b_hh[H + j] : T(0);
      const T bn = b_hh != nullptr ? b_hh[2 * H + j] : T(0);
      const T hnj = hgr[2 * H + j] + bn;
      const T h = gru_cell_forward(x[j], x[H + j], x[2 * H + j], hgr[j] + br, hgr[H + j] + bz, hnj,
                                   hs[j]);
      hn[j] = hnj;
      hs[j] = h;
      ho[j] = h;
    }
  }
}

// Rows are absolute within the step. dh = dh_state + grad_out; writes dxg, dhg and
// dh_state = dh * z (the part that bypasses W_hh; the GEMM adds the rest).
template <typename T>
TRF_ALWAYS_INLINE void gru_backward_rows_impl(int64_t r0, int64_t r1, int64_t H, const T* gates,
                                              const T* hn, PrevRows<T> h_prev, const T* gy,
                                              T* dh_state, T* dxg, T* dhg) {
  for (int64_t b = r0; b < r1; ++b) {
    const T* g = gates + b * 3 * H;
    const T* hnb = hn + b * H;
    const T* hp = h_prev.row(b);
    const T* gyb = gy + b * H;
    T* dhs = dh_state + b * H;
    T* dx = dxg + b * 3 * H;
    T* dhh = dhg + b * 3 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      T dr, dz, dn, dhn;
      const T rest = gru_cell_backward(g[j], g[H + j], g[2 * H + j], hnb[j], hp[j], dhs[j] + gyb[j],
                                       dr, dz, dn, dhn);
      dx[j] = dr;
      dx[H + j] = dz;
      dx[2 * H + j] = dn;
      dhh[j] = dr;
      dhh[H + j] = dz;
      dhh[2 * H + j] = dhn;
      dhs[j] = rest;
    }
  }
}

#define TRF_DEFINE_GRU_ROWS(T)                                                                   \
  TRF_CPU_CLONES void gru_forward_rows(int64_t r0, int64_t r1, int64_t H, T* xg, const T* hg,    \
                                       const T* b_hh, T* h_state, T* hn_out, T* h_out) {         \
    gru_forward_rows_impl<T>(r0, r1, H, xg, hg, b_hh, h_state, hn_out, h_out);                   \
  }                                                                                              \
  TRF_CPU_CLONES void gru_backward_rows(int64_t r0, int64_t r1, int64_t H, const T* gates,       \
                                        const T* hn, PrevRows<T> h_prev, const T* gy,            \
                                        T* dh_state, T* dxg, T* dhg) {                           \
    gru_backward_rows_impl<T>(r0, r1, H, gates, hn, h_prev, gy, dh_state, dxg, dhg);             \
  }
TRF_DEFINE_GRU_ROWS(float)
TRF_DEFINE_GRU_ROWS(double)
#undef TRF_DEFINE_GRU_ROWS

constexpr int64_t kMinRowsPerBlock = 8;

// w_hh_t = W_hh^T (H x 3H); hg_scratch (B, 3H).
template <typename T>
void gru_forward_block(const Schedule& s, RowBlock blk, int64_t H, const T* w_hh_t, const T* b_hh,
                       T* gates, T* hn, T* out, T* h_state, T* hg_scratch) {
  const int64_t G = 3 * H;
  T* hs = h_state + blk.lo * H;
  T* hg = hg_scratch + blk.lo * G;
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t off = s.offsets[t] + blk.lo;
    recurrent_gemm<T>(n, H, G, hs, H, w_hh_t, hg, G, /*accumulate=*/false);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      gru_forward_rows(r0, r1, H, gates + off * G, hg, b_hh, hs, hn + off * H, out + off * H);
    });
  }
}

template <typename T>
void gru_backward_block(const Schedule& s, RowBlock blk, int64_t H, const T* w_hh,
                        const T* gates, const T* hn, const T* out, const T* h0, const T* grad_out,
                        T* dh_state, T* dxg, T* dhg) {
  const int64_t G = 3 * H;
  for (int64_t k = s.steps - 1; k >= 0; --k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t base = s.offsets[t];
    const auto h_prev = prev_rows(s, k, out, h0, H);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      gru_backward_rows(blk.lo + r0, blk.lo + r1, H, gates + base * G, hn + base * H, h_prev,
                        grad_out + base * H, dh_state, dxg + base * G, dhg + base * G);
    });
    recurrent_gemm<T>(n, G, H, dhg + (base + blk.lo) * G, G, w_hh, dh_state + blk.lo * H, H,
                      /*accumulate=*/true);
  }
}

// The dtype is checked by each op (check_cpu_dtype) before the shapes.
int64_t check_gru_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh) {
  return check_gru_shapes(input, h0, w_ih, w_hh, [](int64_t) {});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  check_cpu_dtype(input, "GRU");
  const int64_t H = check_gru_args(input, h0, w_ih, w_hh);
  check_vector(b_ih, "b_ih", 3 * H, input);
  check_vector(b_hh, "b_hh", 3 * H, input);
  const int64_t N = input.size(0), B = h0.size(0);
  const Schedule s = make_schedule(batch_sizes, N, B, reverse);
  at::Tensor gates = cpu_input_projection(input, w_ih, b_ih);
  auto opts = input.options();
  at::Tensor hn = workspace_empty({N, H}, opts);
  at::Tensor out = at::empty({N, H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor hg = at::empty({B, 3 * H}, opts);
  at::Tensor w_hh_t = w_hh.t().contiguous();
  at::Tensor b_hh_c = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_gru_forward", [&] {
    for_blocks(split_batch(s, kMinRowsPerBlock), [&](RowBlock blk) {
      gru_forward_block<scalar_t>(s, blk, H, w_hh_t.data_ptr<scalar_t>(),
                                  b_hh.has_value() ? b_hh_c.data_ptr<scalar_t>() : nullptr,
                                  gates.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
                                  hg.data_ptr<scalar_t>());
    });
  });
  return {out, h_state, gates, hn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cpu(const c10::optional<at::Tensor>& grad_output,
                 const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& input,
                 const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& w_ih,
                 const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& gates,
                 const at::Tensor& hn, bool reverse, bool input_grad) {
  check_cpu_dtype(input, "GRU");
  const int64_t H = check_gru_args(input, h0, w_ih, w_hh);
  const int64_t N = input.size(0), B = h0.size(0);
  const Schedule s = make_schedule(batch_sizes, N, B, reverse);
  check_matrix(gates, "gates", N, 3 * H, input);
  check_matrix(hn, "hn", N, H, input);
  check_matrix(output, "output", N, H, input);
  auto opts = input.options();
  at::Tensor gy = grad_or_zeros(grad_output, {N, H}, input);
  at::Tensor dh_state = grad_or_zeros(grad_h_n, {B, H}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor dxg = workspace_empty({N, 3 * H}, opts);
  at::Tensor dhg = workspace_empty({N, 3 * H}, opts);
  at::Tensor h_prev = workspace_empty({N, H}, opts);
  at::Tensor gates_c = gates.contiguous(), hn_c = hn.contiguous(), out_c = output.contiguous();
  at::Tensor h0_c = h0.contiguous(), w_hh_c = w_hh.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_gru_backward", [&] {
    for_blocks(split_batch(s, kMinRowsPerBlock), [&](RowBlock blk) {
      gru_backward_block<scalar_t>(s, blk, H, w_hh_c.data_ptr<scalar_t>(),
                                   gates_c.data_ptr<scalar_t>(), hn_c.data_ptr<scalar_t>(),
                                   out_c.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(),
                                   gy.data_ptr<scalar_t>(), dh_state.data_ptr<scalar_t>(),
                                   dxg.data_ptr<scalar_t>(), dhg.data_ptr<scalar_t>());
    });
    gather_prev_states<scalar_t>(s, out_c.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(), H,
                                 h_prev.data_ptr<scalar_t>());
  });
  at::Tensor grad_input = input_grad ? at::mm(dxg, w_ih) : at::empty({0}, opts);
  return {grad_input, dh_state, at::mm(dxg.t(), input), at::mm(dhg.t(), h_prev), dxg.sum(0),
          dhg.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, CPU, m) {
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace timerec::cpu
