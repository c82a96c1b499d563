"""timerec_fast.TimeLSTM (time_lstm1/2/3, tlstm) against the step-by-step references of
tests/reference_cells.py: values and every gradient (input, delta_t, h0/c0, each parameter); the raw
ops (fp64 gradcheck including delta_t, opcheck), torch.compile(fullgraph=True), the w_t1 <= 0
constraint, bad delta_t / arguments, time_gate_activations and T-LSTM decay semantics."""
import math
import os
import sys

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import timerec_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_cells as ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VARIANTS = ("time_lstm1", "time_lstm2", "time_lstm3", "tlstm")
OUT_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-4)}
I, H, T, B = 3, 4, 5, 3
LENGTHS = {"packed_sorted": [5, 4, 2], "packed_unsorted": [2, 5, 4]}


@pytest.fixture
def one_thread():
    """Many tiny op calls (gradcheck, optimizer loops): on a loaded 2-core machine, MKL's 2-thread
    GEMMs on 9x24 matrices can each take ~20 ms of OpenMP barrier waiting. One thread keeps these
    tests fast; the values checked do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _close(got, want, dtype, grad=False, what=""):
    tol = (GRAD_TOL if grad else OUT_TOL)[dtype]
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def _module(variant, dtype=torch.float64, **kw):
    kw.setdefault("input_size", I)
    kw.setdefault("hidden_size", H)
    m = timerec_fast.TimeLSTM(variant=variant, dtype=dtype, **kw)
    # Larger-than-default weights so every term (peepholes, time weights, decay) matters.
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m


def _delta_t(shape, dtype):
    dt = torch.rand(*shape, dtype=dtype) * 3.0
    dt.view(-1)[::4] = 0.0  # exact zeros are valid
    return dt


# ---- parity with the reference -----------------------------------------------------------------

# (num_layers, bidirectional, batch_first, bias, input kind, hx given)
CONFIGS = [
    (1, False, False, True, "padded", False),
    (2, True, False, True, "padded", True),
    (1, True, True, False, "padded", True),
    (2, False, True, True, "packed_sorted", True),
    (2, True, False, False, "packed_unsorted", False),
    (1, True, True, True, "packed_unsorted", True),
    (2, True, False, True, "unbatched", True),
    (1, False, True, False, "unbatched", False),
]


def _cfg_id(c):
    layers, bidir, bf, bias, kind, hx = c
    return (f"L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
            f"{'bias' if bias else 'nobias'}-{kind}-{'hx' if hx else 'nohx'}")


def _inputs(kind, batch_first, dtype):
    """Leaf tensors x, dt and a function building the module's (input, delta_t) from them."""
    if kind == "unbatched":
        x = torch.randn(T, I, dtype=dtype, requires_grad=True)
        dt = _delta_t((T,), dtype).requires_grad_()
        return x, dt, lambda x, dt: (x, dt)
    shape = (B, T) if batch_first else (T, B)
    x = torch.randn(*shape, I, dtype=dtype, requires_grad=True)
    dt = _delta_t(shape, dtype).requires_grad_()
    if kind == "padded":
        return x, dt, lambda x, dt: (x, dt)
    lengths = torch.tensor(LENGTHS[kind])
    sort = kind == "packed_sorted"

    def build(x, dt):
        px = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sort)
        pd = pack_padded_sequence(dt, lengths, batch_first=batch_first, enforce_sorted=sort)
        assert (px.sorted_indices is None) == sort
        return px, pd
    return x, dt, build


