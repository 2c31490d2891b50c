"""Apply a layout to a plain Transformer, in torchtitan's order: pipeline split, tensor, context and expert parallel,
activation recomputation, compile, then FSDP (which must see the final module structure)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from colossus.layout import Layout, expert_shard_dim
from colossus.models.grok import Transformer
from colossus.models.moe import MoE
from colossus.parallel.context import apply_context_parallel
from colossus.parallel.expert import apply_expert_parallel
from colossus.parallel.mesh import Meshes
from colossus.parallel.pipeline import build_stages, prune
from colossus.parallel.tensor import apply_tensor_parallel


def missing_features(layout: Layout) -> list[str]:
    """What of `layout` the trainer cannot run yet (the config and the planner accept all of it)."""
    return ["fp8 training (train.precision=fp8)"] if layout.precision == "fp8" else []


def parallelize(model: Transformer, layout: Layout, mesh: Meshes | None, device: torch.device,
                compile: bool = False) -> list[nn.Module]:
    """Apply `layout` to a model built on the meta device, in place; returns the modules that run it:
    the model itself, or under pipeline parallelism this rank's stages (the model then keeps only
    their parts: parallel/pipeline.py)."""
    stages = prune(model, layout, mesh.pp.get_local_rank()) if layout.pp > 1 else None
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh.tp, shard_expert_weights=layout.ep == 1)
    if layout.cp > 1:
        apply_context_parallel(model, mesh.cp)
    if layout.ep > 1:
        for layer in model.layers.values():
            apply_expert_parallel(layer.ffn.experts, mesh.ep, model.cfg.n_experts, mesh.experts)
    apply_recompute(model, layout.recompute, layout.recompute_every)
    if compile:
        for layer in model.layers.values():
            layer.compile()
    parts = build_stages(model, layout, stages, device) if stages is not None else [model]
    if layout.dp * layout.cp > 1 or layout.tp > 1:
        # With tp alone, FSDP over the one-rank dense mesh still makes every parameter a DTensor:
        # tensor parallelism leaves the router plain, and foreach AdamW cannot mix the two kinds.
        apply_fsdp(model, layout, mesh, device, roots=parts)
    return parts


def apply_recompute(model: Transformer, recompute: str, every: int = 1) -> None:
    """Recompute activations in the backward instead of keeping them, in every `every`-th block:
    "full" reruns the whole block (keeping only its input), "selective" only the attention core
    (its T x T scores are what it saves; Korthikanti et al. 2022, section 5)."""
    if recompute == "none":
        return
    for key, layer in model.layers.items():
        if int(key) % every:  # the block's index in the whole model, also in a pipeline stage
            continue
        if recompute == "full":
            model.layers[key] = checkpoint_wrapper(layer, preserve_rng_state=False)
        else:
            layer.attention.core = checkpoint_wrapper(layer.attention.core, preserve_rng_state=False)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP's policy for train.precision: bf16 gathers bf16 weights and reduces gradients in fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: Transformer, layout: Layout, mesh: Meshes, device: torch.device,
               roots: list[nn.Module] | None = None) -> None:
    """FSDP2 per block and at the root (the model, or each pipeline stage: `roots`); HSDP when
    dp_replicate > 1, replicate-only under ZeRO 0.
    Experts under expert parallelism are sharded over the data-parallel ranks that hold the same
    experts, and their gradients divided by the full data-parallel degree (their tokens came from
    all ep ranks)."""
    dense_mesh, expert_mesh = mesh.dense, mesh.expert_dp
    options = dict(mp_policy=mixed_precision(layout.precision), reshard_after_forward=layout.zero >= 3)
    for layer in model.layers.values():
        block = layer._checkpoint_wrapped_module if hasattr(layer, "_checkpoint_wrapped_module") else layer
        ignored = None
        if layout.ep > 1 and isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            # FSDP averages the experts' gradients over the ranks that hold the same experts (its own
            # mesh); their tokens came from ep times as many data-parallel ranks, so each gradient is
            # also divided by ep as it arrives. (Not FSDP's gradient divide factor: on a mesh whose
            # shard dimension has one rank, torch 2.13 divides by it twice under gloo's sum reduction.)
            divide_gradients(experts, layout.ep)
            if expert_mesh.size() > 1:
                ranks = expert_mesh.mesh.shape[-1]  # the shard dimension
                fully_shard(experts, mesh=expert_mesh, shard_placement_fn=lambda p: Shard(expert_shard_dim(
                    tuple((p.to_local() if isinstance(p, DTensor) else p).shape), ranks)), **options)
            else:  # no other rank holds these experts: nothing to reduce
                ignored = set(experts.parameters())
        fully_shard(layer, mesh=dense_mesh, ignored_params=ignored, **options)
    for root in roots if roots is not None else [model]:
        fully_shard(root, mesh=dense_mesh, **options)
    if device.type == "cpu":
        # gloo has no PREMUL_SUM: reduce with SUM and let FSDP divide (see shared cpu notes).
        for module in [module for root in roots or [model] for module in root.modules()]:
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def divide_gradients(module: nn.Module, divisor: float) -> None:
    """Divide the gradient of each of the module's parameters by `divisor` as it arrives (before
    accumulation: exact with micro-batches). The hooks go on at the first forward, onto the parameters
    the module holds then: those of a model built on the meta device are replaced when it is
    materialised (parallel/init.py)."""
    def register(module: nn.Module, args: tuple) -> None:
        if getattr(module, "_gradients_divided", False):
            return
        for param in module.parameters():
            param.register_hook(lambda grad: grad / divisor)
        module._gradients_divided = True

    module.register_forward_pre_hook(register)


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float, uncounted: list[nn.Parameter] = (),
                   sum_over: object = None) -> torch.Tensor:
    """Total gradient norm over all parameters, plain or DTensor on any mesh, and clipping to
    max_norm (torch's formula: scale by max_norm / (norm + 1e-6) when that is below 1). Norms are
    summed per mesh because one foreach norm cannot mix meshes (expert vs dense weights). Under
    pipeline parallelism each rank holds some stages: the squares are summed over the pipeline ranks
    (`sum_over`), and a copy of a weight another stage holds (`uncounted`) is clipped, not counted."""
    grads = [p.grad for p in parameters if p.grad is not None]
    skip = {id(p.grad) for p in uncounted}
    by_mesh: dict[object, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        if id(grad) not in skip:
            by_mesh[grad.device_mesh if isinstance(grad, DTensor) else None].append(grad)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    device = grads[0].device if grads else parameters[0].device if parameters else torch.device("cpu")
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if sum_over is not None:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=sum_over)
    total = total.sqrt()
    if max_norm > 0 and grads:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        torch._foreach_mul_(local, scale.to(local[0].dtype))
    return total
