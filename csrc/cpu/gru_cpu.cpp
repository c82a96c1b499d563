// GRU layer, CPU. Same structure as the LSTM: one input GEMM for all steps; per step one recurrent
// GEMM (into a scratch row block, since r multiplies only the hidden part of n) and one fused
// pointwise pass; BPTT backward with the weight and input gradients as large GEMMs afterwards.
#include <torch/library.h>

#include "../include/timerec/gru_cell.h"
#include "cpu_blas.h"
#include "cpu_kernels.h"
#include "gate_panels.h"
#include "streamed_grads.h"
#include "vec_activations.h"
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

// Rows are absolute within the step. dh = dh_state + grad_out; writes dxg (the gradients of the
// input-side pre-activations), the step's hidden-side ones dhg_step = [dr, dz, dn * r] (a
// (B, 3H) buffer reused every step, the A operand of the dh GEMM), their n part dhn for dW_hh,
// and dh_state = dh * z (the part that bypasses W_hh; the GEMM adds the rest). The r and z parts
// of the hidden side equal the input side's, so only dhn is kept for all steps: N x H, not 3H.
// dxg and dhg_step hold row `row0` first; dhn_rows may be null (the streamed backward reads dhn
// from its dhg rows).
template <typename T>
TRF_ALWAYS_INLINE void gru_backward_rows_impl(int64_t r0, int64_t r1, int64_t H, const T* gates,
                                              const T* hn, PrevRows<T> h_prev, const T* gy,
                                              T* dh_state, T* dxg, T* dhg_step, T* dhn_rows,
                                              int64_t row0) {
  for (int64_t b = r0; b < r1; ++b) {
    const T* g = gates + b * 3 * H;
    const T* hnb = hn + b * H;
    const T* hp = h_prev.row(b);
    const T* gyb = gy + b * H;
    T* dhs = dh_state + b * H;
    T* dx = dxg + (b - row0) * 3 * H;
    T* dhh = dhg_step + (b - row0) * 3 * H;
    T* dhn_b = dhn_rows != nullptr ? dhn_rows + b * H : nullptr;
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
      if (dhn_b != nullptr) dhn_b[j] = dhn;
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
                                        T* dh_state, T* dxg, T* dhg_step, T* dhn_rows,           \
                                        int64_t row0) {                                          \
    gru_backward_rows_impl<T>(r0, r1, H, gates, hn, h_prev, gy, dh_state, dxg, dhg_step,        \
                              dhn_rows, row0);                                                   \
  }
TRF_DEFINE_GRU_ROWS(float)
TRF_DEFINE_GRU_ROWS(double)
#undef TRF_DEFINE_GRU_ROWS

constexpr int64_t kMinRowsPerBlock = 8;

// w_hh: W_hh (3H x H) for the product h W_hh^T; hg_scratch (B, 3H).
template <typename T>
void gru_forward_block(const Schedule& s, RowBlock blk, int64_t H, const RecurrentWeight<T>& w_hh,
                       const T* b_hh,
                       T* gates, T* hn, T* out, T* h_state, T* hg_scratch) {
  const int64_t G = 3 * H;
  T* hs = h_state + blk.lo * H;
  T* hg = hg_scratch + blk.lo * G;
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t off = s.offsets[t] + blk.lo;
    recurrent_gemm<T>(n, H, G, hs, H, w_hh, hg, G, /*accumulate=*/false);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      gru_forward_rows(r0, r1, H, gates + off * G, hg, b_hh, hs, hn + off * H, out + off * H);
    });
  }
}

