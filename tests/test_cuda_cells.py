"""The CUDA GRU and time-aware LSTM ops (csrc/cuda/gru_cuda.cu, csrc/cuda/time_lstm_cuda.cu):
GRU against torch.nn.GRU on CUDA over a grid; TimeLSTM (time_lstm1/2/3, tlstm) on CUDA against the
same module's CPU ops (same inputs and weights; values and every gradient, delta_t included);
CPU-vs-CUDA agreement of the raw ops' every output (saved tensors and backward outputs included);
fp64 gradcheck on CUDA; opcheck; a CUDA graph capture of a GRU training step; half/bf16 error
budgets; autocast. Skipped without a GPU (or without a CUDA build of the extension).

Written on a machine without a GPU: these tests have not run yet (see scripts/gpu_check.sh).
"""
import copy
import itertools
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import timerec_fast

HAS_CUDA_KERNELS = torch.cuda.is_available() and all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"timerec_fast::{op}", "CUDA")
    for op in ("gru_forward", "gru_backward", "time_lstm_forward", "time_lstm_backward",
               "tlstm_forward", "tlstm_backward"))
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA build of timerec_fast"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
DEV = "cuda"
I, H, T, B = 3, 4, 5, 3
LENGTHS = {"packed_sorted": [5, 3, 2], "packed_unsorted": [2, 5, 3]}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-4)}
GRU_OP = torch.ops.timerec_fast.gru_forward
TL_OP = torch.ops.timerec_fast.time_lstm_forward
TT_OP = torch.ops.timerec_fast.tlstm_forward


