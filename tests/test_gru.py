"""timerec_fast.GRU / GRUCell against torch.nn.GRU / GRUCell (values and every gradient), the raw
op torch.ops.timerec_fast.gru_forward (fp64 gradcheck, opcheck), torch.compile(fullgraph=True),
argument errors and state_dict compatibility."""
import itertools
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import timerec_fast

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OUT_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=1e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=5e-5, atol=5e-5)}
I, H, T, B = 3, 4, 5, 3
LENGTHS_SORTED = [5, 3, 2]
LENGTHS_UNSORTED = [2, 5, 3]
OP = torch.ops.timerec_fast.gru_forward


def _close(got, want, dtype, grad=False, what=""):
    tol = (GRAD_TOL if grad else OUT_TOL)[dtype]
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def _pair(dtype, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.nn.GRU(**kw, dtype=dtype)
        ours = timerec_fast.GRU(**kw, dtype=dtype)
    assert type(ours) is timerec_fast.GRU and type(ref) is torch.nn.GRU
    ours.load_state_dict(ref.state_dict())
    return ref, ours


# ---- parity grid -----------------------------------------------------------------------------

KINDS = ("padded", "unbatched", "packed_sorted", "packed_unsorted")


def _grid():
    """layers 1-3 x bidirectional x batch_first x bias, crossed in full with input kind x hx for
    float64; float32 gets a rotating slice of the structural options (same kinds/hx coverage)."""
    struct = list(itertools.product((1, 2, 3), (False, True), (False, True), (True, False)))
    cases = []
    for n, (kind, hx) in enumerate(itertools.product(KINDS, (False, True))):
        # fp64: each (kind, hx) pair gets a rotating third (8) of the 24 structural combinations,
        # so every combination meets 2-3 (kind, hx) pairs; fp32: 2 more per pair.
        for s in struct[(n % 3)::3]:
            cases.append((torch.float64, kind, hx) + s)
        for s in struct[(n * 5) % 24::11][:2]:
            cases.append((torch.float32, kind, hx) + s)
    return cases


def _case_id(c):
    dtype, kind, hx, layers, bidir, bf, bias = c
    return (f"{str(dtype)[6:]}-{kind}-{'hx' if hx else 'nohx'}-L{layers}-{'bi' if bidir else 'uni'}"
            f"-{'bf' if bf else 'tf'}-{'bias' if bias else 'nobias'}")


def _make_input(kind, batch_first, dtype):
    """Returns (leaf tensor, function building the module input from it)."""
    if kind == "unbatched":
        return torch.randn(T, I, dtype=dtype, requires_grad=True), lambda x: x
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    if kind == "padded":
        return x, lambda x: x
    lengths = LENGTHS_SORTED if kind == "packed_sorted" else LENGTHS_UNSORTED

    def build(x):
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=kind == "packed_sorted")
        assert (packed.sorted_indices is None) == (kind == "packed_sorted")
        return packed
    return x, build


