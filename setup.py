"""Build script for timerec_fast: the C++ CPU ops always, the CUDA ops when nvcc and a CUDA torch are present.

Environment:
  TIMEREC_FORCE_CPU=1     build the CPU extension only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    CUDA architectures to compile for (default "8.0;8.6;8.9;9.0")
  MAX_JOBS                parallel compile jobs (torch.utils.cpp_extension)
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def want_cuda():
    if os.environ.get("TIMEREC_FORCE_CPU", "0") == "1":
        return False
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    return bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None


def make_extension():
    cpp_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DTORCH_EXTENSION_NAME=_C"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        return CUDAExtension(
            "timerec_fast._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags + ["-DTIMEREC_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-DTIMEREC_WITH_CUDA", "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "timerec_fast._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="timerec_fast",
    version="0.1.0",
    description="Fast fused (time-aware) recurrent cells for PyTorch, and a time-aware next-item recommender",
    packages=find_packages(include=["timerec_fast", "timerec_fast.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "expecttest"]},
    zip_safe=False,
)
