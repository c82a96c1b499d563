// Time-aware LSTM layers, CPU: Time-LSTM 1/2/3 (Zhu et al. 2017) and T-LSTM (Baytas et al. 2017).
//
// Same machinery as the LSTM. Time-LSTM forward with >= 16 rows per step: the fused panel tiles
// (input projection, time gates included, recurrent product and the time cell per tile; see
// "fused forward" below). Otherwise, and for T-LSTM: the time-gate input projections join the one
// input GEMM and the dt terms, peepholes and decay are fused into the per-step pointwise pass.
// Gradients of the per-unit vectors (peepholes, time weights) and of delta_t are reductions over
// rows, accumulated in the backward's pointwise pass.
#include <torch/library.h>

#include "../include/timerec/lstm_cell.h"
#include "../include/timerec/time_lstm_cell.h"
#include "cpu_blas.h"
#include "cpu_kernels.h"
#include "gate_panels.h"
#include "streamed_grads.h"
#include "vec_activations.h"
#include "workspace.h"

namespace timerec::cpu {
namespace {

constexpr int64_t kMinRowsPerBlock = 8;

// ---- Time-LSTM pointwise ---------------------------------------------------------------------
// The variant is a template parameter so each loop is branch-free and vectorizes; gate columns
// are addressed through per-gate row pointers (gates a variant lacks point at a scratch row).

template <typename T>
TRF_ALWAYS_INLINE TimeLstmUnitWeights<T> unit_weights(const T* peep, const T* time_w, int64_t H,
                                                      int64_t j) {
  return {peep[j], peep[H + j], peep[2 * H + j], time_w[j], time_w[H + j], time_w[2 * H + j]};
}

template <typename T>
struct GateRows {
  T *i, *f, *g, *o, *t1, *t2;
  GateRows(const TimeLstmLayout& L, T* row, int64_t H, T* scratch)
      : i(row + L.i * H), f(L.f >= 0 ? row + L.f * H : scratch), g(row + L.g * H),
        o(row + L.o * H), t1(row + L.t1 * H), t2(L.t2 >= 0 ? row + L.t2 * H : scratch) {}
};

// The time cell on rows [b0, b1) x units [j0, j1) of one step (pointers at the step's rows):
// gates hold the pre-activations and get the activations; c_state is updated in place; the
// cells, cts (variants 2 and 3) and out rows are written, and h_state's if given. At inference
// cells and cts are null (nothing saved for a backward).
template <typename T, int V>
TRF_ALWAYS_INLINE void time_lstm_cells(int64_t b0, int64_t b1, int64_t j0, int64_t j1, int64_t H,
                                       T* gates, const T* dt, const T* peep, const T* time_w,
                                       T* c_state, T* cells, T* cts, T* out, T* h_state) {
  constexpr TimeLstmLayout L = time_lstm_layout(V);
  for (int64_t b = b0; b < b1; ++b) {
    T* row = gates + b * L.gates * H;
    T* __restrict gi = row + L.i * H;
    T* __restrict gg = row + L.g * H;
    T* __restrict go = row + L.o * H;
    T* __restrict gt1 = row + L.t1 * H;
    T* __restrict gf = row + (V != kTimeLstm3 ? L.f : L.i) * H;    // unused in variant 3
    T* __restrict gt2 = row + (V != kTimeLstm1 ? L.t2 : L.t1) * H;  // unused in variant 1
    T* __restrict cs = c_state + b * H;
    T* __restrict cl = cells != nullptr ? cells + b * H : nullptr;
    T* __restrict ctb = cts != nullptr ? cts + b * H : nullptr;
    T* __restrict ho = out + b * H;
    const T d = dt[b];
#pragma GCC ivdep
    for (int64_t j = j0; j < j1; ++j) {
      TimeLstmGates<T> a{gi[j], V != kTimeLstm3 ? gf[j] : T(0), gg[j], go[j], gt1[j],
                         V != kTimeLstm1 ? gt2[j] : T(0)};
      T c_next, ct, h;
      time_lstm_cell_forward(V, a, cs[j], d, unit_weights(peep, time_w, H, j), c_next, ct, h);
      gi[j] = a.i;
      if constexpr (V != kTimeLstm3) gf[j] = a.f;
      gg[j] = a.g;
      go[j] = a.o;
      gt1[j] = a.t1;
      if constexpr (V != kTimeLstm1) {
        gt2[j] = a.t2;
        if (ctb != nullptr) ctb[j] = ct;
      }
      cs[j] = c_next;
      if (cl != nullptr) cl[j] = c_next;
      ho[j] = h;
    }
    if (h_state != nullptr) std::memcpy(h_state + b * H + j0, ho + j0, (j1 - j0) * sizeof(T));
  }
}

// Per-block sums of the per-unit weight gradients (rows [p_i, p_f, p_o, w_t1, w_t2, w_o], each H),
// plus one row of scratch for the delta_t reduction.
template <typename T>
struct TimeLstmGradAcc {
  T* sums;     // (6, H), accumulated over the block's rows
  T* scratch;  // (H)
  T* bias_sums;                        // (G): column sums of the block's dgates
  const PrevStateGather<T>* h_gather;  // fills the block's h_prev rows (for dW_hh), or, streamed,
                                       // the chunks' [x, h_prev] rows
  int64_t dg_row0;                     // dgates holds the dGates row of row dg_row0 first
};

// Absolute rows. dh = dh_state + grad_out; writes dgates (pre-activation gradients), dc_state,
// grad_dt of each row and accumulates the per-unit weight gradients into acc.
template <typename T, int V>
TRF_ALWAYS_INLINE void time_lstm_backward_rows_v(TimeLstmLayout L, int64_t r0, int64_t r1,
                                                 int64_t H, const T* gates, const T* cells,
                                                 const T* cts, PrevRows<T> c_prev, const T* peep,
                                                 const T* time_w, const T* gy, const T* dh_state,
                                                 const T* dt, T* dc_state, T* dgates, T* grad_dt,
                                                 TimeLstmGradAcc<T> acc) {
  const int64_t G = L.gates * H;
  T scratch[1];
  T* __restrict a_pi = acc.sums;
  T* __restrict a_pf = acc.sums + H;
  T* __restrict a_po = acc.sums + 2 * H;
  T* __restrict a_wt1 = acc.sums + 3 * H;
  T* __restrict a_wt2 = acc.sums + 4 * H;
  T* __restrict a_wo = acc.sums + 5 * H;
  T* __restrict row_dt = acc.scratch;
  const T* __restrict w_t1 = time_w;
  const T* __restrict w_t2 = time_w + H;
  const T* __restrict w_o = time_w + 2 * H;
  for (int64_t b = r0; b < r1; ++b) {
    const GateRows<T> g(L, const_cast<T*>(gates) + b * G, H, scratch);
    T dscratch[1];
    const GateRows<T> dg(L, dgates + (b - acc.dg_row0) * G, H, dscratch);
    const T* __restrict cp = c_prev.row(b);
    const T* __restrict ctb = (cts != nullptr ? cts : cells) + b * H;
    const T* __restrict dhs = dh_state + b * H;
    const T* __restrict gyb = gy + b * H;
    T* __restrict dc = dc_state + b * H;
    T* __restrict di = dg.i;
    T* __restrict dgg = dg.g;
    T* __restrict d_o = dg.o;
    T* __restrict dt1 = dg.t1;
    T* __restrict df = dg.f;
    T* __restrict dt2 = dg.t2;
    const T step_dt = dt[b];
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const TimeLstmGates<T> a{g.i[j], V != kTimeLstm3 ? g.f[j] : T(0), g.g[j], g.o[j], g.t1[j],
                               V != kTimeLstm1 ? g.t2[j] : T(0)};
      TimeLstmGates<T> d;
      dc[j] = time_lstm_cell_backward(V, a, cp[j], ctb[j], dhs[j] + gyb[j], dc[j],
                                      unit_weights(peep, time_w, H, j), d);
      di[j] = d.i;
      if constexpr (V != kTimeLstm3) df[j] = d.f;
      dgg[j] = d.g;
      d_o[j] = d.o;
      dt1[j] = d.t1;
      if constexpr (V != kTimeLstm1) dt2[j] = d.t2;
      // Through sigmoid(dt * w_t): e = dL/d(dt * w_t).
      const T s1 = sigmoid_act(step_dt * w_t1[j]);
      const T e1 = d.t1 * s1 * (T(1) - s1);
      T e2 = T(0);
      if constexpr (V != kTimeLstm1) {
        const T s2 = sigmoid_act(step_dt * w_t2[j]);
        e2 = d.t2 * s2 * (T(1) - s2);
      }
      a_pi[j] += d.i * cp[j];
      if constexpr (V != kTimeLstm3) a_pf[j] += d.f * cp[j];
      a_po[j] += d.o * ctb[j];
      a_wt1[j] += e1 * step_dt;
      a_wt2[j] += e2 * step_dt;
      a_wo[j] += d.o * step_dt;
      row_dt[j] = e1 * w_t1[j] + e2 * w_t2[j] + d.o * w_o[j];
    }
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < H; ++j) sum += row_dt[j];
    grad_dt[b] = sum;
  }
}

