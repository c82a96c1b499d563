"""Splits, time features and packed batches.

A *window* ``(s, L)`` over the global (user-grouped, time-ordered) event arrays means: the model
reads events ``s .. s+L-1`` and, at each of them, predicts the next event ``s+1 .. s+L``. The
time features of input event ``e`` are

* ``log_gap[e]``   -- log1p of the gap (s) from the previous event of the user (0 for the first)
* ``log_gap[e+1]`` -- log1p of the gap from ``e`` to the moment of prediction, i.e. to the
  next event (in evaluation: the target's timestamp; in serving: ``now``).

Both are normalised by :class:`TimeScaler`, fitted on training gaps only.

Batches are :class:`torch.nn.utils.rnn.PackedSequence` objects built by :func:`pack_windows`;
every field (items, gaps, targets) is packed with one shared permutation, so there is no padding
and no compute on padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

from .data import InteractionData
from .errors import DataError


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------
@dataclass
class Split:
    """``train_len[u]``: how many leading events of user ``u`` are training data.
    ``valid`` / ``test``: global indices of target events (each has >= 1 earlier event)."""

    kind: str
    train_len: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    info: Dict[str, float]

    def summary(self) -> str:
        return (f"split: {self.kind}: {int(self.train_len.sum())} training events, "
                f"{len(self.valid)} validation targets, {len(self.test)} test targets"
                + "".join(f"; {k}={v}" for k, v in self.info.items()))


def leave_one_out(data: InteractionData) -> Split:
    """RecBole's sequential protocol: per user (by time) the last event is the test target, the
    second to last the validation target, the rest is training. Users with < 3 events are kept
    for training only and not evaluated."""
    n = np.diff(data.offsets)
    ev = n >= 3
    train_len = np.where(ev, n - 2, n)
    valid = (data.offsets[:-1] + n - 2)[ev]
    test = (data.offsets[:-1] + n - 1)[ev]
    if len(test) == 0:
        raise DataError("leave-one-out needs users with at least 3 events; none has")
    return Split("leave-one-out", train_len.astype(np.int64), valid.astype(np.int64), test.astype(np.int64),
                 {"users_train_only": int((~ev).sum())})


def time_split(data: InteractionData, valid_frac: float = 0.1, test_frac: float = 0.1) -> Split:
    """Global temporal split: the earliest ``1-valid_frac-test_frac`` of all events (by time) are
    training data, then a validation period, then a test period. Every event of the later periods
    that has an earlier event of its user is a target, predicted from everything before it."""
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise DataError("time split fractions must be in (0, 1) and sum to < 1")
    t1 = float(np.quantile(data.times, 1 - valid_frac - test_frac))
    t2 = float(np.quantile(data.times, 1 - test_frac))
    first = np.zeros(data.n_events, dtype=bool)
    first[data.offsets[:-1][np.diff(data.offsets) > 0]] = True
    train_len = np.array([int((data.times[a:b] < t1).sum()) for a, b in zip(data.offsets[:-1], data.offsets[1:])],
                         dtype=np.int64)
    idx = np.arange(data.n_events)
    valid = idx[(data.times >= t1) & (data.times < t2) & ~first]
    test = idx[(data.times >= t2) & ~first]
    if len(test) == 0 or len(valid) == 0:
        raise DataError("time split left no validation or no test targets; change the fractions")
    return Split("time", train_len, valid, test, {"valid_start": t1, "test_start": t2})


def make_split(data: InteractionData, kind: str, **kw) -> Split:
    if kind in ("loo", "leave-one-out"):
        return leave_one_out(data)
    if kind == "time":
        return time_split(data, **kw)
    raise DataError(f"unknown split {kind!r}; use loo or time")


# --------------------------------------------------------------------------------------------
# time features
# --------------------------------------------------------------------------------------------
@dataclass
class TimeScaler:
    """z-score of log1p(gap) for input features, and log1p(gap)/std (>= 0) for the cell's Δt.
    Fitted on the gaps between consecutive *training* events only."""

    mean: float
    std: float

    @classmethod
    def fit(cls, data: InteractionData, split: Split) -> "TimeScaler":
        vals = []
        for u in range(data.n_users):
            a = int(data.offsets[u])
            m = int(split.train_len[u])
            if m > 1:
                vals.append(data.log_gap[a + 1:a + m])
        v = np.concatenate(vals) if vals else np.zeros(1, dtype=np.float32)
        std = float(v.std())
        return cls(float(v.mean()), std if std > 1e-6 else 1.0)


# --------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------
def train_windows(data: InteractionData, split: Split, max_len: int) -> np.ndarray:
    """Non-overlapping windows that cover every training transition exactly once, cut from the
    end of each user's training prefix (so the last window is the most recent context).
    Returns an ``(n, 2)`` array of ``(start, length)``."""
    out = []
    for u in range(data.n_users):
        a = int(data.offsets[u])
        m = int(split.train_len[u])
        end = m - 1  # inputs are local 0..m-2, targets 1..m-1
        while end > 0:
            start = max(0, end - max_len)
            out.append((a + start, end - start))
            end = start
    if not out:
        raise DataError("no training sequences: every user has fewer than 2 training events")
    return np.asarray(out, dtype=np.int64)


def eval_windows(data: InteractionData, targets: np.ndarray, max_len: int) -> np.ndarray:
    """History windows for target events: the (at most ``max_len``) events before each target."""
    u = data.user_of[targets]
    first = data.offsets[u]
    start = np.maximum(first, targets - max_len)
    return np.stack([start, targets - start], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def pack_index(lengths: np.ndarray) -> Tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sequences of ``lengths`` laid end to end, return ``(flat_index, batch_sizes,
    sorted_indices, unsorted_indices)`` such that ``flat[flat_index]`` is the packed (time-major,
    longest first) data of a PackedSequence. Ties in length keep batch order (stable)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths <= 0).any():
        raise ValueError("empty sequence in batch")
    order = np.argsort(-lengths, kind="stable")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sl = lengths[order]
    T = int(sl[0])
    batch_sizes = len(sl) - np.searchsorted(sl[::-1], np.arange(T), side="right")  # #(len > t)
    s_sorted = starts[order]
    idx = np.concatenate([s_sorted[:batch_sizes[t]] + t for t in range(T)])
    sorted_idx = torch.from_numpy(order.copy())
    unsorted = torch.empty_like(sorted_idx)
    unsorted[sorted_idx] = torch.arange(len(order))
    return idx, torch.from_numpy(batch_sizes.astype(np.int64)), sorted_idx, unsorted


def packed(data: torch.Tensor, like: Tuple) -> PackedSequence:
    _, bs, si, ui = like
    return PackedSequence(data, bs, si, ui)


@dataclass
class Batch:
    """A packed batch. ``items``/``lg_prev``/``lg_next`` are PackedSequences with one layout;
    ``targets`` is packed too (training) and ``last_target`` holds each sequence's final target
    (evaluation) in batch order; ``users`` are user indices in batch order."""

    items: PackedSequence
    lg_prev: PackedSequence
    lg_next: PackedSequence
    targets: PackedSequence
    last_target: torch.Tensor
    users: torch.Tensor
    target_events: torch.Tensor

    def __len__(self) -> int:
        return len(self.users)

    def to(self, device) -> "Batch":
        """Model inputs on ``device`` (index/bookkeeping fields stay on the CPU)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        f = lambda p: p.to(device)
        return Batch(f(self.items), f(self.lg_prev), f(self.lg_next), f(self.targets), self.last_target,
                     self.users, self.target_events)


