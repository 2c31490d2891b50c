"""The exact launch commands for a run on N nodes: torchrun with c10d rendezvous, one agent per node.

Printed rather than executed, so they can be pasted into a shell, a job script or a cluster
scheduler; scripts/slurm/train.sbatch does the same under Slurm.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
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
    store_elsewhere: bool = False  # the rendezvous store runs apart from the agents (colossus rendezvous)

    def torchrun_options(self) -> list[str]:
        """torchrun's options, the program excluded."""
        parts = [f"--nproc-per-node={self.procs_per_node}"]
        if self.nodes == 1 and not self.store_elsewhere:
            parts.append("--standalone")
        else:
            parts += [f"--nnodes={self.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.head}:{self.port}",
                      f"--rdzv-id={self.run_id}"]
            if self.store_elsewhere:
                parts.append("--rdzv-conf=is_host=false")
        if self.max_restarts:
            parts.append(f"--max-restarts={self.max_restarts}")
        return parts

    def command(self) -> str:
        """The torchrun line to run on one node (identical on every node with c10d rendezvous)."""
        command = shlex.join(["torchrun", *self.torchrun_options(), "-m", "colossus.train", *self.train_args])
        if self.visible_devices is not None:
            command = f"CUDA_VISIBLE_DEVICES={','.join(map(str, self.visible_devices))} " + command
        if (self.nodes > 1 or self.store_elsewhere) and self.max_restarts:
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
# torchrun's rendezvous drops a node whose keep-alive is this old, and a spare waiting in it takes the
# node's place: torchrun's defaults, keep_alive_interval 5 s x keep_alive_max_attempt 3
# (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py).
RENDEZVOUS_KEEP_ALIVE_S = 5 * 3


def serve_rendezvous(port: int, groups: int) -> list:
    """The replica groups' rendezvous stores, one TCPStore per group on ports port .. port + groups - 1,
    kept in this process. torchrun's c10d rendezvous keeps its state in a store that by default lives in
    the agent on the group's first node: losing that node would lose the group's rendezvous, and with it
    torchrun's restarts and the spare nodes waiting in it. Here the store lives beside the Lighthouse."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    if groups < 1 or not 0 < port <= 65536 - groups:
        raise UserError(f"--port {port} and --groups {groups}: need 1 or more groups on TCP ports up to 65535")
    ports = range(port, port + groups)
    for each in ports:  # TCPStore would share a port in use (SO_REUSEPORT) rather than fail
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", each))
            except OSError:
                raise UserError(f"port {each} is in use: pick a --port with {groups} free ports from it") from None
    return [TCPStore("0.0.0.0", each, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
            for each in ports]


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
    spare_nodes: int = 0  # per group, beside its nodes: hot spares waiting in its rendezvous

    def commands(self) -> list[str]:
        """Shell lines, comments included: paste them into one shell on one machine, or each group's
        line on that group's nodes."""
        one_node = not self.groups[0].store_elsewhere
        lines = [f"# the torchft Lighthouse, on {self.head}, first:", lighthouse_command(self.lighthouse_port) + " &"]
        if not one_node:
            lines += [f"# and the groups' rendezvous, on {self.head} too (it outlives any group's node):",
                      shlex.join(["colossus", "rendezvous", f"--port={self.groups[0].port}",
                                  f"--groups={len(self.groups)}"]) + " &"]
        for index, group in enumerate(self.groups):
            where = "" if one_node else f" (on each of its {group.nodes} nodes"
            if self.spare_nodes:
                where += (f" and its {self.spare_nodes} spare node{'s' * (self.spare_nodes > 1)}: they wait in the "
                          f"rendezvous, and one takes the place of a node that dies")
            where += "" if one_node else ")"
            lines += [f"# replica group {index}{where}:", group.command() + (" &" if one_node else "")]
        if one_node:  # job %1 is the Lighthouse: wait for the groups, then stop it
            lines.append("wait " + " ".join(f"%{index + 2}" for index in range(len(self.groups))) + "; kill %1")
        return lines


def plan_replica_launch(groups: int, nodes: int, procs_per_node: int, head: str, port: int, lighthouse_port: int,
                        train_args: list[str], max_restarts: int, spare_nodes: int = 0) -> ReplicaLaunch:
    """Split the job into `groups` torchrun jobs: whole nodes each (every group's rendezvous on the head
    node, with `spare_nodes` more nodes per group waiting in it), or on one node its processes
    (CUDA_VISIBLE_DEVICES gives each group its own GPUs)."""
    if spare_nodes < 0 or (spare_nodes and nodes == 1):
        raise UserError(f"--spare-nodes {spare_nodes}: a spare is a whole node waiting beside a group's nodes; use it "
                        f"with groups of whole nodes (--nodes a multiple of --replica-groups)")
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
            # Each group's own rendezvous, its store served on the head node (colossus rendezvous).
            plan = plan_launch(nodes // groups, procs_per_node, head, port + index, args, max_restarts)
            plan.run_id, plan.store_elsewhere = f"colossus-group-{index}", True
        plans.append(plan)
    return ReplicaLaunch(plans, head, lighthouse_port, spare_nodes)


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
