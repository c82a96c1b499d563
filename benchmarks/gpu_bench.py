"""GPU benchmark of timerec_fast.LSTM against torch.nn.LSTM (cuDNN), the grid of issue 3.

    python benchmarks/gpu_bench.py [--junit tests.xml] [--crossover] [--quick]
    python benchmarks/gpu_bench.py --dry-run --results-dir DIR   # CPU, tiny shapes (for CI)

Rows: forward (no grad) and training step (forward + backward of all parameters and the input),
B in {1, 16, 64, 256}, T in {50, 200}, H = I in {64, ..., 1024}, fp32 and bf16, padded and packed
(lengths uniform in 1..T). Timing: CUDA events around each call, median of many calls after a
warm-up, inputs rotating between two sets. ratio = cuDNN time / ours (> 1: we are faster).
floor = max(matmul FLOPs / measured matmul rate, bytes / measured copy bandwidth) for the dtype.
fp32 runs with TF32 off for both (torch.backends.cudnn.allow_tf32 = False) unless --tf32.
Cell rows (issue 4, JSON "cell_rows", skipped with --no-cells): timerec_fast.GRU vs torch.nn.GRU
(ratio = torch time / ours), and each TimeLSTM variant vs timerec_fast.LSTM at the same shape
(ratio = LSTM time / TimeLSTM time; the issue's CPU target is TimeLSTM <= 1.3x LSTM, ratio >= 0.77).

Writes JSON (device, torch, commit, csrc_sha256, tests, rows, ...) to
benchmarks/results/<card>-<short commit>.json and, when $OUT is set, to $OUT/ as well.
"""
import argparse
import hashlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET

