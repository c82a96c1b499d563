// Building blocks of the CPU sequence loops: runtime ISA dispatch of the pointwise row kernels,
// row parallelism, and the previous-step gather used by every cell's backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>

#include "../rnn_common.h"
#include "workspace.h"

// The pointwise row kernels are compiled once per ISA level and picked at load time (GCC function
// multi-versioning), so a portable wheel still runs AVX-512/AVX2 gate loops where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TIMEREC_NO_CLONES)
#define TRF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TRF_CPU_CLONES
#endif

#define TRF_ALWAYS_INLINE inline __attribute__((always_inline))

namespace timerec::cpu {

// Runs fn(row_begin, row_end) over [0, rows), in parallel when the step has enough work to pay for
// waking the thread pool (a B=1 step must stay on one thread).
template <typename F>
void for_rows(int64_t rows, int64_t row_width, const F& fn) {
  constexpr int64_t kSerialElements = 16384;
  if (rows * row_width <= kSerialElements || at::get_num_threads() == 1) {
    fn(0, rows);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(row_width, 1));
  at::parallel_for(0, rows, grain, fn);
}

// ---- batch-parallel recurrence ----------------------------------------------------------------
// Sequences are independent, so with enough rows each thread runs the whole step loop on its own
// block of batch rows: no barrier per step, and every per-step GEMM stays single-threaded and
// cache-local. Blocks are balanced by work (sum of their sequences' lengths), not by row count.
struct RowBlock {
  int64_t lo, hi;
  // Rows of time step t inside this block.
  int64_t rows_at(const Schedule& s, int64_t t) const {
    return std::max<int64_t>(0, std::min(hi, s.batch_sizes[t]) - lo);
  }
};

inline std::vector<RowBlock> split_batch(const Schedule& s, int64_t min_rows_per_block) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min(threads, s.batch / min_rows_per_block));
  if (parts == 1 || s.steps == 0) return {{0, s.batch}};
  // length of sequence b = number of steps with batch_sizes[t] > b (batch_sizes non-increasing)
  std::vector<int64_t> lengths(s.batch, 0);
  for (int64_t t = 0; t < s.steps; ++t) lengths[s.batch_sizes[t] - 1] += 1;
  for (int64_t b = s.batch - 2; b >= 0; --b) lengths[b] += lengths[b + 1];
  std::vector<RowBlock> blocks;
  int64_t lo = 0, done = 0;
  for (int64_t b = 0; b < s.batch && static_cast<int64_t>(blocks.size()) < parts - 1; ++b) {
    done += lengths[b];
    const int64_t target = s.rows * (static_cast<int64_t>(blocks.size()) + 1) / parts;
    if (done >= target && b + 1 < s.batch) {
      blocks.push_back({lo, b + 1});
      lo = b + 1;
    }
  }
  blocks.push_back({lo, s.batch});
  return blocks;
}

// Runs fn(block, index) for each block, one thread per block (index: the block's position, e.g.
// its row of per-block partial sums).
template <typename F>
void for_blocks_indexed(const std::vector<RowBlock>& blocks, const F& fn) {
  if (blocks.size() == 1) {
    fn(blocks[0], int64_t{0});
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) fn(blocks[i], i);
  });
}

// Runs fn(block) for each block, one thread per block.
template <typename F>
void for_blocks(const std::vector<RowBlock>& blocks, const F& fn) {
  for_blocks_indexed(blocks, [&](const RowBlock& blk, int64_t) { fn(blk); });
}

// Pointer to the row holding the previous state of row b at processed step k: the row of the step
// processed before k when the sequence continues, else the initial state.
template <typename T>
struct PrevRows {
  const T* carried_block;  // rows of step k-1 (processing order), nullptr at k = 0
  int64_t carried;         // rows [0, carried) continue from carried_block
  const T* init;           // (B, width) initial state
  int64_t width;
  const T* row(int64_t b) const {
    return b < carried ? carried_block + b * width : init + b * width;
  }
};

template <typename T>
PrevRows<T> prev_rows(const Schedule& s, int64_t k, const T* all_rows, const T* init,
                      int64_t width) {
  if (k == 0) return {nullptr, 0, init, width};
  const int64_t tp = s.time_at(k - 1);
  return {all_rows + s.offsets[tp] * width, s.carried_rows(k), init, width};
}

