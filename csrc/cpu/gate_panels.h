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

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

#include "cpu_blas.h"
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

// CPUs this process may run on (its affinity mask).
inline int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Threads a split by hidden units may use: never more than the CPUs, because each step waits for
// the slowest thread and a descheduled one stalls the rest; one inside a parallel region.
inline int unit_split_threads() {
  return at::in_parallel_region() ? 1 : std::min(at::get_num_threads(), available_cpus());
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
  // Capped at 9 so a plain product (G = 1) keeps 9 accumulators, not 30 tiny-tile instantiations.
  static constexpr int max_rows = std::min(9, (IsaTraits<Isa>::registers - G - 1) / G);
  using V = typename VecType<T, IsaTraits<Isa>::bytes>::type;
  using U = typename VecUnaligned<T, IsaTraits<Isa>::bytes>::type;
  static TRF_ALWAYS_INLINE V load(const T* p) { return *reinterpret_cast<const U*>(p); }
  static TRF_ALWAYS_INLINE void store(T* p, const V& v) { *reinterpret_cast<U*>(p) = v; }
};

// Gate rows of a step at inference (nothing saved for a backward): a per-thread scratch of
// kScratchRows rows, row b in slot b mod kScratchRows. The rows of one tile are consecutive and at
// most max_rows (<= 9) of them, so they never share a slot.
constexpr int64_t kScratchRows = 16;
static_assert(kScratchRows >= 9, "a tile's rows must not share a scratch slot");

inline int panel_lanes(PanelIsa isa, size_t elem_size) {
  return (isa == PanelIsa::kAvx512 ? 64 : 32) / static_cast<int>(elem_size);
}

// W (G*H, K), row-major as nn.LSTM/GRU store W_hh, packed as panels: panel u, row k holds
// [gate 0 of units uL..uL+L-1, gate 1 of the same units, ...], zero past H. With w_ih given, the
// panels hold [W_ih, W_hh] (K1 = input features, then K2 = H rows) so one tile also does the
// input projection of its rows. The W_hh rows may hold fewer gates (h_gates, the first ones) than
// the W_ih rows: the time cells' time gates see the input but not h.
struct GatePanels {
  at::Tensor storage;
  int64_t K = 0, K1 = 0, K2 = 0, H = 0, gates = 0, h_gates = 0, lanes = 0, chunks = 0;
  int64_t size = 0;  // elements per panel, fixed by the packing (a view that skips rows keeps it)
  // Gates in panel row k and the offset of that row inside a panel (as packed).
  int64_t gates_at(int64_t k) const { return k < K1 ? gates : h_gates; }
  int64_t row_offset(int64_t k) const {
    return (std::min(k, K1) * gates + std::max<int64_t>(k - K1, 0) * h_gates) * lanes;
  }
  int64_t panel_size() const { return size; }
};

// Columns [k0, Kw) of one (unit chunk, gate) block: `valid` source rows, zeros past them.
template <typename T>
TRF_ALWAYS_INLINE void pack_block_scalar(const T* const* src, int64_t valid, int64_t L,
                                         int64_t k0, int64_t Kw, int64_t ld, T* d) {
  for (int64_t k = k0; k < Kw; ++k, d += ld) {
    for (int64_t l = 0; l < valid; ++l) d[l] = src[l][k];
    for (int64_t l = valid; l < L; ++l) d[l] = T(0);
  }
}

template <typename T>
void pack_rows_into_panels_scalar(const T* w, int64_t Kw, int64_t k_off, const GatePanels& p,
                                  int64_t u0, int64_t u1, T* dst) {
  const int64_t L = p.lanes, G = p.gates_at(k_off);
  for (int64_t u = u0; u < u1; ++u)
    for (int64_t q = 0; q < G; ++q) {
      const T* src[64];
      const int64_t valid = std::min<int64_t>(L, p.H - u * L);
      for (int64_t l = 0; l < valid; ++l) src[l] = w + (q * p.H + u * L + l) * Kw;
      pack_block_scalar(src, valid, L, 0, Kw, G * L,
                        dst + u * p.panel_size() + p.row_offset(k_off) + q * L);
    }
}

