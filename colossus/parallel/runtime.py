"""This process's place in a run: device, process group, layout and mesh.

Launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) it joins the process group, NCCL on GPUs (with
gloo for host tensors) and gloo on CPUs; launched plainly it is a world of one and touches no torch.distributed state.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import NoReturn

import torch
import torch.distributed as dist

from colossus.config import RunConfig, layout_from_config
from colossus.errors import UserError
from colossus.layout import Layout, check_fits
from colossus.parallel.context import split_sequences
from colossus.parallel.mesh import Meshes, build_mesh
from colossus.parallel.parallelize import missing_features


@dataclass
class Runtime:
    device: torch.device
    layout: Layout
    mesh: Meshes | None  # None for a world of one
    rank: int
    replica_groups: int = 1  # torchft replica groups the job is split into ([faults] replica_groups); this
    # process's layout and mesh are its own group's (dp_replicate and the batch divided by this)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp.get_local_rank() if self.mesh is not None else 0

    def batch_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of a per-rank value over the ranks that hold different tokens of the batch: data-parallel
        ranks and context-parallel ones (gloo has no AVG: sum, then divide)."""
        return self.batch_sum(tensor) / (self.layout.dp * self.layout.cp)

    def batch_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of a per-rank tensor over the ranks that hold different tokens of the batch (on every one)."""
        if self.mesh is None or self.layout.dp * self.layout.cp == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mesh.tokens.get_group())
        return total

    def sequence_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of a per-rank tensor over the context-parallel ranks, which hold parts of the same sequences."""
        if self.layout.cp == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mesh.cp.get_group())
        return total

    def split_sequences(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None]:
        """This rank's part of each sequence under context parallelism, with its positions (None: whole)."""
        if self.layout.cp == 1:
            return tokens, targets, None
        return split_sequences(tokens.to(self.device), targets.to(self.device), self.layout.cp,
                               self.mesh.cp.get_local_rank())

    def sum_over_ranks(self, value: float) -> float:
        """A host number summed over every rank (the world's total of a per-rank count)."""
        if self.mesh is None:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # the default group: every rank
        return float(total.item())

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def close(self, finished: bool) -> None:
        if dist.is_initialized():
            if finished:
                # Let every rank finish its last collective before any tears the group down: a rank
                # that exits while gloo still serves a peer can abort ("terminate called ...") under
                # load. Only after a clean finish: a failing rank must not wait for healthy ones.
                dist.barrier()
            dist.destroy_process_group()


def exit_without_teardown(code: int) -> NoReturn:
    """End a process that was a rank of a process group and finished cleanly (every rank past its last
    collective, the group destroyed, checkpoints committed, logs closed), skipping the interpreter's
    teardown.

    destroy_process_group does not stop the gloo groups a DeviceMesh made: the meshes (and torch's
    caches of them) keep them alive, and after a run's clean close each rank still has about ten gloo
    event loops and twenty worker threads running (counted in /proc/self/task). Python then tears
    them down during interpreter finalization, and a worker whose pending work still holds a tensor
    takes the GIL from a dying interpreter: SIGABRT, "terminate called without an active exception"
    with no Python frame (a stress round of the tensor-parallel test; pytorch/pytorch#190489 and the
    analysis in #179291). Output is flushed first. A rank that failed exits the ordinary way, so that
    background writes it leaves behind are still waited for."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def pick_device(config: RunConfig) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                        "launch at most one process per GPU (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def resolve_layout(config: RunConfig, world_size: int, device_type: str) -> Layout:
    """The config's layout on this world, checked: its product is the world size, it divides the model
    and the batch, and the trainer can run it (one line naming what is wrong, before anything is built)."""
    layout = layout_from_config(config, world_size, device_type)
    missing = missing_features(layout)
    lacks = f"; the trainer also lacks {' and '.join(missing)} yet" if missing else ""
    if layout.world_size != world_size:
        raise UserError(
            f"the layout {layout.degrees()} needs {layout.world_size:,} processes, but {world_size:,} "
            f"{'was' if world_size == 1 else 'were'} launched; launch {layout.world_size:,} (torchrun --nproc-per-node "
            f"x --nnodes) or change [parallel] (parallel.dp_shard=-1 takes the rest){lacks}")
    check_fits(layout, config.model)
    if layout.pp_schedule == "zbv" and layout.pp > 1 and config.train.compile:
        raise UserError("train.compile cannot run parallel.pp_schedule=zbv: the zero-bubble schedule splits each "
                        "backward into input and weight gradients, which compiled blocks do not; set "
                        "train.compile=false or pp_schedule=interleaved-1f1b")
    if missing:
        raise UserError(f"the trainer cannot run {' nor '.join(missing)} yet; plan it with `colossus plan`, or "
                        "choose a layout without it")
    return layout


def setup_runtime(config: RunConfig) -> Runtime:
    """Check the layout against the world size and the model, then join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(config)
    groups = max(1, config.faults.replica_groups)
    layout = group_layout(resolve_layout(config, world_size * groups, device.type), groups)
    if world_size == 1:
        return Runtime(device, layout, None, 0, groups)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # gloo beside NCCL for the few host-side collectives (the preemption flag is a CPU tensor):
        # a default group with only NCCL rejects CPU tensors ("No backend type associated with ... cpu").
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, **restart_safe_store(world_size))
    else:
        dist.init_process_group("gloo", **restart_safe_store(world_size))
    return Runtime(device, layout, build_mesh(layout, device.type), dist.get_rank(), groups)


def group_layout(layout: Layout, groups: int) -> Layout:
    """One replica group's part of the job's layout: its share of the replicas and of the batch."""
    if groups == 1:
        return layout
    return replace(layout, dp_replicate=layout.dp_replicate // groups, gbs=layout.gbs // groups)


def restart_safe_store(world_size: int) -> dict:
    """Arguments for init_process_group that keep a restarted job off its dead predecessor's keys.

    torchrun's c10d rendezvous shares one TCPStore across restarts, so after `--max-restarts` kicks
    in, a rank can read the previous attempt's published addresses and connect to a dead process
    (pytorch/pytorch#135712: "Connection refused" in gloo's connectFullMesh or NCCL init). With one
    agent the restart count is the same on every rank, so it names a fresh key space per attempt.
    With several agents it is not (healthy nodes do not count a peer's failure); there the agents
    must run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which `colossus launch` and the Slurm script
    set, and this returns no arguments (env:// as usual)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return {"store": dist.PrefixStore(f"colossus/attempt-{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": world_size}