def _run_both(m, kind, batch_first, give_hx, dtype):
    """Fused module and reference on the same leaves; returns [(out, h_n, c_n, grads)] x2."""
    x, dt, build = _inputs(kind, batch_first, dtype)
    hx = None
    if give_hx:
        lead = (m.num_layers * (2 if m.bidirectional else 1),)
        shape = lead + (() if kind == "unbatched" else (B,)) + (H,)
        hx = (torch.randn(*shape, dtype=dtype, requires_grad=True),
              torch.randn(*shape, dtype=dtype, requires_grad=True))
    leaves = {"input": x, "delta_t": dt}
    if hx is not None:
        leaves.update(h0=hx[0], c0=hx[1])
    params = dict(m.named_parameters())
    results = []
    weights = None
    for fn in (m, lambda inp, d, h: ref.reference_time_lstm(m, inp, d, h)):
        inp, d = build(x, dt)
        out, (h_n, c_n) = fn(inp, d, hx)
        if weights is None:
            weights = [torch.randn_like(t) for t in (_data(out), h_n, c_n)]
        loss = sum((w * t).sum() for w, t in zip(weights, (_data(out), h_n, c_n)))
        names = list(leaves) + list(params)
        grads = torch.autograd.grad(loss, [leaves[n] for n in leaves] + list(params.values()))
        results.append((out, h_n, c_n, dict(zip(names, grads))))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_time_lstm_matches_reference(variant, cfg, dtype):
    layers, bidir, batch_first, bias, kind, give_hx = cfg
    m = _module(variant, dtype, num_layers=layers, bidirectional=bidir, batch_first=batch_first,
                bias=bias)
    (o_out, o_h, o_c, o_g), (r_out, r_h, r_c, r_g) = _run_both(m, kind, batch_first, give_hx,
                                                               dtype)
    assert type(o_out) is type(r_out)
    if isinstance(o_out, PackedSequence):
        assert torch.equal(o_out.batch_sizes, r_out.batch_sizes)
    assert _data(o_out).shape == _data(r_out).shape
    assert o_h.shape == r_h.shape and o_c.shape == r_c.shape
    _close(_data(o_out), _data(r_out), dtype, what="output")
    _close(o_h, r_h, dtype, what="h_n")
    _close(o_c, r_c, dtype, what="c_n")
    assert set(o_g) == set(r_g)
    for name in r_g:
        assert r_g[name].abs().sum() > 0 or name.startswith("peephole"), \
            f"reference gradient of {name} is all zero: the test would not see a bug"
        _close(o_g[name], r_g[name], dtype, grad=True, what=f"grad {name}")


def test_reference_is_not_trivially_matching():
    """The reference distinguishes the variants (guards against a reference that ignores them)."""
    x = torch.randn(T, B, I, dtype=torch.float64)
    dt = _delta_t((T, B), torch.float64)
    m1 = _module("time_lstm1")
    m2 = _module("time_lstm2")
    with torch.no_grad():  # share i, f, g, o and t1 so only the T2 / c_t difference remains
        m2.weight_ih_l0[:5 * H] = m1.weight_ih_l0
        m2.weight_hh_l0.copy_(m1.weight_hh_l0)
        m2.bias_l0[:5 * H] = m1.bias_l0
        m2.peephole_l0.copy_(m1.peephole_l0)
        m2.time_out_weight_l0.copy_(m1.time_out_weight_l0)
    out1 = ref.reference_time_lstm(m1, x, dt)[0]
    out2 = ref.reference_time_lstm(m2, x, dt)[0]
    assert not torch.allclose(out1, out2)


# ---- raw ops: gradcheck including delta_t, opcheck ----------------------------------------------

PACKED = [3, 3, 2, 1]
TL_OP = torch.ops.timerec_fast.time_lstm_forward
TT_OP = torch.ops.timerec_fast.tlstm_forward
GATES = {1: (5, 4), 2: (6, 4), 3: (5, 3)}


def _time_lstm_args(variant, reverse, bias=True, dtype=torch.float64, batch_sizes=PACKED,
                    requires_grad=True):
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])
    g, gh = GATES[variant]

    def t(*shape):
        return (torch.randn(*shape, dtype=dtype) * 0.8).requires_grad_(requires_grad)

    dt = (torch.rand(n, dtype=dtype) * 2 + 0.2).requires_grad_(requires_grad)
    return [t(n, I), dt, bs, t(b, H), t(b, H), t(g * H, I), t(gh * H, H),
            t(g * H) if bias else None, t(3, H), t(3, H), variant, reverse]


def _tlstm_args(reverse, bias=True, dtype=torch.float64, batch_sizes=PACKED, requires_grad=True):
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])

    def t(*shape):
        return (torch.randn(*shape, dtype=dtype) * 0.8).requires_grad_(requires_grad)

    dt = (torch.rand(n, dtype=dtype) * 2 + 0.2).requires_grad_(requires_grad)
    return [t(n, I), dt, bs, t(b, H), t(b, H), t(4 * H, I), t(4 * H, H),
            t(4 * H) if bias else None, t(H, H), t(H) if bias else None, reverse]


