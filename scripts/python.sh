# Sourced by install.sh and test.sh: sets COLOSSUS_PYTHON, the interpreter Colossus installs into.
#   - $PYTHON if set, else python3, when pip may install into it: an active virtual environment or
#     conda environment, or a Python without PEP 668's EXTERNALLY-MANAGED marker that has pip;
#   - otherwise (Debian/Ubuntu's system Python refuses pip: "externally-managed-environment"; or it
#     has no pip) a project environment in .venv/, made once and reused. It sees the system's
#     packages only when the system Python already has torch (a GPU build is kept, not replaced).
base=${PYTHON:-python3}
if ! command -v "$base" >/dev/null 2>&1; then
  echo "scripts/install.sh: $base not found; install Python 3.11 or newer, or set PYTHON=/path/to/python" >&2
  exit 2
fi
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  COLOSSUS_PYTHON=$PWD/.venv/bin/python  # made by an earlier run of this script
elif "$base" - <<'PY'
import os, subprocess, sys, sysconfig
in_env = sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta"))
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
sys.exit(0 if has_pip and (in_env or not managed) else 1)
PY
then
  COLOSSUS_PYTHON=$(command -v "$base")
else
  shared=()
  "$base" -c "import torch" 2>/dev/null && shared=(--system-site-packages)
  echo "$base refuses pip installs (PEP 668) or has no pip: installing into a project environment, .venv/" >&2
  if ! "$base" -m venv "${shared[@]}" .venv >/dev/null; then
    rm -rf .venv
    echo "scripts/install.sh: $base cannot make a virtual environment; on Debian/Ubuntu run" \
         "'apt install python3-venv', or activate an environment of your own and run this again" >&2
    exit 2
  fi
  COLOSSUS_PYTHON=$PWD/.venv/bin/python
fi
export COLOSSUS_PYTHON