// With `chunks` (streamed_grads.h) the step's dxg rows and hidden-side rows [dr, dz, dn * r] go
// to the block's chunk buffers, which also make dx and dW (gather gives them [x, h_prev] rows);
// without, dxg and dhn rows to the (N, ...) matrices dxg and dhn, and the h_prev rows to
// gather.dst, for GEMMs after the loop.
template <typename T>
void gru_backward_block(const Schedule& s, RowBlock blk, int64_t H, const RecurrentWeight<T>& w_hh,
                        const T* gates, const T* hn, const T* out, const T* h0, const T* grad_out,
                        T* dh_state, T* dxg, T* dhg_step, T* dhn,
                        const PrevStateGather<T>& gather, T* dxg_sums, T* dhn_sums,
                        WeightGradChunks<T>* chunks) {
  const int64_t G = 3 * H;
  for (int64_t k = s.steps - 1; k >= 0; --k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t base = s.offsets[t];
    if (chunks != nullptr) chunks->make_room(n);
    // Where this block's rows of the step go (row `row0` first).
    T* dxg_out = chunks != nullptr ? chunks->dg_rows() : dxg + base * G;
    T* dhg_out = chunks != nullptr ? chunks->dg_h_rows() : dhg_step;
    const int64_t row0 = chunks != nullptr ? blk.lo : 0;
    T* dhn_out = chunks != nullptr ? nullptr : dhn + base * H;
    const auto h_prev = prev_rows(s, k, out, h0, H);
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      gru_backward_rows(blk.lo + r0, blk.lo + r1, H, gates + base * G, hn + base * H, h_prev,
                        grad_out + base * H, dh_state, dxg_out, dhg_out, dhn_out, row0);
    });
    const T* dx_rows = dxg_out + (blk.lo - row0) * G;  // the block's rows
    const T* dh_rows = dhg_out + (blk.lo - row0) * G;
    recurrent_gemm<T>(n, G, H, dh_rows, G, w_hh, dh_state + blk.lo * H, H, /*accumulate=*/true);
    add_column_sums(dx_rows, G, 0, n, dxg_sums);
    if (chunks != nullptr) {
      add_column_sums_strided(dh_rows + 2 * H, G, H, n, dhn_sums);  // the dhn columns
      chunks->step_done(s, gather, k, t, blk.lo, n);
    } else {
      add_column_sums(static_cast<const T*>(dhn + base * H), H, blk.lo, n, dhn_sums);
      gather.rows(s, k, t, blk.lo, n);
    }
  }
  if (chunks != nullptr) chunks->finish();
}

// ---- fused forward (gate_panels.h) ----------------------------------------------------------
// Per tile: the hidden-side products h W_hh^T + b_hh of one unit chunk (into a per-thread scratch
// row, since r multiplies only their n part), then the cell on those units. As in the LSTM, h_prev
// comes from the previous step's output rows, so threads may split the hidden units.
//
// With enough rows per step (fuse_input_projection) the tile makes the input projection too, as
// the LSTM's does, instead of reading back an (N, 3H) matrix one GEMM wrote for every step. r
// multiplies only the hidden part of n, so the tile keeps four gates, [r, z, n_h, n_x]: x feeds
// all four through W_ih' = [W_ir; W_iz; 0; W_in] (the zero block costs I multiply-adds of 4I + 3H
// per unit), h the first three through W_hh = [W_hr; W_hz; W_hn] (GatePanels::h_gates = 3), and
// the accumulators start from [b_ir + b_hr, b_iz + b_hz, b_hn, b_in].

template <typename T>
struct GruFusedArgs {
  const Schedule* s;
  const GatePanels* w;
  const T* packed;
  int64_t H;
  const T* bias;   // the tiles' starting values: b_hh (3H), or the four fused gates' (4H); or null
  T* gates;        // (N, 3H): r, z, n; the input projection before them when not fused; null at
                   // inference with the input fused in
  T* hn;           // (N, H); null at inference (nothing saved for a backward)
  T* out;
  const T* h0;
  const T* input;  // (N, I) when the input projection is fused in (w->K1 = I > 0)
};

template <typename T>
struct GruFusedRows {
  PrevRows<T> prev;
  T* scratch;
  int64_t G;  // a scratch row: 3H, or 4H with the input fused in
  const T* bias;
  const T* x;  // the step's input rows (fused input only)
  int64_t I;
  TRF_ALWAYS_INLINE const T* x_row(int64_t b) const { return x + b * I; }
  TRF_ALWAYS_INLINE const T* a(int64_t b) const { return prev.row(b); }
  TRF_ALWAYS_INLINE const T* init(int64_t) const { return bias; }
  TRF_ALWAYS_INLINE T* dst(int64_t b) const { return scratch + (b % kScratchRows) * G; }
};

