// LSTM layer, CPU: input projection for all steps as one GEMM, then per step one recurrent GEMM
// (accumulated into the precomputed gates) and one fused pointwise pass; backward is BPTT with the
// same structure, and the weight/input gradients as large GEMMs after the loop.
#include <torch/library.h>

#include <omp.h>

#include "../include/timerec/lstm_cell.h"
#include "cpu_blas.h"
#include "cpu_kernels.h"
#include "workspace.h"
#include "gate_panels.h"
#include "streamed_grads.h"
#include "vec_activations.h"

namespace timerec::cpu {
namespace {

// ---- pointwise row kernels -------------------------------------------------------------------

// Hidden units [j0, j1) of rows [r0, r1).
template <typename T>
TRF_ALWAYS_INLINE void lstm_forward_rows_impl(int64_t r0, int64_t r1, int64_t H, int64_t j0,
                                              int64_t j1, T* gates, T* c_state, T* cells,
                                              T* h_out, T* h_state) {
  for (int64_t b = r0; b < r1; ++b) {
    T* g = gates + b * 4 * H;
    T* cs = c_state + b * H;
    T* cl = cells + b * H;
    T* ho = h_out + b * H;
#pragma GCC ivdep
    for (int64_t j = j0; j < j1; ++j) {
      T c, h;
      lstm_cell_forward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], cs[j], c, h);
      cs[j] = c;
      cl[j] = c;
      ho[j] = h;
    }
    if (h_state != nullptr) std::memcpy(h_state + b * H + j0, ho + j0, (j1 - j0) * sizeof(T));
  }
}

// dh = dh_a + dh_b (dh_b may be null: the projected path has already summed them).
template <typename T>
TRF_ALWAYS_INLINE void lstm_backward_rows_impl(int64_t r0, int64_t r1, int64_t H, const T* gates,
                                               const T* cells, PrevRows<T> c_prev,
                                               const T* dh_a, int64_t ld_a, const T* dh_b,
                                               int64_t ld_b, T* dc_state, T* dgates,
                                               int64_t dg_row0) {
  for (int64_t b = r0; b < r1; ++b) {
    const T* g = gates + b * 4 * H;
    const T* cl = cells + b * H;
    const T* cp = c_prev.row(b);
    const T* da = dh_a + b * ld_a;
    const T* db = dh_b != nullptr ? dh_b + b * ld_b : nullptr;
    T* dc = dc_state + b * H;
    T* dg = dgates + (b - dg_row0) * 4 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T dh = db != nullptr ? da[j] + db[j] : da[j];
      T dcp;
      lstm_cell_backward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], cp[j], cl[j], dh, dc[j],
                         dg[j], dg[H + j], dg[2 * H + j], dg[3 * H + j], dcp);
      dc[j] = dcp;
    }
  }
}

#define TRF_DEFINE_LSTM_ROWS(T)                                                                  \
  TRF_CPU_CLONES void lstm_forward_rows(int64_t r0, int64_t r1, int64_t H, T* gates,             \
                                        T* c_state, T* cells, T* h_out, T* h_state) {            \
    lstm_forward_rows_impl<T>(r0, r1, H, 0, H, gates, c_state, cells, h_out, h_state);           \
  }                                                                                              \
  TRF_CPU_CLONES void lstm_forward_units(int64_t rows, int64_t H, int64_t j0, int64_t j1,        \
                                         T* gates, T* c_state, T* cells, T* h_out, T* h_state) { \
    lstm_forward_rows_impl<T>(0, rows, H, j0, j1, gates, c_state, cells, h_out, h_state);        \
  }                                                                                              \
  TRF_CPU_CLONES void lstm_backward_rows(int64_t r0, int64_t r1, int64_t H, const T* gates,      \
                                         const T* cells, PrevRows<T> c_prev, const T* dh_a,      \
                                         int64_t ld_a, const T* dh_b, int64_t ld_b,              \
                                         T* dc_state, T* dgates, int64_t dg_row0) {              \
    lstm_backward_rows_impl<T>(r0, r1, H, gates, cells, c_prev, dh_a, ld_a, dh_b, ld_b,          \
                               dc_state, dgates, dg_row0);                                       \
  }
