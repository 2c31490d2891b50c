"""Tokens/s of a small MoE under 1, 2 and 4 processes and each parallel layout, side by side.

usage: python bench/parallel_throughput.py [--steps N] [--json]

Every run is the real trainer under torchrun (gloo on CPU, NCCL on GPU) with the same model and global
batch; the figure is the median tokens/s over the logged steps after the first 3 (warm-up). On a
2-core machine 4 processes oversubscribe the cores: the table shows what the communication costs,
not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(name="bench-moe", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
             n_experts=8, top_k=2, vocab_size=256, seq_len=128, embedding_multiplier=11.3)
RUNS = [  # (label, processes, [parallel] keys)
    ("1 process", 1, {}),
    ("2 x dp_shard", 2, {}),
    ("4 x dp_shard", 4, {}),
    ("dp_replicate=2 x dp_shard=2", 4, {"dp_replicate": 2}),
    ("dp_shard=2 x tp=2", 4, {"tp": 2}),
    ("dp_shard=2 x ep=2", 4, {"ep": 2}),
    ("ep=4", 4, {"ep": 4}),
]


def run(label: str, procs: int, parallel: dict, steps: int, work: Path) -> float:
    tables = {"model": MODEL, "train": {"steps": steps, "global_batch": 8, "micro_batch": 2, "threads": 1},
              "checkpoint": {"interval": 10_000}, "eval": {"interval": 10_000, "batches": 1, "sample_tokens": 0},
              "log": {"interval": 1, "tensorboard": False}, "parallel": parallel}
    out = work / label.replace(" ", "_").replace("=", "")
    config = out.with_suffix(".toml")
    config.write_text(tomli_w.dumps(tables))
    if procs == 1:
        command = [sys.executable, "-m", "colossus.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "colossus.train"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(config), "--out", str(out)], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{label} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 3]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [(label, procs, run(label, procs, parallel, args.steps, Path(tmp))) for label, procs, parallel in RUNS]
    base = results[0][2]
    if args.json:
        print(json.dumps([{"layout": l, "processes": p, "tokens_per_s": t, "ratio": t / base} for l, p, t in results], indent=1))
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model {MODEL['name']}: {MODEL['n_layers']} layers, d {MODEL['d_model']}, {MODEL['n_experts']} experts top-2, "
          f"seq {MODEL['seq_len']}, global batch 8, 1 thread per process")
    print(f"{'layout':<30} {'procs':>5} {'tokens/s':>10} {'vs 1 process':>13}")
    for label, procs, speed in results:
        print(f"{label:<30} {procs:>5} {speed:>10,.0f} {speed / base:>12.2f}x")


if __name__ == "__main__":
    main()