import torch
from torch.nn.utils.rnn import pack_padded_sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = ("cell", "mode", "dtype", "B", "T", "I", "H", "packed", "ms_ours", "ms_ref", "ratio")
GRID_B = (1, 16, 64, 256)
GRID_T = (50, 200)
GRID_H = (64, 128, 256, 512, 1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Datasheet fallback (H100 SXM, dense): used only when rates are not measured (dry run).
H100_RATES = {"flops": {"fp32": 67e12, "bf16": 989e12, "fp64": 67e12}, "bytes_per_s": 3.35e12}


# ---- floor model ----------------------------------------------------------------------------------

def lstm_flops(mode, rows, in_size, hidden):
    """Matmul FLOPs of one layer: forward 2 * rows * 4H * (I + H); a training step adds the
    input, weight and recurrent gradients (3x the forward)."""
    fwd = 2.0 * rows * 4 * hidden * (in_size + hidden)
    return fwd if mode == "forward" else 3.0 * fwd


def lstm_bytes(mode, rows, in_size, hidden, elem):
    """Fewest bytes moved: x in, y out, weights in; training also reads dy, writes dx and dW."""
    weights = 4 * hidden * (in_size + hidden) + 8 * hidden
    fwd = rows * (in_size + hidden) + weights
    return elem * (fwd if mode == "forward" else 2 * fwd)


def floor_ms(mode, dtype, batch, steps, in_size, hidden, rates, rows=None):
    rows = batch * steps if rows is None else rows
    key = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    t_flops = lstm_flops(mode, rows, in_size, hidden) / rates["flops"][key]
    t_bytes = lstm_bytes(mode, rows, in_size, hidden, elem) / rates["bytes_per_s"]
    return 1e3 * max(t_flops, t_bytes)


# ---- timing -------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup=3, min_reps=10, max_reps=200, budget_s=0.2):
    """Median time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def make_step(module, inputs, mode):
    """A callable running one forward (no grad) or one training step, rotating over inputs
    [(x, grad_y)]; x is a tensor or PackedSequence."""
    params = list(module.parameters())
    state = {"k": 0}

    def run():
        x, gy = inputs[state["k"] % len(inputs)]
        state["k"] += 1
        if mode == "forward":
            with torch.no_grad():
                module(x)
            return
        y, _ = module(x)
        y = y.data if hasattr(y, "batch_sizes") else y
        leaf = x.data if hasattr(x, "batch_sizes") else x
        torch.autograd.grad(y, params + [leaf], gy)
    return run


def make_inputs(batch, steps, in_size, out_size, dtype, device, packed, mode, sets=2, seed=0):
    """[(x, grad_y)] input sets; x is (T, B, I) or a PackedSequence with lengths uniform in 1..T
    (the first at T, so the packed sequence has T steps)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        x = torch.randn(steps, batch, in_size, generator=gen).to(device, dtype)
        if mode == "train":
            x.requires_grad_()
        if packed:
            lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
            lengths[0] = steps
            x = pack_padded_sequence(x, lengths.sort(descending=True).values)
            lead = (x.data.shape[0],)
        else:
            lead = (steps, batch)
        gy = torch.randn(*lead, out_size, generator=gen).to(device, dtype)
        out.append((x, gy))
    return out


def bench_row(mode, dtype_name, batch, steps, size, packed, device, rates, budget_s):
    import timerec_fast

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(size, size).to(device, dtype)
    ours = timerec_fast.LSTM(size, size).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    inputs = make_inputs(batch, steps, size, size, dtype, device, packed, mode)
    rows = inputs[0][0].data.shape[0] if packed else batch * steps
    ms_ref = median_ms(make_step(ref, inputs, mode), device, budget_s=budget_s)
    ms_ours = median_ms(make_step(ours, inputs, mode), device, budget_s=budget_s)
    return dict(cell="LSTM", mode=mode, dtype=dtype_name, B=batch, T=steps, I=size, H=size,
                packed=packed, ms_ours=ms_ours, ms_ref=ms_ref, ratio=ms_ref / ms_ours,
                ms_floor=floor_ms(mode, dtype, batch, steps, size, size, rates, rows=rows),
                rows=rows)


# ---- other cells (issue 4): GRU vs cuDNN GRU, TimeLSTM vs timerec_fast.LSTM ---------------------

CELLS = ("GRU", "time_lstm1", "time_lstm2", "time_lstm3", "tlstm")
CELL_SHAPES = ((16, 50, 128), (64, 50, 256), (256, 50, 128), (256, 50, 512))  # (B, T, H)


class _WithDeltaT(torch.nn.Module):
    """A TimeLSTM called like an LSTM (module(x)), with a fixed delta_t for timing."""

    def __init__(self, cell, delta_t):
        super().__init__()
        self.cell = cell
        self.delta_t = delta_t

    def forward(self, x):
        return self.cell(x, self.delta_t)


def bench_cell_row(cell, mode, dtype_name, batch, steps, size, device, budget_s):
    """GRU: timerec_fast.GRU vs torch.nn.GRU (cuDNN on a GPU). A TimeLSTM variant: the fused
    TimeLSTM vs timerec_fast.LSTM at the same shape (ratio = LSTM time / TimeLSTM time)."""
    import timerec_fast

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    inputs = make_inputs(batch, steps, size, size, dtype, device, False, mode)
    if cell == "GRU":
        ref = torch.nn.GRU(size, size).to(device, dtype)
        ours = timerec_fast.GRU(size, size).to(device, dtype)
        ours.load_state_dict(ref.state_dict())
        ref_name = "torch.nn.GRU"
    else:
        ref = timerec_fast.LSTM(size, size).to(device, dtype)
        dt = (torch.rand(steps, batch, generator=torch.Generator().manual_seed(1)) * 3).to(
            device, dtype)
        ours = _WithDeltaT(timerec_fast.TimeLSTM(size, size, variant=cell), dt).to(device, dtype)
        ref_name = "timerec_fast.LSTM"
    ms_ref = median_ms(make_step(ref, inputs, mode), device, budget_s=budget_s)
    ms_ours = median_ms(make_step(ours, inputs, mode), device, budget_s=budget_s)
    return dict(cell=cell, ref=ref_name, mode=mode, dtype=dtype_name, B=batch, T=steps, I=size,
                H=size, packed=False, ms_ours=ms_ours, ms_ref=ms_ref, ratio=ms_ref / ms_ours)


def cell_grid(dry_run, quick):
    if dry_run:
        return [(c, m, "fp32", 2, 3, 4) for c in CELLS for m in ("forward", "train")]
    shapes = CELL_SHAPES if not quick else CELL_SHAPES[1:3]
    return [(c, m, d, b, t, h) for c in CELLS for m in ("forward", "train") for d in DTYPES
            for (b, t, h) in shapes]


def format_cell_table(rows):
    head = (f"{'cell':<12}{'mode':<8}{'dtype':<6}{'B':>5}{'T':>5}{'H':>6}{'ours ms':>10}"
            f"{'ref ms':>10}{'ratio':>7}  ref")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['cell']:<12}{r['mode']:<8}{r['dtype']:<6}{r['B']:>5}{r['T']:>5}"
                     f"{r['H']:>6}{r['ms_ours']:>10.3f}{r['ms_ref']:>10.3f}{r['ratio']:>7.2f}"
                     f"  {r['ref']}")
    return "\n".join(lines)