TRF_DEFINE_LSTM_ROWS(float)
TRF_DEFINE_LSTM_ROWS(double)
#undef TRF_DEFINE_LSTM_ROWS

// ---- sequence loops --------------------------------------------------------------------------
// Each loop runs the whole sequence for one block of batch rows (see split_batch).
// The forward multiplies by W_hh^T and W_hr^T (RecurrentWeight::for_forward picks how to read
// them); the backward by W_hh (4H x P) and W_hr (P x H) as they are stored.

template <typename T>
void lstm_forward_block(const Schedule& s, RowBlock blk, int64_t H, int64_t P,
                        const RecurrentWeight<T>& w_hh, const RecurrentWeight<T>* w_hr, T* gates,
                        T* cells, T* hpre, T* out, T* h_state, T* c_state) {
  const int64_t G = 4 * H;
  T* hs = h_state + blk.lo * P;
  T* cs = c_state + blk.lo * H;
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t off = s.offsets[t] + blk.lo;
    T* g = gates + off * G;
    recurrent_gemm<T>(n, P, G, hs, P, w_hh, g, G, /*accumulate=*/true);  // g += h W_hh^T
    T* h_dst = w_hr != nullptr ? hpre + off * H : out + off * P;
    T* h_copy = w_hr != nullptr ? nullptr : hs;
    for_rows(n, G, [&](int64_t r0, int64_t r1) {
      lstm_forward_rows(r0, r1, H, g, cs, cells + off * H, h_dst, h_copy);
    });
    if (w_hr != nullptr) {  // h = (o * tanh(c)) W_hr^T
      recurrent_gemm<T>(n, H, P, h_dst, H, *w_hr, out + off * P, P, /*accumulate=*/false);
      std::memcpy(hs, out + off * P, n * P * sizeof(T));
    }
  }
}

// Few rows and several threads (e.g. one sequence at inference): the batch cannot be split, so
// the hidden units are. Each thread owns units [j0, j1): their four gate rows of W_hh (kept
// in its own cache across steps), their cell state and their slice of h. One barrier per step;
// h is double-buffered so a thread never overwrites the h another thread is still reading.
// Only for padded input without projection (every row active at every step).
template <typename T>
void lstm_forward_unit_split(const Schedule& s, int64_t H, const RecurrentWeight<T>& w_hh,
                             T* gates, T* cells,
                             T* out, T* h_state, T* c_state, T* h_spare, int threads) {
  const int64_t G = 4 * H, B = s.batch;
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t chunk = (H + nt - 1) / nt;
    const int64_t j0 = std::min(H, tid * chunk), j1 = std::min(H, j0 + chunk);
    T* bufs[2] = {h_state, h_spare};
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t off = s.offsets[s.time_at(k)];
      T* g = gates + off * G;
      const T* h_prev = bufs[k % 2];
      T* h_next = bufs[(k + 1) % 2];
      if (j1 > j0) {
        for (int64_t q = 0; q < 4; ++q)
          if (w_hh.by_rows)  // rows q*H + [j0, j1) of W_hh, or the same columns of W_hh^T
            small_gemm_nt(B, H, j1 - j0, h_prev, H, w_hh.data() + (q * H + j0) * H, H,
                          g + q * H + j0, G, true);
          else
            small_gemm(B, H, j1 - j0, h_prev, H, w_hh.data() + q * H + j0, G, g + q * H + j0, G,
                       true);
        lstm_forward_units(B, H, j0, j1, g, c_state, cells + off * H, out + off * H, h_next);
      }
#pragma omp barrier
    }
  }
  if (s.steps % 2 == 1) std::memcpy(h_state, h_spare, B * H * sizeof(T));
}

bool use_unit_split(const Schedule& s, int64_t H, bool proj, int threads) {
  // Measured on 2 cores (B=1, T=50): a loss at H=128 (the barrier costs more than half a step),
  // 1.5x faster than one thread at H=256 and H=512.
  if (proj || threads < 2 || H < 128 * threads) return false;  // threads: unit_split_threads()
  if (s.batch > kSmallGemmRows) return false;
  for (int64_t bs : s.batch_sizes)
    if (bs != s.batch) return false;
  return true;
}

