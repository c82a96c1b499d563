"""The CPU kernels' shape-dependent paths: batch split across threads, the small-batch GEMM and
the hidden-unit split for few rows. Each must agree with torch.nn (TimeLSTM: with the reference
of tests/reference_cells.py) exactly like the default path."""
import os
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import timerec_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_cells  # noqa: E402


def _pair(cls, ref_cls, dtype, **kw):
    torch.manual_seed(0)
    ref = ref_cls(**kw).to(dtype)
    ours = cls(**kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _check(ours, ref, x, tol):
    outs = [m(x) for m in (ours, ref)]
    flat = [[o[0]] + (list(o[1]) if isinstance(o[1], tuple) else [o[1]]) for o in outs]
    for a, b in zip(*flat):
        torch.testing.assert_close(a, b, **tol)
    w = torch.randn_like(flat[1][0])
    grads = [torch.autograd.grad((f[0] * w).sum() + f[1].sum(), [x] + list(m.parameters()))
             for f, m in zip(flat, (ours, ref))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_lstm_few_rows_hidden_split(threads, dtype, batch, num_threads):
    # H = 256 >= 128 per thread, padded input, no projection: the unit-split forward with 2 threads.
    threads(num_threads)
    ours, ref = _pair(timerec_fast.LSTM, torch.nn.LSTM, dtype, input_size=16, hidden_size=256,
                      num_layers=2, bidirectional=True)
    x = torch.randn(7, batch, 16, dtype=dtype, requires_grad=True)
    _check(ours, ref, x, TOL[dtype])


@pytest.mark.parametrize("cls,ref_cls", [(timerec_fast.LSTM, torch.nn.LSTM),
                                         (timerec_fast.GRU, torch.nn.GRU)])
@pytest.mark.parametrize("batch", [9, 40])
def test_batch_split_packed(threads, cls, ref_cls, batch):
    # Enough rows for one block per thread; unequal lengths make the blocks' work uneven.
    threads(2)
    ours, ref = _pair(cls, ref_cls, torch.float64, input_size=5, hidden_size=24,
                      bidirectional=True)
    seqs = [torch.randn(int(n), 5, dtype=torch.float64)
            for n in torch.randint(1, 12, (batch,))]
    x = pack_sequence(seqs, enforce_sorted=False)
    x.data.requires_grad_(True)
    outs = [m(x) for m in (ours, ref)]
    torch.testing.assert_close(outs[0][0].data, outs[1][0].data, **TOL[torch.float64])
    grads = [torch.autograd.grad(o[0].data.square().sum(), [x.data] + list(m.parameters()))
             for o, m in zip(outs, (ours, ref))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("cell", ["lstm", "lstm-proj", "gru"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_streamed_backward_over_several_chunks(threads, cell, packed, input_grad):
    # Two row blocks and a small dW: the LSTM and GRU backwards make dx and dW inside the BPTT
    # loop, GEMMs per chunk of rows (csrc/cpu/streamed_grads.h). About 20 rows a block per step
    # over 30 steps fill its 512 KB chunk buffer (182-341 fp64 rows here) two to four times, so
    # full chunks and a partial last one are summed, the first layer's and the second's
    # (I = 2H or 2P). Without an input gradient (the first layer of a model whose input needs
    # none) the per-step dx is skipped.
    threads(2)
    dtype = torch.float64
    kw = dict(input_size=16, hidden_size=40, num_layers=2, bidirectional=True)
    if cell == "gru":
        ours, ref = _pair(timerec_fast.GRU, torch.nn.GRU, dtype, **kw)
    else:
        ours, ref = _pair(timerec_fast.LSTM, torch.nn.LSTM, dtype,
                          proj_size=16 if cell == "lstm-proj" else 0, **kw)
    if packed:
        lengths = torch.randint(1, 31, (40,))
        lengths[0] = 30
        seqs = [torch.randn(int(n), 16, dtype=dtype) for n in lengths]
        x = pack_sequence(seqs, enforce_sorted=False)
        leaf = x.data
    else:
        x = leaf = torch.randn(30, 40, 16, dtype=dtype)
    leaf.requires_grad_(input_grad)
    outs = [m(x) for m in (ours, ref)]
    ys = [o[0].data if packed else o[0] for o in outs]
    torch.testing.assert_close(ys[0], ys[1], **TOL[dtype])
    w = torch.randn_like(ys[1])
    wrt = ([leaf] if input_grad else [])
    # The LSTM's c_n (o[1][1]) or the GRU's h_n (o[1]) feeds the loss too.
    last = [o[1][1] if cell != "gru" else o[1] for o in outs]
    grads = [torch.autograd.grad((y * w).sum() + c.sum(), wrt + list(m.parameters()))
             for y, c, m in zip(ys, last, (ours, ref))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


# ---- the fused panel kernels (csrc/cpu/gate_panels.h) -------------------------------------------
# Each case steers the LSTM (and GRU) forward to one path: the input projection inside the per-step tiles
# (>= 16 rows per step on average), split by batch rows or by hidden units (W_hh too big to share
# a core's cache), or the separate input GEMM for a few rows. H is never a multiple of the 16-lane
# chunk, so the partial last chunk is always exercised. TIMEREC_CPU_GEMM picks AVX-512 (the
# default where the CPU has it), AVX2, or the BLAS loop.
FUSED_CASES = {
    "fused-input": dict(batch=40, hidden=24, lengths=(9, 20)),
    # Panels of >= 1.1 MB (fp32): split by units on any core with up to 2 MB of L2 (the rule is W
    # >= half the core's L2 share, csrc/cpu/gate_panels.h).
    "unit-split": dict(batch=20, hidden=264, lengths=(3, 6)),
    "few-rows": dict(batch=3, hidden=40, lengths=(2, 9)),
    "gru-fused-min": dict(batch=9, hidden=40, lengths=(2, 9)),
    # A row or two per step but enough work per step to split by units over 2 threads (the GRU
    # takes the panels below 9 rows only then; the LSTM's threads first project the input onto
    # their own units, with the panel kernel instead of one BLAS GEMM).
    "few-rows-units": dict(batch=2, hidden=120, lengths=(2, 9)),
    # Split by batch rows with panels of 256-384 KB (the LSTM's in fp32): every thread packs a
    # share of the chunks before the loop.
    "batch-split-shared-pack": dict(batch=40, hidden=140, lengths=(3, 6)),
}


@pytest.mark.parametrize("gemm", ["", "avx2", "blas"])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cls,ref_cls", [(timerec_fast.LSTM, torch.nn.LSTM),
                                         (timerec_fast.GRU, torch.nn.GRU)])
def test_fused_paths(monkeypatch, threads, gemm, num_threads, dtype, case, cls, ref_cls):
    monkeypatch.setenv("TIMEREC_CPU_GEMM", gemm)
    threads(num_threads)
    c = FUSED_CASES[case]
    ours, ref = _pair(cls, ref_cls, dtype, input_size=8, hidden_size=c["hidden"],
                      bidirectional=True)
    lo, hi = c["lengths"]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randn(int(n), 8, dtype=dtype, generator=g)
            for n in torch.randint(lo, hi + 1, (c["batch"],), generator=g)]
    x = pack_sequence(seqs, enforce_sorted=False)
    tol = TOL[dtype]

    def flat(o):  # output data, h_n (and c_n)
        return (o[0].data,) + (tuple(o[1]) if isinstance(o[1], tuple) else (o[1],))

    with torch.no_grad():  # the LSTM's inference op: no gates kept
        for a, b in zip(flat(ours(x)), flat(ref(x))):
            torch.testing.assert_close(a, b, **tol)
    x.data.requires_grad_(True)
    outs = [flat(m(x)) for m in (ours, ref)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)
    grads = [torch.autograd.grad(o[0].square().sum() + o[-1].sum(),
                                 [x.data] + list(m.parameters())) for o, m in zip(outs, (ours, ref))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cls,ref_cls", [(timerec_fast.LSTM, torch.nn.LSTM),
                                         (timerec_fast.GRU, torch.nn.GRU)])
def test_more_threads_than_cpus(threads, cls, ref_cls):
    """torch.set_num_threads above the CPU count: the unit split caps its team at the CPUs in the
    affinity mask (a per-step barrier with a descheduled thread stalls every step); the results
    must not depend on the team size."""
    threads(2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2) + 1)
    ours, ref = _pair(cls, ref_cls, torch.float64, input_size=8, hidden_size=120)
    x = torch.randn(9, 2, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        for a, b in zip(ours(x)[:1], ref(x)[:1]):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    _check(ours, ref, x, TOL[torch.float64])


@pytest.mark.parametrize("batch", [1, 40])
@pytest.mark.parametrize("cls", [timerec_fast.LSTM, timerec_fast.GRU, timerec_fast.TimeLSTM])
def test_one_step_takes_blas(monkeypatch, threads, batch, cls):
    """A call of one step with at most 64 rows (a Cell call of that size) would pack W into panels
    for a single product: it takes the BLAS path (csrc/cpu/gate_panels.h, panel_isa_for), forward
    and backward, so its results
    equal the TIMEREC_CPU_GEMM=blas run bit for bit. Two steps of 40 rows run on the panels and
    differ in the last bits: the comparison can tell the paths apart."""
    threads(1)
    torch.manual_seed(0)
    m = cls(24, 40)

    def run(steps, gemm):
        monkeypatch.setenv("TIMEREC_CPU_GEMM", gemm)
        g = torch.Generator().manual_seed(steps)
        x = torch.randn(steps, batch, 24, generator=g).requires_grad_(True)
        args = (x, torch.rand(steps, batch, generator=g)) if cls is timerec_fast.TimeLSTM else (x,)
        out, _ = m(*args)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
        return [out.detach()] + list(grads)

    for a, b in zip(run(1, ""), run(1, "blas")):
        assert torch.equal(a, b)
    if batch == 40:
        assert not all(torch.equal(a, b) for a, b in zip(run(2, ""), run(2, "blas")))


@pytest.mark.parametrize("scale", [1.0, 60.0])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("cls,ref_cls", [(timerec_fast.LSTM, torch.nn.LSTM),
                                         (timerec_fast.GRU, torch.nn.GRU)])
def test_fused_gate_math_fp32(threads, scale, grad, cls, ref_cls):
    """The fp32 fused forward's gate math on whole 16-unit chunks (the AVX-512 epilogues of
    csrc/cpu/vec_activations.h where the CPU has it; H = 40 also leaves a partial chunk): ordinary
    and saturating pre-activations (|x| up to the hundreds), and a NaN that must poison exactly
    what it poisons in torch.nn."""
    threads(1)
    ours, ref = _pair(cls, ref_cls, torch.float32, input_size=8, hidden_size=40)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 12, 8, generator=g) * scale
    x[3, 5, 2] = float("nan")
    with torch.set_grad_enabled(grad):
        outs = [m(x) for m in (ours, ref)]

    def flat(o):
        return [o[0], *(o[1] if isinstance(o[1], tuple) else (o[1],))]

    for a, b in zip(flat(outs[0]), flat(outs[1])):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        keep = ~torch.isnan(b)
        assert keep.any()
        torch.testing.assert_close(a[keep], b[keep], **TOL[torch.float32])


def test_lstm_inference_op_matches_forward():
    torch.manual_seed(0)
    T, B, I, H = 6, 32, 7, 37
    x = torch.randn(T * B, I)
    args = (x, torch.full((T,), B, dtype=torch.long), torch.randn(B, H), torch.randn(B, H),
            torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H),
            None, False)
    full = torch.ops.timerec_fast.lstm_forward(*args)
    inf = torch.ops.timerec_fast.lstm_inference(*args)
    for a, b in zip(full[:3], inf):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.timerec_fast.lstm_inference.default, args)


