"""The autograd paths of the fused ops give the same results.

Differentiable eager calls take each op's eager autograd.Function, torch.func transforms its
functorch Function (ops.register_autograd); tracing, compiling and CUDA autocast take the
autograd registered with torch.library.register_autograd. All run the same setup_context and
backward around the same kernels, so outputs and every gradient must be bit-identical, and each
path must really be the one recorded in the graph.
"""
import os
import sys

import pytest
import torch

import timerec_fast
from timerec_fast import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_cells  # noqa: E402

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


def _reference_of(name, module):
    """The module's reference: torch.nn with the same weights, or the time cells' step loop."""
    if name in ("lstm", "gru"):
        ref_cls = torch.nn.LSTM if name == "lstm" else torch.nn.GRU
        kwargs = dict(num_layers=module.num_layers, bidirectional=module.bidirectional)
        if name == "lstm":
            kwargs["proj_size"] = module.proj_size
        ref = ref_cls(module.input_size, module.hidden_size, **kwargs).double()
        ref.load_state_dict(module.state_dict())
        return lambda x, dt: ref(x), list(ref.parameters())
    return lambda x, dt: reference_cells.reference_time_lstm(module, x, dt), \
        list(module.parameters())


@pytest.mark.parametrize("which", ["output", "h_n", "c_n"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_gradient_through_one_output(name, which):
    """The loss on one output alone. The forwards turn off autograd's zero-filling of missing
    output gradients (ctx.set_materialize_grads(False)), so the backward ops get None for the
    other outputs and must treat it as zeros: both paths against the reference."""
    if name == "gru" and which == "c_n":
        pytest.skip("GRU has no cell state")
    module, takes_dt = MODULES[name]()
    module.double()
    torch.manual_seed(2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    dt = torch.rand(T, B, dtype=torch.float64)
    reference, ref_params = _reference_of(name, module)

    def grads(fn, params):
        xs = x.clone().requires_grad_(True)
        dts = dt.clone().requires_grad_(True)
        out, states = fn(xs, dts)
        states = states if isinstance(states, tuple) else (states,)
        picked = {"output": out, "h_n": states[0], "c_n": states[-1]}[which]
        leaves = [xs] + ([dts] if takes_dt else []) + params
        return torch.autograd.grad(picked.sin().sum(), leaves, allow_unused=True)

    want = grads(reference, ref_params)
    for eager in (True, False):
        old = ops.EAGER_AUTOGRAD
        ops.EAGER_AUTOGRAD = eager
        try:
            got = grads(lambda xs, dts: module(xs, dts) if takes_dt else module(xs),
                        list(module.parameters()))
        finally:
            ops.EAGER_AUTOGRAD = old
        for a, b in zip(got, want):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


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


@pytest.mark.parametrize("name", sorted(MODULES))
def test_torch_func_grad(name):
    """torch.func.grad over functional_call: the functorch Function, same gradients as eager
    autograd (and, for LSTM and GRU, as torch.nn under torch.func.grad)."""
    module, takes_dt = MODULES[name]()
    module.double()
    torch.manual_seed(2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    args = (x, torch.rand(T, B, dtype=torch.float64)) if takes_dt else (x,)
    params = {k: torch.randn_like(v) * 0.5 for k, v in module.named_parameters()}

    def loss(mod, p):
        out, states = torch.func.functional_call(mod, p, args)
        states = states if isinstance(states, tuple) else (states,)
        return out.sin().sum() + sum(s.cos().sum() for s in states)

    grads = torch.func.grad(lambda p: loss(module, p))(params)
    eager = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(module, eager).backward()
    for k in params:
        torch.testing.assert_close(grads[k], eager[k].grad, rtol=0, atol=0)
    if name in ("lstm", "gru"):
        kwargs = dict(num_layers=2, bidirectional=True)
        if name == "lstm":
            kwargs["proj_size"] = 2
        ref = getattr(torch.nn, name.upper())(I, H, **kwargs).double()
        grads_ref = torch.func.grad(lambda p: loss(ref, p))(params)
        for k in params:
            torch.testing.assert_close(grads[k], grads_ref[k])


def test_torch_func_refusals_are_clear():
    """Second order through torch.func raises our double-backward error; vmap (no batching rule
    for the fused ops) raises torch's error naming the op, never a wrong result."""
    module = timerec_fast.GRU(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="double backward through gru_backward"):
        torch.func.grad(lambda xx: torch.func.grad(lambda y: module(y)[0].sum())(xx).sum())(x)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda xx: module(xx)[0])(x.unsqueeze(0).expand(2, T, B, I))


@pytest.mark.parametrize("how", ["anomaly", "checkpoint-reentrant", "checkpoint", "save_on_cpu"])
def test_autograd_tools_see_the_eager_path(how):
    """Anomaly mode, activation checkpointing (both kinds) and saved-tensor hooks work on the
    eager path and give torch.nn's gradients."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    ours = timerec_fast.LSTM(I, H, num_layers=2).double()
    ref = torch.nn.LSTM(I, H, num_layers=2).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)

    def grads(module, tool):
        xx = x.clone().requires_grad_()
        if tool == "anomaly":
            with torch.autograd.detect_anomaly():
                module(xx)[0].sin().sum().backward()
        elif tool.startswith("checkpoint"):
            out = checkpoint(lambda t: module(t)[0], xx, use_reentrant=tool.endswith("reentrant"))
            out.sin().sum().backward()
        elif tool == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                out = module(xx)[0]
            out.sin().sum().backward()
        else:
            module(xx)[0].sin().sum().backward()
        return [xx.grad] + [p.grad for p in module.parameters()]

    for a, b in zip(grads(ours, how), grads(ref, "plain")):
        torch.testing.assert_close(a, b)
