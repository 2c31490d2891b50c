"""Surviving failures with real processes and real signals: NaN steps, rollback, SIGTERM,
a hung rank, and a rank SIGKILLed under torchrun --max-restarts."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colossus.train.checkpoint import verify
from colossus.train.guards import EXIT_HUNG, EXIT_PREEMPTED
from colossus.train.trainer import train
from conftest import REPO, small_config, small_tables, write_toml
from ranks import check, reap_jobs, started_jobs, torchrun as torchrun_with_logs  # noqa: F401 (reap_jobs: autouse)


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


def test_nan_guard_reading_flags_a_step_late_changes_nothing(tmp_path: Path, corpus_dir: Path) -> None:
    """Without a log line every step, the guard reads each step's skip flag after the next step has
    run (no host sync per step); it still rolls back from the same bad step to the same checkpoint,
    skips the same batch and ends with the same weights: the step run past the bad one is discarded
    (an injected fault it used up comes again)."""
    runs = {}
    for interval in (1, 100):
        config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 10}, checkpoint={"interval": 4, "keep": 2},
                              faults={"inject_nan_at_step": 6, "inject_nan_count": 3, "max_bad_steps": 2},
                              eval={"sample_tokens": 0, "interval": 100}, log={"interval": interval, "tensorboard": False})
        run = tmp_path / f"log-every-{interval}"
        summary = train(config, run)
        rollbacks = [{k: v for k, v in e.items() if k != "time"} for e in events(run, "rollback")]
        runs[interval] = (summary, rollbacks, [e["step"] for e in events(run, "skipped_step")],
                          json.loads((run / "ledger.json").read_text()))
    (eager, eager_rollbacks, eager_skips, eager_ledger), (late, late_rollbacks, late_skips, late_ledger) = runs[1], runs[100]
    assert sorted(losses(tmp_path / "log-every-100")) == [10]  # only the last step was logged
    assert late_rollbacks == eager_rollbacks and eager_rollbacks[0]["from_step"] == 7
    assert late_skips == eager_skips == [6, 7, 6]  # the third injected NaN hits the replay, read late or not
    assert late["val_loss"] == eager["val_loss"] and late["step"] == eager["step"] == 10
    lost = [sum(s["lost_steps"] for s in ledger["segments"]) for ledger in (eager_ledger, late_ledger)]
    assert lost == [3, 4]  # steps 5-7 are rolled back; reading late, step 8 had run too


def run_cli(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*(launcher or [sys.executable]), "-m", "colossus.train", *args], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started_jobs.append(job)
    return job


def wait_for_step(run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        # Only whole lines: the trainer may be appending one as we read (a stress round parsed half a line).
        written = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
        if any(r.get("step", 0) >= step for r in map(json.loads, written) if "loss" in r):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never came")


def wait_for_file(path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        if time.time() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


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


RESTART_STEPS = 30


def torchrun(nproc: int, folder: Path) -> list[str]:
    """torchrun that restarts a failed job twice, each rank's output of each attempt in folder/logs."""
    return torchrun_with_logs(nproc, folder / "logs", "--standalone", "--max-restarts=2", "--monitor-interval=0.2")


def restart_config(folder: Path, corpus_dir: Path, parallel: dict, faults: dict | None = None) -> Path:
    tables = small_tables(corpus_dir, folder / "cache", train={"steps": RESTART_STEPS, "micro_batch": 2},
                          checkpoint={"interval": 10, "keep": 2}, parallel=parallel, faults=faults or {}, **QUIET)
    return write_toml(folder / "run.toml", tables)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path):
    """The final loss of an uninterrupted torchrun run per (processes, layout), each run once."""
    finals: dict[tuple[int, str], float] = {}

    def final_loss(nproc: int, parallel: dict) -> float:
        key = (nproc, json.dumps(parallel, sort_keys=True))
        if key not in finals:
            folder = tmp_path_factory.mktemp("uninterrupted")
            job = run_cli([str(restart_config(folder, corpus_dir, parallel)), "--out", "run"], folder,
                          torchrun(nproc, folder))
            output, _ = job.communicate(timeout=600)
            check(job.returncode, output, folder / "logs")
            finals[key] = losses(folder / "run")[RESTART_STEPS]["loss"]
        return finals[key]

    return final_loss


