"""pytest-benchmark: timerec_fast.LSTM against torch.nn.LSTM on the CPU, pairs grouped by shape.

    pytest benchmarks/test_bench_lstm_cpu.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group holds the two implementations at one (mode, B, T, I, H); compare their medians.
`python benchmarks/cpu_report.py` prints the same comparison as one table with speedups and the
GEMM floor.
"""
import pytest
import torch

from timerec_fast.bench import LSTM_SHAPES, lstm_pair, make_step


@pytest.mark.parametrize("impl", ["torch.nn", "timerec_fast"])
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("shape", LSTM_SHAPES, ids=lambda s: "B{}-T{}-I{}-H{}".format(*s))
def test_lstm(benchmark, shape, mode, impl):
    b, t, i, h = shape
    ours, ref = lstm_pair(i, h)
    module = ours if impl == "timerec_fast" else ref
    x = torch.randn(t, b, i)
    benchmark.group = f"LSTM {mode} B{b} T{t} I{i} H{h}"
    benchmark.extra_info.update(dict(cell="LSTM", mode=mode, B=b, T=t, I=i, H=h, impl=impl))
    benchmark.pedantic(make_step(module, x, mode), rounds=10, warmup_rounds=2, iterations=1)
