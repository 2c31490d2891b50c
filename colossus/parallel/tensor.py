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
- vocabulary parallelism, optional: the (tied) embedding table is split on the vocabulary and the
  output projection produces vocabulary-sharded logits (a DTensor); the loss, computed outside the
  model (colossus.train.loss), runs the cross-entropy on them without gathering (torch's
  loss_parallel), and generation gathers them.

Every sharded weight is a DTensor over the tp mesh under its original name, so DCP checkpoints
reshard between layouts, FSDP2 over the dense mesh composes with it (2-D DTensors), and
colossus.parallel.parallelize.clip_grad_norm sees the true gradient norm. Weights that stay
replicated (router, norms without sequence parallelism, embedding without vocabulary parallelism)
receive the full gradient on every tp rank, because every rank computes the same loss on the same
tokens and the f/g operators keep the replicated activations' gradients whole; so FSDP over the
dense mesh (which excludes tp) needs no extra scaling or reduction over tp.
"""

from __future__ import annotations

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


# The hidden (ffn) dimension of each stacked expert weight: w_in/w_up [E, d, f] and w_out [E, f, d].
EXPERT_HIDDEN_DIM = {"w_in": 2, "w_up": 2, "w_out": 1}


def shard_experts(experts: nn.Module, mesh: DeviceMesh, shard_weights: bool = True) -> None:
    """f/g hooks around the experts, and (unless expert parallelism shards them together with its own
    dimension: parallel/expert.py) their weights split on the hidden dimension over `mesh`."""
    if shard_weights:
        for name, dim in EXPERT_HIDDEN_DIM.items():
            weight = getattr(experts, name)
            if weight is not None:
                setattr(experts, name, nn.Parameter(distribute_tensor(weight.data, mesh, [Shard(dim)], src_data_rank=None)))
    hooks = _ExpertTensorParallel(mesh)
    experts.register_forward_pre_hook(hooks.before)
    experts.register_forward_hook(hooks.after)


class _PadSequence:
    """Sequence parallelism splits the sequence evenly over the tp ranks. Training and validation
    sequences are model.seq_len long (which tp divides); other lengths (generation) are padded at
    the end to a multiple of tp and the logits cut back. Causal attention keeps the padding from
    changing earlier positions (MoE router statistics do count it)."""

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
        return (F.pad(tokens, (0, pad)),), {}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        seq = self._cuts.pop() if self._cuts else None
        if seq is not None and output is not None:
            output.logits = output.logits[:, :seq].clone()  # a copy, not a view of the padded logits
        return output


# ------------------------------------------------------------------ the plan


def _local_split(plan):
    """Styles that split weights locally (src_data_rank None) instead of scattering rank 0's: weights on
    the meta device have nothing to scatter, and initialised ones are the same on every rank."""
    for style in (plan.values() if isinstance(plan, dict) else [plan]):
        if hasattr(style, "src_data_rank"):
            style.src_data_rank = None
    return plan


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
                          vocab_parallel: bool = True, shard_expert_weights: bool = True) -> None:
    """Shard `model` over the 1-D `tp_mesh` in place (see the module docstring): a model built on the
    meta device (initialised afterwards, parallel/init.py) or one whose every rank holds the same full
    weights; parameter names are unchanged. With expert parallelism too, the expert weights are split
    there, on both dimensions at once (shard_expert_weights=False here). Apply before activation
    recomputation, compile and FSDP."""
    cfg = model.cfg
    tp = tp_mesh.size()
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "seq_len", "vocab_size"):
        if getattr(cfg, key) % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {tp} to divide model.{key}={getattr(cfg, key)}")
    local = dict(use_local_output=True)

    for layer in model.layers.values():
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
        parallelize_module(layer, tp_mesh, _local_split(plan))
        if moe:
            if sequence_parallel:
                # The MoE computes on the whole (gathered) sequence, replicated; its output is split
                # again on the sequence for the norm and residual that follow. Router stats pass through.
                parallelize_module(layer.ffn, tp_mesh, PrepareModuleOutput(
                    output_layouts=(Replicate(), None), desired_output_layouts=(SEQ, None), **local))
            shard_experts(layer.ffn.experts, tp_mesh, shard_expert_weights)

    # A pipeline stage (parallel/pipeline.py) may hold neither the embedding nor the final norm and output.
    if vocab_parallel:
        # The embedding table [vocab, d] split on the vocabulary: each rank looks up the tokens in its
        # range, zeros elsewhere, and the partial sums are reduced (scattered on the sequence under SP).
        if model.embedding is not None:
            parallelize_module(model.embedding, tp_mesh, _local_split(RowwiseParallel(
                input_layouts=Replicate(), output_layouts=SEQ if sequence_parallel else Replicate(), **local)))
        if model.output is not None:
            # An untied output projection is used as a weight (F.linear), not called: shard it by hand.
            model.output.weight = nn.Parameter(distribute_tensor(model.output.weight.data, tp_mesh, [Shard(0)],
                                                                 src_data_rank=None))
    elif sequence_parallel and model.embedding is not None:
        model.embedding.register_forward_hook(
            lambda m, args, out: DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False)
            .redistribute(placements=[SEQ]).to_local())

    # The final norm feeds the output projection F.linear(h, weight): with vocabulary parallelism h must
    # be a replicated DTensor (logits come out sharded on the vocabulary), without it a plain tensor.
    if model.norm is not None and sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel(use_local_output=False))
        if vocab_parallel:
            model.norm.register_forward_hook(lambda m, args, out: out.redistribute(placements=[Replicate()]))
        else:
            model.norm.register_forward_hook(lambda m, args, out: out.redistribute(placements=[Replicate()]).to_local())
    elif model.norm is not None and vocab_parallel:
        model.norm.register_forward_hook(
            lambda m, args, out: DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False))

    if sequence_parallel:
        padding = _PadSequence(tp)
        model.register_forward_pre_hook(padding.before, with_kwargs=True)
        model.register_forward_hook(padding.after, with_kwargs=True, always_call=True)