def _gradcheck(op, args):
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    assert 1 in idx  # delta_t is checked

    def fn(*tensors):
        call = list(args)
        for i, tt in zip(idx, tensors):
            call[i] = tt
        return op(*call)[:3]

    assert torch.autograd.gradcheck(fn, [args[i] for i in idx])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.usefixtures("one_thread")
def test_gradcheck_time_lstm_forward(variant, reverse):
    _gradcheck(TL_OP, _time_lstm_args(variant, reverse))


@pytest.mark.usefixtures("one_thread")
def test_gradcheck_time_lstm_forward_no_bias():
    _gradcheck(TL_OP, _time_lstm_args(2, True, bias=False))


# At least 16 rows per step on average: the forward runs fused on the panel kernel where the CPU
# has AVX2/AVX-512 (tests/test_cpu_paths.py covers its thread splits and GEMM modes).
FUSED_PACKED = [17, 17, 16]


@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.usefixtures("one_thread")
def test_gradcheck_time_lstm_forward_fused_rows(variant):
    _gradcheck(TL_OP, _time_lstm_args(variant, variant == 2, bias=variant != 3,
                                      batch_sizes=FUSED_PACKED))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.usefixtures("one_thread")
def test_gradcheck_tlstm_forward(reverse, bias):
    _gradcheck(TT_OP, _tlstm_args(reverse, bias))


def test_time_lstm_op_unused_slots_get_zero_grad():
    """Variant 3 ignores p_f and variant 1 ignores w_t2: their gradients are exactly zero."""
    for variant, (arg, row) in ((3, (8, 1)), (1, (9, 1))):
        args = _time_lstm_args(variant, False)
        out, h_n, c_n = TL_OP(*args)[:3]
        g = torch.autograd.grad((out.sum() + h_n.sum() + c_n.sum()), args[arg])[0]
        assert torch.all(g[row] == 0), (variant, g)
        assert g.abs().sum() > 0


@pytest.mark.parametrize("sample", ["v1-fwd", "v2-rev-nobias", "v3-rev-f32-padded",
                                    "v3-fused-rows"])
def test_opcheck_time_lstm_forward(sample):
    if sample == "v1-fwd":
        args = _time_lstm_args(1, False)
    elif sample == "v2-rev-nobias":
        args = _time_lstm_args(2, True, bias=False)
    elif sample == "v3-fused-rows":
        args = _time_lstm_args(3, False, batch_sizes=FUSED_PACKED)
    else:
        args = _time_lstm_args(3, True, dtype=torch.float32, batch_sizes=[2, 2, 2])
    torch.library.opcheck(TL_OP, tuple(args))


# time_lstm_inference (what the module runs when nothing needs a gradient) must return exactly
# time_lstm_forward's output, h_n and c_n on every CPU path: the per-step loop (few rows a step)
# and the tiles with the input projection in them (>= 16 rows a step), split over 2 threads by rows
# or (64 rows, H = 128) by units. The tiles then keep their gate rows in a 16-row scratch and write
# no gates, cells or cts: H = 32 runs whole 16-unit chunks (the fp32 AVX-512 epilogue), H = 40 a
# partial last one (the scalar loop).
INFERENCE_CASES = {  # name: (batch_sizes, input_size, hidden_size)
    "per-step-packed": ([3, 3, 2, 1], 5, 7),
    "tiles-h40": ([18, 17, 16], 9, 40),
    "tiles-h32": ([32, 32, 32], 16, 32),
    "tiles-unit-split": ([64, 64], 16, 128),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", INFERENCE_CASES)
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_time_lstm_inference_op_matches_forward(threads, variant, case, reverse, dtype):
    threads(2)
    batch_sizes, inputs, hidden = INFERENCE_CASES[case]
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])
    g_in, g_h = GATES[variant]
    gen = torch.Generator().manual_seed(7)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.6

    dt = torch.rand(n, generator=gen, dtype=dtype) * 3
    args = (t(n, inputs), dt, bs, t(b, hidden), t(b, hidden), t(g_in * hidden, inputs),
            t(g_h * hidden, hidden), t(g_in * hidden), t(3, hidden), t(3, hidden), variant,
            reverse)
    full = TL_OP(*args)
    inference = torch.ops.timerec_fast.time_lstm_inference(*args)
    assert len(inference) == 3
    for got, want, what in zip(inference, full[:3], ("output", "h_n", "c_n")):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def test_opcheck_time_lstm_inference():
    args = _time_lstm_args(2, True, requires_grad=False, batch_sizes=FUSED_PACKED)
    torch.library.opcheck(torch.ops.timerec_fast.time_lstm_inference.default, tuple(args))


