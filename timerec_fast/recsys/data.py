"""Interaction logs: reading, cleaning, id maps, per-user sequences.

Reading
    :func:`load_log` reads CSV/TSV (any single-character delimiter, sniffed when not given),
    MovieLens ``u.data`` / ``ratings.dat`` / ``ratings.csv``, RecBole atomic ``.inter`` files
    (typed ``name:type`` headers), the DIGINETICA ``train-item-views`` layout and Parquet (when
    ``pyarrow`` is installed). The format is detected from the file name and header when that
    is unambiguous; otherwise pass ``fmt`` and/or the column options.

Cleaning (:func:`clean_log`)
    Rows are dropped only for a stated reason, and every drop is counted in the printed
    :class:`CleaningReport`: malformed rows, missing user/item/timestamp, unparsable
    timestamps, value/event filters, exact duplicates (same user, item and timestamp; the first
    is kept) and optional k-core filtering.

Order
    Each user's events are sorted by timestamp with a *stable* sort on file order: events with
    equal timestamps keep the order in which they appear in the file. They are never ordered by
    item id (that leaks the id order into the sequence and inflates metrics).

Ids
    Raw user/item ids are kept as strings; internal indices are assigned in order of first
    appearance in the file. :class:`InteractionData` saves both maps so raw ids round-trip.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

MISSING_TOKENS = {"", "na", "nan", "null", "none", "n/a", "-"}

USER_ALIASES = ["user_id", "userid", "user", "uid", "visitorid", "visitor_id", "customer_id",
                "customerid", "session_id", "sessionid"]
ITEM_ALIASES = ["item_id", "itemid", "item", "iid", "movieid", "movie_id", "product_id",
                "productid", "track_id", "article_id", "business_id"]
TIME_ALIASES = ["timestamp", "time", "ts", "datetime", "date", "eventdate", "event_time",
                "created_at", "unix_time", "unixtime"]
VALUE_ALIASES = ["rating", "value", "score"]

FORMATS = ("auto", "csv", "tsv", "movielens", "recbole", "diginetica", "parquet")


# --------------------------------------------------------------------------------------------
# raw table
# --------------------------------------------------------------------------------------------
@dataclass
class RawTable:
    """A header plus rows of strings, straight from the file."""

    columns: List[str]
    rows: List[List[str]]
    path: str
    fmt: str
    # columns implied by the format (e.g. MovieLens files have no header)
    preset: Dict[str, Optional[str]] = field(default_factory=dict)


def _strip_type(name: str) -> str:
    # RecBole typed header: "user_id:token" -> "user_id"
    return name.split(":", 1)[0].strip() if ":" in name else name.strip()


def _read_text_lines(path: str) -> List[str]:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        return f.read().splitlines()


def _sniff_delimiter(sample: str) -> str:
    counts = {d: sample.count(d) for d in ["\t", ",", ";", "|"]}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        raise DataError("could not detect the delimiter (none of TAB , ; | found in the first lines); "
                        "pass --sep")
    return best


def read_table(path: str, fmt: str = "auto", sep: Optional[str] = None,
               header: Optional[bool] = None) -> RawTable:
    """Read a log file into a :class:`RawTable` (strings only; parsing happens in cleaning)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory; pass the interaction file inside it")
    base = os.path.basename(path).lower()

    if fmt == "parquet" or (fmt == "auto" and base.endswith(".parquet")):
        try:
            import pyarrow.parquet as pq  # type: ignore
        except ImportError:
            raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
        tab = pq.read_table(path)
        cols = [str(c) for c in tab.column_names]
        data = [tab.column(c).to_pylist() for c in cols]
        rows = [["" if v is None else str(v) for v in r] for r in zip(*data)]
        return RawTable(cols, rows, path, "parquet")

    lines = _read_text_lines(path)
    if not lines:
        raise DataError(f"{path} is empty")
    first = lines[0]

    # MovieLens files without header
    if fmt in ("auto", "movielens") and base == "u.data":
        rows = [ln.split("\t") for ln in lines if ln.strip()]
        return RawTable(["user_id", "item_id", "rating", "timestamp"], rows, path, "movielens",
                        preset=dict(user="user_id", item="item_id", time="timestamp", value="rating"))
    if fmt in ("auto", "movielens") and base.endswith(".dat") and "::" in first:
        rows = [ln.split("::") for ln in lines if ln.strip()]
        return RawTable(["user_id", "item_id", "rating", "timestamp"], rows, path, "movielens",
                        preset=dict(user="user_id", item="item_id", time="timestamp", value="rating"))
    if fmt == "movielens" and base == "ratings.csv":
        pass  # handled below as a header CSV with userId/movieId columns

    if sep is None:
        if fmt == "tsv" or fmt == "recbole" or base.endswith(".inter") or base.endswith(".tsv"):
            sep = "\t"
        elif fmt == "diginetica":
            sep = ";"
        else:
            sep = _sniff_delimiter("\n".join(lines[:20]))
    sep = "\t" if sep in ("\\t", "tab", "TAB") else sep
    if len(sep) != 1:
        if sep in first:
            rows = [ln.split(sep) for ln in lines]
        else:
            raise DataError(f"delimiter {sep!r} not found in the first line of {path}")
    else:
        rows = list(csv.reader(lines, delimiter=sep))
    rows = [r for r in rows if r and any(x.strip() for x in r)]
    if header is False:
        cols = [f"col{i}" for i in range(len(rows[0]))]
    else:
        cols = [c.strip() for c in rows[0]]
        rows = rows[1:]
        if header is None and _looks_numeric_row(cols):
            raise DataError(f"{path}: the first line looks like data, not a header ({sep.join(cols)!r}); "
                            "pass --no-header and the columns by position (--user-col col0 ...)")
    detected = fmt
    preset: Dict[str, Optional[str]] = {}
    if fmt in ("auto", "recbole") and all(":" in c for c in cols):
        cols = [_strip_type(c) for c in cols]
        detected = "recbole"
    elif fmt == "recbole":
        raise DataError(f"{path}: a RecBole .inter file needs a typed header (name:type); "
                        f"found columns: {', '.join(cols)}")
    low = [c.lower() for c in cols]
    if low == ["session_id", "user_id", "item_id", "timeframe", "eventdate"] and fmt in ("auto", "diginetica"):
        detected = "diginetica"
        preset = dict(user="session_id", item="item_id", time="eventdate", time_offset="timeframe",
                      time_offset_unit="ms")
    elif fmt == "diginetica":
        raise DataError(f"{path}: expected the DIGINETICA header session_id;user_id;item_id;timeframe;eventdate, "
                        f"found columns: {', '.join(cols)}")
    elif low[:4] == ["userid", "movieid", "rating", "timestamp"]:
        detected = "movielens"
        preset = dict(user=cols[0], item=cols[1], time=cols[3], value=cols[2])
    if detected == "auto":
        detected = "tsv" if sep == "\t" else "csv"
    return RawTable(cols, rows, path, detected, preset)


