// Fused recurrent step for the CPU: the per-step product h_prev @ W_hh^T computed by our own
// register-blocked kernel on weights packed once per call, with the cell's pointwise math applied
// to each tile while it is still in L1.
//
// Why not BLAS per step: at these shapes (tens to hundreds of rows, K = H) MKL re-packs W_hh on
// every call, the gates make a round trip through memory between the GEMM and the pointwise
// pass, and the batch split makes every thread stream all of W_hh each step (1 MB at H = 256,
// more than a core's L2). Here W_hh^T is packed into per-unit-chunk panels that hold the G gate
// columns of L consecutive hidden units side by side, so one tile of accumulators holds every gate
// of its units and the cell math can run on it at once; and the work can be split over threads by
// hidden units (each thread keeps its share of W_hh in its own cache, one barrier per step) as
// well as by batch rows.
//
// The kernels are compiled for AVX-512 and for AVX2+FMA (GCC target attributes) and picked at run
// time (see panel_isa for which runs by default); anything else takes the BLAS path.
// TIMEREC_CPU_GEMM=blas forces the BLAS path and TIMEREC_CPU_GEMM=avx2 the AVX2 kernel (tests use
// both to cover every path on one machine).
#pragma once

#include <omp.h>

#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TIMEREC_NO_CLONES)
#define TRF_HAVE_PANELS 1
#define TRF_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define TRF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define TRF_HAVE_PANELS 0
#endif

namespace timerec::cpu {

enum class PanelIsa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

inline PanelIsa detected_panel_isa() {
#if TRF_HAVE_PANELS
  static const PanelIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return PanelIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return PanelIsa::kAvx2;
    return PanelIsa::kNone;
  }();
  return isa;
#else
  return PanelIsa::kNone;
#endif
}

