// GRU layer, CUDA: same ops, schemas, semantics and saved tensors as csrc/cpu/gru_cpu.cpp.
//
// Strategy (a) of lstm_cuda.cu: the input projection of every step as one GEMM into `gates` (no
// bias: b_ih is added per step in opmath precision), then per step one cuBLAS GEMM h_{t-1} W_hh^T
// into an opmath scratch and one fused pointwise kernel (timerec::gru_cell_forward). Backward:
// BPTT with one pointwise kernel (timerec::gru_cell_backward) and one accumulating cuBLAS GEMM per
// step, then dX, dW_ih, dW_hh and the bias gradients as large GEMMs / reductions, as on the CPU.
//
// Precision: half/bf16 compute in fp32 (GEMM accumulation, gate math, the carried dh); the carried
// h is the output row itself (input dtype), as in the LSTM. Saved tensors share the input dtype.
// Everything runs on the current stream with no host synchronisation (batch_sizes is on the host).
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

#include "../include/timerec/gru_cell.h"
#include "../rnn_common.h"
#include "cuda_blas.cuh"
#include "cuda_rnn_common.cuh"

namespace timerec::cuda {
namespace {

// One step, rows [0, n). gates (n x 3H, T): x W_ih^T on entry, activated r, z, n on exit.
// hg (n x 3H, opmath) = h_{t-1} W_hh^T; b_ih / b_hh (3H, opmath) or null. h_state (B x H) holds
// h_{t-1} on entry and h_t on exit (rows past n keep their state).
template <typename T, typename A>
__global__ void gru_forward_step_kernel(int64_t n, int64_t H, T* __restrict__ gates,
                                        const A* __restrict__ hg, const A* __restrict__ b_ih,
                                        const A* __restrict__ b_hh, T* __restrict__ h_state,
                                        T* __restrict__ hn_out, T* __restrict__ h_out) {
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    T* x = gates + b * 3 * H;
    const A* r = hg + b * 3 * H;
    A xr = static_cast<A>(x[j]), xz = static_cast<A>(x[H + j]), xn = static_cast<A>(x[2 * H + j]);
    A hr = r[j], hz = r[H + j], hn = r[2 * H + j];
    if (b_ih != nullptr) {
      xr += b_ih[j];
      xz += b_ih[H + j];
      xn += b_ih[2 * H + j];
    }
    if (b_hh != nullptr) {
      hr += b_hh[j];
      hz += b_hh[H + j];
      hn += b_hh[2 * H + j];
    }
    const A h = gru_cell_forward<A>(xr, xz, xn, hr, hz, hn, static_cast<A>(h_state[idx]));
    x[j] = static_cast<T>(xr);
    x[H + j] = static_cast<T>(xz);
    x[2 * H + j] = static_cast<T>(xn);
    hn_out[idx] = static_cast<T>(hn);
    h_state[idx] = static_cast<T>(h);
    h_out[idx] = static_cast<T>(h);
  }
}

// One backward step, rows [0, n). dh_state (B x H, opmath) holds dL/dh_t from step t+1 on entry
// and the part of dL/dh_{t-1} that bypasses W_hh (dh * z) on exit; the GEMM after it adds
// dhg W_hh. gy (n x H) or null. Also gathers h_prev (n x H), the state each row started from.
template <typename T, typename A>
__global__ void gru_backward_step_kernel(int64_t n, int64_t H, int64_t carried,
                                         const T* __restrict__ gates, const T* __restrict__ hn,
                                         const T* __restrict__ out_prev, const T* __restrict__ h0,
                                         const T* __restrict__ gy, A* __restrict__ dh_state,
                                         T* __restrict__ dxg, T* __restrict__ dhg,
                                         T* __restrict__ h_prev) {
  const int64_t total = n * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const T hp_t = b < carried ? out_prev[idx] : h0[idx];
    h_prev[idx] = hp_t;
    const T* g = gates + b * 3 * H;
    A dh = dh_state[idx];
    if (gy != nullptr) dh += static_cast<A>(gy[idx]);
    A dr, dz, dn, dhn;
    const A rest = gru_cell_backward<A>(static_cast<A>(g[j]), static_cast<A>(g[H + j]),
                                        static_cast<A>(g[2 * H + j]), static_cast<A>(hn[idx]),
                                        static_cast<A>(hp_t), dh, dr, dz, dn, dhn);
    T* dx = dxg + b * 3 * H;
    T* dhh = dhg + b * 3 * H;
    dx[j] = static_cast<T>(dr);
    dx[H + j] = static_cast<T>(dz);
    dx[2 * H + j] = static_cast<T>(dn);
    dhh[j] = static_cast<T>(dr);
    dhh[H + j] = static_cast<T>(dz);
    dhh[2 * H + j] = static_cast<T>(dhn);
    dh_state[idx] = rest;
  }
}

