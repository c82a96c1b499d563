"""Training loop: learning, sampled softmax + logQ, reproducibility, resume, atomic checkpoints."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from timerec_fast.recsys import checkpoint as ckpt
from timerec_fast.recsys.data import InteractionData
from timerec_fast.recsys.errors import CheckpointError, RecsysError
from timerec_fast.recsys.models import sampled_softmax_loss
from timerec_fast.recsys.synth import generate
from timerec_fast.recsys.train import TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: one thread is as fast and does not oversubscribe a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_data():
    return InteractionData.from_arrays(*generate(n_users=150, seed=1))


def cfg(**kw):
    base = dict(epochs=2, hidden=32, emb_dim=32, batch_size=16, lr=5e-3, seed=3, patience=10, dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def run(data, out, **kw):
    return train(data, cfg(**kw), str(out), printer=lambda *_: None, progress=False)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_gru_learns_and_beats_popularity(synth_data, tmp_path, loss):
    pop = run(synth_data, tmp_path / "pop", model="pop")
    res = run(synth_data, tmp_path / loss, model="gru", epochs=6, loss=loss, n_neg=64)
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    assert res["valid"]["NDCG@10"] > 1.5 * pop["valid"]["NDCG@10"]
    assert res["test"]["HR@10"] > pop["test"]["HR@10"]


def test_checkpoint_directory_contents(synth_data, tmp_path):
    out = tmp_path / "ck"
    res = run(synth_data, out, model="lstm", epochs=2)
    for f in ("config.json", "data.npz", "idmaps.json", "model.pt", "last.pt", "metrics.json", "curves.png"):
        assert (out / f).exists(), f
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]) >= {"NDCG@10", "HR@10", "MRR@20", "F1@5", "Precision@5", "Recall@20"}
    assert m["seconds_per_epoch"] > 0 and m["peak_rss_mb"] > 0 and m["epochs_run"] == 2
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_same_seed_same_model_and_different_seed_differs(synth_data, tmp_path):
    a = run(synth_data, tmp_path / "a", model="lstm", epochs=2)
    b = run(synth_data, tmp_path / "b", model="lstm", epochs=2)
    c = run(synth_data, tmp_path / "c", model="lstm", epochs=2, seed=4)
    sa = ckpt.load(str(tmp_path / "a" / "last.pt"))["state_dict"]
    sb = ckpt.load(str(tmp_path / "b" / "last.pt"))["state_dict"]
    sc = ckpt.load(str(tmp_path / "c" / "last.pt"))["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["test"] == b["test"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_continues_exactly(synth_data, tmp_path):
    straight = run(synth_data, tmp_path / "s", model="gru", epochs=3)
    run(synth_data, tmp_path / "r", model="gru", epochs=1)
    resumed = train(synth_data, cfg(model="gru", epochs=3), str(tmp_path / "r"), resume=True,
                    printer=lambda *_: None, progress=False)
    s1 = ckpt.load(str(tmp_path / "s" / "last.pt"))
    s2 = ckpt.load(str(tmp_path / "r" / "last.pt"))
    assert s2["epoch"] == 3
    assert all(torch.equal(s1["state_dict"][k], s2["state_dict"][k]) for k in s1["state_dict"])
    assert [h["loss"] for h in s1["history"]] == [h["loss"] for h in s2["history"]]
    assert straight["test"] == resumed["test"]


def test_resume_errors(synth_data, tmp_path):
    with pytest.raises(CheckpointError, match="no .*last.pt"):
        train(synth_data, cfg(model="gru"), str(tmp_path / "none"), resume=True, printer=lambda *_: None,
              progress=False)
    run(synth_data, tmp_path / "x", model="gru", epochs=1)
    with pytest.raises(CheckpointError, match="different"):
        train(synth_data, cfg(model="gru", hidden=48), str(tmp_path / "x"), resume=True,
              printer=lambda *_: None, progress=False)


def test_early_stopping_stops_and_keeps_best(synth_data, tmp_path):
    res = run(synth_data, tmp_path / "es", model="gru", epochs=40, patience=1, lr=0.05)
    assert res["epochs_run"] < 40
    best = max(h["valid"]["NDCG@10"] for h in res["history"])
    assert res["valid"]["NDCG@10"] == pytest.approx(best)   # the reloaded model is the best epoch's
    assert res["history"][res["best_epoch"] - 1]["valid"]["NDCG@10"] == pytest.approx(best)


def _fit_bias_only(corrected: bool, steps: int = 600):
    torch.manual_seed(0)
    n = 50
    p = torch.softmax(torch.randn(n) * 1.5, 0)
    logq = torch.log(p)
    bias = torch.zeros(n, requires_grad=True)
    emb = torch.zeros(n, 1)
    opt = torch.optim.Adam([bias], lr=0.05)
    for _ in range(steps):
        tgt = torch.multinomial(p, 512, replacement=True)
        if corrected:
            loss = sampled_softmax_loss(torch.zeros(512, 1), tgt, emb, bias, 16, logq)
        else:  # the same sampled softmax without the logQ correction
            neg = torch.multinomial(p, 16, replacement=True)
            logits = torch.cat([bias[tgt].unsqueeze(1), bias[neg].unsqueeze(0).expand(512, -1)], 1)
            loss = torch.nn.functional.cross_entropy(logits, torch.zeros(512, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 0.5 * float((torch.softmax(bias.detach(), 0) - p).abs().sum())


def test_sampled_softmax_logq_recovers_the_full_softmax():
    """A bias-only model trained with sampled softmax and a popularity proposal q = p learns
    softmax(bias) ~ p with the logQ correction, and something far from p without it
    (total variation distance)."""
    assert _fit_bias_only(True) < 0.12
    assert _fit_bias_only(False) > 0.4


def test_tensorboard_optional(synth_data, tmp_path):
    try:
        import tensorboard  # noqa: F401
        have = True
    except ImportError:
        have = False
    if have:
        run(synth_data, tmp_path / "tb", model="gru", epochs=1, tensorboard=str(tmp_path / "tblog"))
        assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "tblog"))
    else:
        with pytest.raises(RecsysError, match="pip install tensorboard"):
            run(synth_data, tmp_path / "tb", model="gru", epochs=1, tensorboard=str(tmp_path / "tblog"))


def test_bad_config_is_a_clear_error(synth_data, tmp_path):
    with pytest.raises(RecsysError, match="unknown model"):
        run(synth_data, tmp_path / "b", model="transformer")
    with pytest.raises(RecsysError, match="loss"):
        run(synth_data, tmp_path / "b", model="gru", loss="bpr")


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
CRASH = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    import torch
    from timerec_fast.recsys import checkpoint as ckpt
    path, mode = sys.argv[1], sys.argv[2]
    real_fdopen = os.fdopen
    class Torn:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def write(self, b):
            self.f.write(b[: len(b) // 2]); self.f.flush()
            os._exit(17)                      # hard crash in the middle of the write
        def __getattr__(self, k): return getattr(self.f, k)
    if mode == "write":
        os.fdopen = lambda fd, m: Torn(real_fdopen(fd, m))
    else:
        os.replace = lambda a, b: os._exit(17)  # crash after the temp file, before the rename
    ckpt.atomic_save({"w": torch.full((1000,), 2.0), "epoch": 2}, path)
""")


@pytest.mark.parametrize("mode", ["write", "rename"])
def test_crash_during_checkpoint_write_keeps_last_good(tmp_path, mode):
    path = str(tmp_path / "model.pt")
    ckpt.atomic_save({"w": torch.full((1000,), 1.0), "epoch": 1}, path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    r = subprocess.run([sys.executable, str(script), path, mode, repo], capture_output=True, text=True)
    assert r.returncode == 17, r.stderr
    st = ckpt.load(path)  # still the last good checkpoint
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.full((1000,), 1.0))
    # the torn temp file is left beside it, never in its place; a new save still works
    ckpt.atomic_save({"w": torch.zeros(3), "epoch": 3}, path)
    assert ckpt.load(path)["epoch"] == 3


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.load(str(p))


def test_time_split_training_with_adamw(synth_data, tmp_path):
    res = run(synth_data, tmp_path / "ts", model="gru", epochs=2, split="time", optimizer="adamw",
              weight_decay=0.01)
    st = ckpt.load(str(tmp_path / "ts" / "last.pt"))
    assert st["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    assert res["split"] == "time" and res["test"]["n"] > 100
    assert 0.0 <= res["test"]["NDCG@10"] <= 1.0