#if TRF_HAVE_PANELS
// In-register transpose of an L x L block (L = 16 floats or 8 doubles in zmm registers): stage s
// swaps bit s between row and column index (the off-diagonal s x s sub-blocks of every 2s x 2s
// block), one two-source permute per row. The scalar copy it replaces moved one element per
// cycle: ~15 us per call for a 192 KB W_hh, most of the fixed cost of a B = 1 forward.
template <typename T, int L, int S, typename V, typename M>
TRF_ALWAYS_INLINE void transpose_stage(V* r) {
  M lo, hi;
  for (int j = 0; j < L; ++j) {
    lo[j] = (j & S) == 0 ? j : L + j - S;
    hi[j] = (j & S) == 0 ? j + S : L + j;
  }
  for (int i = 0; i < L; ++i) {
    if (i & S) continue;
    const V a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + S] = __builtin_shuffle(a, b, hi);
  }
}

// All stages: r[i] becomes column i of the L x L block whose rows were r[0..L).
template <typename T, int L, typename V, typename M>
TRF_ALWAYS_INLINE void transpose_block(V* r) {
  transpose_stage<T, L, 1, V, M>(r);
  transpose_stage<T, L, 2, V, M>(r);
  transpose_stage<T, L, 4, V, M>(r);
  if constexpr (L == 16) transpose_stage<T, L, 8, V, M>(r);
}

template <typename T, typename I>
TRF_ALWAYS_INLINE void pack_rows_into_panels_zmm(const T* w, int64_t Kw, int64_t k_off,
                                                 const GatePanels& p, int64_t u0, int64_t u1,
                                                 T* dst) {
  constexpr int L = 64 / sizeof(T);
  typedef T V __attribute__((vector_size(64)));
  typedef T U __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  typedef I M __attribute__((vector_size(64)));
  const int64_t G = p.gates_at(k_off), ld = G * L;
  for (int64_t u = u0; u < u1; ++u)
    for (int64_t q = 0; q < G; ++q) {
      const T* src[L];
      const int64_t valid = std::min<int64_t>(L, p.H - u * L);
      for (int64_t l = 0; l < valid; ++l) src[l] = w + (q * p.H + u * L + l) * Kw;
      T* d = dst + u * p.panel_size() + p.row_offset(k_off) + q * L;
      int64_t k0 = 0;
      if (valid == L) {
        for (; k0 + L <= Kw; k0 += L) {
          V r[L];
          for (int l = 0; l < L; ++l) r[l] = *reinterpret_cast<const U*>(src[l] + k0);
          transpose_block<T, L, V, M>(r);
          for (int l = 0; l < L; ++l) *reinterpret_cast<U*>(d + (k0 + l) * ld) = r[l];
        }
      }
      pack_block_scalar(src, valid, L, k0, Kw, ld, d + k0 * ld);
    }
}

TRF_TARGET_AVX512 inline void pack_rows_into_panels_avx512(const float* w, int64_t Kw,
                                                           int64_t k_off, const GatePanels& p,
                                                           int64_t u0, int64_t u1, float* dst) {
  pack_rows_into_panels_zmm<float, int32_t>(w, Kw, k_off, p, u0, u1, dst);
}
TRF_TARGET_AVX512 inline void pack_rows_into_panels_avx512(const double* w, int64_t Kw,
                                                           int64_t k_off, const GatePanels& p,
                                                           int64_t u0, int64_t u1, double* dst) {
  pack_rows_into_panels_zmm<double, int64_t>(w, Kw, k_off, p, u0, u1, dst);
}
#endif

// Copies rows [q*H, (q+1)*H) of a (G*H, Kw) row-major W into panel rows [k_off, k_off+Kw)
// (G = the panels' gates there: gates for W_ih, h_gates for W_hh),
// for unit chunks [u0, u1) only: a unit-split thread packs the chunks it will read, into its own
// cache. (The ATen permute+contiguous this replaces cost ~50-100 us per call at H = 128, most of
// a B = 1 forward.)
template <typename T>
void pack_rows_into_panels(const T* w, int64_t Kw, int64_t k_off, const GatePanels& p, int64_t u0,
                           int64_t u1, T* dst) {
#if TRF_HAVE_PANELS
  if (p.lanes * static_cast<int64_t>(sizeof(T)) == 64 &&
      detected_panel_isa() == PanelIsa::kAvx512) {
    pack_rows_into_panels_avx512(w, Kw, k_off, p, u0, u1, dst);
    return;
  }
#endif
  pack_rows_into_panels_scalar(w, Kw, k_off, p, u0, u1, dst);
}

