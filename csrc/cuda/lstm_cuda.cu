// LSTM layer, CUDA: same ops, schemas, semantics and saved tensors as csrc/cpu/lstm_cpu.cpp.
//
// Forward, two strategies chosen per call by choose_forward_strategy() (below):
//  (a) "cublas": the input projection of every step as one GEMM into `gates`, then per step one
//      cuBLAS GEMM h_{t-1} W_hh^T into an fp32 (fp64 for double) scratch and one fused pointwise
//      kernel (timerec::lstm_cell_forward) that adds bias + input projection + recurrent term.
//  (b) "persistent": one cooperative kernel for the whole sequence. Each block owns a slice of the
//      hidden units, keeps its W_hh rows (all four gates of its units) in shared memory for every
//      step, and the blocks meet at one grid-wide barrier per step. No projection; packed input
//      up to kMaxTableSteps steps (the step table travels in the kernel arguments, so nothing is
//      copied host-to-device and the launch stays graph-capturable).
// Backward: always strategy (a): BPTT with one pointwise kernel (timerec::lstm_cell_backward) and
// one cuBLAS GEMM per step, then dX, dW_ih, dW_hh, dW_hr, db as large GEMMs/reductions.
//
// Precision: half/bf16 compute in fp32 (GEMM accumulation, gate math, the carried cell state c and
// its gradient dc, the carried dh). The schema's saved tensors and outputs share the input dtype
// (the fake kernels in timerec_fast/ops.py say so), so the saved `cells` and `gates` of a half/bf16
// run are rounded to that dtype; the backward recomputes tanh(c) from the rounded cells.
//
// Everything runs on at::cuda::getCurrentCUDAStream() (cuBLAS through the current handle), with
// no host synchronisation: batch_sizes is read on the host (it is a CPU tensor by contract).
//
// TESTED HERE: compiles for sm_90 only. Nothing in this file has run on a GPU yet; see
// tests/test_cuda_lstm.py and scripts/gpu_check.sh for the checks that will.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../include/timerec/lstm_cell.h"
#include "../rnn_common.h"
#include "cuda_blas.cuh"
#include "cuda_rnn_common.cuh"

namespace timerec::cuda {
namespace {

// ---- strategy (a): pointwise kernels ----------------------------------------------------------

// One step, rows [0, n): gates rows hold x W_ih^T (T) on entry and the activated gates on exit.
// rec (n x 4H, opmath) = h_{t-1} W_hh^T; bias (4H, opmath) = b_ih + b_hh or null.
// c_state (B x H, opmath): rows [0, carried) hold c_{t-1}, the rest still hold c0 (see Schedule).
template <typename T, typename A>
__global__ void lstm_forward_step_kernel(int64_t n, int64_t H, T* __restrict__ gates,
                                         const A* __restrict__ rec, const A* __restrict__ bias,
                                         A* __restrict__ c_state, T* __restrict__ cells,
                                         T* __restrict__ h_dst, T* __restrict__ h_state) {
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    T* g = gates + b * 4 * H;
    const A* r = rec + b * 4 * H;
    A v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      v[q] = static_cast<A>(g[q * H + j]) + r[q * H + j] + (bias != nullptr ? bias[q * H + j] : A(0));
    }
    A c, h;
    lstm_cell_forward<A>(v[0], v[1], v[2], v[3], c_state[idx], c, h);
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q * H + j] = static_cast<T>(v[q]);
    c_state[idx] = c;
    cells[idx] = static_cast<T>(c);
    h_dst[idx] = static_cast<T>(h);
    if (h_state != nullptr) h_state[idx] = static_cast<T>(h);
  }
}