template <typename T>
TRF_ALWAYS_INLINE void time_lstm_forward_rows_impl(int variant, int64_t r0, int64_t r1,
                                                   int64_t H, T* gates, const T* dt,
                                                   const T* peep, const T* time_w, T* c_state,
                                                   T* cells, T* cts, T* h_out, T* h_state) {
  switch (variant) {
    case kTimeLstm1:
      return time_lstm_cells<T, kTimeLstm1>(r0, r1, 0, H, H, gates, dt, peep, time_w,
                                            c_state, cells, cts, h_out, h_state);
    case kTimeLstm2:
      return time_lstm_cells<T, kTimeLstm2>(r0, r1, 0, H, H, gates, dt, peep, time_w,
                                            c_state, cells, cts, h_out, h_state);
    default:
      return time_lstm_cells<T, kTimeLstm3>(r0, r1, 0, H, H, gates, dt, peep, time_w,
                                            c_state, cells, cts, h_out, h_state);
  }
}

template <typename T>
TRF_ALWAYS_INLINE void time_lstm_backward_rows_impl(int variant, TimeLstmLayout L, int64_t r0,
                                                    int64_t r1, int64_t H, const T* gates,
                                                    const T* cells, const T* cts,
                                                    PrevRows<T> c_prev, const T* peep,
                                                    const T* time_w, const T* gy,
                                                    const T* dh_state, const T* dt, T* dc_state,
                                                    T* dgates, T* grad_dt, TimeLstmGradAcc<T> acc) {
  switch (variant) {
    case kTimeLstm1:
      return time_lstm_backward_rows_v<T, kTimeLstm1>(L, r0, r1, H, gates, cells, cts, c_prev,
                                                      peep, time_w, gy, dh_state, dt, dc_state,
                                                      dgates, grad_dt, acc);
    case kTimeLstm2:
      return time_lstm_backward_rows_v<T, kTimeLstm2>(L, r0, r1, H, gates, cells, cts, c_prev,
                                                      peep, time_w, gy, dh_state, dt, dc_state,
                                                      dgates, grad_dt, acc);
    default:
      return time_lstm_backward_rows_v<T, kTimeLstm3>(L, r0, r1, H, gates, cells, cts, c_prev,
                                                      peep, time_w, gy, dh_state, dt, dc_state,
                                                      dgates, grad_dt, acc);
  }
}

// ---- T-LSTM pointwise -------------------------------------------------------------------------

// cs holds c_{t-1} W_d^T on entry (no bias) and tanh(. + b_d) on exit.
template <typename T>
TRF_ALWAYS_INLINE void tlstm_forward_rows_impl(int64_t r0, int64_t r1, int64_t H, T* gates, T* cs,
                                               const T* b_d, const T* dt, T* c_state, T* cells,
                                               T* h_out, T* h_state) {
  for (int64_t b = r0; b < r1; ++b) {
    T* g = gates + b * 4 * H;
    T* csb = cs + b * H;
    T* c = c_state + b * H;
    const T decay = tlstm_decay(dt[b]);
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T s = tanh_act(csb[j] + (b_d != nullptr ? b_d[j] : T(0)));
      csb[j] = s;
      T c_new, h;
      lstm_cell_forward(g[j], g[H + j], g[2 * H + j], g[3 * H + j],
                        tlstm_adjusted_cell(c[j], s, decay), c_new, h);
      c[j] = c_new;
      cells[b * H + j] = c_new;
      h_out[b * H + j] = h;
      h_state[b * H + j] = h;
    }
  }
}