#if TRF_HAVE_PANELS
// dst (cols x rows) = src (rows x cols)^T, both row-major, in L x L register blocks (the same
// permute network as the panel packing); ragged edges are copied one element at a time.
template <typename T, typename I>
TRF_ALWAYS_INLINE void transpose_matrix_zmm(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int L = 64 / sizeof(T);
  typedef T V __attribute__((vector_size(64)));
  typedef T U __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  typedef I M __attribute__((vector_size(64)));
  const int64_t rows_full = rows - rows % L, cols_full = cols - cols % L;
  for (int64_t i0 = 0; i0 < rows_full; i0 += L)
    for (int64_t j0 = 0; j0 < cols_full; j0 += L) {
      V r[L];
      for (int l = 0; l < L; ++l) r[l] = *reinterpret_cast<const U*>(src + (i0 + l) * cols + j0);
      transpose_block<T, L, V, M>(r);
      for (int l = 0; l < L; ++l) *reinterpret_cast<U*>(dst + (j0 + l) * rows + i0) = r[l];
    }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = (i < rows_full ? cols_full : 0); j < cols; ++j)
      dst[j * rows + i] = src[i * cols + j];
}

TRF_TARGET_AVX512 inline void transpose_matrix_avx512(const float* src, int64_t rows, int64_t cols,
                                                      float* dst) {
  transpose_matrix_zmm<float, int32_t>(src, rows, cols, dst);
}
TRF_TARGET_AVX512 inline void transpose_matrix_avx512(const double* src, int64_t rows,
                                                      int64_t cols, double* dst) {
  transpose_matrix_zmm<double, int64_t>(src, rows, cols, dst);
}
#endif

// W^T as a new contiguous matrix (see RecurrentWeight::for_forward for when it is worth making).
inline at::Tensor transposed(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "timerec_fast: transposed expects a matrix, got ", w.dim(), "-D");
  const at::Tensor src = w.contiguous();
  const int64_t rows = src.size(0), cols = src.size(1);
  at::Tensor dst = at::empty({cols, rows}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "timerec_fast_transposed", [&] {
    const scalar_t* a = src.data_ptr<scalar_t>();
    scalar_t* b = dst.data_ptr<scalar_t>();
#if TRF_HAVE_PANELS
    if (detected_panel_isa() == PanelIsa::kAvx512) {
      transpose_matrix_avx512(a, rows, cols, b);
      return;
    }
#endif
    constexpr int64_t kBlock = 16;
    for (int64_t i0 = 0; i0 < rows; i0 += kBlock)
      for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
        const int64_t i1 = std::min(rows, i0 + kBlock), j1 = std::min(cols, j0 + kBlock);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = i0; i < i1; ++i) b[j * rows + i] = a[i * cols + j];
      }
  });
  return dst;
}

// The panels' geometry alone (no storage): what choose_panel_split needs to decide.
// h_gates < 0: as many as gates.
inline GatePanels panel_geometry(int64_t K1, int64_t K2, int64_t H, int64_t gates, int lanes,
                                 int64_t h_gates = -1) {
  GatePanels p;
  p.K1 = K1;
  p.K2 = K2;
  p.K = K1 + K2;
  p.H = H;
  p.gates = gates;
  p.h_gates = h_gates < 0 ? gates : h_gates;
  p.lanes = lanes;
  p.chunks = (H + lanes - 1) / lanes;
  p.size = p.row_offset(p.K);
  return p;
}

// Panels for W_hh (and W_ih) with storage allocated but not yet filled: run_panel_split has each
// thread fill the chunks it reads (pack_gate_chunks), so a unit-split thread's share lands in its
// own L2 instead of being written by one thread and fetched by the other (at B = 1 the packed
// copy made by one thread measured ~20 us of a 180 us GRU forward).
// w_hh holds h_gates (default: gates) gate blocks, w_ih (if given) gates.
inline GatePanels gate_panels_for(const at::Tensor& w_hh, int64_t gates, int64_t H, int lanes,
                                  const at::Tensor& w_ih = at::Tensor(), int64_t h_gates = -1) {
  TORCH_INTERNAL_ASSERT(w_hh.is_contiguous() && (!w_ih.defined() || w_ih.is_contiguous()));
  GatePanels p =
      panel_geometry(w_ih.defined() ? w_ih.size(1) : 0, w_hh.size(1), H, gates, lanes, h_gates);
  // (chunks, panel_size) <- W viewed as (gates, H, K), H zero-padded to chunks * lanes.
  p.storage = at::empty({p.chunks, p.panel_size()}, w_hh.options());
  return p;
}

