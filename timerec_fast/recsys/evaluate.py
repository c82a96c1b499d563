"""Full-ranking evaluation.

Every target is ranked against *all* items. Items the user interacted with before the target are
excluded by default (``exclude_history=False`` keeps them; the JSON reports how many targets were
repeats of a history item -- with exclusion on, those count as misses).

Ties: with ``ties="average"`` (default) each metric is its expected value when tied scores are
ordered uniformly at random; ``ties="pessimistic"`` puts the target after every item with an
equal score. Either way a model that gives every item the same score gets at most chance-level
metrics (HR@K ~ K / #candidates), never a perfect rank. NaN scores count as -inf.

Metrics at each K, per target (single-target next-item prediction), then averaged:
HR@K (hit), NDCG@K = 1/log2(rank+1), MRR@K = 1/rank (0 beyond K), Precision@K = HR/K,
Recall@K = HR, F1@K = 2PR/(P+R) = 2 HR/(K+1).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .data import InteractionData
from .errors import RecsysError
from .sequences import Split, eval_windows, make_batch

KS = (5, 10, 20)
METRICS = ("HR", "NDCG", "MRR", "Precision", "Recall", "F1")


def rank_counts(scores: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(#items scoring strictly above the target, #other items scoring equal to it)."""
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    ts = s.gather(1, targets.view(-1, 1))
    greater = (s > ts).sum(1)
    equal = (s == ts).sum(1) - 1
    return greater, equal


def _prefix(kmax: int, f) -> torch.Tensor:
    # P[r] = sum_{j=1..r} f(j), P[0] = 0
    v = torch.tensor([0.0] + [f(j) for j in range(1, kmax + 1)], dtype=torch.float64)
    return torch.cumsum(v, 0)


def metric_sums(greater: torch.Tensor, equal: torch.Tensor, ks: Sequence[int] = KS,
                ties: str = "average") -> Dict[str, float]:
    """Sum over targets of every metric (divide by the count to average)."""
    if ties not in ("average", "pessimistic"):
        raise RecsysError("ties must be 'average' or 'pessimistic'")
    g = greater.to(torch.float64)
    e = equal.to(torch.float64)
    if ties == "pessimistic":
        g = g + e
        e = torch.zeros_like(e)
    kmax = max(ks)
    D = _prefix(kmax, lambda j: 1.0 / math.log2(j + 1))
    H = _prefix(kmax, lambda j: 1.0 / j)
    out: Dict[str, float] = {}
    n_pos = e + 1  # ranks g+1 .. g+e+1, each with probability 1/(e+1)
    for k in ks:
        lo = torch.clamp(g, max=k).long()           # ranks <= lo are above the target's range
        hi = torch.clamp(g + e + 1, max=k).long()
        hr = (hi - lo).to(torch.float64) / n_pos
        ndcg = (D[hi] - D[lo]) / n_pos
        mrr = (H[hi] - H[lo]) / n_pos
        out[f"HR@{k}"] = float(hr.sum())
        out[f"NDCG@{k}"] = float(ndcg.sum())
        out[f"MRR@{k}"] = float(mrr.sum())
        out[f"Precision@{k}"] = float(hr.sum() / k)
        out[f"Recall@{k}"] = float(hr.sum())
        out[f"F1@{k}"] = float((2.0 * hr / (k + 1)).sum())
    return out


def history_mask(data: InteractionData, target_events: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs of every item each target's user had before the target."""
    users = data.user_of[target_events]
    starts = data.offsets[users]
    lens = target_events - starts
    rows = np.repeat(np.arange(len(target_events)), lens)
    idx = np.concatenate([np.arange(s, t) for s, t in zip(starts.tolist(), target_events.tolist())]) \
        if len(target_events) else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(rows), torch.from_numpy(data.items[idx])


@torch.no_grad()
def evaluate(model, data: InteractionData, split: Split, which: str = "test", max_len: int = 50,
             ks: Sequence[int] = KS, exclude_history: bool = True, ties: str = "average",
             batch_size: int = 512, distributed: bool = False) -> Dict[str, float]:
    """Full-ranking metrics of ``model`` on the ``which`` targets of ``split``.

    With ``distributed=True`` (inside an initialised process group) each rank scores a shard of
    the targets and the sums are all-reduced, so every rank returns the same numbers."""
    if which not in ("valid", "test"):
        raise RecsysError("which must be 'valid' or 'test'")
    targets = split.valid if which == "valid" else split.test
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = targets[rank::world]
    was_training = model.training
    model.eval()
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = {f"{m}@{k}": 0.0 for k in ks for m in METRICS}
    in_hist = 0
    for i in range(0, len(mine), batch_size):
        tev = mine[i:i + batch_size]
        batch = make_batch(data, eval_windows(data, tev, max_len))
        scores = model.score_batch(batch.to(device)).float().cpu().clone()
        tgt = batch.last_target
        rows, cols = history_mask(data, tev)
        hist = torch.zeros(scores.shape, dtype=torch.bool)
        hist[rows, cols] = True
        tgt_seen = hist.gather(1, tgt.view(-1, 1)).view(-1)
        in_hist += int(tgt_seen.sum())
        if exclude_history:
            scores = scores.masked_fill(hist, float("-inf"))
        g, e = rank_counts(scores, tgt)
        if exclude_history:  # an excluded target cannot be recommended: a miss at every K
            g = torch.where(tgt_seen, torch.full_like(g, 1 << 40), g)
            e = torch.where(tgt_seen, torch.zeros_like(e), e)
        for k, v in metric_sums(g, e, ks, ties).items():
            sums[k] += v
    model.train(was_training)
    vec = torch.tensor([sums[k] for k in sums] + [float(len(mine)), float(in_hist)], dtype=torch.float64)
    if distributed:  # NCCL reduces device tensors only
        vec = vec.to(device)
        dist.all_reduce(vec)
        vec = vec.cpu()
    n = float(vec[-2])
    out = {k: float(vec[j]) / max(n, 1.0) for j, k in enumerate(sums)}
    out["n"] = int(n)
    out["targets_in_history"] = int(vec[-1])
    return out


def format_table(results: Dict[str, Dict[str, float]], ks: Sequence[int] = KS,
                 extra: Optional[Dict[str, str]] = None) -> str:
    """Printable table: one block per model, one row per K, one column per metric."""
    names = list(results)
    w = max([len(n) for n in names] + [5])
    head = " " * (w + 6) + "".join(f"{m:>10s}" for m in METRICS)
    lines = [head]
    for name in names:
        r = results[name]
        for j, k in enumerate(ks):
            label = name if j == 0 else ""
            lines.append(f"{label:<{w}s}  @{k:<3d}" + "".join(f"{r.get(f'{m}@{k}', float('nan')):>10.4f}"
                                                           for m in METRICS))
        if extra and name in extra:
            lines.append(f"{'':<{w}s}  {extra[name]}")
    return "\n".join(lines)