@pytest.mark.parametrize("case", _grid(), ids=_case_id)
def test_gru_parity_with_torch(case):
    dtype, kind, give_hx, layers, bidir, batch_first, bias = case
    ref, ours = _pair(dtype, input_size=I, hidden_size=H, num_layers=layers, bias=bias,
                      batch_first=batch_first, bidirectional=bidir)
    x, build = _make_input(kind, batch_first, dtype)
    hx = None
    if give_hx:
        shape = (layers * (2 if bidir else 1),) + (() if kind == "unbatched" else (B,)) + (H,)
        hx = torch.randn(*shape, dtype=dtype, requires_grad=True)
    results = []
    weights = None
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        x.grad = None
        if hx is not None:
            hx.grad = None
        out, h_n = m(build(x), hx)
        if weights is None:
            weights = (torch.randn_like(_data(out)), torch.randn_like(h_n))
        loss = (_data(out) * weights[0]).sum() + (h_n * weights[1]).sum()
        loss.backward()
        grads = {"input": x.grad.clone()}
        if hx is not None:
            grads["hx"] = hx.grad.clone()
        grads.update({n: p.grad.clone() for n, p in m.named_parameters()})
        results.append((out, h_n, grads))
    (r_out, r_h, r_g), (o_out, o_h, o_g) = results
    assert type(o_out) is type(r_out)
    if isinstance(r_out, PackedSequence):
        assert torch.equal(o_out.batch_sizes, r_out.batch_sizes)
        for a, b in ((o_out.sorted_indices, r_out.sorted_indices),
                     (o_out.unsorted_indices, r_out.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
    assert _data(o_out).shape == _data(r_out).shape and o_h.shape == r_h.shape
    assert _data(o_out).dtype == dtype
    _close(_data(o_out), _data(r_out), dtype, what="output")
    _close(o_h, r_h, dtype, what="h_n")
    assert set(o_g) == set(r_g)
    assert len(r_g) == (2 if give_hx else 1) + layers * (2 if bidir else 1) * (4 if bias else 2)
    for name in r_g:
        _close(o_g[name], r_g[name], dtype, grad=True, what=f"grad {name}")


def test_gru_dropout_eval_mode_matches_torch():
    """Inter-layer dropout is off in eval mode: identical to torch.nn.GRU(dropout=...).eval()."""
    ref, ours = _pair(torch.float64, input_size=I, hidden_size=H, num_layers=2, dropout=0.5)
    ref.eval()
    ours.eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    _close(ours(x)[0], ref(x)[0], torch.float64, what="eval output")
    ours.train()
    assert not torch.allclose(ours(x)[0], ref(x)[0]), "dropout in training mode had no effect"


# ---- GRUCell ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("give_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_grucell_parity_with_torch(batched, give_hx, bias, dtype):
    ref = torch.nn.GRUCell(I, H, bias=bias, dtype=dtype)
    ours = timerec_fast.GRUCell(I, H, bias=bias, dtype=dtype)
    assert isinstance(ours, torch.nn.GRUCell)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((B, I) if batched else (I,)), dtype=dtype, requires_grad=True)
    hx = torch.randn(*((B, H) if batched else (H,)), dtype=dtype, requires_grad=True) \
        if give_hx else None
    results = []
    w = None
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        x.grad = None
        if hx is not None:
            hx.grad = None
        h = m(x, hx)
        w = torch.randn_like(h) if w is None else w
        (h * w).sum().backward()
        g = {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}}
        if hx is not None:
            g["hx"] = hx.grad.clone()
        results.append((h, g))
    (rh, rg), (oh, og) = results
    assert oh.shape == rh.shape == ((B, H) if batched else (H,))
    _close(oh, rh, dtype, what="h")
    assert set(og) == set(rg)
    for name in rg:
        _close(og[name], rg[name], dtype, grad=True, what=f"grad {name}")


def test_grucell_errors():
    cell = timerec_fast.GRUCell(I, H)
    with pytest.raises(RuntimeError, match=rf"expected {I}") as e:
        cell(torch.randn(B, I + 1))
    assert str(I + 1) in str(e.value)
    with pytest.raises(RuntimeError, match=rf"\({B}, {H}\).*\({B}, {H + 1}\)"):
        cell(torch.randn(B, I), torch.randn(B, H + 1))
    with pytest.raises((ValueError, RuntimeError), match="float64.*float32|float32.*float64"):
        cell(torch.randn(B, I, dtype=torch.float64))


# ---- the raw op: gradcheck, opcheck -----------------------------------------------------------

PACKED = [3, 3, 2, 1]


def _op_args(bias, reverse, dtype=torch.float64, requires_grad=True, batch_sizes=PACKED):
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])

    def t(*shape):
        return (torch.randn(*shape, dtype=dtype) * 0.7).requires_grad_(requires_grad)

    return [t(n, I), bs, t(b, H), t(3 * H, I), t(3 * H, H), t(3 * H) if bias else None,
            t(3 * H) if bias else None, reverse]


