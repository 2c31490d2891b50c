"""Context parallelism: each sequence split over `cp` ranks, for contexts too long for one rank's
activations (Llama 3 trained its long-context stage so: "The Llama 3 Herd of Models", Grattafiori
et al. 2024, section 3.3.2).

The split is balanced for causal attention: the sequence is cut into 2 cp chunks and rank r holds chunk
r and its mirror 2 cp - 1 - r, so every rank has as many early (cheap) as late (costly) queries. Each
rank's tokens keep their global positions (RoPE and the causal mask use them), its loss is the mean
over its own targets, and FSDP, sharding over the cp ranks as over data-parallel ones, averages the
gradients over them.

Attention gathers the keys and values of the whole sequence from the cp ranks (as torch's
FlexAttention context parallel and Llama 3's all-gather variant do) and attends its own queries to
them with the mask of their positions, so Grok's soft-cap 30 tanh(s/30) is applied to exactly the
scores one rank would compute; the backward sums the keys' and values' gradients back to their owners. On a GPU the cap stays a FlexAttention score_mod (with a block mask of the positions).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from colossus.models.grok import Transformer


@functools.cache
def chunk_positions(seq_len: int, cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """Positions of context-parallel rank `rank`'s tokens: chunk `rank` and chunk 2 cp - 1 - rank of
    2 cp equal chunks. Cached: the same tensor every step (the attention's masks are built once per tensor)."""
    chunk = seq_len // (2 * cp)
    first, mirror = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(mirror, mirror + chunk)]).to(device)


@functools.cache
def gathered_positions(seq_len: int, cp: int, device: torch.device) -> torch.Tensor:
    """Positions of the keys after the all-gather: every rank's, in rank order."""
    return torch.cat([chunk_positions(seq_len, cp, rank, device) for rank in range(cp)])


def split_sequences(tokens: torch.Tensor, targets: torch.Tensor, cp: int,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's part of [batch, seq] tokens and targets, and its positions in the sequence."""
    positions = chunk_positions(tokens.shape[1], cp, rank, tokens.device)
    return tokens[:, positions], targets[:, positions], positions


class GatherSequence(torch.autograd.Function):
    """[batch, heads, tokens, dim] of every cp rank, concatenated on the tokens in rank order; the backward
    sums each part's gradient over the ranks and hands each rank its own (a reduce-scatter).

    Blocking c10d calls, not torch's functional collectives: on gloo, under the first step's FLOP
    counter (a dispatch mode), their asynchronous output once corrupted the heap ("malloc(): unaligned
    tcache chunk detected", a rank of cp=2 x tp=2 x dp_shard=2 in a CI run); torch.distributed.nn's
    all_gather cannot run its gloo backward on a subgroup."""

    @staticmethod
    def forward(ctx, part: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(part) for _ in range(ctx.size)]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter: all-reduce, keep this rank's part
            total = grad.contiguous().clone()
            dist.all_reduce(total, group=ctx.group)
            return total.chunk(ctx.size, dim=2)[ctx.rank].contiguous(), None
        stacked = torch.stack(grad.chunk(ctx.size, dim=2)).contiguous()  # [ranks, batch, heads, tokens, dim]
        mine = torch.empty_like(stacked[0])
        dist.reduce_scatter_tensor(mine, stacked, group=ctx.group)
        return mine, None


class ContextParallelAttention(nn.Module):
    """The attention core of a context-parallel model: the keys and values of the whole sequence
    gathered from the cp ranks, this rank's queries attended to them. Called without positions, or with
    the keys' own (generation: every rank holds the whole context, or a KV cache holds it), it is the
    plain core."""

    def __init__(self, core: nn.Module, mesh: DeviceMesh):
        super().__init__()
        self.core = core
        self.cp = mesh.size()
        self.group = mesh.get_group()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None = None,
                k_positions: torch.Tensor | None = None) -> torch.Tensor:
        if q_positions is None or k_positions is not None:
            return self.core(q, k, v, q_positions, k_positions)
        keys, values = GatherSequence.apply(k, self.group), GatherSequence.apply(v, self.group)
        return self.core(q, keys, values, q_positions, gathered_positions(q.shape[2] * self.cp, self.cp, q.device))


def apply_context_parallel(model: Transformer, cp_mesh: DeviceMesh) -> None:
    """Wrap every block's attention core (before recomputation wraps it, so a recomputed core gathers
    again in the backward)."""
    for block in model.layers.values():
        block.attention.core = ContextParallelAttention(block.attention.core, cp_mesh)