// One backward step, rows [0, n). dh (n x ldh, opmath) plus gy (n x H, T; null when projecting)
// is the gradient reaching h_t; dc_state (B x H, opmath) holds dL/dc_t on entry and dL/dc_{t-1} on
// exit. Also gathers h_prev (n x P): the state each row started the step from (out rows of the
// step processed before, or h0), the right operand of dW_hh = dGates^T h_prev.
template <typename T, typename A>
__global__ void lstm_backward_step_kernel(int64_t n, int64_t H, int64_t P, int64_t carried,
                                          const T* __restrict__ gates, const T* __restrict__ cells,
                                          const T* __restrict__ cells_prev, const T* __restrict__ c0,
                                          const A* __restrict__ dh, int64_t ldh,
                                          const T* __restrict__ gy, A* __restrict__ dc_state,
                                          T* __restrict__ dgates, const T* __restrict__ out_prev,
                                          const T* __restrict__ h0, T* __restrict__ h_prev) {
  const int64_t W = H > P ? H : P;
  const int64_t total = n * W;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / W, j = idx - b * W;
    if (j < H) {
      const T* g = gates + b * 4 * H;
      const A cp = static_cast<A>(b < carried ? cells_prev[b * H + j] : c0[b * H + j]);
      A d = dh[b * ldh + j];
      if (gy != nullptr) d += static_cast<A>(gy[b * H + j]);
      A dc = dc_state[b * H + j];
      A di, df, dg, d_o, dcp;
      lstm_cell_backward<A>(static_cast<A>(g[j]), static_cast<A>(g[H + j]),
                            static_cast<A>(g[2 * H + j]), static_cast<A>(g[3 * H + j]), cp,
                            static_cast<A>(cells[b * H + j]), d, dc, di, df, dg, d_o, dcp);
      T* o = dgates + b * 4 * H;
      o[j] = static_cast<T>(di);
      o[H + j] = static_cast<T>(df);
      o[2 * H + j] = static_cast<T>(dg);
      o[3 * H + j] = static_cast<T>(d_o);
      dc_state[b * H + j] = dcp;
    }
    if (j < P) h_prev[b * P + j] = b < carried ? out_prev[b * P + j] : h0[b * P + j];
  }
}

// dy (n x P, T) = dh (opmath) + gy (T): the gradient reaching the projected h_t.
template <typename T, typename A>
__global__ void add_grad_kernel(int64_t total, const A* __restrict__ dh, const T* __restrict__ gy,
                                T* __restrict__ dy) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    dy[idx] = static_cast<T>(dh[idx] + static_cast<A>(gy[idx]));
  }
}

// ---- strategy (b): persistent forward ---------------------------------------------------------

// Step table of a packed sequence, passed by value in the kernel arguments (4 KB limit).
constexpr int kMaxTableSteps = 900;
struct StepTable {
  int32_t n[kMaxTableSteps];  // batch_sizes, in time order
};

template <typename T>
struct PersistentArgs {
  T* gates;  // (N, 4H): x W_ih^T on entry, activated gates on exit
  T* cells;
  T* out;
  T* h_n;
  T* c_n;
  const T* h0;
  const T* c0;
  const T* w_hh;  // (4H, H)
  const at::opmath_type<T>* bias;  // (4H) or null
  int64_t N;
  int H, B, steps, J;  // J = hidden units per block
  int packed, reverse;
};