// save: write the activated gates (into g) and hn for the backward. Without it (inference) g is
// only read, as the input projection when that is not fused in (else g is null), and hn is null.
template <typename T>
struct GruFusedEpilogue {
  const GruFusedRows<T>* rows;
  int64_t H;
  T *g, *hn, *out;  // rows of this step
  bool save;
  TRF_ALWAYS_INLINE void operator()(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    cells(b0, b1, j0, j1);
    prefetch_next(b0, b1, j0);
  }
  TRF_ALWAYS_INLINE void cells(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    const bool fused_input = rows->I > 0;
    for (int64_t b = b0; b < b1; ++b) {
      const T* hg = rows->dst(b);
      const T* hp = rows->prev.row(b);
      T* ho = out + b * H;
      // Without save, g is null (fused input) or the input projection, overwritten in place
      // with the activations as before (nobody reads it again).
      T* x = g != nullptr ? g + b * 3 * H : nullptr;
      T* hnb = save ? hn + b * H : nullptr;
      if (fused_input) {  // hg: [r, z, n_h, n_x], both sides summed in r and z
#pragma GCC ivdep
        for (int64_t j = j0; j < j1; ++j) {
          T r = hg[j], z = hg[H + j], n = hg[3 * H + j];
          const T hnj = hg[2 * H + j];
          ho[j] = gru_cell_forward(r, z, n, T(0), T(0), hnj, hp[j]);
          if (save) {
            x[j] = r;
            x[H + j] = z;
            x[2 * H + j] = n;
            hnb[j] = hnj;
          }
        }
        continue;
      }
#pragma GCC ivdep
      for (int64_t j = j0; j < j1; ++j) {
        const T hnj = hg[2 * H + j];
        ho[j] = gru_cell_forward(x[j], x[H + j], x[2 * H + j], hg[j], hg[H + j], hnj, hp[j]);
        if (save) hnb[j] = hnj;
      }
    }
  }
  // The next row tile's lines of this unit chunk: its gate rows come from the input projection
  // (long out of cache) and its hn/out rows are written afresh. Fetching them now overlaps the
  // misses with that tile's K loop: perf put half of this loop's samples in the epilogue, on
  // those loads. Forward, B = 256, T = 50, 2 threads, Xeon: H = 128 1.10-1.13x, H = 64
  // 0.96-1.01x (the same process alternating with and without).
  TRF_ALWAYS_INLINE void prefetch_next(int64_t b0, int64_t b1, int64_t j0) const {
    for (int64_t b = b1; b < 2 * b1 - b0; ++b) {
      if (g != nullptr) {
        __builtin_prefetch(g + b * 3 * H + j0, 1);
        __builtin_prefetch(g + b * 3 * H + H + j0, 1);
        __builtin_prefetch(g + b * 3 * H + 2 * H + j0, 1);
      }
      if (save) __builtin_prefetch(hn + b * H + j0, 1);
      __builtin_prefetch(out + b * H + j0, 1);
    }
  }
};

#if TRF_HAVE_PANELS
// The epilogue above for fp32 on AVX-512: full 16-unit chunks through vec::gru_cell_forward16
// (csrc/cpu/vec_activations.h), a partial last chunk through the scalar cells. Not always_inline,
// for the reason given at LstmFusedEpilogueAvx512 (lstm_cpu.cpp).
struct GruFusedEpilogueAvx512 {
  const GruFusedEpilogue<float>* scalar;
  TRF_TARGET_AVX512 void operator()(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    const GruFusedEpilogue<float>& e = *scalar;
    const int64_t H = e.H;
    if (j1 - j0 != 16) {
      e.cells(b0, b1, j0, j1);
    } else {
      const bool fused_input = e.rows->I > 0;
      for (int64_t b = b0; b < b1; ++b) {
        // x: the gate rows (saved gates, or the input projection when not fused); null when
        // fused at inference.
        float* x = e.g != nullptr ? e.g + b * 3 * H + j0 : nullptr;
        const float* hg = e.rows->dst(b) + j0;
        const __m512 hn = _mm512_loadu_ps(hg + 2 * H);
        // Fused input: r and z already hold both sides, n_x sits after n_h (see above).
        __m512 r = _mm512_loadu_ps(fused_input ? hg : x);
        __m512 z = _mm512_loadu_ps(fused_input ? hg + H : x + H);
        __m512 n = _mm512_loadu_ps(fused_input ? hg + 3 * H : x + 2 * H);
        const __m512 hr = fused_input ? _mm512_setzero_ps() : _mm512_loadu_ps(hg);
        const __m512 hz = fused_input ? _mm512_setzero_ps() : _mm512_loadu_ps(hg + H);
        const __m512 h = vec::gru_cell_forward16(r, z, n, hr, hz, hn,
                                                 _mm512_loadu_ps(e.rows->prev.row(b) + j0));
        if (e.save) {
          _mm512_storeu_ps(x, r);
          _mm512_storeu_ps(x + H, z);
          _mm512_storeu_ps(x + 2 * H, n);
          _mm512_storeu_ps(e.hn + b * H + j0, hn);
        }
        _mm512_storeu_ps(e.out + b * H + j0, h);
      }
    }
    e.prefetch_next(b0, b1, j0);
  }
};
#endif

