"""Serving: recommend, O(1) online update == re-running the sequence, batch scoring, explain."""
import numpy as np
import pytest
import torch

from timerec_fast.recsys.data import InteractionData
from timerec_fast.recsys.errors import RecsysError
from timerec_fast.recsys.sequences import eval_windows, leave_one_out, make_batch, make_sequence_batch
from timerec_fast.recsys.serve import Recommender, load_trained
from timerec_fast.recsys.synth import generate
from timerec_fast.recsys.train import TrainConfig, train

KINDS = ["timelstm", "gru", "lstm"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = InteractionData.from_arrays(*generate(n_users=80, seed=5))
    out = {}
    for kind in KINDS + ["pop"]:
        d = tmp_path_factory.mktemp(kind)
        cfg = TrainConfig(model=kind, epochs=1, hidden=24, emb_dim=16, batch_size=32, max_len=12, seed=0,
                          dropout=0.3)
        train(data, cfg, str(d), printer=lambda *_: None, progress=False)
        out[kind] = str(d)
    return data, out


def reference_scores(model, items, lg_prev, lg_next):
    """Re-run the whole sequence through the model (the slow, obviously right way)."""
    batch = make_sequence_batch([np.asarray(items)], [np.asarray(lg_prev, np.float32)],
                                [np.asarray(lg_next, np.float32)])
    with torch.no_grad():
        return model.score_batch(batch)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_online_update_equals_rerunning_the_sequence(trained, kind):
    data, dirs = trained
    rec = Recommender.load(dirs[kind])
    model = rec.model
    u = 3
    user = data.user_ids[u]
    a, b = data.user_events(u)
    s = max(a, b - rec.max_len)
    items = data.items[s:b].tolist()
    times = data.times[s:b].tolist()
    lg_prev = data.log_gap[s:b].tolist()
    rng = np.random.default_rng(0)
    t = times[-1]
    for step in range(15):  # 15 new events: the sequence grows past max_len
        t += float(rng.choice([0.0, 30.0, 4000.0, 200000.0]))
        it = int(rng.integers(data.n_items))
        rec.update(user, data.item_ids[it], t)
        lg_prev.append(float(np.log1p(t - times[-1])))
        items.append(it)
        times.append(t)
        if step % 5 == 4:
            for gap in (0.0, 90.0, 7 * 86400.0):
                now = t + gap
                lg_next = lg_prev[1:] + [float(np.log1p(gap))]
                want = reference_scores(model, items, lg_prev, lg_next)
                got, cold = rec.score_users([user], now=now)
                assert not cold[0]
                torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_serving_matches_the_evaluation_path(trained, kind):
    """A server that has seen everything but each user's last event, asked at that event's time,
    scores exactly like evaluation scores the test target."""
    data, dirs = trained
    model, _, conf = load_trained(dirs[kind])
    sp = leave_one_out(data)
    tev = sp.test[:7]
    with torch.no_grad():
        want = model.score_batch(make_batch(data, eval_windows(data, tev, conf["train"]["max_len"])))
    keep = np.ones(data.n_events, dtype=bool)
    keep[sp.test] = False
    counts = np.bincount(data.user_of[keep], minlength=data.n_users)
    cut = InteractionData(data.user_ids, data.item_ids, np.concatenate([[0], np.cumsum(counts)]),
                          data.items[keep], data.times[keep])
    rec = Recommender(model, cut, conf)
    users = [data.user_ids[data.user_of[e]] for e in tev]
    got, cold = rec.score_users(users, now=[float(data.times[e]) for e in tev])
    assert not any(cold)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_recommend_excludes_seen_and_returns_raw_ids(trained):
    data, dirs = trained
    rec = Recommender.load(dirs["timelstm"])
    user = data.user_ids[0]
    a, b = data.user_events(0)
    seen = {data.item_ids[i] for i in data.items[a:b]}
    r = rec.recommend(user, k=10)
    assert len(r.items) == 10 and not r.fallback
    assert not set(r.items) & seen
    assert all(x in set(data.item_ids) for x in r.items)
    assert r.scores == sorted(r.scores, reverse=True)
    r2 = rec.recommend(user, k=10, exclude_seen=False)
    assert r2.scores[0] >= r.scores[0]


def test_batch_scoring_equals_one_by_one(trained):
    data, dirs = trained
    rec = Recommender.load(dirs["lstm"])
    users = [data.user_ids[j] for j in range(0, 40, 3)] + ["nobody"]
    now = [float(data.times[data.offsets[j + 1] - 1]) + 3600.0 for j in range(0, 40, 3)] + [None]
    batch = rec.recommend_batch(users, k=5, now=now)
    for u, n, r in zip(users, now, batch):
        one = rec.recommend(u, k=5, now=n)
        assert one.items == r.items
        np.testing.assert_allclose(one.scores, r.scores, rtol=1e-5, atol=1e-5)


def test_cold_start_fallback_is_said(trained):
    data, dirs = trained
    rec = Recommender.load(dirs["gru"])
    r = rec.recommend("no-such-user", k=5)
    assert r.fallback and "unknown user" in r.reason and "popular" in r.reason
    counts = np.bincount(data.items, minlength=data.n_items)
    top = [data.item_ids[i] for i in np.argsort(-counts, kind="stable")[:5]]
    assert sorted(counts[[data.item_index(x) for x in r.items]].tolist()) == sorted(counts[[data.item_index(x) for x in top]].tolist())
    # a new user with one online event is no longer cold
    rec.update("newcomer", data.item_ids[0], 1e9)
    r = rec.recommend("newcomer", k=5, now=1e9 + 60)
    assert not r.fallback and data.item_ids[0] not in r.items


def test_popularity_checkpoint_serves(trained):
    data, dirs = trained
    rec = Recommender.load(dirs["pop"])
    r = rec.recommend(data.user_ids[1], k=3)
    assert len(r.items) == 3 and not r.fallback


def test_update_and_now_errors(trained):
    data, dirs = trained
    rec = Recommender.load(dirs["timelstm"])
    user = data.user_ids[2]
    t_last = float(data.times[data.offsets[3] - 1])
    with pytest.raises(RecsysError, match="unknown item"):
        rec.update(user, "no-such-item", t_last + 1)
    with pytest.raises(RecsysError, match="older"):
        rec.update(user, data.item_ids[0], t_last - 100)
    with pytest.raises(RecsysError, match="before the user's last event"):
        rec.recommend(user, now=t_last - 100)
    with pytest.raises(RecsysError, match="k must be"):
        rec.recommend(user, k=0)


def test_explain_table_and_png(trained, tmp_path):
    data, dirs = trained
    rec = Recommender.load(dirs["timelstm"])
    user = data.user_ids[4]
    a, b = data.user_events(4)
    rows = rec.explain(user, now=float(data.times[b - 1]) + 3600)
    assert len(rows) == min(b - a, rec.max_len)
    assert all(0.0 < r["gate_mean"] < 1.0 and 0.0 <= r["gate_open_frac"] <= 1.0 for r in rows)
    assert rows[-1]["gap_next_s"] == pytest.approx(3600.0)
    assert [r["item"] for r in rows] == [data.item_ids[i] for i in data.items[b - len(rows):b]]
    # the activations react to time: a different request time changes the last event's gate
    rows2 = rec.explain(user, now=float(data.times[b - 1]) + 30 * 86400)
    assert rows2[-1]["gate_mean"] != rows[-1]["gate_mean"] or rec.model.cfg.dt_source == "prev"
    text = Recommender.format_explain(rows)
    assert rows[0]["item"] in text and "gate" in text
    png = tmp_path / "e.png"
    rec.plot_explain(rows, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RecsysError, match="timelstm"):
        Recommender.load(dirs["gru"]).explain(user)
    with pytest.raises(RecsysError, match="unknown user"):
        rec.explain("nobody")
