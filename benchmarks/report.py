"""Benchmark results -> a markdown table and PNG plots (speedup against shape).

    python benchmarks/report.py [FILE.json ...] [--out benchmarks/results]

Reads, telling them apart by content:
  * pytest-benchmark JSON (`pytest benchmarks --benchmark-json F`): pairs of rows with extra_info
    cell/mode/B/T/I/H/impl (impl "timerec_fast" vs "reference"), median times;
  * `benchmarks/cpu_report.py --json` output: {"meta": {...}, "rows": [{cell, mode, B, T, I, H,
    ms_ours, ms_ref, speedup, ms_floor, ...}]};
  * the GPU check's JSON (`benchmarks/gpu_bench.py`): {"device", "torch", "commit", "rows":
    [{cell, mode, dtype, B, T, I, H, packed, ms_ours, ms_ref, ratio, ms_floor?}]}.
Without files, every *.json in benchmarks/results/ is read.

Writes <out>/report.md (one table per source: machine, torch, commit; speedup = reference time /
ours) and <out>/plots/<cell>-<mode>.png: speedup against shape (sorted by work), one line per
device/dtype(/packed); where the data has a floor, a dashed line of the same colour shows the
speedup ours would have at the floor (reference time / floor time), the ceiling.
"""
import argparse
import glob
import json
import os
import pathlib
import statistics
from collections import defaultdict

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "results"


# ---- loading --------------------------------------------------------------------------------------

def _row(source, cell, mode, b, t, i, h, ms_ours, ms_ref, dtype="fp32", packed=False, ms_floor=None,
         speedup=None):
    # A speedup the file records (measured pairwise in one process, or the median of per-run
    # speedups) wins over the ratio of the two median times.
    if speedup is None:
        speedup = ms_ref / ms_ours if ms_ours and ms_ref else None
    return dict(source=source, cell=cell, mode=mode, dtype=dtype, packed=bool(packed), B=int(b),
                T=int(t), I=int(i), H=int(h), ms_ours=ms_ours, ms_ref=ms_ref, speedup=speedup,
                ms_floor=ms_floor)


def load_pytest_benchmark(doc, name):
    info = doc.get("machine_info", {})
    commit = doc.get("commit_info", {}).get("id", "")[:10]
    cpu = info.get("cpu", {})
    machine = (cpu.get("brand_raw") if isinstance(cpu, dict) else None) or info.get("machine", "?")
    meta = dict(kind="pytest-benchmark", file=name, device=f"CPU {machine}", commit=commit,
                torch=info.get("torch", ""), when=doc.get("datetime", ""))
    pairs = defaultdict(dict)
    for bench in doc.get("benchmarks", []):
        ex = bench.get("extra_info", {})
        if not {"cell", "mode", "B", "T", "I", "H", "impl"} <= ex.keys():
            continue
        key = (ex["cell"], ex["mode"], ex["B"], ex["T"], ex["I"], ex["H"], ex.get("dtype", "fp32"))
        pairs[key][ex["impl"]] = 1e3 * bench["stats"]["median"]
    rows = []
    for (cell, mode, b, t, i, h, dtype), impls in pairs.items():
        if "timerec_fast" in impls and "reference" in impls:
            rows.append(_row(meta["device"], cell, mode, b, t, i, h, impls["timerec_fast"],
                             impls["reference"], dtype=dtype))
    return meta, rows


def load_cpu_report(doc, name):
    m = doc.get("meta", {})
    # The CPU model when the file has it (older files: the architecture only), and the commit, so
    # results from two machines or two versions never share a plot line.
    device = f"CPU {m.get('cpu_model') or m.get('machine', '?')}"
    if m.get("cpu_family_model"):  # VMs give one model name to different chips
        device += f" ({m['cpu_family_model']})"
    device += f" x{m.get('threads', '?')}"
    if m.get("commit"):
        device += f" @{m['commit']}"
    env = " ".join(f"{k}={v}" for k, v in sorted((m.get("malloc_env") or {}).items()))
    if env:  # e.g. glibc told to keep large blocks: no page faults for torch either
        device += " malloc env"
    meta = dict(kind="cpu_report", file=name, device=device, commit=m.get("commit", ""),
                torch=m.get("torch", ""), gemm_gflops=m.get("gemm_gflops"), env=env)
    rows = [_row(device, r["cell"], r["mode"], r["B"], r["T"], r["I"], r["H"], r["ms_ours"],
                 r["ms_ref"], dtype=r.get("dtype", "fp32"), ms_floor=r.get("ms_floor"),
                 speedup=r.get("speedup"))
            for r in doc.get("rows", [])]
    return meta, rows


def load_gpu(doc, name):
    device = doc.get("card") or doc.get("device", "GPU")
    meta = dict(kind="gpu", file=name, device=str(device), commit=str(doc.get("commit", ""))[:10],
                torch=doc.get("torch", ""), csrc_sha256=str(doc.get("csrc_sha256", ""))[:12])
    rows = [_row(meta["device"], r.get("cell", "lstm"), r["mode"], r["B"], r["T"], r["I"], r["H"],
                 r["ms_ours"], r["ms_ref"], dtype=r.get("dtype", "fp32"), packed=r.get("packed"),
                 ms_floor=r.get("ms_floor"), speedup=r.get("ratio"))
            for r in doc.get("rows", []) if r.get("ms_ours") and r.get("ms_ref")]
    return meta, rows


