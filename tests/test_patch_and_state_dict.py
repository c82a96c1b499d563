"""Drop-in compatibility with torch.nn.LSTM / LSTMCell: state_dict both ways, type, constructor,
initialisation, flatten_parameters, and patch_torch / unpatch_torch / patched_torch."""
import copy
import itertools
import pickle

import pytest
import torch
import torch.nn.modules.rnn as torch_rnn

import timerec_fast
from timerec_fast import patch as tf_patch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ORIG = {name: getattr(torch.nn, name) for name in ("LSTM", "LSTMCell", "GRU", "GRUCell", "RNN")}


@pytest.fixture(autouse=True)
def _restore_torch_nn():
    """Whatever a test does, torch.nn leaves it as it came (other test files rely on it)."""
    assert torch.nn.LSTM is ORIG["LSTM"], "torch.nn.LSTM was left patched by an earlier test"
    yield
    timerec_fast.unpatch_torch()
    for name, cls in ORIG.items():
        setattr(torch.nn, name, cls)
        setattr(torch_rnn, name, cls)


CONFIGS = [
    dict(num_layers=layers, bidirectional=bidir, proj_size=proj, bias=bias)
    for layers, bidir, proj, bias in itertools.product((1, 3), (False, True), (0, 3), (True, False))
]


def _cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def _check_same_forward(a, b, dtype=torch.float64):
    x = torch.randn(5, 2, 4, dtype=dtype)
    out_a, (h_a, c_a) = a(x)
    out_b, (h_b, c_b) = b(x)
    for u, v in ((out_a, out_b), (h_a, h_b), (c_a, c_b)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


# ---- state_dict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_state_dict_torch_to_ours(cfg):
    ref = torch.nn.LSTM(4, 5, dtype=torch.float64, **cfg)
    ours = timerec_fast.LSTM(4, 5, dtype=torch.float64, **cfg)
    sd = ref.state_dict()
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(sd)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    _check_same_forward(ref, ours)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_state_dict_ours_to_torch(cfg):
    ours = timerec_fast.LSTM(4, 5, dtype=torch.float64, **cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()  # not torch's init, so a no-op load could not pass
    ref = torch.nn.LSTM(4, 5, dtype=torch.float64, **cfg)
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    _check_same_forward(ref, ours)


def test_state_dict_through_torch_save(tmp_path):
    ours = timerec_fast.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=2)
    path = tmp_path / "lstm.pt"
    torch.save(ours.state_dict(), path)
    ref = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=2)
    ref.load_state_dict(torch.load(path, weights_only=True))
    _check_same_forward(ref.double(), ours.double())


def test_parameter_names_and_shapes_match_torch():
    for cfg in CONFIGS:
        ref = torch.nn.LSTM(4, 5, **cfg)
        ours = timerec_fast.LSTM(4, 5, **cfg)
        assert [(n, p.shape) for n, p in ref.named_parameters()] == \
               [(n, p.shape) for n, p in ours.named_parameters()]
    ref, ours = torch.nn.LSTMCell(4, 5), timerec_fast.LSTMCell(4, 5)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == \
           [(n, p.shape) for n, p in ours.named_parameters()]


def test_lstm_cell_state_dict_both_ways():
    ref = torch.nn.LSTMCell(4, 5, dtype=torch.float64)
    ours = timerec_fast.LSTMCell(4, 5, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    for u, v in zip(ours(x), ref(x)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    ref.load_state_dict(ours.state_dict())
    for u, v in zip(ours(x), ref(x)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


# ---- type, constructor, init ---------------------------------------------------------------------


def test_isinstance_torch_classes():
    # RNNBase like torch's, but deliberately not torch.nn.LSTM/GRU: torch.compile refuses every
    # torch.nn.LSTM/GRU instance, and fullgraph compilation must work (see test_lstm_ops).
    assert isinstance(timerec_fast.LSTM(4, 5), torch.nn.RNNBase)
    assert not isinstance(timerec_fast.LSTM(4, 5), torch.nn.LSTM)
    assert isinstance(timerec_fast.LSTMCell(4, 5), torch.nn.LSTMCell)


def test_constructor_positional_and_keyword_like_torch():
    # torch.nn.LSTM positional order: input_size, hidden_size, num_layers, bias, batch_first,
    # dropout, bidirectional, proj_size
    args = (4, 6, 2, False, True, 0.25, True, 3)
    ref, ours = torch.nn.LSTM(*args), timerec_fast.LSTM(*args)
    names = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
             "bidirectional", "proj_size", "mode")
    for name in names:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.batch_first and ours.bidirectional and ours.proj_size == 3 and not ours.bias
    m = timerec_fast.LSTM(input_size=4, hidden_size=6, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert repr(ours).replace("LSTM", "X") == repr(ref).replace("LSTM", "X")


@pytest.mark.parametrize("bad", [dict(proj_size=5), dict(proj_size=-1), dict(dropout=1.5),
                                 dict(hidden_size=0)])
def test_constructor_rejects_what_torch_rejects(bad):
    kw = {"input_size": 4, "hidden_size": 5, **bad}
    with pytest.raises(Exception) as ref_err:
        torch.nn.LSTM(**kw)
    with pytest.raises(type(ref_err.value)):
        timerec_fast.LSTM(**kw)


@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3)],
                         ids=["plain", "deep-bi-proj"])
