"""Serving: top-K recommendation, O(1) online updates, batch scoring, explanations.

State per user. The model's prediction after a user's last event ``e_n`` depends on the time of
the request (the gap from ``e_n`` to ``now`` is an input of the last step). So a user's state is
kept as *(recurrent state after e_1 .. e_{n-1}, the pending last event e_n)*:

* ``recommend(user, k, now)`` runs one cell step (pending event with gap ``now - t_n``) from the
  stored state -- it does not change the state;
* ``update(user, item, t)`` commits the pending event with its now-known gap ``t - t_n`` (one
  cell step) and makes the new event pending: O(1) in the length of the history.

The stored state is first built from the user's most recent ``max_len`` events (the window the
model was trained and evaluated on); after updates it equals re-running the model over that
window plus the new events (tested).

``now=None`` means "no request time known": the gap to the request is taken to be the median gap
seen in the training data. Times are seconds (same clock as the training log).

Users without any known event get the most popular items (``fallback=True``, with the reason).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from . import checkpoint as ckpt
from .data import InteractionData
from .errors import CheckpointError, RecsysError
from .models import ModelConfig, PopularityModel, SeqRecommender, build_model
from .sequences import Split, make_sequence_batch
from .train import TrainConfig, split_for, train_item_counts


def load_trained(directory: str):
    """Load ``(model, data, config_dict)`` from a checkpoint directory (best model)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{directory} is not a timerec checkpoint (no config.json)")
    with open(cfg_path, "r", encoding="utf-8") as f:
        conf = json.load(f)
    state = ckpt.load(os.path.join(directory, "model.pt"))
    mcfg = ModelConfig(**state["model_config"])
    model = build_model(mcfg)
    model.load_state_dict(state["state_dict"])
    model.eval()
    data = InteractionData.load(directory)
    if data.n_items != mcfg.n_items:
        raise CheckpointError(f"{directory}: data has {data.n_items} items but the model {mcfg.n_items}")
    return model, data, conf


@dataclass
class Recommendation:
    user: str
    items: List[str]
    scores: List[float]
    fallback: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(user=self.user, items=self.items, scores=self.scores, fallback=self.fallback,
                    reason=self.reason)


@dataclass
class _UserState:
    state: object            # recurrent state after the committed events (None: zero state)
    item: int                # pending (last) event
    time: float
    lg_prev: float
    seen: Set[int] = field(default_factory=set)


