"""Full-ranking metrics: exact values, tie handling, history exclusion."""
import math

import numpy as np
import pytest
import torch

from timerec_fast.recsys.data import InteractionData
from timerec_fast.recsys.evaluate import evaluate, format_table, metric_sums, rank_counts
from timerec_fast.recsys.models import ModelConfig, PopularityModel
from timerec_fast.recsys.sequences import leave_one_out


def per_target(scores, targets, ties="average", ks=(5, 10, 20)):
    g, e = rank_counts(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(targets))
    s = metric_sums(g, e, ks, ties)
    return {k: v / len(targets) for k, v in s.items()}


def test_exact_values_for_known_ranks():
    n = 30
    scores = torch.arange(n, 0, -1, dtype=torch.float32).repeat(3, 1)  # item j has rank j+1
    m = per_target(scores, [0, 4, 12])  # ranks 1, 5, 13
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["HR@10"] == pytest.approx(2 / 3) and m["HR@20"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(6)) / 3)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(14)) / 3)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 5) / 3)
    assert m["Precision@10"] == pytest.approx(m["HR@10"] / 10)
    assert m["Recall@10"] == m["HR@10"]
    p, r = m["Precision@10"], m["Recall@10"]
    assert m["F1@10"] == pytest.approx(2 * p * r / (p + r))


def test_constant_scores_cannot_score_well():
    n, B = 1000, 50
    scores = torch.zeros(B, n)
    targets = torch.arange(B)
    avg = per_target(scores, targets, "average")
    pes = per_target(scores, targets, "pessimistic")
    assert avg["HR@10"] == pytest.approx(10 / n)          # chance level: expected value over tie orders
    expected_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 11)) / n
    assert avg["NDCG@10"] == pytest.approx(expected_ndcg)
    assert all(v == 0.0 for v in pes.values())
    # all-NaN scores count as -inf: also chance / zero, never a top rank
    nan = per_target(torch.full((B, n), float("nan")), targets, "pessimistic")
    assert nan["HR@20"] == 0.0


def test_partial_ties_average_between_best_and_worst():
    s = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])  # target item 2 ties with items 1 and 3 -> ranks 2..4
    m = per_target(s, [2], "average", ks=(1, 2, 3, 5))
    assert m["HR@1"] == 0.0 and m["HR@2"] == pytest.approx(1 / 3) and m["HR@3"] == pytest.approx(2 / 3)
    assert m["HR@5"] == 1.0
    assert m["MRR@5"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    p = per_target(s, [2], "pessimistic", ks=(3, 5))
    assert p["HR@3"] == 0.0 and p["MRR@5"] == pytest.approx(1 / 4)


def tiny():
    # user a: x y z w; user b: y x w z ; user c: x z w y
    users = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    items = list("xyzw") + list("yxwz") + list("xzwy")
    return InteractionData.from_arrays(users, items, list(range(12)))


class ConstantModel(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def score_batch(self, batch):
        return torch.zeros(len(batch.items.sorted_indices), self.n)


class OracleModel(torch.nn.Module):
    """Scores the true target highest (reads it from the batch) -- checks evaluate's plumbing."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def score_batch(self, batch):
        s = torch.zeros(len(batch.last_target), self.n)
        s[torch.arange(len(s)), batch.last_target] = 1.0
        return s


def test_evaluate_constant_oracle_and_history_exclusion():
    data = tiny()
    sp = leave_one_out(data)
    n = data.n_items
    const = evaluate(ConstantModel(n), data, sp, "test", 50)
    # history excluded: the test target is the only unseen item -> even a constant model ranks it first...
    assert const["HR@5"] == 1.0 and const["NDCG@5"] == 1.0
    assert const["n"] == 3 and const["targets_in_history"] == 0
    # ... but with history kept, ties are averaged over all 4 items: HR@5 = 1, NDCG@5 = mean over ranks 1..4
    c2 = evaluate(ConstantModel(n), data, sp, "test", 50, exclude_history=False, ks=(1, 5))
    assert c2["HR@1"] == pytest.approx(1 / 4)
    oracle = evaluate(OracleModel(n), data, sp, "valid", 50, ks=(1, 5))
    assert oracle["HR@1"] == 1.0 and oracle["NDCG@5"] == 1.0


def test_target_in_history_is_a_miss_when_excluded():
    data = InteractionData.from_arrays(["u"] * 4, list("abca"), [1, 2, 3, 4])  # test target 'a' was seen
    sp = leave_one_out(data)
    o = evaluate(OracleModel(data.n_items), data, sp, "test", 50, ks=(1, 5))
    assert o["targets_in_history"] == 1 and o["HR@5"] == 0.0
    o = evaluate(OracleModel(data.n_items), data, sp, "test", 50, ks=(1, 5), exclude_history=False)
    assert o["HR@1"] == 1.0


def test_popularity_model_and_table():
    data = tiny()
    sp = leave_one_out(data)
    pop = PopularityModel(ModelConfig("pop", data.n_items))
    pop.fit(np.bincount(data.items, minlength=data.n_items))
    r = evaluate(pop, data, sp, "test", 50, exclude_history=False)
    assert 0.0 <= r["NDCG@10"] <= 1.0
    text = format_table({"pop": r})
    assert "NDCG" in text and "@10" in text and "pop" in text
