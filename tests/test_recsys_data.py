"""Data loading, cleaning, ordering, splits, time features and packing of timerec_fast.recsys."""
import os

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from timerec_fast.recsys.data import (CleanLog, InteractionData, clean_log, datasets_root, load_data,
                                      parse_times, read_table)
from timerec_fast.recsys.errors import DataError
from timerec_fast.recsys.sequences import (TimeScaler, eval_windows, leave_one_out, make_batch, pack_index,
                                           time_split, train_windows)

ROOT = datasets_root()
ML100K = os.path.join(ROOT, "ml-100k", "ml-100k.inter")
DIGI = os.path.join(ROOT, "diginetica-sample", "sample_train-item-views.csv")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def quiet(path, **kw):
    return load_data(path, verbose=False, **kw)


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------
def test_movielens_u_data(tmp_path):
    p = write(tmp_path, "u.data", "1\t10\t5\t100\n1\t11\t3\t90\n2\t10\t4\t50\n")
    data, rep = quiet(p)
    assert rep.fmt == "movielens" and rep.kept == 3
    u = data.user_index("1")
    a, b = data.user_events(u)
    assert [data.item_ids[i] for i in data.items[a:b]] == ["11", "10"]  # sorted by time
    assert data.times[a:b].tolist() == [90.0, 100.0]


def test_movielens_ratings_dat_and_csv(tmp_path):
    p = write(tmp_path, "ratings.dat", "1::10::5::100\n1::11::3::90\n")
    data, rep = quiet(p)
    assert rep.fmt == "movielens" and data.n_items == 2
    p = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,100\n2,11,3.5,90\n")
    data, rep = quiet(p)
    assert rep.fmt == "movielens" and rep.columns["user"] == "userId" and rep.columns["item"] == "movieId"
    # rating filter through the value column the format implies
    data, rep = quiet(p, min_value=4.0)
    assert rep.kept == 1 and sum(rep.dropped.values()) == 1


