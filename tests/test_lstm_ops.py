"""The raw ops torch.ops.timerec_fast.lstm_forward / lstm_backward: an independent Python reference,
fp64 gradcheck, torch.library.opcheck, and torch.compile(fullgraph=True) through them."""
import itertools

import pytest
import torch

import timerec_fast
from timerec_fast import ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

I, H, P = 3, 4, 2
OP = torch.ops.timerec_fast.lstm_forward
BATCH_SIZES = {"packed": [3, 3, 2, 1], "padded": [2, 2, 2], "single": [1, 1, 1, 1]}


def _op_args(batch_sizes, proj, bias=True, reverse=False, dtype=torch.float64, requires_grad=True):
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])
    p = P if proj else H

    def t(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)

    return dict(input=t(n, I), batch_sizes=bs, h0=t(b, p), c0=t(b, H), w_ih=t(4 * H, I),
                w_hh=t(4 * H, p), b_ih=t(4 * H) if bias else None,
                b_hh=t(4 * H) if bias else None, w_hr=t(p, H) if proj else None, reverse=reverse)


ARG_ORDER = ("input", "batch_sizes", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "reverse")


def _call(a):
    return OP(*(a[k] for k in ARG_ORDER))


def reference_lstm(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """Row-by-row LSTM over the packed layout, written from the definition (autograd-able)."""
    bs = [int(v) for v in batch_sizes]
    offsets = [sum(bs[:t]) for t in range(len(bs))]
    h = list(h0.unbind(0))
    c = list(c0.unbind(0))
    out = [None] * input.shape[0]
    for t in (reversed(range(len(bs))) if reverse else range(len(bs))):
        for b in range(bs[t]):
            row = offsets[t] + b
            z = w_ih @ input[row] + w_hh @ h[b]
            if b_ih is not None:
                z = z + b_ih
            if b_hh is not None:
                z = z + b_hh
            zi, zf, zg, zo = z.chunk(4)
            c[b] = torch.sigmoid(zf) * c[b] + torch.sigmoid(zi) * torch.tanh(zg)
            h[b] = torch.sigmoid(zo) * torch.tanh(c[b])
            if w_hr is not None:
                h[b] = w_hr @ h[b]
            out[row] = h[b]
    return torch.stack(out), torch.stack(h), torch.stack(c)


OP_CASES = list(itertools.product(BATCH_SIZES, (False, True), (True, False), (False, True)))


def _case_id(case):
    layout, proj, bias, reverse = case
    return f"{layout}-{'proj' if proj else 'noproj'}-{'bias' if bias else 'nobias'}-" \
           f"{'rev' if reverse else 'fwd'}"


@pytest.mark.parametrize("case", OP_CASES, ids=_case_id)
def test_op_matches_python_reference(case):
    """Values and gradients of the op against a from-the-definition reference (not torch.nn)."""
    layout, proj, bias, reverse = case
    a = _op_args(BATCH_SIZES[layout], proj, bias, reverse)
    out, h_n, c_n, gates, cells, hpre = _call(a)
    ref = reference_lstm(**a)
    for got, want in zip((out, h_n, c_n), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # saved tensors have the documented shapes
    n = a["input"].shape[0]
    assert gates.shape == (n, 4 * H) and cells.shape == (n, H)
    assert hpre.shape == ((n, H) if proj else (0,))
    weights = [torch.randn_like(t) for t in ref]
    leaves = [v for v in a.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    got_g = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (out, h_n, c_n))), leaves)
    want_g = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), leaves)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", OP_CASES, ids=_case_id)
def test_gradcheck_lstm_forward(case):
    layout, proj, bias, reverse = case
    a = _op_args(BATCH_SIZES[layout], proj, bias, reverse)
    names = [k for k in ARG_ORDER if isinstance(a[k], torch.Tensor) and a[k].requires_grad]

    def fn(*tensors):
        call = dict(a, **dict(zip(names, tensors)))
        return _call(call)[:3]

    assert torch.autograd.gradcheck(fn, [a[k] for k in names])


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (1, 2), (0, 2)])
@pytest.mark.parametrize("proj", [False, True])
def test_gradcheck_with_unused_outputs(used, proj):
    """Outputs that do not reach the loss arrive in backward as None/zeros."""
    a = _op_args(BATCH_SIZES["packed"], proj, reverse=True)
    names = [k for k in ARG_ORDER if isinstance(a[k], torch.Tensor) and a[k].requires_grad]

    def fn(*tensors):
        outs = _call(dict(a, **dict(zip(names, tensors))))
        return tuple(outs[i] for i in used)

    assert torch.autograd.gradcheck(fn, [a[k] for k in names])


