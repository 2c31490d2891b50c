"""A multi-process failure names its rank: torchrun's per-rank logs, read back by tests/ranks.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from ranks import check, rank_stderr, torchrun


def test_a_failing_rank_is_named_with_its_own_error(tmp_path: Path) -> None:
    """Rank 1 of 4 raises: the assertion names rank 1, its exit code and its own traceback's last line,
    not the other ranks' "connection reset" or torchrun's SIGTERM to them."""
    logs = tmp_path / "logs"
    command = [*torchrun(4, logs, "--standalone"), str(REPO / "tests" / "rank_worker.py"), "--fail", "1"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    with pytest.raises(AssertionError) as failed:
        check(result.returncode, result.stdout + result.stderr, logs)
    message = str(failed.value)
    assert message.startswith("rank 1 (local rank 1) failed first, exit code 1")
    assert "ValueError: rank 1 of 4 fails here on purpose" in message
    assert "ValueError" not in rank_stderr(logs, 2)  # each rank's stderr is its own
