#!/usr/bin/env bash
# The GPU check of issue 3, in one go, on a machine with an NVIDIA GPU (written for an H100 with
# python3 + a CUDA torch + nvcc already installed; nothing is downloaded):
#   1. builds the extension in place with nvcc (CUDA_HOME, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16),
#   2. runs tests/test_cuda_lstm.py and tests/test_cuda_cells.py (junit XML kept for the counts),
#   3. runs benchmarks/gpu_bench.py (grid vs cuDNN + strategy crossover + GRU / TimeLSTM rows), which
#      prints the tables and
#      writes benchmarks/results/<card>-<commit>.json and $OUT/<card>-<commit>.json.
# Logs go to $OUT (or /tmp/timerec_gpu_check). Exit status: non-zero if the build or any test
# failed (the benchmark still runs after failing tests, so the numbers are never lost).
#
# Knobs: PYTHON (default python3), GPU_CHECK_SKIP_TESTS=1, GPU_CHECK_QUICK=1 (small bench grid),
# GPU_CHECK_NO_CROSSOVER=1, TEST_TIMEOUT / BENCH_TIMEOUT (seconds; 330 / 420).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PATH="$CUDA_HOME/bin:$PATH"
LOGS=${OUT:-/tmp/timerec_gpu_check}
mkdir -p "$LOGS"
t_start=$(date +%s)
stamp() { echo "== gpu_check [$(( $(date +%s) - t_start )) s] $*"; }

stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for mod in ("pytest", "numpy", "expecttest", "triton"):
    try:
        importlib.import_module(mod)
        print(" ", mod, "ok")
    except ImportError:
        print(" ", mod, "MISSING")
EOF
nvcc --version | tail -1
if [ -z "$(git rev-parse HEAD 2>/dev/null)" ] && [ -z "${TIMEREC_COMMIT:-}" ]; then
  echo "gpu_check: no git metadata here; set TIMEREC_COMMIT to name the commit in the results"
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for inc in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/cublas/include; do
  if [ -d "$inc" ] && [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
    export CPATH="$inc${CPATH:+:$CPATH}"
  fi
done

stamp "build (nvcc, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
if ! TIMEREC_FORCE_CPU=0 "$PY" setup.py -q build_ext --inplace >"$LOGS/build.log" 2>&1; then
  tail -60 "$LOGS/build.log"
  echo "gpu_check: BUILD FAILED (full log: $LOGS/build.log)"
  exit 1
fi
"$PY" -c "
import torch, timerec_fast
assert torch._C._dispatch_has_kernel_for_dispatch_key('timerec_fast::lstm_forward', 'CUDA'), \
    'extension built without its CUDA kernels'
print('gpu_check: extension loaded with CUDA kernels')" || exit 1

tests_rc=0
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
  stamp "tests"
  timeout "${TEST_TIMEOUT:-330}" "$PY" -m pytest tests/test_cuda_lstm.py tests/test_cuda_cells.py -q -p no:cacheprovider \
    --junitxml="$LOGS/junit.xml" -o junit_family=xunit1 2>&1 | tee "$LOGS/tests.log" | tail -40
  tests_rc=${PIPESTATUS[0]}
  echo "gpu_check: tests exit status $tests_rc"
fi

stamp "benchmark"
bench_args=(--junit "$LOGS/junit.xml")
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && bench_args+=(--quick)
[ "${GPU_CHECK_NO_CROSSOVER:-0}" = 1 ] || bench_args+=(--crossover)
timeout "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/gpu_bench.py "${bench_args[@]}" 2>&1 \
  | tee "$LOGS/bench.log" | grep -v " B=" | tail -400
bench_rc=${PIPESTATUS[0]}
stamp "done: tests $tests_rc, bench $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
