#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the test suite, then a one-pass smoke run of
# the benchmark suite (timings disabled: speed is measured by the benchmark scripts, not tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest tests -q "$@"
.venv/bin/python -m pytest benchmarks -q --benchmark-disable