# The forward's recurrent product for at most 8 rows a step (RecurrentWeight::for_forward in
# csrc/cpu/gate_panels.h): on W as stored (small_gemm_nt) for calls of up to 16 rows (batch 1 and 3
# here), on a W^T copy for longer ones (batch 8), panels or BLAS above 8 rows (batch 9). Cells: the
# GRU's small-batch loop, the LSTM with proj_size (W_hh and W_hr), the time cells. small_gemm_nt
# works in blocks of 16 (fp32) or 8 (fp64) lanes: H = 37 leaves ragged output blocks and a scalar k
# tail for both dtypes, H = 16 none, H = 5 no full vector at all. 1 thread keeps the GRU off panels.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [5, 16, 37])
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
@pytest.mark.parametrize("cell", ["gru", "lstm-proj", "time_lstm1", "tlstm"])
def test_recurrent_product_on_stored_weight(threads, dtype, hidden, batch, cell):
    threads(1)
    x = torch.randn(4, batch, 7, dtype=dtype, requires_grad=True)
    if cell == "gru":
        ours, ref = _pair(timerec_fast.GRU, torch.nn.GRU, dtype, input_size=7, hidden_size=hidden)
        _check(ours, ref, x, TOL[dtype])
    elif cell == "lstm-proj":
        ours, ref = _pair(timerec_fast.LSTM, torch.nn.LSTM, dtype, input_size=7, hidden_size=hidden,
                          proj_size=max(1, hidden - 2))
        _check(ours, ref, x, TOL[dtype])
    else:
        torch.manual_seed(0)
        m = timerec_fast.TimeLSTM(7, hidden, variant=cell, dtype=dtype)
        dt = torch.rand(4, batch, dtype=dtype) * 3
        got, want = m(x, dt), reference_cells.reference_time_lstm(m, x, dt)
        for a, b in zip((got[0],) + got[1], (want[0],) + want[1]):
            torch.testing.assert_close(a, b, **TOL[dtype])
        grads = [torch.autograd.grad(o[0].square().sum() + o[1][1].sum(), [x] + list(m.parameters()))
                 for o in (got, want)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, **TOL[dtype])


