"""The synthetic log of ``timerec demo``: real temporal structure, and time information helps."""
import numpy as np
import pytest
import torch

from timerec_fast.recsys.data import InteractionData
from timerec_fast.recsys.synth import DAY, generate
from timerec_fast.recsys.train import TrainConfig, train


def test_deterministic_and_structured():
    a = generate(n_users=60, seed=3)
    b = generate(n_users=60, seed=3)
    c = generate(n_users=60, seed=4)
    assert a == b and a != c
    data = InteractionData.from_arrays(*a)
    gaps = np.concatenate([np.diff(data.times[x:y]) for x, y in zip(data.offsets[:-1], data.offsets[1:])])
    assert (gaps >= 0).all()
    # all four regimes occur, with irregular gaps inside each
    within = gaps < 20 * 60
    brk = (gaps >= 20 * 60) & (gaps < 4 * 3600)
    new = (gaps >= 12 * 3600) & (gaps < 4.5 * DAY)
    weekly = (gaps >= 5.5 * DAY) & (gaps < 8.5 * DAY)
    for m in (within, brk, new, weekly):
        assert m.mean() > 0.05
        assert np.std(np.log(gaps[m] + 1)) > 0.05
    # after a short break the user switches to the companion series (topic ^ 1)
    topic = np.array([int(data.item_ids[i].split("-")[0][1:]) for i in data.items])
    prev_topic = np.concatenate([topic[x:y][:-1] for x, y in zip(data.offsets[:-1], data.offsets[1:])])
    next_topic = np.concatenate([topic[x:y][1:] for x, y in zip(data.offsets[:-1], data.offsets[1:])])
    assert (next_topic[brk] == (prev_topic[brk] ^ 1)).mean() > 0.95
    assert (next_topic[within] == prev_topic[within]).mean() > 0.95


@pytest.mark.slow
def test_time_information_helps(tmp_path):
    """TimeLSTM, which sees the gaps, beats the time-blind GRU baseline on the synthetic log."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = InteractionData.from_arrays(*generate(n_users=300, seed=0))
        res = {}
        for model in ("timelstm", "gru"):
            cfg = TrainConfig(model=model, epochs=25, patience=3, hidden=64, emb_dim=64, lr=5e-3, batch_size=16,
                              dropout=0.1, seed=0)
            res[model] = train(data, cfg, str(tmp_path / model), printer=lambda *_: None,
                               progress=False)["test"]
    finally:
        torch.set_num_threads(n)
    assert res["timelstm"]["NDCG@10"] > 1.05 * res["gru"]["NDCG@10"], res
