"""One training step: forward_backward over a rank's micro-batches, then optimizer_step.

Nothing here reads a tensor back to the host: the loss, the gradient norm and the skip flag stay on
the device until the caller chooses to read them (the NaN guard reads the flag one step late).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from colossus.models.grok import Transformer
from colossus.parallel.parallelize import clip_grad_norm
from colossus.parallel.pipeline import Pipeline
from colossus.train.loss import expert_load, loss_context, training_loss, update_router_bias


@dataclass
class StepResult:
    loss: torch.Tensor  # mean cross-entropy over the step's sequences (a 0-d tensor: no host sync)
    grad_norm: torch.Tensor
    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    expert_load: torch.Tensor | None  # [n_layers, n_experts]: each expert's share of the step's routed slots
    skipped: torch.Tensor | bool = False  # the gradient was not finite: no update was applied (a 0-d bool
    # tensor, so that reading it, the only host sync of a step, is the caller's choice)
    committed: bool = True  # False: the replica groups did not all finish the step; nothing was applied


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward's autocast for train.precision: bf16 matmuls over fp32 weights, or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward_backward(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int,
                     device: torch.device, precision: str, poison: bool = False,
                     sum_over_dp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                     positions: torch.Tensor | None = None, pipeline: Pipeline | None = None,
                     sum_over_cp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> StepResult:
    """Gradients of this rank's share of the global batch, accumulated over micro-batches of
    `micro_batch` sequences (a smaller share is one micro-batch); `poison` makes the loss NaN (for
    testing the NaN guard). The returned result has no gradient norm yet. `positions`: where this
    rank's tokens sit in their sequences, when it holds a part of each (context parallelism);
    `pipeline`: this rank's pipeline stages, when the model is split into them.

    An MoE balanced over the global batch (model.moe_balance) takes the experts' load summed over this
    step's micro-batches and over the data-parallel ranks (`sum_over_dp`): with one micro-batch the
    forward's own counts, all-reduced; with more, a routing pass without gradients over all of them
    first (one more forward: the loss is then the same for every micro-batch split). Balanced per
    micro-batch, the load is the whole micro-batch's: summed over the context-parallel ranks
    (`sum_over_cp`) that hold parts of its sequences."""
    if pipeline is not None:
        if pipeline.router is not None:
            pipeline.router.sum_over_cp = sum_over_cp
        return _pipeline_forward_backward(pipeline, inputs, targets, device, precision, poison, sum_over_dp, positions)
    cfg = model.cfg
    n_micro = inputs.shape[0] // micro_batch if inputs.shape[0] >= micro_batch else 1
    micro_batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                     for x, y in zip(inputs.chunk(n_micro), targets.chunk(n_micro))]
    where = {} if positions is None else {"positions": positions}
    global_load = cfg.is_moe and cfg.moe_balance == "global_batch"
    load = None
    if global_load and n_micro > 1:
        with torch.no_grad(), autocast(device, precision):
            slots = sum(model(x, **where).expert_slots for x, _ in micro_batches)
        load = expert_load(sum_over_dp(slots))
    loss_sum = aux_sum = z_sum = slot_sum = None
    for x, y in micro_batches:
        with autocast(device, precision):
            out = model(x, **where)
        if global_load and n_micro == 1:
            load = expert_load(sum_over_dp(out.expert_slots))
        elif not global_load and positions is not None and out.expert_slots is not None:
            load = expert_load(sum_over_cp(out.expert_slots))
        with loss_context(out.logits):
            loss = training_loss(out, y, cfg, load)
            total = loss.total * float("nan") if poison else loss.total
            (total / n_micro).backward()
        loss_sum = loss.cross_entropy if loss_sum is None else loss_sum + loss.cross_entropy
        if loss.aux_loss is not None:
            aux_sum = loss.aux_loss if aux_sum is None else aux_sum + loss.aux_loss
            z_sum = loss.z_loss if z_sum is None else z_sum + loss.z_loss
            slot_sum = out.expert_slots if slot_sum is None else slot_sum + out.expert_slots
    mean = (lambda t: None if t is None else t / n_micro)
    loss_mean = loss_sum / n_micro if not poison else torch.full((), float("nan"), device=device)
    step_load = None
    if slot_sum is not None:  # the load this step saw: the whole global batch's where it was counted
        step_load = load if load is not None else expert_load(
            sum_over_dp(slot_sum) if cfg.moe_balance == "bias" else sum_over_cp(slot_sum))
    return StepResult(loss_mean, torch.zeros((), device=device), mean(aux_sum), mean(z_sum), step_load)


def _pipeline_forward_backward(pipeline: Pipeline, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
                               precision: str, poison: bool, sum_over_dp: Callable[[torch.Tensor], torch.Tensor],
                               positions: torch.Tensor | None) -> StepResult:
    """forward_backward through pipeline stages: the schedule runs the micro-batches, each stage adds its
    routers' losses, and the reported figures are gathered from the stages that hold them."""
    cfg = pipeline.model.cfg
    x, y = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    sequence = x.shape[1] if positions is None else positions
    router = pipeline.router
    if router is not None:
        router.load = None
        if cfg.moe_balance == "global_batch":
            with autocast(device, precision):
                slots = pipeline.routed_slots(list(x.chunk(pipeline.micro_batches)), sequence)
            router.load = expert_load(pipeline.sum_over_pipeline(sum_over_dp(slots)))
    with autocast(device, precision):
        pipeline.run_schedule(x, y, sequence, poison)
    loss, aux, z, slots = pipeline.reported()
    if poison:
        loss = torch.full((), float("nan"), device=device)
    step_load = None
    if slots is not None:
        step_load = router.load if router.load is not None else expert_load(
            sum_over_dp(slots) if cfg.moe_balance == "bias" else pipeline.router.sum_over_cp(slots))
    return StepResult(loss, torch.zeros((), device=device), aux, z, step_load)