# ---- rates, provenance ----------------------------------------------------------------------------

def measure_rates(device):
    """The two ceilings on this device: a large matmul per dtype and a large copy."""
    if device.type != "cuda":
        return H100_RATES
    flops = {}
    n = 8192
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dt)
        ms = median_ms(lambda: a @ a, device, warmup=2, min_reps=5, budget_s=0.3)
        flops[name] = 2.0 * n ** 3 / (ms * 1e-3)
    flops["fp64"] = H100_RATES["flops"]["fp64"]
    src = torch.empty(256 * 2 ** 20, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, min_reps=5, budget_s=0.3)
    return {"flops": flops, "bytes_per_s": 2 * src.numel() * 4 / (ms * 1e-3)}


def csrc_sha256():
    """`git ls-files csrc | sort | xargs cat | sha256sum`, or the files on disk without git."""
    try:
        out = subprocess.run(["bash", "-c", "git ls-files csrc | sort | xargs cat | sha256sum"],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        listed = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        if listed:
            return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    h = hashlib.sha256()
    for p in sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()):
        h.update((ROOT / p).read_bytes())
    return h.hexdigest()


def git_commit():
    env = os.environ.get("TIMEREC_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def junit_counts(path):
    """passed/failed/skipped/errors of a pytest --junitxml file (zeros when absent)."""
    counts = dict(passed=0, failed=0, skipped=0, errors=0)
    if not path or not os.path.exists(path):
        return counts
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        tests = int(suite.get("tests", 0))
        failed, errors = int(suite.get("failures", 0)), int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts["failed"] += failed
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - errors - skipped
    return counts


def card_name(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---- table, JSON ---------------------------------------------------------------------------------

def format_table(rows):
    head = (f"{'mode':<8}{'dtype':<6}{'B':>5}{'T':>5}{'H':>6}{'packed':>7}{'ours ms':>10}"
            f"{'cuDNN ms':>10}{'ratio':>7}{'floor ms':>10}{'ours/fl':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fl = r.get("ms_floor")
        lines.append(
            f"{r['mode']:<8}{r['dtype']:<6}{r['B']:>5}{r['T']:>5}{r['H']:>6}"
            f"{('yes' if r['packed'] else 'no'):>7}{r['ms_ours']:>10.3f}{r['ms_ref']:>10.3f}"
            f"{r['ratio']:>7.2f}{(fl if fl is not None else float('nan')):>10.4f}"
            f"{(r['ms_ours'] / fl if fl else float('nan')):>8.1f}")
    return "\n".join(lines)


def summary(rows):
    """The issue's targets, per criterion: min ratio and whether it holds."""
    def worst(sel):
        vals = [r["ratio"] for r in rows if sel(r)]
        return min(vals) if vals else None
    crit = {
        "train_all_shapes_ge_1.0": (worst(lambda r: r["mode"] == "train" and not r["packed"]), 1.0),
        "forward_B_le_16_ge_2.0": (worst(lambda r: r["mode"] == "forward" and r["B"] <= 16
                                         and not r["packed"]), 2.0),
        "packed_ge_1.5": (worst(lambda r: r["packed"]), 1.5),
    }
    return {k: {"min_ratio": v, "target": t, "met": v is not None and v >= t}
            for k, (v, t) in crit.items()}


def write_results(doc, results_dir, out_dir=None):
    name = f"{doc['card']}-{doc['commit'][:7]}.json"
    paths = []
    for d in filter(None, (results_dir, out_dir)):
        d = pathlib.Path(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(doc, indent=1) + "\n")
        paths.append(str(d / name))
    return paths


def crossover(device, rates, budget_s):
    """Forward time of the two CUDA strategies (TIMEREC_LSTM_CUDA_PATH), to set the heuristic
    constants kPersistentAutoMax* in csrc/cuda/lstm_cuda.cu."""
    rows = []
    old = os.environ.get("TIMEREC_LSTM_CUDA_PATH")
    try:
        for dtype_name in DTYPES:
            for b in (1, 4, 16, 32, 64):
                for h in GRID_H:
                    res = {}
                    for path in ("cublas", "persistent"):
                        os.environ["TIMEREC_LSTM_CUDA_PATH"] = path
                        res[path] = bench_row("forward", dtype_name, b, 50, h, False, device,
                                              rates, budget_s)["ms_ours"]
                    rows.append(dict(dtype=dtype_name, B=b, T=50, H=h, ms_cublas=res["cublas"],
                                     ms_persistent=res["persistent"],
                                     faster="persistent" if res["persistent"] < res["cublas"]
                                     else "cublas"))
                    print(f"crossover {dtype_name} B={b:<4} H={h:<5} cublas {res['cublas']:.3f} ms"
                          f"  persistent {res['persistent']:.3f} ms", flush=True)
    finally:
        if old is None:
            os.environ.pop("TIMEREC_LSTM_CUDA_PATH", None)
        else:
            os.environ["TIMEREC_LSTM_CUDA_PATH"] = old
    return rows


def grid(dry_run, quick):
    if dry_run:
        return [(m, d, b, t, h, p) for m in ("forward", "train") for d in ("fp32",)
                for b in (1, 2) for t in (3,) for h in (4,) for p in (False, True)]
    bs, ts, hs = (GRID_B, GRID_T, GRID_H) if not quick else ((1, 64), (50,), (64, 512))
    return [(m, d, b, t, h, p) for p in (False, True) for m in ("forward", "train")
            for d in DTYPES for b in bs for t in ts for h in hs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise the code")
    ap.add_argument("--quick", action="store_true", help="a small subset of the GPU grid")
    ap.add_argument("--crossover", action="store_true", help="also time both CUDA strategies")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 (both sides)")
    ap.add_argument("--junit", help="pytest --junitxml file whose counts go into 'tests'")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-cells", action="store_true",
                    help="skip the GRU / TimeLSTM rows (issue 4)")
    ap.add_argument("--budget-s", type=float, default=0.15, help="timing budget per measurement")
    args = ap.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_bench: no GPU (use --dry-run to exercise the code on the CPU)")
        device = torch.device("cuda")
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    warnings.filterwarnings("ignore")
    rates = measure_rates(device)
    rows = []
    t0 = time.perf_counter()
    for (mode, dtype_name, b, t, h, packed) in grid(args.dry_run, args.quick):
        rows.append(bench_row(mode, dtype_name, b, t, h, packed, device, rates,
                              0.0 if args.dry_run else args.budget_s))
        r = rows[-1]
        print(f"{mode:<8}{dtype_name:<5} B={b:<4} T={t:<4} H={h:<5} packed={packed!s:<6}"
              f" ours {r['ms_ours']:.3f} ms  cuDNN {r['ms_ref']:.3f} ms  ratio {r['ratio']:.2f}",
              flush=True)
    cell_rows = []
    if not args.no_cells:
        for (cell, mode, dtype_name, b, t, h) in cell_grid(args.dry_run, args.quick):
            cell_rows.append(bench_cell_row(cell, mode, dtype_name, b, t, h, device,
                                            0.0 if args.dry_run else args.budget_s))
            r = cell_rows[-1]
            print(f"{cell:<11} {mode:<8}{dtype_name:<5} B={b:<4} T={t:<4} H={h:<5} ours "
                  f"{r['ms_ours']:.3f} ms  {r['ref']} {r['ms_ref']:.3f} ms  ratio {r['ratio']:.2f}",
                  flush=True)
    cross = crossover(device, rates, args.budget_s) if args.crossover and not args.dry_run else []
    print(format_table(rows))
    if cell_rows:
        print(format_cell_table(cell_rows))
    summ = summary(rows)
    print(json.dumps(summ, indent=1))
    doc = dict(device=(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
               card=card_name(device), torch=torch.__version__,
               cuda=torch.version.cuda, commit=git_commit(), csrc_sha256=csrc_sha256(),
               tests=junit_counts(args.junit), rows=rows, summary=summ, rates=rates,
               fp32_mode="tf32" if args.tf32 else "strict-fp32", crossover=cross,
               cell_rows=cell_rows,
               dry_run=args.dry_run, seconds=time.perf_counter() - t0)
    for p in write_results(doc, args.results_dir, os.environ.get("OUT")):
        print("gpu_bench: wrote", p)
    return doc


if __name__ == "__main__":
    main()
