"""Fault-tolerant replica groups, on torchft: the outer data-parallel dimension split into groups that
each run as their own torchrun job, so that a failed GPU restarts one group, not the whole job.

Every step starts with a quorum from torchft's Lighthouse: the groups that are alive now. A group that
(re)starts behind the others is brought to the current step inside that quorum by torchft's checkpoint
transport, which copies a live peer's whole training state (model, optimizer, schedule, data position,
counters, RNG) to it: no storage read. After the backward, the gradients are averaged over the groups
of the quorum by torchft's managed process group, and the optimizer steps only if torchft commits the
step on every group (a peer that died during the step makes it run again with the ones that are left).
Inside a group FSDP, tp, ep, cp and pp run as without replica groups. torchft does all of the
protocol; this module only connects it to the trainer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from colossus.config import FaultsConfig
from colossus.errors import UserError

# Quorums, connections and state transfers wait this long (torchft's own default): a quorum may wait
# the Lighthouse's join timeout for a late group, and a transfer grows with the model.
QUORUM_TIMEOUT_S = 60.0


@dataclass
class Membership:
    """Who takes part in a step: this group is `participant` of `participants`."""

    participant: int
    participants: int
    healed_from: int | None = None  # the step this group was at before a peer's state brought it up to date
    quorum_s: float = 0.0  # the quorum's time, the state transfer included
    transfer_s: float = 0.0  # receiving and loading a peer's state, when it healed


def lighthouse_address(configured: str) -> str:
    """The Lighthouse's URL from faults.lighthouse or $TORCHFT_LIGHTHOUSE (host:port gets http://)."""
    address = configured or os.environ.get("TORCHFT_LIGHTHOUSE", "")
    if not address:
        raise UserError("faults.replica_groups needs a torchft Lighthouse: set faults.lighthouse = \"HOST:PORT\" (or "
                        "$TORCHFT_LIGHTHOUSE) to the one colossus launch --replica-groups starts")
    return address if "://" in address else f"http://{address}"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """One line naming the address when no Lighthouse answers there (torchft itself would wait its whole
    connect timeout and then fail with a traceback)."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UserError(f"faults.lighthouse = {address!r} is not HOST:PORT or http://HOST:PORT; fix it")
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"the torchft Lighthouse at {address} cannot be reached ({exc.strerror or exc}); start it first "
                        "(colossus launch --replica-groups prints its command) or fix faults.lighthouse") from None


def group_store(group_world: int) -> tuple[str, int, dist.TCPStore | None]:
    """A TCPStore for this group's torchft Manager, hosted by the group's rank 0 on a free port and new
    for every attempt (torchrun's own store outlives a restart, with the dead attempt's keys in it).
    Other groups reach it too: the cross-group process group meets in the first group's store. Returns
    (host, port, the store on rank 0, which must live as long as the process)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        shared: list[Any] = [None]
        dist.broadcast_object_list(shared, src=0)
        return (*shared[0], None)
    host = socket.gethostname()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    if group_world > 1:
        dist.broadcast_object_list([(host, store.port)], src=0)
    return host, store.port, store


