#!/usr/bin/env bash
# The README's test command: install with the test tools (scripts/install.sh test), then run the test
# suite with the same Python. Arguments go to pytest, e.g. scripts/test.sh tests/test_config.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
source scripts/python.sh
exec "$COLOSSUS_PYTHON" -m pytest -q "$@"
