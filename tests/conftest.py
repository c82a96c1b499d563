"""Shared fixtures of the test suite.

The LSTM tests get their helpers through the ``lstm_utils`` fixture (no ``from conftest import``,
so the suite works whether or not ``tests/`` becomes a package).
"""
import random
import types
import warnings

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import timerec_fast  # noqa: F401  (loads the extension and registers the ops)

# Per-dtype tolerances (as in torchvision's op tests): fp64 must agree to rounding, fp32 to a few
# ulps of the accumulated recurrence. Gradients run the recurrence twice and sum over all steps,
# so they get a slightly looser bound.
OUT_TOL = {torch.float64: dict(rtol=1e-8, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-8, atol=1e-10), torch.float32: dict(rtol=5e-5, atol=5e-5)}


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def threads():
    """Call with a thread count (the CPU paths depend on it); restored afterwards."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.fixture
def ops_below_autograd(monkeypatch):
    """The names of the ops the modules call below autograd (timerec_fast.ops._below_autograd),
    in order: which op a module chose (e.g. the inference op under no_grad)."""
    seen = []
    below = timerec_fast.ops._below_autograd

    def spy(op, args):
        seen.append(op._opname)
        return below(op, args)

    monkeypatch.setattr(timerec_fast.ops, "_below_autograd", spy)
    return seen


def _close(actual, expected, dtype, grad=False, msg=""):
    tol = (GRAD_TOL if grad else OUT_TOL)[dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{msg}: {m}" if msg else m)


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def _weighted_loss(out, h, c, weights):
    """A loss that weights every element with its own random factor (so gate or direction mix-ups
    cannot cancel in a plain sum)."""
    w_out, w_h, w_c = weights
    return (_data(out) * w_out).sum() + (h * w_h).sum() + (c * w_c).sum()


def _loss_weights(out, h, c):
    return tuple(torch.randn_like(t) for t in (_data(out), h, c))


def _pair(cls_kwargs, dtype):
    """A torch.nn.LSTM and a timerec_fast.LSTM holding the same parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with num_layers=1
        ref = torch.nn.LSTM(**cls_kwargs, dtype=dtype)
        ours = timerec_fast.LSTM(**cls_kwargs, dtype=dtype)
    assert type(ours) is timerec_fast.LSTM and type(ref) is not timerec_fast.LSTM
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads_of(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.fixture
def lstm_utils():
    return types.SimpleNamespace(
        OUT_TOL=OUT_TOL, GRAD_TOL=GRAD_TOL, close=_close, data=_data, weighted_loss=_weighted_loss,
        loss_weights=_loss_weights, pair=_pair, grads_of=_grads_of)