// One step's tiles with G gate columns per unit chunk (h feeds the first 3), ending in the AVX-512
// epilogue where it applies.
template <PanelIsa Isa, typename T, int G>
TRF_ALWAYS_INLINE void gru_panel_step(int64_t b0, int64_t b1, int64_t u0, int64_t u1,
                                      const GruFusedArgs<T>& A, const GruFusedRows<T>& rows,
                                      const GruFusedEpilogue<T>& epi) {
#if TRF_HAVE_PANELS
  if constexpr (Isa == PanelIsa::kAvx512 && std::is_same_v<T, float>)
    panel_step<Isa, T, G, 3>(b0, b1, u0, u1, *A.w, A.packed, rows, A.H, A.H,
                             GruFusedEpilogueAvx512{&epi});
  else
#endif
    panel_step<Isa, T, G, 3>(b0, b1, u0, u1, *A.w, A.packed, rows, A.H, A.H, epi);
}

template <PanelIsa Isa, typename T>
TRF_ALWAYS_INLINE void gru_fused_loop_impl(const GruFusedArgs<T>& A, int64_t b0, int64_t b1,
                                           int64_t u0, int64_t u1, bool barrier) {
  const Schedule& s = *A.s;
  const int64_t H = A.H, G = 3 * H, I = A.w->K1;
  const int64_t scratch_row = I > 0 ? 4 * H : G;
  std::vector<T> scratch(kScratchRows * scratch_row);
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t e = std::min(b1, s.batch_sizes[t]);
    if (e > b0 && u1 > u0) {
      const int64_t off = s.offsets[t];
      const GruFusedRows<T> rows{prev_rows(s, k, static_cast<const T*>(A.out), A.h0, H),
                                 scratch.data(), scratch_row, A.bias,
                                 I > 0 ? A.input + off * I : nullptr, I};
      const GruFusedEpilogue<T> epi{&rows, H, A.gates != nullptr ? A.gates + off * G : nullptr,
                                    A.hn != nullptr ? A.hn + off * H : nullptr, A.out + off * H,
                                    A.hn != nullptr};
      if (I > 0)  // [r, z, n_h, n_x] from x, the first three from h
        gru_panel_step<Isa, T, 4>(b0, e, u0, u1, A, rows, epi);
      else
        gru_panel_step<Isa, T, 3>(b0, e, u0, u1, A, rows, epi);
    }
    if (barrier) {
#pragma omp barrier
    }
  }
}

#if TRF_HAVE_PANELS
#define TRF_DEFINE_GRU_FUSED(T)                                                                  \
  TRF_TARGET_AVX512 void gru_fused_loop_avx512(const GruFusedArgs<T>& a, int64_t b0, int64_t b1, \
                                               int64_t u0, int64_t u1, bool bar) {               \
    gru_fused_loop_impl<PanelIsa::kAvx512, T>(a, b0, b1, u0, u1, bar);                           \
  }                                                                                              \
  TRF_TARGET_AVX2 void gru_fused_loop_avx2(const GruFusedArgs<T>& a, int64_t b0, int64_t b1,     \
                                           int64_t u0, int64_t u1, bool bar) {                   \
    gru_fused_loop_impl<PanelIsa::kAvx2, T>(a, b0, b1, u0, u1, bar);                             \
  }
TRF_DEFINE_GRU_FUSED(float)
TRF_DEFINE_GRU_FUSED(double)
#undef TRF_DEFINE_GRU_FUSED
#endif