def load(path):
    """(meta, rows) of one results file, or None when it is none of the known formats."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError:
            return None
    if not isinstance(doc, dict):
        return None
    name = os.path.basename(path)
    if "benchmarks" in doc:
        return load_pytest_benchmark(doc, name)
    if "meta" in doc and "rows" in doc:
        return load_cpu_report(doc, name)
    if "rows" in doc and "device" in doc:
        return load_gpu(doc, name)
    return None


# ---- output ---------------------------------------------------------------------------------------

def shape_label(r):
    return f"B{r['B']} T{r['T']} H{r['H']}" + (f" I{r['I']}" if r["I"] != r["H"] else "")


def work(r):
    return r["B"] * r["T"] * r["H"] * (r["I"] + r["H"])


def series_name(r):
    return f"{r['source']} {r['dtype']}" + (" packed" if r["packed"] else "")


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


def markdown(sources):
    out = ["# Benchmark results", "",
           "speedup = reference time / timerec_fast time (> 1: timerec_fast is faster), both "
           "measured in the same process; floor = matmul FLOPs (and, on the GPU, bytes) / the "
           "machine's measured rate; ours/floor = distance to it.", ""]
    for meta, rows in sources:
        out.append(f"## {meta['device']} ({meta['kind']}, `{meta['file']}`)")
        out.append("")
        facts = [f"torch {meta['torch']}" if meta.get("torch") else None,
                 f"commit `{meta['commit']}`" if meta.get("commit") else None,
                 f"csrc sha256 `{meta['csrc_sha256']}`" if meta.get("csrc_sha256") else None,
                 f"GEMM {meta['gemm_gflops']:.1f} GFLOP/s" if meta.get("gemm_gflops") else None,
                 f"environment `{meta['env']}`" if meta.get("env") else None]
        facts = [f for f in facts if f]
        if facts:
            out += [", ".join(facts), ""]
        speedups = [r["speedup"] for r in rows if r["speedup"]]
        if speedups:
            out += [f"{len(rows)} rows; speedup median {statistics.median(speedups):.2f}x, "
                    f"min {min(speedups):.2f}x, max {max(speedups):.2f}x", ""]
        out.append("| cell | mode | dtype | shape | ours ms | ref ms | speedup | floor ms | ours/floor |")
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: (r["cell"], r["mode"], r["dtype"], r["packed"], work(r))):
            ratio = r["ms_ours"] / r["ms_floor"] if r["ms_floor"] else None
            out.append(f"| {r['cell']} | {r['mode']} | {r['dtype']}{' packed' if r['packed'] else ''}"
                       f" | {shape_label(r)} | {fmt(r['ms_ours'])} | {fmt(r['ms_ref'])} | "
                       f"{fmt(r['speedup'])} | {fmt(r['ms_floor'])} | {fmt(ratio)} |")
        out.append("")
    return "\n".join(out)


def plot(rows, out_dir):
    """One PNG per (cell, mode); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for r in rows:
        if r["speedup"]:
            groups[(r["cell"], r["mode"])].append(r)
    paths = []
    for (cell, mode), grp in sorted(groups.items()):
        shapes = sorted({(work(r), shape_label(r)) for r in grp})
        xpos = {label: k for k, (_, label) in enumerate(shapes)}
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(shapes) + 3), 5.0))
        by_series = defaultdict(list)
        for r in grp:
            by_series[series_name(r)].append(r)
        for k, (name, pts) in enumerate(sorted(by_series.items())):
            pts.sort(key=lambda r: xpos[shape_label(r)])
            color = f"C{k % 10}"
            xs = [xpos[shape_label(r)] for r in pts]
            ax.plot(xs, [r["speedup"] for r in pts], "o-", color=color, label=name)
            fl = [(x, r["ms_ref"] / r["ms_floor"]) for x, r in zip(xs, pts) if r["ms_floor"]]
            if fl:
                ax.plot([p[0] for p in fl], [p[1] for p in fl], "--", color=color, alpha=0.6,
                        label=f"{name}: at floor")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([label for _, label in shapes], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs reference (x)")
        ax.set_title(f"{cell} {mode}: speedup against shape (dashed: reference / floor)",
                     fontsize=10)
        # Below the axes: the series names (machine, threads, environment) are long.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45))
        ax.grid(True, which="both", alpha=0.3)
        # No tight_layout: it would shrink the axes to fit the legend; the tight bounding box at
        # save time grows the image around it instead.
        path = out_dir / f"{cell}-{mode}.png".replace(" ", "_").replace("/", "_")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="results JSON (default: benchmarks/results/*.json)")
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="output directory")
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(str(DEFAULT_DIR / "*.json")))
    sources = []
    for f in files:
        loaded = load(f)
        if loaded is None:
            print(f"report: skipped {f} (not a results file)")
        elif loaded[1]:
            sources.append(loaded)
    if not sources:
        raise SystemExit(f"report: no benchmark rows in {files or DEFAULT_DIR}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(sources) + "\n")
    paths = plot([r for _, rows in sources for r in rows], out / "plots")
    print(f"report: wrote {out / 'report.md'} and {len(paths)} plots in {out / 'plots'}")
    return out / "report.md", paths


if __name__ == "__main__":
    main()
