"""The ``timerec`` command line, end to end, including clear errors for user mistakes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from timerec_fast.recsys.cli import main
from timerec_fast.recsys.synth import write_csv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    return write_csv(str(tmp_path_factory.mktemp("data") / "log.csv"), n_users=80, seed=2)


@pytest.fixture(scope="module")
def checkpoints(csv_path, tmp_path_factory):
    out = {}
    for model in ("timelstm", "gru"):
        d = str(tmp_path_factory.mktemp("ck") / model)
        rc = main(["train", "--data", csv_path, "--model", model, "--out", d, "--epochs", "2", "--seed", "1",
                   "--hidden", "24", "--emb-dim", "16", "--max-len", "20", "--no-progress"])
        assert rc == 0
        out[model] = d
    return out


def run_cli(capsys, *args):
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_train_prints_report_and_table(csv_path, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "train", "--data", csv_path, "--model", "lstm", "--out", str(tmp_path / "l"),
                           "--epochs", "1", "--hidden", "16", "--emb-dim", "16", "--no-progress", "--json")
    assert rc == 0
    assert "rows read" in out and "dropped" in out and "leave-one-out" in out
    assert "NDCG" in out and "s/epoch" in out and "peak RSS" in out
    js = json.loads(out[out.index("{\n"):])
    assert js["model"] == "lstm" and "NDCG@10" in js["test"]


def test_evaluate_json(checkpoints, capsys):
    rc, out, err = run_cli(capsys, "evaluate", "--checkpoint", checkpoints["gru"], "--json")
    assert rc == 0
    js = json.loads(out)
    for key in ("NDCG@10", "HR@10", "MRR@10", "Precision@5", "Recall@20", "F1@10"):
        assert 0.0 <= js["test"][key] <= 1.0
    assert js["test"]["n"] > 0 and js["exclude_history"] is True
    rc, out, _ = run_cli(capsys, "evaluate", "--checkpoint", checkpoints["gru"])
    assert rc == 0 and "gru test" in out and "NDCG" in out
    # evaluate reproduces the numbers training wrote
    with open(os.path.join(checkpoints["gru"], "metrics.json")) as f:
        assert json.load(f)["test"]["NDCG@10"] == pytest.approx(js["test"]["NDCG@10"])


def test_recommend_known_and_unknown_user(checkpoints, capsys):
    rc, out, err = run_cli(capsys, "recommend", "--checkpoint", checkpoints["timelstm"], "--user", "u0",
                           "-k", "7", "--now", "1700000000")
    assert rc == 0 and "top 7 for user u0" in out and "note:" not in out
    assert len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 7
    rc, out, err = run_cli(capsys, "recommend", "--checkpoint", checkpoints["timelstm"], "--user", "ghost",
                           "--json")
    js = json.loads(out)
    assert rc == 0 and js[0]["fallback"] is True and "unknown user" in js[0]["reason"]
    rc, out, err = run_cli(capsys, "recommend", "--checkpoint", checkpoints["gru"], "--user", "ghost")
    assert rc == 0 and "note: unknown user 'ghost'" in out and "cold-start" in out


def test_explain(checkpoints, capsys, tmp_path):
    png = str(tmp_path / "x.png")
    rc, out, err = run_cli(capsys, "explain", "--checkpoint", checkpoints["timelstm"], "--user", "u1", "--png", png)
    assert rc == 0 and "gate" in out and os.path.exists(png)
    rc, out, err = run_cli(capsys, "explain", "--checkpoint", checkpoints["gru"], "--user", "u1")
    assert rc == 2 and "timelstm" in err and "Traceback" not in err


def test_data_command(csv_path, capsys):
    rc, out, err = run_cli(capsys, "data", "--data", csv_path, "--split", "time")
    assert rc == 0 and "kept:" in out and "split: time" in out


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "/no/such/file.csv", "--out", "OUT"], "not found: /no/such/file.csv"),
    (["evaluate", "--checkpoint", "/no/such/dir"], "checkpoint directory not found"),
    (["recommend", "--checkpoint", "/no/such/dir", "--user", "1"], "not found"),
])
def test_user_errors_exit_2_without_traceback(args, needle, capsys, tmp_path):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_wrong_columns_lists_columns(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("customer,product,when\n1,2,3\n")
    rc, out, err = run_cli(capsys, "train", "--data", str(p), "--out", str(tmp_path / "o"))
    assert rc == 2 and "customer, product, when" in err
    rc, out, err = run_cli(capsys, "train", "--data", str(p), "--out", str(tmp_path / "o"), "--user-col", "customer",
                           "--item-col", "product", "--time-col", "nope")
    assert rc == 2 and "'nope'" in err and "customer, product, when" in err


def test_nothing_left_and_resume_errors(csv_path, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "train", "--data", csv_path, "--out", str(tmp_path / "o"), "--kcore", "100000")
    assert rc == 2 and "nothing left" in err
    rc, out, err = run_cli(capsys, "train", "--data", csv_path, "--out", str(tmp_path / "o2"), "--resume")
    assert rc == 2 and "resume" in err


def test_module_entry_point_and_help():
    r = subprocess.run([sys.executable, "-m", "timerec_fast.recsys", "--help"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0
    for cmd in ("demo", "train", "evaluate", "recommend", "explain", "bench"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "timerec_fast.recsys", "train", "--data", "/nope.csv", "--out", "/tmp/x"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs_end_to_end_small(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "demo", "--out", str(tmp_path / "demo"), "--users", "60", "--epochs", "2",
                           "--no-bench", "--no-pop")
    assert rc == 0
    assert "timelstm" in out and "gru" in out and "NDCG" in out and "explain" in out
    assert os.path.exists(tmp_path / "demo" / "timelstm" / "model.pt")
    assert os.path.exists(tmp_path / "demo" / "explain.png")


def test_out_is_a_file_and_unwritable(csv_path, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, out, err = run_cli(capsys, "train", "--data", csv_path, "--out", str(f), "--epochs", "1")
    assert rc == 2 and "not a directory" in err and "Traceback" not in err
    rc, out, err = run_cli(capsys, "train", "--data", csv_path, "--out", str(f / "sub"), "--epochs", "1")
    assert rc == 2 and "Traceback" not in err
