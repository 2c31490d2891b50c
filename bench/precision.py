"""bf16 against fp32 training on this machine, side by side: the same `tiny` run (same seed, data and
steps) with train.precision = fp32 and = bf16 (CPU autocast: bf16 matmuls over fp32 weights, the
numerics a GPU run uses), tokens/s and the loss curves compared.

usage: python bench/precision.py [--steps 150] [--json]

Each run is the real trainer (`python -m colossus.train`) in a fresh process; tokens/s is the median of
the logged windows after the first (warm-up). The loss gap is the largest |loss_bf16 / loss_fp32 - 1|
over the logged steps. Whether bf16 can be fast here depends on the CPU: AMX (amx_bf16) and AVX-512
BF16 (avx512_bf16) have bf16 matrix instructions; without them bf16 matmuls are emulated and slower
than fp32. The flags this CPU has are printed with the figures.
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

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> dict[str, bool]:
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    return {flag: flag in flags for flag in ("amx_bf16", "avx512_bf16", "avx512f")}


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def run(precision: str, steps: int, work: Path) -> dict:
    out = work / precision
    command = [sys.executable, "-m", "colossus.train", "--out", str(out), "--steps", str(steps),
               "--set", f"train.precision={precision}", "--set", "eval.sample_tokens=0",
               "--set", f"eval.interval={steps}", "--set", f"checkpoint.interval={steps}",
               "--set", "log.tensorboard=false"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{precision} run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "loss" in r]
    return {"losses": {r["step"]: r["loss"] for r in steps_},
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_[1:] or steps_),
            "val_loss": next(r["val_loss"] for r in reversed(records) if "val_loss" in r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fp32, bf16 = (run(p, args.steps, Path(tmp)) for p in ("fp32", "bf16"))
    gap = max(abs(bf16["losses"][s] / fp32["losses"][s] - 1) for s in fp32["losses"])
    result = {"cpu": cpu_name(), "flags": cpu_flags(), "steps": args.steps,
              "fp32_tokens_per_s": fp32["tokens_per_s"], "bf16_tokens_per_s": bf16["tokens_per_s"],
              "bf16_speed_vs_fp32": bf16["tokens_per_s"] / fp32["tokens_per_s"], "max_loss_gap": gap,
              "final_loss_fp32": fp32["losses"][args.steps], "final_loss_bf16": bf16["losses"][args.steps],
              "val_loss_fp32": fp32["val_loss"], "val_loss_bf16": bf16["val_loss"]}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"command: python bench/precision.py --steps {args.steps}")
    print(f"CPU: {result['cpu']}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["flags"].items()))
    print(f"tiny, {args.steps} steps: fp32 {fp32['tokens_per_s']:,.0f} tokens/s, bf16 {bf16['tokens_per_s']:,.0f} "
          f"({result['bf16_speed_vs_fp32']:.2f}x)")
    print(f"loss: largest gap {gap:.2%} over the logged steps; final {result['final_loss_fp32']:.4f} (fp32) vs "
          f"{result['final_loss_bf16']:.4f} (bf16); validation {fp32['val_loss']:.4f} vs {bf16['val_loss']:.4f}")


if __name__ == "__main__":
    main()
