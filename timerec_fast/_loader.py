"""Loads the compiled extension (timerec_fast._C), which registers the C++/CUDA ops."""
import importlib

_loaded = False


def load_extension():
    global _loaded
    if _loaded:
        return
    try:
        importlib.import_module("timerec_fast._C")
    except ImportError as exc:
        raise ImportError(
            "timerec_fast: the compiled extension timerec_fast._C could not be loaded "
            f"({exc}). Build it from the source tree with "
            "`pip install --no-build-isolation -e .` against the torch you run with."
        ) from exc
    _loaded = True