// Read on every call (a getenv is ~100 ns) so tests can switch paths within one process.
// The default is the AVX-512 kernel where the CPU has it, else BLAS: the AVX2 kernel (2 rows x 4
// gate vectors in 16 ymm registers) measured 0.7-0.8x the BLAS loop on an AVX-512 machine and has
// not been timed on an AVX2-only one, so it runs only when asked for (TIMEREC_CPU_GEMM=avx2).
inline PanelIsa panel_isa() {
  const PanelIsa hw = detected_panel_isa();
  const char* env = std::getenv("TIMEREC_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "blas") == 0) return PanelIsa::kNone;
  if (env != nullptr && std::strcmp(env, "avx2") == 0)
    return hw == PanelIsa::kNone ? hw : PanelIsa::kAvx2;
  return hw == PanelIsa::kAvx512 ? hw : PanelIsa::kNone;
}

// Vector registers of each ISA level and how many accumulator rows fit beside the G weight
// vectors and one broadcast: 32 zmm / 16 ymm registers.
template <PanelIsa Isa> struct IsaTraits;
template <> struct IsaTraits<PanelIsa::kAvx512> {
  static constexpr int bytes = 64;
  static constexpr int registers = 32;
};
template <> struct IsaTraits<PanelIsa::kAvx2> {
  static constexpr int bytes = 32;
  static constexpr int registers = 16;
};

template <typename T, int Bytes> struct VecType;
template <> struct VecType<float, 64> { typedef float type __attribute__((vector_size(64))); };
template <> struct VecType<float, 32> { typedef float type __attribute__((vector_size(32))); };
template <> struct VecType<double, 64> { typedef double type __attribute__((vector_size(64))); };
template <> struct VecType<double, 32> { typedef double type __attribute__((vector_size(32))); };
// Unaligned, aliasing views of the same vectors: loads and stores through them are single vector
// moves (a memcpy into a vector local may be split into 16-byte moves through the stack).
template <typename T, int Bytes> struct VecUnaligned;
template <> struct VecUnaligned<float, 64> {
  typedef float type __attribute__((vector_size(64), aligned(4), may_alias));
};
template <> struct VecUnaligned<float, 32> {
  typedef float type __attribute__((vector_size(32), aligned(4), may_alias));
};
template <> struct VecUnaligned<double, 64> {
  typedef double type __attribute__((vector_size(64), aligned(8), may_alias));
};
template <> struct VecUnaligned<double, 32> {
  typedef double type __attribute__((vector_size(32), aligned(8), may_alias));
};

template <PanelIsa Isa, typename T, int G>
struct PanelKernel {
  static constexpr int lanes = IsaTraits<Isa>::bytes / static_cast<int>(sizeof(T));
  static constexpr int max_rows = (IsaTraits<Isa>::registers - G - 1) / G;
  using V = typename VecType<T, IsaTraits<Isa>::bytes>::type;
  using U = typename VecUnaligned<T, IsaTraits<Isa>::bytes>::type;
  static TRF_ALWAYS_INLINE V load(const T* p) { return *reinterpret_cast<const U*>(p); }
  static TRF_ALWAYS_INLINE void store(T* p, const V& v) { *reinterpret_cast<U*>(p) = v; }
};

inline int panel_lanes(PanelIsa isa, size_t elem_size) {
  return (isa == PanelIsa::kAvx512 ? 64 : 32) / static_cast<int>(elem_size);
}

// W (G*H, K), row-major as nn.LSTM/GRU store W_hh, packed as panels: panel u, row k holds
// [gate 0 of units uL..uL+L-1, gate 1 of the same units, ...], zero past H. With w_ih given, the
// panels hold [W_ih, W_hh] (K1 = input features, then K2 = H rows) so one tile also does the
// input projection of its rows.
struct GatePanels {
  at::Tensor storage;
  int64_t K = 0, K1 = 0, K2 = 0, H = 0, gates = 0, lanes = 0, chunks = 0;
  int64_t panel_size() const { return K * gates * lanes; }
};

inline GatePanels pack_gate_panels(const at::Tensor& w_hh, int64_t gates, int64_t H, int lanes,
                                   const at::Tensor& w_ih = at::Tensor()) {
  GatePanels p;
  const at::Tensor w = w_ih.defined() ? at::cat({w_ih, w_hh}, 1) : w_hh;
  p.K1 = w_ih.defined() ? w_ih.size(1) : 0;
  p.K2 = w_hh.size(1);
  p.K = w.size(1);
  p.H = H;
  p.gates = gates;
  p.lanes = lanes;
  p.chunks = (H + lanes - 1) / lanes;
  // (chunks, K, gates, lanes) <- W viewed as (gates, H, K), H zero-padded to chunks * lanes.
  at::Tensor wv = w.reshape({gates, H, p.K});
  const int64_t pad = p.chunks * lanes - H;
  if (pad > 0) wv = at::constant_pad_nd(wv, {0, 0, 0, pad});
  p.storage = wv.reshape({gates, p.chunks, lanes, p.K}).permute({1, 3, 0, 2}).contiguous();
  return p;
}

// One tile: R rows x the G gate vectors of one unit chunk. acc starts from init[r] (the gate row,
// gate q at init[r] + q * init_stride; null: zeros), accumulates [x[r], a[r]] @ panel over the
// panel's K = K1 + K2 rows (x: the input row when the input projection is fused in, K1 = 0
// otherwise; a: h_prev), and is stored to dst[r] (gate q at dst[r] + q * dst_stride). `valid` < L
// lanes only for the last chunk.
template <PanelIsa Isa, typename T, int G, int R>
TRF_ALWAYS_INLINE void panel_tile(const T* const* x, int64_t K1, const T* const* a, int64_t K2,
                                  const T* panel, const T* const* init, int64_t init_stride,
                                  T* const* dst, int64_t dst_stride, int valid) {
  using K_ = PanelKernel<Isa, T, G>;
  using V = typename K_::V;
  constexpr int L = K_::lanes;
  V acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < G; ++q) {
      if (init[r] == nullptr) {
        acc[r][q] = V{};
      } else if (valid == L) {
        acc[r][q] = K_::load(init[r] + q * init_stride);
      } else {
        T tmp[L] = {};
        std::memcpy(tmp, init[r] + q * init_stride, valid * sizeof(T));
        std::memcpy(&acc[r][q], tmp, sizeof(V));
      }
    }
  const T* w = panel;
  for (int64_t k = 0; k < K1; ++k, w += G * L) {
    V wv[G];
    for (int q = 0; q < G; ++q) wv[q] = K_::load(w + q * L);
    for (int r = 0; r < R; ++r) {
      const T av = x[r][k];
      for (int q = 0; q < G; ++q) acc[r][q] += av * wv[q];
    }
  }
  for (int64_t k = 0; k < K2; ++k, w += G * L) {
    V wv[G];
    for (int q = 0; q < G; ++q) wv[q] = K_::load(w + q * L);
    for (int r = 0; r < R; ++r) {
      const T av = a[r][k];
      for (int q = 0; q < G; ++q) acc[r][q] += av * wv[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < G; ++q) {
      if (valid == L) {
        K_::store(dst[r] + q * dst_stride, acc[r][q]);
      } else {
        T tmp[L];
        std::memcpy(tmp, &acc[r][q], sizeof(V));
        std::memcpy(dst[r] + q * dst_stride, tmp, valid * sizeof(T));
      }
    }
}

// Tiles of up to R rows with a compile-time row count (the remainder picks a smaller one).
template <PanelIsa Isa, typename T, int G, int R>
TRF_ALWAYS_INLINE void panel_tile_upto(int rows, const T* const* x, int64_t K1, const T* const* a,
                                       int64_t K2, const T* panel, const T* const* init,
                                       int64_t init_stride, T* const* dst, int64_t dst_stride,
                                       int valid) {
  if constexpr (R > 1) {
    if (rows < R) {
      panel_tile_upto<Isa, T, G, R - 1>(rows, x, K1, a, K2, panel, init, init_stride, dst,
                                        dst_stride, valid);
      return;
    }
  }
  panel_tile<Isa, T, G, R>(x, K1, a, K2, panel, init, init_stride, dst, dst_stride, valid);
}

// rows [b0, b1) x unit chunks [u0, u1) of one step. Row b's operands come from the cell:
//   rows.x_row(b): input row (w.K1 values, unused when w.K1 = 0); rows.a(b): h_prev row (w.K2
//   values); rows.init(b): gate row to start from (null: zeros);
//   rows.dst(b): where the G gate pre-activations go; then epi(b_begin, b_end, j0, j1) runs the
//   cell on those rows and units.
template <PanelIsa Isa, typename T, int G, typename Rows, typename Epi>
TRF_ALWAYS_INLINE void panel_step(int64_t b0, int64_t b1, int64_t u0, int64_t u1,
                                  const GatePanels& w, const T* packed, const Rows& rows,
                                  int64_t init_stride, int64_t dst_stride, const Epi& epi) {
  using K_ = PanelKernel<Isa, T, G>;
  constexpr int L = K_::lanes, R = K_::max_rows;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t j0 = u * L;
    const int valid = static_cast<int>(std::min<int64_t>(L, w.H - j0));
    const T* panel = packed + u * w.panel_size();
    for (int64_t b = b0; b < b1; b += R) {
      const int n = static_cast<int>(std::min<int64_t>(R, b1 - b));
      const T* x[R];
      const T* a[R];
      const T* init[R];
      T* dst[R];
      for (int r = 0; r < n; ++r) {
        x[r] = w.K1 > 0 ? rows.x_row(b + r) : nullptr;
        a[r] = rows.a(b + r);
        const T* in = rows.init(b + r);
        init[r] = in == nullptr ? nullptr : in + j0;
        dst[r] = rows.dst(b + r) + j0;
      }
      // The next tile's gate rows come from the input projection, long evicted from cache: ask
      // for them now so they arrive while this tile's K loop runs.
      const int64_t nb = b + R < b1 ? b + R : b0;
      const int64_t nj = b + R < b1 ? j0 : j0 + L;
      if (nb != b0 || u + 1 < u1)
        for (int64_t r = nb; r < std::min<int64_t>(nb + R, b1); ++r) {
          const T* in = rows.init(r);
          if (in != nullptr)
            for (int q = 0; q < G; ++q) __builtin_prefetch(in + nj + q * init_stride, 0, 3);
        }
      panel_tile_upto<Isa, T, G, R>(n, x, w.K1, a, w.K2, panel, init, init_stride, dst,
                                    dst_stride, valid);
      epi(b, b + n, j0, j0 + valid);
    }
  }
}

// ---- threading --------------------------------------------------------------------------------
// Either each thread owns a block of batch rows for the whole sequence (no barrier; every thread
// streams all of W_hh), or each thread owns a range of unit chunks over all rows (its share of
// W_hh stays in its cache; one barrier per step, since step t+1 reads every unit of h_t). The
// unit split wins once W_hh no longer fits comfortably in one core's L2, or when there are too
// few rows to split.
struct PanelSplit {
  bool by_units = false;
  int threads = 1;
};

inline PanelSplit choose_panel_split(const Schedule& s, const GatePanels& w, size_t elem_size,
                                     int64_t min_rows_per_block) {
  PanelSplit p;
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads < 2 || s.steps == 0) return p;
  const int64_t w_bytes = w.K * w.gates * w.chunks * w.lanes * static_cast<int64_t>(elem_size);
  const int64_t work_per_step = s.rows / std::max<int64_t>(s.steps, 1) * w.K * w.gates * w.H;
  const bool enough_rows = s.batch / min_rows_per_block >= threads;
  // Below ~64K multiply-adds per step the barrier (~1 us) costs more than the split saves.
  const bool units_pay = w.chunks >= threads && work_per_step >= (int64_t{1} << 16);
  if (units_pay && (!enough_rows || w_bytes > (int64_t{384} << 10))) {
    p.by_units = true;
    p.threads = threads;
  }
  return p;
}

