"""Registers the TimeLSTM-vs-pure-PyTorch-reference pair with timerec_fast.bench.

The reference (tests/reference_cells.py) is the step-by-step implementation the tests check the
fused ops against; the benchmarks time the fused TimeLSTM against it at the same shapes.
"""
import os
import sys

import torch
from torch import nn

from timerec_fast import bench
from timerec_fast.time_lstm import TimeLSTM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference_cells import reference_time_lstm  # noqa: E402


class ReferenceTimeLSTM(nn.Module):
    """The pure-PyTorch step loop over a TimeLSTM's own parameters."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, delta_t):
        return reference_time_lstm(self.module, x, delta_t)


def time_lstm_vs_reference_pair(input_size, hidden_size, variant="time_lstm3"):
    torch.manual_seed(0)
    fused = TimeLSTM(input_size, hidden_size, variant=variant)
    ref_params = TimeLSTM(input_size, hidden_size, variant=variant)
    ref_params.load_state_dict(fused.state_dict())
    return fused, ReferenceTimeLSTM(ref_params)


bench.PAIRS["TimeLSTM/ref"] = (time_lstm_vs_reference_pair, bench.TIME_SHAPES, (True, True))
