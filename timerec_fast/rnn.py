"""Drop-in recurrent modules on the fused whole-sequence ops.

Everything about stacking is here, once, for every cell: input layouts (batched, unbatched,
batch_first, PackedSequence sorted or not), initial states, layers, directions and inter-layer
dropout. A cell only says how to run one layer in one direction (``_layer``).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import ops

# The torch.nn classes, captured before any patch_torch() so subclasses and the undo stay correct.
TorchLSTM = nn.LSTM
TorchLSTMCell = nn.LSTMCell
TorchGRUCell = nn.GRUCell


def _suffix(layer, direction):
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


def _layer_weights(rnn, layer, direction):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction, None where absent.

    Read from RNNBase's ``_flat_weights``, as torch.nn.LSTM's own forward does: RNNBase keeps that
    list in step with the parameters (assignment, ``.to()``, hooks; forward refreshes it first for
    functional_call), and one slice costs a few microseconds less per layer than four
    ``Module.__getattr__`` lookups (a B=1 forward is ~150 us).
    """
    has_proj = getattr(rnn, "proj_size", 0) > 0
    n = 2 + 2 * rnn.bias + has_proj
    i = (layer * (2 if rnn.bidirectional else 1) + direction) * n
    w = rnn._flat_weights[i:i + n]
    b_ih, b_hh = (w[2], w[3]) if rnn.bias else (None, None)
    return w[0], w[1], b_ih, b_hh, (w[-1] if has_proj else None)


def _refresh_flat_weights(rnn):
    """Re-reads ``_flat_weights`` when a weight was swapped without RNNBase.__setattr__ seeing it.

    torch.func.functional_call (and so torch.func.grad, vmap ensembles) puts its tensors straight
    into ``_parameters``; torch.nn.LSTM's forward re-reads them (``_update_flat_weights``), and
    so must we, or the call would run, and differentiate, the module's own weights. Identity
    checks on the parameter dict: ~0.5 us a layer, a tenth of ``_update_flat_weights``.
    """
    params = rnn._parameters
    for name, current in zip(rnn._flat_weights_names, rnn._flat_weights):
        w = params.get(name)
        if w is None:
            w = getattr(rnn, name, None)
        if w is not current:
            rnn._init_flat_weights()
            return


def _check_packed(data, batch_sizes, name):
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise ValueError(f"{name}: PackedSequence.batch_sizes must be a non-empty 1-D tensor, "
                         f"got shape {tuple(batch_sizes.shape)}")
    if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64:
        raise ValueError(f"{name}: PackedSequence.batch_sizes must be int64 on the CPU, got "
                         f"{batch_sizes.dtype} on {batch_sizes.device}")
    if not torch.compiler.is_compiling():
        if bool((batch_sizes <= 0).any()):
            raise ValueError(f"{name}: PackedSequence holds empty sequences (batch_sizes "
                             f"{batch_sizes.tolist()}); every sequence needs at least one step")
        total = int(batch_sizes.sum())
        if data.dim() >= 1 and total != data.shape[0]:
            raise ValueError(f"{name}: PackedSequence.batch_sizes sum to {total} but data has "
                             f"{data.shape[0]} rows")


def _time_major_rows(t, batch_first):
    """(T, B, ...) or (B, T, ...) -> (T*B, ...) rows in packed (time-major) order."""
    if batch_first:
        t = t.transpose(0, 1)
    return t.flatten(0, 1)


@functools.lru_cache(maxsize=64)
def _cached_batch_sizes(steps, batch):
    # A normal tensor even when first asked for under inference_mode: autograd refuses to save
    # an inference tensor, and a later training call gets this same one.
    with torch.inference_mode(False):
        return torch.full((steps,), batch, dtype=torch.int64, device="cpu")