// With `chunks` (streamed_grads.h) each step's dGates rows go to the block's chunk buffers, which
// also make dx and dW; without, to the (N, 4H) dgates, and the [x, h_prev] rows to gather.dst, for
// GEMMs after the loop.
template <typename T>
void lstm_backward_block(const Schedule& s, RowBlock blk, int64_t H, int64_t P,
                         const RecurrentWeight<T>& w_hh, const T* w_hr, const T* gates,
                         const T* cells, const T* c0,
                         const T* grad_out, T* dh_state, T* dc_state, T* dgates, T* dy, T* dhpre,
                         const PrevStateGather<T>& gather, T* db, WeightGradChunks<T>* chunks) {
  const int64_t G = 4 * H;
  for (int64_t k = s.steps - 1; k >= 0; --k) {
    const int64_t t = s.time_at(k);
    const int64_t n = blk.rows_at(s, t);
    if (n == 0) continue;
    const int64_t base = s.offsets[t];  // the row kernels index rows of the whole step
    if (chunks != nullptr) chunks->make_room(n);
    // Where this block's dGates rows of the step go: dg_out holds row dg_row0 first.
    T* dg_out = chunks != nullptr ? chunks->dg_rows() : dgates + base * G;
    const int64_t dg_row0 = chunks != nullptr ? blk.lo : 0;
    const auto c_prev = prev_rows(s, k, cells, c0, H);
    const T* gy = grad_out + base * P;
    if (w_hr != nullptr) {
      // dy = dL/dh_t (output + recurrence); the cell sees dy W_hr.
      T* dyt = dy + (base + blk.lo) * P;
      const T* dhs = dh_state + blk.lo * P;
      const T* gyb = gy + blk.lo * P;
      for (int64_t i = 0; i < n * P; ++i) dyt[i] = dhs[i] + gyb[i];
      recurrent_gemm<T>(n, P, H, dyt, P, w_hr, dhpre + blk.lo * H, H, /*accumulate=*/false);
      for_rows(n, G, [&](int64_t r0, int64_t r1) {
        lstm_backward_rows(blk.lo + r0, blk.lo + r1, H, gates + base * G, cells + base * H,
                           c_prev, dhpre, H, static_cast<const T*>(nullptr), 0, dc_state, dg_out,
                           dg_row0);
      });
    } else {
      for_rows(n, G, [&](int64_t r0, int64_t r1) {
        lstm_backward_rows(blk.lo + r0, blk.lo + r1, H, gates + base * G, cells + base * H,
                           c_prev, dh_state, P, gy, P, dc_state, dg_out, dg_row0);
      });
    }
    const T* dg = dg_out + (blk.lo - dg_row0) * G;  // the block's rows
    // dh_{t-1} = dGates_t W_hh
    recurrent_gemm<T>(n, G, P, dg, G, w_hh, dh_state + blk.lo * P, P, /*accumulate=*/false);
    add_column_sums(dg, G, 0, n, db);
    if (chunks != nullptr)
      chunks->step_done(s, gather, k, t, blk.lo, n);
    else
      gather.rows(s, k, t, blk.lo, n);
  }
  if (chunks != nullptr) chunks->finish();
}

// ---- fused forward (gate_panels.h) ----------------------------------------------------------
// h_prev comes from the previous step's output rows (or h0), never from a state buffer updated in
// place, so a unit-split thread can read every unit of h_{t-1} while others write h_t. c is owned
// per (row, unit) and updated in place; h_n is gathered from the output rows afterwards.
template <typename T>
struct LstmFusedArgs {
  const Schedule* s;
  const GatePanels* w;
  const T* packed;
  int64_t H;
  const T* input;  // (N, I) when the panels include W_ih (w->K1 > 0), else unused
  const T* bias;   // b_ih + b_hh (or null) when the panels include W_ih
  T* gates;        // (N, 4H): the input projection when w->K1 == 0; the activations afterwards;
                   // null at inference with K1 > 0
  T* cells;        // (N, H), null at inference
  T* out;
  T* c_state;
  const T* h0;
  // The panels hold W_ih but the steps read only their W_hh rows: each unit-split thread first
  // projects the input of every step onto its own units (into gates), then runs the steps.
  bool project_first;
};