def optimizer_step(model: Transformer, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float,
                   pipeline: Pipeline | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, step and advance the schedule; returns (gradient norm, skipped). A gradient whose norm is
    not finite applies no update. The norm is global (the same on every rank), so all ranks agree."""
    grad_norm = clip_grad_norm(list(model.parameters()), grad_clip, **(pipeline.norm_arguments() if pipeline else {}))
    not_finite = ~torch.isfinite(grad_norm)
    # Read from the param groups, not the defaults: loading a checkpoint restores the saving run's flags.
    if all(group.get("fused") for group in optimizer.param_groups):
        # The fused kernel reads the flag where it lies and leaves weights, moments and step count
        # untouched when it is set (as under GradScaler): no host sync on the step's path.
        optimizer.found_inf = not_finite.float()
        optimizer.step()
    else:
        optimizer.__dict__.pop("found_inf", None)  # only the fused kernel accepts the flag
        if not bool(not_finite):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, not_finite


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int, grad_clip: float,
               device: torch.device, precision: str, poison: bool = False,
               sum_over_dp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
               positions: torch.Tensor | None = None, pipeline: Pipeline | None = None,
               sum_over_cp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
               across_replicas: Callable[[StepResult], bool] | None = None) -> StepResult:
    """forward_backward, then optimizer_step: one optimizer step over this rank's share of the batch
    (and, under moe_balance = bias, the routing bias moved towards the step's global balance).
    `across_replicas`, between the two: average the gradients over the replica groups and say whether
    the step commits; when it does not, the gradients are dropped and nothing is applied."""
    result = forward_backward(model, inputs, targets, micro_batch, device, precision, poison, sum_over_dp,
                              positions, pipeline, sum_over_cp)
    if across_replicas is not None and not across_replicas(result):
        optimizer.zero_grad(set_to_none=True)
        result.committed = False
        return result
    result.grad_norm, result.skipped = optimizer_step(model, optimizer, scheduler, grad_clip, pipeline)
    if model.cfg.is_moe and model.cfg.moe_balance == "bias":
        update_router_bias(model, result.expert_load, model.cfg.moe_bias_rate, applied=~result.skipped)
    return result