def _uniform_batch_sizes(steps, batch):
    """batch_sizes of a padded (T, B) batch: [B] * T. Kept per (T, B) in plain eager calls (the
    ops only read it and it never reaches the caller) rather than made per call. Made afresh
    while compiling or tracing (no cached tensor becomes a graph constant) and under any
    dispatch or function mode (a FakeTensorMode would make, and the cache keep, a fake one)."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None or \
            torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return torch.full((steps,), batch, dtype=torch.int64, device="cpu")
    return _cached_batch_sizes(steps, batch)


class _FusedRNNMixin:
    """Shared forward for the fused modules.

    Subclasses define ``_cell_name``, ``_state_sizes()`` (width of each state tensor),
    ``_layer(x, batch_sizes, states, layer, direction, extra)`` and ``_check_args`` (hx None:
    check the input alone).
    States travel as a tuple internally: (h,) for GRU, (h, c) for the LSTMs.
    """

    _cell_name = "RNN"
    _extra_name = None  # name of the per-step side input (TimeLSTM: "delta_t")

    def _pack_states(self, states):
        return states if len(states) > 1 else states[0]

    def _unpack_states(self, hx):
        count = len(self._state_sizes())
        if count > 1:
            if not isinstance(hx, (tuple, list)) or len(hx) != count:
                got = (f"a single tensor of shape {tuple(hx.shape)}" if isinstance(hx, torch.Tensor)
                       else repr(type(hx).__name__))
                raise RuntimeError(f"{self._cell_name}: hx must be a tuple (h_0, c_0) of "
                                   f"{count} tensors, got {got}")
            return tuple(hx)
        if not isinstance(hx, torch.Tensor):
            raise RuntimeError(f"{self._cell_name}: hx must be a tensor, got {type(hx).__name__}")
        return (hx,)

    def _check_state_meta(self, states, x):
        # Under CUDA autocast torch.nn.LSTM accepts e.g. an fp16 input with fp32 hx (the op casts
        # both); the device must always match.
        autocast = x.is_cuda and torch.is_autocast_enabled()
        for i, s in enumerate(states):
            if s.device != x.device or (s.dtype != x.dtype and not autocast):
                label = f"hx[{i}]" if len(states) > 1 else "hx"
                raise RuntimeError(
                    f"{self._cell_name}: {label} must be {x.dtype} on {x.device} like the input, "
                    f"got {s.dtype} on {s.device}")

    def _fused_forward(self, input, hx=None, extra=None):
        name = self._cell_name
        is_packed = isinstance(input, PackedSequence)
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _check_packed(data, batch_sizes, name)
            is_batched = True
            batch = int(batch_sizes[0])
            x = data
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            sorted_indices = unsorted_indices = None
            batch_sizes = None
            batch = input.shape[batch_dim]
            x = input

        num_directions = 2 if self.bidirectional else 1
        if hx is None:
            # The ops only read initial states: one (B, W) zero tensor serves every layer,
            # direction and state of its width (the LSTM's h and c share one unless proj_size
            # makes h narrower). At B = 1 every tensor call counts: the op evicts the
            # interpreter's working set from cache, and each call after it costs several
            # microseconds (a B = 1 forward is ~200 us).
            sizes = self._state_sizes()
            zeros = torch.zeros(batch, sizes[0], dtype=x.dtype, device=x.device)
            states = tuple(zeros if w == sizes[0] else zeros.new_zeros((batch, w)) for w in sizes)
        else:
            states = self._unpack_states(hx)
            want = 3 if is_batched else 2
            if any(s.dim() != want for s in states):
                dims = ", ".join(f"{s.dim()}-D" for s in states)
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"{name}: for {kind} input, hx should also be {want}-D but got "
                                   f"({dims}) tensors")
            if not is_batched:
                states = tuple(s.unsqueeze(1) for s in states)
        if hx is None:  # states made above have the right shape, dtype and device
            self._check_args(x, None, batch_sizes)
        else:
            self._check_args(x, self._pack_states(states), batch_sizes)
            self._check_state_meta(states, x)
        if sorted_indices is not None and hx is not None:
            states = tuple(s.index_select(1, sorted_indices) for s in states)

        extra_rows = None
        if self._extra_name is not None:
            extra_rows = self._extra_rows(extra, x, batch_sizes, sorted_indices, is_batched)

        if is_packed:
            rows = x
        else:
            rows = _time_major_rows(x, self.batch_first)
            steps = x.shape[1] if self.batch_first else x.shape[0]
            if steps == 0:
                raise RuntimeError(f"{name}: Expected sequence length to be larger than 0, got "
                                   f"input of shape {tuple(x.shape)}")
            batch_sizes = _uniform_batch_sizes(steps, batch)

        shared = hx is None  # states: one (B, W) set for every layer, else (L * D, B, W) stacks
        if batch == 0:  # torch.nn returns empty outputs and the (empty) states
            width = num_directions * self._state_sizes()[0]
            out = rows.new_zeros((0, width))
            finals = tuple(s.expand((self.num_layers * num_directions,) + s.shape).clone()
                           for s in states) if shared else states
        else:
            out, finals = self._run_layers(rows, batch_sizes, states, shared, extra_rows)

        if unsorted_indices is not None:
            finals = tuple(s.index_select(1, unsorted_indices) for s in finals)
        if is_packed:
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), \
                self._pack_states(finals)
        out = out.view(steps, batch, out.shape[-1])
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(batch_dim)
            finals = tuple(s.squeeze(1) for s in finals)
        return out, self._pack_states(finals)

    def _run_layers(self, x, batch_sizes, states, shared, extra_rows):
        """Runs every layer and direction. states: (B, W) tensors every layer and direction
        starts from when `shared`, else (L * D, B, W) stacks indexed by layer and direction."""
        if self.num_layers == 1 and not self.bidirectional:  # the common case, without the loops
            out, new_states = self._layer(x, batch_sizes,
                                          states if shared else tuple(s[0] for s in states), 0, 0,
                                          extra_rows)
            return out, tuple(s.unsqueeze(0) for s in new_states)
        num_directions = 2 if self.bidirectional else 1
        finals = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for direction in range(num_directions):
                idx = layer * num_directions + direction
                initial = states if shared else tuple(s[idx] for s in states)
                out, new_states = self._layer(x, batch_sizes, initial, layer, direction,
                                              extra_rows)
                outs.append(out)
                for acc, s in zip(finals, new_states):
                    acc.append(s)
            x = outs[0] if num_directions == 1 else torch.cat(outs, dim=1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        if len(finals[0]) == 1:
            return x, tuple(acc[0].unsqueeze(0) for acc in finals)
        return x, tuple(torch.stack(acc, 0) for acc in finals)

    def flatten_parameters(self):
        """Accepted for torch.nn compatibility; the fused ops need no flat weight buffer."""


class _FusedRNNBase(_FusedRNNMixin, nn.RNNBase):
    """What LSTM and GRU share on top of the mixin: torch.nn's own argument checks (the hidden
    checks only for states the caller gave), and a forward that first re-reads the weights a
    functional_call may have swapped in."""

    def _check_args(self, x, hx, batch_sizes):
        if hx is None:
            self.check_input(x, batch_sizes)
        else:
            self.check_forward_args(x, hx, batch_sizes)

    def forward(self, input, hx=None):
        _refresh_flat_weights(self)
        return self._fused_forward(input, hx)


class LSTM(_FusedRNNBase):
    """Drop-in ``torch.nn.LSTM`` running on the fused whole-sequence ops.

    Same constructor, parameters (names, shapes, gate order i, f, g, o, initialisation), inputs,
    outputs and errors as ``torch.nn.LSTM``; state_dicts load both ways. It derives from
    ``torch.nn.RNNBase`` like ``torch.nn.LSTM`` does, but not from ``torch.nn.LSTM`` itself:
    ``torch.compile`` refuses every ``torch.nn.LSTM`` instance, and fullgraph compilation is one
    of the points of this class.
    """

    _cell_name = "LSTM"
    # torch.nn.LSTM's argument checks, reused as they are so errors read the same.
    get_expected_cell_size = TorchLSTM.get_expected_cell_size
    check_forward_args = TorchLSTM.check_forward_args
    permute_hidden = TorchLSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def _state_sizes(self):
        return (self.proj_size if self.proj_size > 0 else self.hidden_size, self.hidden_size)

    def _layer(self, x, batch_sizes, states, layer, direction, extra):
        out, h, c = ops.lstm_layer(x, batch_sizes, states[0], states[1],
                                   *_layer_weights(self, layer, direction),
                                   reverse=direction == 1)
        return out, (h, c)


def _cell_inputs(name, input, hx, hidden_size, num_states):
    """Shared argument handling of the single-step cells (torch.nn.*Cell semantics)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    states = None
    if hx is not None:
        states = tuple(hx) if num_states > 1 else (hx,)
        if len(states) != num_states:
            raise ValueError(f"{name}: hx must hold {num_states} tensors, got {len(states)}")
        for idx, value in enumerate(states):
            if value.dim() not in (1, 2):
                label = f"hx[{idx}]" if num_states > 1 else "hx"
                raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {value.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    batch = input.shape[0]
    if states is None:
        zeros = torch.zeros(batch, hidden_size, dtype=input.dtype, device=input.device)
        states = (zeros,) * num_states
    elif not is_batched:
        states = tuple(s.unsqueeze(0) for s in states)
    for idx, s in enumerate(states):
        label = f"hx[{idx}]" if num_states > 1 else "hx"
        if tuple(s.shape) != (batch, hidden_size):
            raise RuntimeError(f"{name}: Expected {label} size {(batch, hidden_size)}, got "
                               f"{tuple(s.shape)}")
        if s.dtype != input.dtype or s.device != input.device:
            raise RuntimeError(f"{name}: {label} must be {input.dtype} on {input.device} like the "
                               f"input, got {s.dtype} on {s.device}")
    return input, states, is_batched, _uniform_batch_sizes(1, batch)


def _cell_step(layer_fn, input, states, batch_sizes, *weights):
    """One step of a layer op; an empty batch returns the (empty) states as torch.nn does."""
    if input.shape[0] == 0:
        return states
    return layer_fn(input, batch_sizes, *states, *weights)[1:]


def _check_cell_weights(name, input, cell):
    if input.shape[1] != cell.input_size:
        raise RuntimeError(f"{name}: input has inconsistent input_size: got {input.shape[1]} "
                           f"expected {cell.input_size}")
    if input.dtype != cell.weight_ih.dtype:
        raise ValueError(f"{name}: input dtype ({input.dtype}) does not match weight dtype "
                         f"({cell.weight_ih.dtype})")


class LSTMCell(TorchLSTMCell):
    """Drop-in ``torch.nn.LSTMCell``: one step of the fused LSTM op."""

    def forward(self, input, hx=None):
        input, (h0, c0), is_batched, batch_sizes = _cell_inputs("LSTMCell", input, hx,
                                                                 self.hidden_size, 2)
        _check_cell_weights("LSTMCell", input, self)
        h, c = _cell_step(ops.lstm_layer, input, (h0, c0), batch_sizes, self.weight_ih,
                          self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


class GRU(_FusedRNNBase):
    """Drop-in ``torch.nn.GRU`` running on the fused whole-sequence ops.

    Same constructor, parameters (gate order r, z, n), inputs and outputs as ``torch.nn.GRU``;
    derives from ``torch.nn.RNNBase`` (not ``torch.nn.GRU``, which ``torch.compile`` refuses).
    """

    _cell_name = "GRU"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def _state_sizes(self):
        return (self.hidden_size,)

    def _layer(self, x, batch_sizes, states, layer, direction, extra):
        w_ih, w_hh, b_ih, b_hh, _ = _layer_weights(self, layer, direction)
        out, h = ops.gru_layer(x, batch_sizes, states[0], w_ih, w_hh, b_ih, b_hh,
                               reverse=direction == 1)
        return out, (h,)


class GRUCell(TorchGRUCell):
    """Drop-in ``torch.nn.GRUCell``: one step of the fused GRU op."""

    def forward(self, input, hx=None):
        input, (h0,), is_batched, batch_sizes = _cell_inputs("GRUCell", input, hx,
                                                             self.hidden_size, 1)
        _check_cell_weights("GRUCell", input, self)
        (h,) = _cell_step(ops.gru_layer, input, (h0,), batch_sizes, self.weight_ih,
                          self.weight_hh, self.bias_ih, self.bias_hh)
        return h if is_batched else h.squeeze(0)
