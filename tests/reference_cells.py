"""Pure-PyTorch, step-by-step references of the TimeLSTM variants, written from the equations of
the papers (as restated in the ``timerec_fast.TimeLSTM`` docstring), not from the C++ kernels.

Everything is differentiable with ordinary autograd, so the references give values AND gradients
(input, delta_t, h0/c0, every parameter) to compare the fused ops against.

Equations (c = c_{t-1}, a_* = x W_* + h U_* + b_*, time gates have no h term):

Time-LSTM (Zhu et al., IJCAI 2017)
    i  = sigmoid(a_i + p_i * c)          f = sigmoid(a_f + p_f * c)        g = tanh(a_g)
    T_k = sigmoid(a_tk + sigmoid(dt * w_tk))
    time_lstm1:  c_t = c~ = f c + i T g
    time_lstm2:  c~ = f c + i T1 g,                c_t = f c + i T2 g
    time_lstm3:  c~ = (1 - i T1) c + i T1 g,       c_t = (1 - i) c + i T2 g     (no forget gate)
    o = sigmoid(a_o + dt * w_o + p_o * c~),  h = o tanh(c~);  c_t is carried.
    variants 2/3: w_t1 = -softplus(time_gate1_raw) <= 0.

T-LSTM (Baytas et al., KDD 2017)
    cS = tanh(W_d c + b_d),  c* = (c - cS) + cS * g(dt),  g(dt) = 1 / log(e + dt)
    then an ordinary LSTM step (gates i, f, g, o) from c*.

Parameters are read from the module BY NAME (weight_ih_l{k}, weight_hh_l{k}, bias_l{k},
peephole_l{k}, time_gate1_weight_l{k} / time_gate1_raw_l{k}, time_gate2_weight_l{k},
time_out_weight_l{k}, weight_decomp_l{k}, bias_decomp_l{k}; suffix ``_reverse``).
"""
import math

import torch
from torch.nn.utils.rnn import PackedSequence

# Gate row blocks of weight_ih / bias (all gates) and of weight_hh (gates that see h).
GATE_ROWS = {
    "time_lstm1": ("i", "f", "g", "o", "t"),
    "time_lstm2": ("i", "f", "g", "o", "t1", "t2"),
    "time_lstm3": ("i", "g", "o", "t1", "t2"),
    "tlstm": ("i", "f", "g", "o"),
}
H_GATE_ROWS = {
    "time_lstm1": ("i", "f", "g", "o"),
    "time_lstm2": ("i", "f", "g", "o"),
    "time_lstm3": ("i", "g", "o"),
    "tlstm": ("i", "f", "g", "o"),
}


def _sfx(layer, direction):
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


def softplus(x):
    """softplus(x) = log(1 + exp(x)), stable for large |x| (written out, not F.softplus)."""
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))


def layer_params(module, layer, direction):
    """The parameters of one layer/direction as a dict, read by name from the module."""
    s = _sfx(layer, direction)
    p = {"w_ih": getattr(module, "weight_ih" + s), "w_hh": getattr(module, "weight_hh" + s),
         "bias": getattr(module, "bias" + s) if module.bias else None}
    v = module.variant
    if v == "tlstm":
        p["w_d"] = getattr(module, "weight_decomp" + s)
        p["b_d"] = getattr(module, "bias_decomp" + s) if module.bias else None
        return p
    peep = getattr(module, "peephole" + s)
    if v == "time_lstm3":
        p["p_i"], p["p_o"] = peep[0], peep[1]
    else:
        p["p_i"], p["p_f"], p["p_o"] = peep[0], peep[1], peep[2]
    if v == "time_lstm1":
        p["w_t1"] = getattr(module, "time_gate1_weight" + s)
    else:
        p["w_t1"] = -softplus(getattr(module, "time_gate1_raw" + s))
        p["w_t2"] = getattr(module, "time_gate2_weight" + s)
    p["w_o"] = getattr(module, "time_out_weight" + s)
    return p


def _pre_activations(variant, p, x, h):
    """Dict gate name -> pre-activation (B, H): x W_ih^T + b for every gate, + h W_hh^T for the
    gates that see h."""
    a = x @ p["w_ih"].t()
    if p["bias"] is not None:
        a = a + p["bias"]
    names = GATE_ROWS[variant]
    blocks = dict(zip(names, a.chunk(len(names), dim=-1)))
    ah = h @ p["w_hh"].t()
    h_names = H_GATE_ROWS[variant]
    for name, blk in zip(h_names, ah.chunk(len(h_names), dim=-1)):
        blocks[name] = blocks[name] + blk
    return blocks


def tlstm_decay(dt):
    """g(dt) = 1 / log(e + dt)."""
    return 1.0 / torch.log(math.e + dt)