class ReplicaGroups:
    """This group's torchft Manager, and the three things a step asks of it: start (the quorum, and the
    peer's state when this group is behind), average the gradients, commit."""

    def __init__(self, faults: FaultsConfig, device: torch.device, step: int,
                 state_dict: Callable[[], dict], load_state_dict: Callable[[dict], None]):
        address = lighthouse_address(faults.lighthouse)  # checked before the run began (trainer.train)
        # torchft logs every quorum and commit at INFO (its Rust side reads RUST_LOG): keep warnings only,
        # unless the user asked for more. The run's own events say who took part in each step.
        os.environ.setdefault("RUST_LOG", "warn")
        logging.getLogger("torchft").setLevel(logging.ERROR)
        from torchft import Manager
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        timeout = timedelta(seconds=faults.replica_timeout_s)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        host, port, self.store = group_store(world)
        pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self.group, self.groups = faults.replica_group, faults.replica_groups
        # Synchronous quorum: the step's membership (and so its data) is known before the batch is drawn,
        # and a group that heals does so before its forward. init_sync off: every group starts from the
        # same seed or the same checkpoint, so step 0 needs no transfer.
        kill = faults.inject_kill_in_recovery and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 1
        long_wait = timedelta(seconds=QUORUM_TIMEOUT_S)
        self.transport = timed_transport(kill)(timeout=long_wait, num_chunks=0)
        self.loaded_s = 0.0

        def load_timed(state: dict) -> None:
            loading = time.perf_counter()
            load_state_dict(state)
            self.loaded_s += time.perf_counter() - loading

        self.manager = Manager(pg=pg, checkpoint_transport=self.transport, load_state_dict=load_timed, state_dict=state_dict,
                               min_replica_size=faults.min_replicas, use_async_quorum=False, timeout=timeout,
                               quorum_timeout=long_wait, connect_timeout=long_wait, rank=rank, world_size=world,
                               store_addr=host, store_port=port, lighthouse_addr=address,
                               replica_id=f"colossus_group_{faults.replica_group}", init_sync=False)
        self.manager.load_state_dict({"step": step, "batches_committed": 0})

    def start_step(self, wait_for_all: float = 0.0) -> Membership:
        """The quorum for the next step; when this group is behind, the live peer's state is loaded
        (through load_state_dict) before this returns. `wait_for_all`: seconds to keep asking while some
        groups are missing (a run's first step, while the other jobs are still starting), unless a peer was
        ahead (the run is under way: this group came back on a spare node)."""
        deadline = time.perf_counter() + wait_for_all
        membership = self._quorum()
        while (membership.participants < self.groups and membership.healed_from is None
               and time.perf_counter() < deadline):
            time.sleep(0.2)
            membership = self._quorum()
        return membership

    def _quorum(self) -> Membership:
        before, started = self.manager.current_step(), time.perf_counter()
        self.transport.received_s = self.loaded_s = 0.0
        self.manager.start_quorum()
        participant = self.manager.participating_rank()
        membership = Membership(participant if participant is not None else 0, self.manager.num_participants(),
                                quorum_s=time.perf_counter() - started)
        if self.manager.current_step() != before:
            membership.healed_from = before
            membership.transfer_s = self.transport.received_s + self.loaded_s
        return membership

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Average the tensors (gradients: local shards under FSDP) over the step's groups, in place:
        one all-reduce per dtype. Nothing raises on a peer's failure: the step then does not commit."""
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in local:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(group)
            self.manager.allreduce(flat).wait()
            for tensor, averaged in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                tensor.copy_(averaged)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the step's groups (the experts' load of the whole step's batch)."""
        from torch.distributed import ReduceOp

        total = tensor.detach().clone()
        self.manager.allreduce(total, reduce_op=ReduceOp.SUM).wait()
        return total

    def commit(self) -> bool:
        """Whether every group of the quorum finished the step: only then may the optimizer step."""
        return self.manager.should_commit()

    def close(self) -> None:
        self.manager.shutdown(wait=False)


def to_transport(state: Any) -> Any:
    """A state dict with each DTensor replaced by this rank's local shard: the transport copies plain
    tensors, and the same rank of every group holds the same shards."""
    if isinstance(state, dict):
        return {key: to_transport(value) for key, value in state.items()}
    return state.to_local() if isinstance(state, DTensor) else state


def from_transport(received: Any, template: Any) -> Any:
    """A received state dict with the local shards made DTensors again, placed as this rank's own
    state (`template`) places them."""
    if isinstance(received, dict):
        return {key: from_transport(value, template.get(key) if isinstance(template, dict) else None)
                for key, value in received.items()}
    if isinstance(template, DTensor) and isinstance(received, torch.Tensor):
        return DTensor.from_local(received.to(template.device), template.device_mesh, template.placements,
                                  shape=template.shape, stride=template.stride())
    return received


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """sha256 of this rank's weights and optimizer state (local shards, in parameter order): equal on two
    replica groups exactly when they hold the same state, bit for bit."""
    digest = hashlib.sha256()
    for param in model.parameters():
        tensors = [param] + [value for _, value in sorted(optimizer.state.get(param, {}).items())
                             if isinstance(value, torch.Tensor)]
        for tensor in tensors:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            digest.update(local.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def timed_transport(kill_while_receiving: bool = False) -> type:
    """torchft's HTTP checkpoint transport, timing each receive (received_s); with
    `kill_while_receiving` (faults.inject_kill_in_recovery) a receive SIGKILLs its own process 50 ms in."""
    from torchft.checkpointing.http_transport import HTTPTransport

    class TimedTransport(HTTPTransport):
        received_s = 0.0

        def recv_checkpoint(self, *args, **kwargs):
            if kill_while_receiving:
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
            receiving = time.perf_counter()
            state = super().recv_checkpoint(*args, **kwargs)
            self.received_s += time.perf_counter() - receiving
            return state

    return TimedTransport
