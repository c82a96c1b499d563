"""Next-item models.

* ``timelstm`` -- item embedding (+ the gap since the previous event and the gap to the moment of
  prediction, each normalised log1p and expanded on a small Gaussian basis) fed with Δt to
  :class:`timerec_fast.TimeLSTM`; the last hidden state is projected into the item-embedding space
  and scored against *all* items with the tied embedding matrix (+ item bias).
  Δt is the gap to the moment of prediction (``dt_source="next"``; Zhu et al.'s Time-LSTM feeds
  the interval to the next action) for the ``time_lstm*`` variants, and the gap since the
  previous event for ``tlstm`` (Baytas et al. discount the memory by the elapsed time).
* ``gru`` -- GRU4Rec-style: item embedding -> :class:`timerec_fast.GRU` -> tied scoring; no time.
* ``lstm`` -- the same with :class:`timerec_fast.LSTM`.
* ``pop`` -- training popularity; also the cold-start fallback.

All recurrent models read :class:`~timerec_fast.recsys.sequences.Batch` objects whose fields are
PackedSequences, so no compute is spent on padding.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

import timerec_fast

from .errors import RecsysError
from .sequences import Batch

MODEL_KINDS = ("timelstm", "gru", "lstm", "pop")
VARIANTS = ("time_lstm1", "time_lstm2", "time_lstm3", "tlstm")

N_GAP_BASIS = 8
GAP_BASIS_WIDTH = 5.0 / (N_GAP_BASIS - 1)

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelConfig:
    kind: str
    n_items: int
    emb_dim: int = 64
    hidden: int = 128
    num_layers: int = 1
    dropout: float = 0.2
    variant: str = "time_lstm3"
    time_features: bool = True      # feed normalised log-gaps as inputs (timelstm only)
    dt_source: str = "auto"         # "next" | "prev" | "auto" (next for time_lstm*, prev for tlstm)
    time_mean: float = 0.0          # TimeScaler, fitted on training gaps
    time_std: float = 1.0

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise RecsysError(f"unknown model {self.kind!r}; choose one of {', '.join(MODEL_KINDS)}")
        if self.variant not in VARIANTS:
            raise RecsysError(f"unknown TimeLSTM variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.dt_source == "auto":
            self.dt_source = "prev" if self.variant == "tlstm" else "next"
        if self.dt_source not in ("next", "prev"):
            raise RecsysError("dt_source must be next, prev or auto")

    def to_dict(self) -> dict:
        return asdict(self)


def _pk(data: torch.Tensor, like: PackedSequence) -> PackedSequence:
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class SeqRecommender(nn.Module):
    """Recurrent next-item recommender (``timelstm``, ``gru`` or ``lstm``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind == "pop":
            raise RecsysError("use PopularityModel for kind='pop'")
        self.cfg = cfg
        self.is_time = cfg.kind == "timelstm"
        self.use_feats = self.is_time and cfg.time_features
        self.item_emb = nn.Embedding(cfg.n_items, cfg.emb_dim)
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items))
        self.drop = nn.Dropout(cfg.dropout)
        in_dim = cfg.emb_dim + (2 * N_GAP_BASIS if self.use_feats else 0)
        rnn_drop = cfg.dropout if cfg.num_layers > 1 else 0.0
        if cfg.kind == "timelstm":
            self.rnn = timerec_fast.TimeLSTM(in_dim, cfg.hidden, num_layers=cfg.num_layers, dropout=rnn_drop,
                                             variant=cfg.variant)
        elif cfg.kind == "gru":
            self.rnn = timerec_fast.GRU(in_dim, cfg.hidden, num_layers=cfg.num_layers, dropout=rnn_drop)
        else:
            self.rnn = timerec_fast.LSTM(in_dim, cfg.hidden, num_layers=cfg.num_layers, dropout=rnn_drop)
        self.proj = nn.Linear(cfg.hidden, cfg.emb_dim)
        self.register_buffer("time_mean", torch.tensor(float(cfg.time_mean)))
        self.register_buffer("time_std", torch.tensor(float(cfg.time_std)))
        nn.init.normal_(self.item_emb.weight, std=cfg.emb_dim ** -0.5)

    # ---- inputs ----------------------------------------------------------------------------
    def _step_inputs(self, items: torch.Tensor, lg_prev: torch.Tensor, lg_next: torch.Tensor
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Flat inputs (N, in_dim) and Δt (N,) for flat event tensors."""
        x = self.drop(self.item_emb(items))
        if self.use_feats:
            x = torch.cat([x, self.gap_basis(lg_prev, x.dtype), self.gap_basis(lg_next, x.dtype)], dim=-1)
        dt = None
        if self.is_time:
            src = lg_next if self.cfg.dt_source == "next" else lg_prev
            dt = (src.to(x.dtype) / self.time_std).clamp_min(0.0)
        return x, dt

    def gap_basis(self, log_gap: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian radial basis of the normalised log-gap (N, N_GAP_BASIS): lets the cell tell
        gap regimes apart (seconds / hours / days / weeks) with a linear input projection."""
        z = (log_gap.to(dtype) - self.time_mean) / self.time_std
        centers = torch.linspace(-2.5, 2.5, N_GAP_BASIS, dtype=dtype, device=z.device)
        return torch.exp(-0.5 * ((z.unsqueeze(-1) - centers) / GAP_BASIS_WIDTH) ** 2)

    def encode(self, batch: Batch, hx: Optional[State] = None) -> Tuple[PackedSequence, State]:
        x, dt = self._step_inputs(batch.items.data, batch.lg_prev.data, batch.lg_next.data)
        xp = _pk(x, batch.items)
        if self.is_time:
            return self.rnn(xp, _pk(dt, batch.items), hx)
        return self.rnn(xp, hx)

    def step(self, items: torch.Tensor, lg_prev: torch.Tensor, lg_next: torch.Tensor,
             state: Optional[State]) -> Tuple[torch.Tensor, State]:
        """One cell step for a batch of users (T=1): returns (top-layer h (B, H), new state)."""
        x, dt = self._step_inputs(items, lg_prev, lg_next)
        if self.is_time:
            out, st = self.rnn(x.unsqueeze(0), dt.unsqueeze(0), state)
        else:
            out, st = self.rnn(x.unsqueeze(0), state)
        return out[0], st

    @staticmethod
    def last_hidden(state: State) -> torch.Tensor:
        h = state[0] if isinstance(state, tuple) else state
        return h[-1]

    # ---- scoring ---------------------------------------------------------------------------
    def user_vectors(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(h))

    def scores_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.item_bias, self.user_vectors(h), self.item_emb.weight.t())

    def score_batch(self, batch: Batch) -> torch.Tensor:
        """Scores (B, n_items) for the item after each sequence's last event, batch order."""
        _, state = self.encode(batch)
        return self.scores_from_hidden(self.last_hidden(state))

    # ---- training --------------------------------------------------------------------------
    def forward(self, batch: Batch, loss: str = "full", n_neg: int = 0,
                sampler_logq: Optional[torch.Tensor] = None) -> torch.Tensor:
        out, _ = self.encode(batch)
        z = self.user_vectors(out.data)
        tgt = batch.targets.data
        if loss == "full":
            logits = torch.addmm(self.item_bias, z, self.item_emb.weight.t())
            return F.cross_entropy(logits, tgt)
        if loss == "sampled":
            return sampled_softmax_loss(z, tgt, self.item_emb.weight, self.item_bias, n_neg, sampler_logq)
        raise RecsysError(f"unknown loss {loss!r}; use full or sampled")