def test_recbole_inter_typed_header(tmp_path):
    p = write(tmp_path, "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                   "a\tx\t1\t5\na\ty\t1\t6\nb\tx\t1\t1\n")
    data, rep = quiet(p)
    assert rep.fmt == "recbole" and rep.columns["user"] == "user_id" and rep.kept == 3


def test_diginetica_layout_sessions_as_users(tmp_path):
    p = write(tmp_path, "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
                                     "1;NA;81766;526309;2016-05-09\n1;NA;31331;1031018;2016-05-09\n"
                                     "1;NA;32118;243569;2016-05-09\n2;7;5;10;2016-05-10\n")
    data, rep = quiet(p)
    assert rep.fmt == "diginetica" and rep.columns["user"] == "session_id" and rep.kept == 4
    a, b = data.user_events(data.user_index("1"))
    # eventdate + timeframe (ms): ordered by timeframe within the day
    assert [data.item_ids[i] for i in data.items[a:b]] == ["32118", "81766", "31331"]
    assert data.times[a] == pytest.approx(1462752000.0 + 243.569)


def test_generic_csv_column_mapping_and_iso_times(tmp_path):
    p = write(tmp_path, "log.csv", "who,what,when,kind\n"
                                   "u1,i1,2024-01-01T10:00:00,view\nu1,i2,2024-01-01 10:05:00,buy\n"
                                   "u2,i1,2024-01-02,view\n")
    with pytest.raises(DataError) as e:
        quiet(p)
    assert "who, what, when, kind" in str(e.value)  # lists the columns found
    data, rep = quiet(p, user_col="who", item_col="what", time_col="when")
    assert rep.kept == 3
    a, b = data.user_events(data.user_index("u1"))
    assert data.times[b - 1] - data.times[a] == 300.0
    data, rep = quiet(p, user_col="who", item_col="what", time_col="when", event_col="kind", events=["view"])
    assert rep.kept == 2 and any("event type" in k for k in rep.dropped)


def test_ambiguous_and_missing_columns_list_columns(tmp_path):
    p = write(tmp_path, "a.csv", "user_id,session_id,item_id,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError) as e:
        quiet(p)
    msg = str(e.value)
    assert "ambiguous" in msg and "user_id" in msg and "session_id" in msg and "--user-col" in msg
    with pytest.raises(DataError) as e:
        quiet(p, user_col="nope")
    assert "'nope'" in str(e.value) and "user_id, session_id, item_id, timestamp" in str(e.value)


def test_missing_file_and_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        quiet(str(tmp_path / "nope.csv"))
    p = write(tmp_path, "e.csv", "")
    with pytest.raises(DataError, match="empty"):
        quiet(p)


def test_cleaning_report_counts_every_drop(tmp_path):
    p = write(tmp_path, "d.csv", "user_id,item_id,timestamp\n"
                                 "u1,i1,100\n"
                                 "u1,i1,100\n"          # exact duplicate
                                 ",i2,101\n"            # missing user
                                 "u1,,102\n"            # missing item
                                 "u1,i3,NA\n"           # missing time
                                 "u1,i4,yesterday\n"    # unparsable time
                                 "u1,i5\n"              # malformed
                                 "u2,i1,50\n")
    data, rep = quiet(p)
    d = rep.dropped
    assert rep.rows_read == 8 and rep.kept == 2
    assert sum(d.values()) == 6
    assert d["duplicate (same user, item and timestamp; first kept)"] == 1
    assert d["missing user (user_id)"] == 1 and d["missing item (item_id)"] == 1
    assert d["missing timestamp (timestamp)"] == 1 and d["unparsable timestamp (timestamp)"] == 1
    assert any(k.startswith("malformed") for k in d)
    text = str(rep)
    assert "duplicate" in text and "unparsable" in text and "kept: 2" in text
    # duplicates can be kept on request
    data, rep = quiet(p, dedup=False)
    assert rep.kept == 3


def test_nothing_left_after_filtering(tmp_path):
    p = write(tmp_path, "f.csv", "user_id,item_id,timestamp,rating\nu1,i1,1,1\nu2,i2,2,2\n")
    with pytest.raises(DataError, match="nothing left"):
        quiet(p, value_col="rating", min_value=4)


def test_kcore(tmp_path):
    rows = ["u1,a,1", "u1,b,2", "u2,a,3", "u2,b,4", "u3,a,5", "u3,c,6"]
    p = write(tmp_path, "k.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    data, rep = quiet(p, kcore=2)
    # c has 1 event -> dropped; then u3 has 1 event -> dropped
    assert rep.kept == 4 and data.n_users == 2 and set(data.item_ids) == {"a", "b"}


def test_time_units():
    s, ok = parse_times(["1600000000000", "1600000001000"])
    assert ok.all() and s.tolist() == [1600000000.0, 1600000001.0]  # ms detected
    s, ok = parse_times(["1600000000", "x"])
    assert ok.tolist() == [True, False]
    s, ok = parse_times(["01/02/2024"], time_format="%m/%d/%Y")
    assert ok.all() and s[0] == 1704153600.0


def test_ties_keep_file_order_never_item_id(tmp_path):
    # equal timestamps: order must be the file order (z before a), not the id order
    p = write(tmp_path, "t.csv", "user_id,item_id,timestamp\nu,z,5\nu,a,5\nu,m,5\nu,b,1\n")
    data, rep = quiet(p)
    a, b = data.user_events(0)
    assert [data.item_ids[i] for i in data.items[a:b]] == ["b", "z", "a", "m"]
    assert rep.tied_rows == 3


def test_ids_round_trip(tmp_path):
    users, items = ["x9", "007", "a b"], ["I-1", "0042", "é"]
    data = InteractionData.from_arrays([users[j % 3] for j in range(9)], [items[(j * 2) % 3] for j in range(9)],
                                       list(range(9)))
    data.save(str(tmp_path))
    back = InteractionData.load(str(tmp_path))
    assert back.user_ids.tolist() == data.user_ids.tolist() and back.item_ids.tolist() == data.item_ids.tolist()
    assert np.array_equal(back.items, data.items) and np.array_equal(back.times, data.times)
    for raw in users:
        assert back.user_ids[back.user_index(raw)] == raw
    assert back.user_index("007") != back.user_index("7") or back.user_index("7") is None


# ---------------------------------------------------------------------------------------------
# splits, time features, windows, packing
# ---------------------------------------------------------------------------------------------
def small_data():
    users = ["a"] * 6 + ["b"] * 3 + ["c"] * 2
    items = ["1", "2", "3", "4", "5", "6", "1", "3", "5", "2", "4"]
    times = [0, 10, 10, 1000, 1e5, 2e5, 5, 6, 7, 1, 2]
    return InteractionData.from_arrays(users, items, times)


def test_leave_one_out():
    data = small_data()
    sp = leave_one_out(data)
    assert sp.train_len.tolist() == [4, 1, 2]       # c has 2 events: training only
    assert sp.valid.tolist() == [4, 7] and sp.test.tolist() == [5, 8]
    assert sp.info["users_train_only"] == 1


def test_time_split():
    data = small_data()
    sp = time_split(data, 0.2, 0.2)
    t1, t2 = sp.info["valid_start"], sp.info["test_start"]
    assert all(t1 <= data.times[e] < t2 for e in sp.valid)
    assert all(data.times[e] >= t2 for e in sp.test)
    for u in range(data.n_users):
        a, b = data.user_events(u)
        assert (data.times[a:a + sp.train_len[u]] < t1).all()


def test_windows_cover_training_transitions_once_and_never_eval_targets():
    data = small_data()
    sp = leave_one_out(data)
    for L in (1, 2, 3, 50):
        w = train_windows(data, sp, L)
        assert (w[:, 1] <= L).all()
        tgts = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in w])
        assert sorted(tgts.tolist()) == [1, 2, 3, 10]   # a: 1..3 (train_len 4), b: none, c: 10
        assert not set(tgts) & set(sp.valid.tolist() + sp.test.tolist())
    ew = eval_windows(data, sp.test, 2)
    assert ew.tolist() == [[3, 2], [6, 2]]


def test_time_scaler_uses_training_gaps_only():
    data = small_data()
    sp = leave_one_out(data)
    s1 = TimeScaler.fit(data, sp)
    data.times[5] += 1e7  # change the test gap of user a
    data2 = InteractionData(data.user_ids, data.item_ids, data.offsets, data.items, data.times)
    s2 = TimeScaler.fit(data2, leave_one_out(data2))
    assert (s1.mean, s1.std) == (s2.mean, s2.std)
    train_gaps = np.log1p([10, 0, 990, 1])
    assert s1.mean == pytest.approx(train_gaps.mean(), rel=1e-5)


def test_pack_index_matches_torch_pack_sequence():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 9, size=13)
    seqs = [torch.arange(100 * j, 100 * j + n) for j, n in enumerate(lens)]
    ref = pack_sequence(seqs, enforce_sorted=False)
    idx, bs, si, ui = pack_index(lens)
    flat = torch.cat(seqs)
    assert torch.equal(flat[idx], ref.data) and torch.equal(bs, ref.batch_sizes)
    assert torch.equal(ui[si], torch.arange(len(lens)))