def cell_step(variant, p, x, dt, h, c):
    """One step for a batch: x (B, I), dt (B,), h, c (B, H). Returns (h_t, c_t, info) where
    info holds the time gates / decay of the step (for time_gate_activations)."""
    a = _pre_activations(variant, p, x, h)
    dtc = dt.unsqueeze(-1)
    sig, tanh = torch.sigmoid, torch.tanh
    if variant == "tlstm":
        cs = tanh(c @ p["w_d"].t() + (p["b_d"] if p["b_d"] is not None else 0))
        decay = tlstm_decay(dtc)
        c_star = (c - cs) + cs * decay
        i, f, g, o = sig(a["i"]), sig(a["f"]), tanh(a["g"]), sig(a["o"])
        c_new = f * c_star + i * g
        h_new = o * tanh(c_new)
        return h_new, c_new, {"decay": decay.expand_as(c_new), "cs": cs, "f": f}

    i = sig(a["i"] + p["p_i"] * c)
    g = tanh(a["g"])
    if variant == "time_lstm1":
        f = sig(a["f"] + p["p_f"] * c)
        T = sig(a["t"] + sig(dtc * p["w_t1"]))
        c_new = f * c + i * T * g
        c_tilde = c_new
        info = {"T": T}
    elif variant == "time_lstm2":
        f = sig(a["f"] + p["p_f"] * c)
        T1 = sig(a["t1"] + sig(dtc * p["w_t1"]))
        T2 = sig(a["t2"] + sig(dtc * p["w_t2"]))
        c_tilde = f * c + i * T1 * g
        c_new = f * c + i * T2 * g
        info = {"T1": T1, "T2": T2}
    elif variant == "time_lstm3":
        T1 = sig(a["t1"] + sig(dtc * p["w_t1"]))
        T2 = sig(a["t2"] + sig(dtc * p["w_t2"]))
        c_tilde = (1 - i * T1) * c + i * T1 * g
        c_new = (1 - i) * c + i * T2 * g
        info = {"T1": T1, "T2": T2}
    else:
        raise ValueError(variant)
    o = sig(a["o"] + dtc * p["w_o"] + p["p_o"] * c_tilde)
    h_new = o * tanh(c_tilde)
    return h_new, c_new, info


def _run_direction(variant, p, xs, dts, h, c, reverse, trace=None):
    """xs (L, B, I), dts (L, B), full-length sequences. Returns out (L, B, H), h_n, c_n."""
    steps = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    outs = [None] * xs.shape[0]
    infos = [None] * xs.shape[0]
    for t in steps:
        h, c, info = cell_step(variant, p, xs[t], dts[t], h, c)
        outs[t] = h
        infos[t] = info
    if trace is not None:
        trace.append({k: torch.stack([inf[k] for inf in infos]) for k in infos[0]})
    return torch.stack(outs), h, c


def _run_stack(module, xs, dts, h0, c0, traces=None):
    """All layers and directions over full-length time-major sequences xs (L, B, I), dts (L, B);
    h0, c0 (layers*dirs, B, H). Dropout is never applied (use eval mode / dropout=0)."""
    dirs = 2 if module.bidirectional else 1
    h_n, c_n = [], []
    x = xs
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            trace = None
            if traces is not None:
                trace = traces.setdefault((layer, d), [])
            out, h, c = _run_direction(module.variant, layer_params(module, layer, d), x, dts,
                                       h0[idx], c0[idx], reverse=d == 1, trace=trace)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=-1)
    return x, torch.stack(h_n), torch.stack(c_n)


def reference_time_lstm(module, input, delta_t, hx=None, traces=None):
    """Reference forward of ``module`` (a timerec_fast.TimeLSTM), same calling convention and
    return value: ``(output, (h_n, c_n))``. Accepts padded (batch_first or not), unbatched and
    PackedSequence input (packed delta_t). A packed batch is run one sequence at a time over its
    own length (the reverse direction of a sequence starts at its own last step) and reassembled.

    ``traces`` (a dict), if given, receives per (layer, direction) a list of dicts of stacked
    per-step gate values (e.g. "T", "T1", "T2", "decay") shaped (L, B, H) per run; for padded
    input there is one run over the whole batch."""
    H = module.hidden_size
    dirs = 2 if module.bidirectional else 1
    LD = module.num_layers * dirs
    dtype = module.weight_ih_l0.dtype

    if isinstance(input, PackedSequence):
        assert isinstance(delta_t, PackedSequence)
        data, batch_sizes, sorted_idx, unsorted_idx = input
        dt_data = delta_t.data.to(dtype)
        bs = [int(b) for b in batch_sizes]
        B = bs[0]
        offsets = [sum(bs[:t]) for t in range(len(bs))]
        if sorted_idx is None:
            sorted_idx = torch.arange(B)
        if hx is None:
            h0 = c0 = torch.zeros(LD, B, H, dtype=dtype)
        else:
            h0, c0 = hx
        out_rows = [None] * data.shape[0]
        h_final = [None] * B
        c_final = [None] * B
        for j in range(B):  # j = position in the sorted (packed) order
            length = sum(1 for b in bs if b > j)
            rows = [offsets[t] + j for t in range(length)]
            xs = data[rows].unsqueeze(1)            # (L, 1, I)
            dts = dt_data[rows].unsqueeze(1)        # (L, 1)
            orig = int(sorted_idx[j])
            out, h, c = _run_stack(module, xs, dts, h0[:, orig:orig + 1], c0[:, orig:orig + 1],
                                   traces)
            for t, r in enumerate(rows):
                out_rows[r] = out[t, 0]
            h_final[orig] = h[:, 0]
            c_final[orig] = c[:, 0]
        out = PackedSequence(torch.stack(out_rows), batch_sizes, input.sorted_indices,
                             input.unsorted_indices)
        return out, (torch.stack(h_final, 1), torch.stack(c_final, 1))

    x = input
    dt = delta_t.to(dtype)
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
        dt = dt.unsqueeze(1)
    elif module.batch_first:
        x = x.transpose(0, 1)
        dt = dt.transpose(0, 1)
    B = x.shape[1]
    if hx is None:
        h0 = c0 = torch.zeros(LD, B, H, dtype=dtype)
    else:
        h0, c0 = hx
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    out, h_n, c_n = _run_stack(module, x, dt, h0, c0, traces)
    if not batched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if module.batch_first:
        out = out.transpose(0, 1)
    return out, (h_n, c_n)
