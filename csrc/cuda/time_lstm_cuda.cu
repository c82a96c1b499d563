// Time-aware LSTM layers, CUDA: Time-LSTM 1/2/3 (Zhu et al. 2017) and T-LSTM (Baytas et al. 2017),
// with the same ops, schemas, semantics, saved tensors and layouts as csrc/cpu/time_lstm_cpu.cpp.
//
// Strategy (a) of lstm_cuda.cu: the input projection of every gate (time gates included) as one
// GEMM, then per step cuBLAS GEMM(s) into opmath scratch (h_{t-1} W_hh^T over the gates that see
// h; for T-LSTM also c_{t-1} W_d^T) and one fused pointwise kernel calling the shared cell math
// (timerec::time_lstm_cell_forward / lstm_cell_forward + tlstm_adjusted_cell). Backward: BPTT with
// one pointwise kernel and cuBLAS GEMM(s) per step; then the weight / input gradients as large
// GEMMs, and the per-unit vector gradients (peepholes, time weights) and delta_t gradients as
// ATen elementwise ops + reductions over the saved pre-activation gradients (no atomics, so the
// result is deterministic). These reductions use a few (N, H) opmath temporaries.
//
// Precision: half/bf16 compute in fp32 (GEMM accumulation, gate math, the carried c, dh and dc).
// Saved tensors and outputs share the input dtype. Current stream, no host synchronisation.
//
// TESTED HERE: compiles for sm_90 only. Nothing in this file has run on a GPU yet; see
// tests/test_cuda_cells.py and scripts/gpu_check.sh for the checks that will.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../include/timerec/lstm_cell.h"
#include "../include/timerec/time_lstm_cell.h"
#include "../rnn_common.h"
#include "cuda_blas.cuh"
#include "cuda_rnn_common.cuh"

