// Input and weight gradients made inside the BPTT loop, shared by the LSTM, GRU and Time-LSTM
// backwards.
//
// With the batch split over threads, a backward can make them while each step's gate gradients
// are still in cache: dx_t = dG_t W_ih per step on panels (like dh_{t-1} = dG_t W_hh), and
// dW += dG^T [x, h_prev] as GEMMs per chunk of steps, from a row block's own chunk buffers of
// kStreamChunkBytes. No (N, G) gate-gradient matrix or (N, I + H) [x, h_prev] matrix goes to
// memory to be read back by large GEMMs after the loop.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_blas.h"
#include "cpu_kernels.h"
#include "gate_panels.h"
#include "workspace.h"

namespace timerec::cpu {

// A quarter of this VM's 2 MB L2 per core; 256 KB and 1-2 MB measured no better.
constexpr int64_t kStreamChunkBytes = int64_t{512} << 10;

// Each chunk's GEMMs also read and write the block's dW (dw_bytes = (G I + Gh P) elements):
// streaming pays while that is at most half a chunk. Measured on the LSTM training step:
// H = I = 64 fp32 (128 KB) 3-12% faster over several batch shapes; H = I = 128 (512 KB) no
// faster; (H, I) = (256, 128) slower (1.5 MB of dW per 64 rows). Time-LSTM and GRU at
// H = I = 64: 4-9% and 5-6% faster. One block (small batches) keeps the large GEMMs after the
// loop, where BLAS can use every thread.
inline bool stream_weight_grads(const std::vector<RowBlock>& blocks, int64_t dw_bytes) {
  return blocks.size() > 1 && 2 * dw_bytes <= kStreamChunkBytes;
}

// Rows of each block's chunk buffers (row_bytes per row): at least one step of the largest block.
inline int64_t stream_chunk_rows(const std::vector<RowBlock>& blocks, int64_t row_bytes) {
  int64_t rows = kStreamChunkBytes / row_bytes;
  for (const RowBlock& blk : blocks) rows = std::max(rows, blk.hi - blk.lo);
  return rows;
}

// One row block's chunk buffers. Each step writes its n gate-gradient rows at dg_rows() (and, for
// the GRU, the hidden side's at dg_h_rows()), then step_done() makes their dx and appends their
// [x, h_prev] rows; a step that would overflow the buffers first empties them into the block's dW
// (make_room), and finish() empties the rest.
template <typename T>
struct WeightGradChunks {
  int64_t rows_cap = 0;
  int64_t G = 0;   // columns of a gate-gradient row
  int64_t Gh = 0;  // its first Gh columns (of dg_h's rows) feed dW_hh
  int64_t I = 0, P = 0;  // an [x, h_prev] row: I + P
  T* dg = nullptr;       // (rows_cap, G): the input side's rows (dx, dW_ih)
  T* dg_h = nullptr;     // (rows_cap, G): the hidden side's (dW_hh), where they differ; else dg
  T* xh = nullptr;       // (rows_cap, I + P)
  // With dg_h == dg and Gh == G (the LSTM): [dW_ih, dW_hh] as one (G, I + P) matrix, one GEMM
  // that packs dG^T once; else dW_ih (G, I) and dW_hh (Gh, P). Accumulated.
  T* grad_w = nullptr;
  T* grad_w_ih = nullptr;
  T* grad_w_hh = nullptr;
  const RecurrentWeight<T>* w_ih = nullptr;  // null: no input gradient
  T* grad_input = nullptr;                   // (N, I)
  int64_t filled = 0;

  T* dg_rows() const { return dg + filled * G; }
  T* dg_h_rows() const { return dg_h + filled * G; }

  void make_room(int64_t n) {
    if (filled + n > rows_cap) flush();
  }

  // The step's n rows (batch rows [lo, lo + n) of processed step k, time t) are in dg_rows().
  void step_done(const Schedule& s, const PrevStateGather<T>& xh_gather, int64_t k, int64_t t,
                 int64_t lo, int64_t n) {
    if (w_ih != nullptr)
      recurrent_gemm<T>(n, G, I, dg_rows(), G, *w_ih, grad_input + (s.offsets[t] + lo) * I, I,
                        /*accumulate=*/false);
    xh_gather.rows_to(s, k, t, lo, n, xh + filled * (I + P));
    filled += n;
  }

  void finish() { flush(); }

