"""Mixture of experts: a softmax router picks top_k of n_experts FFNs per token (Grok-1: 8, top-2).

Tokens are sorted by expert and each expert's tokens go through one grouped matmul, so no Python loop
runs over tokens and (on CPU, and on Hopper in bf16) none over experts. Expert weights are stacked
as [n_experts, ...] tensors so expert parallelism can shard their first dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from colossus.modelconfig import ModelConfig


@dataclass
class RouterStats:
    """What one MoE layer reports besides its output, for the losses computed outside the model: the
    load-balancing loss needs the experts' load, which may be counted over more than this call's tokens
    (the whole global batch: colossus.train.loss)."""

    mean_probs: torch.Tensor  # [n_experts] mean router probability over this call's tokens (with gradient)
    slots: torch.Tensor  # [n_experts] (token, expert) slots routed to each expert, float, no gradient
    z_loss: torch.Tensor  # router z-loss, unweighted (Zoph et al. 2022, ST-MoE, eq. 5)


def activation(ffn_type: str, gate: torch.Tensor) -> torch.Tensor:
    # Grok-1 uses jax.nn.gelu, whose default is the tanh approximation.
    return F.silu(gate) if ffn_type == "swiglu" else F.gelu(gate, approximate="tanh")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the CPU grouped matmul
    rejects the zero-stride gradients that broadcasting ops (e.g. sum) hand back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # torch._grouped_mm needs every operand's row stride to be a multiple of 16 bytes.
    if any(t.shape[-1] * t.element_size() % 16 for t in (x, weight)):
        return False
    if x.device.type == "cpu":
        return True
    # The CUDA kernel needs Hopper (sm90+) and bf16 operands.
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


@torch.compiler.disable  # runs eagerly inside compiled blocks: the grouped-mm meta kernel accepts only bf16
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Rows group_ends[e-1]:group_ends[e] of x (sorted by expert) times weight[e]: [M, d] x [E, d, f] -> [M, f]."""
    if _grouped_mm_supported(x, weight):
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight, offs=group_ends.to(torch.int32)))
    # Fallback: one matmul per expert (a host sync for the split sizes; no loop over tokens).
    sizes = torch.diff(group_ends, prepend=group_ends.new_zeros(1)).tolist()
    return torch.cat([chunk @ weight[e] for e, chunk in enumerate(torch.split(x, sizes))])


def local_shard(weight: torch.Tensor) -> torch.Tensor:
    """The part of a weight this rank computes with: expert or tensor parallelism turns expert
    weights into DTensors, and the grouped matmul runs on their local shard."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class GroupedExperts(nn.Module):
    """n_experts FFNs as stacked weights [experts, in, out]; computes tokens already sorted by expert.
    Expert parallelism wraps this module from outside (colossus.parallel) to send each token to the
    rank that holds its expert, so its first dimension is what gets sharded."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_type = cfg.ffn_type
        d, f, e = cfg.d_model, cfg.ffn_dim, cfg.n_experts
        self.w_in = nn.Parameter(torch.empty(e, d, f))  # the gate projection when gated
        self.w_up = nn.Parameter(torch.empty(e, d, f)) if cfg.ffn_type in ("geglu", "swiglu") else None
        self.w_out = nn.Parameter(torch.empty(e, f, d))

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """tokens [M, d] sorted by expert, counts [experts] tokens per expert -> [M, d]."""
        group_ends = torch.cumsum(counts, dim=0)
        # Autocast does not cast torch._grouped_mm's operands, and weights that FSDP's mixed precision
        # does not cover (experts sharded over every rank) stay fp32: compute in autocast's dtype if
        # it is on (as a Linear would), else in the tokens' dtype.
        device = tokens.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype
        weight = lambda w: local_shard(w).to(dtype)
        tokens = tokens.to(dtype)
        hidden = activation(self.ffn_type, grouped_matmul(tokens, weight(self.w_in), group_ends))
        if self.w_up is not None:
            hidden = hidden * grouped_matmul(tokens, weight(self.w_up), group_ends)
        return grouped_matmul(hidden, weight(self.w_out), group_ends)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg)
        if cfg.moe_balance == "bias":
            # DeepSeek-V3's auxiliary-loss-free balancing (Liu et al. 2024, section 2.1.2): a per-expert bias
            # added to the scores for choosing experts only, moved by the trainer after each step towards
            # balance (colossus.train.loss.update_router_bias). Saved in checkpoints, not trained.
            self.register_buffer("router_bias", torch.zeros(cfg.n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router in fp32 over all experts (Grok-1); returns gates [N, k], expert ids [N, k], the mean
        probability of each expert and the z-loss."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this linear in bf16
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        if cfg.moe_balance == "bias":
            experts = (probs + self.router_bias).topk(cfg.top_k, dim=-1).indices
            gates = probs.gather(-1, experts)  # the gates stay the plain probabilities
        else:
            gates, experts = probs.topk(cfg.top_k, dim=-1)
        if cfg.router_renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE's z-loss: mean squared log-partition
        return gates, experts, probs.mean(dim=0), z_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, cfg.d_model)
        gates, experts, mean_probs, z_loss = self.route(x)

        # Sort the N*k (token, expert) slots by expert; a stable sort keeps token order within an expert.
        sorted_experts, order = torch.sort(experts.reshape(-1), stable=True)
        token_of_slot = order // cfg.top_k
        # Slots per expert, from where each id starts in the sorted list (bincount would read the ids'
        # min and max back to the host: two syncs per layer on a GPU).
        ids = torch.arange(cfg.n_experts + 1, device=x.device, dtype=sorted_experts.dtype)
        counts = torch.searchsorted(sorted_experts, ids).diff()
        slot_gates = gates.reshape(-1)[order]
        if cfg.capacity_factor > 0:
            # Drop the slots past each expert's capacity (earliest tokens win), as GShard does.
            capacity = math.ceil(cfg.capacity_factor * x.shape[0] * cfg.top_k / cfg.n_experts)
            group_starts = torch.cumsum(counts, dim=0) - counts
            rank_in_expert = torch.arange(order.numel(), device=x.device) - group_starts[sorted_experts]
            slot_gates = slot_gates * (rank_in_expert < capacity)

        expert_out = self.experts(x[token_of_slot], counts)
        weighted = expert_out * slot_gates.unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, weighted.to(x.dtype))
        return out.reshape(shape), RouterStats(mean_probs, counts.detach().float(), z_loss)
