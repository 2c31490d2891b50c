"""`colossus simulate` as a library: interruptions, checkpoint interval, goodput, wall-clock days and
power of a run on a cluster, by Monte Carlo over the failure model. The command line (colossus/cli.py)
parses the flags into SimulationOptions; the report's JSON keys are a contract."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from colossus import modelmath
from colossus.config import FaultsConfig, ModelConfig
from colossus.errors import UserError
from colossus.files import atomic_file
from colossus.plan.cluster import Cluster
from colossus.plan.costmodel import Prediction, busy_fraction, it_power_w
from colossus.plan.failures import JOB_WIDE_CAUSES, LLAMA3_CAUSES, SOFTWARE_CAUSES, FailureModel
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
# How long the other replica groups wait on a dead one before a collective gives up (the trainer's
# [faults] replica_timeout_s default): NCCL notices a dead peer only then; gloo at once.
DEFAULT_REPLICA_TIMEOUT_S = FaultsConfig.replica_timeout_s

# Replica recovery ([faults] replica_groups, torchft), measured by bench/recovery.py on a CPU (an Intel
# Xeon, 2 vCPU, 3 processes of one thread; medians of 2 runs): seconds from SIGKILL until the restarted
# group's process had started again (torchrun noticed and started it: 0.46 s), imported Python, torch and
# Colossus (5.06), joined its group's process group (0.00: a group of one), built its model (4.74) and set
# up torchft's Manager and its first quorum (1.00); then it received a live peer's state, 1.02 GB of
# weights and AdamW moments in 2.80 s (torchft's HTTP transport through host memory). Figures of the ~100M
# dense model, the larger of the two measured; a GPU node adds its CUDA context and NCCL set-up, so these
# are lower bounds there. tests/test_simulate.py holds them to the committed result file.
MEASURED_RECOVERY_FILE = "bench/results/recovery-2026-12-02.json"
GROUP_RESTART_S = 0.46 + 5.06 + 0.00 + 4.74 + 1.00
TRANSFER_BYTES_PER_S = 1_021_805_568 / 2.80


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
    recovery: str = "restart"  # restart: every failure restarts the job; replica: one replica group recovers
    replica_groups: int = 0  # replica recovery: groups (the layout's dp_replicate); 0 = as many as the batch allows
    job_wide: frozenset[str] = JOB_WIDE_CAUSES  # replica recovery: causes that still restart the whole job
    replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S  # replica recovery: the survivors' wait on a dead group
    # replica recovery: each group's spare nodes wait in its torchrun rendezvous (colossus launch --spare-nodes)
    # and one takes a dead node's place once torchrun notices; without, a node is swapped in restart_s
    hot_spares: bool = True

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
        if self.recovery not in ("restart", "replica"):
            raise UserError(f"--recovery {self.recovery!r}: choose restart or replica")
        if self.replica_groups < 0 or self.replica_groups == 1:
            raise UserError(f"--replica-groups {self.replica_groups}: use 2 or more (0 = as many as the layout allows)")
        if self.replica_groups and self.recovery != "replica":
            raise UserError("--replica-groups needs --recovery replica")
        unknown = sorted(set(self.job_wide) - set(LLAMA3_CAUSES))
        if unknown:
            raise UserError(f"--job-wide: unknown cause {', '.join(unknown)}; choose from {', '.join(LLAMA3_CAUSES)}")


@dataclass
class GroupRecovery:
    """Replica recovery: what one replica group's failure costs the job, which keeps training without it.
    The failures that take down more than one group (failures.JOB_WIDE_CAUSES) still restart the job."""

    groups: int
    failures_per_day: float  # failures that take out one group
    hardware_share: float  # of those, the ones that take its node out: the group comes back on a spare node
    restart_s: float  # the group's processes started again and in a quorum (measured)
    swap_s: float  # a spare node in place of a failed one: torchrun's rendezvous noticing the dead node (hot
    # spares), or rescheduling and rendezvous (the job restart's figure)
    transfer_s: float  # its state from a live peer: the other groups wait for it in the step it rejoins
    stall_s: float  # every group waits this long when a peer dies (the dead peer noticed: at once on gloo, by
    # the collective timeout on NCCL, at least the Lighthouse's heartbeat timeout), and that step runs again

    @property
    def out_s(self) -> float:
        """Mean time the group is missing from the steps: its restart, on a spare node after a hardware
        failure, then its transfer."""
        return self.restart_s + self.hardware_share * self.swap_s + self.transfer_s

    @property
    def cost_s(self) -> float:
        """Training seconds the job loses per group failure: everyone's stall and the wait for the
        transfer, and 1/groups of the throughput while the group restarts."""
        return self.stall_s + self.transfer_s + (self.restart_s + self.hardware_share * self.swap_s) / self.groups

    def speed(self) -> float:
        """The job's mean speed as a share of its speed with every group (Poisson failures, each
        costing cost_s of training)."""
        return max(1e-6, 1.0 - self.failures_per_day / 86400 * self.cost_s)

    def short_fraction(self) -> float:
        """Share of the steps that run with a group missing (a smaller batch)."""
        return min(1.0, self.failures_per_day / 86400 * self.out_s)


def group_recovery(model: ModelConfig, prediction: Prediction, cluster: Cluster, failures: dict[str, float],
                   job_wide: frozenset[str] = JOB_WIDE_CAUSES, swap_s: float = DEFAULT_RESTART_S,
                   timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S) -> GroupRecovery:
    """A group's recovery, from the measured breakdown: its restart as measured (after a hardware failure,
    on a spare node, which costs swap_s more), then its GPUs each receive their shard of the state
    (weights and AdamW moments, spread over the group's GPUs) at the measured transport rate or the
    NIC's, whichever is slower. The others notice the dead group after `timeout_s` (NCCL's collective
    timeout, [faults] replica_timeout_s) or the Lighthouse's heartbeat timeout, whichever is longer."""
    from colossus.launch import HEARTBEAT_TIMEOUT_MS

    layout = prediction.layout
    state_bytes = modelmath.params_total(model) * (modelmath.MASTER_BYTES + modelmath.OPTIMIZER_BYTES)
    per_gpu = state_bytes / (layout.world_size // layout.dp_replicate)
    rate = min(TRANSFER_BYTES_PER_S, cluster.nic_gbps / 8 * 1e9)
    local = {cause: v for cause, v in failures.items() if cause not in job_wide}
    total = sum(local.values())
    hardware = sum(v for cause, v in local.items() if cause not in SOFTWARE_CAUSES) / total if total else 0.0
    return GroupRecovery(layout.dp_replicate, total, hardware, GROUP_RESTART_S, swap_s, per_gpu / rate,
                         max(HEARTBEAT_TIMEOUT_MS / 1000, timeout_s) + prediction.step_time_s)


@dataclass
class Phase:
    """One stretch of the run on one cluster with one layout."""

    cluster: Cluster
    prediction: Prediction
    scenario: Scenario
    failures: dict[str, float]  # unexpected interruptions per day by cause
    groups: GroupRecovery | None = None  # replica recovery


def plan_phase(model: ModelConfig, cluster: Cluster, options: SimulationOptions) -> Phase:
    failures = options.failures
    best = replica_layout(model, cluster, options) if options.recovery == "replica" else None
    if best is None:
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
    by_cause = failures.unexpected_per_day(cluster.n_gpus, cluster.gpus_per_node)
    # Under replica recovery only the failures that take down more than one group restart the job.
    restarting = {k: v for k, v in by_cause.items() if k in options.job_wide} if options.recovery == "replica" else by_cause
    hardware = sum(v for k, v in restarting.items() if k not in SOFTWARE_CAUSES)
    scenario = Scenario(mtti_s=86400 / sum(restarting.values()) if sum(restarting.values()) else float("inf"),
                        planned_per_s=failures.planned_per_day / 86400, checkpoint=checkpoint, restart_s=options.restart_s,
                        repair_s=options.repair_hours * 3600,
                        hardware_share=hardware / sum(restarting.values()) if sum(restarting.values()) else 0.0,
                        spare_nodes=(cluster.n_gpus - best.layout.world_size) // cluster.gpus_per_node)
    if options.recovery == "replica":
        from colossus.launch import RENDEZVOUS_KEEP_ALIVE_S

        swap_s = RENDEZVOUS_KEEP_ALIVE_S if options.hot_spares else options.restart_s
        groups = group_recovery(model, best, cluster, by_cause, options.job_wide, swap_s, options.replica_timeout_s)
    else:
        groups = None
    return Phase(cluster, best, scenario, by_cause, groups)


def replica_layout(model: ModelConfig, cluster: Cluster, options: SimulationOptions) -> Prediction:
    """The fastest layout with --replica-groups replicas (dp_replicate), or with 0 as many as the best
    layout's data-parallel degree allows outside expert parallelism (ep ranks read different data but
    hold different experts: they cannot be replicas of each other)."""
    fixed = dict(options.layout)
    if options.replica_groups:
        fixed["dp_replicate"] = options.replica_groups
    elif "dp_replicate" not in fixed:
        result = search(model, cluster, dict(fixed), top=1)
        if not result.ranked:
            raise UserError(f"{model.name} fits in no layout of {cluster.n_gpus:,} x {cluster.gpu.name}; see `colossus plan`")
        layout = result.ranked[0].layout
        fixed["dp_replicate"] = max(2, layout.dp // layout.ep)
    result = search(model, cluster, fixed, top=1)
    if not result.ranked:
        raise UserError(f"{model.name} fits in no layout of {cluster.n_gpus:,} x {cluster.gpu.name} with "
                        f"dp_replicate = {fixed['dp_replicate']} replica groups; pick another --replica-groups")
    if result.ranked[0].layout.dp_replicate < 2:
        raise UserError("replica recovery needs dp_replicate >= 2: give --replica-groups or --layout dp_replicate=R")
    return result.ranked[0]


def simulate_run(model: ModelConfig, cluster: Cluster, options: SimulationOptions) -> dict:
    """Interruptions, checkpoints, goodput, days and power of training `model` on `cluster` (Monte Carlo
    over the failure model); the dict is the --json object."""
    options.check()
    first = plan_phase(model, cluster, options)
    scenario = first.scenario
    # Under replica recovery a group's failure slows the job rather than stopping it: the training time
    # needed grows by 1 / speed (and goodput counts only the useful part of it).
    work_s = options.tokens / (first.prediction.tokens_per_s * speed(first)) if options.tokens is not None else None
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
        done_tokens = outcome.work_s * first.prediction.tokens_per_s * speed(first)
        left = np.maximum(options.tokens - done_tokens, 0.0)
        # Each trial continues on the new cluster; its interval scales like Daly's with the new MTTI.
        second_interval = interval * math.sqrt(second.scenario.mtti_s / scenario.mtti_s)
        tail = simulate(second.scenario, second_interval, options.trials, options.seed + 1,
                        work_s=np.maximum(left / (second.prediction.tokens_per_s * speed(second)), 1.0))
        # a re-plan costs one planned restart (new layout: load and reshard the checkpoint)
        switch = second.scenario.restart_s + second.scenario.checkpoint.load_s
        tail.wall_s = tail.wall_s + switch
        tail.restart_s = tail.restart_s + switch
        phases.append((second, tail, second_interval))
    report = _report(options, model, phases, curve)
    if options.recovery == "replica":  # today's figure beside it: the same run where every failure restarts all
        from dataclasses import replace

        restart = simulate_run(model, cluster, replace(options, recovery="restart", replica_groups=0))
        report["goodput_restart"] = restart["goodput"]
        report["days_p50_restart"] = restart["days_p50"]
    return report


def speed(phase: Phase) -> float:
    return phase.groups.speed() if phase.groups is not None else 1.0


def _report(options: SimulationOptions, model: ModelConfig, phases: list[tuple[Phase, Outcome, float]],
            curve: list[tuple[float, float]]) -> dict:
    wall = sum(o.wall_s for _, o, _ in phases)
    work = sum(o.work_s * speed(p) for p, o, _ in phases)  # training at full speed: what the run got done
    group_lost = sum(o.work_s * (1 - speed(p)) for p, o, _ in phases)
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
        "lost_training_hours": float((sum(o.lost_s for _, o, _ in phases) + group_lost).mean() / 3600),
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
    report["recovery"] = options.recovery
    if first.groups is not None:
        g = first.groups
        group_failures = float(np.mean(wall)) / 86400 * g.failures_per_day
        report.update({
            "replica_groups": g.groups, "group_failures_per_day": g.failures_per_day,
            "job_restarts_per_day": sum(first.failures.values()) - g.failures_per_day,
            "group_recovery_s": g.out_s, "group_transfer_s": g.transfer_s, "group_stall_s": g.stall_s,
            "group_hardware_share": g.hardware_share, "hot_spares": options.hot_spares, "group_swap_s": g.swap_s,
            "spares_per_group": group_failures * g.hardware_share / g.groups,  # one per node a failure takes out
            "group_failure_cost_s": g.cost_s, "short_step_fraction": g.short_fraction(),
            "group_failures": group_failures,
        })
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
    mtti, restarts = ("MTTI", "unexpected") if r["recovery"] == "restart" else ("a job restart every", "job-wide")
    print(f"interruptions: {r['unexpected_per_day']:.1f} unexpected per day ({mtti} {r['mtti_s'] / 60:.0f} min); "
          f"{r['interruptions_unexpected']:,.0f} {restarts} and {r['interruptions_planned']:,.0f} planned restarts over the run")
    print(f"checkpoint ({r['checkpoint_mode']}): blocks {r['checkpoint_block_s']:.1f} s, written in {r['checkpoint_write_s']:.0f} s; "
          f"every {r['checkpoint_interval_s'] / 60:.1f} min (Young {r['young_interval_s'] / 60:.1f}, Daly {r['daly_interval_s'] / 60:.1f}); "
          f"restart {r['restart_s'] / 60:.1f} min")
    if r["repair_hours"] > 0:
        print(f"spares: {r['spare_nodes']:,} nodes beside the {r['gpus_used']:,} GPUs training; a hardware failure finds "
              f"none free {r['repair_wait_chance']:.1%} of the time and then waits {r['repair_wait_s'] / 3600:.1f} h "
              f"(repair {r['repair_hours']:g} h)")
    if r["recovery"] == "replica":
        print(f"replica recovery: {r['replica_groups']} groups; {r['group_failures_per_day']:.1f} failures a day take out "
              f"one group ({r['group_hardware_share']:.0%} its node: back on a "
              + (f"hot spare {r['group_swap_s']:.0f} s later, {r['spares_per_group']:.1f} spares used per group"
                 if r["hot_spares"] else f"spare node {r['group_swap_s']:.0f} s later") + "), which is back in "
              f"{r['group_recovery_s']:.1f} s on average (state from a peer in {r['group_transfer_s']:.2f} s) while the "
              f"others train on after a {r['group_stall_s']:.0f} s stall; each costs the job "
              f"{r['group_failure_cost_s']:.1f} s of training; {r['short_step_fraction']:.2%} of steps run with a group "
              f"missing; {r['job_restarts_per_day']:.1f} failures a day still restart the job")
    print(f"goodput {r['goodput']:.1%} (p10 {r['goodput_p10']:.1%}); lost {r['lost_training_hours']:,.0f} h of training, "
          f"{r['restart_hours']:,.0f} h restarting"
          + (f"; with every failure restarting the job: {r['goodput_restart']:.1%}" if "goodput_restart" in r else ""))
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