@pytest.mark.parametrize("variant", ["time_lstm1", "time_lstm2", "time_lstm3"])
def test_time_lstm_module_without_grad_runs_inference_op(variant, ops_below_autograd):
    # Under no_grad the module takes time_lstm_inference (nothing saved) and still matches the
    # step-by-step reference, at 20 rows a step (the tiles with their scratch), 2 layers.
    m = _module(variant, num_layers=2, bidirectional=True)
    x = torch.randn(T, 20, I, dtype=torch.float64)
    dt = _delta_t((T, 20), torch.float64)
    with torch.no_grad():
        out, (h_n, c_n) = m(x, dt)
        want, (want_h, want_c) = ref.reference_time_lstm(m, x, dt)
    assert ops_below_autograd == ["time_lstm_inference"] * 4
    for got, exp, what in ((out, want, "output"), (h_n, want_h, "h_n"), (c_n, want_c, "c_n")):
        _close(got, exp, torch.float64, what=what)


@pytest.mark.parametrize("sample", ["fwd", "rev-nobias-f32"])
def test_opcheck_tlstm_forward(sample):
    args = (_tlstm_args(False) if sample == "fwd"
            else _tlstm_args(True, bias=False, dtype=torch.float32))
    torch.library.opcheck(TT_OP, tuple(args))


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["time_lstm2", "tlstm"])
def test_time_lstm_torch_compile_fullgraph_matches_eager(variant):
    torch._dynamo.reset()
    try:
        m = timerec_fast.TimeLSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                                  variant=variant)
        head = torch.nn.Linear(2 * H, 2)

        def step(x, dt, h0, c0):
            y, (h, c) = m(x, dt, (h0, c0))
            return head(y), h, c

        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        x = torch.randn(B, T, I)
        dt = torch.rand(B, T) * 2
        h0, c0 = torch.randn(4, B, H), torch.randn(4, B, H)
        params = list(m.parameters()) + list(head.parameters())
        results = []
        weights = None
        for fn in (step, compiled):
            leaves = [t.clone().requires_grad_() for t in (x, dt, h0, c0)]
            outs = fn(*leaves)
            if weights is None:
                weights = [torch.randn_like(t) for t in outs]
            loss = sum((w * t).sum() for w, t in zip(weights, outs))
            grads = torch.autograd.grad(loss, leaves + params)
            results.append([t.detach() for t in outs] + list(grads))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


# ---- the w_t1 <= 0 constraint -------------------------------------------------------------------


def _push_w_t1_up(m, steps=25, lr=0.3):
    """Adam steps on a loss through the fused forward plus a term that rewards a larger w_t1."""
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    x = torch.randn(T, B, I)
    dt = torch.rand(T, B) * 3
    history = []
    for _ in range(steps):
        opt.zero_grad()
        out, (h, c) = m(x, dt)
        w = m.time_gate1_weight()
        loss = 1e-3 * out.pow(2).mean() - 10.0 * w.sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            history.append(m.time_gate1_weight().clone())
    return history


