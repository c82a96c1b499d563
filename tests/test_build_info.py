"""Build metadata: the import-time torch check, build_info() / `python -m timerec_fast.info`, and
the TIMEREC_JIT fallback (each import check runs in a subprocess on a copy of the package)."""
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import timerec_fast
from timerec_fast import _loader

PKG = pathlib.Path(timerec_fast.__file__).resolve().parent
ROOT = PKG.parent


def copy_package(dest, with_so=True, build_info=None):
    """A copy of the installed package under dest/ (optionally without _C*.so, or with a faked
    _build_info.py); returns dest, to put first on PYTHONPATH."""
    ignore = ["__pycache__"] + ([] if with_so else ["_C*.so", "_C*.pyd"])
    shutil.copytree(PKG, dest / "timerec_fast", ignore=shutil.ignore_patterns(*ignore))
    if build_info is not None:
        text = "".join(f"{k} = {v!r}\n" for k, v in build_info.items())
        (dest / "timerec_fast" / "_build_info.py").write_text(text)
    return dest


# An editable install's meta-path finder would resolve timerec_fast._C from the source tree even
# when the copy's package is imported: drop it so the copy is all there is.
NO_EDITABLE = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path "
               "if 'editable' not in repr(f).lower()]\n")


def run_py(code, path, env=None, timeout=120):
    code = NO_EDITABLE + code
    full_env = dict(os.environ, PYTHONPATH=str(path), **(env or {}))
    for var in ("TIMEREC_JIT", "TIMEREC_SKIP_VERSION_CHECK", "TIMEREC_CSRC"):
        if env is None or var not in env:
            full_env.pop(var, None)
    return subprocess.run([sys.executable, "-c", code], cwd=path, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def fake_info(torch_version, with_cuda=False, cuda=None):
    return dict(version="0.1.0+test", torch_version=torch_version,
                torch_minor=_loader.torch_minor(torch_version), cuda_version=cuda,
                cuda_archs=["9.0"] if with_cuda else [], with_cuda=with_cuda)


def test_torch_minor():
    assert _loader.torch_minor("2.13.0+cpu") == "2.13"
    assert _loader.torch_minor("2.14.1") == "2.14"
    assert _loader.torch_minor("10.0.0a0+git") == "10.0"


def test_check_build_same_minor_ok_other_minor_refused():
    running = torch.__version__
    assert _loader.check_build(None) is None
    assert _loader.check_build(fake_info(running)) is None
    assert _loader.check_build(fake_info("2.12.1+cpu"), torch_version="2.12.0") is None
    msg = _loader.check_build(fake_info("2.12.1+cpu"), torch_version="2.13.0+cpu")
    assert "2.12.1+cpu" in msg and "2.13.0+cpu" in msg
    msg = _loader.check_build(fake_info("2.13.0", with_cuda=True, cuda="13.0"),
                              torch_version="2.13.0+cpu", torch_cuda=None)
    assert "CUDA 13.0" in msg and "no CUDA" in msg
    assert _loader.check_build(fake_info("2.13.0", with_cuda=True, cuda="13.0"),
                               torch_version="2.13.0", torch_cuda="13.0") is None


def test_recorded_build_matches_running_torch():
    info = _loader.read_build_info()
    if info is None:
        pytest.skip("no _build_info.py (extension not built by setup.py)")
    assert info["torch_minor"] == _loader.torch_minor(torch.__version__)
    assert info["version"].startswith(timerec_fast.__version__ + "+")
    assert f"torch{info['torch_minor']}" in info["version"]


def test_mismatched_torch_gives_clear_import_error(tmp_path):
    """A build recorded for another torch minor is refused BEFORE _C is loaded (no undefined
    symbol): the error names both versions and how to rebuild."""
    copy_package(tmp_path, build_info=fake_info("2.7.1+cpu"))
    res = run_py("import timerec_fast", tmp_path)
    assert res.returncode != 0
    err = res.stderr
    assert "ImportError" in err, err
    assert "2.7.1+cpu" in err and torch.__version__ in err, err
    assert "--force-reinstall" in err and "TIMEREC_JIT=1" in err, err
    assert "undefined symbol" not in err, err
    # _C was never loaded (the check runs first)
    res = run_py("import sys\ntry:\n    import timerec_fast\nexcept ImportError:\n    pass\n"
                 "assert 'timerec_fast._C' not in sys.modules, 'loaded _C'\nprint('ok')", tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    # the escape hatch skips the check (same torch really, so _C loads)
    res = run_py("import timerec_fast; print('ok')", tmp_path,
                 env={"TIMEREC_SKIP_VERSION_CHECK": "1"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_cuda_build_on_cpu_torch_gives_clear_import_error(tmp_path):
    if torch.version.cuda:
        pytest.skip("running torch has CUDA")
    copy_package(tmp_path, build_info=fake_info(torch.__version__, with_cuda=True, cuda="13.0"))
    res = run_py("import timerec_fast", tmp_path)
    assert res.returncode != 0 and "CUDA 13.0" in res.stderr and "ImportError" in res.stderr


def test_missing_extension_error_names_the_jit_variable(tmp_path):
    copy_package(tmp_path, with_so=False)
    res = run_py("import timerec_fast", tmp_path)
    assert res.returncode != 0
    assert "timerec_fast._C could not be loaded" in res.stderr, res.stderr
    assert "TIMEREC_JIT=1" in res.stderr, res.stderr


def test_build_info_dict():
    info = timerec_fast.build_info()
    for key in ("version", "built_torch", "built_cuda", "built_cuda_archs", "built_with_cuda",
                "torch", "torch_cuda", "cuda_kernels", "cpu_capability", "cpu_vector_features",
                "threads", "extension"):
        assert key in info, key
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert info["cpu_kernels"] is True
    assert info["cuda_kernels"] == bool(torch._C._dispatch_has_kernel_for_dispatch_key(
        "timerec_fast::lstm_forward", "CUDA"))
    assert info["extension"] in ("compiled", "jit")
    json.dumps(info)  # plain data


def test_cpu_identity_for_benchmark_records():
    from timerec_fast import info
    caches = info.cpu_caches()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in caches.items())
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        assert "L1d" in caches and caches["L1d"][0].isdigit(), caches
    ident = info.cpu_family_model()
    if ident is not None:
        assert len(ident.split("/")) == 3 and all(p.isdigit() for p in ident.split("/")), ident


def test_info_module_cli():
    res = subprocess.run([sys.executable, "-m", "timerec_fast.info"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "built_torch" in res.stdout and torch.__version__ in res.stdout
    assert "RuntimeWarning" not in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "timerec_fast.info", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["torch"] == torch.__version__


@pytest.mark.slow
def test_jit_fallback_builds_and_registers_the_ops(tmp_path):
    """TIMEREC_JIT=1 with no _C*.so: torch.utils.cpp_extension.load compiles csrc/ (CPU) and the
    ops register exactly as with _C (~1-2 min on 2 cores)."""
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    csrc = ROOT / "csrc"
    if not (csrc / "registration.cpp").is_file():
        pytest.skip("no csrc/ beside the package (installed from a wheel)")
    pkg_root = copy_package(tmp_path / "pkg", with_so=False)
    shutil.copytree(csrc, tmp_path / "pkg" / "csrc", ignore=shutil.ignore_patterns("cuda"))
    assert not glob.glob(str(pkg_root / "timerec_fast" / "_C*"))
    code = """
import sys, torch
import timerec_fast
from timerec_fast import _loader
assert _loader._source == "jit", _loader._source
assert timerec_fast.__file__.startswith(%r), timerec_fast.__file__
assert "timerec_fast._C" not in sys.modules
for op in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "time_lstm_forward",
           "time_lstm_backward", "tlstm_forward", "tlstm_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("timerec_fast::" + op, "CPU"), op
torch.manual_seed(0)
ref = torch.nn.LSTM(5, 7, batch_first=True).double()
ours = timerec_fast.LSTM(5, 7, batch_first=True).double()
ours.load_state_dict(ref.state_dict())
x = torch.randn(2, 4, 5, dtype=torch.float64)
torch.testing.assert_close(ours(x)[0], ref(x)[0])
print("jit ok", timerec_fast.build_info()["extension"])
""" % str(pkg_root)
    env = {"TIMEREC_JIT": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    res = run_py(code, pkg_root, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "jit ok jit" in res.stdout
    assert "TIMEREC_JIT=1: building the CPU ops" in res.stderr
