#!/usr/bin/env bash
# Creates .venv (Python 3.9+) with the CPU build of torch and installs timerec_fast into it.
# Safe to re-run: an existing .venv is reused and the extension is rebuilt if sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TIMEREC_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
.venv/bin/pip install -q setuptools wheel numpy pytest pytest-benchmark expecttest
# --no-build-isolation: build against the torch installed above (isolation would fetch another).
TIMEREC_FORCE_CPU=${TIMEREC_FORCE_CPU:-1} .venv/bin/pip install -q --no-build-isolation -e ".[test]"
.venv/bin/python -c "import timerec_fast, torch; print('timerec_fast', timerec_fast.__version__, 'on torch', torch.__version__)"
