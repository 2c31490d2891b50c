"""Fault-tolerant replica groups on torchft, with real processes: three groups of one process each, each
its own torchrun job, one SIGKILLed in mid-run (and again while it takes a peer's state); the others keep
training, and the restarted group rejoins with the peers' state, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import socket
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
    """A torchft Lighthouse on a free port (in this process: it is a Rust server with its own threads), with
    the timings colossus launch gives it: a shorter join timeout lets groups that are alive but a second late
    (three processes on two cores) split into quorums that leave each other out again and again."""
    from torchft._torchft import LighthouseServer

    from colossus.launch import HEARTBEAT_TIMEOUT_MS, JOIN_TIMEOUT_MS

    os.environ.setdefault("RUST_LOG", "warn")  # not every quorum at INFO in the suite's output
    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=JOIN_TIMEOUT_MS, quorum_tick_ms=50,
                              heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
    yield server.address()
    server.shutdown()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def steps_of(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def tiny_config(folder: Path, corpus_dir: Path, groups: int = GROUPS, steps: int = STEPS, **faults) -> Path:
    tables = small_tables(corpus_dir, folder / "cache", train=dict(steps=steps, global_batch=2 * groups, micro_batch=2),
                          checkpoint=dict(interval=10, keep=2), eval=dict(interval=steps, batches=2, sample_tokens=0),
                          log=dict(interval=1, tensorboard=False, state_digest=True))
    tables["model"] = dict(preset="tiny")
    if faults:
        tables["faults"] = dict(replica_groups=groups, **faults)
        tables["parallel"] = dict(dp_replicate=groups)
    return write_toml(folder / "run.toml", tables)


def start(args: list[str], cwd: Path, launcher: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_spare_node_takes_the_place_of_a_dead_one(tmp_path: Path, corpus_dir: Path, lighthouse: str) -> None:
    """Two groups of one node each, on their rendezvous as colossus launch prints them (the stores served apart,
    here in this process), and a spare node for each group waiting in its rendezvous. Group 1's node dies (its
    torchrun agent and its worker, SIGKILL): torchrun's rendezvous drops it once its keep-alive lapses, the
    spare starts the group's worker, and that takes the live group's state."""
    from colossus.launch import RENDEZVOUS_KEEP_ALIVE_S, plan_replica_launch, serve_rendezvous

    steps = 90
    port = free_port()
    stores = serve_rendezvous(port, 2)  # noqa: F841 (kept alive for the test)
    config = tiny_config(tmp_path, corpus_dir, groups=2, steps=steps, lighthouse="set by the launch")
    lighthouse_port = int(lighthouse.rsplit(":", 1)[1])
    launch = plan_replica_launch(2, 2, 1, "127.0.0.1", port, lighthouse_port, [str(config), "--out", "run"], 3,
                                 spare_nodes=1)
    lines = launch.commands()
    assert lines[2].startswith("# and the groups' rendezvous") and lines[3] == f"colossus rendezvous --port={port} --groups=2 &"

    def node(group: int, name: str) -> subprocess.Popen:
        plan = launch.groups[group]
        assert f"--rdzv-endpoint=127.0.0.1:{port + group}" in plan.torchrun_options()
        options = [*plan.torchrun_options(), "--log-dir", str(tmp_path / f"logs-{name}"), "--redirects", "3", "--tee", "3",
                   "--monitor-interval=0.2"]
        return start(plan.train_args, tmp_path, [sys.executable, "-m", "torch.distributed.run", *options],
                     {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})

    nodes = [node(0, "group-0"), node(1, "group-1")]
    runs = [tmp_path / "run" / f"replica-{group}" for group in range(2)]
    wait_until(lambda: max(steps_of(runs[1]), default=0) >= 2, "group 1 training")
    spare, idle_spare = node(1, "spare"), node(0, "idle-spare")
    wait_until(lambda: max(steps_of(runs[1]), default=0) >= 12, "group 1 reaching step 12")
    worker = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True).stdout.split()
    for pid in [nodes[1].pid, *map(int, worker)]:  # the whole node: its agent and its worker
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    for name, job in (("group-0", nodes[0]), ("spare", spare)):
        output, _ = job.communicate(timeout=900)
        check(job.returncode, output, tmp_path / f"logs-{name}")
    # A spare never needed leaves when its group's rendezvous closes at the end; torch 2.13's torchrun then
    # exits 1 on its own graceful exit (launch_agent reads the result agent.run() does not return).
    output, _ = idle_spare.communicate(timeout=120)
    assert idle_spare.returncode == 0 or "'NoneType' object has no attribute 'is_failed'" in output, output[-3000:]
    assert not list((tmp_path / "logs-idle-spare").glob("*/attempt_*/0/stderr.log"))  # it never started a worker

    # The spare's worker started once torchrun had dropped the dead node (its last keep-alive up to 5 s before
    # the kill), and took the live group's state, with no checkpoint read.
    started = [e for e in events(runs[1], "startup") if e["process_started"] > killed_at]
    assert len(started) == 1 and started[0]["process_started"] - killed_at > RENDEZVOUS_KEEP_ALIVE_S - 5, started
    assert "checkpoint_read_s" not in started[0] and not [e for e in events(runs[1], "resume") if e["time"] > killed_at]
    recovered = events(runs[1], "recovered_from_peer")
    assert len(recovered) == 1 and killed_at < recovered[0]["time"] <= started[0]["time"], recovered
    short = [e for e in events(runs[0], "replicas_short") if killed_at < e["time"] < recovered[0]["time"]]
    assert len(short) >= 3 and all(e["participants"] == 1 for e in short), short
    logged = [steps_of(run) for run in runs]
    for step in (recovered[0]["step"] + 1, steps):
        assert logged[0][step]["state_sha256"] == logged[1][step]["state_sha256"]


def test_a_whole_job_resumes_from_its_checkpoints_and_a_finished_one_stays_finished(
        tmp_path: Path, corpus_dir: Path, lighthouse: str) -> None:
    """Two groups started as a fresh job each time (no torchrun restart count): after the run finished,
    starting it again trains nothing (the summaries keep their step and tokens); given more steps, every group
    reads its own checkpoint (no peer is ahead) and they train on together, bit for bit alike."""
    def run_groups(steps: int) -> list[dict]:
        config = tiny_config(tmp_path, corpus_dir, groups=2, steps=steps, lighthouse=lighthouse)
        jobs = [start([str(config), "--out", "run", "--set", f"faults.replica_group={group}"], tmp_path,
                      [sys.executable]) for group in range(2)]
        for job in jobs:
            output, _ = job.communicate(timeout=600)
            assert job.returncode == 0, output[-3000:]
        return [json.loads((tmp_path / "run" / f"replica-{group}" / "summary.json").read_text()) for group in range(2)]

    runs = [tmp_path / "run" / f"replica-{group}" for group in range(2)]
    first = run_groups(10)
    assert [s["step"] for s in first] == [10, 10] and first[0]["val_loss"] is not None
    again = run_groups(10)
    assert [(s["step"], s["tokens"]) for s in again] == [(s["step"], s["tokens"]) for s in first]
    assert max(steps_of(runs[0])) == 10 and not events(runs[0], "finished_by_peers")
    longer = run_groups(14)
    assert [s["step"] for s in longer] == [14, 14] and longer[0]["tokens"] == first[0]["tokens"] * 14 // 10
    for run in runs:
        assert [e["step"] for e in events(run, "resume")][-1] == 10 and not events(run, "recovered_from_peer")
    logged = [steps_of(run) for run in runs]
    assert logged[0][14]["state_sha256"] == logged[1][14]["state_sha256"]


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
    # every group's rendezvous served on the head node, where it outlives the group's own nodes
    assert several[1].endswith(" &") and several[3] == "colossus rendezvous --port=29500 --groups=2 &"
    assert "--rdzv-endpoint=head:29501 --rdzv-id=colossus-group-1 --rdzv-conf=is_host=false" in several[-1]
    spares = plan_replica_launch(2, 4, 8, "head", 29500, 29510, [], 1, spare_nodes=1).commands()
    assert "(on each of its 2 nodes and its 1 spare node:" in spares[4] and spares[5] == several[5]
    with pytest.raises(UserError, match="--spare-nodes 1: a spare is a whole node"):
        plan_replica_launch(3, 1, 6, "head", 29500, 29510, [], 1, spare_nodes=1)
    with pytest.raises(UserError, match="--nodes 3 does not split into 2 replica groups"):
        plan_replica_launch(2, 3, 8, "head", 29500, 29510, [], 1)


def test_spare_nodes_and_a_rendezvous_port_in_use_are_one_line_errors(capsys) -> None:
    from colossus.cli import EXIT_USER_ERROR, main
    from colossus.launch import serve_rendezvous

    assert main(["launch", "--spare-nodes", "1", "--", "run.toml"]) == EXIT_USER_ERROR
    assert "--spare-nodes needs --replica-groups" in capsys.readouterr().err
    port = free_port()
    stores = serve_rendezvous(port, 1)  # noqa: F841 (holds the port)
    assert main(["rendezvous", "--port", str(port), "--groups", "2"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert f"port {port} is in use" in error and len(error.strip().splitlines()) == 1


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
