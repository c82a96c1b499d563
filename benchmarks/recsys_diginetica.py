"""DIGINETICA (CIKM Cup 2016) item-view sample, end to end, sessions as users.

The sample (12,391 views, 2,986 sessions, 7,139 items) is far too small for quality claims -- it
checks that the whole pipeline runs on an anonymous session log: reading the `;`-separated file
with its eventdate + timeframe (ms) clock, sessions as users, leave-one-out by time over sessions
with >= 3 views, full ranking over all 7,139 items, and serving a session.

    python benchmarks/recsys_diginetica.py [--models timelstm,gru,pop] [--split loo|time]

Note: views repeat inside sessions; with history exclusion on (the default) a repeated view
cannot be hit, and the JSON's ``targets_in_history`` says how many there are.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from timerec_fast.recsys.data import datasets_root  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(datasets_root(), "diginetica-sample", "sample_train-item-views.csv"))
    ap.add_argument("--models", default="timelstm,gru,pop")
    ap.add_argument("--split", default="loo", choices=["loo", "time"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not os.path.exists(a.data):
        raise SystemExit(f"DIGINETICA sample not found at {a.data}; set TIMEREC_DATASETS or pass --data")
    root = a.out or tempfile.mkdtemp(prefix="timerec-diginetica-")
    res = {}
    for m in a.models.split(","):
        out = os.path.join(root, m)
        cmd = [sys.executable, "-m", "timerec_fast.recsys", "train", "--data", a.data, "--model", m, "--out", out,
               "--split", a.split, "--epochs", "30", "--patience", "3", "--max-len", "50", "--no-progress",
               "--threads", str(a.threads), "--seed", "42"]
        print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr)
            raise SystemExit(f"{m} failed (exit {r.returncode})")
        if m == a.models.split(",")[0]:
            print("\n".join("   " + ln for ln in r.stdout.splitlines() if not ln.startswith("epoch"))[:3000])
        with open(os.path.join(out, "metrics.json")) as f:
            res[m] = json.load(f)
    print(f"\nDIGINETICA sample, sessions as users, split={a.split}, full ranking over all items, history excluded")
    print(f"{'model':<10s} {'NDCG@10':>8s} {'HR@10':>7s} {'MRR@10':>7s} {'HR@20':>7s} {'targets':>8s} "
          f"{'repeats':>8s} {'epochs':>6s} {'s/epoch':>8s} {'total s':>8s} {'peak MB':>8s}")
    for m, r in res.items():
        t = r["test"]
        print(f"{m:<10s} {t['NDCG@10']:>8.4f} {t['HR@10']:>7.4f} {t['MRR@10']:>7.4f} {t['HR@20']:>7.4f} {t['n']:>8d} "
              f"{t['targets_in_history']:>8d} {r['epochs_run']:>6d} {r['seconds_per_epoch']:>8.2f} "
              f"{r['total_seconds']:>8.1f} {r['peak_rss_mb']:>8.0f}")
    m0 = a.models.split(",")[0]
    if m0 != "pop":
        print("\nserving one session:")
        sub = subprocess.run([sys.executable, "-m", "timerec_fast.recsys", "recommend", "--checkpoint",
                              os.path.join(root, m0), "--user", "1", "-k", "5"], cwd=REPO, text=True,
                             capture_output=True)
        print(sub.stdout + sub.stderr)
    print(f"checkpoints: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
