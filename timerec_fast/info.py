"""What this timerec_fast is and what it runs on: `python -m timerec_fast.info` [--json].

timerec_fast.build_info() returns the same facts as a dict.
"""
import json
import os
import platform
import sys

import torch

from . import _loader

# /proc/cpuinfo flags worth knowing for the CPU kernels (x86 SIMD, AMX; ARM NEON/SVE).
_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                 "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                 "asimd", "sve", "sve2")


def _cpuinfo_value(*keys):
    """The first /proc/cpuinfo value under one of keys (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_vector_features():
    flags = set((_cpuinfo_value("flags", "Features") or "").split())
    return [f for f in _VECTOR_FLAGS if f in flags]


def cpu_model():
    """The CPU's model name, or the architecture where /proc/cpuinfo does not say."""
    return _cpuinfo_value("model name") or platform.processor() or platform.machine()


def cpu_family_model():
    """"family/model/stepping" from /proc/cpuinfo (x86), or None. Cloud VMs report one model name
    ("Intel(R) Xeon(R) Processor") for different chips; the numbers tell them apart."""
    values = [_cpuinfo_value(k) for k in ("cpu family", "model", "stepping")]
    return "/".join(values) if all(values) else None


def cpu_caches():
    """Cache sizes of CPU 0 as sysfs reports them, e.g. {"L1d": "48K", "L2": "2048K"}."""
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return caches
    for entry in entries:
        try:
            with open(f"{base}/{entry}/level") as f:
                level = f.read().strip()
            with open(f"{base}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{entry}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[f"L{level}{suffix}"] = size
    return caches


def _has_kernel(op, key):
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"timerec_fast::{op}", key))
    except RuntimeError:
        return False


def build_info():
    """A dict of the build facts (recorded by setup.py) and of the running environment."""
    import timerec_fast

    _loader.load_extension()
    built = _loader.read_build_info() or {}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001  (older torch)
        capability = None
    cuda_available = torch.cuda.is_available()
    return dict(
        version=built.get("version", timerec_fast.__version__),
        extension=_loader._source,  # "compiled" (_C) or "jit" (TIMEREC_JIT=1)
        built_torch=built.get("torch_version"),
        built_cuda=built.get("cuda_version"),
        built_cuda_archs=built.get("cuda_archs", []),
        built_with_cuda=built.get("with_cuda"),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=cuda_available,
        cuda_device=torch.cuda.get_device_name(0) if cuda_available else None,
        cuda_kernels=_has_kernel("lstm_forward", "CUDA"),
        cpu_kernels=_has_kernel("lstm_forward", "CPU"),
        cpu_capability=capability,
        cpu_vector_features=cpu_vector_features(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        openmp=torch.backends.openmp.is_available(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        python=platform.python_version(),
    )


def format_info(info):
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, (list, tuple)):
            v = " ".join(map(str, v)) or "-"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    info = build_info()
    print(json.dumps(info, indent=1) if "--json" in argv else format_info(info))


if __name__ == "__main__":
    main()
