"""`colossus simulate` as a library: interruptions, checkpoint interval, goodput, wall-clock days and
power of a run on a cluster, by Monte Carlo over the failure model. The command line (colossus/cli.py)
parses the flags into SimulationOptions; the report's JSON keys are a contract."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from colossus import modelmath
from colossus.config import ModelConfig
from colossus.errors import UserError
from colossus.files import atomic_file
from colossus.plan.cluster import Cluster
from colossus.plan.costmodel import Prediction, busy_fraction, it_power_w
from colossus.plan.failures import FailureModel
from colossus.plan.search import search
from colossus.plan.simulate import (CheckpointCost, Outcome, Scenario, best_interval, daly_interval, simulate,
                                    young_interval)

# Storage for checkpoints: Llama 3's Tectonic cluster sustains 2 TB/s and peaks at 7 TB/s (Dubey et al.
# 2024, section 3.3.1); used for writes and reads unless --storage-gb-s says otherwise.
DEFAULT_STORAGE_GB_S = 2000.0
# Copying a GPU's shard of the state to host memory before an asynchronous write (PCIe Gen5 x16 is
# 64 GB/s per direction; ~25 GB/s is typical for pinned device-to-host copies of many tensors).
STAGING_GB_S = 25.0
# Every save, async or not, first plans it across ranks (DCP gathers each rank's save plan and
# metadata at the coordinator) and stages the state: seconds at thousands of ranks (an assumption;
# it keeps the optimum interval from collapsing towards zero when staging alone is milliseconds).
CHECKPOINT_COORDINATION_S = 5.0
# Rescheduling, rendezvous, process-group setup and warm-up after an interruption, before loading the
# checkpoint (an assumption: minutes on a large cluster with hot spares; override with --restart-s).
DEFAULT_RESTART_S = 300.0


@dataclass
class SimulationOptions:
    """How to simulate a run (the flags of `colossus simulate`, typed)."""

    days: float | None = None  # simulate this much wall-clock time ...
    tokens: float | None = None  # ... or until this many tokens are trained
    layout: dict = field(default_factory=dict)  # fixed layout keys, as for `colossus plan`
    checkpoint_interval_s: float | None = None  # None: the Monte Carlo optimum
    checkpoint_mode: str = "async"  # async: the loop waits only for staging; sync: for the whole write
    trials: int = 200
    seed: int = 0
    restart_s: float = DEFAULT_RESTART_S
    repair_hours: float = 0.0
    storage_gb_s: float = DEFAULT_STORAGE_GB_S
    failures: FailureModel = field(default_factory=FailureModel.llama3)
    grow: tuple[float, Cluster] | None = None  # (day, bigger cluster): re-planned there; with tokens only

    def check(self) -> None:
        if (self.days is None) == (self.tokens is None):
            raise UserError("give one of --days or --tokens")
        for name in ("days", "tokens"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name} must be positive, got {value:g}")
        if self.trials < 1:
            raise UserError(f"--trials must be at least 1, got {self.trials}")
        if self.restart_s < 0 or self.repair_hours < 0 or not self.storage_gb_s > 0:
            raise UserError("--restart-s and --repair-hours must be >= 0 and --storage-gb-s positive")
        if self.checkpoint_interval_s is not None and not self.checkpoint_interval_s > 0:
            raise UserError(f"--checkpoint-interval must be positive, got {self.checkpoint_interval_s:g}")
        if self.grow and self.tokens is None:
            raise UserError("--grow needs --tokens (a run that grows mid-way); with --days simulate each cluster alone")


@dataclass
class Phase:
    """One stretch of the run on one cluster with one layout."""

    cluster: Cluster
    prediction: Prediction
    scenario: Scenario
    failures: dict[str, float]  # unexpected interruptions per day by cause


def plan_phase(model: ModelConfig, cluster: Cluster, options: SimulationOptions) -> Phase:
    failures = options.failures
    result = search(model, cluster, dict(options.layout), top=1)
    if not result.ranked:
        raise UserError(f"{model.name} fits in no layout of {cluster.n_gpus:,} x {cluster.gpu.name}; see `colossus plan`")
    best = result.ranked[0]
    # A checkpoint holds the fp32 parameters and both AdamW moments.
    state_bytes = modelmath.params_total(model) * (modelmath.MASTER_BYTES + modelmath.OPTIMIZER_BYTES)
    write_s = state_bytes / (options.storage_gb_s * 1e9)
    staging_s = state_bytes / cluster.n_gpus / (STAGING_GB_S * 1e9)
    block_s = CHECKPOINT_COORDINATION_S + (staging_s if options.checkpoint_mode == "async" else write_s)
    checkpoint = CheckpointCost(block_s=block_s, write_s=write_s, load_s=write_s)
    scenario = Scenario(mtti_s=failures.mtti_s(cluster.n_gpus, cluster.gpus_per_node),
                        planned_per_s=failures.planned_per_day / 86400, checkpoint=checkpoint, restart_s=options.restart_s,
                        repair_s=options.repair_hours * 3600, hardware_share=failures.hardware_share(cluster.n_gpus, cluster.gpus_per_node),
                        spare_nodes=(cluster.n_gpus - best.layout.world_size) // cluster.gpus_per_node)
    return Phase(cluster, best, scenario, failures.unexpected_per_day(cluster.n_gpus, cluster.gpus_per_node))


def simulate_run(model: ModelConfig, cluster: Cluster, options: SimulationOptions) -> dict:
    """Interruptions, checkpoints, goodput, days and power of training `model` on `cluster` (Monte Carlo
    over the failure model); the dict is the --json object."""
    options.check()
    first = plan_phase(model, cluster, options)
    scenario = first.scenario
    work_s = options.tokens / first.prediction.tokens_per_s if options.tokens is not None else None
    horizon_s = options.days * 86400 if options.days is not None else None
    if options.grow:  # the interval is chosen for the first phase; the second gets its own Daly-scaled one
        horizon_s, work_s = options.grow[0] * 86400, None
    if options.checkpoint_interval_s is None:
        interval, curve = best_interval(scenario, max(20, options.trials // 4), options.seed, work_s, horizon_s)
    else:
        interval, curve = options.checkpoint_interval_s, []
    outcome = simulate(scenario, interval, options.trials, options.seed, work_s, horizon_s)
    phases = [(first, outcome, interval)]
    if options.grow:
        second = plan_phase(model, options.grow[1], options)
        done_tokens = outcome.work_s * first.prediction.tokens_per_s
        left = np.maximum(options.tokens - done_tokens, 0.0)
        # Each trial continues on the new cluster; its interval scales like Daly's with the new MTTI.
        second_interval = interval * math.sqrt(second.scenario.mtti_s / scenario.mtti_s)
        tail = simulate(second.scenario, second_interval, options.trials, options.seed + 1,
                        work_s=np.maximum(left / second.prediction.tokens_per_s, 1.0))
        # a re-plan costs one planned restart (new layout: load and reshard the checkpoint)
        switch = second.scenario.restart_s + second.scenario.checkpoint.load_s
        tail.wall_s = tail.wall_s + switch
        tail.restart_s = tail.restart_s + switch
        phases.append((second, tail, second_interval))
    return _report(options, model, phases, curve)


def _report(options: SimulationOptions, model: ModelConfig, phases: list[tuple[Phase, Outcome, float]],
            curve: list[tuple[float, float]]) -> dict:
    wall = sum(o.wall_s for _, o, _ in phases)
    work = sum(o.work_s for _, o, _ in phases)
    restarts = sum(o.restart_s for _, o, _ in phases)
    first, outcome, interval = phases[0]
    energy_j = 0.0
    for phase, o, _ in phases:
        cluster = phase.cluster
        train_w = it_power_w(cluster, busy_fraction(phase.prediction)) * cluster.pue
        idle_w = it_power_w(cluster, 0.0) * cluster.pue
        energy_j += float(np.mean((o.wall_s - o.restart_s) * train_w + o.restart_s * idle_w))
    peak = max(it_power_w(p.cluster, 1.0) * p.cluster.pue for p, _, _ in phases)
    swing = max((it_power_w(p.cluster, 1.0) - it_power_w(p.cluster, 0.0)) * p.cluster.pue for p, _, _ in phases)
    scenario = first.scenario
    block = max(scenario.checkpoint.block_s, 1e-9)
    report = {
        "cluster": first.cluster.name,
        "n_gpus": first.cluster.n_gpus,
        "model": model.name,
        "layout": first.prediction.to_json()["layout"],
        "tokens_per_s": first.prediction.tokens_per_s,
        "interruptions_unexpected": float(sum(o.unexpected for _, o, _ in phases).mean()),
        "interruptions_planned": float(sum(o.planned for _, o, _ in phases).mean()),
        "unexpected_per_day": sum(first.failures.values()),
        "mtti_s": scenario.mtti_s,
        "checkpoint_interval_s": interval,
        "checkpoint_mode": options.checkpoint_mode,
        "checkpoint_block_s": scenario.checkpoint.block_s,
        "checkpoint_write_s": scenario.checkpoint.write_s,
        "young_interval_s": young_interval(block, scenario.mtti_s),
        "daly_interval_s": daly_interval(block, scenario.mtti_s),
        "restart_s": scenario.restart_s + scenario.checkpoint.load_s,
        "gpus_used": first.prediction.layout.world_size,
        "spare_nodes": scenario.spare_nodes,
        "repair_hours": options.repair_hours,
        "repair_wait_chance": scenario.repair_wait()[0],  # a hardware failure finds no spare free
        "repair_wait_s": scenario.repair_wait()[1],
        "goodput": float(np.mean(work / wall)),
        "goodput_p10": float(np.percentile(work / wall, 10)),
        "lost_training_hours": float(sum(o.lost_s for _, o, _ in phases).mean() / 3600),
        "restart_hours": float(restarts.mean() / 3600),
        "days_p50": float(np.percentile(wall, 50) / 86400),
        "days_p90": float(np.percentile(wall, 90) / 86400),
        "energy_mwh": energy_j / 3.6e9,
        "peak_power_mw": peak / 1e6,
        "power_swing_mw": swing / 1e6,
        "trials": options.trials,
        "seed": options.seed,
        "goodput_curve": [{"interval_s": i, "goodput": g} for i, g in curve],
    }
    if options.tokens is not None:
        report["tokens"] = options.tokens
    if len(phases) > 1:
        report["phases"] = [{"cluster": p.cluster.name, "n_gpus": p.cluster.n_gpus, "layout": p.prediction.to_json()["layout"],
                             "tokens_per_s": p.prediction.tokens_per_s, "mtti_s": p.scenario.mtti_s,
                             "checkpoint_interval_s": i, "days_mean": float(o.wall_s.mean() / 86400)}
                            for p, o, i in phases]
    return report


def print_simulation(report: dict) -> None:
    r = report
    print(f"{r['model']} on {r['cluster']} ({r['n_gpus']:,} GPUs), {r['tokens_per_s']:,.0f} tokens/s when training; "
          f"{r['trials']} trials, seed {r['seed']}")
    print(f"interruptions: {r['unexpected_per_day']:.1f} unexpected per day (MTTI {r['mtti_s'] / 60:.0f} min); "
          f"{r['interruptions_unexpected']:,.0f} unexpected and {r['interruptions_planned']:,.0f} planned over the run")
    print(f"checkpoint ({r['checkpoint_mode']}): blocks {r['checkpoint_block_s']:.1f} s, written in {r['checkpoint_write_s']:.0f} s; "
          f"every {r['checkpoint_interval_s'] / 60:.1f} min (Young {r['young_interval_s'] / 60:.1f}, Daly {r['daly_interval_s'] / 60:.1f}); "
          f"restart {r['restart_s'] / 60:.1f} min")
    if r["repair_hours"] > 0:
        print(f"spares: {r['spare_nodes']:,} nodes beside the {r['gpus_used']:,} GPUs training; a hardware failure finds "
              f"none free {r['repair_wait_chance']:.1%} of the time and then waits {r['repair_wait_s'] / 3600:.1f} h "
              f"(repair {r['repair_hours']:g} h)")
    print(f"goodput {r['goodput']:.1%} (p10 {r['goodput_p10']:.1%}); lost {r['lost_training_hours']:,.0f} h of training, "
          f"{r['restart_hours']:,.0f} h restarting")
    print(f"wall clock: {r['days_p50']:.1f} days p50, {r['days_p90']:.1f} p90; energy {r['energy_mwh']:,.0f} MWh; "
          f"peak {r['peak_power_mw']:.1f} MW, swing {r['power_swing_mw']:.1f} MW when every GPU waits at once")
    for phase in r.get("phases", []):
        print(f"  phase on {phase['cluster']} ({phase['n_gpus']:,} GPUs): {phase['tokens_per_s']:,.0f} tokens/s, "
              f"MTTI {phase['mtti_s'] / 60:.0f} min, interval {phase['checkpoint_interval_s'] / 60:.1f} min, "
              f"{phase['days_mean']:.1f} days")


def plot_goodput(report: dict, path: Path) -> None:
    """Goodput against checkpoint interval (the Monte Carlo curve) with Young's and Daly's optima."""
    if not report["goodput_curve"]:
        raise UserError("--plot needs --checkpoint-interval auto (the curve comes from the interval search)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["interval_s"] / 60 for p in report["goodput_curve"]]
    ys = [p["goodput"] * 100 for p in report["goodput_curve"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, ys, "o-", label="Monte Carlo (mean of trials)")
    for key, style, name in (("young_interval_s", ":", "Young"), ("daly_interval_s", "--", "Daly"),
                             ("checkpoint_interval_s", "-", "chosen")):
        ax.axvline(report[key] / 60, linestyle=style, color="gray" if key != "checkpoint_interval_s" else "C3",
                   label=f"{name}: {report[key] / 60:.1f} min")
    ax.set_xscale("log")
    ax.set_xlabel("checkpoint interval (minutes of training)")
    ax.set_ylabel("goodput (%)")
    ax.set_title(f"{report['model']} on {report['cluster']}: MTTI {report['mtti_s'] / 60:.0f} min, "
                 f"{report['checkpoint_mode']} checkpoints")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)
