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
    visible_devices: list[int] | None = None  # GPUs this job may use (one node shared by replica groups)

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
        if self.head.startswith("$"):  # a shell variable (a replica group's first node): let the shell expand it
            command = command.replace(shlex.quote(f"--rdzv-endpoint={self.head}:{self.port}"),
                                      f'--rdzv-endpoint="{self.head}:{self.port}"')
        if self.visible_devices is not None:
            command = f"CUDA_VISIBLE_DEVICES={','.join(map(str, self.visible_devices))} " + command
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


# The Lighthouse's timings: a dead group is noticed after HEARTBEAT_TIMEOUT_MS without a heartbeat (the
# survivors wait about that long once, then go on without it); a quorum waits up to JOIN_TIMEOUT_MS for
# groups that are alive but late (steps of a few seconds vary by seconds between groups: with 2 s, a
# ~100M model on a busy CPU left a slow group out of a quorum again and again, and each time it had to
# take the state from a peer).
HEARTBEAT_TIMEOUT_MS = 2000
JOIN_TIMEOUT_MS = 10000


def lighthouse_command(port: int, min_replicas: int = 1) -> str:
    """torchft's Lighthouse (installed with Colossus), which decides every step's quorum of groups."""
    return shlex.join(["torchft_lighthouse", f"--min_replicas={min_replicas}", f"--bind=[::]:{port}",
                       f"--heartbeat_timeout_ms={HEARTBEAT_TIMEOUT_MS}", f"--join_timeout_ms={JOIN_TIMEOUT_MS}"])


@dataclass
class ReplicaLaunch:
    """A run as fault-tolerant replica groups ([faults] replica_groups): the Lighthouse on the head node,
    then one torchrun job per group, each restarting on its own (--max-restarts)."""

    groups: list[LaunchPlan]
    head: str
    lighthouse_port: int

    def commands(self) -> list[str]:
        """Shell lines, comments included: paste them into one shell on one machine, or each group's
        line on that group's nodes."""
        one_node = all(group.nodes == 1 for group in self.groups)
        lines = [f"# the torchft Lighthouse, on {self.head}, first:", lighthouse_command(self.lighthouse_port)
                 + (" &" if one_node else "")]
        for index, group in enumerate(self.groups):
            where = "" if one_node else f" (on each of its {group.nodes} nodes; the first hosts its rendezvous)"
            lines += [f"# replica group {index}{where}:", group.command() + (" &" if one_node else "")]
        if one_node:  # job %1 is the Lighthouse: wait for the groups, then stop it
            lines.append("wait " + " ".join(f"%{index + 2}" for index in range(len(self.groups))) + "; kill %1")
        return lines


def plan_replica_launch(groups: int, nodes: int, procs_per_node: int, head: str, port: int, lighthouse_port: int,
                        train_args: list[str], max_restarts: int) -> ReplicaLaunch:
    """Split the job into `groups` torchrun jobs: whole nodes each, or on one node its processes
    (CUDA_VISIBLE_DEVICES gives each group its own GPUs)."""
    if groups < 2:
        raise UserError(f"--replica-groups {groups}: use at least 2 groups, or launch without --replica-groups")
    if not 0 < lighthouse_port < 65536:
        raise UserError(f"--lighthouse-port {lighthouse_port} is not a TCP port; pick one in 1-65535")
    if nodes == 1 and procs_per_node % groups:
        raise UserError(f"--procs-per-node {procs_per_node} does not split into {groups} replica groups on one node; "
                        f"pick a multiple of {groups}")
    if nodes > 1 and nodes % groups:
        raise UserError(f"--nodes {nodes} does not split into {groups} replica groups of whole nodes; pick a multiple "
                        f"of {groups}")
    lighthouse = f"{head}:{lighthouse_port}"
    plans = []
    for index in range(groups):
        args = [*train_args, "--set", f"faults.replica_groups={groups}", "--set", f"faults.replica_group={index}",
                "--set", f'faults.lighthouse="{lighthouse}"']
        if nodes == 1:
            plan = plan_launch(1, procs_per_node // groups, head, port, args, max_restarts)
            plan.visible_devices = list(range(index * plan.procs_per_node, (index + 1) * plan.procs_per_node))
        else:
            # Each group's own rendezvous on its first node: GROUP_HEAD is that node's address.
            plan = plan_launch(nodes // groups, procs_per_node, "$GROUP_HEAD", port + index, args, max_restarts)
            plan.run_id = f"colossus-group-{index}"
        plans.append(plan)
    return ReplicaLaunch(plans, head, lighthouse_port)


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