@pytest.mark.parametrize("nproc, parallel", [(2, {}), (4, {"ep": 2})], ids=["2-fsdp", "4-fsdp-ep2"])
def test_sigkill_of_a_rank_under_torchrun_restarts_bit_identical(tmp_path: Path, corpus_dir: Path, nproc: int,
                                                                  parallel: dict, uninterrupted) -> None:
    """torchrun --max-restarts 2: SIGKILL one worker between checkpoints; the restarted job resumes from
    the newest checkpoint and its final loss equals the uninterrupted run's bit for bit."""
    config = restart_config(tmp_path, corpus_dir, parallel)
    run = tmp_path / "run"
    job = run_cli([str(config), "--out", "run"], tmp_path, torchrun(nproc, tmp_path))
    wait_for_step(run, 13)  # after checkpoint 10, before 20
    workers = subprocess.run(["pgrep", "-f", f"colossus.train {config} --out run"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split() if int(p) != job.pid]
    assert len(pids) == nproc, workers.stdout
    os.kill(max(pids), signal.SIGKILL)
    output, _ = job.communicate(timeout=600)
    check(job.returncode, output, tmp_path / "logs")
    resumes = events(run, "resume")
    assert resumes and resumes[0]["step"] in (10, 20) and resumes[0]["restart"] == 1
    assert losses(run)[RESTART_STEPS]["loss"] == uninterrupted(nproc, parallel)


def test_sigkill_during_checkpoint_write_uses_the_previous_one(tmp_path: Path, corpus_dir: Path, uninterrupted) -> None:
    """Rank 0 is SIGKILLed when every shard of checkpoint 20 is on disk but before the commit: the
    restarted job ignores the half-written folder, resumes from 10, and ends bit-identical."""
    config = restart_config(tmp_path, corpus_dir, {}, faults={"inject_kill_in_save_at_step": 20})
    run = tmp_path / "run"
    job = run_cli([str(config), "--out", "run"], tmp_path, torchrun(2, tmp_path))
    output, _ = job.communicate(timeout=600)
    check(job.returncode, output, tmp_path / "logs")
    assert [(e["step"], e["restart"]) for e in events(run, "resume")] == [(10, 1)]
    assert [e["step"] for e in events(run, "checkpoint")].count(20) == 2  # started, killed; then again
    assert not list((run / "checkpoints").glob(".*partial"))  # the leftover was replaced by the new save
    assert verify(run / "checkpoints" / "step-30") is None
    assert losses(run)[RESTART_STEPS]["loss"] == uninterrupted(2, {})


def limit_file_size(pid: int, max_bytes: int) -> None:
    """From now on the kernel refuses to let process `pid` grow any file past `max_bytes` (EFBIG): a
    real storage failure of one process, while every other process writes normally."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


@pytest.mark.parametrize("on_error, async_save", [("continue", True), ("stop", False)])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, corpus_dir: Path, on_error: str,
                                                        async_save: bool) -> None:
    """Storage that starts refusing writes mid-run: the failed save is reported and cleaned up, the
    previous checkpoint stays intact, and the run goes on or stops as checkpoint.on_error says.
    (A background save's failure is reported when the next save starts or the run ends.)"""
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 30},
                          checkpoint={"interval": 10, "keep": 3, "on_error": on_error, "async_save": async_save},
                          **QUIET)
    config = write_toml(tmp_path / "run.toml", tables)
    run = tmp_path / "run"
    process = run_cli([str(config), "--out", str(run)], tmp_path)
    wait_for_step(run, 12)
    # Checkpoint 10 must be committed before the storage fails: a background save can still be writing
    # it at step 12 under load (a stress round caught the limit landing on checkpoint 10 itself).
    wait_for_file(run / "checkpoints" / "step-10" / "COMMITTED")
    limit_file_size(process.pid, 128 * 1024)  # a checkpoint shard is ~1 MB; logs stay far below
    output, _ = process.communicate(timeout=240)

    failed = events(run, "checkpoint_failed")
    assert failed and failed[0]["step"] == 20 and failed[0]["reason"].startswith("rank 0: ")
    assert f"GiB free in {run / 'checkpoints'}" in failed[0]["reason"]
    assert failed[0]["newest_intact"] == 10
    assert verify(run / "checkpoints" / "step-10") is None  # the previous checkpoint is intact
    assert not list((run / "checkpoints").glob(".*partial"))  # the half-written one is gone
    assert "Traceback" not in output
    if on_error == "continue":
        assert process.returncode == 0, output
        assert max(losses(run)) == 30 and [e["step"] for e in failed] == [20, 30]
        assert json.loads((run / "summary.json").read_text())["checkpoint_failures"] == 2
        assert "training goes on" in output
    else:
        assert process.returncode == 2, output
        assert max(losses(run)) == 20 and len(failed) == 1
        last_line = output.strip().splitlines()[-1]
        assert last_line.startswith("colossus train: error: checkpoint of step 20 was not written: rank 0: ")
        assert "newest intact checkpoint is step 10" in last_line
