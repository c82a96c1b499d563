"""Print (and optionally save as JSON) the CPU comparison against torch.nn with the GEMM floor.

    python benchmarks/cpu_report.py [--threads 2] [--runs 3] [--json benchmarks/results/cpu-<machine>.json]

speedup = torch.nn time / timerec_fast time, both measured in this process (median of repeats);
floor = the cell's matmul FLOPs / this machine's measured large-GEMM rate, so ours/floor shows the
distance to the limit.

glibc hands blocks above its mmap threshold back to the OS on free, so a process that allocates
large buffers every step page-faults them in again every step. torch.nn.LSTM's oneDNN training
path does: at (256, 50, 64, 64), `perf stat` counted 522K page faults against 63K over 63 steps,
and a step took 31-32 ms instead of 19.7 ms. Our ops keep their large buffers
(csrc/cpu/workspace.h). To compare against torch without that cost, run with
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 in the environment; the JSON
records these variables under meta.malloc_env.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess

import torch

import reference_pairs  # noqa: F401  (registers the TimeLSTM/ref pair)
from timerec_fast import bench, info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows and machine facts to this file")
    parser.add_argument("--cells", default=",".join(bench.PAIRS),
                        help=f"comma list of pairs to time, from {', '.join(bench.PAIRS)}")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole table; each row then reports the run with the "
                             "median speedup, and lists every run's speedup (this VM is noisy)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs, rates = [], []
    for _ in range(max(1, args.runs)):
        rate, rows = bench.gemm_rate(), []
        for cell in args.cells.split(","):
            rows += bench.run_cell(cell.strip())  # floors added below, from the median rate
        runs.append(rows)
        rates.append(rate)
    rows = []
    for per_run in zip(*runs):
        ordered = sorted(per_run, key=lambda r: r["speedup"])
        row = dict(ordered[(len(ordered) - 1) // 2])  # the median run (lower median when even)
        if len(per_run) > 1:
            row["speedup_runs"] = [round(r["speedup"], 3) for r in per_run]
        rows.append(row)
    rate = statistics.median(rates)
    # One floor per row from the median GEMM rate over the runs, not the chosen run's own rate
    # (which moved by up to 30% between runs and could put a row below its floor).
    for row in rows:
        bench.add_floor(row, rate)
    print(bench.format_table(rows, rate))
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        meta = dict(machine=platform.processor() or platform.machine(), cpu_model=info.cpu_model(),
                    cpu_family_model=info.cpu_family_model(), cpu_caches=info.cpu_caches(),
                    threads=args.threads,
                    torch=torch.__version__, commit=commit, gemm_gflops=rate / 1e9,
                    runs=len(runs), gemm_gflops_runs=[round(r / 1e9, 1) for r in rates],
                    malloc_env={k: v for k, v in os.environ.items()
                                if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"})
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
