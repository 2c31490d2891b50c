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
from colossus.models.grok import ModelOutput

IGNORE_INDEX = -100  # targets at padded positions (F.cross_entropy's default ignore_index)


@dataclass
class Loss:
    total: torch.Tensor  # what is backpropagated: cross-entropy + weighted MoE losses
    cross_entropy: torch.Tensor  # detached: what is reported as "loss"


def loss_context(logits: torch.Tensor) -> AbstractContextManager:
    """loss_parallel() for vocabulary-sharded logits (enter it around the loss and its backward),
    else nothing."""
    return loss_parallel() if isinstance(logits, DTensor) else nullcontext()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-ignored targets, in fp32, as a plain tensor."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return ce.to_local() if isinstance(ce, DTensor) else ce  # replicated under loss_parallel


def training_loss(output: ModelOutput, targets: torch.Tensor, cfg: ModelConfig) -> Loss:
    ce = cross_entropy(output.logits, targets)
    total = ce
    if output.aux_loss is not None:
        total = ce + cfg.moe_aux_loss_coef * output.aux_loss + cfg.moe_z_loss_coef * output.z_loss
    return Loss(total, ce.detach())