@pytest.mark.parametrize("variant", ["time_lstm2", "time_lstm3"])
@pytest.mark.usefixtures("one_thread")
def test_time_gate1_weight_stays_nonpositive_and_learns(variant):
    m = timerec_fast.TimeLSTM(I, H, num_layers=2, bidirectional=True, variant=variant)
    names = [n for n, _ in m.named_parameters() if n.startswith("time_gate1")]
    assert names and all(n.startswith("time_gate1_raw") for n in names), names
    assert not hasattr(m, "time_gate1_weight_l0")
    raws_before = {n: p.detach().clone() for n, p in m.named_parameters() if n in names}
    w_before = m.time_gate1_weight().detach().clone()
    assert (w_before < 0).all()
    # the forward alone gives the raw parameter a gradient (it is used, and learns from the data)
    out, _ = m(torch.randn(T, B, I), torch.rand(T, B) * 3)
    (out * torch.randn_like(out)).sum().backward()
    assert m.time_gate1_raw_l0.grad is not None and m.time_gate1_raw_l0.grad.abs().sum() > 0
    m.zero_grad()

    history = _push_w_t1_up(m)
    for w in history:
        assert (w <= 0).all(), f"w_t1 became positive: {w}"
    for layer in range(2):
        for direction in range(2):
            w = m.time_gate1_weight(layer, direction)
            assert (w <= 0).all(), (layer, direction, w)
    for n, before in raws_before.items():
        after = dict(m.named_parameters())[n].detach()
        assert not torch.equal(before, after), f"{n} did not change: frozen"
    w_after = m.time_gate1_weight().detach()
    assert (w_after > w_before).all(), "w_t1 did not move up under a loss pushing it up"
    assert w_after.max() > -0.05  # approached the bound


@pytest.mark.usefixtures("one_thread")
def test_time_gate1_weight_is_free_for_time_lstm1():
    m = timerec_fast.TimeLSTM(I, H, variant="time_lstm1")
    assert isinstance(m.time_gate1_weight_l0, torch.nn.Parameter)
    assert not any(n.startswith("time_gate1_raw") for n, _ in m.named_parameters())
    assert m.time_gate1_weight() is m.time_gate1_weight_l0
    _push_w_t1_up(m)
    assert (m.time_gate1_weight_l0 > 0).all(), "time_lstm1's w_t1 should be unconstrained"


# ---- bad input ----------------------------------------------------------------------------------


def _bad(m, x, dt, exc=(ValueError, RuntimeError, TypeError), **kw):
    with pytest.raises(exc) as e:
        m(x, dt, **kw)
    return str(e.value)


@pytest.mark.parametrize("variant", ["time_lstm3", "tlstm"])
@pytest.mark.parametrize("value,text", [(-1.5, "-1.5"), (float("nan"), "nan"), (float("inf"), "inf")],
                         ids=["negative", "nan", "inf"])
def test_bad_delta_t_values(variant, value, text):
    m = timerec_fast.TimeLSTM(I, H, variant=variant)
    dt = torch.rand(T, B)
    dt[2, 1] = value
    msg = _bad(m, torch.randn(T, B, I), dt, ValueError)
    assert "delta_t" in msg and text in msg and ">= 0" in msg and "finite" in msg, msg
    # also through a packed input
    lengths = torch.tensor([5, 4, 3])
    msg = _bad(m, pack_padded_sequence(torch.randn(T, B, I), lengths),
               pack_padded_sequence(dt, lengths), ValueError)
    assert text in msg, msg


@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
def test_delta_t_shape_mismatch_names_both_shapes(batch_first):
    m = timerec_fast.TimeLSTM(I, H, batch_first=batch_first)
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    expected = (B, T) if batch_first else (T, B)
    for bad in [(T, B - 1), (B * T,), (T, B, 1), (B + 1, T)]:
        if bad == expected:
            continue
        msg = _bad(m, x, torch.rand(*bad), ValueError)
        assert str(expected) in msg and str(tuple(x.shape)) in msg and str(bad) in msg, msg
    # unbatched
    msg = _bad(m, torch.randn(T, I), torch.rand(T + 1), ValueError)
    assert str((T,)) in msg and str((T + 1,)) in msg, msg


