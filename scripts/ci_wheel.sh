#!/usr/bin/env bash
# CI stage: build the CPU wheel, install it into a fresh venv away from the source tree, smoke-test.
#
# Builds with the .venv made by scripts/setup_env.sh (made here when missing):
#   TIMEREC_FORCE_CPU=1 pip wheel --no-build-isolation --no-deps -w dist .
# then makes a new venv (no system site-packages) in a temp dir, installs the same torch version
# as .venv's (from the on-disk wheel when pip's find-links has it) and then the wheel, and from that
# temp dir (so `import timerec_fast` cannot pick up the source tree) runs: import, a small parity
# check of timerec_fast.LSTM against torch.nn.LSTM (forward and gradients), and
# `python -m timerec_fast.info`. Any failure fails the script.
#
# Environment: TIMEREC_VENV (build venv, default .venv), PYTHON (for the fresh venv, default the
# build venv's base python), TIMEREC_WHEEL_KEEP=1 keeps
# the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BVENV=${TIMEREC_VENV:-$ROOT/.venv}
if [ ! -x "$BVENV/bin/python" ]; then
  bash scripts/setup_env.sh
fi
TORCH_VER=$("$BVENV/bin/python" -c "import torch; print(torch.__version__)")
start=$(date +%s)
rm -f dist/timerec_fast-*.whl
TIMEREC_FORCE_CPU=1 "$BVENV/bin/pip" wheel -q --no-build-isolation --no-deps -w dist .
WHEEL=$(ls dist/timerec_fast-*.whl)
echo "ci_wheel: built $WHEEL in $(( $(date +%s) - start )) s (torch $TORCH_VER)"

TMP=$(mktemp -d)
if [ "${TIMEREC_WHEEL_KEEP:-0}" != 1 ]; then trap 'rm -rf "$TMP"' EXIT; fi
PY=${PYTHON:-$("$BVENV/bin/python" -c "import sys; print(sys._base_executable)")}
"$PY" -m venv "$TMP/venv"
V="$TMP/venv/bin"
"$V/pip" install -q "torch==$TORCH_VER"
"$V/pip" install -q "$ROOT/$WHEEL"
cd "$TMP"
ROOT_DIR="$ROOT" "$V/python" - <<'PY'
import os
import torch
import timerec_fast
from timerec_fast import _loader

assert not timerec_fast.__file__.startswith(os.environ.get("ROOT_DIR", "/nonexistent")), timerec_fast.__file__
assert _loader._source == "compiled", _loader._source
torch.manual_seed(0)
ref = torch.nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True).double()
ours = timerec_fast.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True).double()
ours.load_state_dict(ref.state_dict())
x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
x2 = x.detach().clone().requires_grad_(True)
(y, (h, c)), (y2, (h2, c2)) = ours(x), ref(x2)
for a, b in ((y, y2), (h, h2), (c, c2)):
    torch.testing.assert_close(a, b)
(y.square().sum() + h.sum()).backward()
(y2.square().sum() + h2.sum()).backward()
torch.testing.assert_close(x.grad, x2.grad)
for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
    torch.testing.assert_close(p.grad, q.grad, msg=n)
print("ci_wheel: parity with torch.nn.LSTM OK;", timerec_fast.__file__)
PY
"$V/python" -m timerec_fast.info
"$V/pip" show timerec_fast | sed -n '1,3p;/^Requires/p'
echo "ci_wheel: OK, $(basename "$WHEEL") installed and smoke-tested in a fresh venv"
