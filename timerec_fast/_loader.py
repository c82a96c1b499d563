"""Loads the compiled extension (timerec_fast._C), which registers the C++/CUDA ops.

Before loading it, the torch this build was compiled against (timerec_fast/_build_info.py, written
by setup.py) is compared with the running one: a different major.minor raises a clear ImportError
instead of an undefined-symbol crash inside the dynamic loader.

Environment:
  TIMEREC_JIT=1                  when timerec_fast._C is missing (or built for another torch), build
                                 the CPU ops from the csrc/ sources with torch.utils.cpp_extension.load
  TIMEREC_CSRC=DIR               where the csrc/ sources are (default: beside the package, as in a
                                 source tree)
  TORCH_EXTENSIONS_DIR           where the JIT build goes (torch's default: ~/.cache/torch_extensions)
  TIMEREC_SKIP_VERSION_CHECK=1   load _C without comparing torch versions (at your own risk)
"""
import glob
import importlib
import os
import re
import sys

import torch

_loaded = False
_source = None  # "compiled" or "jit"
PKG_DIR = os.path.dirname(os.path.abspath(__file__))
# The flags of setup.py's CppExtension (the JIT build must compile the same code the same way).
JIT_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
REBUILD_HINT = (
    "Rebuild timerec_fast against the torch you run with: from a source tree, "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` (or `-e .`), or build a "
    "wheel there with `pip wheel --no-build-isolation --no-deps .` and install it; "
    "or set TIMEREC_JIT=1 to compile the CPU ops from the sources at import.")


def torch_minor(version):
    """'2.13.0+cpu' -> '2.13'."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def read_build_info():
    """The recorded build facts as a dict, or None when this tree was never built by setup.py."""
    try:
        mod = importlib.import_module("timerec_fast._build_info")
    except ImportError:
        return None
    return {k: v for k, v in vars(mod).items() if not k.startswith("_")}


def check_build(info, torch_version=None, torch_cuda="running"):
    """None when the build in `info` can be loaded by the running torch, else why not (a message)."""
    if not info:
        return None
    running = torch_version or torch.__version__
    running_cuda = torch.version.cuda if torch_cuda == "running" else torch_cuda
    built = info.get("torch_version", "?")
    if torch_minor(built) != torch_minor(running):
        return (f"timerec_fast {info.get('version', '')} was built against torch {built}, but torch "
                f"{running} is running (the extension's C++ ABI needs the same torch major.minor, "
                f"{torch_minor(built)}).")
    if info.get("with_cuda") and not running_cuda:
        return (f"timerec_fast {info.get('version', '')} was built with CUDA {info.get('cuda_version')}"
                f" kernels against torch {built}, but the running torch {running} has no CUDA.")
    return None


def _jit_sources(csrc):
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def find_csrc():
    candidates = [os.environ.get("TIMEREC_CSRC"), os.path.join(os.path.dirname(PKG_DIR), "csrc")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "registration.cpp")):
            return c
    return None


def jit_build(reason, verbose=None):
    """Builds the CPU ops from csrc/ with torch.utils.cpp_extension.load and loads the library
    (its TORCH_LIBRARY registrations run on load, exactly as for _C). Returns the library path."""
    from torch.utils import cpp_extension

    csrc = find_csrc()
    if csrc is None:
        raise ImportError(
            f"timerec_fast: TIMEREC_JIT=1 but no csrc/ sources found ({reason}). Set TIMEREC_CSRC to "
            "the csrc/ directory of a timerec_fast source tree.")
    name = "timerec_fast_C_torch" + torch_minor(torch.__version__).replace(".", "_")
    print(f"timerec_fast: {reason} TIMEREC_JIT=1: building the CPU ops from {csrc} with "
          "torch.utils.cpp_extension.load (the first build takes a few minutes; later imports reuse "
          "it)...", file=sys.stderr, flush=True)
    if verbose is None:
        verbose = os.environ.get("TIMEREC_JIT_VERBOSE", "0") == "1"
    path = cpp_extension.load(
        name=name,
        sources=_jit_sources(csrc),
        extra_cflags=JIT_CFLAGS,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[os.path.join(csrc, "include")],
        is_python_module=False,  # registration.cpp defines PyInit__C, not PyInit_<name>: load as a library
        verbose=verbose,
    )
    print("timerec_fast: JIT build loaded", file=sys.stderr, flush=True)
    return path


def load_extension():
    global _loaded, _source
    if _loaded:
        return
    jit = os.environ.get("TIMEREC_JIT", "0") == "1"
    problem = None
    if os.environ.get("TIMEREC_SKIP_VERSION_CHECK", "0") != "1":
        problem = check_build(read_build_info())
    if problem is not None and not jit:
        raise ImportError(f"{problem} {REBUILD_HINT}")
    if problem is None:
        try:
            importlib.import_module("timerec_fast._C")
            _loaded, _source = True, "compiled"
            return
        except ImportError as exc:
            if not jit:
                raise ImportError(
                    "timerec_fast: the compiled extension timerec_fast._C could not be loaded "
                    f"({exc}). Build it from the source tree with "
                    "`pip install --no-build-isolation -e .` against the torch you run with, or set "
                    "TIMEREC_JIT=1 to compile the CPU ops from the csrc/ sources at import "
                    "(torch.utils.cpp_extension.load).") from exc
            problem = f"the compiled extension timerec_fast._C could not be loaded ({exc})."
    jit_build(problem)
    _loaded, _source = True, "jit"