// Absolute rows. Writes dgates, d_pre (gradient of c W_d^T + b_d), dstar_cs (dc* * cs, summed
// into the delta_t gradient afterwards) and dc_state = the direct part of dc_{t-1}.
template <typename T>
TRF_ALWAYS_INLINE void tlstm_backward_rows_impl(int64_t r0, int64_t r1, int64_t H, const T* gates,
                                                const T* cells, const T* cs, PrevRows<T> c_prev,
                                                const T* dt, const T* gy, const T* dh_state,
                                                T* dc_state, T* dgates, T* d_pre, T* dstar_cs) {
  for (int64_t b = r0; b < r1; ++b) {
    const T* g = gates + b * 4 * H;
    const T* cp = c_prev.row(b);
    const T* csb = cs + b * H;
    T* dg = dgates + b * 4 * H;
    T* dc = dc_state + b * H;
    const T decay = tlstm_decay(dt[b]);
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T s = csb[j];
      T dstar;
      lstm_cell_backward(g[j], g[H + j], g[2 * H + j], g[3 * H + j],
                         tlstm_adjusted_cell(cp[j], s, decay), cells[b * H + j],
                         dh_state[b * H + j] + gy[b * H + j], dc[j], dg[j], dg[H + j],
                         dg[2 * H + j], dg[3 * H + j], dstar);
      d_pre[b * H + j] = dstar * (decay - T(1)) * (T(1) - s * s);
      dstar_cs[b * H + j] = dstar * s;
      dc[j] = dstar;
    }
  }
}

#define TRF_DEFINE_TIME_ROWS(T)                                                                  \
  TRF_CPU_CLONES void time_lstm_forward_rows(int variant, int64_t r0, int64_t r1, int64_t H,     \
                                             T* gates, const T* dt, const T* peep,               \
                                             const T* time_w, T* c_state, T* cells, T* cts,      \
                                             T* h_out, T* h_state) {                             \
    time_lstm_forward_rows_impl<T>(variant, r0, r1, H, gates, dt, peep, time_w, c_state, cells,  \
                                   cts, h_out, h_state);                                         \
  }                                                                                              \
  TRF_CPU_CLONES void time_lstm_backward_rows(                                                   \
      int variant, TimeLstmLayout L, int64_t r0, int64_t r1, int64_t H, const T* gates,          \
      const T* cells, const T* cts, PrevRows<T> c_prev, const T* peep, const T* time_w,          \
      const T* gy, const T* dh_state, const T* dt, T* dc_state, T* dgates, T* grad_dt,           \
      TimeLstmGradAcc<T> acc) {                                                                  \
    time_lstm_backward_rows_impl<T>(variant, L, r0, r1, H, gates, cells, cts, c_prev, peep,      \
                                    time_w, gy, dh_state, dt, dc_state, dgates, grad_dt, acc);   \
  }                                                                                              \
  TRF_CPU_CLONES void tlstm_forward_rows(int64_t r0, int64_t r1, int64_t H, T* gates, T* cs,     \
                                         const T* b_d, const T* dt, T* c_state, T* cells,        \
                                         T* h_out, T* h_state) {                                 \
    tlstm_forward_rows_impl<T>(r0, r1, H, gates, cs, b_d, dt, c_state, cells, h_out, h_state);   \
  }                                                                                              \
  TRF_CPU_CLONES void tlstm_backward_rows(int64_t r0, int64_t r1, int64_t H, const T* gates,     \
                                          const T* cells, const T* cs, PrevRows<T> c_prev,       \
                                          const T* dt, const T* gy, const T* dh_state,           \
                                          T* dc_state, T* dgates, T* d_pre, T* dstar_cs) {       \
    tlstm_backward_rows_impl<T>(r0, r1, H, gates, cells, cs, c_prev, dt, gy, dh_state,           \
                                dc_state, dgates, d_pre, dstar_cs);                              \
  }
TRF_DEFINE_TIME_ROWS(float)
TRF_DEFINE_TIME_ROWS(double)
#undef TRF_DEFINE_TIME_ROWS

// ---- sequence loops --------------------------------------------------------------------------

template <typename T>
void time_lstm_forward_block(int variant, TimeLstmLayout L, const Schedule& s, RowBlock blk,
                             int64_t H, const RecurrentWeight<T>& w_hh, const T* dt,
                             const T* peep,
                             const T* time_w, T* gates, T* cells, T* cts, T* out, T* h_state,
                             T* c_state) {
  const int64_t G = L.gates * H, Gh = L.h_gates * H;
  T* hs = h_state + blk.lo * H;
  T* cs = c_state + blk.lo * H;
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t off = s.offsets[t] + blk.lo;
    T* g = gates + off * G;
    recurrent_gemm<T>(n, H, Gh, hs, H, w_hh, g, G, /*accumulate=*/true);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      time_lstm_forward_rows(variant, r0, r1, H, g, dt + off, peep, time_w, cs, cells + off * H,
                             cts != nullptr ? cts + off * H : nullptr, out + off * H, hs);
    });
  }
}