namespace timerec::cuda {
namespace {

// Pre-activation of gate column block q: x W_ih^T (T) + bias + (h W_hh^T if the gate sees h).
template <typename T, typename A>
__device__ __forceinline__ A time_pre(int q, int h_gates, int64_t H, int64_t j, const T* g,
                                      const A* rec, const A* bias) {
  if (q < 0) return A(0);
  A v = static_cast<A>(g[q * H + j]);
  if (bias != nullptr) v += bias[q * H + j];
  if (q < h_gates) v += rec[q * H + j];
  return v;
}

template <typename A>
__device__ __forceinline__ TimeLstmUnitWeights<A> unit_weights(const A* peep, const A* time_w,
                                                               int64_t H, int64_t j) {
  return {peep[j], peep[H + j], peep[2 * H + j], time_w[j], time_w[H + j], time_w[2 * H + j]};
}

// ---- Time-LSTM ----------------------------------------------------------------------------------

// One step, rows [0, n). gates (n x G, T): x W_ih^T on entry, activated gates on exit; rec
// (n x Gh, opmath) = h_{t-1} W_hh^T; bias (G, opmath) or null; dt (n) this step's delta_t;
// peep / time_w (3 x H, opmath); c_state (B x H, opmath); cts null for variant 1.
template <typename T, typename A, int V>
__global__ void time_lstm_forward_step_kernel(int64_t n, int64_t H, T* __restrict__ gates,
                                              const A* __restrict__ rec,
                                              const A* __restrict__ bias,
                                              const T* __restrict__ dt,
                                              const A* __restrict__ peep,
                                              const A* __restrict__ time_w,
                                              A* __restrict__ c_state, T* __restrict__ cells,
                                              T* __restrict__ cts, T* __restrict__ h_out,
                                              T* __restrict__ h_state) {
  constexpr TimeLstmLayout L = time_lstm_layout(V);
  const int64_t G = L.gates * H, Gh = L.h_gates * H;
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    T* g = gates + b * G;
    const A* r = rec + b * Gh;
    TimeLstmGates<A> a{time_pre<T, A>(L.i, L.h_gates, H, j, g, r, bias),
                       time_pre<T, A>(L.f, L.h_gates, H, j, g, r, bias),
                       time_pre<T, A>(L.g, L.h_gates, H, j, g, r, bias),
                       time_pre<T, A>(L.o, L.h_gates, H, j, g, r, bias),
                       time_pre<T, A>(L.t1, L.h_gates, H, j, g, r, bias),
                       time_pre<T, A>(L.t2, L.h_gates, H, j, g, r, bias)};
    A c_next, ct, h;
    time_lstm_cell_forward<A>(V, a, c_state[idx], static_cast<A>(dt[b]),
                              unit_weights(peep, time_w, H, j), c_next, ct, h);
    g[L.i * H + j] = static_cast<T>(a.i);
    if (L.f >= 0) g[L.f * H + j] = static_cast<T>(a.f);
    g[L.g * H + j] = static_cast<T>(a.g);
    g[L.o * H + j] = static_cast<T>(a.o);
    g[L.t1 * H + j] = static_cast<T>(a.t1);
    if (L.t2 >= 0) g[L.t2 * H + j] = static_cast<T>(a.t2);
    c_state[idx] = c_next;
    cells[idx] = static_cast<T>(c_next);
    if (V != kTimeLstm1) cts[idx] = static_cast<T>(ct);
    h_out[idx] = static_cast<T>(h);
    h_state[idx] = static_cast<T>(h);
  }
}

// One backward step, rows [0, n). dh_state / dc_state (B x H, opmath): dL/dh_t (from step t+1)
// and dL/dc_t on entry; the kernel leaves dL/dc_{t-1} in dc_state and the GEMM after it
// overwrites dh_state with dL/dh_{t-1} = dgates_h W_hh. ct = cts (cells for variant 1). Gathers
// c_prev and h_prev (n x H): the states each row started the step from.
template <typename T, typename A, int V>
__global__ void time_lstm_backward_step_kernel(
    int64_t n, int64_t H, int64_t carried, const T* __restrict__ gates,
    const T* __restrict__ ct_rows, const T* __restrict__ cells_prev, const T* __restrict__ c0,
    const T* __restrict__ out_prev, const T* __restrict__ h0, const A* __restrict__ peep,
    const A* __restrict__ time_w, const T* __restrict__ gy, const A* __restrict__ dh_state,
    A* __restrict__ dc_state, T* __restrict__ dgates, T* __restrict__ c_prev,
    T* __restrict__ h_prev) {
  constexpr TimeLstmLayout L = time_lstm_layout(V);
  const int64_t G = L.gates * H;
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const T cp_t = b < carried ? cells_prev[idx] : c0[idx];
    c_prev[idx] = cp_t;
    h_prev[idx] = b < carried ? out_prev[idx] : h0[idx];
    const T* g = gates + b * G;
    const TimeLstmGates<A> a{static_cast<A>(g[L.i * H + j]),
                             L.f >= 0 ? static_cast<A>(g[L.f * H + j]) : A(0),
                             static_cast<A>(g[L.g * H + j]),
                             static_cast<A>(g[L.o * H + j]),
                             static_cast<A>(g[L.t1 * H + j]),
                             L.t2 >= 0 ? static_cast<A>(g[L.t2 * H + j]) : A(0)};
    A dh = dh_state[idx];
    if (gy != nullptr) dh += static_cast<A>(gy[idx]);
    TimeLstmGates<A> d;
    dc_state[idx] = time_lstm_cell_backward<A>(V, a, static_cast<A>(cp_t),
                                               static_cast<A>(ct_rows[idx]), dh, dc_state[idx],
                                               unit_weights(peep, time_w, H, j), d);
    T* o = dgates + b * G;
    o[L.i * H + j] = static_cast<T>(d.i);
    if (L.f >= 0) o[L.f * H + j] = static_cast<T>(d.f);
    o[L.g * H + j] = static_cast<T>(d.g);
    o[L.o * H + j] = static_cast<T>(d.o);
    o[L.t1 * H + j] = static_cast<T>(d.t1);
    if (L.t2 >= 0) o[L.t2 * H + j] = static_cast<T>(d.t2);
  }
}

