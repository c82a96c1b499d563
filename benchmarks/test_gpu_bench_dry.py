"""CPU coverage of benchmarks/gpu_bench.py (the GPU benchmark of issue 3): the dry run times tiny
shapes on the CPU and goes through the same row, table, summary and JSON code as the GPU run."""
import importlib.util
import json
import pathlib

import pytest
import torch

_PATH = pathlib.Path(__file__).with_name("gpu_bench.py")
_spec = importlib.util.spec_from_file_location("gpu_bench", _PATH)
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)


def test_dry_run_writes_json_and_table(tmp_path, monkeypatch, capsys):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
                     '</testsuite></testsuites>')
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    doc = gpu_bench.main(["--dry-run", "--results-dir", str(tmp_path / "res"),
                          "--junit", str(junit)])
    files = list((tmp_path / "res").glob("cpu-*.json")) + list(out.glob("cpu-*.json"))
    assert len(files) == 2
    saved = json.loads(files[0].read_text())
    for key in ("device", "torch", "commit", "csrc_sha256", "tests", "rows"):
        assert key in saved
    assert saved["tests"] == dict(passed=2, failed=1, skipped=2, errors=0)
    assert len(saved["csrc_sha256"]) == 64
    assert len(saved["rows"]) == 8 and {r["packed"] for r in saved["rows"]} == {False, True}
    for r in saved["rows"]:
        assert set(gpu_bench.ROW_KEYS) <= set(r)
        assert r["ms_ours"] > 0 and r["ms_ref"] > 0
        assert r["ratio"] == pytest.approx(r["ms_ref"] / r["ms_ours"])
    assert set(doc["summary"]) == {"train_all_shapes_ge_1.0", "forward_B_le_16_ge_2.0",
                                   "packed_ge_1.5"}
    table = capsys.readouterr().out
    assert "cuDNN ms" in table and "ratio" in table


def test_floor_model():
    rates = gpu_bench.H100_RATES
    # Large batch fp32: FLOP-bound; the floor grows linearly with rows.
    a = gpu_bench.floor_ms("train", torch.float32, 256, 200, 1024, 1024, rates)
    b = gpu_bench.floor_ms("train", torch.float32, 256, 100, 1024, 1024, rates)
    assert a == pytest.approx(2 * b)
    assert gpu_bench.lstm_flops("train", 10, 3, 4) == 3 * gpu_bench.lstm_flops("forward", 10, 3, 4)
    # bf16 moves half the bytes of fp32.
    assert gpu_bench.lstm_bytes("forward", 10, 3, 4, 2) * 2 == gpu_bench.lstm_bytes(
        "forward", 10, 3, 4, 4)


def test_summary_targets():
    rows = [dict(mode="train", packed=False, B=1, ratio=1.2),
            dict(mode="forward", packed=False, B=16, ratio=1.5),
            dict(mode="forward", packed=True, B=64, ratio=1.6)]
    s = gpu_bench.summary(rows)
    assert s["train_all_shapes_ge_1.0"]["met"]
    assert not s["forward_B_le_16_ge_2.0"]["met"]
    assert s["packed_ge_1.5"]["min_ratio"] == 1.6


def test_junit_counts_missing_file(tmp_path):
    assert gpu_bench.junit_counts(str(tmp_path / "nope.xml"))["passed"] == 0