// Load through L2 only (ld.global.cg): data written by other blocks of this kernel.
template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &bits, sizeof(T));
    return v;
  } else {
    return __ldcg(p);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Shared memory of one block: W slice (4J x H, T), h_{t-1} (B x H, A), pre-activations (B x 4J, A),
// cell state (B x J, A).
template <typename T>
inline size_t persistent_smem_bytes(int64_t B, int64_t H, int64_t J) {
  using A = at::opmath_type<T>;
  auto up = [](size_t x) { return (x + 15) & ~size_t(15); };
  return up(4 * J * H * sizeof(T)) + up(B * H * sizeof(A)) + up(B * 4 * J * sizeof(A)) +
         up(B * J * sizeof(A));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_persistent_forward_kernel(const PersistentArgs<T> a, const StepTable tab) {
  using A = at::opmath_type<T>;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = a.H, J = a.J, R = 4 * J, B = a.B;
  auto up = [](size_t x) { return (x + 15) & ~size_t(15); };
  T* w_s = reinterpret_cast<T*>(smem_raw);
  A* h_s = reinterpret_cast<A*>(smem_raw + up(size_t(R) * H * sizeof(T)));
  A* acc_s = h_s + up(size_t(B) * H * sizeof(A)) / sizeof(A);
  A* c_s = acc_s + up(size_t(B) * R * sizeof(A)) / sizeof(A);
  const int j0 = blockIdx.x * J;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

  // Gate rows q*H + j0 + jj of W_hh, for q in 0..3 and jj in 0..J-1, stay here for every step.
  for (int idx = tid; idx < R * H; idx += blockDim.x) {
    const int r = idx / H, p = idx - r * H, q = r / J, j = j0 + (r - q * J);
    w_s[idx] = j < H ? a.w_hh[(int64_t(q) * H + j) * H + p] : T(0);
  }

  int64_t off = a.reverse ? a.N : 0, off_prev = 0;
  int n_prev = 0;
  for (int k = 0; k < a.steps; ++k) {
    const int t = a.reverse ? a.steps - 1 - k : k;
    const int n = a.packed ? tab.n[t] : B;
    if (a.reverse) off -= n;
    const int carried = k == 0 ? 0 : min(n, n_prev);
    int n_next = 0;
    if (k + 1 < a.steps) n_next = a.packed ? tab.n[a.reverse ? t - 1 : t + 1] : B;

    // h_{t-1}: out rows of the step processed before (written by every block before the last
    // grid barrier; read through L2, never the non-coherent path), or h0 for new rows.
    for (int idx = tid; idx < n * H; idx += blockDim.x) {
      const int b = idx / H, p = idx - b * H;
      h_s[idx] = b < carried ? static_cast<A>(load_cg(a.out + (off_prev + b) * H + p))
                             : static_cast<A>(a.h0[int64_t(b) * H + p]);
    }
    __syncthreads();

    // pre[b][r] = h_s[b] . w_s[r]: each warp item is 2 rows x 4 batch rows, lanes split K.
    const int bgroups = (n + 3) / 4, items = (R / 2) * bgroups;
    for (int it = warp; it < items; it += nwarps) {
      const int r0 = 2 * (it / bgroups), b0 = 4 * (it % bgroups);
      const T* w0 = w_s + r0 * H;
      const T* w1 = w0 + H;
      const A* hb[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) hb[u] = h_s + min(b0 + u, n - 1) * H;
      A s0[4] = {A(0), A(0), A(0), A(0)}, s1[4] = {A(0), A(0), A(0), A(0)};
      for (int p = lane; p < H; p += 32) {
        const A x0 = static_cast<A>(w0[p]), x1 = static_cast<A>(w1[p]);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const A hv = hb[u][p];
          s0[u] += x0 * hv;
          s1[u] += x1 * hv;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        s0[u] = warp_sum(s0[u]);
        s1[u] = warp_sum(s1[u]);
      }
      if (lane == 0) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (b0 + u < n) {
            acc_s[(b0 + u) * R + r0] = s0[u];
            acc_s[(b0 + u) * R + r0 + 1] = s1[u];
          }
        }
      }
    }
    __syncthreads();

    // Pointwise: the shared cell math, the cell state kept on chip in opmath precision.
    for (int idx = tid; idx < n * J; idx += blockDim.x) {
      const int b = idx / J, jj = idx - b * J, j = j0 + jj;
      if (j >= H) continue;
      const int64_t row = off + b;
      T* g = a.gates + row * 4 * H;
      A v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[q] = acc_s[b * R + q * J + jj] + static_cast<A>(g[q * H + j]) +
               (a.bias != nullptr ? a.bias[q * H + j] : A(0));
      }
      const A cp = b < carried ? c_s[idx] : static_cast<A>(a.c0[int64_t(b) * H + j]);
      A c, h;
      lstm_cell_forward<A>(v[0], v[1], v[2], v[3], cp, c, h);
#pragma unroll
      for (int q = 0; q < 4; ++q) g[q * H + j] = static_cast<T>(v[q]);
      a.cells[row * H + j] = static_cast<T>(c);
      a.out[row * H + j] = static_cast<T>(h);
      c_s[idx] = c;
      if (b >= n_next) {  // this row's last step: final state
        a.h_n[int64_t(b) * H + j] = static_cast<T>(h);
        a.c_n[int64_t(b) * H + j] = static_cast<T>(c);
      }
    }
    off_prev = off;
    if (!a.reverse) off += n;
    n_prev = n;
    if (k + 1 < a.steps) grid.sync();
  }
}