def test_packed_input_needs_packed_delta_t():
    m = timerec_fast.TimeLSTM(I, H)
    lengths = torch.tensor([5, 4, 2])
    px = pack_padded_sequence(torch.randn(T, B, I), lengths)
    msg = _bad(m, px, torch.rand(T, B), ValueError)
    assert "PackedSequence" in msg and "Tensor" in msg, msg
    # packed with other lengths
    other = pack_padded_sequence(torch.rand(T, B), torch.tensor([5, 3, 2]))
    msg = _bad(m, px, other, ValueError)
    assert "batch_sizes" in msg and str(other.batch_sizes.tolist()) in msg \
        and str(px.batch_sizes.tolist()) in msg, msg
    # same lengths but a different sort order (unsorted input, sorted delta_t)
    pxu = pack_padded_sequence(torch.randn(T, B, I), torch.tensor([2, 5, 4]), enforce_sorted=False)
    pdu = pack_padded_sequence(torch.rand(T, B), torch.tensor([5, 4, 2]))
    msg = _bad(m, pxu, pdu, ValueError)
    assert "sorted_indices" in msg, msg
    # padded input, packed delta_t
    msg = _bad(m, torch.randn(T, B, I), pack_padded_sequence(torch.rand(T, B), lengths),
               ValueError)
    assert "PackedSequence" in msg, msg


def test_missing_delta_t():
    m = timerec_fast.TimeLSTM(I, H)
    with pytest.raises(TypeError, match="delta_t"):
        m(torch.randn(T, B, I))
    with pytest.raises(TypeError, match="delta_t is required"):
        m(torch.randn(T, B, I), None)


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"variant.*time_lstm1.*tlstm.*'time_lstm4'"):
        timerec_fast.TimeLSTM(I, H, variant="time_lstm4")


def test_input_dtype_mismatch():
    m = timerec_fast.TimeLSTM(I, H)  # float32
    msg = _bad(m, torch.randn(T, B, I, dtype=torch.float64), torch.rand(T, B), ValueError)
    assert "float64" in msg and "float32" in msg, msg
    msg = _bad(m, torch.randn(T, B, I), torch.rand(T, B),
               hx=(torch.zeros(1, B, H, dtype=torch.float64), torch.zeros(1, B, H)))
    assert "float64" in msg and "float32" in msg, msg


def test_wrong_feature_and_hx_shape():
    m = timerec_fast.TimeLSTM(I, H, num_layers=2)
    msg = _bad(m, torch.randn(T, B, I + 1), torch.rand(T, B), RuntimeError)
    assert f"Expected {I}, got {I + 1}" in msg, msg
    msg = _bad(m, torch.randn(T, B, I), torch.rand(T, B), RuntimeError,
               hx=(torch.zeros(1, B, H), torch.zeros(1, B, H)))
    assert str((2, B, H)) in msg and str((1, B, H)) in msg, msg


def test_integer_delta_t_is_accepted_as_float():
    m = _module("time_lstm2")
    x = torch.randn(T, B, I, dtype=torch.float64)
    dt = torch.randint(0, 5, (T, B))
    torch.testing.assert_close(m(x, dt)[0], m(x, dt.double())[0], rtol=0, atol=0)