// The row loop stays on this block's thread (no for_rows): it accumulates into acc. With `chunks`
// (streamed_grads.h) each step's dGates rows go to the block's chunk buffers, which also make dx
// and dW (acc.h_gather gives them [x, h_prev] rows); without, to the (N, G) dgates, and the
// h_prev rows to acc.h_gather->dst, for GEMMs after the loop.
template <typename T>
void time_lstm_backward_block(int variant, TimeLstmLayout L, const Schedule& s, RowBlock blk,
                              int64_t H, const RecurrentWeight<T>& w_hh, const T* peep,
                              const T* time_w,
                              const T* gates, const T* cells, const T* cts, const T* c0,
                              const T* grad_out, const T* dt, T* dh_state, T* dc_state, T* dgates,
                              T* grad_dt, TimeLstmGradAcc<T> acc, WeightGradChunks<T>* chunks) {
  const int64_t G = L.gates * H, Gh = L.h_gates * H;
  for (int64_t k = s.steps - 1; k >= 0; --k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t base = s.offsets[t];
    if (chunks != nullptr) chunks->make_room(n);
    // Where this block's dGates rows of the step go (row acc.dg_row0 first).
    T* dg_out = chunks != nullptr ? chunks->dg_rows() : dgates + base * G;
    acc.dg_row0 = chunks != nullptr ? blk.lo : 0;
    const auto c_prev = prev_rows(s, k, cells, c0, H);
    time_lstm_backward_rows(variant, L, blk.lo, blk.lo + n, H, gates + base * G, cells + base * H,
                            cts != nullptr ? cts + base * H : nullptr, c_prev, peep, time_w,
                            grad_out + base * H, dh_state, dt + base, dc_state, dg_out,
                            grad_dt + base, acc);
    const T* dg = dg_out + (blk.lo - acc.dg_row0) * G;  // the block's rows
    recurrent_gemm<T>(n, Gh, H, dg, G, w_hh, dh_state + blk.lo * H, H, /*accumulate=*/false);
    add_column_sums(dg, G, 0, n, acc.bias_sums);
    if (chunks != nullptr)
      chunks->step_done(s, *acc.h_gather, k, t, blk.lo, n);
    else
      acc.h_gather->rows(s, k, t, blk.lo, n);
  }
  if (chunks != nullptr) chunks->finish();
}

template <typename T>
void tlstm_forward_block(const Schedule& s, RowBlock blk, int64_t H,
                         const RecurrentWeight<T>& w_hh, const RecurrentWeight<T>& w_d,
                         const T* b_d, const T* dt, T* gates, T* cells, T* cs,
                         T* out, T* h_state, T* c_state) {
  const int64_t G = 4 * H;
  T* hs = h_state + blk.lo * H;
  T* c = c_state + blk.lo * H;
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t off = s.offsets[t] + blk.lo;
    T* g = gates + off * G;
    recurrent_gemm<T>(n, H, G, hs, H, w_hh, g, G, /*accumulate=*/true);
    recurrent_gemm<T>(n, H, H, c, H, w_d, cs + off * H, H, /*accumulate=*/false);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      tlstm_forward_rows(r0, r1, H, g, cs + off * H, b_d, dt + off, c, cells + off * H,
                         out + off * H, hs);
    });
  }
}

template <typename T>
void tlstm_backward_block(const Schedule& s, RowBlock blk, int64_t H,
                          const RecurrentWeight<T>& w_hh, const RecurrentWeight<T>& w_d,
                          const T* gates, const T* cells, const T* cs, const T* c0,
                          const T* dt, const T* grad_out, T* dh_state, T* dc_state, T* dgates,
                          T* d_pre, T* dstar_cs, const PrevStateGather<T>& h_gather,
                          const PrevStateGather<T>& c_gather, T* gate_sums, T* d_pre_sums) {
  const int64_t G = 4 * H;
  for (int64_t k = s.steps - 1; k >= 0; --k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t base = s.offsets[t];
    const auto c_prev = prev_rows(s, k, cells, c0, H);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      tlstm_backward_rows(blk.lo + r0, blk.lo + r1, H, gates + base * G, cells + base * H,
                          cs + base * H, c_prev, dt + base, grad_out + base * H, dh_state,
                          dc_state, dgates + base * G, d_pre + base * H, dstar_cs + base * H);
    });
    const int64_t row0 = base + blk.lo;
    recurrent_gemm<T>(n, G, H, dgates + row0 * G, G, w_hh, dh_state + blk.lo * H, H,
                      /*accumulate=*/false);
    recurrent_gemm<T>(n, H, H, d_pre + row0 * H, H, w_d, dc_state + blk.lo * H, H,
                      /*accumulate=*/true);
    h_gather.rows(s, k, t, blk.lo, n);
    c_gather.rows(s, k, t, blk.lo, n);
    add_column_sums(static_cast<const T*>(dgates + base * G), G, blk.lo, n, gate_sums);
    add_column_sums(static_cast<const T*>(d_pre + base * H), H, blk.lo, n, d_pre_sums);
  }
}

// ---- fused forward (gate_panels.h) ----------------------------------------------------------
// With enough rows per step (fuse_input_projection), as in the LSTM: each tile of rows x one unit
// chunk computes [x, h_prev] @ [W_ih; W_hh]^T for its units, every gate from x and the first
// h_gates (those that see h; the time gates do not) from h_prev too, then runs the time cell on
// those units while they are in cache. The per-step pass this replaces read back an (N, G)
// projection written by one GEMM long before, and the tiles do the same multiply-adds as the
// LSTM's at the same shape in variant 3 (5 gates x I + 3 x H against 4 x (I + H) at I = H).
// h_prev comes from the previous step's output rows, c is owned per (row, unit): threads may
// split the rows or the unit chunks (run_panel_split).
template <typename T>
struct TimeLstmFusedArgs {
  const Schedule* s;
  const GatePanels* w;
  const T* packed;
  int64_t H;
  const T* input;  // (N, I)
  const T* bias;   // (G) or null
  const T* dt;     // (N)
  const T* peep;
  const T* time_w;
  T* gates;  // (N, G): the activations, for the backward; null at inference (a scratch instead)
  T* cells;  // (N, H): the carried cell c'; null at inference
  T* cts;    // (N, H): the output cell ct (variants 2 and 3); null in variant 1 and at inference
  T* out;
  T* c_state;
  const T* h0;
};

template <typename T>
struct TimeLstmFusedRows {
  const T* x;
  int64_t I;
  PrevRows<T> prev;
  T* g;  // the step's gate rows, or the scratch (kScratchRows rows) at inference
  bool scratch;
  int64_t G;
  const T* bias;
  TRF_ALWAYS_INLINE const T* x_row(int64_t b) const { return x + b * I; }
  TRF_ALWAYS_INLINE const T* a(int64_t b) const { return prev.row(b); }
  TRF_ALWAYS_INLINE const T* init(int64_t) const { return bias; }
  TRF_ALWAYS_INLINE T* dst(int64_t b) const {
    return scratch ? g + (b % kScratchRows) * G : g + b * G;
  }
};