# ---- Time-LSTM ---------------------------------------------------------------------------------
# Time-LSTM forwards with at least 16 rows per step on average run fused on panels of
# [W_ih; W_hh] (every gate from x, the h gates from h as well; AVX-512 or, when asked, AVX2),
# split over threads by rows or, for panels past half a core's L2, by unit chunks. Fewer rows:
# one input GEMM, then per-step products on panels (more than 8 rows) or the small-GEMM kernel,
# and a pointwise pass. The backward always takes the second kind, and with the batch split over
# threads and a small dW makes dx and dW inside its loop (as the LSTM's). TIMEREC_CPU_GEMM=blas
# takes BLAS and the pointwise pass everywhere. Checked against the step-by-step reference of
# tests/reference_cells.py on packed unsorted input, delta_t included.
TIME_CASES = {
    "panel-rows": dict(batch=20, hidden=24, lengths=(3, 9)),
    "fused": dict(batch=40, hidden=24, lengths=(7, 9)),
    "fused-whole-chunks": dict(batch=40, hidden=32, lengths=(7, 9)),
    "fused-unit-split": dict(batch=40, hidden=264, lengths=(5, 6)),
    "few-rows": dict(batch=2, hidden=120, lengths=(2, 9)),
}


@pytest.mark.parametrize("gemm", ["", "avx2", "blas"])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", TIME_CASES)
@pytest.mark.parametrize("variant", ["time_lstm1", "time_lstm2", "time_lstm3"])
def test_time_lstm_paths(monkeypatch, threads, gemm, num_threads, dtype, case, variant):
    monkeypatch.setenv("TIMEREC_CPU_GEMM", gemm)
    threads(num_threads)
    c = TIME_CASES[case]
    torch.manual_seed(0)
    m = timerec_fast.TimeLSTM(6, c["hidden"], variant=variant, bidirectional=True, dtype=dtype)
    with torch.no_grad():  # larger weights so peepholes and time weights matter
        for p in m.parameters():
            p.mul_(2.0)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(c["lengths"][0], c["lengths"][1] + 1, (c["batch"],), generator=g)
    xs = [torch.randn(int(n), 6, dtype=dtype, generator=g) for n in lengths]
    dts = [torch.rand(int(n), dtype=dtype, generator=g) * 3 for n in lengths]
    x, dt = pack_sequence(xs, enforce_sorted=False), pack_sequence(dts, enforce_sorted=False)
    x.data.requires_grad_(True)
    dt.data.requires_grad_(True)
    tol = TOL[dtype]
    with torch.no_grad():
        got = m(x, dt)
        want = reference_cells.reference_time_lstm(m, x, dt)
    for a, b in zip((got[0].data,) + got[1], (want[0].data,) + want[1]):
        torch.testing.assert_close(a, b, **tol)
    leaves = [x.data, dt.data] + list(m.parameters())
    grads = []
    for fn in (m, lambda i, d: reference_cells.reference_time_lstm(m, i, d)):
        out, (h_n, c_n) = fn(x, dt)
        grads.append(torch.autograd.grad(out.data.square().sum() + h_n.sum() + c_n.sum(),
                                         leaves, allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("scale", [1.0, 40.0])
@pytest.mark.parametrize("variant", ["time_lstm1", "time_lstm2", "time_lstm3"])
def test_time_lstm_gate_math_fp32(threads, scale, variant):
    """The fp32 time cells' pointwise passes (forward and backward; on AVX-512 CPUs the 16-unit
    cells of csrc/cpu/vec_activations.h, H = 40 also leaving a partial chunk) against the
    reference in fp64: ordinary and saturating pre-activations, elapsed times from 0 to 1e4 (the
    inner sigmoids saturate both ways), and a NaN that poisons what it poisons in the reference."""
    threads(1)
    torch.manual_seed(0)
    m = timerec_fast.TimeLSTM(8, 40, variant=variant)
    m64 = timerec_fast.TimeLSTM(8, 40, variant=variant, dtype=torch.float64)
    m64.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 12, 8, generator=g) * scale
    dt = torch.rand(6, 12, generator=g) * 10.0
    dt[:, :4] = torch.logspace(-3, 4, 24).view(6, 4)
    x_nan = x.clone()
    x_nan[3, 5, 2] = float("nan")
    with torch.no_grad():
        got = m(x_nan, dt)
        want = reference_cells.reference_time_lstm(m64, x_nan.double(), dt.double())
    for a, b in zip((got[0],) + got[1], (want[0],) + want[1]):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        keep = ~torch.isnan(b)
        assert keep.any()
        torch.testing.assert_close(a[keep], b[keep].float(), **TOL[torch.float32])
    # Gradients of every input and parameter, without the NaN (it would reach them all).
    leaves = [x.requires_grad_(True), dt.requires_grad_(True)] + list(m.parameters())
    x64, dt64 = x.detach().double().requires_grad_(True), dt.detach().double().requires_grad_(True)
    leaves64 = [x64, dt64] + list(m64.parameters())
    w = torch.randn(6, 12, 40, generator=g)
    grads = []
    for model, xi, di, ls in ((m, x, dt, leaves), (reference_cells.reference_time_lstm, x64, dt64,
                                                   leaves64)):
        out, (h_n, c_n) = model(xi, di) if model is m else model(m64, xi, di)
        loss = (out * w.to(out.dtype)).sum() + h_n.sum() + c_n.sum()
        grads.append(torch.autograd.grad(loss, ls, allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [
    dict(num_layers=2, bidirectional=True, batch_first=True, bias=False, hx=True),
    dict(num_layers=1, bidirectional=False, batch_first=False, bias=True, hx=True),
    dict(num_layers=2, bidirectional=False, batch_first=False, bias=True, hx=False),
], ids=["L2-bi-bf-nobias-hx", "L1-uni-tf-bias-hx", "L2-uni-tf-bias-nohx"])
@pytest.mark.parametrize("variant", ["time_lstm1", "time_lstm2", "time_lstm3"])
def test_time_lstm_fused_options(threads, variant, cfg):
    """The fused Time-LSTM forward (20 rows a step) under the module options the small-batch
    grid of test_time_lstm.py runs unfused: layers, directions, batch_first, no bias, given
    initial states (their gradients included); fp64 against the reference."""
    threads(2)
    torch.manual_seed(0)
    layers, dirs = cfg["num_layers"], 2 if cfg["bidirectional"] else 1
    m = timerec_fast.TimeLSTM(5, 20, variant=variant, num_layers=layers,
                              bidirectional=cfg["bidirectional"], batch_first=cfg["batch_first"],
                              bias=cfg["bias"], dtype=torch.float64)
    shape = (20, 4) if cfg["batch_first"] else (4, 20)
    x = torch.randn(*shape, 5, dtype=torch.float64, requires_grad=True)
    dt = (torch.rand(*shape, dtype=torch.float64) * 3).requires_grad_(True)
    hx = None
    if cfg["hx"]:
        hx = tuple(torch.randn(layers * dirs, 20, 20, dtype=torch.float64, requires_grad=True)
                   for _ in range(2))
    leaves = [x, dt] + (list(hx) if hx else []) + list(m.parameters())
    results = []
    for fn in (m, lambda i, d, h: reference_cells.reference_time_lstm(m, i, d, h)):
        out, (h_n, c_n) = fn(x, dt, hx)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
            + h_n.square().sum() + c_n.sum()
        results.append((out, h_n, c_n) + torch.autograd.grad(loss, leaves, allow_unused=True))
    for a, b in zip(*results):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("variant", ["time_lstm1", "time_lstm2", "time_lstm3"])
def test_time_lstm_streamed_backward_over_several_chunks(threads, variant, input_grad):
    # As test_streamed_backward_over_several_chunks: two row blocks of about 20 rows a step
    # over 30 steps fill each block's chunk buffer (512 KB: 182-256 fp64 rows of G + I + H here)
    # two to three times; dW_ih and dW_hh (the h gates' columns) are summed over the chunks.
    threads(2)
    dtype = torch.float64
    torch.manual_seed(0)
    m = timerec_fast.TimeLSTM(16, 40, num_layers=2, variant=variant, bidirectional=True,
                              dtype=dtype)
    lengths = torch.randint(1, 31, (40,))
    lengths[0] = 30
    seqs = [torch.randn(int(n), 16, dtype=dtype) for n in lengths]
    dts = [torch.rand(int(n), dtype=dtype) * 3 for n in lengths]
    x = pack_sequence(seqs, enforce_sorted=False)
    dt = pack_sequence(dts, enforce_sorted=False)
    x.data.requires_grad_(input_grad)
    got, want = m(x, dt), reference_cells.reference_time_lstm(m, x, dt)
    torch.testing.assert_close(got[0].data, want[0].data, **TOL[dtype])
    wrt = ([x.data] if input_grad else []) + list(m.parameters())
    grads = [torch.autograd.grad(o[0].data.square().sum() + o[1][1].sum(), wrt)
             for o in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("gemm", ["", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [64, 128])
@pytest.mark.parametrize("cell", ["lstm", "gru", "time_lstm3"])
def test_backward_products_on_quarter_panels(monkeypatch, threads, gemm, dtype, hidden, cell):
    # Output widths that are a multiple of 4 vectors (here I = 64 and H = 64 or 128) make the
    # backward's per-step products dh = dG W_hh and dx = dG W_ih run on panels of four column
    # quarters (gate_panels.h, pack_kn_quarter_panels) instead of one-column-chunk panels: one or
    # two unit chunks of 16 (fp32 AVX-512) or 8 lanes (fp64, AVX2) per quarter.
    monkeypatch.setenv("TIMEREC_CPU_GEMM", gemm)
    threads(2)
    torch.manual_seed(0)
    x = torch.randn(6, 20, 64, dtype=dtype, requires_grad=True)
    if cell == "time_lstm3":
        m = timerec_fast.TimeLSTM(64, hidden, variant=cell, dtype=dtype)
        dt = torch.rand(6, 20, dtype=dtype) * 3
        got, want = m(x, dt), reference_cells.reference_time_lstm(m, x, dt)
        outs, params = (got[0], want[0]), [list(m.parameters())] * 2
    else:
        cls, ref_cls = ((timerec_fast.LSTM, torch.nn.LSTM) if cell == "lstm"
                        else (timerec_fast.GRU, torch.nn.GRU))
        ours, ref = _pair(cls, ref_cls, dtype, input_size=64, hidden_size=hidden)
        outs, params = (ours(x)[0], ref(x)[0]), [list(ours.parameters()), list(ref.parameters())]
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])
    w = torch.randn_like(outs[1])
    grads = [torch.autograd.grad((o * w).sum(), [x] + p) for o, p in zip(outs, params)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[dtype])
