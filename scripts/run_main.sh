#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the main job: `timerec demo`, which generates
# a synthetic interaction log with temporal structure, trains the TimeLSTM recommender and the GRU
# baseline, evaluates both (full ranking) and prints the metrics and the fused kernels' speed
# against torch.nn. Extra arguments go to `timerec demo` (see `timerec demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/timerec demo "$@"