template <typename T>
void pack_gate_chunks(const GatePanels& p, const T* w_hh, const T* w_ih, int64_t u0, int64_t u1) {
  T* dst = p.storage.data_ptr<T>();
  if (w_ih != nullptr) pack_rows_into_panels<T>(w_ih, p.K1, 0, p, u0, u1, dst);
  pack_rows_into_panels<T>(w_hh, p.K2, p.K1, p, u0, u1, dst);
}

// W (K, n) row-major with n a multiple of 4 lanes, as four "gates" of n / 4 columns: panel u, row k
// holds W[k, q n/4 + uL .. + L] for q = 0..3 side by side, so a tile covers four column chunks
// (6 rows x 4 vectors with AVX-512, as the forward's gate tiles) instead of one (9 rows x 1
// vector: ten loads for nine FMAs). C's row keeps its natural order (gate q at q n/4). Training
// step, in-process A/B against one-chunk panels (60 alternating steps, 2 processes, Xeon 6/207):
// LSTM 1.06x at (256, 50, 64, 64), 1.03-1.04x at 128 and (64, 200, 128, 256); Time-LSTM 1.05x /
// 1.01x and GRU 1.04-1.05x / 1.00-1.01x at 64 / 128.
inline GatePanels pack_kn_quarter_panels(const at::Tensor& w_kn, int lanes) {
  const int64_t n = w_kn.size(1), Hq = n / 4;
  GatePanels p = panel_geometry(0, w_kn.size(0), Hq, 4, lanes);
  p.storage = at::empty({p.chunks, p.panel_size()}, w_kn.options());
  AT_DISPATCH_FLOATING_TYPES(w_kn.scalar_type(), "timerec_fast_pack_kn_quarter_panels", [&] {
    const scalar_t* src = w_kn.data_ptr<scalar_t>();
    scalar_t* dst = p.storage.data_ptr<scalar_t>();
    for (int64_t u = 0; u < p.chunks; ++u)
      for (int64_t k = 0; k < p.K; ++k)
        for (int64_t q = 0; q < 4; ++q)
          std::memcpy(dst + u * p.panel_size() + (k * 4 + q) * lanes,
                      src + k * n + q * Hq + u * lanes, lanes * sizeof(scalar_t));
  });
  return p;
}

// One gate's panels from W given as (K, n) row-major (the layout BLAS uses for x @ W): panel u,
// row k is W[k, uL .. uL+L-1], a contiguous copy.
inline GatePanels pack_kn_panels(const at::Tensor& w_kn, int lanes) {
  const int64_t n = w_kn.size(1);
  if (n % (4 * lanes) == 0) return pack_kn_quarter_panels(w_kn, lanes);
  GatePanels p = panel_geometry(0, w_kn.size(0), w_kn.size(1), 1, lanes);
  p.storage = at::empty({p.chunks, p.panel_size()}, w_kn.options());
  AT_DISPATCH_FLOATING_TYPES(w_kn.scalar_type(), "timerec_fast_pack_kn_panels", [&] {
    const scalar_t* src = w_kn.data_ptr<scalar_t>();
    scalar_t* dst = p.storage.data_ptr<scalar_t>();
    for (int64_t u = 0; u < p.chunks; ++u) {
      const int64_t valid = std::min<int64_t>(lanes, p.H - u * lanes);
      for (int64_t k = 0; k < p.K; ++k) {
        scalar_t* d = dst + (u * p.K + k) * lanes;
        std::memcpy(d, src + k * p.H + u * lanes, valid * sizeof(scalar_t));
        for (int64_t l = valid; l < lanes; ++l) d[l] = scalar_t(0);
      }
    }
  });
  return p;
}