int64_t check_gru_args_cuda(const at::Tensor& input, const at::Tensor& h0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh) {
  return check_gru_shapes(input, h0, w_ih, w_hh,
                          [&](int64_t H) { check_cuda_input(input, "GRU", 3 * H); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  const int64_t H = check_gru_args_cuda(input, h0, w_ih, w_hh);
  check_vector(b_ih, "b_ih", 3 * H, input);
  check_vector(b_hh, "b_hh", 3 * H, input);
  const int64_t N = input.size(0), B = h0.size(0), G = 3 * H;
  const Schedule s = make_schedule(batch_sizes, N, B, reverse);
  const c10::cuda::CUDAGuard guard(input.device());
  auto opts = input.options();
  const auto acc = opmath_dtype(input.scalar_type());
  at::Tensor gates = at::empty({N, G}, opts);
  at::mm_out(gates, input.contiguous(), w_ih.t());
  at::Tensor bih = opmath_bias(b_ih, c10::nullopt, acc);
  at::Tensor bhh = opmath_bias(b_hh, c10::nullopt, acc);
  at::Tensor hn = at::empty({N, H}, opts);
  at::Tensor out = at::empty({N, H}, opts);
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor hg = at::empty({B, G}, opts.dtype(acc));
  at::Tensor w_hh_c = w_hh.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "timerec_fast_gru_forward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const A* bih_p = bih.defined() ? bih.data_ptr<A>() : nullptr;
    const A* bhh_p = bhh.defined() ? bhh.data_ptr<A>() : nullptr;
    T* gates_p = gates.data_ptr<T>();
    T* hn_p = hn.data_ptr<T>();
    T* out_p = out.data_ptr<T>();
    T* hs = h_state.data_ptr<T>();
    A* hg_p = hg.data_ptr<A>();
    const T* whh = w_hh_c.data_ptr<T>();
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t t = s.time_at(k);
      const int64_t n = s.batch_sizes[t];
      const int64_t off = s.offsets[t];
      gemm_rm<T, A>(false, true, n, G, H, hs, H, whh, H, hg_p, G);  // hg = h_{t-1} W_hh^T
      gru_forward_step_kernel<T, A><<<blocks_for(n * H), kThreads, 0, stream>>>(
          n, H, gates_p + off * G, hg_p, bih_p, bhh_p, hs, hn_p + off * H, out_p + off * H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, h_state, gates, hn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cuda(const c10::optional<at::Tensor>& grad_output,
                  const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& input,
                  const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& gates,
                  const at::Tensor& hn, bool reverse, bool input_grad) {
  const int64_t H = check_gru_args_cuda(input, h0, w_ih, w_hh);
  const int64_t N = input.size(0), B = h0.size(0), G = 3 * H;
  const Schedule s = make_schedule(batch_sizes, N, B, reverse);
  check_matrix(gates, "gates", N, G, input);
  check_matrix(hn, "hn", N, H, input);
  check_matrix(output, "output", N, H, input);
  const c10::cuda::CUDAGuard guard(input.device());
  auto opts = input.options();
  const auto acc = opmath_dtype(input.scalar_type());
  const bool has_gy = grad_output.has_value() && grad_output->defined();
  at::Tensor gy = has_gy ? grad_output->contiguous() : at::Tensor();
  at::Tensor dh_state = grad_h_n.has_value() && grad_h_n->defined()
                            ? grad_h_n->to(acc).clone(at::MemoryFormat::Contiguous)
                            : at::zeros({B, H}, opts.dtype(acc));
  at::Tensor dxg = at::empty({N, G}, opts);
  at::Tensor dhg = at::empty({N, G}, opts);
  at::Tensor h_prev = at::empty({N, H}, opts);
  at::Tensor gates_c = gates.contiguous(), hn_c = hn.contiguous(), out_c = output.contiguous();
  at::Tensor h0_c = h0.contiguous(), w_hh_c = w_hh.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "timerec_fast_gru_backward_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* gates_p = gates_c.data_ptr<T>();
    const T* hn_p = hn_c.data_ptr<T>();
    const T* out_p = out_c.data_ptr<T>();
    const T* h0_p = h0_c.data_ptr<T>();
    const T* gy_p = has_gy ? gy.data_ptr<T>() : nullptr;
    const T* whh = w_hh_c.data_ptr<T>();
    A* dhs = dh_state.data_ptr<A>();
    T* dxg_p = dxg.data_ptr<T>();
    T* dhg_p = dhg.data_ptr<T>();
    T* hp_p = h_prev.data_ptr<T>();
    for (int64_t k = s.steps - 1; k >= 0; --k) {
      const int64_t t = s.time_at(k);
      const int64_t n = s.batch_sizes[t];
      const int64_t base = s.offsets[t];
      const int64_t carried = s.carried_rows(k);
      const T* out_prev = k > 0 ? out_p + s.offsets[s.time_at(k - 1)] * H : nullptr;
      gru_backward_step_kernel<T, A><<<blocks_for(n * H), kThreads, 0, stream>>>(
          n, H, carried, gates_p + base * G, hn_p + base * H, out_prev, h0_p,
          has_gy ? gy_p + base * H : nullptr, dhs, dxg_p + base * G, dhg_p + base * G,
          hp_p + base * H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // dh_{t-1} = dh * z + dhg_t W_hh
      gemm_rm<T, A>(false, false, n, H, G, dhg_p + base * G, G, whh, H, dhs, H,
                    /*accumulate=*/true);
    }
  });
  at::Tensor grad_input = input_grad ? at::mm(dxg, w_ih) : at::empty({0}, opts);
  return {grad_input,
          dh_state.to(input.scalar_type()),
          at::mm(dxg.t(), input),
          at::mm(dhg.t(), h_prev),
          dxg.sum(0),
          dhg.sum(0)};
}

// The CUDA forward keeps its gates and hn either way; inference drops them.
std::tuple<at::Tensor, at::Tensor> gru_inference_cuda(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  auto r = gru_forward_cuda(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse);
  return {std::get<0>(r), std::get<1>(r)};
}

}  // namespace

TORCH_LIBRARY_IMPL(timerec_fast, CUDA, m) {
  m.impl("gru_forward", &gru_forward_cuda);
  m.impl("gru_inference", &gru_inference_cuda);
  m.impl("gru_backward", &gru_backward_cuda);
}

}  // namespace timerec::cuda