def _reference_gru_op(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """Row-by-row GRU over the packed layout, from the torch.nn.GRU equations (r, z, n)."""
    bs = [int(v) for v in batch_sizes]
    offsets = [sum(bs[:t]) for t in range(len(bs))]
    h = list(h0.unbind(0))
    out = [None] * input.shape[0]
    for t in (reversed(range(len(bs))) if reverse else range(len(bs))):
        for b in range(bs[t]):
            row = offsets[t] + b
            gi = w_ih @ input[row] + (b_ih if b_ih is not None else 0)
            gh = w_hh @ h[b] + (b_hh if b_hh is not None else 0)
            ir, iz, inn = gi.chunk(3)
            hr, hz, hn = gh.chunk(3)
            r = torch.sigmoid(ir + hr)
            z = torch.sigmoid(iz + hz)
            n = torch.tanh(inn + r * hn)
            h[b] = (1 - z) * n + z * h[b]
            out[row] = h[b]
    return torch.stack(out), torch.stack(h)


def _gradcheck_op(args):
    """fp64 gradcheck of (output, h_n) in every argument that requires grad."""
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*tensors):
        call = list(args)
        for i, tt in zip(idx, tensors):
            call[i] = tt
        return OP(*call)[:2]

    assert torch.autograd.gradcheck(fn, [args[i] for i in idx])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gru_op_matches_reference_and_gradcheck(reverse, bias):
    args = _op_args(bias, reverse)
    out, h_n, gates, hn = OP(*args)
    want_out, want_h = _reference_gru_op(*args)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_n, want_h, rtol=1e-10, atol=1e-12)
    assert not gates.requires_grad and not hn.requires_grad
    _gradcheck_op(args)


# >= 16 rows a step: the CPU forward makes the input projection inside its per-step tiles, with
# four gates [r, z, n_h, n_x] (csrc/cpu/gru_cpu.cpp); either bias alone changes their start values.
FUSED_BATCH_SIZES = [18, 17, 16]


