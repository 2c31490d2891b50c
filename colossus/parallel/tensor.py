"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019), applied to a plain Transformer from outside.

Each of `tp` ranks holds 1/tp of every attention and feed-forward weight and the ranks of a group read
the same sequences:

- attention: wq, wk, wv column-wise (each rank computes n_heads/tp query heads and n_kv_heads/tp
  key/value heads; contiguous head blocks keep grouped-query pairs on one rank), wo row-wise;
- dense feed-forward: w_in, w_up column-wise, w_out row-wise;
- MoE experts: the stacked weights split on the ffn dimension (w_in/w_up [E, d, f] Shard(2), w_out
  [E, f, d] Shard(1)); the routed tokens enter replicated, each rank's grouped matmuls give a partial
  sum of the expert outputs, all-reduced in the forward (Megatron's "g"), and the gradient of the
  replicated tokens is all-reduced in the backward ("f"). The router stays replicated;
- sequence parallelism (Korthikanti et al. 2022), optional: between blocks the residual stream is
  split on the sequence dimension, the RMSNorms run on their sequence shard, and the all-reduce
  after each row-wise projection becomes a reduce-scatter followed by an all-gather before the next
  column-wise one;
- vocabulary parallelism, optional: the (tied) embedding table is split on the vocabulary, the output
  projection produces vocabulary-sharded logits and the cross-entropy runs on them without gathering
  (torch's loss_parallel, enabled around the model's forward and the cross-entropy's backward).

Every sharded weight is a DTensor over the tp mesh under its original name, so DCP checkpoints
reshard between layouts, FSDP2 over the dense mesh composes with it (2-D DTensors), and
colossus.parallel.parallelize.clip_grad_norm sees the true gradient norm. Weights that stay
replicated (router, norms without sequence parallelism, embedding without vocabulary parallelism)
receive the full gradient on every tp rank, because every rank computes the same loss on the same
tokens and the f/g operators keep the replicated activations' gradients whole; so FSDP over the
dense mesh (which excludes tp) needs no extra scaling or reduction over tp.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from colossus.models.grok import Transformer
from colossus.models.moe import MoE

SEQ = Shard(1)  # activations [batch, seq, d] split on the sequence


# ------------------------------------------------------------------ Megatron's f and g operators


def copy_to_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """f: identity in the forward, all-reduce of the gradient in the backward (the input of a
    computation split across tp ranks, whose per-rank gradients are partial sums)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def reduce_from_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """g: all-reduce in the forward (per-rank partial sums to the full value), identity in the backward."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(placements=[Replicate()]).to_local()


class _ExpertTensorParallel:
    """Hooks around a GroupedExperts module whose weights are split on the ffn dimension."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh

    def before(self, module: nn.Module, args: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, counts = args
        return copy_to_tp(tokens, self.mesh), counts

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(output, self.mesh)


def shard_experts(experts: nn.Module, mesh: DeviceMesh) -> None:
    """w_in/w_up [E, d, f] -> Shard(2), w_out [E, f, d] -> Shard(1) over `mesh`; f/g hooks around the module."""
    for name, dim in (("w_in", 2), ("w_up", 2), ("w_out", 1)):
        weight = getattr(experts, name)
        if weight is not None:
            setattr(experts, name, nn.Parameter(distribute_tensor(weight.data, mesh, [Shard(dim)])))
    hooks = _ExpertTensorParallel(mesh)
    experts.register_forward_pre_hook(hooks.before)
    experts.register_forward_hook(hooks.after)


# ------------------------------------------------------------------ the vocabulary-parallel loss


class _LossParallelBackward(torch.autograd.Function):
    """Identity on the loss whose backward turns loss_parallel on, so the cross-entropy's backward
    (which autograd runs next on this path) also works on the vocabulary shards; a hook on the logits'
    gradient turns it off again once that backward is done."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, switch: "_LossParallelSwitch") -> torch.Tensor:
        ctx.switch = switch
        return loss.clone()  # not a view (see _plain)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.switch.enter()
        return grad, None


class _LossParallelSwitch:
    """Enters and exits one torch loss_parallel() context, at most once each."""

    def __init__(self):
        self._context = None

    def enter(self) -> None:
        if self._context is None:
            self._context = loss_parallel()
            self._context.__enter__()

    def exit(self, *_) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)


class _VocabParallelOutput:
    """Hooks for vocabulary parallelism: loss_parallel on from the final norm to the end of the
    model's forward (the output projection and the cross-entropy inside Transformer.forward, which
    see vocabulary-sharded DTensor logits; not the blocks, which torch.compile may trace), and the
    outputs turned back into plain tensors: the loss (replicated), and the logits gathered when the
    caller asked for logits only (generation). With targets, the sharded logits are not gathered:
    the output's logits are None, as ModelOutput allows when the loss was asked for."""

    def __init__(self):
        self.forward_switch = _LossParallelSwitch()

    def after_final_norm(self, module: nn.Module, args: tuple, output) -> None:
        self.forward_switch.enter()

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        self.forward_switch.exit()
        if output is None:  # the forward raised; always_call only guarantees the context is left
            return None
        logits, loss = output.logits, output.loss
        if isinstance(loss, DTensor):
            if loss.requires_grad and isinstance(logits, DTensor) and logits.requires_grad:
                backward_switch = _LossParallelSwitch()
                output.loss = _LossParallelBackward.apply(loss.to_local(), backward_switch)
                logits.register_hook(lambda grad: backward_switch.exit())
            else:
                output.loss = _plain(loss)
        for name in ("ce_loss", "aux_loss", "z_loss"):
            value = getattr(output, name)
            if isinstance(value, DTensor):
                setattr(output, name, _plain(value))
        if isinstance(logits, DTensor):
            output.logits = logits.full_tensor() if output.loss is None else None
        return output


def _plain(value: DTensor) -> torch.Tensor:
    """The local value of a replicated DTensor, as a tensor of its own (to_local returns a view, which
    FSDP warns about on a root module's outputs)."""
    return value.to_local().clone()


def _replicated_router_losses(mesh: DeviceMesh, module: nn.Module, args: tuple, output: tuple) -> tuple:
    out, stats = output
    for name in ("aux_loss", "z_loss"):
        value = getattr(stats, name)
        if not isinstance(value, DTensor):
            setattr(stats, name, DTensor.from_local(value, mesh, [Replicate()], run_check=False))
    return out, stats


class _PadSequence:
    """Sequence parallelism splits the sequence evenly over the tp ranks. Training and validation
    sequences are model.seq_len long (which tp divides); other lengths (generation) are padded at
    the end to a multiple of tp, with targets ignored there, and the logits cut back. Causal
    attention keeps the padding from changing earlier positions (MoE router statistics do count it)."""

    def __init__(self, tp: int):
        self.tp = tp
        self._cuts: list[int | None] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        tokens = args[0] if args else kwargs["tokens"]
        seq = tokens.shape[1]
        pad = -seq % self.tp
        self._cuts.append(seq if pad else None)
        if not pad:
            return None
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        tokens = F.pad(tokens, (0, pad))
        if targets is not None:
            targets = F.pad(targets, (0, pad), value=-100)  # F.cross_entropy's ignore_index
        return (tokens, targets), {}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        seq = self._cuts.pop() if self._cuts else None
        if seq is not None and output is not None and output.logits is not None:
            output.logits = output.logits[:, :seq].clone()  # a copy, not a view (see _plain)
        return output


# ------------------------------------------------------------------ the plan


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
                          vocab_parallel: bool = True) -> None:
    """Shard `model` over the 1-D `tp_mesh` in place (see the module docstring). Every rank must hold
    the same full weights beforehand (build_model with the same seed); parameter names are unchanged.
    Apply before activation checkpointing, compile and FSDP."""
    cfg = model.cfg
    tp = tp_mesh.size()
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "seq_len", "vocab_size"):
        if getattr(cfg, key) % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {tp} to divide model.{key}={getattr(cfg, key)}")
    local = dict(use_local_output=True)

    for layer in model.layers:
        plan: dict[str, object] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=SEQ) if sequence_parallel else RowwiseParallel(),
        }
        moe = isinstance(layer.ffn, MoE)
        if not moe:
            plan["ffn.w_in"] = ColwiseParallel()
            if layer.ffn.w_up is not None:
                plan["ffn.w_up"] = ColwiseParallel()
            plan["ffn.w_out"] = RowwiseParallel(output_layouts=SEQ) if sequence_parallel else RowwiseParallel()
        if sequence_parallel:
            # Norms on sequence shards; attention and the FFN gather the full sequence on the way in.
            for name in ("attention_norm", "post_attention_norm", "ffn_norm", "post_ffn_norm"):
                if not isinstance(getattr(layer, name), nn.Identity):
                    plan[name] = SequenceParallel(**local)
            plan["attention"] = PrepareModuleInput(input_layouts=(SEQ, None, None),
                                                   desired_input_layouts=(Replicate(), None, None), **local)
            plan["ffn"] = PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),), **local)
        parallelize_module(layer, tp_mesh, plan)
        if moe:
            if sequence_parallel:
                # The MoE computes on the whole (gathered) sequence, replicated; its output is split
                # again on the sequence for the norm and residual that follow. Router stats pass through.
                parallelize_module(layer.ffn, tp_mesh, PrepareModuleOutput(
                    output_layouts=(Replicate(), None), desired_output_layouts=(SEQ, None), **local))
            shard_experts(layer.ffn.experts, tp_mesh)

    if vocab_parallel:
        # The embedding table [vocab, d] split on the vocabulary: each rank looks up the tokens in its
        # range, zeros elsewhere, and the partial sums are reduced (scattered on the sequence under SP).
        parallelize_module(model.embedding, tp_mesh, RowwiseParallel(
            input_layouts=Replicate(), output_layouts=SEQ if sequence_parallel else Replicate(), **local))
        if model.output is not None:
            # An untied output projection is used as a weight (F.linear), not called: shard it by hand.
            model.output.weight = nn.Parameter(distribute_tensor(model.output.weight.data, tp_mesh, [Shard(0)]))
    elif sequence_parallel:
        model.embedding.register_forward_hook(
            lambda m, args, out: DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False)
            .redistribute(placements=[SEQ]).to_local())

    # The final norm feeds the output projection F.linear(h, weight): with vocabulary parallelism h must
    # be a replicated DTensor (logits come out sharded on the vocabulary), without it a plain tensor.
    if sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel(use_local_output=False))
        if vocab_parallel:
            model.norm.register_forward_hook(lambda m, args, out: out.redistribute(placements=[Replicate()]))
        else:
            model.norm.register_forward_hook(lambda m, args, out: out.redistribute(placements=[Replicate()]).to_local())
    elif vocab_parallel:
        model.norm.register_forward_hook(
            lambda m, args, out: DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False))

    if sequence_parallel:
        padding = _PadSequence(tp)
        model.register_forward_pre_hook(padding.before, with_kwargs=True)
    if vocab_parallel:
        # The cross-entropy is a replicated DTensor and is summed with the MoE losses, plain tensors
        # that autograd could not mix with it: make those replicated DTensors too.
        for layer in model.layers:
            if isinstance(layer.ffn, MoE):
                layer.ffn.register_forward_hook(partial(_replicated_router_losses, tp_mesh))
        hooks = _VocabParallelOutput()
        model.norm.register_forward_hook(hooks.after_final_norm)
        model.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)
    if sequence_parallel:
        model.register_forward_hook(padding.after, with_kwargs=True, always_call=True)
