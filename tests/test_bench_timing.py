"""timerec_fast.bench.paired_median_times: which calls it makes, in which order."""
import time

from timerec_fast import bench


def recorder(log, name, seconds=0.0):
    def fn():
        log.append(name)
        if seconds:
            time.sleep(seconds)
    return fn


def test_fast_calls_alternate_in_blocks():
    log = []
    bench.paired_median_times(recorder(log, "a"), recorder(log, "b"), min_seconds=0.0,
                              warmup=3, block_seconds=1.0)
    # warm-up, then one round: the block size is capped at 64 calls a side
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 64 + ["b"] * 64


def test_slow_calls_alternate_one_by_one():
    log = []
    bench.paired_median_times(recorder(log, "a", 0.002), recorder(log, "b", 0.002), min_repeats=4,
                              min_seconds=0.0, warmup=1, block_seconds=0.001)
    assert log == ["a", "b"] * 5


def test_block_sizes_follow_each_sides_call_time():
    log = []
    t_a, t_b = bench.paired_median_times(recorder(log, "a"), recorder(log, "b", 0.004),
                                         min_repeats=1, min_seconds=0.0, warmup=2,
                                         block_seconds=0.003)
    assert log == ["a"] * 2 + ["b"] * 2 + ["a"] * 64 + ["b"]
    assert t_b >= 0.004 > t_a
