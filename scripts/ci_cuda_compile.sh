#!/usr/bin/env bash
# CI stage: compile and link the CUDA extension on a machine without a GPU, then import it.
#
# Makes (or reuses) a venv in .venv-cuda/ with the CUDA build of torch (TIMEREC_CUDA_TORCH,
# default torch==2.14.1, the CUDA 13.0 wheel), builds timerec_fast with nvcc for
# TORCH_CUDA_ARCH_LIST (default 9.0) in a copy of the source tree (so the in-tree CPU build of
# timerec_fast/_C*.so is left alone), and imports the result, checking that the CUDA kernels are
# registered. Any compile or link error fails the script (and CI).
#
# Environment: TIMEREC_CUDA_VENV (venv path; an existing CUDA-torch venv such as /work/venv-cuda
# can be reused), CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST, MAX_JOBS (default 2),
# TIMEREC_CUDA_MIN_FREE_GB (default 7: below that free disk the stage is skipped with a message),
# TIMEREC_CI_REQUIRE_CUDA=1 (too little disk fails instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${TIMEREC_CUDA_VENV:-$ROOT/.venv-cuda}
PY=${PYTHON:-python3}
TORCH_SPEC=${TIMEREC_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export PATH="$CUDA_HOME/bin:$PATH"

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "ci_cuda_compile: no nvcc at $CUDA_HOME/bin/nvcc" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  # The CUDA torch and its nvidia-* wheels take about 5.5 GB installed (plus the build). A CI box
  # short of disk skips this stage, saying so, rather than failing half-way through pip (an earlier
  # CI run died with ENOSPC here); TIMEREC_CI_REQUIRE_CUDA=1 makes it an error instead.
  need_kb=$(( ${TIMEREC_CUDA_MIN_FREE_GB:-7} * 1024 * 1024 ))
  mkdir -p "$(dirname "$VENV")"
  free_kb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt "$need_kb" ]; then
    msg="ci_cuda_compile: SKIPPED: installing $TORCH_SPEC (CUDA) needs about $(( need_kb / 1048576 )) GB free, $(dirname "$VENV") has $(( free_kb / 1048576 )) GB"
    if [ "${TIMEREC_CI_REQUIRE_CUDA:-0}" = 1 ]; then echo "$msg" | sed 's/SKIPPED/FAILED/' >&2; exit 1; fi
    echo "$msg" >&2
    exit 0
  fi
  made_venv=0
  if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; made_venv=1; fi
  log=$(mktemp)
  if ! "$VENV/bin/pip" install -q --no-cache-dir "$TORCH_SPEC" >"$log" 2>&1; then
    grep -v "WARNING: Location" "$log" >&2 || true
    # A venv made here with a half-installed torch would only confuse the next run; one that
    # was given (TIMEREC_CUDA_VENV) is left alone.
    if [ "$made_venv" = 1 ]; then rm -rf "$VENV"; fi
    if grep -q "No space left on device" "$log" && [ "${TIMEREC_CI_REQUIRE_CUDA:-0}" != 1 ]; then
      echo "ci_cuda_compile: SKIPPED: the disk filled up while pip installed $TORCH_SPEC (CUDA) into $VENV" >&2
      rm -f "$log"
      exit 0
    fi
    echo "ci_cuda_compile: pip could not install $TORCH_SPEC into $VENV (see above)" >&2
    exit 1
  fi
  rm -f "$log"
fi
"$VENV/bin/python" -c "import setuptools, numpy" 2>/dev/null || "$VENV/bin/pip" install -q setuptools wheel numpy
"$VENV/bin/python" -c "import torch; print('ci_cuda_compile: torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The toolkit on the CI machine lacks the cuBLAS headers: the torch wheel's nvidia/cu13 has them.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for inc in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/cublas/include; do
  if [ -d "$inc" ]; then export CPATH="$inc${CPATH:+:$CPATH}"; fi
done

# Build in a copy of the tracked + untracked-not-ignored files. Files keep their mtimes, so a
# re-run recompiles only what changed (ninja, in the copy's build/ directory).
SRC="$VENV/build-src"
mkdir -p "$SRC"
git ls-files -z -c -o --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$SRC"
cd "$SRC"
start=$(date +%s)
TIMEREC_FORCE_CPU=0 "$VENV/bin/python" setup.py -q build_ext --inplace
echo "ci_cuda_compile: build took $(( $(date +%s) - start )) s"

"$VENV/bin/python" - <<'EOF'
import glob
import torch
import timerec_fast  # noqa: F401  (loads the extension; works without a GPU)
so = glob.glob("timerec_fast/_C*.so")
assert so, "no extension built"
for op in ("lstm_forward", "lstm_inference", "lstm_backward", "gru_forward", "gru_inference",
           "gru_backward", "time_lstm_forward", "time_lstm_inference", "time_lstm_backward",
           "tlstm_forward", "tlstm_backward"):
    name = f"timerec_fast::{op}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"
for op in ("lstm_forward", "lstm_inference", "gru_forward", "gru_inference", "time_lstm_forward",
           "time_lstm_inference", "tlstm_forward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"timerec_fast::{op}", "AutocastCUDA"), op
print("ci_cuda_compile: OK, imported", so[0], "with CPU and CUDA kernels of every cell; cuda available:",
      torch.cuda.is_available())
EOF

# Pack the build into a wheel, in the same copy: setuptools reuses its build/ directory, so ninja
# only relinks (the version is tagged cuXYZ.torchX.Y; install it where that torch runs).
start=$(date +%s)
rm -f dist/timerec_fast-*.whl
TIMEREC_FORCE_CPU=0 "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -w dist .
WHEEL=$(ls dist/timerec_fast-*.whl)
echo "ci_cuda_compile: packed the CUDA build into $SRC/$WHEEL ($(( $(date +%s) - start )) s)"
"$VENV/bin/python" -c "import sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).read('timerec_fast/_build_info.py').decode().split(chr(34) * 3)[-1].strip())" "$WHEEL"