// Rows of the input projection done by the unit-split threads before the first step:
// gates[b] = x[b] @ W_ih^T + bias, over every row of the sequence.
template <typename T>
struct InputProjectionRows {
  const T* x;
  int64_t I;
  const T* bias;
  T* gates;
  int64_t G;
  TRF_ALWAYS_INLINE const T* x_row(int64_t b) const { return x + b * I; }
  TRF_ALWAYS_INLINE const T* a(int64_t) const { return nullptr; }  // no h part (K2 = 0)
  TRF_ALWAYS_INLINE const T* init(int64_t) const { return bias; }
  TRF_ALWAYS_INLINE T* dst(int64_t b) const { return gates + b * G; }
};

// Gate rows of a step: the saved (N, 4H) matrix, or, at inference, the scratch (kScratchRows,
// gate_panels.h).

template <typename T>
struct LstmFusedRows {
  const T* x;
  int64_t I;
  PrevRows<T> prev;
  T* g;  // step's gate rows, or the scratch
  bool scratch;
  int64_t G;
  const T* bias;
  bool fused_input;
  TRF_ALWAYS_INLINE const T* x_row(int64_t b) const { return x + b * I; }
  TRF_ALWAYS_INLINE const T* a(int64_t b) const { return prev.row(b); }
  TRF_ALWAYS_INLINE const T* init(int64_t b) const { return fused_input ? bias : g + b * G; }
  TRF_ALWAYS_INLINE T* dst(int64_t b) const {
    return scratch ? g + (b % kScratchRows) * G : g + b * G;
  }
};

template <typename T>
struct LstmFusedEpilogue {
  const LstmFusedRows<T>* rows;
  int64_t H;
  T *c_state, *cells, *out;  // cells null at inference
  TRF_ALWAYS_INLINE void operator()(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    for (int64_t b = b0; b < b1; ++b) {
      T* g = rows->dst(b);
      T* cs = c_state + b * H;
      T* ho = out + b * H;
      T* cl = cells != nullptr ? cells + b * H : cs;  // cs: a harmless second store of c
#pragma GCC ivdep
      for (int64_t j = j0; j < j1; ++j) {
        T c, h;
        lstm_cell_forward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], cs[j], c, h);
        cs[j] = c;
        cl[j] = c;
        ho[j] = h;
      }
    }
  }
};

#if TRF_HAVE_PANELS
// The epilogue above for fp32 on AVX-512: full 16-unit chunks through vec::lstm_cell_forward16
// (csrc/cpu/vec_activations.h), a partial last chunk through the scalar loop. Not always_inline:
// a target-specific callee cannot be forced into panel_step, which has no target of its own;
// GCC inlines it once panel_step sits in the AVX-512 loop.
struct LstmFusedEpilogueAvx512 {
  const LstmFusedEpilogue<float>* scalar;
  TRF_TARGET_AVX512 void operator()(int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    constexpr int64_t L = 16;
    if (j1 - j0 != L) {
      (*scalar)(b0, b1, j0, j1);
      return;
    }
    const int64_t H = scalar->H;
    for (int64_t b = b0; b < b1; ++b) {
      float* g = scalar->rows->dst(b) + j0;
      float* cs = scalar->c_state + b * H + j0;
      __m512 i = _mm512_loadu_ps(g), f = _mm512_loadu_ps(g + H);
      __m512 gg = _mm512_loadu_ps(g + 2 * H), o = _mm512_loadu_ps(g + 3 * H);
      __m512 c, h;
      vec::lstm_cell_forward16(i, f, gg, o, _mm512_loadu_ps(cs), c, h);
      _mm512_storeu_ps(g, i);
      _mm512_storeu_ps(g + H, f);
      _mm512_storeu_ps(g + 2 * H, gg);
      _mm512_storeu_ps(g + 3 * H, o);
      _mm512_storeu_ps(cs, c);
      if (scalar->cells != nullptr) _mm512_storeu_ps(scalar->cells + b * H + j0, c);
      _mm512_storeu_ps(scalar->out + b * H + j0, h);
    }
  }
};
#endif

