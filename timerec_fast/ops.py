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


def _needs_autograd(tensors):
    """False when no autograd graph can be recorded: the op can then skip the Python autograd
    wrapper (tens of microseconds per call, which is most of a B=1 step sequence)."""
    if torch.compiler.is_compiling():
        return True  # tracing must see the autograd-registered op
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# Set to False to send every differentiable eager call through the registered autograd (tests
# compare the two paths).
EAGER_AUTOGRAD = True
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# op -> (eager autograd.Function, functorch autograd.Function), see register_autograd below.
_FUNCTIONS = {}


def _below_autograd(op, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register_autograd(op, backward, setup_context):
    """torch.library.register_autograd for `op`, plus two autograd.Functions running the same
    formula, which call_op uses where the registered one cannot serve or costs too much:

    * eager: the registered autograd re-enters Python from the dispatcher, builds its own
      autograd.Function call and re-fills the schema defaults, ~45 us per forward on this
      machine (as much as a B = 1 LSTMCell step). This Function calls the op below autograd and
      runs setup_context itself.
    * functorch (torch.func.grad, vjp, jacrev): torch refuses the Function it generates for the
      registered autograd under these transforms (it has no setup_context staticmethod); this one
      has. vmap and forward mode still refuse (no vmap or jvp rule).
    """
    torch.library.register_autograd(f"timerec_fast::{op._opname}", backward,
                                    setup_context=setup_context)

    def forward_with_ctx(ctx, *args):
        out = _below_autograd(op, args)
        setup_context(ctx, args, out)
        return out

    def forward(*args):
        return _below_autograd(op, args)

    # Named per op and path, so a graph's grad_fn says which path recorded it.
    function = torch.autograd.Function
    eager = type(f"EagerAutograd_{op._opname}", (function,),
                 {"forward": staticmethod(forward_with_ctx), "backward": staticmethod(backward)})
    func = type(f"FuncAutograd_{op._opname}", (function,),
                {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                 "backward": staticmethod(backward)})
    _FUNCTIONS[op] = (eager, func)


def call_forward_or_inference(forward, inference, args, differentiable, outputs):
    """A forward op with a saving (autograd) and an inference variant: the forward's first
    `outputs` results (what the inference op returns) through autograd when something needs a
    gradient, else the inference op, which saves nothing for a backward."""
    if _needs_autograd(differentiable):
        return tuple(_call_with_autograd(forward, args, differentiable)[:outputs])
    return tuple(_below_autograd(inference, args))


def call_op(op, args, differentiable):
    """Runs op(*args): below autograd when nothing needs a gradient, else _call_with_autograd."""
    if not _needs_autograd(differentiable):
        return _below_autograd(op, args)
    return _call_with_autograd(op, args, differentiable)


def _call_with_autograd(op, args, differentiable):
    """op(*args) recorded by autograd: through one of the op's own autograd.Functions
    (register_autograd above) where nothing else would see the difference: not while compiling
    or tracing, nor under autocast (the CUDA ops' Autocast kernel must run above autograd);
    eagerly only for plain tensors (a subclass may intercept the op). Everything else takes the
    dispatcher's registered autograd."""
    functions = _FUNCTIONS.get(op)
    if functions is not None and not torch.compiler.is_compiling() and \
            torch._C._get_tracing_state() is None and not torch.is_autocast_enabled():
        if torch._C._are_functorch_transforms_active():
            return functions[1].apply(*args)
        if EAGER_AUTOGRAD and all(t is None or type(t) in _PLAIN_TENSORS for t in differentiable):
            return functions[0].apply(*args)
    return op(*args)


# _no_zero_grads: every forward's setup_context calls ctx.set_materialize_grads(False). By default
# autograd hands the backward a zero tensor for each output that got no gradient, and the saved
# gate and cell matrices never get one: an (N, 4H) and an (N, H) fill per LSTM backward, 1.35 and
# 0.69 ms of a 23 ms training step at (256, 50, 64, 64) (torch.profiler, aten::fill_). The
# backward ops take absent output gradients as zeros themselves (Tensor? in their schemas).


def _refuse_double_backward(name):
    """Backward ops have no derivative of their own. Without this, create_graph=True would leave
    second-order gradients silently missing; with it, they raise."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"timerec_fast: double backward through {name} is not supported (the fused recurrent "
            "ops have first-order gradients only); use torch.nn's module for higher-order "
            "gradients")

    register_autograd(getattr(_ops, name).default, backward,
                      setup_context=lambda ctx, inputs, output: None)


for _name in ("lstm_backward", "gru_backward", "time_lstm_backward", "tlstm_backward"):
    _refuse_double_backward(_name)


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


@torch.library.register_fake("timerec_fast::lstm_inference")
def _lstm_inference_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    return _lstm_forward_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)[:3]


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
    ctx.set_materialize_grads(False)  # see _no_zero_grads
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, hpre)
    ctx.reverse = reverse
    ctx.has_b_ih = b_ih is not None
    ctx.has_b_hh = b_hh is not None


def _lstm_backward(ctx, grad_out, grad_h_n, grad_c_n, _g_gates, _g_cells, _g_hpre):
    input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, hpre = ctx.saved_tensors
    args = (grad_out, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates,
            cells, hpre, ctx.reverse, ctx.needs_input_grad[0])
    d_in, d_h0, d_c0, d_w_ih, d_w_hh, d_b, d_w_hr = call_op(_ops.lstm_backward.default, args,
                                                            args[:14])
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


register_autograd(_ops.lstm_forward.default, _lstm_backward, setup_context=_lstm_setup_context)


def lstm_layer(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
               reverse=False):
    """One LSTM layer, one direction, over a packed sequence. Returns (output, h_n, c_n)."""
    args = (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    return call_forward_or_inference(_ops.lstm_forward.default, _ops.lstm_inference.default, args,
                                     args[:9], outputs=3)


# ---------------------------------------------------------------------------------------------
# GRU


@torch.library.register_fake("timerec_fast::gru_forward")
def _gru_forward_fake(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    n = input.shape[0]
    h = h0.shape[1]
    return (input.new_empty((n, h)), torch.empty_like(h0), input.new_empty((n, 3 * h)),
            input.new_empty((n, h)))


@torch.library.register_fake("timerec_fast::gru_backward")
def _gru_backward_fake(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, gates,
                       hn, reverse, input_grad):
    h = h0.shape[1]
    return (torch.empty_like(input) if input_grad else _empty(input), torch.empty_like(h0),
            torch.empty_like(w_ih), torch.empty_like(w_hh), input.new_empty((3 * h,)),
            input.new_empty((3 * h,)))


@torch.library.register_fake("timerec_fast::gru_inference")
def _gru_inference_fake(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    return input.new_empty((input.shape[0], h0.shape[1])), torch.empty_like(h0)


def _gru_setup_context(ctx, inputs, output):
    input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse = inputs
    out, _, gates, hn = output
    ctx.mark_non_differentiable(gates, hn)
    ctx.set_materialize_grads(False)  # see _no_zero_grads
    ctx.save_for_backward(input, batch_sizes, h0, w_ih, w_hh, out, gates, hn)
    ctx.reverse = reverse
    ctx.has_b_ih = b_ih is not None
    ctx.has_b_hh = b_hh is not None


def _gru_backward(ctx, grad_out, grad_h_n, _g_gates, _g_hn):
    input, batch_sizes, h0, w_ih, w_hh, out, gates, hn = ctx.saved_tensors
    args = (grad_out, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, out, gates, hn, ctx.reverse,
            ctx.needs_input_grad[0])
    d_in, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh = call_op(_ops.gru_backward.default, args, args[:10])
    return (d_in if ctx.needs_input_grad[0] else None, None, d_h0, d_w_ih, d_w_hh,
            d_b_ih if ctx.has_b_ih else None, d_b_hh if ctx.has_b_hh else None, None)


register_autograd(_ops.gru_forward.default, _gru_backward, setup_context=_gru_setup_context)


def gru_layer(input, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False):
    """One GRU layer, one direction, over a packed sequence. Returns (output, h_n)."""
    args = (input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    return call_forward_or_inference(_ops.gru_forward.default, _ops.gru_inference.default, args,
                                     args[:7], outputs=2)


# ---------------------------------------------------------------------------------------------
# Time-LSTM (Zhu et al.) and T-LSTM (Baytas et al.)


@torch.library.register_fake("timerec_fast::time_lstm_forward")
def _time_lstm_forward_fake(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep, time_w,
                            variant, reverse):
    n = input.shape[0]
    h = h0.shape[1]
    return (input.new_empty((n, h)), torch.empty_like(h0), torch.empty_like(c0),
            input.new_empty((n, w_ih.shape[0])), input.new_empty((n, h)),
            input.new_empty((n, h)) if variant != 1 else _empty(input))


@torch.library.register_fake("timerec_fast::time_lstm_inference")
def _time_lstm_inference_fake(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep, time_w,
                              variant, reverse):
    return input.new_empty((input.shape[0], h0.shape[1])), torch.empty_like(h0), \
        torch.empty_like(c0)


@torch.library.register_fake("timerec_fast::time_lstm_backward")
def _time_lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, delta_t, batch_sizes, h0,
                             c0, w_ih, w_hh, peep, time_w, output, gates, cells, cts, variant,
                             reverse, input_grad):
    return (torch.empty_like(input) if input_grad else _empty(input), torch.empty_like(delta_t),
            torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), input.new_empty((w_ih.shape[0],)), torch.empty_like(peep),
            torch.empty_like(time_w))


def _time_lstm_setup_context(ctx, inputs, output):
    input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep, time_w, variant, reverse = inputs
    out, _, _, gates, cells, cts = output
    ctx.mark_non_differentiable(gates, cells, cts)
    ctx.set_materialize_grads(False)  # see _no_zero_grads
    ctx.save_for_backward(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, peep, time_w, out,
                          gates, cells, cts)
    ctx.variant = variant
    ctx.reverse = reverse
    ctx.has_bias = bias is not None


def _time_lstm_backward(ctx, grad_out, grad_h_n, grad_c_n, *_saved_grads):
    args = (grad_out, grad_h_n, grad_c_n, *ctx.saved_tensors, ctx.variant, ctx.reverse,
            ctx.needs_input_grad[0])
    grads = call_op(_ops.time_lstm_backward.default, args, args[:16])
    d_in, d_dt, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_peep, d_time_w = grads
    return (d_in if ctx.needs_input_grad[0] else None, d_dt, None, d_h0, d_c0, d_w_ih, d_w_hh,
            d_bias if ctx.has_bias else None, d_peep, d_time_w, None, None)


register_autograd(_ops.time_lstm_forward.default, _time_lstm_backward,
                  setup_context=_time_lstm_setup_context)


def time_lstm_layer(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep, time_w, variant,
                    reverse=False):
    """One Time-LSTM layer (variant 1, 2 or 3), one direction. Returns (output, h_n, c_n)."""
    args = (input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, peep, time_w, variant, reverse)
    return call_forward_or_inference(_ops.time_lstm_forward.default,
                                     _ops.time_lstm_inference.default, args, args[:10], outputs=3)


@torch.library.register_fake("timerec_fast::tlstm_forward")
def _tlstm_forward_fake(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, w_d, b_d, reverse):
    n = input.shape[0]
    h = h0.shape[1]
    return (input.new_empty((n, h)), torch.empty_like(h0), torch.empty_like(c0),
            input.new_empty((n, 4 * h)), input.new_empty((n, h)), input.new_empty((n, h)))


@torch.library.register_fake("timerec_fast::tlstm_backward")
def _tlstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, delta_t, batch_sizes, h0, c0,
                         w_ih, w_hh, w_d, output, gates, cells, cs, reverse, input_grad):
    h = h0.shape[1]
    return (torch.empty_like(input) if input_grad else _empty(input), torch.empty_like(delta_t),
            torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), input.new_empty((4 * h,)), torch.empty_like(w_d),
            input.new_empty((h,)))


def _tlstm_setup_context(ctx, inputs, output):
    input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, w_d, b_d, reverse = inputs
    out, _, _, gates, cells, cs = output
    ctx.mark_non_differentiable(gates, cells, cs)
    ctx.set_materialize_grads(False)  # see _no_zero_grads
    ctx.save_for_backward(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, w_d, out, gates, cells,
                          cs)
    ctx.reverse = reverse
    ctx.has_bias = bias is not None
    ctx.has_b_d = b_d is not None


def _tlstm_backward(ctx, grad_out, grad_h_n, grad_c_n, *_saved_grads):
    args = (grad_out, grad_h_n, grad_c_n, *ctx.saved_tensors, ctx.reverse, ctx.needs_input_grad[0])
    grads = call_op(_ops.tlstm_backward.default, args, args[:15])
    d_in, d_dt, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_w_d, d_b_d = grads
    return (d_in if ctx.needs_input_grad[0] else None, d_dt, None, d_h0, d_c0, d_w_ih, d_w_hh,
            d_bias if ctx.has_bias else None, d_w_d, d_b_d if ctx.has_b_d else None, None)


register_autograd(_ops.tlstm_forward.default, _tlstm_backward, setup_context=_tlstm_setup_context)


def tlstm_layer(input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, w_d, b_d, reverse=False):
    """One T-LSTM layer, one direction. Returns (output, h_n, c_n)."""
    args = (input, delta_t, batch_sizes, h0, c0, w_ih, w_hh, bias, w_d, b_d, reverse)
    out, h_n, c_n, _, _, _ = call_op(_ops.tlstm_forward.default, args, args[:10])
    return out, h_n, c_n
