"""timerec_fast: fused whole-sequence recurrent cells for PyTorch (drop-in LSTM, GRU) and
time-aware cells (TimeLSTM) for next-item recommendation."""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (loads the extension, registers autograd and fake kernels)
from .patch import patch_torch, patched_torch, unpatch_torch
from .rnn import GRU, LSTM, GRUCell, LSTMCell
from .time_lstm import TimeLSTM


def build_info():
    """The build facts (torch/CUDA built against and running, archs, CPU features, threads)."""
    from .info import build_info as _build_info

    return _build_info()


__all__ = ["LSTM", "LSTMCell", "GRU", "GRUCell", "TimeLSTM", "patch_torch", "unpatch_torch",
           "patched_torch", "ops", "build_info"]