template <PanelIsa Isa, typename T>
TRF_ALWAYS_INLINE void lstm_fused_loop_impl(const LstmFusedArgs<T>& A, int64_t b0, int64_t b1,
                                            int64_t u0, int64_t u1, bool barrier) {
  const Schedule& s = *A.s;
  const int64_t H = A.H, G = 4 * H;
  GatePanels w = *A.w;  // what each step reads
  const T* packed = A.packed;
  if (A.project_first) {
    // This thread's units of the input projection, for all rows: its chunk of W_ih (K1 rows)
    // stays in L1 across the row tiles, and the gates it writes are the ones its steps read.
    GatePanels w_in = w;
    w_in.K2 = 0;
    const InputProjectionRows<T> in_rows{A.input, w.K1, A.bias, A.gates, G};
    panel_step<Isa, T, 4>(0, s.rows, u0, u1, w_in, packed, in_rows, H, H, NoEpilogue{});
    packed += w.K1 * w.gates * w.lanes;  // the steps start at the W_hh rows of each panel
    w.K1 = 0;
  }
  const int64_t I = w.K1;
  // Inference with the input projection fused in: no gate matrix at all, only this scratch.
  const bool scratch = A.gates == nullptr;
  std::vector<T> scratch_rows(scratch ? kScratchRows * G : 0);
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = s.time_at(k);
    const int64_t e = std::min(b1, s.batch_sizes[t]);
    if (e > b0 && u1 > u0) {
      const int64_t off = s.offsets[t];
      const LstmFusedRows<T> rows{A.input + off * I,
                                  I,
                                  prev_rows(s, k, static_cast<const T*>(A.out), A.h0, H),
                                  scratch ? scratch_rows.data() : A.gates + off * G,
                                  scratch,
                                  G,
                                  A.bias,
                                  I > 0};
      const LstmFusedEpilogue<T> epi{&rows, H, A.c_state,
                                     A.cells != nullptr ? A.cells + off * H : nullptr,
                                     A.out + off * H};
#if TRF_HAVE_PANELS
      if constexpr (Isa == PanelIsa::kAvx512 && std::is_same_v<T, float>)
        panel_step<Isa, T, 4>(b0, e, u0, u1, w, packed, rows, H, H,
                              LstmFusedEpilogueAvx512{&epi});
      else
#endif
        panel_step<Isa, T, 4>(b0, e, u0, u1, w, packed, rows, H, H, epi);
    }
    if (barrier) {
#pragma omp barrier
    }
  }
}

#if TRF_HAVE_PANELS
#define TRF_DEFINE_LSTM_FUSED(T)                                                                 \
  TRF_TARGET_AVX512 void lstm_fused_loop_avx512(const LstmFusedArgs<T>& a, int64_t b0,          \
                                                int64_t b1, int64_t u0, int64_t u1, bool bar) {  \
    lstm_fused_loop_impl<PanelIsa::kAvx512, T>(a, b0, b1, u0, u1, bar);                          \
  }                                                                                              \
  TRF_TARGET_AVX2 void lstm_fused_loop_avx2(const LstmFusedArgs<T>& a, int64_t b0, int64_t b1,   \
                                            int64_t u0, int64_t u1, bool bar) {                  \
    lstm_fused_loop_impl<PanelIsa::kAvx2, T>(a, b0, b1, u0, u1, bar);                            \
  }
TRF_DEFINE_LSTM_FUSED(float)
TRF_DEFINE_LSTM_FUSED(double)
#undef TRF_DEFINE_LSTM_FUSED
#endif

