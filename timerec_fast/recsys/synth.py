"""A synthetic interaction log in which *when* the next event happens tells *what* it will be.

Items belong to topics; each topic's items form a series (item 0, 1, 2, ... of the topic). Each
user's log is a sequence of sessions:

* **within a session** (gaps of seconds to minutes, log-normal) the user mostly moves on to the
  next item of the current series (sometimes skips one, sometimes jumps within the topic);
* **short break** (20 min .. 3 h): the user switches to the companion series (topics come in
  pairs) at the same episode;
* **new session** (12 h .. 3 days): a topic drawn from the user's long-term preferences, starting
  at one of the topic's popular entry items; preferences **drift**: after every such session
  they move towards a fresh random mix;
* **weekly comeback** (7 days +- ~half a day after the last event -- a periodic habit): the user's favourite series,
  continued from their progress in it.

Session starts also follow a daily rhythm (most sessions start in the evening), and every gap is
irregular. A model that does not see time cannot tell which of these four situations the next
event is in; a time-aware model can read it from the gap to the moment of prediction.
"""
from __future__ import annotations

import csv
import os
from typing import List, Optional, Tuple

import numpy as np

DAY = 86400.0


def generate(n_users: int = 600, n_topics: int = 8, items_per_topic: int = 24, sessions_per_user: float = 14.0,
             seed: int = 0) -> Tuple[List[str], List[str], List[float]]:
    """Return ``(users, items, timestamps)`` lists (raw ids as strings, unix seconds)."""
    rng = np.random.default_rng(seed)
    ipt = items_per_topic
    entry_w = 1.0 / np.arange(1, ipt + 1) ** 1.2  # popular entry points early in a series
    entry_w /= entry_w.sum()
    users, items, times = [], [], []
    t_base = 1.6e9
    for u in range(n_users):
        pref = rng.dirichlet(np.full(n_topics, 0.3))
        fav = int(rng.integers(n_topics))
        progress = {fav: int(rng.integers(ipt))}   # next position per series
        t = t_base + rng.uniform(0, 30 * DAY)
        topic, prev_topic = None, None
        n_sessions = 3 + rng.poisson(max(sessions_per_user - 3, 0))
        for s in range(n_sessions):
            kind = "new" if s == 0 else rng.choice(["break", "new", "comeback"], p=[0.35, 0.25, 0.4])
            if kind == "break" and topic is not None:
                # short break (20 min .. 3 h): over to the companion series (topic ^ 1), same episode
                t += float(np.exp(rng.uniform(np.log(20 * 60), np.log(3 * 3600))))
                last_pos = (progress[topic] - 1) % ipt
                prev_topic, topic = topic, topic ^ 1
                progress[topic] = last_pos
            elif kind == "comeback":
                # weekly habit: the favourite series, continued where the user left it
                t += 7 * DAY + float(rng.normal(0, 0.4 * DAY))
                prev_topic, topic = topic, fav
            else:
                # new session (12 h .. 3 days): a topic from the drifting long-term preferences
                gap = float(np.exp(rng.uniform(np.log(12 * 3600), np.log(3 * DAY))))
                t = _evening(t + gap, t + 6 * 3600, rng)
                new_topic = int(rng.choice(n_topics, p=pref))
                prev_topic, topic = topic, new_topic
                progress[topic] = int(rng.choice(ipt, p=entry_w))
                pref = 0.7 * pref + 0.3 * rng.dirichlet(np.full(n_topics, 0.3))  # interest drift
            pos = progress.get(topic, int(rng.choice(ipt, p=entry_w)))
            length = min(int(rng.geometric(0.5)), 8)
            for j in range(length):
                if j > 0:
                    t += float(np.exp(rng.normal(np.log(90.0), 1.0)))
                    r = rng.random()
                    pos = (pos + 1) % ipt if r < 0.8 else (pos + 2) % ipt if r < 0.9 else int(rng.integers(ipt))
                users.append(f"u{u}")
                items.append(f"t{topic}-{pos}")
                times.append(round(float(t), 3))
            progress[topic] = (pos + 1) % ipt
    return users, items, times


def _evening(t: float, t_min: float, rng) -> float:
    """Move a session start to a time of day (on t's day, or later if that is before t_min)
    drawn from an evening-heavy daily rhythm."""
    day0 = np.floor(t / DAY) * DAY
    hour = rng.choice([8, 12, 18, 19, 20, 21, 22], p=[0.1, 0.1, 0.15, 0.2, 0.2, 0.15, 0.1])
    c = float(day0 + hour * 3600 + rng.uniform(0, 3600))
    while c < t_min:
        c += DAY
    return c


def write_csv(path: str, n_users: int = 500, seed: int = 0, **kw) -> str:
    """Write the synthetic log as ``user_id,item_id,timestamp`` CSV; returns the path."""
    users, items, times = generate(n_users=n_users, seed=seed, **kw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for row in zip(users, items, times):
            w.writerow(row)
    return path