// One tile: R rows x the G gate vectors of one unit chunk. acc starts from init[r] (the gate row,
// gate q at init[r] + q * init_stride; null: zeros), accumulates [x[r], a[r]] @ panel over the
// panel's K = K1 + K2 rows (x: the input row when the input projection is fused in, K1 = 0
// otherwise; a: h_prev), and is stored to dst[r] (gate q at dst[r] + q * dst_stride). `valid` < L
// lanes only for the last chunk. The h rows feed only the first G2 gates (GatePanels::h_gates).
template <PanelIsa Isa, typename T, int G, int R, int G2 = G>
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
  for (int64_t k = 0; k < K2; ++k, w += G2 * L) {
    V wv[G2];
    for (int q = 0; q < G2; ++q) wv[q] = K_::load(w + q * L);
    for (int r = 0; r < R; ++r) {
      const T av = a[r][k];
      for (int q = 0; q < G2; ++q) acc[r][q] += av * wv[q];
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
template <PanelIsa Isa, typename T, int G, int R, int G2 = G>
TRF_ALWAYS_INLINE void panel_tile_upto(int rows, const T* const* x, int64_t K1, const T* const* a,
                                       int64_t K2, const T* panel, const T* const* init,
                                       int64_t init_stride, T* const* dst, int64_t dst_stride,
                                       int valid) {
  if constexpr (R > 1) {
    if (rows < R) {
      panel_tile_upto<Isa, T, G, R - 1, G2>(rows, x, K1, a, K2, panel, init, init_stride, dst,
                                            dst_stride, valid);
      return;
    }
  }
  panel_tile<Isa, T, G, R, G2>(x, K1, a, K2, panel, init, init_stride, dst, dst_stride, valid);
}

// rows [b0, b1) x unit chunks [u0, u1) of one step. Row b's operands come from the cell:
//   rows.x_row(b): input row (w.K1 values, unused when w.K1 = 0); rows.a(b): h_prev row (w.K2
//   values); rows.init(b): gate row to start from (null: zeros);
//   rows.dst(b): where the G gate pre-activations go; then epi(b_begin, b_end, j0, j1) runs the
//   cell on those rows and units. The h_prev rows feed the first G2 gates only (w.h_gates).
template <PanelIsa Isa, typename T, int G, int G2 = G, typename Rows, typename Epi>
TRF_ALWAYS_INLINE void panel_step(int64_t b0, int64_t b1, int64_t u0, int64_t u1,
                                  const GatePanels& w, const T* packed, const Rows& rows,
                                  int64_t init_stride, int64_t dst_stride, const Epi& epi) {
  using K_ = PanelKernel<Isa, T, G>;
  constexpr int L = K_::lanes, R = K_::max_rows;
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(w.gates == G && w.h_gates == G2);
  // A step of one row tile (e.g. B = 1 split over threads by units) spends its K loop waiting
  // on h_prev, which the other threads wrote last step: one cross-core miss per line, in series
  // as the loop reaches each line. Asking for all of them at once overlaps the misses (B = 1,
  // H = 128, 2 threads: 3-4% of the forward).
  if (b1 - b0 <= R)
    for (int64_t b = b0; b < b1; ++b) {
      const T* prev = rows.a(b);
      for (int64_t k = 0; k < w.K2; k += 64 / static_cast<int64_t>(sizeof(T)))
        __builtin_prefetch(prev + k, 0, 3);
    }
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t j0 = u * L;
    const int valid = static_cast<int>(std::min<int64_t>(L, w.H - j0));
    const T* panel = packed + u * w.panel_size();
    for (int64_t b = b0; b < b1; b += R) {
      const int n = static_cast<int>(std::min<int64_t>(R, b1 - b));
      // Zeroed: GCC 12 cannot see that n >= 1 fills them (it warned at R = 1, the AVX2 tile of
      // six gates).
      const T* x[R] = {};
      const T* a[R] = {};
      const T* init[R] = {};
      T* dst[R] = {};
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
      panel_tile_upto<Isa, T, G, R, G2>(n, x, w.K1, a, w.K2, panel, init, init_stride, dst,
                                        dst_stride, valid);
      epi(b, b + n, j0, j0 + valid);
    }
  }
}

// ---- threading --------------------------------------------------------------------------------
// "2048K" / "2M" / "512" (sysfs cache sizes) in bytes; 0 if unreadable.
inline int64_t parse_cache_size(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) return 0;
  const int64_t scale = *end == 'K' ? 1024 : *end == 'M' ? (1 << 20) : *end == 'G' ? (1 << 30) : 1;
  return value * scale;
}

