#!/usr/bin/env bash
# Run the multi-process tests N times while other processes keep every core busy, and count failures:
# a flake that one full suite shows once in two runs shows here within a few rounds.
# usage: scripts/stress_multiprocess.sh [N] [PYTEST ARGS...]
#   N           rounds (default 20)
#   PYTEST ARGS tests to run (default: the tensor-parallel, parallel-layout and fault tests)
#   LOAD=K      busy processes beside the tests (default: one per core); LOAD=0 runs them unloaded
# Each round's pytest output is kept in $STRESS_DIR (default: a new folder under /tmp); a failed
# round's log names the first failed rank and its own stderr (tests/ranks.py).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
rounds=${1:-20}
shift || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_tensor_parallel.py tests/test_parallel.py tests/test_faults.py)
load=${LOAD:-$(nproc)}
logs=${STRESS_DIR:-$(mktemp -d /tmp/colossus-stress.XXXXXX)}
mkdir -p "$logs"
busy=()
for _ in $(seq 1 "$load"); do
  "$COLOSSUS_PYTHON" -c "while True: pass" &
  busy+=($!)
done
trap '[ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2>/dev/null' EXIT
echo "stress: ${tests[*]}, $rounds rounds beside $load busy processes; logs in $logs"
failures=0
started=$SECONDS
for round in $(seq 1 "$rounds"); do
  began=$SECONDS
  if "$COLOSSUS_PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$logs/round-$round.log" 2>&1; then
    verdict=passed
  else
    verdict=FAILED
    failures=$((failures + 1))
  fi
  echo "round $round: $verdict in $((SECONDS - began)) s ($(tail -n 1 "$logs/round-$round.log"))"
done
echo "stress: $failures failed of $rounds rounds in $((SECONDS - started)) s (logs: $logs)"
[ "$failures" -eq 0 ]