// ---- strategy choice ---------------------------------------------------------------------------

enum class Strategy { kCublas, kPersistent };

// TIMEREC_LSTM_CUDA_PATH = auto (default) | cublas | persistent. "persistent" still falls back to
// cublas where the persistent kernel cannot run the call (projection, too much shared memory, ...).
inline Strategy requested_strategy() {
  const char* env = std::getenv("TIMEREC_LSTM_CUDA_PATH");
  if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == '\0') return Strategy::kCublas;
  if (std::strcmp(env, "cublas") == 0) return Strategy::kCublas;
  if (std::strcmp(env, "persistent") == 0) return Strategy::kPersistent;
  TORCH_CHECK(false, "timerec_fast: TIMEREC_LSTM_CUDA_PATH must be auto, cublas or persistent, got '",
              env, "'");
  return Strategy::kCublas;
}

inline bool path_is_auto() {
  const char* env = std::getenv("TIMEREC_LSTM_CUDA_PATH");
  return env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0;
}

// Crossover of the automatic choice: UNMEASURED PLACEHOLDERS. Nothing on the machine this was
// written on could time a GPU; run `python benchmarks/gpu_bench.py --crossover` on the target card
// and set these from its output. The reasoning behind the guess: the persistent kernel computes on
// CUDA cores (no tensor cores yet) and so wins where each step is latency-bound (small batch),
// while cuBLAS wins once a step's GEMM is large enough to be throughput-bound.
constexpr int64_t kPersistentAutoMaxBatch = 16;
constexpr int64_t kPersistentAutoMaxHidden = 512;

struct PersistentPlan {
  bool ok = false;
  int J = 0, blocks = 0;
  size_t smem = 0;
};

template <typename T>
PersistentPlan plan_persistent(const Schedule& s, int64_t B, int64_t H, bool proj) {
  PersistentPlan plan;
  if (proj || s.steps == 0 || B == 0 || H == 0 || H > 4096 || B > 65535) return plan;
  const bool padded = std::all_of(s.batch_sizes.begin(), s.batch_sizes.end(),
                                  [&](int64_t v) { return v == B; });
  if (!padded && s.steps > kMaxTableSteps) return plan;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return plan;
  const int sms = prop->multiProcessorCount;
  const int64_t J = (H + sms - 1) / sms;
  const size_t smem = persistent_smem_bytes<T>(B, H, J);
  if (smem > prop->sharedMemPerBlockOptin) return plan;
  auto kernel = lstm_persistent_forward_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t blocks = (H + J - 1) / J;
  if (per_sm < 1 || blocks > int64_t(per_sm) * sms) return plan;
  plan.ok = true;
  plan.J = static_cast<int>(J);
  plan.blocks = static_cast<int>(blocks);
  plan.smem = smem;
  return plan;
}

// The named heuristic: persistent for small batch and hidden size where it can run, else cuBLAS.
inline bool choose_persistent_forward(const PersistentPlan& plan, int64_t B, int64_t H) {
  if (!plan.ok) return false;
  if (!path_is_auto()) return requested_strategy() == Strategy::kPersistent;
  return B <= kPersistentAutoMaxBatch && H <= kPersistentAutoMaxHidden;
}

// ---- ops ---------------------------------------------------------------------------------------