// The cell on rows [b0, b1) x units [j0, j1) of one step (the rows' pointers are the step's);
// cells and cts null at inference.
template <typename T, int V>
struct TimeLstmFusedEpilogue {
  const TimeLstmFusedRows<T>* rows;
  int64_t H;
  const T* dt;
  const T* peep;
  const T* time_w;
  T *c_state, *cells, *cts, *out;
  TRF_ALWAYS_INLINE void operator()(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    if (!rows->scratch) {
      time_lstm_cells<T, V>(b0, b1, j0, j1, H, rows->g, dt, peep, time_w, c_state, cells, cts,
                            out, nullptr);
      return;
    }
    for (int64_t b = b0; b < b1; ++b)  // a scratch row a call: rows map to slots b mod 16
      time_lstm_cells<T, V>(0, 1, j0, j1, H, rows->dst(b), dt + b, peep, time_w,
                            c_state + b * H, nullptr, nullptr, out + b * H, nullptr);
  }
};

#if TRF_HAVE_PANELS
// The epilogue above for fp32 on AVX-512: whole 16-unit chunks through
// vec::time_lstm_cell_forward16 (csrc/cpu/vec_activations.h), a partial last chunk through the
// scalar loop. Not always_inline, for the reason given at LstmFusedEpilogueAvx512 (lstm_cpu.cpp).
template <int V>
struct TimeLstmFusedEpilogueAvx512 {
  const TimeLstmFusedEpilogue<float, V>* scalar;
  TRF_TARGET_AVX512 void operator()(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    constexpr TimeLstmLayout L = time_lstm_layout(V);
    const TimeLstmFusedEpilogue<float, V>& e = *scalar;
    if (j1 - j0 != 16) {
      e(b0, b1, j0, j1);
      return;
    }
    const int64_t H = e.H;
    const vec::TimeLstmUnitWeights16 w = vec::load_time_unit_weights16(e.peep, e.time_w, H, j0);
    const bool save = !e.rows->scratch;
    for (int64_t b = b0; b < b1; ++b) {
      float* row = e.rows->dst(b) + j0;
      __m512 i = _mm512_loadu_ps(row + L.i * H), g = _mm512_loadu_ps(row + L.g * H);
      __m512 o = _mm512_loadu_ps(row + L.o * H), t1 = _mm512_loadu_ps(row + L.t1 * H);
      __m512 f = V != kTimeLstm3 ? _mm512_loadu_ps(row + L.f * H) : _mm512_setzero_ps();
      __m512 t2 = V != kTimeLstm1 ? _mm512_loadu_ps(row + L.t2 * H) : _mm512_setzero_ps();
      float* cs = e.c_state + b * H + j0;
      __m512 c_next, ct, h;
      vec::time_lstm_cell_forward16<V>(i, f, g, o, t1, t2, _mm512_loadu_ps(cs),
                                       _mm512_set1_ps(e.dt[b]), w, c_next, ct, h);
      _mm512_storeu_ps(cs, c_next);
      _mm512_storeu_ps(e.out + b * H + j0, h);
      if (!save) continue;
      _mm512_storeu_ps(row + L.i * H, i);
      if constexpr (V != kTimeLstm3) _mm512_storeu_ps(row + L.f * H, f);
      _mm512_storeu_ps(row + L.g * H, g);
      _mm512_storeu_ps(row + L.o * H, o);
      _mm512_storeu_ps(row + L.t1 * H, t1);
      if constexpr (V != kTimeLstm1) {
        _mm512_storeu_ps(row + L.t2 * H, t2);
        _mm512_storeu_ps(e.cts + b * H + j0, ct);
      }
      _mm512_storeu_ps(e.cells + b * H + j0, c_next);
    }
  }
};
#endif

template <PanelIsa Isa, typename T, int V>
TRF_ALWAYS_INLINE void time_lstm_fused_loop_impl(const TimeLstmFusedArgs<T>& A, int64_t b0,
                                                 int64_t b1, int64_t u0, int64_t u1,
                                                 bool barrier) {
  constexpr TimeLstmLayout L = time_lstm_layout(V);
  const Schedule& s = *A.s;
  const int64_t H = A.H, G = L.gates * H, I = A.w->K1;
  // Inference: no gate matrix, only this scratch; no cells or cts.
  const bool scratch = A.gates == nullptr;
  std::vector<T> scratch_rows(scratch ? kScratchRows * G : 0);
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t e = std::min(b1, s.batch_sizes[t]);
    if (e > b0 && u1 > u0) {
      const int64_t off = s.offsets[t];
      const TimeLstmFusedRows<T> rows{A.input + off * I,
                                      I,
                                      prev_rows(s, k, static_cast<const T*>(A.out), A.h0, H),
                                      scratch ? scratch_rows.data() : A.gates + off * G,
                                      scratch,
                                      G,
                                      A.bias};
      const TimeLstmFusedEpilogue<T, V> epi{&rows,
                                            H,
                                            A.dt + off,
                                            A.peep,
                                            A.time_w,
                                            A.c_state,
                                            scratch ? nullptr : A.cells + off * H,
                                            !scratch && A.cts != nullptr ? A.cts + off * H
                                                                         : nullptr,
                                            A.out + off * H};
#if TRF_HAVE_PANELS
      if constexpr (Isa == PanelIsa::kAvx512 && std::is_same_v<T, float>)
        panel_step<Isa, T, L.gates, L.h_gates>(b0, e, u0, u1, *A.w, A.packed, rows, H, H,
                                               TimeLstmFusedEpilogueAvx512<V>{&epi});
      else
#endif
        panel_step<Isa, T, L.gates, L.h_gates>(b0, e, u0, u1, *A.w, A.packed, rows, H, H, epi);
    }
    if (barrier) {
#pragma omp barrier
    }
  }
}

#if TRF_HAVE_PANELS
template <typename T, int V>
TRF_TARGET_AVX512 void time_lstm_fused_loop_avx512(const TimeLstmFusedArgs<T>& a, int64_t b0,
                                                   int64_t b1, int64_t u0, int64_t u1, bool bar) {
  time_lstm_fused_loop_impl<PanelIsa::kAvx512, T, V>(a, b0, b1, u0, u1, bar);
}
template <typename T, int V>
TRF_TARGET_AVX2 void time_lstm_fused_loop_avx2(const TimeLstmFusedArgs<T>& a, int64_t b0,
                                               int64_t b1, int64_t u0, int64_t u1, bool bar) {
  time_lstm_fused_loop_impl<PanelIsa::kAvx2, T, V>(a, b0, b1, u0, u1, bar);
}