@pytest.fixture(autouse=True)
def _strict_fp32():
    """fp32 references must not use TF32 (cuDNN allows it by default)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def _close(got, want, dtype, what):
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _x_and_build(kind, batch_first, dtype, device, with_dt=False):
    """Leaf x (and delta_t), plus a function building the module inputs from them."""
    if kind == "unbatched":
        x = torch.randn(T, I, dtype=dtype, device=device)
        dt = torch.rand(T, dtype=dtype, device=device) * 3
        return x, dt, lambda x, dt: (x, dt)
    shape = (B, T) if batch_first else (T, B)
    x = torch.randn(*shape, I, dtype=dtype, device=device)
    dt = torch.rand(*shape, dtype=dtype, device=device) * 3
    dt.view(-1)[::4] = 0.0
    if kind == "padded":
        return x, dt, lambda x, dt: (x, dt)
    lengths = torch.tensor(LENGTHS[kind])
    sort = kind == "packed_sorted"

    def build(x, dt):
        px = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sort)
        if dt is None:
            return px, None
        return px, pack_padded_sequence(dt, lengths, batch_first=batch_first, enforce_sorted=sort)
    return x, dt, build


# ---- GRU vs torch.nn.GRU on CUDA -----------------------------------------------------------------

# (num_layers, bidirectional, batch_first, bias, kind, hx given)
GRU_GRID = [c for c in itertools.product((1, 2), (False, True), (False, True), (True, False),
                                         ("padded", "packed_sorted", "packed_unsorted",
                                          "unbatched"), (False, True))
            if not (c[4] == "unbatched" and c[2])]


def _gid(c):
    layers, bidir, bf, bias, kind, hx = c
    return (f"L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
            f"{'bias' if bias else 'nobias'}-{kind}-{'hx' if hx else 'nohx'}")


def _gru_run(module, x_base, build, hx_base, weights=None):
    module.zero_grad(set_to_none=True)
    x = x_base.detach().clone().requires_grad_()
    hx = None if hx_base is None else hx_base.detach().clone().requires_grad_()
    out, h = module(build(x, None)[0], hx)
    vals = [_data(out), h]
    if weights is None:
        weights = [torch.randn_like(v) for v in vals]
    sum((w * v).sum() for w, v in zip(weights, vals)).backward()
    grads = [x.grad] + ([] if hx is None else [hx.grad])
    grads += [p.grad for _, p in sorted(module.named_parameters())]
    return vals, grads, weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRU_GRID, ids=_gid)
def test_gru_matches_torch_gru(case, dtype):
    layers, bidir, bf, bias, kind, give_hx = case
    torch.manual_seed(0)
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir,
              batch_first=bf, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.nn.GRU(**kw).to(DEV, dtype)
        ours = timerec_fast.GRU(**kw).to(DEV, dtype)
    ours.load_state_dict(ref.state_dict())
    x, _, build = _x_and_build(kind, bf, dtype, DEV)
    hx = None
    if give_hx:
        lead = layers * (2 if bidir else 1)
        hx = torch.randn(*((lead, H) if kind == "unbatched" else (lead, B, H)), dtype=dtype,
                         device=DEV)
    rv, rg, w = _gru_run(ref, x, build, hx)
    ov, og, _ = _gru_run(ours, x, build, hx, w)
    for name, a, b in zip(("output", "h_n"), ov, rv):
        _close(a, b, dtype, name)
    assert len(og) == len(rg)
    for i, (a, b) in enumerate(zip(og, rg)):
        _close(a, b, dtype, f"grad {i}")


# ---- TimeLSTM: CUDA vs the CPU ops ---------------------------------------------------------------

VARIANTS = ("time_lstm1", "time_lstm2", "time_lstm3", "tlstm")
# (num_layers, bidirectional, batch_first, bias, kind, hx given)
TL_CONFIGS = [
    (1, False, False, True, "padded", False),
    (2, True, False, True, "padded", True),
    (1, True, True, False, "packed_sorted", True),
    (2, True, False, True, "packed_unsorted", False),
    (1, True, True, True, "packed_unsorted", True),
    (2, True, False, False, "unbatched", True),
]


def _tl_run(m, device, x_base, dt_base, build, hx_base, weights):
    m.zero_grad(set_to_none=True)
    x = x_base.detach().to(device).requires_grad_()
    dt = dt_base.detach().to(device).requires_grad_()
    hx = None if hx_base is None else tuple(t.detach().to(device).requires_grad_() for t in hx_base)
    inp, d = build(x, dt)
    out, (h, c) = m(inp, d, hx)
    vals = [_data(out), h, c]
    sum((w.to(device) * v).sum() for w, v in zip(weights, vals)).backward()
    grads = {"input": x.grad, "delta_t": dt.grad}
    if hx is not None:
        grads.update(h0=hx[0].grad, c0=hx[1].grad)
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return vals, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", TL_CONFIGS, ids=_gid)
@pytest.mark.parametrize("variant", VARIANTS)
def test_time_lstm_cuda_matches_cpu(variant, cfg, dtype):
    layers, bidir, bf, bias, kind, give_hx = cfg
    torch.manual_seed(0)
    cpu = timerec_fast.TimeLSTM(I, H, num_layers=layers, bidirectional=bidir, batch_first=bf,
                                bias=bias, variant=variant, dtype=dtype)
    with torch.no_grad():
        for p in cpu.parameters():
            p.mul_(2.0)  # every term (peepholes, time weights, decay) matters
    gpu = copy.deepcopy(cpu).to(DEV)
    x, dt, build = _x_and_build(kind, bf, dtype, "cpu")
    hx = None
    if give_hx:
        lead = layers * (2 if bidir else 1)
        shape = (lead, H) if kind == "unbatched" else (lead, B, H)
        hx = (torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype))
    with torch.no_grad():
        inp, d = build(x, dt)
        probe = cpu(inp, d, hx)
    vals = [_data(probe[0]), probe[1][0], probe[1][1]]
    weights = [torch.randn_like(v) for v in vals]
    cv, cg = _tl_run(cpu, "cpu", x, dt, build, hx, weights)
    gv, gg = _tl_run(gpu, DEV, x, dt, build, hx, weights)
    for name, a, b in zip(("output", "h_n", "c_n"), gv, cv):
        assert a.device.type == DEV and a.dtype == b.dtype
        _close(a.cpu(), b, dtype, name)
    assert cg.keys() == gg.keys()
    for name in cg:
        _close(gg[name].cpu(), cg[name], dtype, f"grad {name}")


# ---- raw ops: CPU vs CUDA on every output, gradcheck, opcheck ------------------------------------

GATES = {1: (5, 4), 2: (6, 4), 3: (5, 3)}
PACKED = [3, 3, 2, 1]


def _t(*shape, dtype, rg, scale=0.8):
    return (torch.randn(*shape, dtype=dtype, device=DEV) * scale).requires_grad_(rg)


def _dt(n, dtype, rg):
    return (torch.rand(n, dtype=dtype, device=DEV) * 2 + 0.2).requires_grad_(rg)


def _gru_args(bs, bias=True, reverse=False, dtype=torch.float64, rg=True):
    bst = torch.tensor(bs, dtype=torch.int64)
    n, b = int(bst.sum()), int(bst[0])
    return [_t(n, I, dtype=dtype, rg=rg), bst, _t(b, H, dtype=dtype, rg=rg),
            _t(3 * H, I, dtype=dtype, rg=rg), _t(3 * H, H, dtype=dtype, rg=rg),
            _t(3 * H, dtype=dtype, rg=rg) if bias else None,
            _t(3 * H, dtype=dtype, rg=rg) if bias else None, reverse]


def _tl_args(variant, bs, bias=True, reverse=False, dtype=torch.float64, rg=True):
    bst = torch.tensor(bs, dtype=torch.int64)
    n, b = int(bst.sum()), int(bst[0])
    g, gh = GATES[variant]
    return [_t(n, I, dtype=dtype, rg=rg), _dt(n, dtype, rg), bst, _t(b, H, dtype=dtype, rg=rg),
            _t(b, H, dtype=dtype, rg=rg), _t(g * H, I, dtype=dtype, rg=rg),
            _t(gh * H, H, dtype=dtype, rg=rg), _t(g * H, dtype=dtype, rg=rg) if bias else None,
            _t(3, H, dtype=dtype, rg=rg), _t(3, H, dtype=dtype, rg=rg), variant, reverse]


def _tt_args(bs, bias=True, reverse=False, dtype=torch.float64, rg=True):
    bst = torch.tensor(bs, dtype=torch.int64)
    n, b = int(bst.sum()), int(bst[0])
    return [_t(n, I, dtype=dtype, rg=rg), _dt(n, dtype, rg), bst, _t(b, H, dtype=dtype, rg=rg),
            _t(b, H, dtype=dtype, rg=rg), _t(4 * H, I, dtype=dtype, rg=rg),
            _t(4 * H, H, dtype=dtype, rg=rg), _t(4 * H, dtype=dtype, rg=rg) if bias else None,
            _t(H, H, dtype=dtype, rg=rg), _t(H, dtype=dtype, rg=rg) if bias else None, reverse]


def _cpu(args):
    return [a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args]


def _gru_bwd_args(fwd_args, outs):
    x, bs, h0, w_ih, w_hh, _, _, rev = fwd_args
    out, h_n, gates, hn = outs
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    gh = torch.randn(h_n.shape, generator=g).to(out.device, out.dtype)
    return [gy, gh, x, bs, h0, w_ih, w_hh, out, gates, hn, rev, True]


def _tl_bwd_args(fwd_args, outs):
    x, dt, bs, h0, c0, w_ih, w_hh, _, peep, time_w, variant, rev = fwd_args
    out, h_n, c_n, gates, cells, cts = outs
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in (out, h_n, c_n)]
    return grads + [x, dt, bs, h0, c0, w_ih, w_hh, peep, time_w, out, gates, cells, cts, variant,
                    rev, True]


def _tt_bwd_args(fwd_args, outs):
    x, dt, bs, h0, c0, w_ih, w_hh, _, w_d, _, rev = fwd_args
    out, h_n, c_n, gates, cells, cs = outs
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in (out, h_n, c_n)]
    return grads + [x, dt, bs, h0, c0, w_ih, w_hh, w_d, out, gates, cells, cs, rev, True]


RAW = {
    "gru": (GRU_OP, torch.ops.timerec_fast.gru_backward, _gru_args, _gru_bwd_args),
    "tl1": (TL_OP, torch.ops.timerec_fast.time_lstm_backward,
            lambda *a, **k: _tl_args(1, *a, **k), _tl_bwd_args),
    "tl2": (TL_OP, torch.ops.timerec_fast.time_lstm_backward,
            lambda *a, **k: _tl_args(2, *a, **k), _tl_bwd_args),
    "tl3": (TL_OP, torch.ops.timerec_fast.time_lstm_backward,
            lambda *a, **k: _tl_args(3, *a, **k), _tl_bwd_args),
    "tlstm": (TT_OP, torch.ops.timerec_fast.tlstm_backward, _tt_args, _tt_bwd_args),
}
RAW_CASES = list(itertools.product(RAW, (PACKED, [2, 2, 2]), (False, True), (True, False)))


def _raw_id(c):
    cell, bs, reverse, bias = c
    return f"{cell}-{'packed' if bs == PACKED else 'padded'}-{'rev' if reverse else 'fwd'}-" \
           f"{'bias' if bias else 'nobias'}"


@pytest.mark.parametrize("case", RAW_CASES, ids=_raw_id)
def test_raw_ops_cpu_and_cuda_agree(case):
    """Same fp64 arguments, CPU vs CUDA: every forward output (saved tensors included, same layout)
    and every backward output."""
    cell, bs, reverse, bias = case
    fwd, bwd, make, make_bwd = RAW[cell]
    torch.manual_seed(0)
    args = make(bs, bias=bias, reverse=reverse, rg=False)
    got = fwd(*args)
    want = fwd(*_cpu(args))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=lambda m: f"out {i}: {m}")
    bargs = make_bwd(args, got)
    gb = bwd(*bargs)
    wb = bwd(*_cpu(bargs))
    for i, (a, b) in enumerate(zip(gb, wb)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-11,
                                   msg=lambda m: f"grad out {i}: {m}")


@pytest.mark.parametrize("case", [c for c in RAW_CASES if c[1] == PACKED], ids=_raw_id)
def test_gradcheck_float64_cuda(case):
    cell, bs, reverse, bias = case
    fwd, _, make, _ = RAW[cell]
    torch.manual_seed(0)
    args = make(bs, bias=bias, reverse=reverse)
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        outs = fwd(*full)
        return outs[:2] if cell == "gru" else outs[:3]

    assert torch.autograd.gradcheck(fn, [args[i] for i in idx])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("cell", list(RAW))
def test_opcheck(cell, dtype):
    fwd, bwd, make, make_bwd = RAW[cell]
    torch.manual_seed(0)
    args = make(PACKED, reverse=True, dtype=dtype)
    torch.library.opcheck(fwd.default, tuple(args))
    nograd = make(PACKED, reverse=True, dtype=dtype, rg=False)
    bargs = make_bwd(nograd, fwd(*nograd))
    torch.library.opcheck(bwd.default, tuple(bargs),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- half / bf16 -------------------------------------------------------------------------------

def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell", list(RAW))
def test_half_bf16_error_budget(cell, dtype):
    """Low-precision runs stay within a relative error budget of the fp64 run on the same
    (rounded) arguments: forward outputs and every backward output."""
    fwd, bwd, make, make_bwd = RAW[cell]
    torch.manual_seed(0)
    args = make([8, 8, 6, 5, 3], reverse=False, rg=False)
    low = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
           for a in args]
    ref64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
             for a in low]
    budget = 2e-2 if dtype == torch.float16 else 6e-2
    got, want = fwd(*low), fwd(*ref64)
    n_vals = 2 if cell == "gru" else 3
    for i in range(n_vals):
        assert got[i].dtype == dtype
        assert _rel_err(got[i], want[i]) < budget, (i, _rel_err(got[i], want[i]))
    gb = bwd(*make_bwd(low, got))
    wb = bwd(*make_bwd(ref64, want))
    for i, (a, b) in enumerate(zip(gb, wb)):
        assert a.dtype == dtype
        assert torch.isfinite(a).all(), i
        assert _rel_err(a, b) < 4 * budget, (i, _rel_err(a, b))


# ---- CUDA graphs, autocast ---------------------------------------------------------------------

def test_cuda_graph_capture_gru_training_step():
    torch.manual_seed(0)
    model = timerec_fast.GRU(8, 16, num_layers=2, bidirectional=True).to(DEV)
    params = list(model.parameters())

    def loss_of(x):
        y, h = model(x)
        return y, h, y.square().sum() + h.sum()

    static_x = torch.randn(7, 5, 8, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up (cuBLAS handles, workspaces, autograd) outside the capture
            model.zero_grad(set_to_none=True)
            loss_of(static_x)[-1].backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h, loss = loss_of(static_x)
        loss.backward()
    static_out = [y, h] + [p.grad for p in params]
    for _ in range(2):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in static_out]
        ey, eh, eloss = loss_of(x)
        want = [ey, eh] + list(torch.autograd.grad(eloss, params))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _with_saved(cell, bargs, outs):
    """Backward arguments with the forward's output and saved tensors replaced by `outs`."""
    b = list(bargs)
    pos = {"gru": 7, "tlstm": 11}.get(cell, 12)
    saved = [outs[0]] + list(outs[2:] if cell == "gru" else outs[3:])
    b[pos:pos + len(saved)] = saved
    return b