def sampled_softmax_loss(z: torch.Tensor, targets: torch.Tensor, emb: torch.Tensor, bias: torch.Tensor,
                         n_neg: int, logq: torch.Tensor, remove_accidental_hits: bool = False) -> torch.Tensor:
    """Sampled softmax with logQ correction (Bengio & Senecal 2008; Yi et al. 2019).

    ``n_neg`` negatives are drawn with replacement from the proposal ``q = exp(logq)`` and shared
    by the batch; every logit (positive and negatives) is corrected by ``- log(n_neg * q)``.
    With this correction the expected gradient vanishes exactly where the full softmax's does
    (tested: a bias-only model recovers the target distribution). Accidental hits (a sampled
    negative equal to the target) are kept by default: masking them, as some libraries do, biases
    the estimate towards popular items; ``remove_accidental_hits=True`` masks them anyway."""
    neg = torch.multinomial(logq.exp(), n_neg, replacement=True)
    corr = math.log(n_neg)
    pos_logit = (z * emb[targets]).sum(-1) + bias[targets] - (logq[targets] + corr)
    neg_logit = z @ emb[neg].t() + bias[neg] - (logq[neg] + corr)
    if remove_accidental_hits:
        neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=logits.device))


class PopularityModel(nn.Module):
    """Scores every item by its number of training interactions (log1p)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("counts", torch.zeros(cfg.n_items))

    def fit(self, counts: np.ndarray) -> "PopularityModel":
        self.counts.copy_(torch.as_tensor(counts, dtype=torch.float32))
        return self

    def item_scores(self) -> torch.Tensor:
        return torch.log1p(self.counts)

    def score_batch(self, batch: Batch) -> torch.Tensor:
        n = len(batch.items.sorted_indices)
        return self.item_scores().unsqueeze(0).expand(n, -1)


def build_model(cfg: ModelConfig) -> nn.Module:
    return PopularityModel(cfg) if cfg.kind == "pop" else SeqRecommender(cfg)