def test_same_init_as_torch_given_seed(cfg):
    torch.manual_seed(123)
    ref = torch.nn.LSTM(4, 5, **cfg)
    torch.manual_seed(123)
    ours = timerec_fast.LSTM(4, 5, **cfg)
    for (n, p), (n2, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    torch.manual_seed(9)
    ref_cell = torch.nn.LSTMCell(4, 5)
    torch.manual_seed(9)
    our_cell = timerec_fast.LSTMCell(4, 5)
    for p, q in zip(ref_cell.parameters(), our_cell.parameters()):
        assert torch.equal(p, q)


def test_flatten_parameters_accepted():
    m = timerec_fast.LSTM(4, 5, num_layers=2, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.flatten_parameters() is None
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ref = torch.nn.LSTM(4, 5, num_layers=2, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    _check_same_forward(ref, m)


def test_deepcopy_pickle_and_dtype_conversion():
    m = timerec_fast.LSTM(4, 5, num_layers=2, bidirectional=True)
    clone = copy.deepcopy(m)
    assert type(clone) is timerec_fast.LSTM
    unpickled = pickle.loads(pickle.dumps(m))
    assert type(unpickled) is timerec_fast.LSTM
    m64 = m.double()
    _check_same_forward(m64, clone.double())
    _check_same_forward(m64, unpickled.double())


def test_parameter_updates_are_seen():
    """The fused forward reads the live parameters (no stale flattened copy)."""
    ref = torch.nn.LSTM(4, 5, dtype=torch.float64)
    ours = timerec_fast.LSTM(4, 5, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    _check_same_forward(ref, ours)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), ours.parameters()):
            p.mul_(1.7)
            q.mul_(1.7)
    _check_same_forward(ref, ours)


@pytest.mark.parametrize("cfg", [dict(num_layers=2, bidirectional=True),
                                 dict(proj_size=3, bias=False)], ids=_cfg_id)
def test_reassigned_parameters_are_seen(cfg):
    """The modules read weights through RNNBase's _flat_weights, as torch.nn.LSTM does: a
    parameter assigned anew (not updated in place) must be the one used."""
    ref = torch.nn.LSTM(4, 5, dtype=torch.float64, **cfg)
    ours = timerec_fast.LSTM(4, 5, dtype=torch.float64, **cfg)
    ours.load_state_dict(ref.state_dict())
    for name in ("weight_hh_l0", "weight_ih_l0_reverse" if cfg.get("bidirectional") else
                 "weight_hr_l0"):
        new = torch.nn.Parameter(torch.randn_like(getattr(ref, name)))
        setattr(ref, name, new)
        setattr(ours, name, torch.nn.Parameter(new.detach().clone()))
    _check_same_forward(ref, ours)
    gru_ref, gru = torch.nn.GRU(4, 5, dtype=torch.float64), timerec_fast.GRU(4, 5, dtype=torch.float64)
    gru.load_state_dict(gru_ref.state_dict())
    gru.bias_hh_l0 = torch.nn.Parameter(torch.randn(15, dtype=torch.float64))
    gru_ref.bias_hh_l0 = torch.nn.Parameter(gru.bias_hh_l0.detach().clone())
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(gru(x)[0], gru_ref(x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_functional_call_runs_the_given_weights(cell):
    """torch.func.functional_call swaps tensors into _parameters behind RNNBase.__setattr__: the
    module must run, and differentiate, those tensors as torch.nn does, not its own weights
    (tests/test_eager_autograd.py runs torch.func.grad over it)."""
    kwargs = dict(num_layers=2, proj_size=2) if cell == "LSTM" else dict(num_layers=2)
    torch.manual_seed(0)
    ours = getattr(timerec_fast, cell)(4, 6, **kwargs).double()
    ref = getattr(torch.nn, cell)(4, 6, **kwargs).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    params = {k: torch.randn_like(v) for k, v in ours.named_parameters()}

    def loss(module):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        out, states = torch.func.functional_call(module, p, (x,))
        states = states if isinstance(states, tuple) else (states,)
        (out.sin().sum() + sum(s.cos().sum() for s in states)).backward()
        return out, p

    out, p = loss(ours)
    out_ref, p_ref = loss(ref)
    torch.testing.assert_close(out, out_ref)
    for name in params:
        torch.testing.assert_close(p[name].grad, p_ref[name].grad)
    assert all(w.grad is None for w in ours.parameters())  # the module's own: untouched
    out_own, _ = ours(x)  # and the module runs its own weights again afterwards
    torch.testing.assert_close(out_own, torch.func.functional_call(
        ref, dict(ours.named_parameters()), (x,))[0])


# ---- patch_torch -----------------------------------------------------------------------------------


def test_patch_and_unpatch_swap_torch_nn():
    timerec_fast.patch_torch()
    assert torch.nn.LSTM is timerec_fast.LSTM
    assert torch.nn.LSTMCell is timerec_fast.LSTMCell
    assert torch_rnn.LSTM is timerec_fast.LSTM
    built = torch.nn.LSTM(4, 5, dtype=torch.float64)
    assert type(built) is timerec_fast.LSTM
    assert type(torch.nn.LSTMCell(4, 5)) is timerec_fast.LSTMCell
    timerec_fast.unpatch_torch()
    assert torch.nn.LSTM is ORIG["LSTM"] and torch_rnn.LSTM is ORIG["LSTM"]
    assert torch.nn.LSTMCell is ORIG["LSTMCell"]
    assert torch.nn.GRU is ORIG["GRU"] and torch.nn.RNN is ORIG["RNN"]
    assert type(torch.nn.LSTM(4, 5)) is ORIG["LSTM"]
    # A module built while patched still works after the undo and matches torch.
    ref = torch.nn.LSTM(4, 5, dtype=torch.float64)
    ref.load_state_dict(built.state_dict())
    _check_same_forward(ref, built)


def test_patch_is_idempotent():
    timerec_fast.patch_torch()
    timerec_fast.patch_torch()
    assert torch.nn.LSTM is timerec_fast.LSTM
    timerec_fast.unpatch_torch()
    assert torch.nn.LSTM is ORIG["LSTM"], "a double patch must not record the fused class as original"
    timerec_fast.unpatch_torch()  # undo without a patch is harmless
    assert torch.nn.LSTM is ORIG["LSTM"]


def test_patched_module_is_still_fused_and_correct():
    with timerec_fast.patched_torch():
        m = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3,
                          dtype=torch.float64)
        assert isinstance(m, torch.nn.LSTM)  # the patched name
    ref = ORIG["LSTM"](4, 5, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    assert type(m) is timerec_fast.LSTM and isinstance(m, torch.nn.RNNBase)
    _check_same_forward(ref, m)


def test_patched_torch_context_restores_on_exit_and_on_error():
    with timerec_fast.patched_torch():
        assert torch.nn.LSTM is timerec_fast.LSTM
    assert torch.nn.LSTM is ORIG["LSTM"] and torch_rnn.LSTM is ORIG["LSTM"]
    with pytest.raises(KeyError):
        with timerec_fast.patched_torch():
            assert torch.nn.LSTMCell is timerec_fast.LSTMCell
            raise KeyError("boom")
    assert torch.nn.LSTM is ORIG["LSTM"] and torch.nn.LSTMCell is ORIG["LSTMCell"]


def test_patched_torch_nested_and_inside_patch():
    timerec_fast.patch_torch()
    with timerec_fast.patched_torch():
        assert torch.nn.LSTM is timerec_fast.LSTM
    assert torch.nn.LSTM is timerec_fast.LSTM, "leaving the context must keep an outer patch"
    timerec_fast.unpatch_torch()
    assert torch.nn.LSTM is ORIG["LSTM"]
    with timerec_fast.patched_torch():
        with timerec_fast.patched_torch():
            pass
        assert torch.nn.LSTM is timerec_fast.LSTM, "inner context must not undo the outer one"
    assert torch.nn.LSTM is ORIG["LSTM"]


def test_subclass_defined_while_patched_uses_fused_forward():
    """Code that subclasses torch.nn.LSTM under the patch gets the fused module."""
    with timerec_fast.patched_torch():
        class MyLSTM(torch.nn.LSTM):
            pass
        m = MyLSTM(4, 5, dtype=torch.float64)
    assert isinstance(m, timerec_fast.LSTM)
    ref = ORIG["LSTM"](4, 5, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    _check_same_forward(ref, m)


def test_patch_module_reports_state():
    assert not tf_patch.is_patched()
    timerec_fast.patch_torch()
    assert tf_patch.is_patched()
    timerec_fast.unpatch_torch()
    assert not tf_patch.is_patched()