@pytest.mark.parametrize("cell", ["tl3", "tlstm"])
def test_cuda_graph_capture_time_ops(cell):
    """The raw forward and backward ops capture and replay (the TimeLSTM module's delta_t check
    syncs the host, so the capture goes through the ops)."""
    fwd, bwd, make, make_bwd = RAW[cell]
    torch.manual_seed(0)
    args = make(PACKED, rg=False, dtype=torch.float32)
    bargs = make_bwd(args, fwd(*args))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            bwd(*make_bwd(args, fwd(*args)))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fwd(*args)
        bouts = bwd(*_with_saved(cell, bargs, outs))
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    torch.cuda.synchronize()
    want = fwd(*args)
    for a, b in zip(outs, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(t).all() for t in bouts if t.numel())


INFERENCE = {"gru": (torch.ops.timerec_fast.gru_inference, 2),
             "tl1": (torch.ops.timerec_fast.time_lstm_inference, 3),
             "tl3": (torch.ops.timerec_fast.time_lstm_inference, 3)}


@pytest.mark.parametrize("bs", [PACKED, [2, 2, 2]], ids=["packed", "padded"])
@pytest.mark.parametrize("cell", INFERENCE)
def test_inference_ops_cuda_match_forward(cell, bs):
    """The inference ops (what the modules run without grad) return the forward op's outputs
    without the saved tensors, on the GPU, and agree with the CPU's."""
    fwd, _, make, _ = RAW[cell]
    op, count = INFERENCE[cell]
    torch.manual_seed(0)
    args = make(bs, rg=False)
    got = op(*args)
    assert len(got) == count
    for a, b in zip(got, fwd(*args)[:count]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got, op(*_cpu(args))):
        _close(a.cpu(), b, torch.float64, f"{cell} inference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_autocast(dtype):
    """GRU runs in the autocast dtype (like torch.nn.GRU); the time-aware ops run in fp32 (delta_t
    would overflow fp16), with fp32 gradients reaching the fp32 parameters either way."""
    torch.manual_seed(0)
    gru = timerec_fast.GRU(I, H).to(DEV)
    tl = timerec_fast.TimeLSTM(I, H, variant="time_lstm2").to(DEV)
    x = torch.randn(T, B, I, device=DEV)
    dt = torch.rand(T, B, device=DEV) * 1e5  # beyond fp16's range
    with torch.autocast("cuda", dtype=dtype):
        y, h = gru(x)
        yt, (ht, ct) = tl(x, dt)
    assert y.dtype == dtype and h.dtype == dtype
    assert yt.dtype == torch.float32 and torch.isfinite(yt).all()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):  # the inference ops
        assert gru(x)[0].dtype == dtype and tl(x, dt)[0].dtype == torch.float32
    (y.float().sum() + yt.sum()).backward()
    for p in list(gru.parameters()) + list(tl.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32