// w_ih4: W_ih' = [W_ir; W_iz; 0; W_in] (4H, I) when the input projection is fused in (input then
// holds the (N, I) rows and bias the four gates' starting values), else undefined (gates then
// holds the input projection and bias is b_hh).
template <typename T>
void gru_forward_fused(PanelIsa isa, const Schedule& s, int64_t H, const at::Tensor& w_hh,
                       const at::Tensor& w_ih4, const T* input, const T* bias, T* gates, T* hn,
                       T* out, T* h_state, const T* h0, const PanelSplit& split) {
#if TRF_HAVE_PANELS
  const bool fused_input = w_ih4.defined();
  const GatePanels w =
      gate_panels_for(w_hh, fused_input ? 4 : 3, H, panel_lanes(isa, sizeof(T)), w_ih4, 3);
  const T* w_hh_p = w_hh.data_ptr<T>();
  const T* w_ih_p = fused_input ? w_ih4.data_ptr<T>() : nullptr;
  TORCH_INTERNAL_ASSERT(fused_input || gates != nullptr);  // unfused: gates hold the projection
  const GruFusedArgs<T> args{&s, &w, w.storage.data_ptr<T>(), H, bias, gates, hn, out, h0, input};
  run_panel_split(s, w, split, kMinRowsPerBlock,
                  [&](int64_t u0, int64_t u1) { pack_gate_chunks<T>(w, w_hh_p, w_ih_p, u0, u1); },
                  [&](int64_t b0, int64_t b1, int64_t u0, int64_t u1, bool barrier) {
                    if (isa == PanelIsa::kAvx512)
                      gru_fused_loop_avx512(args, b0, b1, u0, u1, barrier);
                    else
                      gru_fused_loop_avx2(args, b0, b1, u0, u1, barrier);
                  });
  final_state_from_rows(s, static_cast<const T*>(out), H, h_state);
#else
  TORCH_CHECK(false, "timerec_fast: fused CPU kernels are not compiled in");
#endif
}

// The dtype is checked by each op (check_cpu_dtype) before the shapes.
int64_t check_gru_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh) {
  return check_gru_shapes(input, h0, w_ih, w_hh, [](int64_t) {});
}

