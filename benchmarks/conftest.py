import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Benchmarks run with TIMEREC_BENCH_THREADS threads (default 2, the reference machine)."""
    torch.set_num_threads(int(os.environ.get("TIMEREC_BENCH_THREADS", "2")))
