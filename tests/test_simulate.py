"""The failure and checkpoint simulator: calibration on Llama 3's log, agreement with Daly's optimum,
and the `colossus simulate` command line (its flags and JSON keys are a contract)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from colossus import modelmath
from colossus.errors import UserError
from colossus.plan.failures import LLAMA3_CAUSES, FailureModel, load_failure_model
from colossus.plan.cluster import get_cluster
from colossus.plan.planner import load_model
from colossus.plan.simulate import CheckpointCost, Scenario, best_interval, daly_interval, simulate, young_interval
from colossus.plan.simulation import SimulationOptions, plot_goodput, simulate_run
from conftest import run_colossus


def run_simulate(*args: str) -> subprocess.CompletedProcess:
    return run_colossus("simulate", *args)


def test_failure_model_reproduces_the_llama3_log_by_cause() -> None:
    """At Llama 3's size and length the expected count of every cause equals the published one, and
    the rates scale with the components: twice the GPUs, twice the failures."""
    model = FailureModel.llama3()
    per_day = model.unexpected_per_day(16_384)
    for cause, (count, _) in LLAMA3_CAUSES.items():
        assert per_day[cause] * 54 == pytest.approx(count)
    assert sum(per_day.values()) * 54 == pytest.approx(419)
    assert sum(model.unexpected_per_day(32_768).values()) == pytest.approx(2 * sum(per_day.values()))
    assert model.mtti_s(16_384) == pytest.approx(54 * 86400 / 419)
    assert model.planned_per_day * 54 == pytest.approx(47)
    assert 0.75 < model.hardware_share(16_384) < 0.85  # Llama 3: ~78% of unexpected ones were hardware


def test_failure_overrides_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "failures.toml"
    path.write_text("[failures]\nfaulty_gpu_per_day = 0.0\nplanned_per_day = 2.0\n")
    model = load_failure_model(path)
    assert model.per_gpu_day["faulty_gpu"] == 0 and model.planned_per_day == 2.0
    assert sum(model.unexpected_per_day(16_384).values()) * 54 == pytest.approx(419 - 148)
    path.write_text("[failures]\nmeteor_per_day = 1.0\n")
    with pytest.raises(UserError, match="unknown key failures.meteor_per_day"):
        load_failure_model(path)


def test_without_failures_goodput_is_the_checkpoint_overhead() -> None:
    """No interruptions: goodput = interval / (interval + block), and nothing is lost."""
    scenario = Scenario(mtti_s=1e15, planned_per_s=0.0, checkpoint=CheckpointCost(10, 10, 0), restart_s=300)
    outcome = simulate(scenario, 990.0, trials=20, seed=0, work_s=86400 * 5)
    assert outcome.goodput.mean() == pytest.approx(990 / 1000, rel=1e-3)
    assert outcome.unexpected.sum() == 0 and outcome.lost_s.sum() == 0


def test_interruption_counts_follow_the_rate() -> None:
    """Over a fixed horizon the count of interruptions is Poisson: mean horizon / MTTI."""
    scenario = Scenario(mtti_s=3600.0, planned_per_s=1 / 86400, checkpoint=CheckpointCost(5, 30, 30), restart_s=300)
    outcome = simulate(scenario, 600.0, trials=400, seed=1, horizon_s=30 * 86400)
    assert outcome.unexpected.mean() == pytest.approx(30 * 24, rel=0.03)
    assert outcome.planned.mean() == pytest.approx(30, rel=0.1)
    assert 0.7 < outcome.goodput.mean() < 0.9 and (outcome.lost_s > 0).all()


@pytest.mark.parametrize("gpus", [4_096, 16_384, 65_536, 200_000])
def test_monte_carlo_optimum_agrees_with_daly(gpus: int) -> None:
    """Synchronous checkpoints (Daly's assumptions): the Monte Carlo goodput peaks within 15% of Daly's
    interval over cluster sizes whose MTTI runs from hours to minutes."""
    mtti = FailureModel.llama3().mtti_s(gpus)
    scenario = Scenario(mtti_s=mtti, planned_per_s=0.0, checkpoint=CheckpointCost(60, 60, 0), restart_s=300)
    best, curve = best_interval(scenario, trials=120, seed=2, work_s=10 * 86400)
    assert best == pytest.approx(daly_interval(60, mtti), rel=0.15), (best, daly_interval(60, mtti))
    assert max(g for _, g in curve) > curve[0][1] and max(g for _, g in curve) > curve[-1][1]  # a real peak
    assert young_interval(60, mtti) > daly_interval(60, mtti) * 0.9


def test_spare_nodes_spare_the_wait_for_repairs() -> None:
    """A hardware failure waits for a repair only when every spare node is taken: with none it waits the
    whole repair (as before spares), with a few the chance is Poisson's tail, with many it never waits;
    the goodput of a month on 16,384 GPUs with a 3-day repair shows it."""
    base = dict(mtti_s=1800.0, planned_per_s=0.0, checkpoint=CheckpointCost(5, 60, 60), restart_s=300,
                repair_s=3 * 86400, hardware_share=0.5)
    none, few, many = (Scenario(**base, spare_nodes=s) for s in (0, 72, 400))
    assert none.repair_wait() == (pytest.approx(1.0), 3 * 86400)
    in_repair = 0.5 / 1800 * 3 * 86400  # Poisson mean: 72 nodes in repair
    assert few.repair_wait()[0] == pytest.approx(0.5, abs=0.05) and few.repair_wait()[1] == pytest.approx(3 * 86400 / 73)
    assert many.repair_wait()[0] < 1e-12 and in_repair == pytest.approx(72)
    goodput = {s.spare_nodes: simulate(s, 600.0, trials=40, seed=3, horizon_s=30 * 86400).goodput.mean()
               for s in (none, few, many)}
    assert goodput[0] < 0.05 < goodput[72] < goodput[400]
    assert goodput[400] == pytest.approx(simulate(Scenario(**{**base, "repair_s": 0.0}), 600.0, trials=40, seed=3,
                                                  horizon_s=30 * 86400).goodput.mean(), rel=1e-6)


def test_simulate_spares_come_from_the_plan() -> None:
    """colossus-100k trains on 98,304 GPUs and keeps 212 nodes spare: with a 3-day repair its goodput stays
    where hot spares put it; planned on exactly 98,304 GPUs (no spares) the same repairs stop it."""
    grok, cluster = load_model("grok-1"), get_cluster("colossus-100k")
    spared = simulate_run(grok, cluster, SimulationOptions(days=7, trials=20, repair_hours=72))
    hot = simulate_run(grok, cluster, SimulationOptions(days=7, trials=20))
    bare = simulate_run(grok, cluster.with_gpus(98_304), SimulationOptions(days=7, trials=20, repair_hours=72))
    assert spared["spare_nodes"] == 212 and spared["gpus_used"] == 98_304 and bare["spare_nodes"] == 0
    assert spared["repair_wait_chance"] < 1e-6 and bare["repair_wait_chance"] == 1.0
    assert spared["goodput"] == pytest.approx(hot["goodput"], rel=0.02)
    assert bare["goodput"] < spared["goodput"] / 2


def test_llama3_scale_acceptance() -> None:
    """16,384 H100 for 54 days: 419 unexpected interruptions within 10%, goodput above 90% at the
    interval the tool chooses."""
    report = simulate_run(load_model("grok-1"), get_cluster("dgx-h100-16384"), SimulationOptions(days=54, trials=100))
    assert report["interruptions_unexpected"] == pytest.approx(419, rel=0.10)
    assert report["interruptions_planned"] == pytest.approx(47, rel=0.25)
    assert report["goodput"] > 0.90
    assert report["days_p50"] == pytest.approx(54)
    # power: 16,384 GPUs x 700 W plus nodes, times PUE; the swing is the GPUs' busy-to-waiting drop
    assert 16_384 * 700 * 1.2 / 1e6 < report["peak_power_mw"] < 16_384 * 1300 * 1.2 / 1e6
    assert 0 < report["power_swing_mw"] < report["peak_power_mw"]
    assert report["energy_mwh"] == pytest.approx(report["peak_power_mw"] * 54 * 24, rel=0.25)


def test_simulate_command_line_and_its_json_keys() -> None:
    result = run_simulate("--cluster", "dgx-h100-16384", "--days", "54", "--trials", "20", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("interruptions_unexpected", "interruptions_planned", "mtti_s", "checkpoint_interval_s", "goodput",
                "days_p50", "days_p90", "energy_mwh", "peak_power_mw", "power_swing_mw"):
        assert key in report, key
    replica = json.loads(run_simulate("--cluster", "colossus-100k", "--tokens", "6e12", "--trials", "20",
                                      "--recovery", "replica", "--replica-groups", "4", "--json").stdout)
    assert replica["recovery"] == "replica" and replica["replica_groups"] == 4
    for key in ("goodput_restart", "group_failures_per_day", "group_recovery_s", "group_failure_cost_s",
                "short_step_fraction", "job_restarts_per_day"):
        assert key in replica, key


def test_growth_and_plot(tmp_path: Path) -> None:
    """A run that grows to colossus-200k on day 2 is re-planned there (twice the failure rate) and its
    days add up; the plot of goodput against interval is written."""
    options = SimulationOptions(tokens=2e13, trials=40, grow=(2.0, get_cluster("colossus-200k")))
    grown = simulate_run(load_model("grok-1"), get_cluster("colossus-100k"), options)
    assert [p["n_gpus"] for p in grown["phases"]] == [100_000, 200_000]
    assert grown["phases"][1]["mtti_s"] == pytest.approx(grown["phases"][0]["mtti_s"] / 2)
    first, second = grown["phases"]
    assert first["days_mean"] == pytest.approx(2) and second["days_mean"] > 0.5
    assert grown["days_p50"] == pytest.approx(first["days_mean"] + second["days_mean"], rel=0.05)
    used = second["layout"]["tp"] * second["layout"]["pp"] * second["layout"]["dp"] * second["layout"]["cp"]
    assert 0.98 * 200_000 <= used <= 200_000  # a few may wait as hot spares
    plot = tmp_path / "goodput.png"
    plot_goodput(grown, plot)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--cluster", "colossus-100k", "--days", "30", "--grow", "5:colossus-200k"], "--grow needs --tokens"),
    (["--cluster", "colossus-100k", "--days", "-1"], "--days must be positive"),
    (["--cluster", "colossus-100k", "--days", "3", "--checkpoint-interval", "often"], "--checkpoint-interval 'often'"),
    (["--cluster", "colossus-100k", "--tokens", "1e12", "--grow", "x:y"], "expected DAY:CLUSTER"),
    (["--cluster", "colossus-100k", "--tokens", "1e12", "--replica-groups", "4"], "--replica-groups needs --recovery replica"),
    (["--cluster", "colossus-100k", "--tokens", "1e12", "--recovery", "replica", "--job-wide", "meteor"],
     "--job-wide: unknown cause meteor"),
])
def test_simulate_user_errors(args: list[str], words: str) -> None:
    result = run_simulate(*args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_replica_recovery_keeps_most_of_the_goodput_at_100k_gpus() -> None:
    """colossus-100k, grok-1, 6e12 tokens: replica groups recover a failed group from a live peer; only the
    job-wide causes restart everything, and goodput beats the figure where every failure restarts the job:
    at least the issue's 95% with hot spares (a node swapped in when torchrun's rendezvous drops the dead one)
    and the 10 s collective timeout."""
    from colossus.launch import RENDEZVOUS_KEEP_ALIVE_S

    options = SimulationOptions(tokens=6e12, trials=50, recovery="replica")
    report = simulate_run(load_model("grok-1"), get_cluster("colossus-100k"), options)
    assert report["goodput"] > report["goodput_restart"] + 0.1 and report["goodput"] >= 0.95
    assert report["hot_spares"] and report["group_swap_s"] == RENDEZVOUS_KEEP_ALIVE_S
    # every node a hardware failure takes out uses up one spare of its group
    assert report["spares_per_group"] == pytest.approx(report["group_failures_per_day"] * report["group_hardware_share"]
                                                       / report["replica_groups"] * report["days_p50"], rel=0.05)
    assert report["replica_groups"] >= 2 and report["layout"]["dp_replicate"] == report["replica_groups"]
    per_day = sum(FailureModel.llama3().unexpected_per_day(100_000).values())
    assert report["group_failures_per_day"] + report["job_restarts_per_day"] == pytest.approx(per_day)
    assert report["mtti_s"] == pytest.approx(86400 / report["job_restarts_per_day"])
    # the cost of one group's failure: everyone's stall and the wait for the transfer, then 1/R of the group's restart
    restart = report["group_recovery_s"] - report["group_transfer_s"]
    cost = report["group_stall_s"] + report["group_transfer_s"] + restart / report["replica_groups"]
    assert report["group_failure_cost_s"] == pytest.approx(cost)
    assert 0.5 < report["group_hardware_share"] < 1 and restart > RENDEZVOUS_KEEP_ALIVE_S * report["group_hardware_share"]
    # a shorter collective timeout shortens everyone's stall
    quick = simulate_run(load_model("grok-1"), get_cluster("colossus-100k"), SimulationOptions(
        tokens=6e12, trials=50, recovery="replica", replica_timeout_s=5))
    assert quick["group_stall_s"] == pytest.approx(report["group_stall_s"] - 5) and quick["goodput"] > report["goodput"]
    # without hot spares a node is swapped in the job restart's time: a group is out longer, the job loses more
    cold = simulate_run(load_model("grok-1"), get_cluster("colossus-100k"), SimulationOptions(
        tokens=6e12, trials=50, recovery="replica", hot_spares=False))
    assert cold["group_swap_s"] == 300 and cold["group_recovery_s"] == pytest.approx(
        report["group_recovery_s"] + (300 - RENDEZVOUS_KEEP_ALIVE_S) * report["group_hardware_share"])
    assert report["goodput_restart"] < cold["goodput"] < report["goodput"]
    assert report["short_step_fraction"] == pytest.approx(report["group_failures_per_day"] * report["group_recovery_s"] / 86400)
    # every software bug counted as job-wide (the cautious reading) costs goodput, still above the restart figure
    cautious = simulate_run(load_model("grok-1"), get_cluster("colossus-100k"), SimulationOptions(
        tokens=6e12, trials=50, recovery="replica", job_wide=frozenset({"software_bug", "network_switch_cable", "dependency"})))
    assert report["goodput_restart"] < cautious["goodput"] < report["goodput"]


def test_group_recovery_grows_with_the_state_and_shrinks_with_the_nic() -> None:
    from colossus.plan.search import search
    from colossus.plan.simulation import TRANSFER_BYTES_PER_S, group_recovery

    cluster = get_cluster("colossus-100k")
    failures = FailureModel.llama3().unexpected_per_day(cluster.n_gpus)
    small, large = load_model("medium"), load_model("grok-1")
    costs = {}
    for model in (small, large):
        best = search(model, cluster, {"dp_replicate": 4}, top=1).ranked[0]
        recovery = group_recovery(model, best, cluster, failures)
        state = modelmath.params_total(model) * 12 / (best.layout.world_size // 4)
        assert recovery.transfer_s == pytest.approx(state / min(TRANSFER_BYTES_PER_S, cluster.nic_gbps / 8 * 1e9))
        assert recovery.out_s == pytest.approx(recovery.restart_s + recovery.hardware_share * 300 + recovery.transfer_s)
        costs[model.name] = recovery
    assert costs["grok-1"].transfer_s > costs["medium"].transfer_s and costs["grok-1"].out_s > costs["medium"].out_s
    none = group_recovery(small, search(small, cluster, {"dp_replicate": 4}, top=1).ranked[0], cluster, {})
    assert none.speed() == 1.0 and none.short_fraction() == 0.0


def test_measured_recovery_constants_are_the_bench_results() -> None:
    """The simulator's group-recovery figures are those bench/recovery.py measured (the ~100M dense model)."""
    import sys

    from colossus.config import config_from_dict
    from colossus.plan import simulation
    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from throughput import SHAPES

    measured = json.loads((REPO / simulation.MEASURED_RECOVERY_FILE).read_text())
    replica = next(r for r in measured["results"] if r["model"] == "dense100m" and r["mode"] == "replica")
    restart = next(r for r in measured["results"] if r["model"] == "dense100m" and r["mode"] == "restart")
    assert replica["total"] < restart["total"]
    stages = ("process_start", "imports", "process_group", "model_build", "quorum_setup")
    assert simulation.GROUP_RESTART_S == pytest.approx(sum(replica[s] for s in stages), abs=0.01)
    model = config_from_dict({"model": SHAPES["dense100m"]}).model
    state = modelmath.params_total(model) * (modelmath.MASTER_BYTES + modelmath.OPTIMIZER_BYTES)
    assert simulation.TRANSFER_BYTES_PER_S == pytest.approx(state / replica["state"], rel=0.01)
