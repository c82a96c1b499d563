"""Swap torch.nn's recurrent classes for the fused ones in code you cannot edit.

    import timerec_fast
    timerec_fast.patch_torch()      # torch.nn.LSTM(...) now builds timerec_fast.LSTM
    ...
    timerec_fast.unpatch_torch()    # restore torch.nn

or, scoped:

    with timerec_fast.patched_torch():
        model = build_model_that_uses_nn_LSTM()

Only modules constructed while patched are fused; existing instances are untouched. Code that did
``from torch.nn import LSTM`` before the patch keeps its own reference to torch's class.
"""
import contextlib

import torch.nn
import torch.nn.modules.rnn as _torch_rnn

_originals = {}


def _replacements():
    from . import rnn

    return {name: getattr(rnn, name) for name in ("LSTM", "LSTMCell", "GRU", "GRUCell")
            if hasattr(rnn, name)}


def patch_torch():
    """Make torch.nn.LSTM / LSTMCell (and GRU / GRUCell) build the fused modules. Idempotent."""
    for name, cls in _replacements().items():
        if name not in _originals:
            _originals[name] = getattr(torch.nn, name)
        setattr(torch.nn, name, cls)
        setattr(_torch_rnn, name, cls)


def unpatch_torch():
    """Undo :func:`patch_torch`."""
    for name, cls in list(_originals.items()):
        setattr(torch.nn, name, cls)
        setattr(_torch_rnn, name, cls)
        del _originals[name]


def is_patched():
    return bool(_originals)


@contextlib.contextmanager
def patched_torch():
    """Context manager form of :func:`patch_torch` / :func:`unpatch_torch`."""
    already = is_patched()
    patch_torch()
    try:
        yield
    finally:
        if not already:
            unpatch_torch()