@pytest.mark.parametrize("biases", ["both", "b_ih", "b_hh", "none"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gru_op_fused_input_rows(reverse, biases):
    args = _op_args(True, reverse, batch_sizes=FUSED_BATCH_SIZES)
    if biases in ("b_hh", "none"):
        args[5] = None
    if biases in ("b_ih", "none"):
        args[6] = None
    out, h_n, gates, hn = OP(*args)
    want_out, want_h = _reference_gru_op(*args)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_n, want_h, rtol=1e-10, atol=1e-12)
    _gradcheck_op(args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,give_hx",
                         [(1, False, False, True, False), (2, True, True, True, True),
                          (1, True, False, False, True), (2, False, True, False, False)])
def test_gru_fused_input_parity(dtype, layers, bidirectional, batch_first, bias, give_hx):
    # 32 rows a step at H = 32 (whole 16-unit chunks: the AVX-512 epilogue in fp32) and H = 40
    # (a partial chunk: the scalar one), against torch.nn.GRU in values and every gradient.
    for hidden in (32, 40):
        ref, ours = _pair(dtype, input_size=16, hidden_size=hidden, num_layers=layers,
                          bidirectional=bidirectional, batch_first=batch_first, bias=bias)
        x = torch.randn((32, 6, 16) if batch_first else (6, 32, 16), dtype=dtype,
                        requires_grad=True)
        hx = (torch.randn(layers * (2 if bidirectional else 1), 32, hidden, dtype=dtype,
                          requires_grad=True) if give_hx else None)
        got, want = ours(x, hx), ref(x, hx)
        for a, b, what in zip(got, want, ("output", "h_n")):
            _close(a, b, dtype, what=what)
        loss_terms = [(o[0] * torch.linspace(-1, 1, o[0].shape[-1], dtype=dtype)).sum() + o[1].sum()
                      for o in (got, want)]
        inputs = [x] + ([hx] if give_hx else [])
        grads = [torch.autograd.grad(loss, inputs + list(m.parameters()))
                 for loss, m in zip(loss_terms, (ours, ref))]
        for a, b in zip(*grads):
            _close(a, b, dtype, grad=True, what="gradient")


@pytest.mark.parametrize("sample", ["packed-bias-fwd", "packed-nobias-rev", "padded-f32-rev"])
def test_opcheck_gru_forward(sample):
    if sample == "packed-bias-fwd":
        args = _op_args(True, False)
    elif sample == "packed-nobias-rev":
        args = _op_args(False, True)
    else:
        args = _op_args(True, True, dtype=torch.float32, batch_sizes=[2, 2, 2])
    torch.library.opcheck(OP, tuple(args))


# gru_inference (what a module runs when nothing needs a gradient) must return exactly
# gru_forward's output and h_n on every CPU path: the per-step BLAS loop (few rows), the panel loop
# with the input projection beside it (12 rows a step) or inside the tiles (>= 16), and the
# unit split over threads (one sequence, H = 128). The panel loops skip writing gates and hn there.
INFERENCE_CASES = {  # name: (batch_sizes, input_size, hidden_size)
    "blas-packed": ([3, 3, 2, 1], I, H),
    "panels": ([12] * 4, 9, 40),
    "panels-fused-input": ([18, 17, 16], 9, 40),
    "panels-fused-input-h32": ([32, 32], 16, 32),
    "unit-split": ([1] * 5, 16, 128),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_gru_inference_op_matches_forward(threads, case, reverse, dtype):
    threads(2)
    batch_sizes, inputs, hidden = INFERENCE_CASES[case]
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])
    g = torch.Generator().manual_seed(5)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype) * 0.5

    args = (t(n, inputs), bs, t(b, hidden), t(3 * hidden, inputs), t(3 * hidden, hidden),
            t(3 * hidden), t(3 * hidden), reverse)
    full = OP(*args)
    inference = torch.ops.timerec_fast.gru_inference(*args)
    assert len(inference) == 2
    for got, want in zip(inference, full[:2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if dtype == torch.float64:
        for got, want in zip(inference, _reference_gru_op(*args)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_opcheck_gru_inference():
    args = _op_args(True, True, requires_grad=False, batch_sizes=[18, 17, 16])
    torch.library.opcheck(torch.ops.timerec_fast.gru_inference.default, tuple(args))


def test_gru_module_without_grad_runs_inference_op(ops_below_autograd):
    # Under no_grad the module takes gru_inference (nothing saved); with grad, gru_forward.
    ref, ours = _pair(torch.float64, input_size=I, hidden_size=H)
    x = torch.randn(T, 20, I, dtype=torch.float64)
    seen = ops_below_autograd
    with torch.no_grad():
        got = ours(x)
    assert seen == ["gru_inference"]
    ours(x)[0].sum()
    assert seen[1:] == ["gru_forward"]  # with grad: the op that saves for the backward
    want = ref(x)
    _close(got[0], want[0], torch.float64, what="output")
    _close(got[1], want[1], torch.float64, what="h_n")


# ---- torch.compile ----------------------------------------------------------------------------


class _GRUModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = timerec_fast.GRU(I, H, num_layers=2, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(2 * H, 2)

    def forward(self, x, h0):
        y, h = self.gru(x, h0)
        return self.head(y), h


def test_gru_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    try:
        model = _GRUModel()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        x = torch.randn(B, T, I)
        h0 = torch.randn(4, B, H)
        results = []
        weights = None
        for m in (model, compiled):
            model.zero_grad(set_to_none=True)
            xl = x.clone().requires_grad_()
            hl = h0.clone().requires_grad_()
            y, h = m(xl, hl)
            if weights is None:
                weights = (torch.randn_like(y), torch.randn_like(h))
            ((y * weights[0]).sum() + (h * weights[1]).sum()).backward()
            results.append([y.detach(), h.detach(), xl.grad, hl.grad]
                           + [p.grad.clone() for p in model.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


# ---- errors -----------------------------------------------------------------------------------


def test_gru_error_wrong_feature_size():
    m = timerec_fast.GRU(I, H)
    with pytest.raises(RuntimeError, match=rf"input_size.*Expected {I}, got {I + 2}"):
        m(torch.randn(T, B, I + 2))


@pytest.mark.parametrize("bad", ["layers", "batch", "hidden"])
def test_gru_error_wrong_hx_shape(bad):
    m = timerec_fast.GRU(I, H, num_layers=2)
    shape = {"layers": (1, B, H), "batch": (2, B + 1, H), "hidden": (2, B, H + 1)}[bad]
    with pytest.raises(RuntimeError) as e:
        m(torch.randn(T, B, I), torch.randn(*shape))
    msg = str(e.value).replace(" ", "")
    assert "(2,3,4)" in msg, msg  # expected
    assert str(list(shape)).replace(" ", "") in msg or str(shape).replace(" ", "") in msg, msg


def test_gru_error_hx_dim():
    m = timerec_fast.GRU(I, H)
    with pytest.raises(RuntimeError, match="3-D.*2-D"):
        m(torch.randn(T, B, I), torch.randn(B, H))


def test_gru_error_dtype_mismatch():
    m = timerec_fast.GRU(I, H)  # float32 weights
    with pytest.raises((ValueError, RuntimeError)) as e:
        m(torch.randn(T, B, I, dtype=torch.float64))
    assert "float32" in str(e.value) and "float64" in str(e.value), str(e.value)
    with pytest.raises(RuntimeError) as e:
        m(torch.randn(T, B, I), torch.randn(1, B, H, dtype=torch.float64))
    assert "float32" in str(e.value) and "float64" in str(e.value), str(e.value)


def test_gru_error_bad_input_dim():
    m = timerec_fast.GRU(I, H)
    with pytest.raises((ValueError, RuntimeError), match="2D or 3D.*4D"):
        m(torch.randn(1, T, B, I))


# ---- drop-in: type and state_dict -------------------------------------------------------------


def test_gru_type_and_state_dict_both_ways():
    kw = dict(input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    ours = timerec_fast.GRU(**kw, dtype=torch.float64)
    # timerec_fast.GRU derives from torch.nn.RNNBase in GRU mode, deliberately NOT from
    # torch.nn.GRU (torch.compile refuses torch.nn.GRU instances; see rnn.py).
    assert isinstance(ours, torch.nn.RNNBase) and ours.mode == "GRU"
    assert isinstance(timerec_fast.GRUCell(I, H), torch.nn.GRUCell)
    torch_gru = torch.nn.GRU(**kw, dtype=torch.float64)
    assert list(ours.state_dict()) == list(torch_gru.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    # torch -> ours
    ours.load_state_dict(torch_gru.state_dict(), strict=True)
    _close(ours(x)[0], torch_gru(x)[0], torch.float64, what="torch->ours")
    # ours -> torch (fresh modules; perturb ours so the copy is not a no-op)
    ours2 = timerec_fast.GRU(**kw, dtype=torch.float64)
    torch_gru2 = torch.nn.GRU(**kw, dtype=torch.float64)
    assert not torch.allclose(ours2(x)[0], torch_gru2(x)[0])
    torch_gru2.load_state_dict(ours2.state_dict(), strict=True)
    _close(torch_gru2(x)[0], ours2(x)[0], torch.float64, what="ours->torch")
    for k, v in ours2.state_dict().items():
        assert torch.equal(torch_gru2.state_dict()[k], v), k