// How many CPUs a sysfs cpu list ("0-1,4") names.
inline int count_cpu_list(const std::string& list) {
  int count = 0;
  std::stringstream items(list);
  std::string item;
  while (std::getline(items, item, ',')) {
    int lo = 0, hi = 0;
    const int n = std::sscanf(item.c_str(), "%d-%d", &lo, &hi);
    count += n == 2 && hi >= lo ? hi - lo + 1 : (n >= 1 ? 1 : 0);
  }
  return count;
}

// The L2 cache of one CPU's share (size / CPUs sharing it, so hyperthread siblings halve it),
// read once from sysfs; 1 MB where it cannot be read.
inline int64_t l2_bytes_per_core() {
  static const int64_t bytes = [] {
#if defined(__linux__)
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size"),
          shared_file(dir + "shared_cpu_list");
      int level = 0;
      std::string type, size, shared;
      if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) continue;
      if (level != 2 || type == "Instruction") continue;
      const int64_t total = parse_cache_size(size);
      const int sharers = (shared_file >> shared) ? std::max(1, count_cpu_list(shared)) : 1;
      if (total > 0) return total / sharers;
    }
#endif
    return int64_t{1} << 20;
  }();
  return bytes;
}

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
  const int threads = unit_split_threads();
  if (threads < 2 || s.steps == 0) return p;
  const int64_t w_bytes = w.panel_size() * w.chunks * static_cast<int64_t>(elem_size);
  // panel_size / lanes: multiply-adds per row and unit.
  const int64_t work_per_step =
      s.rows / std::max<int64_t>(s.steps, 1) * w.panel_size() / w.lanes * w.H;
  const bool enough_rows = s.batch / min_rows_per_block >= threads;
  // Below ~32K multiply-adds per step the barrier (~1 us) costs more than the split saves (GRU,
  // B = 1, H = 128: 49K per step, 3.0 us single-threaded, 2.1 us split over 2 threads).
  const bool units_pay = w.chunks >= threads && work_per_step >= (int64_t{1} << 15);
  // W "fits" while it takes under half of a core's L2. Forward B = 256, T = 50, 2 threads, on the
  // 2 MB-L2 Xeon, batch split against unit split (the rule was a fixed 384 KB before): LSTM
  // H = I = 128 (512 KB of panels) 1.07-1.08x faster, 144 (663 KB) and 176 (991 KB) 1.13x,
  // training at 128 1.03x; GRU 128 (393 KB) even; (B, T, I, H) = (64, 200, 128, 256) (1.5 MB)
  // 0.93x, so it stays split by units. On the 1 MB-L2 EPYC this keeps W >= 512 KB split by units.
  if (units_pay && (!enough_rows || 2 * w_bytes >= l2_bytes_per_core())) {
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

// Runs loop(b0, b1, u0, u1, barrier) on every thread of the chosen split. With by_units (barrier
// true) the loop must execute `#pragma omp barrier` once per step on every thread, even one
// without units. (A spin barrier of our own measured 2 us per 50 steps against libgomp's 12.5 us,
// but on a loaded machine, two busy processes on the 2 cores, a B=1 GRU forward took 24 ms with
// it against 0.2 ms with libgomp's: libgomp's barrier stays.)
// pack(u0, u1) fills the panels' unit chunks [u0, u1): each unit-split thread packs its own
// chunks (it is the only one to read them) before its first step; a batch split packs them all
// first.
template <typename Pack, typename Loop>
void run_panel_split(const Schedule& s, const GatePanels& w, const PanelSplit& split,
                     int64_t min_rows_per_block, const Pack& pack, const Loop& loop) {
  if (split.by_units) {
#pragma omp parallel num_threads(split.threads)
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t u0 = w.chunks * tid / nt, u1 = w.chunks * (tid + 1) / nt;
      pack(u0, u1);
      loop(int64_t{0}, s.batch, u0, u1, nt > 1);
    }
    return;
  }
  if (w.storage.nbytes() >= (size_t{256} << 10)) {
    at::parallel_for(0, w.chunks, 1, pack);
  } else {
    pack(int64_t{0}, w.chunks);
  }
  for_blocks(split_batch(s, min_rows_per_block),
             [&](RowBlock blk) { loop(blk.lo, blk.hi, int64_t{0}, w.chunks, false); });
}

