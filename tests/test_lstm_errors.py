"""Bad input raises ValueError/RuntimeError naming what was expected and what was given (issue
item 4), for timerec_fast.LSTM, timerec_fast.LSTMCell and the raw op."""
import re
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import timerec_fast

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

I, H, P = 4, 5, 3
T, B = 6, 3
F32, F64 = torch.float32, torch.float64


def shape(*dims):
    """Regex for a shape printed as (1, 3, 5), [1, 3, 5] or torch.Size([1, 3, 5])."""
    inner = r",\s*".join(str(d) for d in dims) + (r"\s*," if len(dims) == 1 else "") + r"?"
    return r"[\[(]\s*" + inner + r"\s*[\])]"


def num(n):
    return rf"(?<![\d.]){n}(?![\d.])"


def dtype_re(dt):
    short = str(dt).replace("torch.", "")
    alias = {"float32": "Float", "float64": "Double", "bfloat16": "BFloat16", "int32": "Int",
             "int64": "Long", "float16": "Half"}[short]
    return rf"(torch\.)?{short}|\b{alias}\b"


def raises(fn, fragments, exc=(ValueError, RuntimeError)):
    """fn() must raise one of exc, and its message must match every fragment (regex)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for frag in fragments:
        assert re.search(frag, msg), f"message {msg!r} does not mention {frag!r}"
    return msg


def lstm(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timerec_fast.LSTM(**{"input_size": I, "hidden_size": H, **kw})


def zeros_hx(n, batch, hout=H, hid=H, dtype=F32):
    return torch.zeros(n, batch, hout, dtype=dtype), torch.zeros(n, batch, hid, dtype=dtype)


# ---- input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "batch_first", "unbatched", "packed"])
def test_wrong_feature_size(layout):
    m = lstm(batch_first=layout == "batch_first")
    if layout == "unbatched":
        x = torch.randn(T, I + 1)
    elif layout == "packed":
        x = pack_sequence([torch.randn(3, I + 1), torch.randn(2, I + 1)])
    else:
        x = torch.randn(T, B, I + 1)
    raises(lambda: m(x), [num(I), num(I + 1)])


@pytest.mark.parametrize("rank", [1, 4])
def test_wrong_rank(rank):
    m = lstm()
    x = torch.randn(*((I,) if rank == 1 else (T, B, 2, I)))
    raises(lambda: m(x), [r"2-?D", r"3-?D", rf"{rank}-?D"])


def test_packed_data_wrong_rank():
    m = lstm()
    x = PackedSequence(torch.randn(5, 1, I), torch.tensor([3, 2]))
    raises(lambda: m(x), [num(2), num(3)])


@pytest.mark.parametrize("packed", [False, True])
def test_input_dtype_differs_from_parameters(packed):
    m = lstm()
    x = torch.randn(T, B, I, dtype=F64)
    if packed:
        x = pack_sequence([torch.randn(3, I, dtype=F64), torch.randn(2, I, dtype=F64)])
    raises(lambda: m(x), [dtype_re(F64), dtype_re(F32)])


def test_integer_input():
    m = lstm()
    raises(lambda: m(torch.ones(T, B, I, dtype=torch.int64)), [dtype_re(torch.int64),
                                                                dtype_re(F32)])


def test_bfloat16_works_or_names_the_dtype():
    """bfloat16 on the CPU: either supported (close to float32) or a clear error naming it."""
    m = lstm()
    x = torch.randn(T, B, I)
    ref, _ = m(x)
    mb = lstm()
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16)
    try:
        out, _ = mb(x.to(torch.bfloat16))
    except (ValueError, RuntimeError) as e:
        assert re.search(dtype_re(torch.bfloat16), str(e)), str(e)
        assert re.search(r"float32|float64|Float|Double", str(e)), str(e)
    else:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_zero_length_sequence():
    """torch.nn.LSTM rejects a (0, B, I) input ("Expected sequence length to be larger than 0"):
    it is a batch of empty sequences, which item 4 wants rejected."""
    m = lstm()
    with pytest.raises(RuntimeError, match="sequence length"):
        torch.nn.LSTM(I, H)(torch.randn(0, B, I))  # the behaviour we mirror
    raises(lambda: m(torch.randn(0, B, I)), [num(0), r"length|empty|step"])


def test_zero_batch_like_torch():
    """torch.nn.LSTM accepts an empty batch (B = 0) and returns empty outputs; a drop-in must too
    (e.g. the last shard of a distributed eval loop)."""
    ref = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)
    m = lstm(num_layers=2, bidirectional=True)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(T, 0, I)
    rout, (rh, rc) = ref(x)
    out, (h, c) = m(x)
    assert out.shape == rout.shape == (T, 0, 2 * H)
    assert h.shape == rh.shape and c.shape == rc.shape == (4, 0, H)


# ---- hx ----------------------------------------------------------------------------------------


def test_hx_wrong_hidden_size():
    m = lstm()
    x = torch.randn(T, B, I)
    raises(lambda: m(x, (torch.zeros(1, B, H - 1), torch.zeros(1, B, H))),
           [shape(1, B, H), shape(1, B, H - 1)])
    raises(lambda: m(x, (torch.zeros(1, B, H), torch.zeros(1, B, H + 2))),
           [shape(1, B, H), shape(1, B, H + 2)])


def test_hx_with_projection_expects_proj_size():
    m = lstm(proj_size=P)
    x = torch.randn(T, B, I)
    # A common mistake: h0 of hidden_size instead of proj_size.
    raises(lambda: m(x, zeros_hx(1, B, hout=H)), [shape(1, B, P), shape(1, B, H)])
    # ...and c0 of proj_size instead of hidden_size.
    raises(lambda: m(x, zeros_hx(1, B, hout=P, hid=P)), [shape(1, B, H), shape(1, B, P)])


def test_hx_wrong_batch():
    m = lstm()
    raises(lambda: m(torch.randn(T, B, I), zeros_hx(1, B - 1)), [shape(1, B, H),
                                                                shape(1, B - 1, H)])


@pytest.mark.parametrize("sorted_", [True, False])
def test_hx_wrong_batch_packed(sorted_):
    m = lstm()
    seqs = [torch.randn(n, I) for n in ((4, 3, 1) if sorted_ else (1, 4, 3))]
    x = pack_sequence(seqs, enforce_sorted=sorted_)
    raises(lambda: m(x, zeros_hx(1, 2)), [shape(1, 3, H), shape(1, 2, H)])


def test_hx_wrong_num_layers_or_directions():
    x = torch.randn(T, B, I)
    raises(lambda: lstm()(x, zeros_hx(2, B)), [shape(1, B, H), shape(2, B, H)])
    raises(lambda: lstm(num_layers=2, bidirectional=True)(x, zeros_hx(2, B)),
           [shape(4, B, H), shape(2, B, H)])


def test_hx_wrong_shape_unbatched():
    m = lstm()
    x = torch.randn(T, I)
    raises(lambda: m(x, (torch.zeros(1, H), torch.zeros(1, H - 1))),
           [num(H), num(H - 1)])


@pytest.mark.parametrize("batched", [True, False])
def test_hx_wrong_rank(batched):
    m = lstm()
    if batched:
        x, hx = torch.randn(T, B, I), (torch.zeros(B, H), torch.zeros(B, H))
        frags = [r"3-?D", r"2-?D"]
    else:
        x, hx = torch.randn(T, I), (torch.zeros(1, 1, H), torch.zeros(1, 1, H))
        frags = [r"2-?D", r"3-?D"]
    raises(lambda: m(x, hx), frags)


def test_hx_not_a_pair():
    """LSTM needs hx = (h_0, c_0); a bare tensor (GRU-style) must say so instead of reporting a
    bogus shape mismatch."""
    m = lstm()
    x = torch.randn(T, B, I)
    raises(lambda: m(x, torch.zeros(1, B, H)), [r"tuple|\(h_0, c_0\)|2 tensors|two"],
           exc=(ValueError, RuntimeError, TypeError))
    raises(lambda: m(x, (torch.zeros(1, B, H),)), [r"tuple|\(h_0, c_0\)|2 tensors|two"],
           exc=(ValueError, RuntimeError, TypeError))


@pytest.mark.parametrize("which", [0, 1])
def test_hx_wrong_dtype(which):
    m = lstm()
    hx = list(zeros_hx(1, B))
    hx[which] = hx[which].double()
    raises(lambda: m(torch.randn(T, B, I), tuple(hx)), [dtype_re(F64), dtype_re(F32)])


@pytest.mark.parametrize("which", [0, 1])
def test_hx_wrong_device(which):
    m = lstm()
    hx = list(zeros_hx(1, B))
    hx[which] = torch.zeros(1, B, H, device="meta")
    raises(lambda: m(torch.randn(T, B, I), tuple(hx)), [r"meta", r"cpu"])


# ---- PackedSequence ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_sizes", [[3, 0], [3, 2, 0], [0]])
def test_packed_empty_sequence(batch_sizes):
    m = lstm()
    n = sum(batch_sizes)
    x = PackedSequence(torch.randn(n, I), torch.tensor(batch_sizes))
    raises(lambda: m(x), [r"empty|positive|> ?0|at least one", num(0)])


def test_packed_batch_sizes_do_not_sum_to_rows():
    m = lstm()
    x = PackedSequence(torch.randn(7, I), torch.tensor([3, 2]))
    raises(lambda: m(x), [num(5), num(7)])


def test_packed_batch_sizes_increasing():
    m = lstm()
    x = PackedSequence(torch.randn(7, I), torch.tensor([2, 3, 2]))
    raises(lambda: m(x), [r"non-increasing|decreasing|sorted|order", num(2), num(3)])


def test_packed_batch_sizes_wrong_dtype():
    m = lstm()
    x = PackedSequence(torch.randn(5, I), torch.tensor([3, 2], dtype=torch.int32))
    raises(lambda: m(x), [dtype_re(torch.int64), dtype_re(torch.int32)])


# ---- LSTMCell ----------------------------------------------------------------------------------


def cell():
    return timerec_fast.LSTMCell(I, H)


@pytest.mark.parametrize("rank", [0, 3])
def test_cell_wrong_rank(rank):
    x = torch.tensor(1.0) if rank == 0 else torch.randn(2, B, I)
    raises(lambda: cell()(x), [r"1-?D", r"2-?D", rf"{rank}-?D"])


def test_cell_wrong_feature_size():
    raises(lambda: cell()(torch.randn(B, I + 2)), [num(I), num(I + 2)])
    raises(lambda: cell()(torch.randn(I + 2)), [num(I), num(I + 2)])


def test_cell_hx_wrong_batch():
    raises(lambda: cell()(torch.randn(B, I), (torch.zeros(B - 1, H), torch.zeros(B - 1, H))),
           [num(B), num(B - 1)])


def test_cell_hx_wrong_hidden_size():
    raises(lambda: cell()(torch.randn(B, I), (torch.zeros(B, H), torch.zeros(B, H - 1))),
           [num(H), num(H - 1)])


def test_cell_hx_rank_mismatch():
    raises(lambda: cell()(torch.randn(B, I), (torch.zeros(H), torch.zeros(H))), [num(B), num(H)])
    raises(lambda: cell()(torch.randn(I), (torch.zeros(1, H), torch.zeros(1, H))), [num(H)])
    raises(lambda: cell()(torch.randn(B, I), (torch.zeros(1, B, H), torch.zeros(1, B, H))),
           [r"3-?D"])


def test_cell_hx_not_a_pair():
    raises(lambda: cell()(torch.randn(B, I), (torch.zeros(B, H),)), [num(2), num(1)],
           exc=(ValueError, RuntimeError, TypeError))


def test_cell_input_dtype():
    raises(lambda: cell()(torch.randn(B, I, dtype=F64)), [dtype_re(F64), dtype_re(F32)])


def test_cell_hx_dtype_and_device():
    x = torch.randn(B, I)
    raises(lambda: cell()(x, (torch.zeros(B, H, dtype=F64), torch.zeros(B, H))),
           [dtype_re(F64), dtype_re(F32)])
    raises(lambda: cell()(x, (torch.zeros(B, H), torch.zeros(B, H, device="meta"))),
           [r"meta", r"cpu"])


def test_cell_zero_batch_like_torch():
    ref = torch.nn.LSTMCell(I, H)
    h, c = cell()(torch.randn(0, I))
    rh, rc = ref(torch.randn(0, I))
    assert h.shape == rh.shape == c.shape == rc.shape == (0, H)


# ---- the raw op ----------------------------------------------------------------------------------


def _op_args(**over):
    a = dict(input=torch.randn(5, I), batch_sizes=torch.tensor([3, 2]), h0=torch.zeros(3, H),
             c0=torch.zeros(3, H), w_ih=torch.randn(4 * H, I), w_hh=torch.randn(4 * H, H),
             b_ih=torch.randn(4 * H), b_hh=torch.randn(4 * H), w_hr=None, reverse=False)
    a.update(over)
    return a


def _op(a):
    return torch.ops.timerec_fast.lstm_forward(
        a["input"], a["batch_sizes"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
        a["b_hh"], a["w_hr"], a["reverse"])


OP_BAD = {
    "input_1d": (dict(input=torch.randn(5)), [r"2-D", shape(5)]),
    "w_ih_shape": (dict(w_ih=torch.randn(4 * H, I + 1)), [shape(4 * H, I), shape(4 * H, I + 1)]),
    "w_hh_shape": (dict(w_hh=torch.randn(4 * H, H + 1)), [shape(4 * H, H), shape(4 * H, H + 1)]),
    "b_ih_shape": (dict(b_ih=torch.randn(4 * H + 1)), [shape(4 * H), shape(4 * H + 1)]),
    "w_hr_shape": (dict(h0=torch.zeros(3, P), w_hh=torch.randn(4 * H, P),
                        w_hr=torch.randn(P, H + 1)), [shape(P, H), shape(P, H + 1)]),
    "h0_batch": (dict(h0=torch.zeros(2, H)), [num(2), num(3)]),
    "rows": (dict(input=torch.randn(6, I)), [num(5), num(6)]),
    "h0_dtype": (dict(h0=torch.zeros(3, H, dtype=F64)), [dtype_re(F64), dtype_re(F32)]),
    "bias_dtype": (dict(b_hh=torch.randn(4 * H, dtype=F64)), [dtype_re(F64), dtype_re(F32)]),
    "batch_sizes_int32": (dict(batch_sizes=torch.tensor([3, 2], dtype=torch.int32)),
                          [dtype_re(torch.int64), dtype_re(torch.int32)]),
    "batch_sizes_zero": (dict(input=torch.randn(3, I), batch_sizes=torch.tensor([3, 0])),
                         [num(0)]),
    "batch_sizes_increasing": (dict(batch_sizes=torch.tensor([2, 3]), h0=torch.zeros(2, H),
                                    c0=torch.zeros(2, H)), [num(2), num(3)]),
    "float16": ({k: v.half() for k, v in _op_args().items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point()},
                [r"float16|Half", r"float32|float64"]),
}


@pytest.mark.parametrize("case", OP_BAD)
def test_op_rejects_bad_arguments(case):
    over, frags = OP_BAD[case]
    raises(lambda: _op(_op_args(**over)), frags, exc=RuntimeError)


@pytest.mark.parametrize("op", ["lstm_forward", "lstm_inference", "gru_forward",
                                "gru_inference", "time_lstm_forward", "time_lstm_inference",
                                "tlstm_forward"])
def test_ops_refuse_rows_without_features(op):
    # The modules refuse input_size 0 as torch.nn does; the raw ops must too, not run their fused
    # kernels on an empty W_ih (16 rows a step: the CPU forwards' input-in-the-tiles path).
    H, B, T = 8, 16, 3
    x, bs = torch.randn(B * T, 0), torch.full((T,), B, dtype=torch.int64)
    h0, c0, dt = torch.randn(B, H), torch.randn(B, H), torch.rand(B * T)
    ops = torch.ops.timerec_fast
    calls = {
        "lstm_forward": lambda: ops.lstm_forward(x, bs, h0, c0, torch.randn(4 * H, 0),
                                                 torch.randn(4 * H, H), None, None, None, False),
        "lstm_inference": lambda: ops.lstm_inference(x, bs, h0, c0, torch.randn(4 * H, 0),
                                                     torch.randn(4 * H, H), None, None, None,
                                                     False),
        "gru_forward": lambda: ops.gru_forward(x, bs, h0, torch.randn(3 * H, 0),
                                               torch.randn(3 * H, H), None, None, False),
        "gru_inference": lambda: ops.gru_inference(x, bs, h0, torch.randn(3 * H, 0),
                                                   torch.randn(3 * H, H), None, None, False),
        "time_lstm_forward": lambda: ops.time_lstm_forward(
            x, dt, bs, h0, c0, torch.randn(5 * H, 0), torch.randn(3 * H, H), None,
            torch.randn(3, H), torch.randn(3, H), 3, False),
        "time_lstm_inference": lambda: ops.time_lstm_inference(
            x, dt, bs, h0, c0, torch.randn(5 * H, 0), torch.randn(3 * H, H), None,
            torch.randn(3, H), torch.randn(3, H), 3, False),
        "tlstm_forward": lambda: ops.tlstm_forward(x, dt, bs, h0, c0, torch.randn(4 * H, 0),
                                                   torch.randn(4 * H, H), None,
                                                   torch.randn(H, H), None, False),
    }
    with pytest.raises(RuntimeError, match=r"at least one feature per row \(input_size > 0\)"):
        calls[op]()