// ---- T-LSTM --------------------------------------------------------------------------------------

// One step, rows [0, n). csp (n x H, opmath) = c_{t-1} W_d^T; cs_out saves tanh(csp + b_d).
// c_state (B x H, opmath) is the carried cell; c_gemm (B x H, T) its copy in the GEMM's dtype
// (the same buffer as c_state when T is the opmath type).
template <typename T, typename A>
__global__ void tlstm_forward_step_kernel(int64_t n, int64_t H, T* __restrict__ gates,
                                          const A* __restrict__ rec, const A* __restrict__ bias,
                                          const A* __restrict__ csp, const A* __restrict__ b_d,
                                          const T* __restrict__ dt, A* c_state, T* c_gemm,
                                          T* __restrict__ cells, T* __restrict__ cs_out,
                                          T* __restrict__ h_out, T* __restrict__ h_state) {
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const A s = tanh_act(csp[idx] + (b_d != nullptr ? b_d[j] : A(0)));
    const A decay = tlstm_decay<A>(static_cast<A>(dt[b]));
    T* g = gates + b * 4 * H;
    const A* r = rec + b * 4 * H;
    A v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      v[q] = static_cast<A>(g[q * H + j]) + r[q * H + j] + (bias != nullptr ? bias[q * H + j] : A(0));
    }
    A c, h;
    lstm_cell_forward<A>(v[0], v[1], v[2], v[3], tlstm_adjusted_cell<A>(c_state[idx], s, decay), c,
                         h);
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q * H + j] = static_cast<T>(v[q]);
    cs_out[idx] = static_cast<T>(s);
    c_state[idx] = c;
    c_gemm[idx] = static_cast<T>(c);
    cells[idx] = static_cast<T>(c);
    h_out[idx] = static_cast<T>(h);
    h_state[idx] = static_cast<T>(h);
  }
}

// One backward step, rows [0, n). Writes dgates, d_pre (gradient of c W_d^T + b_d), dstar_cs
// (opmath; dc* * cs, reduced into the delta_t gradient afterwards) and leaves the direct part of
// dL/dc_{t-1} (= dc*) in dc_state; the GEMMs after it set dh_state = dgates W_hh and add
// d_pre W_d to dc_state. Gathers c_prev and h_prev.
template <typename T, typename A>
__global__ void tlstm_backward_step_kernel(
    int64_t n, int64_t H, int64_t carried, const T* __restrict__ gates,
    const T* __restrict__ cells, const T* __restrict__ cs, const T* __restrict__ cells_prev,
    const T* __restrict__ c0, const T* __restrict__ out_prev, const T* __restrict__ h0,
    const T* __restrict__ dt, const T* __restrict__ gy, const A* __restrict__ dh_state,
    A* __restrict__ dc_state, T* __restrict__ dgates, T* __restrict__ d_pre,
    A* __restrict__ dstar_cs, T* __restrict__ c_prev, T* __restrict__ h_prev) {
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const T cp_t = b < carried ? cells_prev[idx] : c0[idx];
    c_prev[idx] = cp_t;
    h_prev[idx] = b < carried ? out_prev[idx] : h0[idx];
    const T* g = gates + b * 4 * H;
    const A s = static_cast<A>(cs[idx]);
    const A decay = tlstm_decay<A>(static_cast<A>(dt[b]));
    A dh = dh_state[idx];
    if (gy != nullptr) dh += static_cast<A>(gy[idx]);
    A di, df, dg, d_o, dstar;
    lstm_cell_backward<A>(static_cast<A>(g[j]), static_cast<A>(g[H + j]),
                          static_cast<A>(g[2 * H + j]), static_cast<A>(g[3 * H + j]),
                          tlstm_adjusted_cell<A>(static_cast<A>(cp_t), s, decay),
                          static_cast<A>(cells[idx]), dh, dc_state[idx], di, df, dg, d_o, dstar);
    T* o = dgates + b * 4 * H;
    o[j] = static_cast<T>(di);
    o[H + j] = static_cast<T>(df);
    o[2 * H + j] = static_cast<T>(dg);
    o[3 * H + j] = static_cast<T>(d_o);
    d_pre[idx] = static_cast<T>(dstar * (decay - A(1)) * (A(1) - s * s));
    dstar_cs[idx] = dstar * s;
    dc_state[idx] = dstar;
  }
}

