"""The exact launch commands for a run on N nodes: torchrun with c10d rendezvous, one agent per node.

Printed rather than executed, so they can be pasted into a shell, a job script or a cluster
scheduler; scripts/slurm/train.sbatch does the same under Slurm.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

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
