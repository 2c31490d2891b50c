"""Validation: the mean cross-entropy over a fixed set of held-out batches (the same text at every
evaluation, whatever the layout), every `interval` steps and at the last one."""

from __future__ import annotations

import torch

from colossus.models.grok import Transformer
from colossus.parallel.runtime import Runtime
from colossus.train.loss import cross_entropy, loss_context
from colossus.train.step import autocast


class Evaluator:
    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], interval: int, total_steps: int,
                 runtime: Runtime, precision: str):
        self.batches, self.interval, self.total_steps = batches, interval, total_steps
        self.runtime, self.precision = runtime, precision

    def should_evaluate(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> float:
        """Mean validation loss over this rank's share of the batches, averaged over the data-parallel ranks."""
        device = self.runtime.device
        model.eval()
        losses = []
        for x, y in self.batches:
            with autocast(device, self.precision):
                logits = model(x.to(device)).logits
            with loss_context(logits):
                losses.append(cross_entropy(logits, y.to(device)))
        model.train()
        return self.runtime.dp_mean(torch.stack(losses).mean()).item()
