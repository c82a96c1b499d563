"""The CUDA LSTM ops (csrc/cuda/lstm_cuda.cu) against torch.nn.LSTM on CUDA, fp64 gradcheck,
opcheck, CUDA graphs, torch.compile, half/bf16 error budgets, large shapes, poisoned outputs and
autocast. Skipped without a GPU (or without a CUDA build of the extension).

Both forward strategies run where it matters: TIMEREC_LSTM_CUDA_PATH=cublas forces strategy (a),
=persistent forces the persistent kernel (b) wherever it can run the call (no projection), and the
default "auto" picks by shape.
"""
import copy
import itertools
import random
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import timerec_fast

HAS_CUDA_KERNEL = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "timerec_fast::lstm_forward", "CUDA")
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs a GPU and the CUDA build of timerec_fast"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
DEV = "cuda"
PATHS = ("cublas", "persistent")


@pytest.fixture(autouse=True)
def _strict_fp32():
    """fp32 references must not use TF32 (cuDNN allows it by default)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("TIMEREC_LSTM_CUDA_PATH", request.param)
    return request.param


def _pair(dtype=torch.float32, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.nn.LSTM(**kw).to(DEV, dtype)
        ours = timerec_fast.LSTM(**kw).to(DEV, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _data(x):
    return x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x


def _run(module, x_base, build, hx_base, weights=None):
    module.zero_grad(set_to_none=True)
    x = x_base.detach().clone().requires_grad_()
    hx = None if hx_base is None else tuple(t.detach().clone().requires_grad_() for t in hx_base)
    out, (h, c) = module(build(x) if build else x, hx)
    vals = [_data(out), h, c]
    if weights is None:
        weights = [torch.randn_like(v) for v in vals]
    sum((w * v).sum() for w, v in zip(weights, vals)).backward()
    grads = [x.grad] + ([] if hx is None else [t.grad for t in hx])
    grads += [p.grad for _, p in sorted(module.named_parameters())]
    return vals, grads, weights


def _compare(ref, ours, x, build, hx, rtol, atol):
    rv, rg, w = _run(ref, x, build, hx)
    ov, og, _ = _run(ours, x, build, hx, w)
    for name, a, b in zip(("output", "h_n", "c_n"), ov, rv):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    assert len(og) == len(rg)
    for i, (a, b) in enumerate(zip(og, rg)):
        torch.testing.assert_close(a, b, rtol=rtol * 5, atol=atol * 5,
                                   msg=lambda m: f"grad #{i}: {m}")


# ---- parity grid (as the CPU tests: layers, directions, layouts, bias, projection, hx) ----------

I, H, P, T, B = 4, 5, 3, 6, 4
KINDS = ("padded", "unbatched", "packed_sorted", "packed_unsorted")
GRID = list(itertools.product((1, 2), (False, True), (False, True), (True, False), (0, P), KINDS,
                              (False, True)))


def _inputs(kind, batch_first, dtype, num_layers, bidir, proj, hx_given):
    if kind == "unbatched":
        x, build = torch.randn(T, I, dtype=dtype, device=DEV), None
    else:
        x = torch.randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype, device=DEV)
        build = None
        if kind.startswith("packed"):
            lengths = torch.tensor([6, 5, 5, 2] if kind == "packed_sorted" else [2, 6, 1, 5])
            build = (lambda leaf: pack_padded_sequence(
                leaf, lengths, batch_first=batch_first, enforce_sorted=kind == "packed_sorted"))
    hx = None
    if hx_given:
        n = num_layers * (2 if bidir else 1)
        lead = (n,) if kind == "unbatched" else (n, B)
        hx = (torch.randn(*lead, proj or H, dtype=dtype, device=DEV),
              torch.randn(*lead, H, dtype=dtype, device=DEV))
    return x, build, hx


def _grid_id(c):
    layers, bidir, bf, bias, proj, kind, hxg = c
    return (f"L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-{'b' if bias else 'nb'}"
            f"-p{proj}-{kind}-{'hx' if hxg else 'nohx'}")


def _skip_duplicate(path, proj):
    if path == "persistent" and proj:
        pytest.skip("the persistent kernel does not take projections: same run as cublas")


def _grid_case(case, dtype, rtol, atol, path):
    layers, bidir, bf, bias, proj, kind, hxg = case
    _skip_duplicate(path, proj)
    ref, ours = _pair(dtype, input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir,
                      batch_first=bf, bias=bias, proj_size=proj)
    x, build, hx = _inputs(kind, bf, dtype, layers, bidir, proj, hxg)
    _compare(ref, ours, x, build, hx, rtol, atol)


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_parity_float64(case, path):
    _grid_case(case, torch.float64, 1e-9, 1e-11, path)


GRID_F32 = random.Random(3).sample(GRID, 32)


@pytest.mark.parametrize("case", GRID_F32, ids=_grid_id)
def test_parity_float32_cudnn(case, path):
    _grid_case(case, torch.float32, 2e-5, 2e-5, path)


# ---- raw ops: gradcheck, opcheck ---------------------------------------------------------------

def _op_args(batch_sizes, proj, bias=True, reverse=False, dtype=torch.float64, rg=True, h=4):
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    n, b = int(bs.sum()), int(bs[0])
    p = 2 if proj else h

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEV).requires_grad_(rg)

    return (t(n, 3), bs, t(b, p), t(b, h), t(4 * h, 3), t(4 * h, p), t(4 * h) if bias else None,
            t(4 * h) if bias else None, t(p, h) if proj else None, reverse)


OP_CASES = list(itertools.product(([3, 3, 2, 1], [2, 2, 2]), (False, True), (True, False),
                                  (False, True)))


@pytest.mark.parametrize("case", OP_CASES)
def test_gradcheck_float64(case, path):
    bs, proj, bias, reverse = case
    _skip_duplicate(path, proj)
    args = _op_args(bs, proj, bias, reverse)
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        return torch.ops.timerec_fast.lstm_forward(*full)[:3]

    assert torch.autograd.gradcheck(fn, [args[i] for i in idx])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj", [False, True])
def test_opcheck(dtype, proj, path):
    args = _op_args([3, 3, 2, 1], proj, reverse=True, dtype=dtype)
    torch.library.opcheck(torch.ops.timerec_fast.lstm_forward.default, args)
    nograd = _op_args([3, 3, 2, 1], proj, reverse=True, dtype=dtype, rg=False)
    out, h_n, c_n, gates, cells, hpre = torch.ops.timerec_fast.lstm_forward(*nograd)
    x, bs, h0, c0, w_ih, w_hh, _, _, w_hr, rev = nograd
    bargs = (torch.randn_like(out), torch.randn_like(h_n), None, x, bs, h0, c0, w_ih, w_hh, w_hr,
             out, gates, cells, hpre, rev, True)
    torch.library.opcheck(torch.ops.timerec_fast.lstm_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_cpu_and_cuda_ops_agree(path):
    """Same op, same fp64 arguments, CPU vs CUDA: every forward output (saved ones included)."""
    for args in (_op_args([3, 3, 2, 1], True, reverse=True, rg=False),
                 _op_args([3, 3, 2, 1], False, reverse=True, rg=False),
                 _op_args([2, 2, 2], False, rg=False)):
        cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
        got = torch.ops.timerec_fast.lstm_forward(*args)
        want = torch.ops.timerec_fast.lstm_forward(*cpu)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


# ---- CUDA graphs, torch.compile ------------------------------------------------------------------

@pytest.mark.parametrize("proj", [0, 3])
def test_cuda_graph_capture_and_replay(proj, path):
    torch.manual_seed(0)
    model = timerec_fast.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=proj).to(DEV)
    params = list(model.parameters())

    def loss_of(x):
        y, (h, c) = model(x)
        return y, h, c, y.square().sum() + h.sum() + c.sum()

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
        y, h, c, loss = loss_of(static_x)
        loss.backward()
    static_out = [y, h, c] + [p.grad for p in params]
    for _ in range(2):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in static_out]
        ey, eh, ec, eloss = loss_of(x)
        want = [ey, eh, ec] + list(torch.autograd.grad(eloss, params))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    if backend == "inductor":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    model = timerec_fast.LSTM(6, 12, num_layers=2, batch_first=True, proj_size=4).to(DEV)
    x = torch.randn(3, 9, 6, device=DEV)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    res = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        y, (h, c) = m(x)
        (y.sin().sum() + h.sum() + c.sum()).backward()
        res.append([y, h, c] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---- reduced precision: error against fp64 at most ~2x torch.nn.LSTM's own ----------------------

def _rel_err(a, ref):
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj", [0, 16])
def test_half_bf16_error_budget(dtype, proj, path):
    torch.manual_seed(1)
    kw = dict(input_size=64, hidden_size=64, num_layers=2, bidirectional=True, proj_size=proj)
    ref64, ours64 = _pair(torch.float64, **kw)
    models = {"ref64": ref64, "torch": copy.deepcopy(ref64).to(dtype),
              "ours": copy.deepcopy(ours64).to(dtype)}
    x = torch.randn(50, 16, 64, device=DEV, dtype=torch.float64)
    weights, results = None, {}
    for name, m in models.items():
        xl = x.to(m.weight_ih_l0.dtype).detach().requires_grad_()
        y, (h, c) = m(xl)
        if weights is None:
            weights = [torch.randn_like(t) for t in (y, h, c)]
        sum((w * t.double()).sum() for w, t in zip(weights, (y, h, c))).backward()
        results[name] = [y, h, c, xl.grad] + [p.grad for p in m.parameters()]
    for k, (ref, a, b) in enumerate(zip(results["ref64"], results["ours"], results["torch"])):
        assert a.dtype == b.dtype == dtype
        assert torch.isfinite(a).all(), f"tensor #{k} not finite"
        e_ours, e_torch = _rel_err(a, ref), _rel_err(b, ref)
        assert e_ours <= 2.0 * e_torch + 1e-4, f"tensor #{k}: ours {e_ours:.3g} vs torch {e_torch:.3g}"


# ---- large shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1000, 4, 32, 32), (20, 1024, 64, 64)], ids=["T1000", "B1024"])
def test_long_sequence_and_large_batch(shape, path):
    t, b, i, h = shape
    ref, ours = _pair(torch.float32, input_size=i, hidden_size=h)
    x = torch.randn(t, b, i, device=DEV)
    _compare(ref, ours, x, None, None, 1e-4, 1e-4)


def test_packed_long_uniform_lengths(path):
    lengths = torch.randint(1, 301, (64,))
    lengths[0] = 300
    ref, ours = _pair(torch.float32, input_size=32, hidden_size=32, bidirectional=True)
    x = torch.randn(300, 64, 32, device=DEV)
    _compare(ref, ours, x, lambda leaf: pack_padded_sequence(leaf, lengths, enforce_sorted=False),
             None, 1e-4, 1e-4)


# ---- poisoned buffers: every output element is written --------------------------------------------

def _poison_allocator(nbytes_list):
    """Fill blocks of the caching allocator with NaN and free them, so the op's next
    allocations of these sizes start from NaN."""
    blocks = [torch.full((n // 4 + 1,), float("nan"), device=DEV) for n in nbytes_list]
    del blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("bs", [[5, 5, 5, 5], [5, 4, 4, 2, 1]], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True])
def test_poisoned_outputs_are_fully_written(dtype, proj, bs, reverse, path):
    args = _op_args(bs, proj, reverse=reverse, dtype=dtype, rg=False, h=24)
    torch.use_deterministic_algorithms(True, warn_only=True)  # at::empty fills with NaN
    try:
        n = sum(bs)
        _poison_allocator([n * 4 * 24 * 8, n * 24 * 8, 5 * 24 * 8] * 3)
        outs = torch.ops.timerec_fast.lstm_forward(*args)
        out, h_n, c_n, gates, cells, hpre = outs
        for k, t in enumerate(outs):
            assert torch.isfinite(t).all(), f"forward output #{k} has unwritten (NaN) elements"
        x, b_s, h0, c0, w_ih, w_hh, _, _, w_hr, rev = args
        _poison_allocator([n * 4 * 24 * 8, n * 24 * 8] * 3)
        grads = torch.ops.timerec_fast.lstm_backward(
            torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, b_s, h0, c0,
            w_ih, w_hh, w_hr, out, gates, cells, hpre, rev, True)
        for k, t in enumerate(grads):
            assert torch.isfinite(t).all(), f"backward output #{k} has unwritten (NaN) elements"
    finally:
        torch.use_deterministic_algorithms(False)


# ---- autocast ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj", [0, 8])
def test_autocast_like_torch(dtype, proj, path):
    ref, ours = _pair(torch.float32, input_size=16, hidden_size=32, num_layers=2, proj_size=proj)
    x = torch.randn(10, 4, 16, device=DEV)
    lin = torch.nn.Linear(16, 16).to(DEV)
    res = []
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            y, (h, c) = m(lin(x))  # input arrives in the autocast dtype, weights are fp32
            loss = y.float().square().sum() + h.float().sum() + c.float().sum()
        loss.backward()
        res.append(([y, h, c], [p.grad for p in m.parameters()]))
    (rv, rg), (ov, og) = res
    tol = dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(ov, rv):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(og, rg):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    # fp32 input and hx given in fp32 (torch.nn.LSTM accepts it under autocast)
    hx = (torch.randn(2, 4, proj or 32, device=DEV), torch.randn(2, 4, 32, device=DEV))
    with torch.autocast("cuda", dtype=dtype):
        ry, _ = ref(x, hx)
        oy, _ = ours(x, hx)
    assert oy.dtype == ry.dtype
    torch.testing.assert_close(oy, ry, **tol)


def test_strategy_env_is_validated(monkeypatch):
    monkeypatch.setenv("TIMEREC_LSTM_CUDA_PATH", "bogus")
    with pytest.raises(RuntimeError, match="TIMEREC_LSTM_CUDA_PATH"):
        torch.ops.timerec_fast.lstm_forward(*_op_args([2, 2], False, rg=False))