def test_make_batch_fields():
    data = small_data()
    b = make_batch(data, np.array([[0, 3], [6, 2]]))
    assert b.items.data.numel() == 5  # no padding
    assert b.last_target.tolist() == [data.items[3], data.items[8]]
    assert b.target_events.tolist() == [3, 8]
    # lg_next of the last input is the log gap to the target (the prediction time)
    order = b.items.sorted_indices.tolist()
    assert order == [0, 1]
    assert float(b.lg_next.data[-1]) == pytest.approx(np.log1p(990.0))


# ---------------------------------------------------------------------------------------------
# shared datasets (skipped when absent)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(ML100K), reason="ml-100k not available (set TIMEREC_DATASETS)")
def test_ml100k_loads_with_documented_statistics():
    data, rep = quiet(ML100K)
    assert rep.fmt == "recbole" and rep.kept == 100000 and not rep.dropped
    assert data.n_users == 943 and data.n_items == 1682
    assert rep.zero_gap_fraction == pytest.approx(0.51, abs=0.01)
    assert rep.tied_rows == 75772
    sp = leave_one_out(data)
    assert len(sp.test) == 943 and int(sp.train_len.sum()) == 100000 - 2 * 943


@pytest.mark.skipif(not os.path.exists(DIGI), reason="DIGINETICA sample not available")
def test_diginetica_sample_loads():
    data, rep = quiet(DIGI)
    assert rep.fmt == "diginetica" and rep.kept == 12391
    assert data.n_users == 2986 and data.n_items == 7139
    assert rep.zero_gap_fraction == 0.0


def test_parquet_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = str(tmp_path / "log.parquet")
    pq.write_table(pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"], "timestamp": [3, 1, 2]}), p)
    data, rep = quiet(p)
    assert rep.fmt == "parquet" and rep.kept == 3
    a, b = data.user_events(data.user_index("u1"))
    assert [data.item_ids[i] for i in data.items[a:b]] == ["b", "a"]


def test_from_arrays_validates():
    with pytest.raises(DataError, match="same length"):
        InteractionData.from_arrays(["u"], ["i", "j"], [1.0])
    with pytest.raises(DataError, match="finite"):
        InteractionData.from_arrays(["u"], ["i"], [float("nan")])
