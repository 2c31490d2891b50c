"""Tokens/s of a small MoE under 1, 2 and 4 processes and each parallel layout, side by side, and each
pipeline schedule's measured bubble against the planner's formula.

usage: python bench/parallel_throughput.py [--steps N] [--only layouts|bubbles] [--json]

Every run is the real trainer under torchrun (gloo on CPU, NCCL on GPU) with the same model and global
batch; the figure is the median tokens/s over the logged steps after the first 3 (warm-up). On a
2-core machine 4 processes oversubscribe the cores: the table shows what the communication costs,
not a speed-up.

The bubble: a pipeline step with m micro-batches takes T(m) = m t + b (t per micro-batch, b the idle
fill and drain), so t = (T(3 m) - T(m)) / (2 m) and b = T(m) - m t, from two runs that differ only in
the global batch. The planner's figure is costmodel.pipeline_bubble for the same layout and t, with
the forward and the weight-gradient GEMMs a third of t each (the planner's split: the backward costs
two forwards). b also holds what a step costs once whatever its micro-batches (the optimizer step,
the gradient norm, the metrics): the same measure without a pipeline, on one process, shows that part.
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

from colossus.layout import Layout
from colossus.plan.costmodel import pipeline_bubble

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(name="bench-moe", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
             n_experts=8, top_k=2, vocab_size=256, seq_len=128, embedding_multiplier=11.3)
RUNS = [  # (label, processes, [parallel] keys)
    ("1 process", 1, {}),
    ("2 x dp_shard", 2, {}),
    ("4 x dp_shard", 4, {}),
    ("dp_replicate=2 x dp_shard=2", 4, {"dp_replicate": 2}),
    ("dp_shard=2 x tp=2", 4, {"tp": 2}),
    ("dp_shard=2 x ep=2", 4, {"ep": 2}),
    ("ep=4", 4, {"ep": 4}),
    ("pp=2 (1f1b)", 2, {"pp": 2}),
    ("pp=2 x dp_shard=2", 4, {"pp": 2}),
    ("cp=2", 2, {"cp": 2}),
    ("cp=2 x dp_shard=2", 4, {"cp": 2}),
]
SCHEDULES = [  # (label, [parallel] keys) of the bubble table: 4 and 8 micro-batches of 2
    ("no pipeline (1 process)", {}),
    ("1f1b pp=2", {"pp": 2}),
    ("interleaved-1f1b pp=2 vpp=2", {"pp": 2, "vpp": 2, "pp_schedule": "interleaved-1f1b"}),
    ("zbv pp=2", {"pp": 2, "vpp": 2, "pp_schedule": "zbv"}),
]


def run(label: str, procs: int, parallel: dict, steps: int, work: Path, global_batch: int = 8,
        key: str = "tokens_per_s") -> float:
    """The median of a metric (tokens/s, or step_time_s) over the steps after the first 3."""
    tables = {"model": MODEL, "train": {"steps": steps, "global_batch": global_batch, "micro_batch": 2, "threads": 1},
              "checkpoint": {"interval": 10_000}, "eval": {"interval": 10_000, "batches": 1, "sample_tokens": 0},
              "log": {"interval": 1, "tensorboard": False}, "parallel": parallel}
    out = work / f"{label}-{global_batch}".replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
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
    return statistics.median(r[key] for r in records if key in r and r["step"] > 3)


def bubble(label: str, parallel: dict, steps: int, work: Path) -> dict:
    """Measured and planned idle time of one pipeline step with 4 micro-batches (module docstring)."""
    m = 4
    procs = parallel.get("pp", 1)
    once, thrice = (run(label, procs, parallel, steps, work, global_batch=2 * n, key="step_time_s") for n in (m, 3 * m))
    per_micro = (thrice - once) / (2 * m)
    layout = Layout(pp=procs, vpp=parallel.get("vpp", 1), pp_schedule=parallel.get("pp_schedule", "1f1b"),
                    mbs=2, gbs=2 * m)
    planned = pipeline_bubble(layout, per_micro, per_micro / 3, per_micro / 3)
    return {"schedule": label, "step_s": once, "micro_batch_s": per_micro, "bubble_s": once - m * per_micro,
            "planned_bubble_s": planned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--only", choices=["layouts", "bubbles"], help="measure one of the two tables")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [(label, procs, run(label, procs, parallel, args.steps, Path(tmp)))
                   for label, procs, parallel in RUNS] if args.only != "bubbles" else []
        bubbles = [bubble(label, parallel, args.steps, Path(tmp))
                   for label, parallel in SCHEDULES] if args.only != "layouts" else []
    base = results[0][2] if results else 1.0
    if args.json:
        print(json.dumps({"layouts": [{"layout": l, "processes": p, "tokens_per_s": t, "ratio": t / base}
                                      for l, p, t in results], "bubbles": bubbles}, indent=1))
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model {MODEL['name']}: {MODEL['n_layers']} layers, d {MODEL['d_model']}, {MODEL['n_experts']} experts top-2, "
          f"seq {MODEL['seq_len']}, global batch 8, 1 thread per process")
    if results:
        print(f"{'layout':<30} {'procs':>5} {'tokens/s':>10} {'vs 1 process':>13}")
    for label, procs, speed in results:
        print(f"{label:<30} {procs:>5} {speed:>10,.0f} {speed / base:>12.2f}x")
    if not bubbles:
        return
    print("\nfixed time per step b = T(4) - 4 t, t = (T(12) - T(4)) / 8 (T(m): a step of m micro-batches of 2), "
          "and the planner's bubble")
    print(f"{'schedule':<30} {'step s':>8} {'per micro s':>12} {'b s':>9} {'share':>6} {'planner s':>10} {'share':>6}")
    for b in bubbles:
        print(f"{b['schedule']:<30} {b['step_s']:>8.3f} {b['micro_batch_s']:>12.3f} {b['bubble_s']:>9.3f} "
              f"{b['bubble_s'] / b['step_s']:>6.0%} {b['planned_bubble_s']:>10.3f} {b['planned_bubble_s'] / b['step_s']:>6.0%}")


if __name__ == "__main__":
    main()
