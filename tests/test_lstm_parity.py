"""Parity of timerec_fast.LSTM / LSTMCell with torch.nn.LSTM / LSTMCell: outputs, final states and
the gradients of the input, the initial state and every parameter."""
import itertools
import random
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import timerec_fast

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

I, H, P = 4, 5, 3  # input, hidden and projection sizes
T, B = 6, 4
LENGTHS_SORTED = [6, 5, 5, 2]
LENGTHS_UNSORTED = [2, 6, 1, 5]
KINDS = ("padded", "unbatched", "packed_sorted", "packed_unsorted")


def _make_input(kind, batch_first, dtype, scale=1.0):
    """Returns (base tensor, builder of the module input from a leaf copy of it, or None when the
    leaf itself is the input)."""
    if kind == "unbatched":
        return scale * torch.randn(T, I, dtype=dtype), None
    shape = (B, T, I) if batch_first else (T, B, I)
    x = scale * torch.randn(*shape, dtype=dtype)
    if kind == "padded":
        return x, None
    lengths = torch.tensor(LENGTHS_SORTED if kind == "packed_sorted" else LENGTHS_UNSORTED)
    return x, (lambda leaf: pack_padded_sequence(leaf, lengths, batch_first=batch_first,
                                                 enforce_sorted=kind == "packed_sorted"))


def _make_hx(kind, num_layers, bidirectional, proj_size, dtype, batch=B):
    n = num_layers * (2 if bidirectional else 1)
    hout = proj_size if proj_size > 0 else H
    lead = (n,) if kind == "unbatched" else (n, batch)
    return torch.randn(*lead, hout, dtype=dtype), torch.randn(*lead, H, dtype=dtype)


def _run(module, x_base, build, hx_base):
    """Forward on fresh leaves cloned from the base tensors."""
    x = x_base.detach().clone().requires_grad_()
    inp = build(x) if build is not None else x
    hx = None
    if hx_base is not None:
        hx = tuple(t.detach().clone().requires_grad_() for t in hx_base)
    module.zero_grad(set_to_none=True)
    out, (h, c) = module(inp, hx)
    return x, hx, out, h, c


def _compare(ref, ours, x_base, build, hx_base, dtype, u, check_grads=True):
    rx, rhx, rout, rh, rc = _run(ref, x_base, build, hx_base)
    ox, ohx, oout, oh, oc = _run(ours, x_base, build, hx_base)
    assert isinstance(oout, PackedSequence) == isinstance(rout, PackedSequence)
    if isinstance(rout, PackedSequence):
        assert torch.equal(oout.batch_sizes, rout.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            r, o = getattr(rout, name), getattr(oout, name)
            assert (r is None) == (o is None), name
            assert r is None or torch.equal(r, o), name
    u.close(u.data(oout), u.data(rout), dtype, msg="output")
    u.close(oh, rh, dtype, msg="h_n")
    u.close(oc, rc, dtype, msg="c_n")
    if not check_grads:
        return
    weights = u.loss_weights(rout, rh, rc)
    u.weighted_loss(rout, rh, rc, weights).backward()
    u.weighted_loss(oout, oh, oc, weights).backward()
    u.close(ox.grad, rx.grad, dtype, grad=True, msg="grad input")
    if rhx is not None:
        u.close(ohx[0].grad, rhx[0].grad, dtype, grad=True, msg="grad h0")
        u.close(ohx[1].grad, rhx[1].grad, dtype, grad=True, msg="grad c0")
    ref_grads, our_grads = u.grads_of(ref), u.grads_of(ours)
    assert set(ref_grads) == set(our_grads)
    for name, g in ref_grads.items():
        assert our_grads[name] is not None, f"no gradient for {name}"
        u.close(our_grads[name], g, dtype, grad=True, msg=f"grad {name}")


# ---- the grid ---------------------------------------------------------------------------------

GRID = list(itertools.product(
    (1, 2, 3),            # num_layers
    (False, True),        # bidirectional
    (False, True),        # batch_first
    (True, False),        # bias
    (0, P),               # proj_size
    KINDS,                # input kind
    (False, True),        # hx given
))


def _grid_id(case):
    layers, bidir, bf, bias, proj, kind, hx = case
    return (f"L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
            f"{'bias' if bias else 'nobias'}-p{proj}-{kind}-{'hx' if hx else 'nohx'}")


# float32: a fixed representative subset (every kind / proj / hx value still appears many times).
GRID_F32 = random.Random(1234).sample(GRID, 64)


def _grid_test(case, dtype, u):
    layers, bidir, bf, bias, proj, kind, hx_given = case
    ref, ours = u.pair(dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias,
                            batch_first=bf, bidirectional=bidir, proj_size=proj), dtype)
    x_base, build = _make_input(kind, bf, dtype)
    hx = _make_hx(kind, layers, bidir, proj, dtype) if hx_given else None
    _compare(ref, ours, x_base, build, hx, dtype, u)


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_lstm_parity_float64(case, lstm_utils):
    _grid_test(case, torch.float64, lstm_utils)


