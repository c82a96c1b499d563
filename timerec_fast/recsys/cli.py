"""The ``timerec`` command line (also ``python -m timerec_fast.recsys``).

    timerec demo                                   synthetic log -> TimeLSTM vs GRU -> metrics, kernel speed
    timerec data      --data PATH [format options] cleaning report and split summary
    timerec train     --data PATH --model {timelstm,gru,lstm,pop} --out DIR [--epochs N] [--seed S] ...
    timerec evaluate  --checkpoint DIR [--json]
    timerec recommend --checkpoint DIR --user U [-k 10] [--now T]
    timerec explain   --checkpoint DIR --user U [--png FILE]
    timerec bench                                  fused kernels vs torch.nn on this machine

User mistakes (missing file, wrong columns, unknown options ...) print one clear message and
exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import List, Optional

from .errors import RecsysError

EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------------------------
# argument groups
# --------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="interaction log (CSV/TSV, MovieLens, RecBole .inter, "
                                                 "DIGINETICA, Parquet)")
    g.add_argument("--format", default="auto",
                   choices=["auto", "csv", "tsv", "movielens", "recbole", "diginetica", "parquet"])
    g.add_argument("--sep", default=None, help="field delimiter (default: detected); 'tab' for TAB")
    g.add_argument("--no-header", action="store_true", help="the file has no header row (columns col0, col1, ...)")
    g.add_argument("--user-col", default=None, help="user (or session) column; default: detected")
    g.add_argument("--item-col", default=None)
    g.add_argument("--time-col", default=None)
    g.add_argument("--time-unit", default="auto", choices=["auto", "s", "ms", "us", "ns"],
                   help="unit of numeric timestamps")
    g.add_argument("--time-format", default=None, help="strptime format for text timestamps (default: ISO 8601)")
    g.add_argument("--time-offset-col", default=None, help="column added to the timestamp (e.g. DIGINETICA timeframe)")
    g.add_argument("--time-offset-unit", default="ms", choices=["s", "ms", "us", "ns"])
    g.add_argument("--value-col", default=None, help="value/rating column used with --min-value")
    g.add_argument("--min-value", type=float, default=None, help="keep rows with value >= this")
    g.add_argument("--event-col", default=None, help="event type column used with --events")
    g.add_argument("--events", default=None, help="comma-separated event types to keep")
    g.add_argument("--kcore", type=int, default=0, help="k-core filter (users and items with >= k events)")
    g.add_argument("--keep-duplicates", action="store_true", help="keep exact (user, item, time) duplicates")
    g.add_argument("--split", default="loo", choices=["loo", "time"],
                   help="loo: leave-one-out by time (RecBole); time: global time split")
    g.add_argument("--valid-frac", type=float, default=0.1)
    g.add_argument("--test-frac", type=float, default=0.1)


def _load(args, printer=print):
    from .data import load_data
    events = [e.strip() for e in args.events.split(",")] if args.events else None
    return load_data(args.data, fmt=args.format, sep=args.sep, header=False if args.no_header else None,
                     printer=printer, user_col=args.user_col, item_col=args.item_col, time_col=args.time_col,
                     time_unit=args.time_unit, time_format=args.time_format, time_offset_col=args.time_offset_col,
                     time_offset_unit=args.time_offset_unit, value_col=args.value_col, min_value=args.min_value,
                     event_col=args.event_col, events=events, dedup=not args.keep_duplicates, kcore=args.kcore)


def _source(args) -> dict:
    keys = ["data", "format", "sep", "no_header", "user_col", "item_col", "time_col", "time_unit", "time_format",
            "time_offset_col", "time_offset_unit", "value_col", "min_value", "event_col", "events", "kcore",
            "keep_duplicates"]
    return {k: getattr(args, k) for k in keys}


def limit_heap_growth() -> None:
    """glibc only: serve allocations >= 1 MiB with mmap (fixed threshold) and trim the heap above
    1 MiB. PyTorch allocates many large, differently sized temporaries (packed batches vary in
    length); with glibc's default *dynamic* mmap threshold they end up in the heap, fragment it,
    and the peak RSS of a training run creeps up epoch after epoch (MovieLens-100K TimeLSTM:
    ~1.2 GB instead of ~0.55 GB). Called by the ``timerec`` commands that train, not by the
    library functions (it changes a process-wide setting). ``TIMEREC_NO_MALLOPT=1`` skips it."""
    if os.environ.get("TIMEREC_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc (e.g. musl): nothing to tune


def _parse_now(s: Optional[str]) -> Optional[float]:
    if s is None:
        return None
    try:
        v = float(s)
    except ValueError:
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise RecsysError(f"--now {s!r}: give unix seconds or an ISO date/time") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    if not math.isfinite(v):
        raise RecsysError(f"--now {s!r} is not finite")
    return v


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def cmd_data(args) -> int:
    from .sequences import make_split
    data, _ = _load(args)
    kw = dict(valid_frac=args.valid_frac, test_frac=args.test_frac) if args.split == "time" else {}
    print(make_split(data, args.split, **kw).summary())
    return 0


def _train_config(args):
    from .train import TrainConfig
    return TrainConfig(model=args.model, variant=args.variant, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay, dropout=args.dropout,
                       emb_dim=args.emb_dim, hidden=args.hidden, num_layers=args.layers,
                       time_features=not args.no_time_features, max_len=args.max_len, loss=args.loss,
                       n_neg=args.n_neg, patience=args.patience, seed=args.seed, split=args.split,
                       valid_frac=args.valid_frac, test_frac=args.test_frac,
                       exclude_history=not args.include_history, ties=args.ties, threads=args.threads,
                       device=args.device, tensorboard=args.tensorboard)


def cmd_train(args) -> int:
    from .train import dist_info, train
    cfg = _train_config(args)
    cfg.validate()
    limit_heap_growth()
    quiet_rank = int(os.environ.get("RANK", "0")) != 0
    data, _ = _load(args, printer=(lambda *_: None) if quiet_rank else print)
    res = train(data, cfg, args.out, resume=args.resume, source=_source(args),
                progress=not args.no_progress and sys.stderr.isatty())
    if args.json and dist_info()[0] == 0:
        print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table
    from .serve import load_trained
    from .train import TrainConfig, split_for
    model, data, conf = load_trained(args.checkpoint)
    tc = TrainConfig(**{k: v for k, v in conf["train"].items() if k in TrainConfig.__dataclass_fields__})
    split = split_for(data, tc)
    excl = not args.include_history
    out = {"checkpoint": args.checkpoint, "model": tc.model, "split": split.kind, "exclude_history": excl,
           "ties": args.ties}
    for which in ("valid", "test"):
        out[which] = evaluate(model, data, split, which, tc.max_len, exclude_history=excl, ties=args.ties)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(split.summary())
        print(format_table({f"{tc.model} valid": out["valid"], f"{tc.model} test": out["test"]}))
    return 0


def cmd_recommend(args) -> int:
    from .serve import Recommender
    rec = Recommender.load(args.checkpoint)
    now = _parse_now(args.now)
    results = rec.recommend_batch(args.user, k=args.k, now=now, exclude_seen=not args.include_seen)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    for r in results:
        if r.fallback:
            print(f"note: {r.reason}")
        print(f"top {len(r.items)} for user {r.user}" + (f" at {args.now}" if args.now else "") + ":")
        for j, (i, s) in enumerate(zip(r.items, r.scores), 1):
            print(f"  {j:>3d}. {i:<20s} {s:8.3f}")
    return 0


def cmd_explain(args) -> int:
    from .serve import Recommender
    rec = Recommender.load(args.checkpoint)
    rows = rec.explain(args.user, now=_parse_now(args.now))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"user {args.user}: time-gate activation per past event (mean over hidden units; "
              f"'open' = fraction of units > 0.5)")
        print(Recommender.format_explain(rows))
    png = args.png or os.path.join(args.checkpoint, f"explain_{_safe(args.user)}.png")
    rec.plot_explain(rows, png, title=f"user {args.user}: how much each past event counts")
    if not args.json:
        print(f"plot: {png}")
    return 0


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))[:60]


def cmd_bench(args) -> int:
    try:
        import timerec_fast.bench as bench
    except ImportError:
        raise RecsysError("timerec_fast.bench is not available in this installation") from None
    if not hasattr(bench, "run_quick"):
        raise RecsysError("timerec_fast.bench has no run_quick(); use the benchmarks/ scripts")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"fused kernels vs torch.nn on this machine ({torch.get_num_threads()} threads):")
    bench.run_quick()
    return 0


def cmd_demo(args) -> int:
    from .data import load_data
    from .evaluate import format_table
    from .serve import Recommender
    from .synth import write_csv
    from .train import TrainConfig, train
    t0 = time.perf_counter()
    limit_heap_growth()
    out = args.out or tempfile.mkdtemp(prefix="timerec-demo-")
    os.makedirs(out, exist_ok=True)
    path = write_csv(os.path.join(out, "synthetic.csv"), n_users=args.users, seed=args.seed)
    print(f"== timerec demo: synthetic log with sessions, resumptions, drifting interests and weekly comebacks\n"
          f"   written to {path}\n")
    data, _ = load_data(path)
    results, extra = {}, {}
    models = ["timelstm", "gru"] + (["pop"] if not args.no_pop else [])
    for m in models:
        print(f"\n== training {m}")
        cfg = TrainConfig(model=m, epochs=args.epochs, patience=args.patience, seed=args.seed, hidden=64,
                          emb_dim=64, lr=5e-3, batch_size=16, max_len=50, dropout=0.1)
        res = train(data, cfg, os.path.join(out, m), progress=sys.stderr.isatty())
        results[m] = res["test"]
        extra[m] = (f"{res['epochs_run']} epochs, {res['seconds_per_epoch']:.2f} s/epoch, "
                    f"total {res['total_seconds']:.1f} s" if m != "pop" else "popularity (no training)")
    print("\n== test metrics (leave-one-out by time, full ranking over all items, history excluded)")
    print(format_table(results, extra=extra))
    a, b = results["timelstm"]["NDCG@10"], results["gru"]["NDCG@10"]
    print(f"\nTimeLSTM NDCG@10 {a:.4f} vs GRU {b:.4f}: {'+' if a >= b else ''}{(a / b - 1) * 100 if b else float('nan'):.0f}%"
          f" -- the gap to the moment of prediction tells whether the user continues, resumes, starts"
          f" something new or comes back to a weekly habit.")
    rec = Recommender.load(os.path.join(out, "timelstm"))
    user = str(data.user_ids[0])
    a0, b0 = data.user_events(0)
    t_last = float(data.times[b0 - 1])
    for label, gap in (("2 minutes", 120.0), ("2 hours", 7200.0), ("1 day", 86400.0), ("7 days", 7 * 86400.0)):
        r = rec.recommend(user, k=5, now=t_last + gap)
        print(f"user {user}, next request {label} after the last event: {', '.join(r.items)}")
    print(f"(last events: {', '.join(str(data.item_ids[i]) for i in data.items[max(a0, b0 - 5):b0])})")
    print(f"\n== explain: user {user}")
    rows = rec.explain(user, now=t_last + 86400.0)
    print(Recommender.format_explain(rows[-10:]))
    png = os.path.join(out, "explain.png")
    rec.plot_explain(rows, png)
    print(f"plot: {png}; learning curves: {out}/<model>/curves.png")
    if not args.no_bench:
        # In a fresh process: the heap settings above (fixed 1 MiB mmap threshold) make every
        # large temporary a fresh mmap, which would skew the timings against the fused ops.
        print("\n== fused kernels vs torch.nn on this machine", flush=True)
        import subprocess
        r = subprocess.run([sys.executable, "-m", "timerec_fast.recsys", "bench"])
        if r.returncode != 0:
            print(f"(bench failed with exit status {r.returncode})")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; checkpoints in {out}")
    print(f"try: timerec recommend --checkpoint {os.path.join(out, 'timelstm')} --user {user}")
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timerec", description="Time-aware next-item recommendation on fused "
                                "recurrent kernels (TimeLSTM, GRU, LSTM).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="synthetic data -> train TimeLSTM and GRU -> metrics + kernel speed (no data, no network)")
    d.add_argument("--out", default=None, help="directory for the data and checkpoints (default: a temp dir)")
    d.add_argument("--users", type=int, default=500)
    d.add_argument("--epochs", type=int, default=25)
    d.add_argument("--patience", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-bench", action="store_true", help="skip the kernel speed comparison")
    d.add_argument("--no-pop", action="store_true", help="skip the popularity reference")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("data", help="read and clean a log; print the report and split sizes")
    _add_data_args(s)
    s.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a model and write a checkpoint directory")
    _add_data_args(t)
    t.add_argument("--model", default="timelstm", choices=["timelstm", "gru", "lstm", "pop"])
    t.add_argument("--variant", default="time_lstm3", choices=["time_lstm1", "time_lstm2", "time_lstm3", "tlstm"])
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping on valid NDCG@10)")
    t.add_argument("--patience", type=int, default=5)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=5e-3)
    t.add_argument("--optimizer", default="adam", choices=["adam", "adamw"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--dropout", type=float, default=0.2)
    t.add_argument("--emb-dim", type=int, default=64)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--max-len", type=int, default=50)
    t.add_argument("--loss", default="full", choices=["full", "sampled"])
    t.add_argument("--n-neg", type=int, default=256, help="negatives per step for --loss sampled")
    t.add_argument("--no-time-features", action="store_true", help="timelstm: no log-gap input features (Δt only)")
    t.add_argument("--include-history", action="store_true", help="do not exclude history items when ranking")
    t.add_argument("--ties", default="average", choices=["average", "pessimistic"])
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--tensorboard", default=None, metavar="DIR", help="also log to TensorBoard in DIR")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    t.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="full-ranking metrics of a checkpoint on its validation and test targets")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--json", action="store_true")
    e.add_argument("--include-history", action="store_true")
    e.add_argument("--ties", default="average", choices=["average", "pessimistic"])
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("recommend", help="top-K items for users (cold-start fallback for unknown users)")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--user", required=True, action="append", help="raw user id (repeat for several users)")
    r.add_argument("-k", type=int, default=10)
    r.add_argument("--now", default=None, help="request time (unix seconds or ISO); default: median gap")
    r.add_argument("--include-seen", action="store_true")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recommend)

    x = sub.add_parser("explain", help="how much each past event of a user still counts (time gates), table + PNG")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--user", required=True)
    x.add_argument("--now", default=None)
    x.add_argument("--png", default=None, help="plot path (default: CHECKPOINT/explain_<user>.png)")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_explain)

    b = sub.add_parser("bench", help="fused kernels vs torch.nn on this machine")
    b.add_argument("--threads", type=int, default=0)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except RecsysError as e:
        print(f"timerec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # unwritable --out, disk full, unreadable file ...
        print(f"timerec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
