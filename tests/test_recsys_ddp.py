"""Distributed data-parallel training: torchrun with 2 CPU processes (gloo) reaches the same
quality as one process on the same data, split and number of optimizer steps."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from timerec_fast.recsys.synth import write_csv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _train(cmd_prefix, csv, out, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = cmd_prefix + ["-m", "timerec_fast.recsys", "train", "--data", csv, "--model", "lstm", "--out", out,
                        "--epochs", "8", "--patience", "8", "--seed", "0", "--hidden", "48", "--emb-dim", "32",
                        "--batch-size", "32", "--lr", "0.005", "--threads", "1", "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f), r.stdout


def test_two_processes_match_one(tmp_path):
    csv = write_csv(str(tmp_path / "log.csv"), n_users=250, seed=4)
    one, _ = _train([sys.executable], csv, str(tmp_path / "one"))
    two, out2 = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                       csv, str(tmp_path / "two"))
    pop, _ = _train([sys.executable], csv, str(tmp_path / "pop"), extra=("--model", "pop"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert "world size 2" in out2 and out2.count("rows read") == 1  # only rank 0 prints
    n1, n2, n0 = one["test"]["NDCG@10"], two["test"]["NDCG@10"], pop["test"]["NDCG@10"]
    assert n1 > 1.5 * n0 and n2 > 1.5 * n0, (n1, n2, n0)
    assert abs(n2 - n1) <= 0.15 * n1, (n1, n2)
    v1, v2 = one["valid"]["NDCG@10"], two["valid"]["NDCG@10"]
    assert abs(v2 - v1) <= 0.15 * v1, (v1, v2)
    # the same number of optimizer steps: same epochs run, same loss scale
    l1 = [h["loss"] for h in one["history"]]
    l2 = [h["loss"] for h in two["history"]]
    assert len(l1) == len(l2) and abs(l1[-1] - l2[-1]) < 0.1 * l1[-1]