@pytest.mark.parametrize("case", GRID_F32, ids=_grid_id)
def test_lstm_parity_float32(case, lstm_utils):
    _grid_test(case, torch.float32, lstm_utils)


def test_float32_subset_covers_every_axis():
    for axis in range(len(GRID[0])):
        assert {c[axis] for c in GRID_F32} == {c[axis] for c in GRID}, axis


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("proj", [0, 24])
def test_lstm_parity_large_batch(dtype, proj, lstm_utils):
    """Big enough (B*4H > 16384) that the gate loops run in parallel over the batch."""
    ref, ours = lstm_utils.pair(dict(input_size=8, hidden_size=64, num_layers=2,
                                     bidirectional=True, proj_size=proj), dtype)
    x = torch.randn(3, 130, 8, dtype=dtype)
    hx = _make_hx("padded", 2, True, proj, dtype, batch=130) if proj else None
    if hx is not None:
        hx = (hx[0], torch.randn(4, 130, 64, dtype=dtype))
    lengths = torch.randint(1, 4, (130,))
    lengths[0] = 3
    _compare(ref, ours, x, None, hx, dtype, lstm_utils)
    _compare(ref, ours, x,
             lambda leaf: pack_padded_sequence(leaf, lengths, enforce_sorted=False), hx, dtype,
             lstm_utils)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("packed", [False, True])
def test_thread_count_does_not_change_results(packed, restore_threads, lstm_utils):
    """The batch is split into per-thread row blocks (balanced by sequence length); 1, 2 and 3
    threads must agree with each other and with torch."""
    dtype = torch.float64
    ref, ours = lstm_utils.pair(dict(input_size=I, hidden_size=H, num_layers=2,
                                     bidirectional=True, proj_size=P), dtype)
    batch = 37
    x = torch.randn(T, batch, I, dtype=dtype)
    hx = _make_hx("padded", 2, True, P, dtype, batch=batch)
    lengths = torch.randint(1, T + 1, (batch,))
    build = (lambda leaf: pack_padded_sequence(leaf, lengths, enforce_sorted=False)) \
        if packed else None
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        _compare(ref, ours, x, build, hx, dtype, lstm_utils)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lstm_parity_saturated_gates(dtype, lstm_utils):
    """Large pre-activations drive the sigmoids/tanh into saturation (exp over/underflow)."""
    ref, ours = lstm_utils.pair(dict(input_size=I, hidden_size=H, bidirectional=True), dtype)
    x_base, _ = _make_input("padded", False, dtype, scale=60.0)
    _compare(ref, ours, x_base, None, None, dtype, lstm_utils)


# ---- dropout ----------------------------------------------------------------------------------

