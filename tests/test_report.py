"""benchmarks/report.py on small synthetic results of each kind it reads."""
import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("matplotlib")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_report_doc():
    rows = []
    for cell in ("lstm", "gru"):
        for mode in ("forward", "train"):
            for b, h in ((1, 64), (16, 128), (64, 256)):
                ours, ref, floor = 0.1 * b, 0.3 * b, 0.05 * b
                rows.append(dict(cell=cell, mode=mode, B=b, T=50, I=h, H=h, ms_ours=ours,
                                 ms_ref=ref, speedup=ref / ours, ms_floor=floor,
                                 ours_over_floor=ours / floor, ref_over_floor=ref / floor))
    return dict(meta=dict(machine="x86_64", threads=2, torch="2.13.0+cpu", commit="abc1234",
                          gemm_gflops=80.0), rows=rows)


def gpu_doc():
    rows = [dict(cell="lstm", mode=mode, dtype=dtype, B=b, T=50, I=256, H=256, packed=packed,
                 ms_ours=0.2, ms_ref=0.5 if dtype == "fp32" else 0.3, ratio=2.5, ms_floor=0.01)
            for mode in ("forward", "train") for dtype in ("fp32", "bf16") for b in (1, 64)
            for packed in (False, True)]
    return dict(device="NVIDIA H100 80GB HBM3", torch="2.14.1+cu130", commit="def5678",
                csrc_sha256="0" * 64, tests=dict(passed=3), rows=rows)


def pytest_benchmark_doc():
    benches = []
    for impl, median in (("timerec_fast", 0.001), ("reference", 0.004)):
        for b in (1, 16):
            benches.append(dict(
                name=f"test_pair[{impl}-{b}]", stats=dict(median=median * b, mean=median * b),
                extra_info=dict(cell="time_lstm1", mode="train", B=b, T=20, I=32, H=64, impl=impl)))
    benches.append(dict(name="other", stats=dict(median=1.0), extra_info={}))  # ignored
    return dict(machine_info=dict(machine="x86_64", cpu=dict(brand_raw="Test CPU")),
                commit_info=dict(id="0123456789abcdef"), datetime="2026-01-01", benchmarks=benches)


def test_report_from_all_three_kinds(report, tmp_path):
    files = []
    for name, doc in (("cpu.json", cpu_report_doc()), ("gpu.json", gpu_doc()),
                      ("pb.json", pytest_benchmark_doc()), ("junk.json", [1, 2])):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        files.append(str(path))
    out = tmp_path / "out"
    md_path, plots = report.main(files + ["--out", str(out)])
    md = md_path.read_text()
    assert "NVIDIA H100" in md and "def5678" in md and "abc1234" in md and "Test CPU" in md
    assert "| lstm | forward | bf16 packed | B64 T50 H256 |" in md
    assert "| time_lstm1 | train | fp32 | B16 T20 H64 I32 | 16 | 64 | 4 |" in md
    names = sorted(p.name for p in plots)
    assert names == ["gru-forward.png", "gru-train.png", "lstm-forward.png", "lstm-train.png",
                     "time_lstm1-train.png"]
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_loaders_normalise_rows(report, tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(gpu_doc()))
    meta, rows = report.load(path)
    assert meta["kind"] == "gpu" and len(rows) == 16
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    assert rows[0]["speedup"] == pytest.approx(2.5)
    path.write_text(json.dumps(cpu_report_doc()))
    meta, rows = report.load(path)
    assert meta["kind"] == "cpu_report" and rows[0]["ms_floor"] == pytest.approx(0.05)
    path.write_text(json.dumps({"something": 1}))
    assert report.load(path) is None


def test_no_rows_is_an_error(report, tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"meta": {}, "rows": []}))
    with pytest.raises(SystemExit):
        report.main([str(path), "--out", str(tmp_path / "o")])


def test_cpu_reports_from_two_machines_stay_apart(report, tmp_path):
    # Same architecture string, different CPU models (and an older file without one): each gets
    # its own device label, so tables and plot lines never merge them.
    labels = set()
    for name, model, commit in (("a.json", "AMD EPYC 9R14", "abc1234"),
                                ("b.json", "Intel(R) Xeon(R) Processor", "abc1234"),
                                ("c.json", None, "fff0000")):
        doc = cpu_report_doc()
        doc["meta"]["commit"] = commit
        if model:
            doc["meta"]["cpu_model"] = model
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        meta, rows = report.load(path)
        assert {r["source"] for r in rows} == {meta["device"]}
        labels.add(meta["device"])
    assert labels == {"CPU AMD EPYC 9R14 x2 @abc1234", "CPU Intel(R) Xeon(R) Processor x2 @abc1234",
                      "CPU x86_64 x2 @fff0000"}