template <typename T>
void lstm_forward_fused(PanelIsa isa, const Schedule& s, int64_t H, const at::Tensor& w_hh,
                        const at::Tensor& w_ih, const T* input, const T* bias, T* gates, T* cells,
                        T* out, T* h_state, T* c_state, const T* h0, int64_t min_rows_per_block,
                        const PanelSplit& split, bool project_first) {
#if TRF_HAVE_PANELS
  const GatePanels w = gate_panels_for(w_hh, 4, H, panel_lanes(isa, sizeof(T)), w_ih);
  const T* w_hh_p = w_hh.data_ptr<T>();
  const T* w_ih_p = w_ih.defined() ? w_ih.data_ptr<T>() : nullptr;
  const LstmFusedArgs<T> args{&s,    &w,  w.storage.data_ptr<T>(), H,       input, bias,
                              gates, cells, out,                   c_state, h0,    project_first};
  run_panel_split(s, w, split, min_rows_per_block,
                  [&](int64_t u0, int64_t u1) { pack_gate_chunks<T>(w, w_hh_p, w_ih_p, u0, u1); },
                  [&](int64_t b0, int64_t b1, int64_t u0, int64_t u1, bool barrier) {
                    if (isa == PanelIsa::kAvx512)
                      lstm_fused_loop_avx512(args, b0, b1, u0, u1, barrier);
                    else
                      lstm_fused_loop_avx2(args, b0, b1, u0, u1, barrier);
                  });
  final_state_from_rows(s, static_cast<const T*>(out), H, h_state);
#else
  TORCH_CHECK(false, "timerec_fast: fused CPU kernels are not compiled in");
#endif
}

// Blocks need at least this many rows to be worth a thread of their own.
constexpr int64_t kMinRowsPerBlock = 8;
// From this many rows in all the backward makes [dW_ih, dW_hh] with one GEMM and copies the two
// halves out; below, a GEMM each (the backward op of an LSTMCell step at (B, H) = (1, 128): 38
// against 46 us with the copies).
constexpr int64_t kOneWeightGemmRows = 256;

// ---- ops ---------------------------------------------------------------------------------------

// The dtype is checked by each op (check_cpu_dtype) before the shapes.
LstmShapes check_lstm_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const c10::optional<at::Tensor>& w_hr) {
  return check_lstm_shapes(input, h0, c0, w_ih, w_hh, w_hr, [](int64_t) {});
}