def _looks_numeric_row(cells: Sequence[str]) -> bool:
    n = 0
    for c in cells:
        try:
            float(c)
            n += 1
        except ValueError:
            pass
    return len(cells) > 0 and n == len(cells)


def _find_column(columns: List[str], requested: Optional[str], aliases: List[str], what: str,
                 required: bool = True, flag: str = "") -> Optional[str]:
    if requested is not None:
        if requested in columns:
            return requested
        for c in columns:
            if c.lower() == requested.lower():
                return c
        raise DataError(f"{what} column {requested!r} not found; columns found: {', '.join(columns)}")
    hits = [c for c in columns if c.lower() in aliases]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise DataError(f"ambiguous {what} column: could be any of {', '.join(hits)}; pass {flag} "
                        f"(columns found: {', '.join(columns)})")
    if required:
        raise DataError(f"no {what} column found (looked for {', '.join(aliases[:6])}, ...); pass {flag}. "
                        f"Columns found: {', '.join(columns)}")
    return None


# --------------------------------------------------------------------------------------------
# timestamps
# --------------------------------------------------------------------------------------------
_UNIT = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_times(values: Sequence[str], unit: str = "auto", time_format: Optional[str] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Parse timestamps to float seconds (UTC). Returns ``(seconds, ok_mask)``.

    Numbers are epoch times in ``unit`` ("s", "ms", "us", "ns"; "auto" takes seconds unless the
    median magnitude says milliseconds (>1e11) / microseconds (>1e14) / nanoseconds (>1e17)).
    Other strings are parsed with ``time_format`` (``strptime``) or ISO 8601; naive times are UTC.
    """
    n = len(values)
    out = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    if unit not in ("auto",) + tuple(_UNIT):
        raise DataError(f"unknown time unit {unit!r}; use one of auto, s, ms, us, ns")
    if time_format is None:
        num = np.full(n, np.nan)
        n_num = 0
        for i, v in enumerate(values):
            try:
                x = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(x):
                num[i] = x
                n_num += 1
        if n_num >= max(1, n // 2):
            finite = np.isfinite(num)
            scale = 1.0
            if unit == "auto":
                med = float(np.median(np.abs(num[finite]))) if finite.any() else 0.0
                scale = 1e-9 if med > 1e17 else 1e-6 if med > 1e14 else 1e-3 if med > 1e11 else 1.0
            else:
                scale = _UNIT[unit]
            return num * scale, finite
    for i, v in enumerate(values):
        try:
            if time_format is not None:
                dt = datetime.strptime(v.strip(), time_format)
            else:
                dt = datetime.fromisoformat(v.strip())
        except (TypeError, ValueError):
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        out[i] = dt.timestamp()
        ok[i] = True
    return out, ok


# --------------------------------------------------------------------------------------------
# cleaning
# --------------------------------------------------------------------------------------------
@dataclass
class CleaningReport:
    path: str
    fmt: str
    columns: Dict[str, Optional[str]]
    rows_read: int = 0
    dropped: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    kept: int = 0
    users: int = 0
    items: int = 0
    time_min: float = float("nan")
    time_max: float = float("nan")
    zero_gap_fraction: float = float("nan")
    tied_rows: int = 0

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["dropped"] = dict(self.dropped)
        return d

    def __str__(self) -> str:
        lines = [f"data: {self.path} (format: {self.fmt})",
                 "  columns: " + ", ".join(f"{k}={v}" for k, v in self.columns.items() if v),
                 f"  rows read: {self.rows_read}"]
        if self.dropped:
            for reason, n in self.dropped.items():
                lines.append(f"  dropped {n:>8d}  {reason}")
        else:
            lines.append("  dropped        0  (nothing)")
        lines.append(f"  kept: {self.kept} interactions, {self.users} users, {self.items} items")
        if self.kept:
            t0 = datetime.fromtimestamp(self.time_min, timezone.utc).strftime("%Y-%m-%d")
            t1 = datetime.fromtimestamp(self.time_max, timezone.utc).strftime("%Y-%m-%d")
            lines.append(f"  time span: {t0} .. {t1}; {self.zero_gap_fraction:.1%} of consecutive gaps are 0 s; "
                         f"{self.tied_rows} rows share a timestamp with another row of their user "
                         f"(kept in file order)")
        return "\n".join(lines)


@dataclass
class CleanLog:
    users: np.ndarray  # str (object)
    items: np.ndarray  # str (object)
    times: np.ndarray  # float64 seconds
    report: CleaningReport


def clean_log(table: RawTable, user_col: Optional[str] = None, item_col: Optional[str] = None,
              time_col: Optional[str] = None, time_unit: str = "auto", time_format: Optional[str] = None,
              time_offset_col: Optional[str] = None, time_offset_unit: str = "ms",
              value_col: Optional[str] = None, min_value: Optional[float] = None,
              event_col: Optional[str] = None, events: Optional[Sequence[str]] = None,
              dedup: bool = True, kcore: int = 0) -> CleanLog:
    """Map columns, drop bad rows with counted reasons, apply filters. See module doc."""
    cols = table.columns
    p = table.preset
    ucol = _find_column(cols, user_col or p.get("user"), USER_ALIASES, "user", flag="--user-col")
    icol = _find_column(cols, item_col or p.get("item"), ITEM_ALIASES, "item", flag="--item-col")
    tcol = _find_column(cols, time_col or p.get("time"), TIME_ALIASES, "timestamp", flag="--time-col")
    ocol = time_offset_col or p.get("time_offset")
    if ocol is not None:
        ocol = _find_column(cols, ocol, [], "time offset", flag="--time-offset-col")
        if time_offset_col is None and p.get("time_offset_unit"):
            time_offset_unit = p["time_offset_unit"]
    vcol = None
    if value_col is not None or min_value is not None:
        vcol = _find_column(cols, value_col or p.get("value"), VALUE_ALIASES, "value", flag="--value-col")
    ecol = _find_column(cols, event_col, [], "event type", flag="--event-col") if event_col else None
    if events and ecol is None:
        raise DataError("--events needs --event-col")
    for a, b, what in ((ucol, icol, "user and item"), (ucol, tcol, "user and timestamp"),
                       (icol, tcol, "item and timestamp")):
        if a == b:
            raise DataError(f"the {what} columns are the same column {a!r}; columns found: {', '.join(cols)}")

    report = CleaningReport(table.path, table.fmt,
                            OrderedDict(user=ucol, item=icol, time=tcol, time_offset=ocol, value=vcol, event=ecol))
    rows = table.rows
    report.rows_read = len(rows)
    ncol = len(cols)
    idx = {c: i for i, c in enumerate(cols)}
    ui, ii, ti = idx[ucol], idx[icol], idx[tcol]

    good = [r for r in rows if len(r) == ncol]
    report.drop(f"malformed (not {ncol} fields)", len(rows) - len(good))
    rows = good

    def missing(v: str) -> bool:
        return v.strip().lower() in MISSING_TOKENS

    for name, ci in (("user", ui), ("item", ii), ("timestamp", ti)):
        keep = [r for r in rows if not missing(r[ci])]
        report.drop(f"missing {name} ({cols[ci]})", len(rows) - len(keep))
        rows = keep
    if ocol is not None:
        oi = idx[ocol]
        keep = [r for r in rows if not missing(r[oi])]
        report.drop(f"missing time offset ({ocol})", len(rows) - len(keep))
        rows = keep

    times, ok = parse_times([r[ti] for r in rows], unit=time_unit, time_format=time_format)
    if ocol is not None:
        try:
            scale = _UNIT[time_offset_unit]
        except KeyError:
            raise DataError(f"unknown time offset unit {time_offset_unit!r}") from None
        off = np.full(len(rows), np.nan)
        for j, r in enumerate(rows):
            try:
                off[j] = float(r[idx[ocol]]) * scale
            except ValueError:
                pass
        ok &= np.isfinite(off)
        times = times + np.nan_to_num(off)
    report.drop(f"unparsable timestamp ({tcol})", int((~ok).sum()))
    rows = [r for r, k in zip(rows, ok) if k]
    times = times[ok]

    if vcol is not None and min_value is not None:
        vi = idx[vcol]
        vals = np.full(len(rows), np.nan)
        for j, r in enumerate(rows):
            try:
                vals[j] = float(r[vi])
            except ValueError:
                pass
        bad = ~np.isfinite(vals)
        report.drop(f"unparsable value ({vcol})", int(bad.sum()))
        low = np.isfinite(vals) & (vals < min_value)
        report.drop(f"value {vcol} < {min_value:g}", int(low.sum()))
        keep = ~(bad | low)
        rows = [r for r, k in zip(rows, keep) if k]
        times = times[keep]
    if ecol is not None and events:
        ei = idx[ecol]
        allowed = set(events)
        keep = np.array([r[ei] in allowed for r in rows], dtype=bool)
        report.drop(f"event type not in {sorted(allowed)}", int((~keep).sum()))
        rows = [r for r, k in zip(rows, keep) if k]
        times = times[keep]

    users = np.array([r[ui].strip() for r in rows], dtype=object)
    items = np.array([r[ii].strip() for r in rows], dtype=object)

    if dedup and len(rows):
        seen = set()
        keep = np.ones(len(rows), dtype=bool)
        for j in range(len(rows)):
            key = (users[j], items[j], times[j])
            if key in seen:
                keep[j] = False
            else:
                seen.add(key)
        report.drop("duplicate (same user, item and timestamp; first kept)", int((~keep).sum()))
        users, items, times = users[keep], items[keep], times[keep]

    if kcore and kcore > 1:
        users, items, times, nu, ni = _kcore(users, items, times, kcore)
        report.drop(f"{kcore}-core filter: users with < {kcore} events", nu)
        report.drop(f"{kcore}-core filter: items with < {kcore} events", ni)

    report.kept = len(users)
    if report.kept == 0:
        raise DataError("nothing left after cleaning/filtering:\n" + str(report))
    report.users = len(set(users.tolist()))
    report.items = len(set(items.tolist()))
    report.time_min, report.time_max = float(times.min()), float(times.max())
    # gap statistics in per-user time order (stable on file order)
    uidx = _first_appearance_index(users)
    order = np.lexsort((np.arange(len(times)), times, uidx))
    su, st = uidx[order], times[order]
    same = su[1:] == su[:-1]
    gaps = np.diff(st)[same]
    report.zero_gap_fraction = float((gaps == 0).mean()) if gaps.size else 0.0
    tied = np.zeros(len(st), dtype=bool)
    z = same & (np.diff(st) == 0)
    tied[1:] |= z
    tied[:-1] |= z
    report.tied_rows = int(tied.sum())
    return CleanLog(users, items, times, report)


def _first_appearance_index(values: np.ndarray) -> np.ndarray:
    mapping: Dict[str, int] = {}
    out = np.empty(len(values), dtype=np.int64)
    for j, v in enumerate(values):
        k = mapping.get(v)
        if k is None:
            k = mapping[v] = len(mapping)
        out[j] = k
    return out


def _kcore(users, items, times, k):
    keep = np.ones(len(users), dtype=bool)
    drop_u = drop_i = 0
    while True:
        uc = Counter(users[keep].tolist())
        bad_u = np.array([keep[j] and uc[users[j]] < k for j in range(len(users))], dtype=bool)
        drop_u += int(bad_u.sum())
        keep &= ~bad_u
        ic = Counter(items[keep].tolist())
        bad_i = np.array([keep[j] and ic[items[j]] < k for j in range(len(items))], dtype=bool)
        drop_i += int(bad_i.sum())
        keep &= ~bad_i
        if not bad_u.any() and not bad_i.any():
            break
    return users[keep], items[keep], times[keep], drop_u, drop_i


# --------------------------------------------------------------------------------------------
# indexed data
# --------------------------------------------------------------------------------------------
class InteractionData:
    """Per-user, time-ordered event sequences in CSR layout with raw-id maps.

    ``items[offsets[u]:offsets[u+1]]`` are user ``u``'s item indices in time order (ties in file
    order), ``times[...]`` their timestamps in seconds. ``log_gap[e]`` is ``log1p`` of the gap in
    seconds from the previous event of the same user (0 for a user's first event).
    """

    def __init__(self, user_ids: Sequence[str], item_ids: Sequence[str], offsets: np.ndarray,
                 items: np.ndarray, times: np.ndarray):
        self.user_ids = np.asarray(list(user_ids), dtype=object)
        self.item_ids = np.asarray(list(item_ids), dtype=object)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.items = np.asarray(items, dtype=np.int64)
        self.times = np.asarray(times, dtype=np.float64)
        self._user_index = {u: i for i, u in enumerate(self.user_ids.tolist())}
        self._item_index = {v: i for i, v in enumerate(self.item_ids.tolist())}
        gaps = np.zeros(len(self.times))
        if len(self.times) > 1:
            gaps[1:] = np.diff(self.times)
        gaps[self.offsets[:-1][self.offsets[:-1] < len(self.times)]] = 0.0
        self.gaps = gaps
        self.log_gap = np.log1p(np.maximum(gaps, 0.0)).astype(np.float32)
        self.user_of = np.repeat(np.arange(self.n_users), np.diff(self.offsets))

    @classmethod
    def from_log(cls, log: CleanLog) -> "InteractionData":
        uidx = _first_appearance_index(log.users)
        iidx = _first_appearance_index(log.items)
        user_ids = [None] * (uidx.max() + 1)
        for raw, k in zip(log.users.tolist(), uidx.tolist()):
            user_ids[k] = raw
        item_ids = [None] * (iidx.max() + 1)
        for raw, k in zip(log.items.tolist(), iidx.tolist()):
            item_ids[k] = raw
        # stable: user, then time, then file order -- never item id
        order = np.lexsort((np.arange(len(log.times)), log.times, uidx))
        counts = np.bincount(uidx, minlength=len(user_ids))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(user_ids, item_ids, offsets, iidx[order], log.times[order])

    @classmethod
    def from_arrays(cls, users: Sequence, items: Sequence, times: Sequence[float]) -> "InteractionData":
        """Build from parallel sequences (already clean) -- e.g. columns of a DataFrame. Raw ids
        are converted to strings; rows with equal user and time keep their given order."""
        u = np.asarray([str(x) for x in users], dtype=object)
        i = np.asarray([str(x) for x in items], dtype=object)
        t = np.asarray(times, dtype=np.float64)
        if not (len(u) == len(i) == len(t)):
            raise DataError("users, items and times must have the same length")
        if len(t) == 0:
            raise DataError("no interactions")
        if not np.isfinite(t).all():
            raise DataError("times must be finite")
        return cls.from_log(CleanLog(u, i, t, None))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_events(self) -> int:
        return len(self.items)

    def user_index(self, raw) -> Optional[int]:
        return self._user_index.get(str(raw))

    def item_index(self, raw) -> Optional[int]:
        return self._item_index.get(str(raw))

    def user_events(self, u: int) -> Tuple[int, int]:
        return int(self.offsets[u]), int(self.offsets[u + 1])

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: str) -> None:
        from .checkpoint import atomic_write_bytes
        import io
        buf = io.BytesIO()
        np.savez_compressed(buf, offsets=self.offsets, items=self.items, times=self.times)
        atomic_write_bytes(os.path.join(directory, "data.npz"), buf.getvalue())
        ids = json.dumps({"users": self.user_ids.tolist(), "items": self.item_ids.tolist()})
        atomic_write_bytes(os.path.join(directory, "idmaps.json"), ids.encode("utf-8"))

    @classmethod
    def load(cls, directory: str) -> "InteractionData":
        from .errors import CheckpointError
        try:
            with np.load(os.path.join(directory, "data.npz")) as z:
                offsets, items, times = z["offsets"], z["items"], z["times"]
            with open(os.path.join(directory, "idmaps.json"), "r", encoding="utf-8") as f:
                ids = json.load(f)
        except FileNotFoundError as e:
            raise CheckpointError(f"{directory} is not a complete checkpoint (missing {os.path.basename(e.filename)})") from None
        return cls(ids["users"], ids["items"], offsets, items, times)


def load_data(path: str, fmt: str = "auto", sep: Optional[str] = None, header: Optional[bool] = None,
              verbose: bool = True, printer=print, **clean_kwargs) -> Tuple[InteractionData, CleaningReport]:
    """Read + clean + index a log; prints the cleaning report when ``verbose``."""
    table = read_table(path, fmt=fmt, sep=sep, header=header)
    log = clean_log(table, **clean_kwargs)
    if verbose:
        printer(str(log.report))
    return InteractionData.from_log(log), log.report


def datasets_root() -> str:
    """Where the shared datasets live: ``$TIMEREC_DATASETS`` or ``<repo>/../shared/datasets``."""
    env = os.environ.get("TIMEREC_DATASETS")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    return os.path.normpath(os.path.join(repo, "..", "shared", "datasets"))