// ---- ops ---------------------------------------------------------------------------------------

TimeShapes check_time_args_cuda(const char* cell, const at::Tensor& input,
                                const at::Tensor& delta_t, const at::Tensor& h0,
                                const at::Tensor& c0, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, int64_t gates, int64_t h_gates) {
  return check_time_shapes(cell, input, delta_t, h0, c0, w_ih, w_hh, gates, h_gates,
                           [&](int64_t H) { check_cuda_input(input, cell, gates * H); });
}

// Grad tensors from autograd in opmath (cloned: the loops update them in place), or zeros.
at::Tensor state_grad(const c10::optional<at::Tensor>& g, int64_t B, int64_t H,
                      const at::Tensor& like, at::ScalarType acc) {
  if (g.has_value() && g->defined()) return g->to(acc).clone(at::MemoryFormat::Contiguous);
  return at::zeros({B, H}, like.options().dtype(acc));
}

template <typename F>
void dispatch_variant(int64_t variant, F&& f) {
  switch (variant) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    default: return f(std::integral_constant<int, 3>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
time_lstm_forward_cuda(const at::Tensor& input, const at::Tensor& delta_t,
                       const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& peep,
                       const at::Tensor& time_w, int64_t variant, bool reverse) {
  const TimeLstmLayout L = checked_time_lstm_layout(variant);
  const auto d =
      check_time_args_cuda("TimeLSTM", input, delta_t, h0, c0, w_ih, w_hh, L.gates, L.h_gates);
  check_vector(bias, "bias", L.gates * d.H, input);
  check_matrix(peep, "peep", 3, d.H, input);
  check_matrix(time_w, "time_w", 3, d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t H = d.H, G = L.gates * H, Gh = L.h_gates * H;
  auto opts = input.options();
  const auto acc = opmath_dtype(input.scalar_type());
  at::Tensor gates = at::empty({d.N, G}, opts);
  at::mm_out(gates, input.contiguous(), w_ih.t());
  at::Tensor bias_a = opmath_bias(bias, c10::nullopt, acc);
  at::Tensor peep_a = peep.to(acc).contiguous(), time_w_a = time_w.to(acc).contiguous();
  at::Tensor cells = at::empty({d.N, H}, opts);
  at::Tensor cts = variant == kTimeLstm1 ? at::empty({0}, opts) : at::empty({d.N, H}, opts);
  at::Tensor out = at::empty({d.N, H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_state = c0.to(acc).clone(at::MemoryFormat::Contiguous);
  at::Tensor rec = at::empty({d.B, Gh}, opts.dtype(acc));
  at::Tensor w_hh_c = w_hh.contiguous(), dt = delta_t.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "timerec_fast_time_lstm_forward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    dispatch_variant(variant, [&](auto v) {
      constexpr int V = decltype(v)::value;
      const A* bias_p = bias_a.defined() ? bias_a.data_ptr<A>() : nullptr;
      T* gates_p = gates.data_ptr<T>();
      T* cells_p = cells.data_ptr<T>();
      T* cts_p = V == kTimeLstm1 ? nullptr : cts.data_ptr<T>();
      T* out_p = out.data_ptr<T>();
      T* hs = h_state.data_ptr<T>();
      A* cs = c_state.data_ptr<A>();
      A* rec_p = rec.data_ptr<A>();
      const T* whh = w_hh_c.data_ptr<T>();
      const T* dt_p = dt.data_ptr<T>();
      for (int64_t k = 0; k < s.steps; ++k) {
        const int64_t t = s.time_at(k);
        const int64_t n = s.batch_sizes[t];
        const int64_t off = s.offsets[t];
        gemm_rm<T, A>(false, true, n, Gh, H, hs, H, whh, H, rec_p, Gh);  // h_{t-1} W_hh^T
        time_lstm_forward_step_kernel<T, A, V><<<blocks_for(n * H), kThreads, 0, stream>>>(
            n, H, gates_p + off * G, rec_p, bias_p, dt_p + off, peep_a.data_ptr<A>(),
            time_w_a.data_ptr<A>(), cs, cells_p + off * H,
            cts_p != nullptr ? cts_p + off * H : nullptr, out_p + off * H, hs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {out, h_state, c_state.to(input.scalar_type()), gates, cells, cts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
time_lstm_backward_cuda(const c10::optional<at::Tensor>& grad_output,
                        const c10::optional<at::Tensor>& grad_h_n,
                        const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                        const at::Tensor& delta_t, const at::Tensor& batch_sizes,
                        const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const at::Tensor& peep, const at::Tensor& time_w,
                        const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                        const at::Tensor& cts, int64_t variant, bool reverse, bool input_grad) {
  const TimeLstmLayout L = checked_time_lstm_layout(variant);
  const auto d =
      check_time_args_cuda("TimeLSTM", input, delta_t, h0, c0, w_ih, w_hh, L.gates, L.h_gates);
  check_matrix(peep, "peep", 3, d.H, input);
  check_matrix(time_w, "time_w", 3, d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const int64_t H = d.H, G = L.gates * H, Gh = L.h_gates * H;
  check_matrix(gates, "gates", d.N, G, input);
  check_matrix(cells, "cells", d.N, H, input);
  check_matrix(output, "output", d.N, H, input);
  if (variant != kTimeLstm1) check_matrix(cts, "cts", d.N, H, input);
  const c10::cuda::CUDAGuard guard(input.device());
  auto opts = input.options();
  const auto st = input.scalar_type();
  const auto acc = opmath_dtype(st);
  const bool has_gy = grad_output.has_value() && grad_output->defined();
  at::Tensor gy = has_gy ? grad_output->contiguous() : at::Tensor();
  at::Tensor dh_state = state_grad(grad_h_n, d.B, H, input, acc);
  at::Tensor dc_state = state_grad(grad_c_n, d.B, H, input, acc);
  at::Tensor dgates = at::empty({d.N, G}, opts);
  at::Tensor h_prev = at::empty({d.N, H}, opts), c_prev = at::empty({d.N, H}, opts);
  at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous();
  at::Tensor cts_c = variant == kTimeLstm1 ? cells_c : cts.contiguous();
  at::Tensor c0_c = c0.contiguous(), h0_c = h0.contiguous(), out_c = output.contiguous();
  at::Tensor w_hh_c = w_hh.contiguous();
  at::Tensor peep_a = peep.to(acc).contiguous(), time_w_a = time_w.to(acc).contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st,
                                  "timerec_fast_time_lstm_backward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    dispatch_variant(variant, [&](auto v) {
      constexpr int V = decltype(v)::value;
      const T* gates_p = gates_c.data_ptr<T>();
      const T* cells_p = cells_c.data_ptr<T>();
      const T* cts_p = cts_c.data_ptr<T>();
      const T* out_p = out_c.data_ptr<T>();
      const T* gy_p = has_gy ? gy.data_ptr<T>() : nullptr;
      const T* whh = w_hh_c.data_ptr<T>();
      A* dhs = dh_state.data_ptr<A>();
      A* dcs = dc_state.data_ptr<A>();
      T* dg_p = dgates.data_ptr<T>();
      for (int64_t k = s.steps - 1; k >= 0; --k) {
        const int64_t t = s.time_at(k);
        const int64_t n = s.batch_sizes[t];
        const int64_t base = s.offsets[t];
        const int64_t carried = s.carried_rows(k);
        const int64_t prev_base = k > 0 ? s.offsets[s.time_at(k - 1)] : 0;
        time_lstm_backward_step_kernel<T, A, V><<<blocks_for(n * H), kThreads, 0, stream>>>(
            n, H, carried, gates_p + base * G, cts_p + base * H,
            k > 0 ? cells_p + prev_base * H : nullptr, c0_c.data_ptr<T>(),
            k > 0 ? out_p + prev_base * H : nullptr, h0_c.data_ptr<T>(), peep_a.data_ptr<A>(),
            time_w_a.data_ptr<A>(), has_gy ? gy_p + base * H : nullptr, dhs, dcs,
            dg_p + base * G, c_prev.data_ptr<T>() + base * H, h_prev.data_ptr<T>() + base * H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // dh_{t-1} = dgates_h W_hh (time gates do not see h)
        gemm_rm<T, A>(false, false, n, H, Gh, dg_p + base * G, G, whh, H, dhs, H);
      }
    });
  });

  // Per-unit vector and delta_t gradients, in opmath, from the pre-activation gradients (the
  // same sums as the CPU loop accumulates).
  at::Tensor dg = dgates.to(acc);
  auto col = [&](int q) { return dg.narrow(1, int64_t(q) * H, H); };
  at::Tensor dtc = delta_t.to(acc).unsqueeze(1);  // (N, 1)
  at::Tensor cp = c_prev.to(acc), ctr = cts_c.to(acc);
  at::Tensor w_t1 = time_w_a[0], w_t2 = time_w_a[1], w_o = time_w_a[2];
  at::Tensor d_i = col(L.i), d_o = col(L.o);
  at::Tensor s1 = at::sigmoid(dtc * w_t1);
  at::Tensor e1 = col(L.t1) * s1 * (1 - s1);
  at::Tensor zeros_h = at::zeros({H}, opts.dtype(acc));
  at::Tensor row_dt = e1 * w_t1 + d_o * w_o;
  at::Tensor g_wt2 = zeros_h;
  if (variant != kTimeLstm1) {
    at::Tensor s2 = at::sigmoid(dtc * w_t2);
    at::Tensor e2 = col(L.t2) * s2 * (1 - s2);
    row_dt = row_dt + e2 * w_t2;
    g_wt2 = (e2 * dtc).sum(0);
  }
  at::Tensor g_pf = variant == kTimeLstm3 ? zeros_h : (col(L.f) * cp).sum(0);
  at::Tensor grad_peep = at::stack({(d_i * cp).sum(0), g_pf, (d_o * ctr).sum(0)}).to(st);
  at::Tensor grad_time_w = at::stack({(e1 * dtc).sum(0), g_wt2, (d_o * dtc).sum(0)}).to(st);
  at::Tensor grad_dt = row_dt.sum(1).to(st);

  at::Tensor grad_input = input_grad ? at::mm(dgates, w_ih) : at::empty({0}, opts);
  return {grad_input,
          grad_dt,
          dh_state.to(st),
          dc_state.to(st),
          at::mm(dgates.t(), input),
          at::mm(dgates.narrow(1, 0, Gh).t(), h_prev),
          dgates.sum(0),
          grad_peep,
          grad_time_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
tlstm_forward_cuda(const at::Tensor& input, const at::Tensor& delta_t,
                   const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& w_d,
                   const c10::optional<at::Tensor>& b_d, bool reverse) {
  const auto d = check_time_args_cuda("TimeLSTM(tlstm)", input, delta_t, h0, c0, w_ih, w_hh, 4, 4);
  check_vector(bias, "bias", 4 * d.H, input);
  check_matrix(w_d, "w_d", d.H, d.H, input);
  check_vector(b_d, "b_d", d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t H = d.H, G = 4 * H;
  auto opts = input.options();
  const auto acc = opmath_dtype(input.scalar_type());
  at::Tensor gates = at::empty({d.N, G}, opts);
  at::mm_out(gates, input.contiguous(), w_ih.t());
  at::Tensor bias_a = opmath_bias(bias, c10::nullopt, acc);
  at::Tensor b_d_a = opmath_bias(b_d, c10::nullopt, acc);
  at::Tensor cells = at::empty({d.N, H}, opts), cs = at::empty({d.N, H}, opts);
  at::Tensor out = at::empty({d.N, H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_state = c0.to(acc).clone(at::MemoryFormat::Contiguous);
  const bool same = acc == input.scalar_type();
  at::Tensor c_gemm = same ? c_state : c0.clone(at::MemoryFormat::Contiguous);
  at::Tensor rec = at::empty({d.B, G}, opts.dtype(acc)), csp = at::empty({d.B, H}, opts.dtype(acc));
  at::Tensor w_hh_c = w_hh.contiguous(), w_d_c = w_d.contiguous(), dt = delta_t.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "timerec_fast_tlstm_forward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const A* bias_p = bias_a.defined() ? bias_a.data_ptr<A>() : nullptr;
    const A* b_d_p = b_d_a.defined() ? b_d_a.data_ptr<A>() : nullptr;
    T* gates_p = gates.data_ptr<T>();
    T* cells_p = cells.data_ptr<T>();
    T* cs_p = cs.data_ptr<T>();
    T* out_p = out.data_ptr<T>();
    T* hs = h_state.data_ptr<T>();
    A* c_a = c_state.data_ptr<A>();
    T* c_t = c_gemm.data_ptr<T>();
    A* rec_p = rec.data_ptr<A>();
    A* csp_p = csp.data_ptr<A>();
    const T* whh = w_hh_c.data_ptr<T>();
    const T* wd = w_d_c.data_ptr<T>();
    const T* dt_p = dt.data_ptr<T>();
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t t = s.time_at(k);
      const int64_t n = s.batch_sizes[t];
      const int64_t off = s.offsets[t];
      gemm_rm<T, A>(false, true, n, G, H, hs, H, whh, H, rec_p, G);   // h_{t-1} W_hh^T
      gemm_rm<T, A>(false, true, n, H, H, c_t, H, wd, H, csp_p, H);   // c_{t-1} W_d^T
      tlstm_forward_step_kernel<T, A><<<blocks_for(n * H), kThreads, 0, stream>>>(
          n, H, gates_p + off * G, rec_p, bias_p, csp_p, b_d_p, dt_p + off, c_a, c_t,
          cells_p + off * H, cs_p + off * H, out_p + off * H, hs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, h_state, same ? c_state : c_state.to(input.scalar_type()), gates, cells, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
tlstm_backward_cuda(const c10::optional<at::Tensor>& grad_output,
                    const c10::optional<at::Tensor>& grad_h_n,
                    const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                    const at::Tensor& delta_t, const at::Tensor& batch_sizes, const at::Tensor& h0,
                    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const at::Tensor& w_d, const at::Tensor& output, const at::Tensor& gates,
                    const at::Tensor& cells, const at::Tensor& cs, bool reverse, bool input_grad) {
  const auto d = check_time_args_cuda("TimeLSTM(tlstm)", input, delta_t, h0, c0, w_ih, w_hh, 4, 4);
  check_matrix(w_d, "w_d", d.H, d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const int64_t H = d.H, G = 4 * H;
  check_matrix(gates, "gates", d.N, G, input);
  check_matrix(cells, "cells", d.N, H, input);
  check_matrix(cs, "cs", d.N, H, input);
  check_matrix(output, "output", d.N, H, input);
  const c10::cuda::CUDAGuard guard(input.device());
  auto opts = input.options();
  const auto st = input.scalar_type();
  const auto acc = opmath_dtype(st);
  const bool has_gy = grad_output.has_value() && grad_output->defined();
  at::Tensor gy = has_gy ? grad_output->contiguous() : at::Tensor();
  at::Tensor dh_state = state_grad(grad_h_n, d.B, H, input, acc);
  at::Tensor dc_state = state_grad(grad_c_n, d.B, H, input, acc);
  at::Tensor dgates = at::empty({d.N, G}, opts);
  at::Tensor d_pre = at::empty({d.N, H}, opts);
  at::Tensor dstar_cs = at::empty({d.N, H}, opts.dtype(acc));
  at::Tensor h_prev = at::empty({d.N, H}, opts), c_prev = at::empty({d.N, H}, opts);
  at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous(), cs_c = cs.contiguous();
  at::Tensor c0_c = c0.contiguous(), h0_c = h0.contiguous(), out_c = output.contiguous();
  at::Tensor w_hh_c = w_hh.contiguous(), w_d_c = w_d.contiguous(), dt = delta_t.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st,
                                  "timerec_fast_tlstm_backward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* gates_p = gates_c.data_ptr<T>();
    const T* cells_p = cells_c.data_ptr<T>();
    const T* cs_p = cs_c.data_ptr<T>();
    const T* out_p = out_c.data_ptr<T>();
    const T* dt_p = dt.data_ptr<T>();
    const T* gy_p = has_gy ? gy.data_ptr<T>() : nullptr;
    const T* whh = w_hh_c.data_ptr<T>();
    const T* wd = w_d_c.data_ptr<T>();
    A* dhs = dh_state.data_ptr<A>();
    A* dcs = dc_state.data_ptr<A>();
    T* dg_p = dgates.data_ptr<T>();
    T* dpre_p = d_pre.data_ptr<T>();
    A* dsc_p = dstar_cs.data_ptr<A>();
    for (int64_t k = s.steps - 1; k >= 0; --k) {
      const int64_t t = s.time_at(k);
      const int64_t n = s.batch_sizes[t];
      const int64_t base = s.offsets[t];
      const int64_t carried = s.carried_rows(k);
      const int64_t prev_base = k > 0 ? s.offsets[s.time_at(k - 1)] : 0;
      tlstm_backward_step_kernel<T, A><<<blocks_for(n * H), kThreads, 0, stream>>>(
          n, H, carried, gates_p + base * G, cells_p + base * H, cs_p + base * H,
          k > 0 ? cells_p + prev_base * H : nullptr, c0_c.data_ptr<T>(),
          k > 0 ? out_p + prev_base * H : nullptr, h0_c.data_ptr<T>(), dt_p + base,
          has_gy ? gy_p + base * H : nullptr, dhs, dcs, dg_p + base * G, dpre_p + base * H,
          dsc_p + base * H, c_prev.data_ptr<T>() + base * H, h_prev.data_ptr<T>() + base * H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // dh_{t-1} = dgates W_hh;  dc_{t-1} = dc* + d_pre W_d
      gemm_rm<T, A>(false, false, n, H, G, dg_p + base * G, G, whh, H, dhs, H);
      gemm_rm<T, A>(false, false, n, H, H, dpre_p + base * H, H, wd, H, dcs, H,
                    /*accumulate=*/true);
    }
  });
  // d decay / d dt, elementwise on delta_t (the same formula as tlstm_decay_grad), in opmath.
  at::Tensor dta = delta_t.to(acc);
  at::Tensor l = at::log(dta + 2.718281828459045);
  at::Tensor grad_dt = (dstar_cs.sum(1) * (-1.0 / (l * l * (dta + 2.718281828459045)))).to(st);
  at::Tensor grad_input = input_grad ? at::mm(dgates, w_ih) : at::empty({0}, opts);
  return {grad_input,
          grad_dt,
          dh_state.to(st),
          dc_state.to(st),
          at::mm(dgates.t(), input),
          at::mm(dgates.t(), h_prev),
          dgates.sum(0),
          at::mm(d_pre.t(), c_prev),
          d_pre.sum(0)};
}

// The CUDA forward keeps its gates, cells and cts either way; inference drops them.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
time_lstm_inference_cuda(const at::Tensor& input, const at::Tensor& delta_t,
                         const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& peep,
                         const at::Tensor& time_w, int64_t variant, bool reverse) {
  auto r = time_lstm_forward_cuda(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep,
                                  time_w, variant, reverse);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, CUDA, m) {
  m.impl("time_lstm_forward", &time_lstm_forward_cuda);
  m.impl("time_lstm_inference", &time_lstm_inference_cuda);
  m.impl("time_lstm_backward", &time_lstm_backward_cuda);
  m.impl("tlstm_forward", &tlstm_forward_cuda);
  m.impl("tlstm_backward", &tlstm_backward_cuda);
}

}  // namespace timerec::cuda
