#!/usr/bin/env bash
# Install Colossus and what it needs, on the fast path:
# - into the Python you run (an active virtual environment, say), or into .venv/ where that Python
#   refuses pip (PEP 668) or has none (scripts/python.sh decides);
# - a torch that is already installed (a GPU build, say) is kept;
# - on a machine without torch, the CPU build (a bare `torch` requirement would pull several GB of CUDA).
# usage: scripts/install.sh [EXTRAS]     e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
py=$COLOSSUS_PYTHON
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0" || "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
extras=${1:-}
"$py" -m pip install -q -e ".${extras:+[$extras]}"

# In .venv/, `colossus` is not on PATH: link it into the first folder on PATH where we may
# (~/.local/bin, or /usr/local/bin when writable), never over a file that is not such a link.
if [ "$py" = "$PWD/.venv/bin/python" ]; then
  linked=""
  for dir in "$HOME/.local/bin" /usr/local/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) continue ;; esac
    mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ] || continue
    target=$dir/colossus
    if [ -e "$target" ] && ! [ -L "$target" ]; then continue; fi
    if [ -L "$target" ] && [[ "$(readlink "$target")" != */.venv/bin/colossus ]]; then continue; fi
    ln -sfn "$PWD/.venv/bin/colossus" "$target" && linked=$target && break
  done
  if [ -n "$linked" ]; then
    echo "installed into $PWD/.venv; colossus is linked from $linked" >&2
  else
    echo "installed into $PWD/.venv; run 'source .venv/bin/activate' to put colossus on PATH" >&2
  fi
fi