// ---- plain per-step products on packed weights ------------------------------------------------
// C[rows x n] (+)= A[rows x k] @ W for the per-step products that have no fused epilogue (the
// backward's dh_{t-1} = dG_t W_hh, the time cells' forward): W^T packed once per call as panels
// of one vector per chunk; a tile of up to 9 rows x 16 columns per K loop. Few rows fall back to
// recurrent_gemm's small-GEMM kernel, which keeps more columns in flight per row.
template <typename T>
struct PanelRowsPlain {
  const T* a_base;
  int64_t lda;
  T* c_base;
  int64_t ldc;
  bool accumulate;
  TRF_ALWAYS_INLINE const T* x_row(int64_t) const { return nullptr; }
  TRF_ALWAYS_INLINE const T* a(int64_t b) const { return a_base + b * lda; }
  TRF_ALWAYS_INLINE const T* init(int64_t b) const {
    return accumulate ? c_base + b * ldc : nullptr;
  }
  TRF_ALWAYS_INLINE T* dst(int64_t b) const { return c_base + b * ldc; }
};

struct NoEpilogue {
  TRF_ALWAYS_INLINE void operator()(int64_t, int64_t, int64_t, int64_t) const {}
};

template <PanelIsa Isa, typename T>
TRF_ALWAYS_INLINE void panel_gemm_impl(int64_t rows, const T* a, int64_t lda, const GatePanels& w,
                                       const T* packed, T* c, int64_t ldc, bool accumulate) {
  const PanelRowsPlain<T> r{a, lda, c, ldc, accumulate};
  if (w.gates == 4)  // pack_kn_quarter_panels: column quarters w.H apart
    panel_step<Isa, T, 4>(0, rows, 0, w.chunks, w, packed, r, w.H, w.H, NoEpilogue{});
  else
    panel_step<Isa, T, 1>(0, rows, 0, w.chunks, w, packed, r, 0, 0, NoEpilogue{});
}

#if TRF_HAVE_PANELS
#define TRF_DEFINE_PANEL_GEMM(T)                                                                 \
  TRF_TARGET_AVX512 inline void panel_gemm_avx512(int64_t rows, const T* a, int64_t lda,        \
                                                  const GatePanels& w, const T* packed, T* c,    \
                                                  int64_t ldc, bool accumulate) {                \
    panel_gemm_impl<PanelIsa::kAvx512, T>(rows, a, lda, w, packed, c, ldc, accumulate);          \
  }                                                                                              \
  TRF_TARGET_AVX2 inline void panel_gemm_avx2(int64_t rows, const T* a, int64_t lda,            \
                                              const GatePanels& w, const T* packed, T* c,        \
                                              int64_t ldc, bool accumulate) {                    \
    panel_gemm_impl<PanelIsa::kAvx2, T>(rows, a, lda, w, packed, c, ldc, accumulate);            \
  }
TRF_DEFINE_PANEL_GEMM(float)
TRF_DEFINE_PANEL_GEMM(double)
#undef TRF_DEFINE_PANEL_GEMM
#endif

// Packing W into panels is paid back over the steps that reuse it; a call of one step with few
// rows (a Cell's forward or backward, T = 1) would pack W for a single small product, which BLAS
// does reading W as stored. Cell calls, 2 threads, 3 alternating processes against panels,
// medians of 1000-2000 calls each: LSTMCell (B, H) = (1, 128) forward 24 against 35 us,
// training step 175 against 279 us; (64, 128) 114 against 144 us and 528 against 618 us;
// GRUCell (1, 128) 20 against 25 us, 163 against 179 us; (64, 128) 87 against 107 us, 440
// against 498 us. At (256, 256) the ops ran 0.85-0.95x the time but the LSTMCell training step
// often took 1.25x (glibc's default malloc; MKL's and oneDNN's buffers in place of the packed
// panels), so past kOneStepBlasRows rows one step keeps the panels.
constexpr int64_t kOneStepBlasRows = 64;
inline PanelIsa panel_isa_for(const Schedule& s) {
  return s.steps == 1 && s.rows <= kOneStepBlasRows ? PanelIsa::kNone : panel_isa();
}