template <typename T, int V>
void time_lstm_fused_loop(PanelIsa isa, const TimeLstmFusedArgs<T>& a, int64_t b0, int64_t b1,
                          int64_t u0, int64_t u1, bool bar) {
  if (isa == PanelIsa::kAvx512)
    time_lstm_fused_loop_avx512<T, V>(a, b0, b1, u0, u1, bar);
  else
    time_lstm_fused_loop_avx2<T, V>(a, b0, b1, u0, u1, bar);
}
#endif

template <typename T>
void time_lstm_forward_fused(PanelIsa isa, int variant, const Schedule& s, int64_t H,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const PanelSplit& split, const TimeLstmFusedArgs<T>& proto,
                             T* h_state) {
#if TRF_HAVE_PANELS
  const TimeLstmLayout L = time_lstm_layout(variant);
  const GatePanels w =
      gate_panels_for(w_hh, L.gates, H, panel_lanes(isa, sizeof(T)), w_ih, L.h_gates);
  TimeLstmFusedArgs<T> args = proto;
  args.w = &w;
  args.packed = w.storage.data_ptr<T>();
  const T* w_hh_p = w_hh.data_ptr<T>();
  const T* w_ih_p = w_ih.data_ptr<T>();
  run_panel_split(s, w, split, kMinRowsPerBlock,
                  [&](int64_t u0, int64_t u1) { pack_gate_chunks<T>(w, w_hh_p, w_ih_p, u0, u1); },
                  [&](int64_t b0, int64_t b1, int64_t u0, int64_t u1, bool barrier) {
                    if (variant == kTimeLstm1)
                      time_lstm_fused_loop<T, kTimeLstm1>(isa, args, b0, b1, u0, u1, barrier);
                    else if (variant == kTimeLstm2)
                      time_lstm_fused_loop<T, kTimeLstm2>(isa, args, b0, b1, u0, u1, barrier);
                    else
                      time_lstm_fused_loop<T, kTimeLstm3>(isa, args, b0, b1, u0, u1, barrier);
                  });
  final_state_from_rows(s, static_cast<const T*>(args.out), H, h_state);
#else
  TORCH_CHECK(false, "timerec_fast: fused CPU kernels are not compiled in");
#endif
}

// ---- ops ---------------------------------------------------------------------------------------

TimeShapes check_time_args(const char* cell, const at::Tensor& input, const at::Tensor& delta_t,
                           const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, int64_t gates, int64_t h_gates) {
  return check_time_shapes(cell, input, delta_t, h0, c0, w_ih, w_hh, gates, h_gates,
                           [&](int64_t) { check_cpu_dtype(input, cell); });
}