def test_gradcheck_only_some_inputs_require_grad():
    """input_grad=False path: the input does not require grad, the weights do."""
    a = _op_args(BATCH_SIZES["packed"], True)
    a["input"] = a["input"].detach()
    a["h0"] = a["h0"].detach()
    names = ["c0", "w_ih", "w_hh", "b_hh", "w_hr"]

    def fn(*tensors):
        return _call(dict(a, **dict(zip(names, tensors))))[:3]

    assert torch.autograd.gradcheck(fn, [a[k] for k in names])


def test_saved_outputs_are_not_differentiable():
    a = _op_args(BATCH_SIZES["packed"], True)
    out, h_n, c_n, gates, cells, hpre = _call(a)
    assert out.requires_grad and h_n.requires_grad and c_n.requires_grad
    assert not gates.requires_grad and not cells.requires_grad and not hpre.requires_grad


def _backward_args(a, out, gates, cells, hpre, grads, input_grad=True):
    return (grads[0], grads[1], grads[2], a["input"], a["batch_sizes"], a["h0"], a["c0"],
            a["w_ih"], a["w_hh"], a["w_hr"], out, gates, cells, hpre, a["reverse"], input_grad)


@pytest.mark.parametrize("proj", [False, True])
def test_backward_op_none_grads_equal_zero_grads(proj):
    a = _op_args(BATCH_SIZES["packed"], proj, reverse=True, requires_grad=False)
    out, h_n, c_n, gates, cells, hpre = _call(a)
    g_h = torch.randn_like(h_n)
    with_none = torch.ops.timerec_fast.lstm_backward(
        *_backward_args(a, out, gates, cells, hpre, (None, g_h, None)))
    with_zeros = torch.ops.timerec_fast.lstm_backward(*_backward_args(
        a, out, gates, cells, hpre, (torch.zeros_like(out), g_h, torch.zeros_like(c_n))))
    no_input = torch.ops.timerec_fast.lstm_backward(
        *_backward_args(a, out, gates, cells, hpre, (None, g_h, None), input_grad=False))
    assert no_input[0].numel() == 0
    for x, y, z in zip(with_none, with_zeros, no_input):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        if z.numel():
            torch.testing.assert_close(z, x, rtol=0, atol=0)
    assert with_none[0].shape == a["input"].shape
    assert with_none[6].shape == ((P, H) if proj else (0,))


def test_op_noncontiguous_arguments():
    """Transposed / strided views of every tensor argument give the contiguous result."""
    a = _op_args(BATCH_SIZES["packed"], True, reverse=True, requires_grad=False)
    strided = {}
    for k, v in a.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and k != "batch_sizes":
            strided[k] = v.t().contiguous().t()        # column-major
            assert not strided[k].is_contiguous()
        elif isinstance(v, torch.Tensor) and v.dim() == 1 and k != "batch_sizes":
            strided[k] = torch.stack([v, v], 1)[:, 0]  # stride 2
            assert not strided[k].is_contiguous()
        else:
            strided[k] = v
    for x, y in zip(_call(strided)[:3], _call(a)[:3]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_op_float32_matches_float64_reference():
    a = _op_args(BATCH_SIZES["packed"], True, reverse=True, requires_grad=False)
    a32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in a.items()}
    for x, y in zip(_call(a32)[:3], _call(a)[:3]):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)


# ---- opcheck ----------------------------------------------------------------------------------

OPCHECK_SAMPLES = {
    "proj-packed": dict(batch_sizes=BATCH_SIZES["packed"], proj=True),
    "nobias-padded": dict(batch_sizes=BATCH_SIZES["padded"], proj=False, bias=False),
    "reverse-proj-packed": dict(batch_sizes=BATCH_SIZES["packed"], proj=True, reverse=True),
    "float32-reverse-packed": dict(batch_sizes=BATCH_SIZES["packed"], proj=False, reverse=True,
                                   dtype=torch.float32),
}


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_opcheck_lstm_forward(sample):
    a = _op_args(**OPCHECK_SAMPLES[sample])
    torch.library.opcheck(OP, tuple(a[k] for k in ARG_ORDER))