// save = false (inference): gates and hn, which only the backward reads, are returned empty where
// the panel loop runs (the fused-input one then keeps no (N, 3H) gate matrix at all).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_impl(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, bool save) {
  check_cpu_dtype(input, "GRU");
  const int64_t H = check_gru_args(input, h0, w_ih, w_hh);
  check_vector(b_ih, "b_ih", 3 * H, input);
  check_vector(b_hh, "b_hh", 3 * H, input);
  const int64_t N = input.size(0), B = h0.size(0), I = input.size(1);
  const Schedule s = make_schedule(batch_sizes, N, B, reverse);
  auto opts = input.options();
  PanelIsa isa = panel_isa_for(s);
  // The input projection joins the tiles (see the fused forward above) where that measured
  // faster: when the threads split the units (W_ih' and W_hh do not fit half a core's L2) or when
  // a unit chunk's fused panel fits in L1 (32 KB). In between, e.g. (B, T, I, H) =
  // (256, 50, 128, 128) with 56 KB panels split by rows, one oneDNN GEMM for the projection won
  // (fused: forward 0.94-1.16x, training 1.02-1.07x the unfused time; 4 pairs of processes, 2
  // threads); elsewhere the fused forward took 0.80-1.00x (256, 50, 64, 64) and 0.85-0.90x
  // (64, 200, 128, 256), training 0.94-1.07x and 0.90-0.97x.
  const size_t elem = input.element_size();
  const int lanes = isa != PanelIsa::kNone ? panel_lanes(isa, elem) : 1;
  const GatePanels fused_geometry = panel_geometry(I, H, H, 4, lanes, 3);
  PanelSplit split = isa != PanelIsa::kNone
                         ? choose_panel_split(s, fused_geometry, elem, kMinRowsPerBlock)
                         : PanelSplit{};
  const bool fuse_input =
      isa != PanelIsa::kNone && fuse_input_projection(s) &&
      (split.by_units ||
       fused_geometry.panel_size() * static_cast<int64_t>(elem) <= (int64_t{32} << 10));
  // The thread split of the fused loop, decided once (gru_forward_fused runs it as given) on
  // what the steps read: [W_ih', W_hh] with the input fused in, else W_hh.
  if (isa != PanelIsa::kNone && !fuse_input)
    split = choose_panel_split(s, panel_geometry(0, H, H, 3, lanes), elem, kMinRowsPerBlock);
  // A handful of rows per step: the small-GEMM loop is as fast single-threaded (B = 1: 3.0 vs
  // 3.2 us a step at H = 128); the panels win there only when split over threads by units.
  if (isa != PanelIsa::kNone && B <= kSmallGemmRows && !split.by_units) isa = PanelIsa::kNone;
  TORCH_INTERNAL_ASSERT(!fuse_input || isa != PanelIsa::kNone);  // >= 16 rows a step: B > 8
  // Only the panel loop can leave the saved matrices out (the per-step BLAS loop writes them).
  const bool panels = isa != PanelIsa::kNone && s.steps > 0;
  const bool keep = save || !panels;
  at::Tensor gates = fuse_input ? workspace_empty({keep ? N : 0, 3 * H}, opts)
                                : cpu_input_projection(input, w_ih, b_ih);
  at::Tensor hn = workspace_empty({keep ? N : 0, H}, opts);
  at::Tensor out = at::empty({N, H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  if (panels) {
    at::Tensor h0_c = h0.contiguous(), x = input.contiguous(), w_ih4, bias;
    const bool has_b_ih = b_ih.has_value() && b_ih->defined();
    const bool has_b_hh = b_hh.has_value() && b_hh->defined();
    if (fuse_input) {  // the four gates [r, z, n_h, n_x] of the fused tiles (see above)
      w_ih4 = at::cat({w_ih.narrow(0, 0, 2 * H), at::zeros({H, I}, w_ih.options()),
                       w_ih.narrow(0, 2 * H, H)})
                  .contiguous();
      if (has_b_ih || has_b_hh) {
        bias = at::zeros({4 * H}, opts);
        if (has_b_hh) bias.narrow(0, 0, 3 * H).add_(*b_hh);
        if (has_b_ih) {
          bias.narrow(0, 0, 2 * H).add_(b_ih->narrow(0, 0, 2 * H));
          bias.narrow(0, 3 * H, H).add_(b_ih->narrow(0, 2 * H, H));
        }
      }
    } else if (has_b_hh) {
      bias = b_hh->contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_gru_forward_fused", [&] {
      gru_forward_fused<scalar_t>(isa, s, H, w_hh.contiguous(), w_ih4,
                                  fuse_input ? x.data_ptr<scalar_t>() : nullptr,
                                  bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                  gates.numel() > 0 ? gates.data_ptr<scalar_t>() : nullptr,
                                  save ? hn.data_ptr<scalar_t>() : nullptr,
                                  out.data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
                                  h0_c.data_ptr<scalar_t>(), split);
    });
    return {out, h_state, gates, hn};
  }
  at::Tensor b_hh_c = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
  at::Tensor hg = at::empty({B, 3 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_gru_forward", [&] {
    const auto w_hh_r = RecurrentWeight<scalar_t>::for_forward(w_hh, s, isa);
    for_blocks(split_batch(s, kMinRowsPerBlock), [&](RowBlock blk) {
      gru_forward_block<scalar_t>(s, blk, H, w_hh_r,
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
  at::Tensor gy = cpu_grad_or_zeros(grad_output, {N, H}, input);
  at::Tensor dh_state = grad_or_zeros(grad_h_n, {B, H}, input).clone(at::MemoryFormat::Contiguous);
  const int64_t G = 3 * H, I = input.size(1);
  at::Tensor gates_c = gates.contiguous(), hn_c = hn.contiguous(), out_c = output.contiguous();
  at::Tensor h0_c = h0.contiguous(), w_hh_c = w_hh.contiguous();
  const auto blocks = split_batch(s, kMinRowsPerBlock);
  const int64_t nb = static_cast<int64_t>(blocks.size());
  // The hidden side's rows [dr, dz, dn * r] kept apart from the input side's.
  const auto streamed = StreamedGradBuffers::for_call(blocks, G, G, I, H, /*hidden_side=*/true,
                                                      input_grad, N, opts);
  const bool stream = streamed.has_value();
  at::Tensor dxg = stream ? at::Tensor() : workspace_empty({N, G}, opts);
  // (B, 3H): each row block uses its own rows
  at::Tensor dhg_step = stream ? at::Tensor() : workspace_empty({B, G}, opts);
  at::Tensor dhn = stream ? at::Tensor() : workspace_empty({N, H}, opts);
  at::Tensor h_prev = stream ? at::Tensor() : workspace_empty({N, H}, opts);
  at::Tensor x_c = stream ? input.contiguous() : at::Tensor();
  // Per row block: the column sums of dxg (3H) and of dhn (H), the bias gradients' partial sums.
  at::Tensor sums = at::zeros({nb, 4 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_gru_backward", [&] {
    const PanelIsa isa = per_step_panel_isa(s);
    const auto w_hh_r = RecurrentWeight<scalar_t>::prepare(w_hh_c, isa);
    const auto w_ih_r = stream && input_grad ? RecurrentWeight<scalar_t>::prepare(w_ih, isa)
                                             : RecurrentWeight<scalar_t>();
    // Streamed: [x, h_prev] rows for the chunks; else h_prev rows into the (N, H) matrix.
    const PrevStateGather<scalar_t> gather{stream ? x_c.data_ptr<scalar_t>() : nullptr,
                                           stream ? I : 0, out_c.data_ptr<scalar_t>(),
                                           h0_c.data_ptr<scalar_t>(), H,
                                           stream ? nullptr : h_prev.data_ptr<scalar_t>()};
    for_blocks_indexed(blocks, [&](const RowBlock& blk, int64_t i) {
      auto chunks = stream ? streamed->block<scalar_t>(i, &w_ih_r) : WeightGradChunks<scalar_t>();
      scalar_t* block_sums = sums.data_ptr<scalar_t>() + i * 4 * H;
      gru_backward_block<scalar_t>(s, blk, H, w_hh_r,
                                   gates_c.data_ptr<scalar_t>(), hn_c.data_ptr<scalar_t>(),
                                   out_c.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(),
                                   gy.data_ptr<scalar_t>(), dh_state.data_ptr<scalar_t>(),
                                   stream ? nullptr : dxg.data_ptr<scalar_t>(),
                                   stream ? nullptr : dhg_step.data_ptr<scalar_t>(),
                                   stream ? nullptr : dhn.data_ptr<scalar_t>(), gather,
                                   block_sums, block_sums + 3 * H, stream ? &chunks : nullptr);
    });
  });
  at::Tensor grad_input, grad_w_ih, grad_w_hh;
  if (stream) {
    std::tie(grad_input, grad_w_ih, grad_w_hh) = streamed->gradients();
  } else {
    grad_input = input_grad ? at::mm(dxg, w_ih) : at::empty({0}, opts);
    grad_w_ih = at::mm(dxg.t(), input);
    // The hidden side's r and z gradients are the input side's: dW_hh and b_hh reuse dxg for them.
    grad_w_hh = at::empty({G, H}, opts);
    at::Tensor grad_w_hh_rz = grad_w_hh.narrow(0, 0, 2 * H);
    at::Tensor grad_w_hh_n = grad_w_hh.narrow(0, 2 * H, H);
    at::mm_out(grad_w_hh_rz, dxg.narrow(1, 0, 2 * H).t(), h_prev);
    at::mm_out(grad_w_hh_n, dhn.t(), h_prev);
  }
  // The hidden side's r and z bias gradients are the input side's too.
  const at::Tensor total = sums.sum(0);
  at::Tensor grad_b_ih = total.narrow(0, 0, 3 * H);
  at::Tensor grad_b_hh = at::cat({total.narrow(0, 0, 2 * H), total.narrow(0, 3 * H, H)});
  return {grad_input, dh_state, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  return gru_forward_impl(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, /*save=*/true);
}

std::tuple<at::Tensor, at::Tensor> gru_inference_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  auto r = gru_forward_impl(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, /*save=*/false);
  return {std::get<0>(r), std::get<1>(r)};
}

TORCH_LIBRARY_IMPL(timerec_fast, CPU, m) {
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_inference", &gru_inference_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace timerec::cpu
