"""AdamW and its learning-rate schedule (linear warmup, then cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from colossus.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norm scales are left undecayed, as in GPT-3 and Llama.
    The fused kernel (CPU and CUDA) steps plain parameters and FSDP's DTensor shards alike, in place and
    without the foreach kernels' temporaries the size of the state (a third more memory at the step);
    foreach is the fallback for a model mixing the two kinds. fused=False is the plain per-tensor loop
    (a reference for benchmarks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    one_kind = len({isinstance(p, DTensor) for p in params}) <= 1
    if not fused:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)
    use_fused = one_kind and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=use_fused, foreach=None if use_fused else True)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warmup over warmup_steps, then
    cosine from 1 to min_lr_ratio at the last step (Loshchilov & Hutter 2017, without restarts)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
