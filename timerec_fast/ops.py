"""The fused whole-sequence ops: fake (shape) kernels and autograd, registered on the C++ schemas.

Each op runs one layer in one direction over a whole packed sequence (see csrc/registration.cpp).
The modules in :mod:`timerec_fast.rnn` stack them into layers and directions.
"""
import torch

from ._loader import load_extension

load_extension()

_ops = torch.ops.timerec_fast


def _empty(like):
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# LSTM


@torch.library.register_fake("timerec_fast::lstm_forward")
def _lstm_forward_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    n = input.shape[0]
    b, p = h0.shape
    h = c0.shape[1]
    hpre = input.new_empty((n, h)) if w_hr is not None else _empty(input)
    return (
        input.new_empty((n, p)),
        h0.new_empty((b, p)),
        c0.new_empty((b, h)),
        input.new_empty((n, 4 * h)),
        input.new_empty((n, h)),
        hpre,
    )


@torch.library.register_fake("timerec_fast::lstm_backward")
def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh,
                        w_hr, output, gates, cells, hpre, reverse, input_grad):
    h = c0.shape[1]
    return (
        torch.empty_like(input) if input_grad else _empty(input),
        torch.empty_like(h0),
        torch.empty_like(c0),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        input.new_empty((4 * h,)),
        torch.empty_like(w_hr) if w_hr is not None else _empty(input),
    )


def _lstm_setup_context(ctx, inputs, output):
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = inputs
    out, _, _, gates, cells, hpre = output
    ctx.mark_non_differentiable(gates, cells, hpre)
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, hpre)
    ctx.reverse = reverse
    ctx.has_b_ih = b_ih is not None
    ctx.has_b_hh = b_hh is not None


def _lstm_backward(ctx, grad_out, grad_h_n, grad_c_n, _g_gates, _g_cells, _g_hpre):
    input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, hpre = ctx.saved_tensors
    d_in, d_h0, d_c0, d_w_ih, d_w_hh, d_b, d_w_hr = _ops.lstm_backward(
        grad_out, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates,
        cells, hpre, ctx.reverse, ctx.needs_input_grad[0])
    return (
        d_in if ctx.needs_input_grad[0] else None,
        None,
        d_h0,
        d_c0,
        d_w_ih,
        d_w_hh,
        d_b if ctx.has_b_ih else None,
        d_b if ctx.has_b_hh else None,
        d_w_hr if w_hr is not None else None,
        None,
    )


torch.library.register_autograd(
    "timerec_fast::lstm_forward", _lstm_backward, setup_context=_lstm_setup_context)


def _needs_autograd(tensors):
    """False when no autograd graph can be recorded: the op can then skip the Python autograd
    wrapper (tens of microseconds per call, which is most of a B=1 step sequence)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return torch.compiler.is_compiling()
    return any(t is not None and t.requires_grad for t in tensors)


def call_op(op, args, differentiable):
    if _needs_autograd(differentiable):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def lstm_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
               reverse=False):
    """One LSTM layer, one direction, over a packed sequence. Returns (output, h_n, c_n)."""
    args = (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    out, h_n, c_n, _, _, _ = call_op(_ops.lstm_forward.default, args, args[:9])
    return out, h_n, c_n