 private:
  void flush() {
    if (filled == 0) return;
    const int64_t W = I + P;
    if (grad_w != nullptr) {
      gemm<T>(/*trans_a=*/true, /*trans_b=*/false, G, W, filled, T(1), dg, G, xh, W, T(1), grad_w,
              W);
    } else {
      gemm<T>(/*trans_a=*/true, /*trans_b=*/false, G, I, filled, T(1), dg, G, xh, W, T(1),
              grad_w_ih, I);
      gemm<T>(/*trans_a=*/true, /*trans_b=*/false, Gh, P, filled, T(1), dg_h, G, xh + I, W, T(1),
              grad_w_hh, P);
    }
    filled = 0;
  }
};

// Every block's chunk buffers and partial dW for one backward call, and the gradients summed
// over the blocks afterwards.
struct StreamedGradBuffers {
  int64_t rows_cap = 0, G = 0, Gh = 0, I = 0, P = 0;
  at::Tensor dg, dg_h, xh;                // (blocks, rows_cap, ...); dg_h undefined: dg serves
  at::Tensor grad_w, grad_w_ih, grad_w_hh;  // (blocks, ...) partial sums: grad_w, or the two
  at::Tensor grad_input;                  // (N, I), undefined without an input gradient

  // The buffers for a backward with gate-gradient rows of G columns (the first Gh of which feed
  // dW_hh), I inputs and P states, when stream_weight_grads says streaming pays for its dW of
  // G I + Gh P elements; none otherwise (the backward keeps its GEMMs after the loop).
  // hidden_side: a separate hidden-side gradient row per step (the GRU's). With one side and
  // Gh == G (the LSTM) [dW_ih, dW_hh] is one (G, I + P) matrix.
  static std::optional<StreamedGradBuffers> for_call(const std::vector<RowBlock>& blocks,
                                                     int64_t G, int64_t Gh, int64_t I, int64_t P,
                                                     bool hidden_side, bool input_grad, int64_t N,
                                                     const at::TensorOptions& opts) {
    const int64_t elem =
        static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
    if (!stream_weight_grads(blocks, (G * I + Gh * P) * elem)) return std::nullopt;
    return StreamedGradBuffers(blocks, G, Gh, I, P, hidden_side, input_grad, N, opts, elem);
  }

 private:
  StreamedGradBuffers(const std::vector<RowBlock>& blocks, int64_t G, int64_t Gh, int64_t I,
                      int64_t P, bool hidden_side, bool input_grad, int64_t N,
                      const at::TensorOptions& opts, int64_t elem)
      : G(G), Gh(Gh), I(I), P(P) {
    const int64_t nb = static_cast<int64_t>(blocks.size());
    rows_cap = stream_chunk_rows(blocks, ((hidden_side ? 2 : 1) * G + I + P) * elem);
    dg = workspace_empty({nb, rows_cap, G}, opts);
    if (hidden_side) dg_h = workspace_empty({nb, rows_cap, G}, opts);
    xh = workspace_empty({nb, rows_cap, I + P}, opts);
    if (!hidden_side && Gh == G) {
      grad_w = at::zeros({nb, G, I + P}, opts);
    } else {
      grad_w_ih = at::zeros({nb, G, I}, opts);
      grad_w_hh = at::zeros({nb, Gh, P}, opts);
    }
    if (input_grad) grad_input = at::empty({N, I}, opts);
  }

 public:
  // Block i's view; w_ih (packed W_ih) is read only with an input gradient.
  template <typename T>
  WeightGradChunks<T> block(int64_t i, const RecurrentWeight<T>* w_ih) const {
    WeightGradChunks<T> c;
    c.rows_cap = rows_cap;
    c.G = G;
    c.Gh = Gh;
    c.I = I;
    c.P = P;
    c.dg = dg.data_ptr<T>() + i * rows_cap * G;
    c.dg_h = dg_h.defined() ? dg_h.data_ptr<T>() + i * rows_cap * G : c.dg;
    c.xh = xh.data_ptr<T>() + i * rows_cap * (I + P);
    if (grad_w.defined()) {
      c.grad_w = grad_w.data_ptr<T>() + i * G * (I + P);
    } else {
      c.grad_w_ih = grad_w_ih.data_ptr<T>() + i * G * I;
      c.grad_w_hh = grad_w_hh.data_ptr<T>() + i * Gh * P;
    }
    if (grad_input.defined()) {
      c.w_ih = w_ih;
      c.grad_input = grad_input.data_ptr<T>();
    }
    return c;
  }

  // (dx, dW_ih, dW_hh): dW summed over the blocks; dx empty without an input gradient (what the
  // ops return then).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> gradients() const {
    const at::Tensor dx = grad_input.defined() ? grad_input : at::empty({0}, dg.options());
    if (grad_w.defined()) {
      const at::Tensor total = grad_w.sum(0);
      return {dx, total.narrow(1, 0, I).contiguous(), total.narrow(1, I, P).contiguous()};
    }
    return {dx, grad_w_ih.sum(0), grad_w_hh.sum(0)};
  }
};

}  // namespace timerec::cpu