def test_opcheck_lstm_backward():
    a = _op_args(BATCH_SIZES["packed"], True, reverse=True, requires_grad=False)
    out, h_n, c_n, gates, cells, hpre = _call(a)
    args = _backward_args(a, out, gates, cells, hpre,
                          (torch.randn_like(out), torch.randn_like(h_n), None))
    torch.library.opcheck(torch.ops.timerec_fast.lstm_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = timerec_fast.LSTM(4, 5, num_layers=2, batch_first=True, bidirectional=True,
                                      proj_size=3)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x, hx=None):
        y, (h, c) = self.lstm(x, hx)
        return self.head(y), h, c


def _compiled_vs_eager(model, backend, x, hx):
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    results = []
    weights = None
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_()
        hl = tuple(t.clone().requires_grad_() for t in hx)
        y, h, c = m(xl, hl)
        if weights is None:
            weights = [torch.randn_like(t) for t in (y, h, c)]
        sum((w * t).sum() for w, t in zip(weights, (y, h, c))).backward()
        grads = [xl.grad, hl[0].grad, hl[1].grad] + [p.grad.clone() for p in model.parameters()]
        results.append(([y.detach(), h.detach(), c.detach()], grads))
    (e_vals, e_grads), (c_vals, c_grads) = results
    for a, b in zip(c_vals + c_grads, e_vals + e_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _model_inputs():
    return torch.randn(3, 6, 4), (torch.randn(4, 3, 3), torch.randn(4, 3, 5))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_module(backend, fresh_dynamo):
    """The issue's promise: a model using timerec_fast.LSTM compiles with fullgraph=True as is
    (no Dynamo settings changed by the user), unlike torch.nn.LSTM."""
    model = _Model()
    x, hx = _model_inputs()
    _compiled_vs_eager(model, backend, x, hx)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_module_allow_rnn(backend, fresh_dynamo):
    """Numerics of the compiled module with Dynamo's RNN gate lifted (isolates the tracing of our
    forward from the module-type check that test_compile_fullgraph_module exercises)."""
    model = _Model()
    x, hx = _model_inputs()
    with torch._dynamo.config.patch(allow_rnn=True):
        _compiled_vs_eager(model, backend, x, hx)


def test_compile_fullgraph_raw_ops(fresh_dynamo):
    """A bidirectional layer written directly on ops.lstm_layer traces into one graph."""
    a = _op_args(BATCH_SIZES["packed"], True, dtype=torch.float32)
    b = _op_args(BATCH_SIZES["packed"], True, dtype=torch.float32)
    weights = [v for d in (a, b) for k, v in d.items()
               if k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]

    def bidir(x, bs, h0f, c0f, h0b, c0b):
        f, hf, cf = ops.lstm_layer(x, bs, h0f, c0f, a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                   a["w_hr"], reverse=False)
        r, hb, cb = ops.lstm_layer(x, bs, h0b, c0b, b["w_ih"], b["w_hh"], b["b_ih"], b["b_hh"],
                                   b["w_hr"], reverse=True)
        return torch.cat([f, r], 1).tanh().sum() + (hf * hb).sum() + (cf - cb).square().sum()

    compiled = torch.compile(bidir, backend="aot_eager", fullgraph=True)
    args = tuple(t.detach() for t in (a["input"], a["batch_sizes"], a["h0"], a["c0"], b["h0"],
                                      b["c0"]))
    grads = []
    for fn in (bidir, compiled):
        leaves = [t.clone().requires_grad_() if i != 1 else t for i, t in enumerate(args)]
        loss = fn(*leaves)
        grads.append([loss.detach()] + list(torch.autograd.grad(
            loss, [t for i, t in enumerate(leaves) if i != 1] + weights)))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_double_backward_is_correct_or_refused():
    """Second-order gradients (gradient penalties, MAML): either right (as torch.nn.LSTM gives
    them in fp64 on the CPU) or a clear error -- never silently missing or zero."""
    dtype = torch.float64
    ref = torch.nn.LSTM(I, H, dtype=dtype)
    ours = timerec_fast.LSTM(I, H, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, I, dtype=dtype)
    results = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        try:
            out = m(xl)[0]
            g, = torch.autograd.grad(out.square().sum(), xl, create_graph=True)
            gg = torch.autograd.grad(g.square().sum(), [xl, m.weight_hh_l0], allow_unused=True)
        except (RuntimeError, NotImplementedError):
            assert m is ours, "torch.nn.LSTM supports double backward in fp64 on the CPU"
            return
        results.append(gg)
    (r_x, r_w), (o_x, o_w) = results
    assert o_x is not None and o_w is not None, "second-order gradients silently dropped"
    torch.testing.assert_close(o_x, r_x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(o_w, r_w, rtol=1e-8, atol=1e-10)