LstmShapes check_lstm_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const c10::optional<at::Tensor>& w_hr) {
  return check_lstm_shapes(input, h0, c0, w_ih, w_hh, w_hr,
                           [&](int64_t H) { check_cuda_input(input, "LSTM", 4 * H); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_forward_cuda(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                  const c10::optional<at::Tensor>& w_hr, bool reverse) {
  const auto d = check_lstm_args(input, h0, c0, w_ih, w_hh, w_hr);
  check_vector(b_ih, "b_ih", 4 * d.H, input);
  check_vector(b_hh, "b_hh", 4 * d.H, input);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t G = 4 * d.H;
  auto opts = input.options();
  const auto acc_opts = opts.dtype(opmath_dtype(input.scalar_type()));

  // Input projection of every step (no bias: it is added in opmath precision per step).
  at::Tensor gates = at::empty({d.N, G}, opts);
  at::mm_out(gates, input.contiguous(), w_ih.t());
  at::Tensor bias;
  const bool has_ih = b_ih.has_value() && b_ih->defined();
  const bool has_hh = b_hh.has_value() && b_hh->defined();
  if (has_ih || has_hh) {
    bias = has_ih ? b_ih->to(acc_opts.dtype()) : at::zeros({G}, acc_opts);
    if (has_hh) bias = bias + b_hh->to(acc_opts.dtype());
    bias = bias.contiguous();
  }
  at::Tensor cells = at::empty({d.N, d.H}, opts);
  at::Tensor out = at::empty({d.N, d.P}, opts);
  at::Tensor hpre = d.proj ? at::empty({d.N, d.H}, opts) : at::empty({0}, opts);
  at::Tensor w_hh_c = w_hh.contiguous();
  at::Tensor h0_c = h0.contiguous(), c0_c = c0.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor h_n, c_n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "timerec_fast_lstm_forward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const A* bias_p = bias.defined() ? bias.data_ptr<A>() : nullptr;

    const PersistentPlan plan = plan_persistent<T>(s, d.B, d.H, d.proj);
    if (choose_persistent_forward(plan, d.B, d.H)) {
      h_n = at::empty({d.B, d.H}, opts);
      c_n = at::empty({d.B, d.H}, opts);
      PersistentArgs<T> a;
      a.gates = gates.data_ptr<T>();
      a.cells = cells.data_ptr<T>();
      a.out = out.data_ptr<T>();
      a.h_n = h_n.data_ptr<T>();
      a.c_n = c_n.data_ptr<T>();
      a.h0 = h0_c.data_ptr<T>();
      a.c0 = c0_c.data_ptr<T>();
      a.w_hh = w_hh_c.data_ptr<T>();
      a.bias = bias_p;
      a.N = d.N;
      a.H = static_cast<int>(d.H);
      a.B = static_cast<int>(d.B);
      a.steps = static_cast<int>(s.steps);
      a.J = plan.J;
      a.reverse = reverse ? 1 : 0;
      a.packed = 0;
      StepTable tab;
      for (int64_t t = 0; t < s.steps; ++t) {
        if (s.batch_sizes[t] != d.B) a.packed = 1;
      }
      if (a.packed) {
        for (int64_t t = 0; t < s.steps; ++t) tab.n[t] = static_cast<int32_t>(s.batch_sizes[t]);
      }
      void* args[] = {&a, &tab};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
          reinterpret_cast<const void*>(&lstm_persistent_forward_kernel<T>), dim3(plan.blocks),
          dim3(kThreads), args, plan.smem, stream));
      return;
    }

    // Strategy (a).
    h_n = h0_c.clone(at::MemoryFormat::Contiguous);  // h_state: the carried h rows
    at::Tensor c_state = c0_c.to(acc_opts.dtype()).clone(at::MemoryFormat::Contiguous);
    at::Tensor rec = at::empty({d.B, G}, acc_opts);
    at::Tensor w_hr_c = d.proj ? w_hr->contiguous() : at::Tensor();
    T* gates_p = gates.data_ptr<T>();
    T* cells_p = cells.data_ptr<T>();
    T* out_p = out.data_ptr<T>();
    T* hpre_p = d.proj ? hpre.data_ptr<T>() : nullptr;
    T* hs = h_n.data_ptr<T>();
    A* cs = c_state.data_ptr<A>();
    A* rec_p = rec.data_ptr<A>();
    const T* whh = w_hh_c.data_ptr<T>();
    const T* whr = d.proj ? w_hr_c.data_ptr<T>() : nullptr;
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t t = s.time_at(k);
      const int64_t n = s.batch_sizes[t];
      const int64_t off = s.offsets[t];
      // rec = h_{t-1} W_hh^T
      gemm_rm<T, A>(false, true, n, G, d.P, hs, d.P, whh, d.P, rec_p, G);
      T* h_dst = d.proj ? hpre_p + off * d.H : out_p + off * d.P;
      lstm_forward_step_kernel<T, A><<<blocks_for(n * d.H), kThreads, 0, stream>>>(
          n, d.H, gates_p + off * G, rec_p, bias_p, cs, cells_p + off * d.H, h_dst,
          d.proj ? nullptr : hs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (d.proj) {  // h_t = (o * tanh(c)) W_hr^T
        gemm_rm<T, T>(false, true, n, d.P, d.H, h_dst, d.H, whr, d.H, out_p + off * d.P, d.P);
        C10_CUDA_CHECK(cudaMemcpyAsync(hs, out_p + off * d.P, n * d.P * sizeof(T),
                                       cudaMemcpyDeviceToDevice, stream));
      }
    }
    c_n = std::is_same<A, T>::value ? c_state : c_state.to(input.scalar_type());
  });
  return {out, h_n, c_n, gates, cells, hpre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cuda(const c10::optional<at::Tensor>& grad_output,
                   const c10::optional<at::Tensor>& grad_h_n,
                   const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                   const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const c10::optional<at::Tensor>& w_hr, const at::Tensor& output,
                   const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& hpre,
                   bool reverse, bool input_grad) {
  const auto d = check_lstm_args(input, h0, c0, w_ih, w_hh, w_hr);
  const Schedule s = make_schedule(batch_sizes, d.N, d.B, reverse);
  const int64_t G = 4 * d.H;
  check_matrix(gates, "gates", d.N, G, input);
  check_matrix(cells, "cells", d.N, d.H, input);
  check_matrix(output, "output", d.N, d.P, input);
  if (d.proj) check_matrix(hpre, "hpre", d.N, d.H, input);
  const c10::cuda::CUDAGuard guard(input.device());
  auto opts = input.options();
  const auto acc_dtype = opmath_dtype(input.scalar_type());
  const bool has_gy = grad_output.has_value() && grad_output->defined();

  at::Tensor gy = has_gy ? grad_output->contiguous() : at::Tensor();
  at::Tensor dh_state = grad_h_n.has_value() && grad_h_n->defined()
                            ? grad_h_n->to(acc_dtype).clone(at::MemoryFormat::Contiguous)
                            : at::zeros({d.B, d.P}, opts.dtype(acc_dtype));
  at::Tensor dc_state = grad_c_n.has_value() && grad_c_n->defined()
                            ? grad_c_n->to(acc_dtype).clone(at::MemoryFormat::Contiguous)
                            : at::zeros({d.B, d.H}, opts.dtype(acc_dtype));
  at::Tensor dgates = at::empty({d.N, G}, opts);
  at::Tensor dy = d.proj ? at::empty({d.N, d.P}, opts) : at::Tensor();
  at::Tensor dhpre = d.proj ? at::empty({d.B, d.H}, opts.dtype(acc_dtype)) : at::Tensor();
  at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous(), c0_c = c0.contiguous();
  at::Tensor w_hh_c = w_hh.contiguous();
  at::Tensor w_hr_c = d.proj ? w_hr->contiguous() : at::Tensor();
  at::Tensor h_prev = at::empty({d.N, d.P}, opts);
  at::Tensor out_c = output.contiguous(), h0_c = h0.contiguous();
  at::Tensor zeros_gy;  // projection without grad_output: dy = dh
  if (d.proj && !has_gy) zeros_gy = at::zeros({d.B, d.P}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "timerec_fast_lstm_backward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* gates_p = gates_c.data_ptr<T>();
    const T* cells_p = cells_c.data_ptr<T>();
    const T* c0_p = c0_c.data_ptr<T>();
    const T* h0_p = h0_c.data_ptr<T>();
    const T* out_p = out_c.data_ptr<T>();
    const T* gy_p = has_gy ? gy.data_ptr<T>() : nullptr;
    const T* whh = w_hh_c.data_ptr<T>();
    const T* whr = d.proj ? w_hr_c.data_ptr<T>() : nullptr;
    A* dhs = dh_state.data_ptr<A>();
    A* dcs = dc_state.data_ptr<A>();
    T* dg_p = dgates.data_ptr<T>();
    T* hp_p = h_prev.data_ptr<T>();
    for (int64_t k = s.steps - 1; k >= 0; --k) {
      const int64_t t = s.time_at(k);
      const int64_t n = s.batch_sizes[t];
      const int64_t base = s.offsets[t];
      const int64_t carried = s.carried_rows(k);
      const int64_t prev_base = k > 0 ? s.offsets[s.time_at(k - 1)] : 0;
      const T* cells_prev = k > 0 ? cells_p + prev_base * d.H : nullptr;
      const T* out_prev = k > 0 ? out_p + prev_base * d.P : nullptr;
      const A* dh = dhs;
      int64_t ldh = d.P;
      const T* gy_t = nullptr;
      if (d.proj) {
        // dy = dL/dh_t (output + recurrence); the cell sees dhpre = dy W_hr.
        T* dyt = dy.data_ptr<T>() + base * d.P;
        const T* g = has_gy ? gy_p + base * d.P : zeros_gy.data_ptr<T>();
        add_grad_kernel<T, A><<<blocks_for(n * d.P), kThreads, 0, stream>>>(n * d.P, dhs, g, dyt);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        A* dhp = dhpre.data_ptr<A>();
        gemm_rm<T, A>(false, false, n, d.H, d.P, dyt, d.P, whr, d.H, dhp, d.H);
        dh = dhp;
        ldh = d.H;
      } else if (has_gy) {
        gy_t = gy_p + base * d.P;
      }
      lstm_backward_step_kernel<T, A>
          <<<blocks_for(n * std::max(d.H, d.P)), kThreads, 0, stream>>>(
              n, d.H, d.P, carried, gates_p + base * G, cells_p + base * d.H, cells_prev, c0_p,
              dh, ldh, gy_t, dcs, dg_p + base * G, out_prev, h0_p, hp_p + base * d.P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // dh_{t-1} = dGates_t W_hh
      gemm_rm<T, A>(false, false, n, d.P, G, dg_p + base * G, G, whh, d.P, dhs, d.P);
    }
  });

  // Weight and input gradients: one large GEMM each over all steps.
  at::Tensor grad_input = input_grad ? at::mm(dgates, w_ih) : at::empty({0}, opts);
  at::Tensor grad_w_ih = at::mm(dgates.t(), input);
  at::Tensor grad_w_hh = at::mm(dgates.t(), h_prev);
  at::Tensor grad_bias = dgates.sum(0);
  at::Tensor grad_w_hr = d.proj ? at::mm(dy.t(), hpre) : at::empty({0}, opts);
  at::Tensor grad_h0 = dh_state.to(input.scalar_type());
  at::Tensor grad_c0 = dc_state.to(input.scalar_type());
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// The CUDA forward keeps its gates in one (N, 4H) buffer either way; inference drops them.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
lstm_inference_cuda(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                    const c10::optional<at::Tensor>& w_hr, bool reverse) {
  auto r = lstm_forward_cuda(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward_cuda);
  m.impl("lstm_inference", &lstm_inference_cuda);
  m.impl("lstm_backward", &lstm_backward_cuda);
}

}  // namespace timerec::cuda
