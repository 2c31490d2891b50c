"""The training loss, computed outside the model from its output: next-token cross-entropy in fp32,
plus the MoE's weighted load-balancing and router z-losses (Switch Transformer, ST-MoE).

Tensor parallelism with a vocabulary-parallel output hands over logits sharded on the vocabulary (a
DTensor); the cross-entropy then runs on the shards without gathering them, inside torch's
loss_parallel() for the forward and the backward (loss_context picks it from the logits).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from colossus.modelconfig import ModelConfig
from colossus.models.grok import ModelOutput, Transformer

IGNORE_INDEX = -100  # targets at padded positions (F.cross_entropy's default ignore_index)


@dataclass
class Loss:
    total: torch.Tensor  # what is backpropagated: cross-entropy + weighted MoE losses
    cross_entropy: torch.Tensor  # detached: what is reported as "loss"
    aux_loss: torch.Tensor | None = None  # detached, unweighted load-balancing loss (1.0 at perfect balance)
    z_loss: torch.Tensor | None = None  # detached, unweighted router z-loss


def loss_context(logits: torch.Tensor) -> AbstractContextManager:
    """loss_parallel() for vocabulary-sharded logits (enter it around the loss and its backward),
    else nothing."""
    return loss_parallel() if isinstance(logits, DTensor) else nullcontext()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-ignored targets, in fp32, as a plain tensor."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return ce.to_local() if isinstance(ce, DTensor) else ce  # replicated under loss_parallel


def expert_load(slots: torch.Tensor) -> torch.Tensor:
    """Each expert's fraction of the routed (token, expert) slots, per layer: [layers, experts]."""
    return slots / slots.sum(dim=-1, keepdim=True)


def load_balancing_loss(router_probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's loss, E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4), averaged over layers:
    f the experts' load (no gradient), P the mean router probabilities (with it)."""
    return router_probs.shape[-1] * (load * router_probs).sum(dim=-1).mean()


def training_loss(output: ModelOutput, targets: torch.Tensor, cfg: ModelConfig,
                  load: torch.Tensor | None = None) -> Loss:
    """Cross-entropy plus, for an MoE, the weighted load-balancing loss (of `load`, the experts' load over
    the global batch, when given; else of this call's own) and router z-loss. Under moe_balance = bias
    the routing bias balances the experts instead of a loss."""
    ce = cross_entropy(output.logits, targets)
    if output.router_probs is None:
        return Loss(ce, ce.detach())
    aux = load_balancing_loss(output.router_probs, load if load is not None else expert_load(output.expert_slots))
    total = ce + cfg.moe_aux_loss_coef * aux if cfg.moe_balance != "bias" else ce
    total = total + cfg.moe_z_loss_coef * output.z_loss
    return Loss(total, ce.detach(), aux.detach(), output.z_loss.detach())


@torch.no_grad()
def update_router_bias(model: Transformer, load: torch.Tensor, rate: float,
                       applied: torch.Tensor | bool = True) -> None:
    """DeepSeek-V3's balancing step (Liu et al. 2024, section 2.1.2): each expert's routing bias moves by
    `rate` towards balance, down where its load over the step was above the mean, up where below; not
    at all for a step whose update was skipped (`applied` false: a device flag, read without a sync).
    `load` has a row per block of the whole model; a pipeline stage holds some of the blocks."""
    for key, block in model.layers.items():
        bias = block.get_submodule("ffn").router_bias
        layer_load = load[int(key)]
        bias += rate * torch.sign(layer_load.mean() - layer_load) * torch.as_tensor(applied, device=bias.device)