def make_batch(data: InteractionData, windows: np.ndarray) -> Batch:
    starts, lens = windows[:, 0], windows[:, 1]
    flat = np.concatenate([np.arange(s, s + L) for s, L in zip(starts.tolist(), lens.tolist())])
    layout = pack_index(lens)
    idx = flat[layout[0]]
    items = torch.from_numpy(data.items[idx])
    lg_prev = torch.from_numpy(data.log_gap[idx])
    lg_next = torch.from_numpy(data.log_gap[idx + 1])
    targets = torch.from_numpy(data.items[idx + 1])
    ends = starts + lens
    return Batch(packed(items, layout), packed(lg_prev, layout), packed(lg_next, layout),
                 packed(targets, layout), torch.from_numpy(data.items[ends]),
                 torch.from_numpy(data.user_of[starts]), torch.from_numpy(ends))


def make_sequence_batch(items_list: Sequence[np.ndarray], lg_prev_list: Sequence[np.ndarray],
                        lg_next_list: Sequence[np.ndarray]) -> Batch:
    """Pack arbitrary sequences (used by serving, where the last gap comes from ``now``)."""
    lens = np.array([len(x) for x in items_list], dtype=np.int64)
    layout = pack_index(lens)
    cat = lambda xs, dt: np.concatenate([np.asarray(x, dtype=dt) for x in xs])[layout[0]]
    items = torch.from_numpy(cat(items_list, np.int64))
    empty = torch.zeros(0, dtype=torch.int64)
    return Batch(packed(items, layout), packed(torch.from_numpy(cat(lg_prev_list, np.float32)), layout),
                 packed(torch.from_numpy(cat(lg_next_list, np.float32)), layout),
                 packed(items, layout), empty, empty, empty)


def iterate_batches(data: InteractionData, windows: np.ndarray, batch_size: int,
                    rng: Optional[np.random.Generator] = None) -> Iterator[Batch]:
    order = np.arange(len(windows)) if rng is None else rng.permutation(len(windows))
    for i in range(0, len(order), batch_size):
        yield make_batch(data, windows[order[i:i + batch_size]])
