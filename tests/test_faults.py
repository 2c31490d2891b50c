"""Surviving failures with real processes and real signals: NaN steps, rollback, SIGTERM,
a hung rank, and a rank SIGKILLed under torchrun --max-restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colossus.train.guards import EXIT_HUNG, EXIT_PREEMPTED
from colossus.train.trainer import train
from conftest import REPO, small_config, small_tables, write_toml


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


QUIET = dict(eval={"sample_tokens": 0, "interval": 100}, log={"interval": 1, "tensorboard": False})


def test_injected_nan_step_is_skipped_and_recorded(tmp_path: Path, corpus_dir: Path) -> None:
    """One poisoned step applies no update; the run goes on and events.jsonl records the skip."""
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 8}, faults={"inject_nan_at_step": 4}, **QUIET)
    summary = train(config, tmp_path / "run")
    records = losses(tmp_path / "run")
    skipped = events(tmp_path / "run", "skipped_step")
    assert [e["step"] for e in skipped] == [4] and summary["skipped_steps"] == 1
    assert records[4]["loss"] != records[4]["loss"]  # NaN is logged as it was
    assert all(records[s]["loss"] == records[s]["loss"] for s in (5, 6, 7, 8))  # and training continued
    assert records[8]["loss"] < records[1]["loss"] and summary["step"] == 8


def test_repeated_nan_rolls_back_and_skips_the_batch(tmp_path: Path, corpus_dir: Path) -> None:
    """max_bad_steps consecutive bad steps reload the last checkpoint and skip the offending batch."""
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 10}, checkpoint={"interval": 4, "keep": 2},
                          faults={"inject_nan_at_step": 6, "inject_nan_count": 2, "max_bad_steps": 2}, **QUIET)
    summary = train(config, tmp_path / "run")
    rollbacks = events(tmp_path / "run", "rollback")
    assert len(rollbacks) == 1 and rollbacks[0]["from_step"] == 7 and rollbacks[0]["to_step"] == 4
    skips = events(tmp_path / "run", "skip_batch")
    assert [s["batch"] for s in skips] == [rollbacks[0]["skip_batch"]]
    assert summary["step"] == 10 and summary["skipped_steps"] == 2
    assert losses(tmp_path / "run")[10]["loss"] == losses(tmp_path / "run")[10]["loss"]  # finite


def run_cli(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*(launcher or [sys.executable]), "-m", "colossus.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_jsonl(metrics) if "loss" in r):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never came")


def test_sigterm_checkpoints_the_current_step_and_rerun_continues(tmp_path: Path, corpus_dir: Path) -> None:
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 200}, checkpoint={"interval": 1000, "keep": 2},
                          **QUIET)
    config = write_toml(tmp_path / "run.toml", tables)
    run = tmp_path / "run"
    process = run_cli([str(config), "--out", str(run)], tmp_path)
    wait_for_step(run, 5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    stopped = events(run, "preempted")[0]["step"]
    assert 5 <= stopped < 200 and (run / "checkpoints" / f"step-{stopped}" / "COMMITTED").is_file()
    assert "run the same command again" in output and "Traceback" not in output
    rerun = run_cli([str(config), "--out", str(run), "--steps", str(stopped + 3)], tmp_path)
    output, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, output
    assert f"resumed {run} from step {stopped}" in output


def test_hang_watchdog_exits_with_stacks(tmp_path: Path) -> None:
    """A loop that stops beating is ended with EXIT_HUNG and every thread's stack on stderr."""
    script = ("import time\nfrom colossus.train.guards import HangWatchdog\n"
              "with HangWatchdog(1.0) as watchdog:\n    watchdog.beat(7)\n    time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_HUNG
    assert "no progress" in result.stderr and "after step 7" in result.stderr
    assert 'File "<string>", line 5' in result.stderr  # the main thread's stack: stuck in the sleep


@pytest.mark.skipif(os.environ.get("COLOSSUS_RESTART_TESTS") != "1",
                    reason="flaky under load (a restarted gloo group once failed to connect); "
                           "run with COLOSSUS_RESTART_TESTS=1 until issue 4 settles it")
@pytest.mark.parametrize("nproc, parallel", [(2, {})])
def test_sigkill_of_a_rank_under_torchrun_restarts_bit_identical(tmp_path: Path, corpus_dir: Path, nproc: int,
                                                                  parallel: dict) -> None:
    """torchrun --max-restarts 2: SIGKILL one worker between checkpoints; the restarted job resumes from
    the newest checkpoint and its final loss equals the uninterrupted run's bit for bit."""
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 40, "micro_batch": 2},
                          checkpoint={"interval": 10, "keep": 2}, parallel=parallel, **QUIET)
    config = write_toml(tmp_path / "run.toml", tables)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--max-restarts=2", "--monitor-interval=0.2"]
    reference = run_cli([str(config), "--out", "a"], tmp_path, launcher)
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]

    victim_run = tmp_path / "b"
    job = run_cli([str(config), "--out", "b"], tmp_path, launcher)
    wait_for_step(victim_run, 15)  # after checkpoint 10, before 20
    workers = subprocess.run(["pgrep", "-f", f"colossus.train {config} --out b"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split() if int(p) != job.pid]
    assert pids, "no worker found"
    os.kill(max(pids), signal.SIGKILL)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    resumes = events(victim_run, "resume")
    assert resumes and resumes[0]["step"] in (10, 20)
    assert losses(victim_run)[40]["loss"] == losses(tmp_path / "a")[40]["loss"]
