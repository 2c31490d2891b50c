"""Validation: the mean cross-entropy over a fixed set of held-out batches (the same text at every
evaluation, whatever the layout), every `interval` steps and at the last one."""

from __future__ import annotations

import torch

from colossus.models.grok import Transformer
from colossus.parallel.pipeline import Pipeline
from colossus.parallel.runtime import Runtime
from colossus.train.loss import cross_entropy, loss_context
from colossus.train.step import autocast


class Evaluator:
    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], interval: int, total_steps: int,
                 runtime: Runtime, precision: str, pipeline: Pipeline | None = None):
        self.batches, self.interval, self.total_steps = batches, interval, total_steps
        self.runtime, self.precision, self.pipeline = runtime, precision, pipeline

    def should_evaluate(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> float:
        """Mean validation loss over this rank's share of the batches (its part of each sequence under
        context parallelism), averaged over the ranks holding the others."""
        device = self.runtime.device
        model.eval()
        losses = []
        for x, y in self.batches:
            x, y, positions = self.runtime.split_sequences(x.to(device), y.to(device))
            with autocast(device, self.precision):
                if self.pipeline is not None:
                    losses.append(self.pipeline.validation_loss(x, y, x.shape[1] if positions is None else positions))
                    continue
                logits = model(x, **({} if positions is None else {"positions": positions})).logits
            with loss_context(logits):
                losses.append(cross_entropy(logits, y))
        model.train()
        return self.runtime.batch_mean(torch.stack(losses).mean()).item()