// save = false (inference): what only the backward reads (gates, cells) may be left empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_forward_impl(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                  const c10::optional<at::Tensor>& w_hr, bool reverse, bool save) {
  check_cpu_dtype(input, "LSTM");
  const auto d = check_lstm_args(input, h0, c0, w_ih, w_hh, w_hr);
  check_vector(b_ih, "b_ih", 4 * d.H, input);
  check_vector(b_hh, "b_hh", 4 * d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);

  auto opts = input.options();
  at::Tensor cells = workspace_empty({d.N, d.H}, opts);
  at::Tensor out = at::empty({d.N, d.P}, opts);
  at::Tensor hpre = d.proj ? workspace_empty({d.N, d.H}, opts) : at::empty({0}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_state = c0.clone(at::MemoryFormat::Contiguous);

  const PanelIsa isa = panel_isa_for(s);
  if (!d.proj && isa != PanelIsa::kNone && s.steps > 0) {
    // With enough rows per step the input projection joins the per-step tiles (no (N, 4H) gate
    // matrix written and read back). With few rows per step it is one product over all steps:
    // made by each unit-split thread for its own units before its first step (into its own
    // cache; MKL's GEMM gained little from a second thread here, 62 against 77 us at B = 1,
    // T = 50, H = 128, and the forward ran 5-9% faster without it), else one BLAS GEMM.
    // The split is decided on what the steps read: [W_ih, W_hh] when the input is fused in,
    // else W_hh alone (a project_first thread reads W_ih only before its first step).
    const bool fuse_input = fuse_input_projection(s);
    const size_t elem = input.element_size();
    const PanelSplit split = choose_panel_split(
        s, panel_geometry(fuse_input ? d.I : 0, d.H, d.H, 4, panel_lanes(isa, elem)), elem,
        kMinRowsPerBlock);
    const bool project_first = !fuse_input && split.by_units;
    const bool own_input = fuse_input || project_first;  // W_ih goes into the panels
    at::Tensor gates =
        own_input ? workspace_empty({save || project_first ? d.N : 0, 4 * d.H}, opts)
                  : cpu_input_projection(input, w_ih, b_ih, b_hh);
    at::Tensor x = own_input ? input.contiguous() : at::Tensor();
    at::Tensor bias = own_input ? combined_bias(b_ih, b_hh) : at::Tensor();
    at::Tensor h0_c = h0.contiguous();
    if (!save) cells = at::empty({0, d.H}, opts);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_lstm_forward_fused", [&] {
      lstm_forward_fused<scalar_t>(
          isa, s, d.H, w_hh.contiguous(), own_input ? w_ih.contiguous() : at::Tensor(),
          own_input ? x.data_ptr<scalar_t>() : nullptr,
          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
          gates.numel() > 0 ? gates.data_ptr<scalar_t>() : nullptr,
          save ? cells.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
          c_state.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(), kMinRowsPerBlock, split,
          project_first);
    });
    return {out, h_state, c_state, gates, cells, hpre};
  }

  // Input projection for every step at once, biases folded in.
  at::Tensor gates = cpu_input_projection(input, w_ih, b_ih, b_hh);

  const int threads = unit_split_threads();
  if (use_unit_split(s, d.H, d.proj, threads)) {
    at::Tensor h_spare = at::empty_like(h_state);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_lstm_forward_units", [&] {
      const auto w_hh_r = RecurrentWeight<scalar_t>::for_forward(w_hh, s, PanelIsa::kNone);
      lstm_forward_unit_split<scalar_t>(s, d.H, w_hh_r,
                                        gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
                                        out.data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
                                        c_state.data_ptr<scalar_t>(),
                                        h_spare.data_ptr<scalar_t>(), threads);
    });
    return {out, h_state, c_state, gates, cells, hpre};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_lstm_forward", [&] {
    using RW = RecurrentWeight<scalar_t>;
    const RW w_hh_r = RW::for_forward(w_hh, s, PanelIsa::kNone);
    const RW w_hr_r = d.proj ? RW::for_forward(*w_hr, s, PanelIsa::kNone) : RW();
    for_blocks(split_batch(s, kMinRowsPerBlock), [&](RowBlock blk) {
      lstm_forward_block<scalar_t>(s, blk, d.H, d.P, w_hh_r, d.proj ? &w_hr_r : nullptr,
                                   gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
                                   d.proj ? hpre.data_ptr<scalar_t>() : nullptr,
                                   out.data_ptr<scalar_t>(), h_state.data_ptr<scalar_t>(),
                                   c_state.data_ptr<scalar_t>());
    });
  });
  return {out, h_state, c_state, gates, cells, hpre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cpu(const c10::optional<at::Tensor>& grad_output,
                  const c10::optional<at::Tensor>& grad_h_n,
                  const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                  const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const c10::optional<at::Tensor>& w_hr, const at::Tensor& output,
                  const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& hpre,
                  bool reverse, bool input_grad) {
  check_cpu_dtype(input, "LSTM");
  const auto d = check_lstm_args(input, h0, c0, w_ih, w_hh, w_hr);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const int64_t G = 4 * d.H;
  check_matrix(gates, "gates", d.N, G, input);
  check_matrix(cells, "cells", d.N, d.H, input);
  check_matrix(output, "output", d.N, d.P, input);
  if (d.proj) check_matrix(hpre, "hpre", d.N, d.H, input);

  auto opts = input.options();
  at::Tensor gy = cpu_grad_or_zeros(grad_output, {d.N, d.P}, input);
  at::Tensor dh_state = grad_or_zeros(grad_h_n, {d.B, d.P}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor dc_state = grad_or_zeros(grad_c_n, {d.B, d.H}, input).clone(at::MemoryFormat::Contiguous);
  at::Tensor dy = d.proj ? workspace_empty({d.N, d.P}, opts) : at::Tensor();
  at::Tensor dhpre = d.proj ? at::empty({d.B, d.H}, opts) : at::Tensor();
  at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous(), c0_c = c0.contiguous();
  at::Tensor w_hh_c = w_hh.contiguous();
  at::Tensor w_hr_c = d.proj ? w_hr->contiguous() : at::Tensor();
  const int64_t I = d.I, W = I + d.P;
  at::Tensor x_c = input.contiguous(), out_c = output.contiguous(), h0_c = h0.contiguous();
  const auto blocks = split_batch(s, kMinRowsPerBlock);
  const int64_t nb = static_cast<int64_t>(blocks.size());
  at::Tensor db_blocks = at::zeros({nb, G}, opts);
  // dW as [dW_ih, dW_hh] side by side: one GEMM over [x, h_prev] packs dGates^T once (its
  // packing copies were 8.8% of a training step at (256, 50, 64, 64); against two GEMMs, training
  // step 1.01-1.06x at (256, 50, 64, 64), 1.00x at 128, 1.02-1.05x at (64, 200, 128, 256)).
  // Each row block fills its rows of [x, h_prev] (all of them, or a chunk's) and sums its rows of
  // dGates for the bias gradient in the BPTT loop.
  const auto streamed = StreamedGradBuffers::for_call(blocks, G, G, I, d.P,
                                                      /*hidden_side=*/false, input_grad, d.N, opts);
  const bool stream = streamed.has_value();
  at::Tensor dgates = stream ? at::Tensor() : workspace_empty({d.N, G}, opts);
  at::Tensor xh = stream ? at::Tensor() : workspace_empty({d.N, W}, opts);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "timerec_fast_lstm_backward", [&] {
    // dh_{t-1} = dG_t W_hh (and dx_t = dG_t W_ih) on weights packed once (gate_panels.h), not
    // re-read by BLAS every step.
    const PanelIsa isa = per_step_panel_isa(s);
    const auto w_hh_r = RecurrentWeight<scalar_t>::prepare(w_hh_c, isa);
    const auto w_ih_r = stream && input_grad ? RecurrentWeight<scalar_t>::prepare(w_ih, isa)
                                             : RecurrentWeight<scalar_t>();
    const PrevStateGather<scalar_t> gather{x_c.data_ptr<scalar_t>(), I,
                                           out_c.data_ptr<scalar_t>(),
                                           h0_c.data_ptr<scalar_t>(), d.P,
                                           stream ? nullptr : xh.data_ptr<scalar_t>()};
    scalar_t* db = db_blocks.data_ptr<scalar_t>();
    for_blocks_indexed(blocks, [&](const RowBlock& blk, int64_t index) {
      auto chunks = stream ? streamed->block<scalar_t>(index, &w_ih_r)
                           : WeightGradChunks<scalar_t>();
      lstm_backward_block<scalar_t>(
          s, blk, d.H, d.P, w_hh_r,
          d.proj ? w_hr_c.data_ptr<scalar_t>() : nullptr, gates_c.data_ptr<scalar_t>(),
          cells_c.data_ptr<scalar_t>(), c0_c.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
          dh_state.data_ptr<scalar_t>(), dc_state.data_ptr<scalar_t>(),
          stream ? nullptr : dgates.data_ptr<scalar_t>(),
          d.proj ? dy.data_ptr<scalar_t>() : nullptr,
          d.proj ? dhpre.data_ptr<scalar_t>() : nullptr, gather, db + index * G,
          stream ? &chunks : nullptr);
    });
  });

  at::Tensor grad_input, grad_w_ih, grad_w_hh;
  if (stream) {
    std::tie(grad_input, grad_w_ih, grad_w_hh) = streamed->gradients();
  } else {
    // Input and weight gradients: one large GEMM each over all steps (dx; [dW_ih, dW_hh]).
    grad_input = input_grad ? at::mm(dgates, w_ih) : at::empty({0}, opts);
    if (d.N >= kOneWeightGemmRows) {
      const at::Tensor grad_w = at::mm(dgates.t(), xh);  // (4H, I + P)
      grad_w_ih = grad_w.narrow(1, 0, I).contiguous();
      grad_w_hh = grad_w.narrow(1, I, d.P).contiguous();
    } else {  // the two copies out of grad_w would cost more than the products
      grad_w_ih = at::mm(dgates.t(), xh.narrow(1, 0, I));
      grad_w_hh = at::mm(dgates.t(), xh.narrow(1, I, d.P));
    }
  }
  at::Tensor grad_bias = db_blocks.sum(0);
  at::Tensor grad_w_hr = d.proj ? at::mm(dy.t(), hpre) : at::empty({0}, opts);
  return {grad_input, dh_state, dc_state, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_forward_cpu(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                 const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                 const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                 const c10::optional<at::Tensor>& w_hr, bool reverse) {
  return lstm_forward_impl(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                           /*save=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
lstm_inference_cpu(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                   const c10::optional<at::Tensor>& w_hr, bool reverse) {
  auto r = lstm_forward_impl(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                             /*save=*/false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_inference", &lstm_inference_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace timerec::cpu