class Recommender:
    """Serve a trained checkpoint. See the module docstring for the state semantics."""

    def __init__(self, model, data: InteractionData, conf: dict):
        self.model = model.eval()
        self.data = data
        self.conf = conf
        tc = conf.get("train", {})
        self.max_len = int(tc.get("max_len", 50))
        self.kind = model.cfg.kind
        # popularity over the whole known log (serving fallback)
        self.pop_counts = np.bincount(data.items, minlength=data.n_items).astype(np.float64)
        gaps = data.log_gap[np.setdiff1d(np.arange(data.n_events), data.offsets[:-1])]
        self.default_lg_next = float(np.median(gaps)) if gaps.size else 0.0
        self._states: Dict[str, _UserState] = {}

    @classmethod
    def load(cls, directory: str) -> "Recommender":
        return cls(*load_trained(directory))

    # ---- users ----------------------------------------------------------------------------
    def known(self, user) -> bool:
        return str(user) in self._states or self.data.user_index(user) is not None

    def _item_raw(self, i: int) -> str:
        return str(self.data.item_ids[i])

    def _lg_next(self, st: _UserState, now: Optional[float]) -> float:
        if now is None:
            return self.default_lg_next
        if not math.isfinite(float(now)):
            raise RecsysError(f"now must be a finite time in seconds, got {now!r}")
        gap = float(now) - st.time
        if gap < 0:
            raise RecsysError(f"now ({now}) is before the user's last event ({st.time})")
        return float(np.log1p(gap))

    @torch.no_grad()
    def _state_for(self, user) -> Optional[_UserState]:
        key = str(user)
        st = self._states.get(key)
        if st is not None:
            return st
        u = self.data.user_index(key)
        if u is None:
            return None
        a, b = self.data.user_events(u)
        if b == a:
            return None
        s = max(a, b - self.max_len)
        seen = set(self.data.items[a:b].tolist())
        state = None
        if isinstance(self.model, SeqRecommender) and b - 1 > s:
            idx = np.arange(s, b - 1)
            batch = make_sequence_batch([self.data.items[idx]], [self.data.log_gap[idx]],
                                        [self.data.log_gap[idx + 1]])
            _, state = self.model.encode(batch)
        st = _UserState(state, int(self.data.items[b - 1]), float(self.data.times[b - 1]),
                        float(self.data.log_gap[b - 1]), seen)
        self._states[key] = st
        return st

    # ---- online update --------------------------------------------------------------------
    @torch.no_grad()
    def update(self, user, item, timestamp: float) -> None:
        """Advance ``user``'s state by one new event in O(1) (one cell step)."""
        i = self.data.item_index(item)
        if i is None:
            raise RecsysError(f"unknown item {item!r}: the model has no embedding for it (retrain to add items)")
        t = float(timestamp)
        if not math.isfinite(t):
            raise RecsysError(f"timestamp must be finite, got {timestamp!r}")
        st = self._state_for(user)
        if st is None:  # first event of a new user
            self._states[str(user)] = _UserState(None, i, t, 0.0, {i})
            return
        if t < st.time:
            raise RecsysError(f"event at {t} is older than the user's last event at {st.time}; "
                              "updates must arrive in time order")
        lg = float(np.log1p(t - st.time))
        if isinstance(self.model, SeqRecommender):
            _, st.state = self.model.step(torch.tensor([st.item]), torch.tensor([st.lg_prev]),
                                          torch.tensor([lg]), st.state)
        st.item, st.time, st.lg_prev = i, t, lg
        st.seen.add(i)

    # ---- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def score_users(self, users: Sequence, now=None) -> Tuple[torch.Tensor, List[bool]]:
        """Scores (len(users), n_items) for many users at once (one batched cell step) and, per
        user, whether it is a cold-start fallback. ``now``: one time or one per user."""
        nows = list(now) if isinstance(now, (list, tuple, np.ndarray)) else [now] * len(users)
        if len(nows) != len(users):
            raise RecsysError("now must be one time or one per user")
        states = [self._state_for(u) for u in users]
        pop = torch.log1p(torch.as_tensor(self.pop_counts, dtype=torch.float32))
        out = pop.unsqueeze(0).repeat(len(users), 1)
        cold = [s is None for s in states]
        warm = [j for j, s in enumerate(states) if s is not None]
        if warm and isinstance(self.model, SeqRecommender):
            ws = [states[j] for j in warm]
            items = torch.tensor([s.item for s in ws])
            lgp = torch.tensor([s.lg_prev for s in ws], dtype=torch.float32)
            lgn = torch.tensor([self._lg_next(s, nows[j]) for s, j in zip(ws, warm)], dtype=torch.float32)
            state = self._stack_states([s.state for s in ws])
            h, _ = self.model.step(items, lgp, lgn, state)
            out[warm] = self.model.scores_from_hidden(h)
        elif warm:  # popularity model
            out[warm] = self.model.item_scores().unsqueeze(0)
        return out, cold

    def _stack_states(self, states: List[object]):
        if all(s is None for s in states):
            return None
        cfg = self.model.cfg
        L, H = cfg.num_layers, cfg.hidden
        zero = torch.zeros(L, 1, H)
        lstm_like = cfg.kind in ("timelstm", "lstm")
        hs, cs = [], []
        for s in states:
            if s is None:
                hs.append(zero)
                cs.append(zero)
            elif lstm_like:
                hs.append(s[0])
                cs.append(s[1])
            else:
                hs.append(s)
        h = torch.cat(hs, dim=1)
        return (h, torch.cat(cs, dim=1)) if lstm_like else h

    def recommend_batch(self, users: Sequence, k: int = 10, now=None, exclude_seen: bool = True
                        ) -> List[Recommendation]:
        if k < 1:
            raise RecsysError("k must be >= 1")
        scores, cold = self.score_users(users, now)
        recs = []
        for j, user in enumerate(users):
            s = scores[j].clone()
            st = self._states.get(str(user))
            if exclude_seen and st is not None and st.seen:
                s[list(st.seen)] = float("-inf")
            kk = min(k, int(torch.isfinite(s).sum()))
            val, idx = torch.topk(s, kk)
            reason = ""
            if cold[j]:
                reason = (f"unknown user {str(user)!r}: no history in the training data, "
                          f"recommending the {kk} most popular items (cold-start fallback)")
            elif self.kind == "pop":
                reason = "popularity model"
            recs.append(Recommendation(str(user), [self._item_raw(i) for i in idx.tolist()],
                                       [float(v) for v in val.tolist()], cold[j], reason))
        return recs

    def recommend(self, user, k: int = 10, now: Optional[float] = None, exclude_seen: bool = True
                  ) -> Recommendation:
        """Top-``k`` raw item ids for ``user`` (seen items excluded); cold-start fallback for
        unknown users (``fallback=True`` and ``reason`` say so)."""
        return self.recommend_batch([user], k, now, exclude_seen)[0]

    # ---- explanation ----------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, user, now: Optional[float] = None) -> List[dict]:
        """For each event in the user's current window: the time gate (``time_lstm*``) or decay
        (``tlstm``) activation -- how much of that event the cell lets in / keeps given the
        elapsed time -- as mean over hidden units (and the fraction of units above 0.5)."""
        if self.kind != "timelstm":
            raise RecsysError(f"explain needs a timelstm model (this checkpoint is {self.kind!r}: no time gates)")
        u = self.data.user_index(user)
        if u is None:
            raise RecsysError(f"unknown user {str(user)!r}: no logged history to explain")
        a, b = self.data.user_events(u)
        s = max(a, b - self.max_len)
        idx = np.arange(s, b)
        st = self._state_for(user)
        lg_next = np.concatenate([self.data.log_gap[idx[1:]], [self._lg_next(st, now)]]).astype(np.float32)
        items = torch.as_tensor(self.data.items[idx])
        x, dt = self.model._step_inputs(items, torch.as_tensor(self.data.log_gap[idx]), torch.as_tensor(lg_next))
        gates = self.model.rnn.time_gate_activations(x.unsqueeze(1), dt.unsqueeze(1))[:, 0, :]
        rows = []
        nxt = np.concatenate([self.data.times[idx[1:]], [np.nan if now is None else float(now)]])
        for j, e in enumerate(idx.tolist()):
            g = gates[j]
            rows.append(dict(position=j + 1, item=self._item_raw(int(self.data.items[e])),
                             time=float(self.data.times[e]),
                             gap_prev_s=float(self.data.gaps[e]) if e > a else None,
                             gap_next_s=None if math.isnan(nxt[j]) else float(nxt[j] - self.data.times[e]),
                             gate_mean=float(g.mean()), gate_open_frac=float((g > 0.5).float().mean())))
        return rows

    @staticmethod
    def format_explain(rows: List[dict]) -> str:
        def fmt_gap(s):
            if s is None:
                return "-"
            for unit, d in (("d", 86400), ("h", 3600), ("m", 60)):
                if s >= d:
                    return f"{s / d:.1f}{unit}"
            return f"{s:.0f}s"
        lines = [f"{'#':>3s}  {'item':<14s} {'time (UTC)':<19s} {'since prev':>10s} {'to next':>9s} "
                 f"{'gate':>6s} {'open':>5s}  bar"]
        for r in rows:
            t = datetime.fromtimestamp(r["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            bar = "#" * int(round(r["gate_mean"] * 20))
            lines.append(f"{r['position']:>3d}  {r['item'][:14]:<14s} {t:<19s} {fmt_gap(r['gap_prev_s']):>10s} "
                         f"{fmt_gap(r['gap_next_s']):>9s} {r['gate_mean']:>6.3f} {r['gate_open_frac']:>5.2f}  {bar}")
        return "\n".join(lines)

    def plot_explain(self, rows: List[dict], path: str, title: str = "") -> None:
        import io
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        n = len(rows)
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * n + 2), 4))
        vals = [r["gate_mean"] for r in rows]
        gaps = [np.log1p(r["gap_next_s"]) if r["gap_next_s"] is not None else 0.0 for r in rows]
        colors = plt.cm.viridis(np.asarray(gaps) / (max(gaps) or 1.0))
        ax.bar(range(1, n + 1), vals, color=colors)
        ax.set_xticks(range(1, n + 1))
        ax.set_xticklabels([r["item"][:10] for r in rows], rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("time gate / decay (mean over units)")
        ax.set_xlabel("past events, oldest to newest (colour: log gap to the next event)")
        ax.set_title(title or "how much each past event counts")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        ckpt.atomic_write_bytes(path, buf.getvalue())
