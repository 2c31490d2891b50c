"""AdamW and its learning-rate schedule (linear warmup, then cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
from torch import nn

from colossus.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norm scales are left undecayed, as in GPT-3 and Llama.
    The fused kernel runs on CPU and CUDA; foreach is the fallback for DTensor parameters.
    fused=False is the plain per-tensor loop (a reference for benchmarks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    plain_tensors = all(type(p) is nn.Parameter or type(p.data) is torch.Tensor for p in params)
    if not fused:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        fused=plain_tensors and device.type in ("cpu", "cuda"), foreach=None if plain_tensors else True,
    )


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
