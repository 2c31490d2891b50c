#!/usr/bin/env bash
# The checks that need a GPU, as one short script (run from the repository root on a CUDA machine
# whose python3 already has torch): the GPU benchmark (~1B dense model and an MoE, eager first, then
# compiled), the GPU tests and the peak memory. Each part has its own time limit and no part starts
# after BUDGET_S seconds, so a lease that runs out still returns everything measured until then.
# Results go to $OUT (or ./gpu-check): log.txt (everything), bench_gpu.jsonl (one benchmark JSON per
# line), gpu_tests.log, profile_gpu.txt (where a compiled step's GPU time goes, costliest kernels).
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget="${BUDGET_S:-420}"   # start no part after this
hard_end="${END_S:-500}"    # and end every part by this
steps="${STEPS:-5}"
log="$out/log.txt"
failed=0

# part NAME LIMIT_S COMMAND...: run COMMAND (its whole process group) for at most LIMIT_S seconds.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$(( hard_end - SECONDS ))
  if (( SECONDS > budget || left < 20 )); then
    echo "== $name: skipped at ${SECONDS}s (budget ${budget}s)" | tee -a "$log"
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (start ${SECONDS}s, limit ${limit}s)" | tee -a "$log"
  timeout -k 5 "$limit" bash -c '"$@"' _ "$@"  # kills the whole process group (the benchmark's workers too)
  local rc=$?
  echo "== $name: exit $rc at ${SECONDS}s" | tee -a "$log"
  (( rc != 0 )) && failed=1
  return 0
}

# bench SHAPE MODE [ARGS...]: one benchmark timing as one JSON line in bench_gpu.jsonl.
bench() {
  local shape=$1 mode=$2
  shift 2
  python3 bench/throughput.py --device cuda --shapes "$shape" --modes "$mode" --steps "$steps" --warmup 3 \
    --json "$@" 2>>"$log" | python3 -c 'import json, sys; text = sys.stdin.read(); text.strip() and print(json.dumps(json.loads(text)))' >>"$out/bench_gpu.jsonl"
}

profile() {
  python3 bench/throughput.py --device cuda --profile --modes compiled --warmup 3 2>>"$log" | tee "$out/profile_gpu.txt" >>"$log"
}

tests() {
  python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tee -a "$log"
}
export out log steps
export -f bench tests profile

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$log"
part "bench dense1b eager" 100 bench dense1b eager --ac ""
part "bench moe1b eager" 100 bench moe1b eager --ac ""
part "GPU tests" 200 tests
part "bench dense1b compiled" 150 bench dense1b compiled --ac ""
part "bench moe1b compiled" 150 bench moe1b compiled --ac ""
part "peak memory" 80 bench dense1b,moe1b "" --ac none
part "profile (compiled)" 120 profile
part "bench dense1b sdpa" 60 bench dense1b sdpa --ac ""
part "bench moe1b sdpa" 60 bench moe1b sdpa --ac ""

python3 - "$out/bench_gpu.jsonl" <<'PY' 2>&1 | tee -a "$log"
import json, sys
try:
    results = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
except FileNotFoundError:
    sys.exit("no benchmark results")
for result in results:
    for row in result["rows"]:
        print(f"{row['shape']:8} {row['mode']:9} {row['tokens_per_s']:10,.0f} tokens/s  step {row['step_s'] * 1e3:7.1f} ms"
              f"  MFU {row['mfu']:6.1%}  warm-up {row['warmup_s']:.0f} s")
    for row in result["memory"]:
        predicted = row.get("predicted_bytes")
        print(f"{row['shape']:8} {row['ac']:5} peak {row['peak_bytes'] / 2**30:6.2f} GiB"
              + (f"  planner {predicted / 2**30:6.2f} GiB ({predicted / row['peak_bytes'] - 1:+.0%})" if predicted else ""))
PY
exit $failed
