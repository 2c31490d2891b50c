"""Fault-tolerant replica groups on torchft, with real processes: three groups of one process each, each
its own torchrun job, one SIGKILLed in mid-run (and again while it takes a peer's state); the others keep
training, and the restarted group rejoins with the peers' state, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colossus.config import load_config
from colossus.errors import UserError
from conftest import REPO, small_tables, write_toml
from ranks import check, reap_jobs, started_jobs, torchrun  # noqa: F401 (reap_jobs: autouse)

GROUPS, STEPS, KILL_AT = 3, 30, 8


@pytest.fixture
def lighthouse():
    """A torchft Lighthouse on a free port (in this process: it is a Rust server with its own threads)."""
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=1000, quorum_tick_ms=50,
                              heartbeat_timeout_ms=1000)
    yield server.address()
    server.shutdown()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def steps_of(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def tiny_config(folder: Path, corpus_dir: Path, **faults) -> Path:
    tables = small_tables(corpus_dir, folder / "cache", train=dict(steps=STEPS, global_batch=2 * GROUPS, micro_batch=2),
                          checkpoint=dict(interval=10, keep=2), eval=dict(interval=STEPS, batches=2, sample_tokens=0),
                          log=dict(interval=1, tensorboard=False, state_digest=True))
    tables["model"] = dict(preset="tiny")
    if faults:
        tables["faults"] = dict(replica_groups=GROUPS, **faults)
        tables["parallel"] = dict(dp_replicate=GROUPS)
    return write_toml(folder / "run.toml", tables)


def start(args: list[str], cwd: Path, launcher: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*launcher, "-m", "colossus.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started_jobs.append(job)
    return job


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"{what} never happened")
        time.sleep(0.05)


def test_a_killed_group_rejoins_from_a_live_peer_while_the_others_train(tmp_path: Path, corpus_dir: Path,
                                                                         lighthouse: str) -> None:
    config = tiny_config(tmp_path, corpus_dir, lighthouse=lighthouse, inject_kill_in_recovery=True)
    jobs = [start([str(config), "--out", "run", "--set", f"faults.replica_group={group}"], tmp_path,
                  torchrun(1, tmp_path / f"logs-{group}", "--standalone", "--max-restarts=3", "--monitor-interval=0.2"))
            for group in range(GROUPS)]
    runs = [tmp_path / "run" / f"replica-{group}" for group in range(GROUPS)]
    wait_until(lambda: max(steps_of(runs[1]), default=0) >= KILL_AT, f"group 1 reaching step {KILL_AT}")
    worker = subprocess.run(["pgrep", "-P", str(jobs[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1, worker
    os.kill(int(worker[0]), signal.SIGKILL)
    killed_at = time.time()
    for group, job in enumerate(jobs):
        output, _ = job.communicate(timeout=900)
        check(job.returncode, output, tmp_path / f"logs-{group}")

    # The restarted group: its first attempt after the kill died while receiving a peer's state (the
    # injected fault); the next took the state in its first quorum, with no retried step before it.
    restarts = [e for e in read_jsonl(runs[1] / "events.jsonl") if e["event"] == "start" and e["restart"] > 0]
    assert [e["restart"] for e in restarts] == [1, 2], restarts
    recovered = events(runs[1], "recovered_from_peer")
    assert len(recovered) == 1 and recovered[0]["time"] > restarts[1]["time"], recovered
    rejoined = recovered[0]["step"]
    assert not [e for e in events(runs[1], "step_retried") if e["time"] > restarts[1]["time"]]

    # The others never stopped: they committed steps between the kill and the rejoin, with fewer groups.
    for group in (0, 2):
        short = [e for e in events(runs[group], "replicas_short") if killed_at < e["time"] < recovered[0]["time"]]
        assert len(short) >= 3 and all(e["participants"] == GROUPS - 1 for e in short), short
        assert rejoined >= KILL_AT + len(short)

    # Bit for bit: weights and optimizer state equal the peers' at the first step after rejoining, and at the end.
    logged = [steps_of(run) for run in runs]
    for step in (rejoined + 1, STEPS):
        assert logged[0][step]["state_sha256"] == logged[1][step]["state_sha256"] == logged[2][step]["state_sha256"]
        assert logged[0][step]["loss"] == logged[1][step]["loss"] == logged[2][step]["loss"]

    # Every group finished every step; the tokens counted are those the groups actually read.
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert [s["step"] for s in summaries] == [STEPS] * GROUPS
    seq_tokens = 2 * 256  # a group's share of a step: 2 sequences of the tiny model's 256 tokens
    missing = sum(GROUPS - e["participants"] for e in events(runs[0], "replicas_short"))
    assert summaries[0]["tokens"] == (STEPS * GROUPS - missing) * seq_tokens == summaries[1]["tokens"]
    for group in (0, 2):  # a survivor's ledger counts every step, each at the tokens actually read
        ledger = json.loads((runs[group] / "ledger.json").read_text())
        assert ledger["tokens"] == summaries[group]["tokens"] and ledger["short_steps"] == len(
            events(runs[group], "replicas_short")) and ledger["lost"]["steps"] == 0
    totals = [steps_of(runs[0])[step]["tokens"] for step in range(1, STEPS + 1)]
    assert totals[-1] == summaries[0]["tokens"] and all(b > a for a, b in zip(totals, totals[1:]))

    # The final validation loss is that of an uninterrupted run of the same batch, within 2%.
    plain = tmp_path / "plain"
    plain.mkdir()
    job = start([str(tiny_config(plain, corpus_dir)), "--out", "run"], plain, [sys.executable])
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-3000:]
    uninterrupted = json.loads((plain / "run" / "summary.json").read_text())["val_loss"]
    assert abs(summaries[0]["val_loss"] / uninterrupted - 1) < 0.02, (summaries[0]["val_loss"], uninterrupted)


def test_an_unreachable_lighthouse_is_one_line_naming_it(tmp_path: Path, corpus_dir: Path) -> None:
    config = tiny_config(tmp_path, corpus_dir, lighthouse="localhost:9")  # the discard port: nothing listens
    result = subprocess.run([sys.executable, "-m", "colossus.train", str(config), "--out", "run", "--set",
                             "faults.replica_group=0"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "the torchft Lighthouse at http://localhost:9 cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "replica-0" / "metrics.jsonl").exists()


@pytest.mark.parametrize("faults, parallel, message", [
    (dict(replica_groups=3, replica_group=0), dict(dp_replicate=2),
     "faults.replica_groups = 3 does not fit parallel.dp_replicate = 2"),
    (dict(replica_groups=2, replica_group=2), dict(dp_replicate=2), "faults.replica_group = 2 is not one of the 2"),
    (dict(replica_groups=2, replica_group=0, min_replicas=3), dict(dp_replicate=2), "faults.min_replicas = 3"),
])
def test_replica_groups_that_do_not_fit_are_one_line(tmp_path: Path, faults: dict, parallel: dict, message: str) -> None:
    path = write_toml(tmp_path / "run.toml", {"faults": faults, "parallel": parallel,
                                              "train": {"global_batch": 6, "micro_batch": 1}})
    with pytest.raises(UserError, match=message):
        load_config(str(path), [])


def test_launch_prints_the_lighthouse_and_one_torchrun_job_per_group() -> None:
    from colossus.launch import plan_replica_launch

    lines = plan_replica_launch(3, 1, 6, "10.0.0.1", 29500, 29510, ["run.toml", "--out", "r"], 2).commands()
    assert lines[1].startswith("torchft_lighthouse --min_replicas=1 '--bind=[::]:29510'") and lines[-1] == "wait %2 %3 %4; kill %1"
    jobs = [line for line in lines if "torchrun" in line]
    assert len(jobs) == 3
    for group, job in enumerate(jobs):
        assert job.startswith(f"CUDA_VISIBLE_DEVICES={2 * group},{2 * group + 1} torchrun --nproc-per-node=2 --standalone")
        assert f"faults.replica_group={group}" in job and "faults.replica_groups=3" in job and "--max-restarts=2" in job
        assert "'faults.lighthouse=\"10.0.0.1:29510\"'" in job
    several = plan_replica_launch(2, 4, 8, "head", 29500, 29510, [], 1).commands()
    assert [line.count("--nnodes=2") for line in several if "torchrun" in line] == [1, 1]
    assert '--rdzv-endpoint="$GROUP_HEAD:29501"' in several[-1]
    with pytest.raises(UserError, match="--nodes 3 does not split into 2 replica groups"):
        plan_replica_launch(2, 3, 8, "head", 29500, 29510, [], 1)


def test_a_run_folder_does_not_switch_between_one_job_and_replica_groups(tmp_path: Path, corpus_dir: Path) -> None:
    from colossus.config import config_from_dict
    from colossus.train.trainer import train

    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    (tmp_path / "groups" / "replica-0" / "checkpoints").mkdir(parents=True)
    grouped = config_from_dict({"faults": dict(replica_groups=2, replica_group=0, lighthouse="localhost:9"),
                                "parallel": dict(dp_replicate=2), "train": dict(global_batch=2, micro_batch=1)})
    with pytest.raises(UserError, match="trained without replica groups"):
        train(grouped, tmp_path / "one")
    with pytest.raises(UserError, match="trained as replica groups"):
        train(config_from_dict({}), tmp_path / "groups")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["checkpoints"]  # nothing written
