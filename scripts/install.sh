#!/usr/bin/env bash
# Install Colossus and what it needs, on the fast path:
# - a torch that is already installed (a GPU build, say) is kept;
# - on a machine without torch, the CPU build (a bare `torch` requirement would pull several GB of CUDA).
# usage: scripts/install.sh [EXTRAS]     e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==2.13.0" || "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
extras=${1:-}
"$PYTHON" -m pip install -q -e ".${extras:+[$extras]}"
