"""TimeLSTM: LSTMs that use the elapsed time of each step inside the cell, on fused ops."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import ops
from .rnn import _FusedRNNMixin, _suffix, _time_major_rows

_ZHU_VARIANTS = {"time_lstm1": 1, "time_lstm2": 2, "time_lstm3": 3}
VARIANTS = tuple(_ZHU_VARIANTS) + ("tlstm",)
# Gates computed from the input (rows of weight_ih) and from h (rows of weight_hh), per variant.
_GATES = {"time_lstm1": (5, 4), "time_lstm2": (6, 4), "time_lstm3": (5, 3), "tlstm": (4, 4)}


class TimeLSTM(_FusedRNNMixin, nn.Module):
    r"""Multi-layer time-aware LSTM. Each step carries the elapsed time ``delta_t`` since the
    previous event, which the cell uses through time gates (Time-LSTM) or a memory decay (T-LSTM).

    Args mirror :class:`torch.nn.LSTM` (no ``proj_size``), plus ``variant``:

    ``time_lstm1``, ``time_lstm2``, ``time_lstm3`` — Zhu et al., IJCAI 2017, "What to Do Next:
    Modeling User Behaviors by Time-LSTM". With :math:`c = c_{t-1}`, :math:`\Delta t` the step's
    elapsed time, :math:`a_\ast = x W_{\ast}^T + h_{t-1} U_{\ast}^T + b_\ast` (time gates have no
    :math:`h` term):

    .. math::
        i = \sigma(a_i + p_i \odot c),\quad f = \sigma(a_f + p_f \odot c),\quad g = \tanh(a_g)\\
        T_k = \sigma(a_{t_k} + \sigma(\Delta t\, w_{t_k}))\\
        \text{time\_lstm1: } c_t = \tilde c_t = f \odot c + i \odot T_1 \odot g\\
        \text{time\_lstm2: } \tilde c_t = f \odot c + i \odot T_1 \odot g,\quad
                             c_t = f \odot c + i \odot T_2 \odot g\\
        \text{time\_lstm3: } \tilde c_t = (1 - i \odot T_1) \odot c + i \odot T_1 \odot g,\quad
                             c_t = (1 - i) \odot c + i \odot T_2 \odot g\\
        o = \sigma(a_o + \Delta t\, w_o + p_o \odot \tilde c_t),\qquad h_t = o \odot \tanh(\tilde c_t)

    :math:`c_t` is carried to the next step; variants 2 and 3 constrain :math:`w_{t_1} \le 0` (a
    longer gap lets less of the current event into :math:`\tilde c_t`). The constraint holds by
    construction, :math:`w_{t_1} = -\mathrm{softplus}(\rho)` with :math:`\rho` the learned
    parameter ``time_gate1_raw_l{k}``, so it never clamps and the weight keeps learning.
    Variant 3 has no forget gate (coupled with the input gate), as in the paper.

    ``tlstm`` — Baytas et al., KDD 2017, "Patient Subtyping via Time-Aware LSTM Networks": before
    each step the short-term part of the memory is discounted by the elapsed time,

    .. math::
        c^S = \tanh(W_d c_{t-1} + b_d),\quad
        c^\ast = (c_{t-1} - c^S) + c^S\, g(\Delta t),\quad g(\Delta t) = 1/\log(e + \Delta t)

    then an ordinary LSTM step runs from :math:`c^\ast`.

    ``forward(input, delta_t, hx=None)`` returns ``(output, (h_n, c_n))`` like ``torch.nn.LSTM``.
    ``delta_t`` is shaped like the input without its feature dimension: (T, B), (B, T) with
    ``batch_first``, (T,) unbatched, or a PackedSequence packed like a packed input. It must be
    finite and non-negative (scale it as you like, e.g. log1p of seconds).

    Parameters, per layer ``k`` (suffix ``_reverse`` for the backward direction): ``weight_ih_l{k}``
    (G*H, in), ``weight_hh_l{k}`` (Gh*H, H), ``bias_l{k}`` (G*H) with G, Gh = 5, 4
    (time_lstm1: i, f, g, o, t), 6, 4 (time_lstm2: i, f, g, o, t1, t2), 5, 3 (time_lstm3: i, g,
    o, t1, t2), 4, 4 (tlstm: i, f, g, o); Time-LSTM: ``peephole_l{k}`` (3, H) = p_i, p_f, p_o
    ((2, H) = p_i, p_o for time_lstm3), ``time_gate1_weight_l{k}`` (H) for time_lstm1 or
    ``time_gate1_raw_l{k}`` + ``time_gate2_weight_l{k}`` (H each) for 2 and 3, and
    ``time_out_weight_l{k}`` (H) = w_o; T-LSTM: ``weight_decomp_l{k}`` (H, H), ``bias_decomp_l{k}``.
    """

    _cell_name = "TimeLSTM"
    _extra_name = "delta_t"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, variant="time_lstm3", device=None, dtype=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"TimeLSTM: variant must be one of {VARIANTS}, got {variant!r}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TimeLSTM: {name} must be a positive int, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
            raise ValueError(f"TimeLSTM: dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.variant = variant
        factory = dict(device=device, dtype=dtype)
        gates, h_gates = _GATES[variant]
        H = hidden_size
        num_directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else H * num_directions
            for direction in range(num_directions):
                sfx = _suffix(layer, direction)
                self.register_parameter("weight_ih" + sfx,
                                        nn.Parameter(torch.empty(gates * H, layer_in, **factory)))
                self.register_parameter("weight_hh" + sfx,
                                        nn.Parameter(torch.empty(h_gates * H, H, **factory)))
                if bias:
                    self.register_parameter("bias" + sfx,
                                            nn.Parameter(torch.empty(gates * H, **factory)))
                for name, shape in self._cell_params(H):
                    if name == "bias_decomp" and not bias:
                        continue
                    self.register_parameter(name + sfx,
                                            nn.Parameter(torch.empty(*shape, **factory)))
        self.reset_parameters()

    def _cell_params(self, H):
        if self.variant == "tlstm":
            return [("weight_decomp", (H, H)), ("bias_decomp", (H,))]
        if self.variant == "time_lstm1":
            return [("peephole", (3, H)), ("time_gate1_weight", (H,)), ("time_out_weight", (H,))]
        peep_rows = 2 if self.variant == "time_lstm3" else 3
        return [("peephole", (peep_rows, H)), ("time_gate1_raw", (H,)),
                ("time_gate2_weight", (H,)), ("time_out_weight", (H,))]

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, variant={self.variant!r}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    # ---- per-layer weights --------------------------------------------------------------------

    def time_gate1_weight(self, layer=0, direction=0):
        """w_t1 of a layer: a free parameter for time_lstm1, -softplus(raw) <= 0 for 2 and 3."""
        sfx = _suffix(layer, direction)
        if self.variant == "time_lstm1":
            return getattr(self, "time_gate1_weight" + sfx)
        return -F.softplus(getattr(self, "time_gate1_raw" + sfx))

    def _peep_and_time(self, sfx, layer, direction):
        peep = getattr(self, "peephole" + sfx)
        if self.variant == "time_lstm3":  # [p_i, p_o] -> [p_i, (unused p_f), p_o]
            peep = torch.stack([peep[0], torch.zeros_like(peep[0]), peep[1]])
        w_t1 = self.time_gate1_weight(layer, direction)
        w_o = getattr(self, "time_out_weight" + sfx)
        w_t2 = (torch.zeros_like(w_o) if self.variant == "time_lstm1"
                else getattr(self, "time_gate2_weight" + sfx))
        return peep, torch.stack([w_t1, w_t2, w_o])

    # ---- the stacking hooks -------------------------------------------------------------------

    def _state_sizes(self):
        return (self.hidden_size, self.hidden_size)

    def _check_args(self, x, hx, batch_sizes):
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype:
            raise ValueError(f"TimeLSTM: input dtype ({x.dtype}) does not match weight dtype "
                             f"({weight.dtype}). Convert input: input.to({weight.dtype}), or "
                             f"convert model: model.to({x.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if x.dim() != expected_dim:
            raise RuntimeError(f"TimeLSTM: input must have {expected_dim} dimensions, got {x.dim()}")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"TimeLSTM: input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {x.shape[-1]}")
        if hx is None:  # states made by the caller
            return
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = x.shape[0] if self.batch_first else x.shape[1]
        expected = (self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)
        for i, s in enumerate(hx):
            if tuple(s.shape) != expected:
                raise RuntimeError(f"TimeLSTM: Expected hidden[{i}] size {expected}, got "
                                   f"{tuple(s.shape)}")

    def _extra_rows(self, delta_t, x, batch_sizes, sorted_indices, is_batched):
        if delta_t is None:
            raise TypeError("TimeLSTM.forward: delta_t is required (the elapsed time of each step)")
        if isinstance(x, torch.Tensor) and batch_sizes is not None:  # packed input
            if not isinstance(delta_t, PackedSequence):
                raise ValueError("TimeLSTM: the input is a PackedSequence, so delta_t must be one "
                                 f"packed the same way; got {type(delta_t).__name__}")
            same = (torch.equal(delta_t.batch_sizes, batch_sizes)
                    and ((delta_t.sorted_indices is None) == (sorted_indices is None))
                    and (sorted_indices is None
                         or torch.equal(delta_t.sorted_indices, sorted_indices)))
            if not same:
                raise ValueError("TimeLSTM: delta_t must be packed like the input (same "
                                 f"batch_sizes and sorted_indices); got batch_sizes "
                                 f"{delta_t.batch_sizes.tolist()} for input batch_sizes "
                                 f"{batch_sizes.tolist()}")
            rows = delta_t.data
            expected = (x.shape[0],)
            if tuple(rows.shape) != expected:
                raise ValueError(f"TimeLSTM: packed delta_t data must have shape {expected} (one "
                                 f"value per packed input row), got {tuple(rows.shape)}")
        else:
            if isinstance(delta_t, PackedSequence) or not isinstance(delta_t, torch.Tensor):
                raise ValueError("TimeLSTM: delta_t must be a tensor shaped like the input without "
                                 f"its feature dimension, got {type(delta_t).__name__}")
            expected = tuple(x.shape[:-1]) if is_batched else (x.shape[1 if self.batch_first else 0],)
            if tuple(delta_t.shape) != expected:
                in_shape = tuple(x.shape) if is_batched else tuple(x.squeeze(
                    0 if self.batch_first else 1).shape)
                raise ValueError(f"TimeLSTM: delta_t must have shape {expected} for an input of "
                                 f"shape {in_shape}, got {tuple(delta_t.shape)}")
            if not is_batched:
                delta_t = delta_t.unsqueeze(0 if self.batch_first else 1)
            rows = _time_major_rows(delta_t, self.batch_first)
        if not (rows.is_floating_point() or rows.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"TimeLSTM: delta_t must be a real-valued tensor, got {rows.dtype}")
        if rows.device != x.device:
            raise RuntimeError(f"TimeLSTM: delta_t must be on {x.device} like the input, got "
                               f"{rows.device}")
        # Under CUDA autocast the op runs in fp32 (gaps in seconds overflow fp16), so keep fp32.
        autocast = x.is_cuda and torch.is_autocast_enabled()
        rows = rows.to(torch.float32 if autocast and x.dtype != torch.float64 else x.dtype)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing:  # the check syncs the device
            bad = ~(rows >= 0) | ~torch.isfinite(rows)
            if bool(bad.any()):
                idx = int(bad.nonzero()[0, 0])
                raise ValueError(f"TimeLSTM: delta_t must be finite and >= 0; found "
                                 f"{rows[idx].item()} ({int(bad.sum())} bad values)")
        return rows.contiguous()

    def _layer(self, x, batch_sizes, states, layer, direction, delta_t):
        sfx = _suffix(layer, direction)
        w_ih = getattr(self, "weight_ih" + sfx)
        w_hh = getattr(self, "weight_hh" + sfx)
        bias = getattr(self, "bias" + sfx) if self.bias else None
        reverse = direction == 1
        if self.variant == "tlstm":
            b_d = getattr(self, "bias_decomp" + sfx) if self.bias else None
            out, h, c = ops.tlstm_layer(x, delta_t, batch_sizes, states[0], states[1], w_ih, w_hh,
                                        bias, getattr(self, "weight_decomp" + sfx), b_d, reverse)
        else:
            peep, time_w = self._peep_and_time(sfx, layer, direction)
            out, h, c = ops.time_lstm_layer(x, delta_t, batch_sizes, states[0], states[1], w_ih,
                                            w_hh, bias, peep, time_w,
                                            _ZHU_VARIANTS[self.variant], reverse)
        return out, (h, c)

    def forward(self, input, delta_t, hx=None):
        return self._fused_forward(input, hx, delta_t)

    @torch.no_grad()
    def time_gate_activations(self, input, delta_t):
        """How much each event's information is let into / kept in the memory, per hidden unit, in
        layer 0 (forward direction): the time gate that feeds the carried cell (T for
        time_lstm1, T2 for time_lstm2/3) or the T-LSTM decay g(dt) broadcast over units. Returns a
        tensor shaped like ``delta_t`` plus a last dimension ``hidden_size``, values in (0, 1]."""
        dt = delta_t.data if isinstance(delta_t, PackedSequence) else delta_t
        dt = dt.to(self.weight_ih_l0.dtype)
        H = self.hidden_size
        if self.variant == "tlstm":
            decay = 1.0 / torch.log(math.e + dt)
            return decay.unsqueeze(-1).expand(*dt.shape, H)
        x = input.data if isinstance(input, PackedSequence) else input
        gates, _ = _GATES[self.variant]
        gate_row = gates - 1  # the last gate block: t (variant 1) or t2 (variants 2, 3)
        w = self.weight_ih_l0[gate_row * H:(gate_row + 1) * H]
        a = x @ w.t()
        if self.bias:
            a = a + self.bias_l0[gate_row * H:(gate_row + 1) * H]
        w_t = (self.time_gate1_weight(0, 0) if self.variant == "time_lstm1"
               else self.time_gate2_weight_l0)
        return torch.sigmoid(a + torch.sigmoid(dt.unsqueeze(-1) * w_t))