# ---- time_gate_activations ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_time_gate_activations(variant):
    m = _module(variant, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    dt = _delta_t((T, B), torch.float64)
    acts = m.time_gate_activations(x, dt)
    assert acts.shape == (T, B, H)
    assert (acts > 0).all() and (acts <= 1).all()
    if variant == "tlstm":
        want = (1.0 / torch.log(math.e + dt)).unsqueeze(-1).expand(T, B, H)
        torch.testing.assert_close(acts, want, rtol=1e-14, atol=0)
        assert (acts[dt == 0] == 1).all()
    else:
        traces = {}
        ref.reference_time_lstm(m, x, dt, traces=traces)
        key = "T" if variant == "time_lstm1" else "T2"
        want = traces[(0, 0)][0][key]
        torch.testing.assert_close(acts, want, rtol=1e-12, atol=1e-14)
        if variant != "time_lstm1":  # not T1 (a different gate)
            assert not torch.allclose(acts, traces[(0, 0)][0]["T1"])
    # batch_first, unbatched and packed layouts give the same values, laid out like delta_t
    mb = _module(variant)
    mb.load_state_dict(m.state_dict(), strict=False)
    mb.batch_first = True
    torch.testing.assert_close(mb.time_gate_activations(x.transpose(0, 1), dt.t()),
                               acts.transpose(0, 1), rtol=1e-14, atol=0)
    torch.testing.assert_close(m.time_gate_activations(x[:, 1], dt[:, 1]), acts[:, 1],
                               rtol=1e-14, atol=0)
    lengths = torch.tensor([2, 5, 4])
    px = pack_padded_sequence(x, lengths, enforce_sorted=False)
    pd = pack_padded_sequence(dt, lengths, enforce_sorted=False)
    packed = m.time_gate_activations(px, pd)
    assert packed.shape == (px.data.shape[0], H)
    torch.testing.assert_close(packed, pack_padded_sequence(acts, lengths,
                                                            enforce_sorted=False).data,
                               rtol=1e-14, atol=0)
    # depends on delta_t
    assert not torch.allclose(m.time_gate_activations(x, dt + 1.0), acts)


# ---- T-LSTM semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_tlstm_zero_delta_t_is_plain_lstm(dtype):
    """g(0) = 1/log(e) = 1, so with dt = 0 T-LSTM is an ordinary LSTM (W_d irrelevant). Exactly 1
    in fp64; in fp32, e itself is rounded (2.7182817 < e) and a correctly rounded log of it is
    1 - 2^-24, so within 2 ulp (an AMD EPYC's torch.log gave 1.0, an Intel Xeon's 0.99999994)."""
    m = _module("tlstm", dtype, num_layers=2)
    acts = m.time_gate_activations(torch.randn(T, B, I, dtype=dtype), torch.zeros(T, B,
                                                                                  dtype=dtype))
    slack = 0 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps
    assert ((acts - 1).abs() <= slack).all(), acts.unique()
    lstm = torch.nn.LSTM(I, H, num_layers=2, dtype=dtype)
    with torch.no_grad():
        for k in range(2):
            getattr(lstm, f"weight_ih_l{k}").copy_(getattr(m, f"weight_ih_l{k}"))
            getattr(lstm, f"weight_hh_l{k}").copy_(getattr(m, f"weight_hh_l{k}"))
            getattr(lstm, f"bias_ih_l{k}").copy_(getattr(m, f"bias_l{k}"))
            getattr(lstm, f"bias_hh_l{k}").zero_()
            getattr(m, f"weight_decomp_l{k}").mul_(5.0)  # large decomposition: would matter
    x = torch.randn(T, B, I, dtype=dtype)
    hx = (torch.randn(2, B, H, dtype=dtype), torch.randn(2, B, H, dtype=dtype) * 2)
    got, (h, c) = m(x, torch.zeros(T, B, dtype=dtype), hx)
    want, (wh, wc) = lstm(x, hx)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(c, wc, **tol)
    # and a positive dt is not a plain LSTM
    assert not torch.allclose(m(x, torch.full((T, B), 2.0, dtype=dtype), hx)[0], want,
                              **OUT_TOL[torch.float32])


def test_tlstm_larger_delta_t_discounts_short_term_memory_more():
    """One step from c0: c_1(dt) - c_1(0) = -f * cS * (1 - g(dt)), g = 1/log(e+dt) decreasing, so
    the memory moves monotonically towards its long-term part c0 - cS as the gap grows."""
    m = _module("tlstm")
    x = torch.randn(1, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    c0 = torch.randn(1, B, H, dtype=torch.float64) * 2
    with torch.no_grad():
        a = x[0] @ m.weight_ih_l0.t() + h0[0] @ m.weight_hh_l0.t() + m.bias_l0
        f = torch.sigmoid(a[:, H:2 * H])
        cs = torch.tanh(c0[0] @ m.weight_decomp_l0.t() + m.bias_decomp_l0)
        c_at = {}
        for v in (0.0, 0.5, 2.0, 10.0, 1000.0):
            c_at[v] = m(x, torch.full((1, B), v, dtype=torch.float64), (h0, c0))[1][1][0]
    prev = torch.zeros(B, H, dtype=torch.float64)
    for v in (0.5, 2.0, 10.0, 1000.0):
        shift = c_at[v] - c_at[0.0]
        g = 1.0 / math.log(math.e + v)
        assert g < 1
        torch.testing.assert_close(shift, -f * cs * (1 - g), rtol=1e-10, atol=1e-12)
        assert (torch.sign(shift) == -torch.sign(cs)).all()
        assert (shift.abs() > prev.abs()).all(), "discount not increasing with delta_t"
        prev = shift