// save = false (inference): with the input projection in the tiles, no gate matrix, cells or cts
// are written (returned empty); the per-step BLAS loop (few rows) writes them anyway.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
time_lstm_forward_impl(const at::Tensor& input, const at::Tensor& delta_t,
                       const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& peep,
                       const at::Tensor& time_w, int64_t variant, bool reverse, bool save) {
  const auto L = checked_time_lstm_layout(variant);
  const auto d = check_time_args("TimeLSTM", input, delta_t, h0, c0, w_ih, w_hh, L.gates, L.h_gates);
  check_vector(bias, "bias", L.gates * d.H, input);
  check_matrix(peep, "peep", 3, d.H, input);
  check_matrix(time_w, "time_w", 3, d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  auto opts = input.options();
  const PanelIsa isa = panel_isa_for(s);
  const bool fused = isa != PanelIsa::kNone && fuse_input_projection(s);
  const int64_t saved_rows = save || !fused ? d.N : 0;
  at::Tensor cells = workspace_empty({saved_rows, d.H}, opts);
  at::Tensor cts = variant == kTimeLstm1 ? at::empty({0}, opts)
                                         : workspace_empty({saved_rows, d.H}, opts);
  at::Tensor out = at::empty({d.N, d.H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_state = c0.clone(at::MemoryFormat::Contiguous);
  at::Tensor dt = delta_t.contiguous();
  at::Tensor peep_c = peep.contiguous(), time_w_c = time_w.contiguous();
  if (fused) {
    const size_t elem = input.element_size();
    const GatePanels geometry =
        panel_geometry(input.size(1), d.H, d.H, L.gates, panel_lanes(isa, elem), L.h_gates);
    const PanelSplit split = choose_panel_split(s, geometry, elem, kMinRowsPerBlock);
    at::Tensor gates = workspace_empty({saved_rows, L.gates * d.H}, opts);
    at::Tensor x = input.contiguous(), h0_c = h0.contiguous();
    at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_time_lstm_forward_fused", [&] {
      const TimeLstmFusedArgs<scalar_t> args{
          &s, nullptr, nullptr, d.H, x.data_ptr<scalar_t>(),
          bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, dt.data_ptr<scalar_t>(),
          peep_c.data_ptr<scalar_t>(), time_w_c.data_ptr<scalar_t>(),
          save ? gates.data_ptr<scalar_t>() : nullptr, save ? cells.data_ptr<scalar_t>() : nullptr,
          save && variant != kTimeLstm1 ? cts.data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), c_state.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>()};
      time_lstm_forward_fused<scalar_t>(isa, static_cast<int>(variant), s, d.H,
                                        w_ih.contiguous(), w_hh.contiguous(), split, args,
                                        h_state.data_ptr<scalar_t>());
    });
    return {out, h_state, c_state, gates, cells, cts};
  }
  at::Tensor gates = cpu_input_projection(input, w_ih, bias);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_time_lstm_forward", [&] {
    const auto w_hh_r = RecurrentWeight<scalar_t>::for_forward(w_hh, s, isa);
    for_blocks(split_batch(s, kMinRowsPerBlock), [&](RowBlock blk) {
      time_lstm_forward_block<scalar_t>(
          static_cast<int>(variant), L, s, blk, d.H, w_hh_r,
          dt.data_ptr<scalar_t>(), peep_c.data_ptr<scalar_t>(), time_w_c.data_ptr<scalar_t>(),
          gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
          variant == kTimeLstm1 ? nullptr : cts.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          h_state.data_ptr<scalar_t>(), c_state.data_ptr<scalar_t>());
    });
  });
  return {out, h_state, c_state, gates, cells, cts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
time_lstm_forward_cpu(const at::Tensor& input, const at::Tensor& delta_t,
                      const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& peep,
                      const at::Tensor& time_w, int64_t variant, bool reverse) {
  return time_lstm_forward_impl(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep,
                                time_w, variant, reverse, /*save=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
time_lstm_inference_cpu(const at::Tensor& input, const at::Tensor& delta_t,
                        const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& peep,
                        const at::Tensor& time_w, int64_t variant, bool reverse) {
  auto r = time_lstm_forward_impl(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep,
                                  time_w, variant, reverse, /*save=*/false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
time_lstm_backward_cpu(const c10::optional<at::Tensor>& grad_output,
                       const c10::optional<at::Tensor>& grad_h_n,
                       const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                       const at::Tensor& delta_t, const at::Tensor& batch_sizes,
                       const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& peep, const at::Tensor& time_w,
                       const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                       const at::Tensor& cts, int64_t variant, bool reverse, bool input_grad) {
  const auto L = checked_time_lstm_layout(variant);
  const auto d = check_time_args("TimeLSTM", input, delta_t, h0, c0, w_ih, w_hh, L.gates, L.h_gates);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const int64_t H = d.H, G = L.gates * H, Gh = L.h_gates * H;
  check_matrix(gates, "gates", d.N, G, input);
  check_matrix(cells, "cells", d.N, H, input);
  if (variant != kTimeLstm1) check_matrix(cts, "cts", d.N, H, input);
  auto opts = input.options();
  at::Tensor gy = cpu_grad_or_zeros(grad_output, {d.N, H}, input);
  at::Tensor dh_state = grad_or_zeros(grad_h_n, {d.B, H}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor dc_state = grad_or_zeros(grad_c_n, {d.B, H}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor grad_dt = at::empty({d.N}, opts);
  at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous();
  at::Tensor cts_c = variant == kTimeLstm1 ? cells_c : cts.contiguous();
  at::Tensor c0_c = c0.contiguous(), h0_c = h0.contiguous(), out_c = output.contiguous();
  at::Tensor w_hh_c = w_hh.contiguous(), peep_c = peep.contiguous(), time_w_c = time_w.contiguous();
  at::Tensor dt = delta_t.contiguous();
  const auto blocks = split_batch(s, kMinRowsPerBlock);
  const int64_t nb = static_cast<int64_t>(blocks.size());
  at::Tensor sums = at::zeros({nb, 6, H}, opts), scratch = at::empty({nb, H}, opts);
  at::Tensor bias_sums = at::zeros({nb, G}, opts);
  const int64_t I = input.size(1);
  // dW_hh from the h gates' columns (the first Gh).
  const auto streamed = StreamedGradBuffers::for_call(blocks, G, Gh, I, H, /*hidden_side=*/false,
                                                      input_grad, d.N, opts);
  const bool stream = streamed.has_value();
  at::Tensor dgates = stream ? at::Tensor() : workspace_empty({d.N, G}, opts);
  at::Tensor h_prev = stream ? at::Tensor() : workspace_empty({d.N, H}, opts);
  at::Tensor x_c = stream ? input.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_time_lstm_backward", [&] {
    const PanelIsa isa = per_step_panel_isa(s);
    const auto w_hh_r = RecurrentWeight<scalar_t>::prepare(w_hh_c, isa);
    const auto w_ih_r = stream && input_grad ? RecurrentWeight<scalar_t>::prepare(w_ih, isa)
                                             : RecurrentWeight<scalar_t>();
    // Streamed: [x, h_prev] rows for the chunks; else h_prev rows into the (N, H) matrix.
    const PrevStateGather<scalar_t> h_gather{stream ? x_c.data_ptr<scalar_t>() : nullptr,
                                             stream ? I : 0, out_c.data_ptr<scalar_t>(),
                                             h0_c.data_ptr<scalar_t>(), H,
                                             stream ? nullptr : h_prev.data_ptr<scalar_t>()};
    for_blocks_indexed(blocks, [&](const RowBlock& blk, int64_t i) {
      auto chunks = stream ? streamed->block<scalar_t>(i, &w_ih_r) : WeightGradChunks<scalar_t>();
      time_lstm_backward_block<scalar_t>(
          static_cast<int>(variant), L, s, blk, H, w_hh_r,
          peep_c.data_ptr<scalar_t>(), time_w_c.data_ptr<scalar_t>(),
          gates_c.data_ptr<scalar_t>(), cells_c.data_ptr<scalar_t>(),
          variant == kTimeLstm1 ? nullptr : cts_c.data_ptr<scalar_t>(), c0_c.data_ptr<scalar_t>(),
          gy.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), dh_state.data_ptr<scalar_t>(),
          dc_state.data_ptr<scalar_t>(), stream ? nullptr : dgates.data_ptr<scalar_t>(),
          grad_dt.data_ptr<scalar_t>(),
          TimeLstmGradAcc<scalar_t>{sums.data_ptr<scalar_t>() + i * 6 * H,
                                    scratch.data_ptr<scalar_t>() + i * H,
                                    bias_sums.data_ptr<scalar_t>() + i * G, &h_gather, 0},
          stream ? &chunks : nullptr);
    });
  });
  at::Tensor unit_grads = sums.sum(0);  // (6, H): p_i, p_f, p_o, w_t1, w_t2, w_o
  at::Tensor grad_input, grad_w_ih, grad_w_hh;
  if (stream) {
    std::tie(grad_input, grad_w_ih, grad_w_hh) = streamed->gradients();
  } else {
    grad_input = input_grad ? at::mm(dgates, w_ih) : at::empty({0}, opts);
    grad_w_ih = at::mm(dgates.t(), input);
    grad_w_hh = at::mm(dgates.narrow(1, 0, Gh).t(), h_prev);
  }
  return {grad_input, grad_dt, dh_state, dc_state, grad_w_ih, grad_w_hh, bias_sums.sum(0),
          unit_grads.narrow(0, 0, 3).clone(), unit_grads.narrow(0, 3, 3).clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
tlstm_forward_cpu(const at::Tensor& input, const at::Tensor& delta_t,
                  const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& w_d,
                  const c10::optional<at::Tensor>& b_d, bool reverse) {
  const auto d = check_time_args("TimeLSTM(tlstm)", input, delta_t, h0, c0, w_ih, w_hh, 4, 4);
  check_vector(bias, "bias", 4 * d.H, input);
  check_matrix(w_d, "w_d", d.H, d.H, input);
  check_vector(b_d, "b_d", d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  at::Tensor gates = cpu_input_projection(input, w_ih, bias);
  auto opts = input.options();
  at::Tensor cells = workspace_empty({d.N, d.H}, opts), cs = workspace_empty({d.N, d.H}, opts);
  at::Tensor out = at::empty({d.N, d.H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_state = c0.clone(at::MemoryFormat::Contiguous);
  at::Tensor dt = delta_t.contiguous();
  at::Tensor b_d_c = b_d.has_value() ? b_d->contiguous() : at::Tensor();
  const PanelIsa isa = panel_isa_for(s);  // W_hh and W_d share the step's rows
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_tlstm_forward", [&] {
    const auto w_hh_r = RecurrentWeight<scalar_t>::for_forward(w_hh, s, isa);
    const auto w_d_r = RecurrentWeight<scalar_t>::for_forward(w_d, s, isa);
    for_blocks(split_batch(s, kMinRowsPerBlock), [&](RowBlock blk) {
      tlstm_forward_block<scalar_t>(
          s, blk, d.H, w_hh_r, w_d_r,
          b_d.has_value() ? b_d_c.data_ptr<scalar_t>() : nullptr, dt.data_ptr<scalar_t>(),
          gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(), c_state.data_ptr<scalar_t>());
    });
  });
  return {out, h_state, c_state, gates, cells, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
tlstm_backward_cpu(const c10::optional<at::Tensor>& grad_output,
                   const c10::optional<at::Tensor>& grad_h_n,
                   const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                   const at::Tensor& delta_t, const at::Tensor& batch_sizes, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const at::Tensor& w_d, const at::Tensor& output, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& cs, bool reverse, bool input_grad) {
  const auto d = check_time_args("TimeLSTM(tlstm)", input, delta_t, h0, c0, w_ih, w_hh, 4, 4);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const int64_t H = d.H;
  check_matrix(gates, "gates", d.N, 4 * H, input);
  check_matrix(cells, "cells", d.N, H, input);
  check_matrix(cs, "cs", d.N, H, input);
  auto opts = input.options();
  at::Tensor gy = cpu_grad_or_zeros(grad_output, {d.N, H}, input);
  at::Tensor dh_state = grad_or_zeros(grad_h_n, {d.B, H}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor dc_state = grad_or_zeros(grad_c_n, {d.B, H}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor dgates = workspace_empty({d.N, 4 * H}, opts);
  at::Tensor d_pre = workspace_empty({d.N, H}, opts), dstar_cs = workspace_empty({d.N, H}, opts);
  at::Tensor h_prev = workspace_empty({d.N, H}, opts), c_prev = workspace_empty({d.N, H}, opts);
  at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous(), cs_c = cs.contiguous();
  at::Tensor c0_c = c0.contiguous(), h0_c = h0.contiguous(), out_c = output.contiguous();
  at::Tensor w_hh_c = w_hh.contiguous(), w_d_c = w_d.contiguous(), dt = delta_t.contiguous();
  const auto blocks = split_batch(s, kMinRowsPerBlock);
  // Per row block: column sums of dgates (4H) and of d_pre (H), the bias gradients' partial sums.
  at::Tensor sums = at::zeros({static_cast<int64_t>(blocks.size()), 5 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_tlstm_backward", [&] {
    const auto w_hh_r = RecurrentWeight<scalar_t>::prepare(w_hh_c, per_step_panel_isa(s));
    const auto w_d_r = RecurrentWeight<scalar_t>::prepare(w_d_c, per_step_panel_isa(s));
    const PrevStateGather<scalar_t> h_gather{nullptr, 0, out_c.data_ptr<scalar_t>(),
                                             h0_c.data_ptr<scalar_t>(), H,
                                             h_prev.data_ptr<scalar_t>()};
    const PrevStateGather<scalar_t> c_gather{nullptr, 0, cells_c.data_ptr<scalar_t>(),
                                             c0_c.data_ptr<scalar_t>(), H,
                                             c_prev.data_ptr<scalar_t>()};
    for_blocks_indexed(blocks, [&](const RowBlock& blk, int64_t i) {
      scalar_t* block_sums = sums.data_ptr<scalar_t>() + i * 5 * H;
      tlstm_backward_block<scalar_t>(
          s, blk, H, w_hh_r, w_d_r,
          gates_c.data_ptr<scalar_t>(), cells_c.data_ptr<scalar_t>(), cs_c.data_ptr<scalar_t>(),
          c0_c.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
          dh_state.data_ptr<scalar_t>(), dc_state.data_ptr<scalar_t>(),
          dgates.data_ptr<scalar_t>(), d_pre.data_ptr<scalar_t>(), dstar_cs.data_ptr<scalar_t>(),
          h_gather, c_gather, block_sums, block_sums + 4 * H);
    });
  });
  const at::Tensor total = sums.sum(0);
  // d decay / d dt, elementwise on delta_t (the same formula as tlstm_decay_grad).
  at::Tensor l = at::log(delta_t + 2.718281828459045);
  at::Tensor grad_dt = dstar_cs.sum(1) * (-1.0 / (l * l * (delta_t + 2.718281828459045)));
  at::Tensor grad_input = input_grad ? at::mm(dgates, w_ih) : at::empty({0}, opts);
  return {grad_input, grad_dt, dh_state, dc_state, at::mm(dgates.t(), input),
          at::mm(dgates.t(), h_prev), total.narrow(0, 0, 4 * H), at::mm(d_pre.t(), c_prev),
          total.narrow(0, 4 * H, H)};
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, CPU, m) {
  m.impl("time_lstm_forward", &time_lstm_forward_cpu);
  m.impl("time_lstm_inference", &time_lstm_inference_cpu);
  m.impl("time_lstm_backward", &time_lstm_backward_cpu);
  m.impl("tlstm_forward", &tlstm_forward_cpu);
  m.impl("tlstm_backward", &tlstm_backward_cpu);
}

}  // namespace timerec::cpu
