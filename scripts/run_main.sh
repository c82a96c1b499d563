#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python examples/train_lstm_synthetic.py "$@"