// For the per-step products of a backward (dh_{t-1} = dG_t W_hh): panels pay off only for
// products of more than kSmallGemmRows rows (fewer take the small-GEMM kernels on the plain
// matrix), so when no step has more (s.batch, the first step's rows) packing would only copy W
// again.
inline PanelIsa per_step_panel_isa(const Schedule& s) {
  return s.batch > kSmallGemmRows ? panel_isa_for(s) : PanelIsa::kNone;
}

// A per-step right operand, built once per call: the plain matrix for BLAS and the small-GEMM
// kernels, plus, when the panel kernel is on, its columns packed into panels. prepare takes it as
// k x n (C = A @ W: the backward's W_hh); prepare_rows as n x k, the way PyTorch stores a weight
// (C = A @ W^T: the forward's), its panels packed straight from the rows, without a W^T copy
// (for_forward below picks between the two for the forward).
template <typename T>
struct RecurrentWeight {
  at::Tensor w;         // contiguous: k x n, or n x k when by_rows
  bool by_rows = false;
  GatePanels panels;
  PanelIsa isa = PanelIsa::kNone;

  static RecurrentWeight prepare(const at::Tensor& w_kn, PanelIsa isa) {
    RecurrentWeight r;
    r.w = w_kn.contiguous();
    r.isa = isa;
    if (isa != PanelIsa::kNone) r.panels = pack_kn_panels(r.w, panel_lanes(isa, sizeof(T)));
    return r;
  }
  static RecurrentWeight prepare_rows(const at::Tensor& w_nk, PanelIsa isa) {
    RecurrentWeight r;
    r.w = w_nk.contiguous();
    r.by_rows = true;
    r.isa = isa;
    if (isa != PanelIsa::kNone) {  // W as one "gate" of n rows
      r.panels = gate_panels_for(r.w, 1, r.w.size(0), panel_lanes(isa, sizeof(T)));
      pack_rows_into_panels(r.w.data_ptr<T>(), r.w.size(1), 0, r.panels, 0, r.panels.chunks,
                            r.panels.storage.template data_ptr<T>());
    }
    return r;
  }
  // The forward's W (n x k as stored) for a call with schedule s. More than kSmallGemmRows rows a
  // step: panels (or BLAS) straight from the rows. Fewer: small_gemm_nt reads W as stored, or
  // small_gemm reads a W^T copy made first. The copy costs 15-20 us for a (4H, H) fp32 W at
  // H = 128 (most of a T = 1 call); small_gemm_nt then costs ~0.5-1.5 us more per step (it folds
  // each block of outputs with a shuffle tree), measured at B = 1 and 4, T = 1 and 50, on the GRU,
  // TimeLSTM and projected LSTM. So the copy is made for calls of more than 16 rows in all.
  static RecurrentWeight for_forward(const at::Tensor& w_nk, const Schedule& s, PanelIsa isa) {
    const bool few_rows = s.batch <= kSmallGemmRows;
    const bool short_call = s.rows <= 16;
    if (!few_rows) return prepare_rows(w_nk, isa);
    if (short_call) return prepare_rows(w_nk, PanelIsa::kNone);
    return prepare(transposed(w_nk), PanelIsa::kNone);
  }
  const T* data() const { return w.data_ptr<T>(); }
};

template <typename T>
void recurrent_gemm(int64_t rows, int64_t k, int64_t n, const T* a, int64_t lda,
                    const RecurrentWeight<T>& w, T* c, int64_t ldc, bool accumulate) {
#if TRF_HAVE_PANELS
  if (w.isa != PanelIsa::kNone && rows > kSmallGemmRows) {
    const T* packed = w.panels.storage.template data_ptr<T>();
    if (w.isa == PanelIsa::kAvx512)
      panel_gemm_avx512(rows, a, lda, w.panels, packed, c, ldc, accumulate);
    else
      panel_gemm_avx2(rows, a, lda, w.panels, packed, c, ldc, accumulate);
    return;
  }
#endif
  if (w.by_rows)
    recurrent_gemm_nt<T>(rows, k, n, a, lda, w.data(), c, ldc, accumulate);
  else
    recurrent_gemm<T>(rows, k, n, a, lda, w.data(), c, ldc, accumulate);
}

}  // namespace timerec::cpu
