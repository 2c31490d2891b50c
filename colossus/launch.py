"""The exact launch commands for a run on N nodes: torchrun with c10d rendezvous, one agent per node.

Printed rather than executed, so they can be pasted into a shell, a job script or a cluster
scheduler; scripts/slurm/train.sbatch does the same under Slurm.
"""

from __future__ import annotations

import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

from colossus.errors import UserError


@dataclass
class LaunchPlan:
    nodes: int
    procs_per_node: int
    head: str  # address of the node that hosts the rendezvous
    port: int
    train_args: list[str]
    max_restarts: int = 0
    run_id: str = "colossus"

    def command(self, node_rank: int | None = None) -> str:
        """The torchrun line to run on one node (identical on every node with c10d rendezvous)."""
        parts = ["torchrun", f"--nproc-per-node={self.procs_per_node}"]
        if self.nodes == 1:
            parts.append("--standalone")
        else:
            parts += [f"--nnodes={self.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.head}:{self.port}",
                      f"--rdzv-id={self.run_id}"]
        if self.max_restarts:
            parts.append(f"--max-restarts={self.max_restarts}")
        parts += ["-m", "colossus.train", *self.train_args]
        command = shlex.join(parts)
        if self.nodes > 1 and self.max_restarts:
            # A store per attempt: with the agents' shared one, restarted ranks can read a dead
            # attempt's addresses (pytorch/pytorch#135712); see parallel/runtime.py.
            command = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " + command
        return command


def plan_launch(nodes: int, procs_per_node: int, head: str, port: int, train_args: list[str],
                max_restarts: int = 0) -> LaunchPlan:
    if nodes < 1 or procs_per_node < 1:
        raise UserError(f"--nodes and --procs-per-node must be at least 1, got {nodes} and {procs_per_node}")
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port; pick one in 1-65535")
    return LaunchPlan(nodes, procs_per_node, head, port, list(train_args), max_restarts)


# torchrun's summary of a failed job ends with the "Root Cause (first observed failure)" block:
#   rank      : 3 (local_rank: 3)
#   exitcode  : -6 (pid: 1234)  (SIGABRT)
_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+) \(local_rank: (\d+)\)"
                         r".*?exitcode\s*:\s*(-?\d+)", re.S)


@dataclass
class RankFailure:
    """The first rank torchrun saw fail, and the end of that rank's own stderr."""

    rank: int
    local_rank: int
    exitcode: int
    stderr_tail: str

    def describe(self) -> str:
        how = f"exit code {self.exitcode}"
        if self.exitcode < 0:
            how = f"signal {-self.exitcode} ({signal.Signals(-self.exitcode).name})"
        return f"rank {self.rank} (local rank {self.local_rank}) failed first, {how}; its stderr ends:\n{self.stderr_tail}"


def first_rank_failure(output: str, log_dir: Path, lines: int = 30) -> RankFailure | None:
    """Read torchrun's report of the first failed rank from its output, and that rank's stderr from
    the per-rank files of `torchrun --log-dir LOG_DIR --redirects 3` (the newest attempt's, of the
    agent whose files mention the rank's error); None when torchrun reported no failure."""
    match = _ROOT_CAUSE.search(output)
    if match is None:
        return None
    rank, local_rank, exitcode = (int(group) for group in match.groups())
    candidates = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/stderr.log"),
                        key=lambda path: (path.stat().st_mtime, path.parent.parent.name))
    tail = f"(no stderr file for it under {log_dir})"
    if candidates:
        text = candidates[-1].read_text(errors="replace").rstrip().splitlines()
        tail = "\n".join(text[-lines:]) if text else "(its stderr is empty)"
    return RankFailure(rank, local_rank, exitcode, tail)
