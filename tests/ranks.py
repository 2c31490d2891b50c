"""Multi-process tests under torchrun, with each rank's own output kept: `--log-dir` with redirects
puts every rank's stdout and stderr in its own file (and --tee still shows them in torchrun's
output, each line prefixed with its rank), so a failure names the first rank that failed, its exit
code or signal, and the last lines of that rank's own stderr, not the survivors' "connection reset"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from colossus.launch import first_rank_failure

REPO = Path(__file__).resolve().parents[1]

started_jobs: list[subprocess.Popen] = []  # every job a test starts in its own session, reaped after the test


@pytest.fixture(autouse=True)
def reap_jobs():
    """A failed assertion must not leave a torchrun job (and its workers) running behind the suite (a test
    module uses it by importing it)."""
    yield
    while started_jobs:
        job = started_jobs.pop()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def torchrun(nproc: int, log_dir: Path, *options: str) -> list[str]:
    """The launcher's argv up to the program: torchrun with per-rank log files under log_dir
    (options: --standalone, --max-restarts=2, ...)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3", *options]


def failure_message(returncode: int, output: str, log_dir: Path) -> str:
    failure = first_rank_failure(output, log_dir)
    if failure is not None:
        return failure.describe()
    return f"torchrun exited with {returncode}; its output ends:\n{output[-3000:]}"


def check(returncode: int, output: str, log_dir: Path) -> None:
    """Passes for a clean exit; otherwise fails naming the first failed rank and its own error."""
    assert returncode == 0, failure_message(returncode, output, log_dir)


def finish(process: subprocess.Popen, log_dir: Path, timeout: float = 600) -> str:
    """Wait for a torchrun job started with stdout=PIPE, stderr=STDOUT, text=True; its output if it
    succeeded, else the first failed rank's error as the assertion message."""
    output, _ = process.communicate(timeout=timeout)
    check(process.returncode, output, log_dir)
    return output


def rank_stderr(log_dir: Path, local_rank: int) -> str:
    """The stderr of one local rank (its newest attempt)."""
    files = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    return files[-1].read_text(errors="replace") if files else ""


def start_training(args: list[str], cwd: Path, nproc: int) -> subprocess.Popen:
    """`colossus.train ARGS` under torchrun on this machine, each rank's output in a cwd/logs-* folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = Path(tempfile.mkdtemp(dir=cwd, prefix="logs-"))
    return subprocess.Popen([*torchrun(nproc, logs, "--standalone"), "-m", "colossus.train", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_training(process: subprocess.Popen, timeout: float = 900) -> str:
    """A start_training job's output; a failure names the first failed rank and its own error."""
    return finish(process, Path(process.args[process.args.index("--log-dir") + 1]), timeout=timeout)