// What a BPTT loop gathers for the weight gradients, step by step, for its own rows while they are
// in cache: the state each row started its step from (the right operand of dW_hh = dG^T @ h_prev),
// optionally beside the input row ([x, h_prev] for one [dW_ih, dW_hh] GEMM), and column sums of
// the gate gradients (the bias gradients, one partial sum per row block: add_column_sums). Done
// after the loop instead, the LSTM's x copy and dGates.sum(0) were 0.43 and 0.53 ms of an 11 ms
// training step at (256, 50, 64, 64) (torch.profiler).
template <typename T>
struct PrevStateGather {
  const T* x;       // (N, I) input rows, copied in front of each state when I > 0
  int64_t I;
  const T* states;  // (N, P) rows each step leaves (the next step's previous state)
  const T* init;    // (B, P) initial state
  int64_t P;
  T* dst;           // (N, I + P)

  // Rows [lo, lo + n) of processed step k (time t), at their rows of dst.
  void rows(const Schedule& s, int64_t k, int64_t t, int64_t lo, int64_t n) const {
    rows_to(s, k, t, lo, n, dst + (s.offsets[t] + lo) * (I + P));
  }
  // The same rows, one after another from out (row lo first).
  void rows_to(const Schedule& s, int64_t k, int64_t t, int64_t lo, int64_t n, T* out) const {
    const auto prev = prev_rows(s, k, states, init, P);
    const int64_t base = s.offsets[t];
    for (int64_t b = lo; b < lo + n; ++b) {
      T* row = out + (b - lo) * (I + P);
      if (I > 0) std::memcpy(row, x + (base + b) * I, I * sizeof(T));
      std::memcpy(row + I, prev.row(b), P * sizeof(T));
    }
  }
};

// sums[j] += m[b][j] over rows [0, n) of `width` columns that lie `ld` apart (one step's rows of a
// block; ld > width: a column range of a wider matrix). The step's rows are summed apart first
// and then added, so no fp32 accumulation chain is longer than max(rows a step, steps), not every
// row of the block in turn.
template <typename T>
void add_column_sums_strided(const T* m, int64_t ld, int64_t width, int64_t n, T* sums) {
  constexpr int64_t kCols = 256;
  T part[kCols];
  for (int64_t j0 = 0; j0 < width; j0 += kCols) {
    const int64_t w = std::min(kCols, width - j0);
    for (int64_t j = 0; j < w; ++j) part[j] = T(0);
    for (int64_t b = 0; b < n; ++b) {
      const T* row = m + b * ld + j0;
#pragma GCC ivdep
      for (int64_t j = 0; j < w; ++j) part[j] += row[j];
    }
    for (int64_t j = 0; j < w; ++j) sums[j0 + j] += part[j];
  }
}

// The same over rows [lo, lo + n) of a row-major matrix of `width` columns.
template <typename T>
void add_column_sums(const T* m, int64_t width, int64_t lo, int64_t n, T* sums) {
  add_column_sums_strided(m + lo * width, width, width, n, sums);
}

// The gradient of a large output as a contiguous matrix, or zeros when it has none, in a
// workspace buffer (workspace.h). A loss like out.sum() hands the backward an expanded, zero-stride
// gradient; copied into fresh memory by .contiguous() it paid a page fault per 4 KB (aten::copy_
// 1.2 ms of a 40 ms Time-LSTM training step at (256, 50, 128, 128)). In one process alternating
// with .contiguous(), median of 10 pairs: that step 1.0 ms shorter (0.985x), the GRU's at
// (256, 50, 64, 64) 0.97x.
inline at::Tensor cpu_grad_or_zeros(const c10::optional<at::Tensor>& g, at::IntArrayRef shape,
                                    const at::Tensor& like) {
  const bool given = g.has_value() && g->defined();
  if (given && g->is_contiguous()) return *g;
  at::Tensor out = workspace_empty(shape, like.options());
  if (given) out.copy_(*g); else out.zero_();
  return out;
}

inline void check_cpu_dtype(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "timerec_fast.", op, " on the CPU supports float32 and float64, got ",
              input.scalar_type(), " (convert the module and input with .float())");
}

}  // namespace timerec::cpu
