"""pytest-benchmark: the fused modules against their references on the CPU, pairs grouped.

    pytest benchmarks/test_bench_cpu.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group holds the two implementations at one (cell, mode, B, T, I, H); compare their medians.
Pairs: LSTM vs torch.nn.LSTM, GRU vs torch.nn.GRU, TimeLSTM vs timerec_fast.LSTM (the cost of
the time terms) and TimeLSTM vs its pure-PyTorch reference. `python benchmarks/cpu_report.py`
prints the same comparison as one table with speedups and the GEMM floor.
"""
import pytest
import torch

import reference_pairs  # noqa: F401  (registers the TimeLSTM/ref pair)
from timerec_fast.bench import PAIRS, make_step

CASES = [(cell, shape) for cell, (_, shapes, _) in PAIRS.items() for shape in shapes]


@pytest.mark.parametrize("impl", ["reference", "timerec_fast"])
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("cell,shape", CASES,
                         ids=[f"{c}-B{b}-T{t}-I{i}-H{h}" for c, (b, t, i, h) in CASES])
def test_pair(benchmark, cell, shape, mode, impl):
    b, t, i, h = shape
    make_pair, _, with_dt = PAIRS[cell]
    ours, ref = make_pair(i, h)
    ours_side = impl == "timerec_fast"
    module = ours if ours_side else ref
    x = torch.randn(t, b, i)
    dt = torch.rand(t, b) * 3 if with_dt[0 if ours_side else 1] else None
    benchmark.group = f"{cell} {mode} B{b} T{t} I{i} H{h}"
    benchmark.extra_info.update(dict(cell=cell, mode=mode, B=b, T=t, I=i, H=h, impl=impl))
    benchmark.pedantic(make_step(module, x, mode, dt), rounds=5, warmup_rounds=1, iterations=1)
