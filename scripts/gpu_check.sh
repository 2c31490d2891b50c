#!/usr/bin/env bash
# The checks that need a GPU, as one short script (run from the repository root on a CUDA machine
# whose python3 already has torch): the GPU tests, then the GPU benchmark (~1B dense model and an MoE).
# Results go to $OUT (or ./gpu-check) as gpu_tests.log and bench_gpu.json.
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py 2>&1 | tee "$out/gpu_tests.log"
tests=$?
python3 bench/throughput.py --device cuda --steps "${STEPS:-5}" --warmup 3 --ac none --json | tee "$out/bench_gpu.json"
bench=$?
python3 - "$out/bench_gpu.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
for row in result["rows"]:
    print(f"{row['shape']:8} {row['mode']:9} {row['tokens_per_s']:12,.0f} tokens/s  MFU {row['mfu']:6.1%}  "
          f"warm-up {row['warmup_s']:.0f} s")
for row in result["memory"]:
    print(f"{row['shape']:8} peak {row['peak_bytes'] / 2**30:.1f} GiB")
PY
exit $(( tests || bench ))