// Fold the input projection into the per-step tiles when steps have enough rows to keep the
// concatenated [W_ih, W_hh] panels busy; below that, one GEMM over all steps is faster.
inline bool fuse_input_projection(const Schedule& s) {
  return s.steps > 0 && s.rows >= 16 * s.steps;
}

inline at::Tensor combined_bias(const c10::optional<at::Tensor>& b_a,
                                const c10::optional<at::Tensor>& b_b) {
  const bool has_a = b_a.has_value() && b_a->defined();
  const bool has_b = b_b.has_value() && b_b->defined();
  if (!has_a && !has_b) return at::Tensor();
  return (has_a && has_b ? *b_a + *b_b : (has_a ? *b_a : *b_b)).contiguous();
}

// Final state of each row: its output row at the last step it was processed in.
template <typename T>
void final_state_from_rows(const Schedule& s, const T* rows, int64_t width, T* state) {
  for (int64_t b = 0; b < s.batch; ++b) {
    int64_t t_last;
    if (s.reverse) {
      t_last = 0;
    } else {
      int64_t len = 0;  // batch_sizes is non-increasing: binary search for the first bs <= b
      int64_t lo = 0, hi = s.steps;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (s.batch_sizes[mid] > b) lo = mid + 1; else hi = mid;
      }
      len = lo;
      if (len == 0) continue;  // never ran (cannot happen with batch_sizes[0] == batch)
      t_last = len - 1;
    }
    std::memcpy(state + b * width, rows + (s.offsets[t_last] + b) * width, width * sizeof(T));
  }
}

// Runs loop(b0, b1, u0, u1, barrier) on every thread of the chosen split. With by_units the loop
// must execute `#pragma omp barrier` once per step on every thread, even one without units.
template <typename Loop>
void run_panel_split(const Schedule& s, const GatePanels& w, const PanelSplit& split,
                     int64_t min_rows_per_block, const Loop& loop) {
  if (split.by_units) {
#pragma omp parallel num_threads(split.threads)
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t u0 = w.chunks * tid / nt, u1 = w.chunks * (tid + 1) / nt;
      loop(int64_t{0}, s.batch, u0, u1, nt > 1);
    }
    return;
  }
  for_blocks(split_batch(s, min_rows_per_block),
             [&](RowBlock blk) { loop(blk.lo, blk.hi, int64_t{0}, w.chunks, false); });
}

}  // namespace timerec::cpu
