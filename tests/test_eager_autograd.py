"""The two autograd paths of the fused ops give the same results.

Differentiable eager calls take each op's eager autograd.Function (ops._eager_function);
tracing, compiling, functorch transforms and CUDA autocast take the autograd registered with
torch.library.register_autograd. Both run the same setup_context and backward around the same
kernels, so outputs and every gradient must be bit-identical, and each path must really be the
one recorded in the graph.
"""
import pytest
import torch

import timerec_fast
from timerec_fast import ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

T, B, I, H = 5, 3, 4, 6


def recorded_paths(*tensors):
    """Which autograd path recorded each fused op node reachable from `tensors`."""
    seen, paths, todo = set(), set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = fn.name()
        if name.startswith("EagerAutograd_"):
            paths.add("eager")
        elif name.startswith("GeneratedBackwardFor_timerec_fast"):
            paths.add("registered")
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return paths


def _lstm():
    return timerec_fast.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2), False


def _gru():
    return timerec_fast.GRU(I, H, num_layers=2, bidirectional=True), False


def _time_lstm(variant):
    return lambda: (timerec_fast.TimeLSTM(I, H, num_layers=2, variant=variant), True)


MODULES = {"lstm": _lstm, "gru": _gru,
           **{v: _time_lstm(v) for v in ("time_lstm1", "time_lstm2", "time_lstm3", "tlstm")}}


def run(module, takes_dt, eager):
    torch.manual_seed(1)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    args = (x, torch.rand(T, B, dtype=torch.float64, requires_grad=True)) if takes_dt else (x,)
    module.zero_grad()
    old = ops.EAGER_AUTOGRAD
    ops.EAGER_AUTOGRAD = eager
    try:
        out, states = module(*args)
    finally:
        ops.EAGER_AUTOGRAD = old
    states = states if isinstance(states, tuple) else (states,)
    paths = recorded_paths(out, *states)
    (out.sin().sum() + sum(s.cos().sum() for s in states)).backward()
    grads = [a.grad for a in args] + [p.grad for p in module.parameters()]
    return [out.detach(), *[s.detach() for s in states]], grads, paths


@pytest.mark.parametrize("name", sorted(MODULES))
def test_eager_and_registered_autograd_agree(name):
    module, takes_dt = MODULES[name]()
    module.double()
    outs_e, grads_e, paths_e = run(module, takes_dt, eager=True)
    outs_r, grads_r, paths_r = run(module, takes_dt, eager=False)
    assert paths_e == {"eager"} and paths_r == {"registered"}
    for a, b in zip(outs_e, outs_r):
        assert torch.equal(a, b)
    assert all(g is not None for g in grads_e)
    for a, b in zip(grads_e, grads_r):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_cells_take_the_eager_path(cell):
    module = getattr(timerec_fast, cell)(I, H).double()
    ref = getattr(torch.nn, cell)(I, H).double()
    ref.load_state_dict(module.state_dict())
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    assert recorded_paths(out) == {"eager"}
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    out_ref = ref(x_ref)
    (out_ref[0] if isinstance(out_ref, tuple) else out_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, q in zip(module.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_double_backward_is_refused_on_both_paths():
    module = timerec_fast.LSTM(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    for eager in (True, False):
        ops.EAGER_AUTOGRAD = eager
        try:
            out, _ = module(x)
        finally:
            ops.EAGER_AUTOGRAD = True
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.sum().backward()
