"""Expert parallelism: each of `ep` ranks holds n_experts / ep experts, and tokens travel to the rank
that holds their expert and back with two all-to-alls (GShard, Lepikhin et al. 2020, section 2.2).

The model's GroupedExperts module stays as it is: its weights become DTensors sharded on the expert
dimension over the ep mesh (so checkpoints reshard freely), and forward hooks around it dispatch the
tokens (sorted by global expert) and combine the results, with autograd through both exchanges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch import nn

from colossus.models.moe import GroupedExperts


class TokenExchange:
    """Dispatch (forward pre-hook) and combine (forward hook) for one GroupedExperts module."""

    def __init__(self, mesh: DeviceMesh, n_experts: int):
        self.group = mesh.get_group()
        self.ranks = mesh.size()
        self.local_experts = n_experts // self.ranks
        self._pending: list[tuple[torch.Tensor, list[int], list[int]]] = []

    def dispatch(self, module: nn.Module, args: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, counts = args
        # counts[e] for global expert e = rank * local_experts + local index; rank j receives row j.
        send_counts = counts.view(self.ranks, self.local_experts).contiguous()
        recv_counts = torch.empty_like(send_counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The exchange needs its split sizes on the host: one sync per MoE layer.
        send_sizes = send_counts.sum(dim=1).tolist()
        recv_sizes = recv_counts.sum(dim=1).tolist()
        received = all_to_all_single_autograd(tokens.contiguous(), recv_sizes, send_sizes, self.group)
        # Received tokens come grouped by source rank, then by local expert: regroup by local expert.
        local_expert = torch.arange(self.local_experts, device=tokens.device).repeat(self.ranks)
        order = torch.argsort(torch.repeat_interleave(local_expert, recv_counts.flatten()), stable=True)
        self._pending.append((order, send_sizes, recv_sizes))
        return received[order], recv_counts.sum(dim=0)

    def combine(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        order, send_sizes, recv_sizes = self._pending.pop()
        by_source = output[torch.argsort(order)]
        return all_to_all_single_autograd(by_source.contiguous(), send_sizes, recv_sizes, self.group)


def apply_expert_parallel(experts: GroupedExperts, ep_mesh: DeviceMesh, n_experts: int,
                          weights_mesh: DeviceMesh | None = None) -> None:
    """Shard the stacked expert weights on their first (expert) dimension over `ep_mesh` and hook the
    token exchange in. With tensor parallelism too, `weights_mesh` is the 2-D [ep, tp] mesh: each
    expert's hidden dimension is split over tp as well (expert tensor parallelism: Grok's 32,768-wide
    experts are wide enough for it to pay), and the tp ranks of an ep group exchange the same tokens."""
    from colossus.parallel.tensor import EXPERT_HIDDEN_DIM

    for name, hidden in EXPERT_HIDDEN_DIM.items():
        weight = getattr(experts, name)
        if weight is not None:
            placements = [Shard(0)] if weights_mesh is None else [Shard(0), Shard(hidden)]
            setattr(experts, name, nn.Parameter(distribute_tensor(weight.data, weights_mesh or ep_mesh, placements,
                                                                  src_data_rank=None)))
    exchange = TokenExchange(ep_mesh, n_experts)
    experts.register_forward_pre_hook(exchange.dispatch)
    experts.register_forward_hook(exchange.combine)
