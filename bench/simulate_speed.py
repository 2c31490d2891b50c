"""Speed of the Monte Carlo failure simulator: 1,000 trials of a 90-day run on colossus-200k.

usage: python bench/simulate_speed.py [--trials N] [--days D] [--json]

The same scenario (the planner's grok-1 layout on 200,000 GPUs, the Llama 3 failure model, async
checkpoints every Daly interval) runs through the vectorised simulator for N trials, and through a
plain per-interruption Python loop for a few trials; the figure is seconds for N trials and the
speed-up per trial. Both give the same mean goodput within Monte Carlo noise (printed side by side).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import numpy as np

from colossus.plan.simulate import Scenario, daly_interval, simulate
from colossus.plan.cluster import get_cluster
from colossus.plan.planner import load_model
from colossus.plan.simulation import SimulationOptions, plan_phase


def python_loop(scenario: Scenario, interval: float, horizon: float, seed: int) -> float:
    """One trial, event by event: the reference the vectorised version must agree with. Returns goodput."""
    rng = random.Random(seed)
    ckpt = scenario.checkpoint
    block = max(ckpt.block_s, ckpt.write_s - interval)
    rate = 1 / scenario.mtti_s + scenario.planned_per_s
    clock, kept, first = 0.0, 0.0, True
    while clock < horizon:
        gap = rng.expovariate(rate)
        planned = rng.random() < scenario.planned_per_s / rate
        restart = 0.0 if first else scenario.restart_s + ckpt.load_s
        first = False
        end = min(gap, horizon - clock)
        progress = max(end - restart, 0.0)
        chunks = math.floor(progress / (interval + block))
        trained = chunks * interval + min(progress - chunks * (interval + block), interval)
        if end < gap:  # the horizon, not an interruption, ends this segment
            kept += trained
            break
        if planned:
            kept += trained
            clock += ckpt.write_s
        else:
            kept += min(math.floor(max(progress - ckpt.write_s + block, 0) / (interval + block)) * interval, trained)
        clock += gap
    return kept / horizon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--days", type=float, default=90)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    phase = plan_phase(load_model("grok-1"), get_cluster("colossus-200k"), SimulationOptions(days=args.days))
    scenario = phase.scenario
    interval = daly_interval(scenario.checkpoint.block_s, scenario.mtti_s)
    horizon = args.days * 86400

    started = time.perf_counter()
    outcome = simulate(scenario, interval, args.trials, seed=0, horizon_s=horizon)
    vectorised_s = time.perf_counter() - started

    loop_trials = 5
    started = time.perf_counter()
    loop_goodput = [python_loop(scenario, interval, horizon, seed) for seed in range(loop_trials)]
    loop_s = (time.perf_counter() - started) / loop_trials * args.trials

    result = {
        "trials": args.trials, "days": args.days, "gpus": 200_000,
        "interruptions_per_trial": float(outcome.unexpected.mean() + outcome.planned.mean()),
        "vectorised_s": vectorised_s, "python_loop_s_estimated": loop_s, "speedup": loop_s / vectorised_s,
        "goodput_vectorised": float(outcome.goodput.mean()), "goodput_python_loop": float(np.mean(loop_goodput)),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.trials} trials of a {args.days:g}-day run on 200,000 GPUs "
              f"({result['interruptions_per_trial']:,.0f} interruptions each): {vectorised_s:.2f} s vectorised, "
              f"~{loop_s:.0f} s as a Python loop ({result['speedup']:.0f}x); goodput {result['goodput_vectorised']:.3f} "
              f"vs {result['goodput_python_loop']:.3f} (loop, {loop_trials} trials)")
        print("reproduce: python bench/simulate_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