DROP_KW = dict(input_size=I, hidden_size=H, num_layers=3, bidirectional=True, dropout=0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_eval_mode_is_exact_parity(dtype, lstm_utils):
    ref, ours = lstm_utils.pair(DROP_KW, dtype)
    ref.eval()
    ours.eval()
    x_base, _ = _make_input("padded", False, dtype)
    hx = _make_hx("padded", 3, True, 0, dtype)
    _compare(ref, ours, x_base, None, hx, dtype, lstm_utils)


def test_dropout_eval_equals_no_dropout():
    ours = timerec_fast.LSTM(**DROP_KW, dtype=torch.float64)
    plain = timerec_fast.LSTM(**{**DROP_KW, "dropout": 0.0}, dtype=torch.float64)
    plain.load_state_dict(ours.state_dict())
    ours.eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, (h, c) = ours(x)
    pout, (ph, pc) = plain(x)
    assert torch.equal(out, pout) and torch.equal(h, ph) and torch.equal(c, pc)


def test_dropout_train_mode_changes_outputs_and_stays_finite():
    ours = timerec_fast.LSTM(**DROP_KW, dtype=torch.float64)
    plain = timerec_fast.LSTM(**{**DROP_KW, "dropout": 0.0}, dtype=torch.float64)
    plain.load_state_dict(ours.state_dict())
    ours.train()
    plain.train()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    out, (h, c) = ours(x)
    pout, (ph, pc) = plain(x)
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    assert not torch.allclose(out, pout)
    # Dropout sits between layers: the first layer's final states are untouched.
    torch.testing.assert_close(h[:2], ph[:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c[:2], pc[:2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(h[2:], ph[2:])
    # Two training passes draw different masks.
    out2, _ = ours(x)
    assert not torch.equal(out, out2)
    (out.sum() + h.sum() + c.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_dropout_single_layer_is_a_no_op_in_training():
    """torch.nn.LSTM applies dropout only between layers: with one layer train == eval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = timerec_fast.LSTM(I, H, num_layers=1, dropout=0.7, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ours.train()
    a = ours(x)[0]
    ours.eval()
    b = ours(x)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_p1_training_parity(dtype, lstm_utils):
    """p=1 zeroes every inter-layer activation deterministically, so training-mode results
    (values and gradients) must match torch.nn.LSTM exactly: this pins where dropout is applied."""
    ref, ours = lstm_utils.pair({**DROP_KW, "dropout": 1.0}, dtype)
    ref.train()
    ours.train()
    x_base, _ = _make_input("padded", False, dtype)
    hx = _make_hx("padded", 3, True, 0, dtype)
    _compare(ref, ours, x_base, None, hx, dtype, lstm_utils)


def test_dropout_training_same_seed_matches_torch(lstm_utils):
    """With the same seed our inter-layer masks come out as torch's CPU LSTM draws them (same
    bernoulli stream over the same element order), which checks the 1/(1-p) scaling too.
    This leans on torch's CPU dropout drawing order; if a torch upgrade changes it, revisit."""
    dtype = torch.float64
    ref, ours = lstm_utils.pair({**DROP_KW, "dropout": 0.3}, dtype)
    ref.train()
    ours.train()
    x = torch.randn(T, B, I, dtype=dtype)
    torch.manual_seed(7)
    rout, (rh, rc) = ref(x)
    torch.manual_seed(7)
    oout, (oh, oc) = ours(x)
    lstm_utils.close(oout, rout, dtype)
    lstm_utils.close(oh, rh, dtype)
    lstm_utils.close(oc, rc, dtype)


# ---- LSTMCell ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [False, True])
def test_lstm_cell_parity(dtype, bias, batched, hx_given, lstm_utils):
    u = lstm_utils
    ref = torch.nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    ours = timerec_fast.LSTMCell(I, H, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    lead = (B,) if batched else ()
    x_base = torch.randn(*lead, I, dtype=dtype)
    hx_base = (torch.randn(*lead, H, dtype=dtype), torch.randn(*lead, H, dtype=dtype))
    results = []
    for m in (ref, ours):
        x = x_base.clone().requires_grad_()
        hx = tuple(t.clone().requires_grad_() for t in hx_base) if hx_given else None
        h, c = m(x, hx)
        results.append((m, x, hx, h, c))
    (_, rx, rhx, rh, rc), (_, ox, ohx, oh, oc) = results
    u.close(oh, rh, dtype, msg="h")
    u.close(oc, rc, dtype, msg="c")
    wh, wc = torch.randn_like(rh), torch.randn_like(rc)
    ((rh * wh).sum() + (rc * wc).sum()).backward()
    ((oh * wh).sum() + (oc * wc).sum()).backward()
    u.close(ox.grad, rx.grad, dtype, grad=True, msg="grad input")
    if hx_given:
        u.close(ohx[0].grad, rhx[0].grad, dtype, grad=True, msg="grad h0")
        u.close(ohx[1].grad, rhx[1].grad, dtype, grad=True, msg="grad c0")
    for (name, rp), (oname, op) in zip(ref.named_parameters(), ours.named_parameters()):
        assert name == oname
        u.close(op.grad, rp.grad, dtype, grad=True, msg=f"grad {name}")


def test_lstm_cell_steps_match_lstm_layer(lstm_utils):
    """Unrolling the cell step by step gives the sequence module's result."""
    seq = timerec_fast.LSTM(I, H, dtype=torch.float64)
    cell = timerec_fast.LSTMCell(I, H, dtype=torch.float64)
    cell.load_state_dict({k[:-3]: v for k, v in seq.state_dict().items()})
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, (hn, cn) = seq(x)
    h = c = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        h, c = cell(x[t], (h, c))
        lstm_utils.close(h, out[t], torch.float64)
    lstm_utils.close(h, hn[0], torch.float64)
    lstm_utils.close(c, cn[0], torch.float64)


# ---- layouts: non-contiguous, expanded, strided state -----------------------------------------


def _fwd_bwd(module, x_leaf, x_in, h_leaves, hx_in, weights=None, u=None):
    module.zero_grad(set_to_none=True)
    out, (h, c) = module(x_in, hx_in)
    if weights is None:
        weights = u.loss_weights(out, h, c)
    u.weighted_loss(out, h, c, weights).backward()
    grads = {"x": x_leaf.grad}
    if h_leaves is not None:
        grads.update(h0=h_leaves[0].grad, c0=h_leaves[1].grad)
    grads.update({n: p.grad.clone() for n, p in module.named_parameters()})
    return (out.detach(), h.detach(), c.detach()), grads, weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
def test_noncontiguous_input_and_state(dtype, batch_first, lstm_utils):
    """Transposed input and strided / transposed hx give the contiguous result (values, grads)."""
    u = lstm_utils
    ref, ours = u.pair(dict(input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                            proj_size=P, batch_first=batch_first), dtype)
    # The leaves are contiguous buffers; the module sees non-contiguous views of them.
    x_store = torch.randn(*((T, B, I) if batch_first else (B, T, I)), dtype=dtype)
    h_store = torch.randn(4, B, 2 * P, dtype=dtype)
    c_store = torch.randn(B, 4, H, dtype=dtype)

    xs = x_store.clone().requires_grad_()
    hs = (h_store.clone().requires_grad_(), c_store.clone().requires_grad_())
    x_view, hx_view = xs.transpose(0, 1), (hs[0][..., ::2], hs[1].transpose(0, 1))
    assert not x_view.is_contiguous()
    assert not hx_view[0].is_contiguous() and not hx_view[1].is_contiguous()
    s_vals, s_grads, w = _fwd_bwd(ours, xs, x_view, hs, hx_view, u=u)

    xc = x_view.detach().contiguous().requires_grad_()
    hc = tuple(t.detach().contiguous().requires_grad_() for t in hx_view)
    c_vals, c_grads, _ = _fwd_bwd(ours, xc, xc, hc, hc, weights=w, u=u)

    for a, b in zip(s_vals, c_vals):
        u.close(a, b, dtype)
    u.close(s_grads["x"].transpose(0, 1), c_grads["x"], dtype, grad=True, msg="grad x")
    u.close(s_grads["h0"][..., ::2], c_grads["h0"], dtype, grad=True, msg="grad h0")
    assert torch.count_nonzero(s_grads["h0"][..., 1::2]) == 0
    u.close(s_grads["c0"].transpose(0, 1), c_grads["c0"], dtype, grad=True, msg="grad c0")
    for name, _ in ours.named_parameters():
        u.close(s_grads[name], c_grads[name], dtype, grad=True, msg=name)
    # ...and torch's result on the contiguous copy.
    rout, (rh, rc) = ref(xc.detach(), tuple(t.detach() for t in hc))
    for a, b in zip(s_vals, (rout, rh, rc)):
        u.close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expanded_input_and_state(dtype, lstm_utils):
    """Stride-0 (expand) input and hx: same values and gradients as materialized copies."""
    u = lstm_utils
    ref, ours = u.pair(dict(input_size=I, hidden_size=H, num_layers=2, bidirectional=True), dtype)
    x_row = torch.randn(T, 1, I, dtype=dtype)   # one sequence broadcast over the batch
    h_row = torch.randn(4, 1, H, dtype=dtype)
    c_row = torch.randn(4, 1, H, dtype=dtype)

    xs = x_row.clone().requires_grad_()
    hs = (h_row.clone().requires_grad_(), c_row.clone().requires_grad_())
    x_in = xs.expand(T, B, I)
    hx_in = (hs[0].expand(4, B, H), hs[1].expand(4, B, H))
    assert x_in.stride(1) == 0 and hx_in[0].stride(1) == 0
    e_vals, e_grads, w = _fwd_bwd(ours, xs, x_in, hs, hx_in, u=u)

    xc = x_row.expand(T, B, I).contiguous().requires_grad_()
    hc = (h_row.expand(4, B, H).contiguous().requires_grad_(),
          c_row.expand(4, B, H).contiguous().requires_grad_())
    r_vals, r_grads, _ = _fwd_bwd(ref, xc, xc, hc, hc, weights=w, u=u)

    for a, b in zip(e_vals, r_vals):
        u.close(a, b, dtype)
    # Every batch row is the same sequence.
    assert torch.allclose(e_vals[0], e_vals[0][:, :1].expand_as(e_vals[0]))
    u.close(e_grads["x"], r_grads["x"].sum(1, keepdim=True), dtype, grad=True, msg="grad x")
    u.close(e_grads["h0"], r_grads["h0"].sum(1, keepdim=True), dtype, grad=True, msg="grad h0")
    u.close(e_grads["c0"], r_grads["c0"].sum(1, keepdim=True), dtype, grad=True, msg="grad c0")
    for name, _ in ours.named_parameters():
        u.close(e_grads[name], r_grads[name], dtype, grad=True, msg=name)


def test_noncontiguous_parameters(lstm_utils):
    """Weights stored transposed (column-major) give the same result as contiguous ones."""
    u = lstm_utils
    dtype = torch.float64
    ref, ours = u.pair(dict(input_size=I, hidden_size=H, num_layers=2, proj_size=P), dtype)
    with torch.no_grad():
        for name, p in list(ours.named_parameters()):
            if p.dim() == 2:
                setattr(ours, name, torch.nn.Parameter(p.detach().t().contiguous().t()))
                assert not getattr(ours, name).is_contiguous()
    x = torch.randn(T, B, I, dtype=dtype)
    _compare(ref, ours, x, None, None, dtype, u)


# ---- NaN --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("where", ["input", "h0", "c0"])
@pytest.mark.parametrize("proj", [0, P])
def test_nan_propagates_like_torch(dtype, where, proj, lstm_utils):
    """A NaN poisons exactly the outputs it poisons in torch.nn.LSTM, and nothing else moves."""
    u = lstm_utils
    ref, ours = u.pair(dict(input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                            proj_size=proj), dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    h0, c0 = _make_hx("padded", 2, True, proj, dtype)
    if where == "input":
        x[2, 1, 0] = float("nan")
    elif where == "h0":
        h0[1, 2, 0] = float("nan")   # backward direction of layer 0, batch row 2
    else:
        c0[0, 3, 1] = float("nan")   # forward direction of layer 0, batch row 3
    rout, (rh, rc) = ref(x, (h0, c0))
    oout, (oh, oc) = ours(x, (h0, c0))
    for name, o, r in (("output", oout, rout), ("h_n", oh, rh), ("c_n", oc, rc)):
        assert torch.isnan(r).any(), "test setup: torch should produce a NaN here"
        assert torch.equal(torch.isnan(o), torch.isnan(r)), f"NaN pattern of {name} differs"
        keep = ~torch.isnan(r)
        u.close(o[keep], r[keep], dtype, msg=name)
    # The NaN stays within its batch row.
    assert not torch.isnan(oout[:, 0]).any()


# ---- autograd modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_without_autograd(mode, lstm_utils):
    dtype = torch.float64
    ref, ours = lstm_utils.pair(dict(input_size=I, hidden_size=H, num_layers=2,
                                     bidirectional=True, proj_size=P), dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        oout, (oh, oc) = ours(x)
        rout, (rh, rc) = ref(x)
    assert not oout.requires_grad and not oh.requires_grad
    for a, b in ((oout, rout), (oh, rh), (oc, rc)):
        lstm_utils.close(a, b, dtype)


@pytest.mark.parametrize("cell, shape", [("LSTM", (7, 3, 5)), ("GRU", (7, 3, 5)),
                                         ("LSTMCell", (9, 5)), ("GRUCell", (9, 5))])
def test_training_after_inference_mode_at_the_same_shape(cell, shape):
    """A padded batch's batch_sizes tensor is kept per (T, B) across calls (a cell's per (1, B)):
    the one made under inference_mode must still serve a later training call (autograd refuses
    to save an inference tensor for backward). The shapes are ones no other test uses, so the
    first call here makes it."""
    ours = getattr(timerec_fast, cell)(shape[-1], 4)
    ref = getattr(torch.nn, cell)(shape[-1], 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    with torch.inference_mode():
        ours(x)
    for m in (ours, ref):
        result = m(x)
        (result[0] if isinstance(result, tuple) else result).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_eager_call_after_fake_tensor_mode_and_device_context():
    """A FakeTensorMode or default-device call at a new (T, B) must not leave a fake (or meta)
    batch_sizes tensor behind for the next eager call at that shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ours = timerec_fast.LSTM(5, 4)
    ref = torch.nn.LSTM(5, 4)
    ref.load_state_dict(ours.state_dict())
    for steps, make_context in ((11, lambda: FakeTensorMode(allow_non_fake_inputs=True)),
                                (13, lambda: torch.device("meta"))):
        x = torch.randn(steps, 3, 5)  # shapes no other test uses
        with make_context() as mode:
            arg = mode.from_tensor(x) if isinstance(mode, FakeTensorMode) else x
            assert ours(arg)[0].shape == (steps, 3, 4)
        torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_frozen_parameters_and_input_without_grad(lstm_utils):
    """Only some leaves require grad (fine-tuning): the rest get none, the others match torch."""
    dtype = torch.float64
    ref, ours = lstm_utils.pair(dict(input_size=I, hidden_size=H, num_layers=2,
                                     bidirectional=True, proj_size=P), dtype)
    frozen = {"weight_ih_l0", "bias_hh_l1_reverse", "weight_hr_l0", "bias_ih_l0"}
    grads = []
    x = torch.randn(T, B, I, dtype=dtype)  # no requires_grad
    h0, c0 = _make_hx("padded", 2, True, P, dtype)
    c0.requires_grad_()
    w = None
    for m in (ref, ours):
        for n, p in m.named_parameters():
            p.requires_grad_(n not in frozen)
        c0.grad = None
        out, (h, c) = m(x, (h0, c0))
        w = w or lstm_utils.loss_weights(out, h, c)
        lstm_utils.weighted_loss(out, h, c, w).backward()
        grads.append(({n: p.grad for n, p in m.named_parameters()}, c0.grad.clone()))
    (rg, rc0), (og, oc0) = grads
    lstm_utils.close(oc0, rc0, dtype, grad=True)
    for n in rg:
        if n in frozen:
            assert og[n] is None, n
        else:
            lstm_utils.close(og[n], rg[n], dtype, grad=True, msg=n)
