"""Pipeline parallelism: the blocks split into stages over `pp` ranks (`vpp` stages each), run by a
schedule of torch.distributed.pipelining: 1F1B (Narayanan et al. 2021, PipeDream-Flush), interleaved
1F1B (the same paper, section 2.2) or the zero-bubble ZB-V (Qi et al. 2024, section 6), which splits
each backward into its input and weight halves and fills the bubbles with the latter.

A stage is the model with the other stages' parts removed (`prune`): the first holds the embedding,
the last the final norm and the output projection, each its share of the blocks (layout.stage_layers:
uneven splits included), and every kept parameter keeps its name, so checkpoints move between
pipelined and unpipelined layouts. Grok ties the output projection to the embedding; torchtitan
refuses weight tying under pipeline parallelism. Here the last stage holds a copy of the embedding
(saved under the embedding's name, initialised with its values), and after every backward the two
gradients are summed between the first and last stage (`sum_tied_gradients`), so both copies take
the same steps: one process's tied weight.

The loss stays outside the model: the schedule applies it to the last stage's logits. The MoE's
losses of each stage's routers are added to its output's backward (`RouterLosses`), weighted as one
process weights them; balance over the global batch takes every expert's load from a forward-only
pass over all of the step's micro-batches first (`forward_only`, also used for validation and
generation).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from colossus.layout import Layout, stage_layers, stage_ranks
from colossus.models.grok import Transformer
from colossus.train.loss import cross_entropy, expert_load, loss_context

SCHEDULES = {"1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble}
TIED_COPY = "output.weight"  # the last stage's copy of a tied embedding ...
TIED_NAME = "embedding.weight"  # ... saved, loaded and initialised as the embedding


def stage_blocks(layout: Layout, n_layers: int) -> list[list[str]]:
    """The block keys of each stage, first to last."""
    blocks, start = [], 0
    for count in stage_layers(layout, n_layers):
        blocks.append([str(index) for index in range(start, start + count)])
        start += count
    return blocks


def prune(model: Transformer, layout: Layout, pp_rank: int) -> list[int]:
    """Remove from `model` (in place, built on the meta device) what the stages of pipeline rank
    `pp_rank` do not hold; returns those stages' indices, in order."""
    ranks = stage_ranks(layout)
    mine = [stage for stage, rank in enumerate(ranks) if rank == pp_rank]
    blocks = stage_blocks(layout, model.cfg.n_layers)
    kept = {key for stage in mine for key in blocks[stage]}
    for key in [key for key in model.layers if key not in kept]:
        del model.layers[key]
    last = layout.stages - 1
    if last not in mine:
        model.norm, model.output = None, None
    elif model.output is None:  # tied: the last stage projects with its own copy of the embedding
        with torch.device(model.embedding.weight.device):
            model.output = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        model.saved_as = {TIED_COPY: TIED_NAME}
    if 0 not in mine:
        model.embedding = None
    return mine


def saved_name(model: nn.Module, name: str) -> str:
    """The name parameter `name` of `model` is saved, loaded and initialised under."""
    return getattr(model, "saved_as", {}).get(name, name)


def _about(key: str, name: str) -> bool:
    """Whether a model or flattened optimizer state key is about parameter `name`."""
    return key == name or key.startswith((f"state.{name}.", f"param_groups.{name}."))


def to_saved(model: nn.Module, state: dict) -> dict:
    """Model or (flattened) optimizer state with a tied copy's entries under the embedding's names; where
    this rank holds the embedding too (ZB-V), the embedding's own entries stay (the same values)."""
    for name, saved in getattr(model, "saved_as", {}).items():
        for key in [key for key in state if _about(key, name)]:
            state.setdefault(key.replace(name, saved, 1), state.pop(key))
    return state


def load_saved(model: nn.Module, state: dict) -> dict:
    """The inverse of to_saved: a tied copy takes the embedding's saved values."""
    for name, saved in getattr(model, "saved_as", {}).items():
        holds_saved = any(parameter_name == saved for parameter_name, _ in model.named_parameters())
        for key in [key for key in state if _about(key, saved)]:
            # a copy where this rank holds both (ZB-V): the optimizer loads state shallowly, and two
            # parameters sharing one exp_avg would update it twice a step
            state[key.replace(saved, name, 1)] = _copy(state[key]) if holds_saved else state.pop(key)
    return state


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


class _AddToBackward(torch.autograd.Function):
    """Identity on h whose backward also backpropagates `loss` (with gradient 1): a stage's own loss
    terms joined to the gradient that arrives from the stages after it (Megatron-LM's
    MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        # A copy, not h itself: autograd would make h a view, and the zero-bubble schedule frees a
        # stage's output with detach_(), which views refuse.
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


class RouterLosses:
    """The MoE losses of this rank's stages, as training_loss (colossus.train.loss) weights them for
    one process: load balancing E sum_e f_e P_e and the z-loss, each averaged over all the model's
    layers, the load f over the global batch (given) or the micro-batch. It also keeps, per call of a
    stage, what is reported: routed slots, balancing and z-losses of its layers."""

    def __init__(self, model: Transformer, device: torch.device):
        self.cfg, self.device = model.cfg, device
        self.routing_only = False
        self.load: torch.Tensor | None = None  # [n_layers, n_experts], over the global batch
        # the whole micro-batch's slots from this rank's (context-parallel ranks hold parts of its sequences)
        self.sum_over_cp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        # reset() allocates the counts as a step starts: a dry run builds the stages for a device it lacks
        self.micro_batches = 1
        self.routed: torch.Tensor | None = None
        self.calls: dict[tuple[str, ...], list[tuple[torch.Tensor, ...]]] = {}

    def reset(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        self.routed = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, device=self.device)
        self.calls = {}

    def add(self, keys: list[str], stats: list, h: torch.Tensor) -> torch.Tensor:
        rows = torch.tensor([int(key) for key in keys], device=self.device)
        slots = torch.stack([s.slots for s in stats]).float()
        if self.routing_only:
            self.routed.index_add_(0, rows, slots)
            return h
        cfg = self.cfg
        probs = torch.stack([s.mean_probs for s in stats])
        z = torch.stack([s.z_loss for s in stats])
        load = self.load[rows] if self.load is not None else expert_load(self.sum_over_cp(slots))
        aux = probs.shape[-1] * (load * probs).sum(dim=-1)  # per layer
        self.calls.setdefault(tuple(keys), []).append((rows, slots.detach(), aux.detach().float(), z.detach().float()))
        if not torch.is_grad_enabled():
            return h
        weighted = cfg.moe_z_loss_coef * z.sum()
        if cfg.moe_balance != "bias":
            weighted = weighted + cfg.moe_aux_loss_coef * aux.sum()
        return _AddToBackward.apply(h, weighted / (cfg.n_layers * self.micro_batches))

    def step_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per layer, summed over the step's micro-batches: routed slots, balancing and z-losses. Only each
        stage's last `micro_batches` calls count: the schedule's first step also runs every stage once
        beforehand, on placeholder activations, to learn their shapes."""
        layers, experts = self.cfg.n_layers, self.cfg.n_experts
        slots = torch.zeros(layers, experts, device=self.device)
        aux, z = torch.zeros(layers, device=self.device), torch.zeros(layers, device=self.device)
        for calls in self.calls.values():
            for rows, call_slots, call_aux, call_z in calls[-self.micro_batches:]:
                slots.index_add_(0, rows, call_slots)
                aux.index_add_(0, rows, call_aux)
                z.index_add_(0, rows, call_z)
        return slots, aux, z


class Stage(nn.Module):
    """One pipeline stage of a pruned model: its embedding (first stage), blocks, and final norm and
    output projection (last stage), as submodules (FSDP's root for them), run by the model's own
    embed, blocks and head."""

    def __init__(self, model: Transformer, index: int, stages: int, keys: list[str], router: RouterLosses | None):
        super().__init__()
        self.index, self.first, self.last, self.keys = index, index == 0, index == stages - 1, keys
        self.embedding = model.embedding if self.first else None
        self.layers = nn.ModuleDict({key: model.layers[key] for key in keys})
        self.norm = model.norm if self.last else None
        self.output = model.output if self.last else None
        self.__dict__["model"] = model  # not a submodule: the stages share it
        self.router = router
        self.sequence: torch.Tensor | int = model.cfg.seq_len  # positions of the tokens, or a whole sequence's length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        h = model.embed(x) if self.first else x
        h, stats = model.blocks(h, self.sequence, self.keys)
        if stats and self.router is not None:
            h = self.router.add(self.keys, stats, h)
        if not self.last or (self.router is not None and self.router.routing_only):
            return h  # the routing pass needs no logits
        return model.head(h, []).logits


def build_stages(model: Transformer, layout: Layout, mine: list[int], device: torch.device) -> list[Stage]:
    """This rank's stages over the pruned (and tensor/expert-parallelised, recomputing) model."""
    blocks = stage_blocks(layout, model.cfg.n_layers)
    router = RouterLosses(model, device) if model.cfg.is_moe else None
    return [Stage(model, index, layout.stages, blocks[index], router) for index in mine]


class Pipeline:
    """This rank's stages, the schedule that runs them, and the exchanges between pipeline ranks
    outside the schedule (forward-only passes, tied gradients, what is reported)."""

    def __init__(self, model: Transformer, stages: list[Stage], layout: Layout, pp_mesh, device: torch.device):
        self.model, self.stages, self.layout, self.device = model, stages, layout, device
        self.group = pp_mesh.get_group()
        self.pp_rank = pp_mesh.get_local_rank()
        self.ranks = stage_ranks(layout)
        self.by_index = {stage.index: stage for stage in stages}
        self.router = stages[0].router
        self.micro_batches = layout.micro_batches
        self.tied = model.cfg.tie_embeddings
        self._tie_group = None
        pipeline_stages = [PipelineStage(stage, index, layout.stages, device, group=self.group)
                           for index, stage in self.by_index.items()]
        schedule = SCHEDULES[layout.pp_schedule]
        self.schedule = schedule(pipeline_stages if layout.pp_schedule != "1f1b" else pipeline_stages[0],
                                 n_microbatches=self.micro_batches, loss_fn=self._loss, scale_grads=False)
        self._losses: list[torch.Tensor] = []
        self._poison = False

    @property
    def holds_first(self) -> bool:
        return 0 in self.by_index

    @property
    def holds_last(self) -> bool:
        return self.layout.stages - 1 in self.by_index

    # ------------------------------------------------------------------ one training step
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = cross_entropy(logits, targets) / self.micro_batches
        return total * float("nan") if self._poison else total

    def run_schedule(self, inputs: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor | int,
                     poison: bool = False) -> None:
        """Forward and backward of this step's micro-batches through the schedule; afterwards every
        parameter of this rank's stages has its gradient (reduced over data-parallel ranks by FSDP,
        tied copies summed)."""
        self._set_sequence(sequence)
        self._poison = poison
        self._losses = []
        if self.router is not None:
            self.router.reset(self.micro_batches)
        args = (inputs,) if self.holds_first else ()
        kwargs = {"target": targets, "losses": self._losses} if self.holds_last else {}
        # Under tensor parallelism the last stage's logits are sharded on the vocabulary (parallel/tensor.py).
        with loss_parallel() if self.holds_last and self.layout.tp > 1 else nullcontext():
            self.schedule.step(*args, **kwargs)
        self.sum_tied_gradients()

    def reported(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(cross-entropy, balancing loss, z-loss) means over this step's micro-batches and the model's
        layers, and the routed slots per layer, the same on every pipeline rank (summed over them)."""
        # The schedule's losses: each micro-batch's cross-entropy / micro_batches, on the last stage.
        loss = torch.stack(self._losses).sum().detach().float() if self._losses else torch.zeros((), device=self.device)
        parts = [loss.view(1)]
        if self.router is not None:
            slots, aux, z = self.router.step_sums()
            parts += [aux, z, slots.flatten()]
        packed = self.sum_over_pipeline(torch.cat(parts))
        if self.router is None:
            return packed[0], None, None, None
        layers = self.model.cfg.n_layers
        aux, z = packed[1:1 + layers], packed[1 + layers:1 + 2 * layers]
        slots = packed[1 + 2 * layers:].view(layers, -1)
        count = self.micro_batches * layers
        return packed[0], aux.sum() / count, z.sum() / count, slots

    def sum_over_pipeline(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    # ------------------------------------------------------------------ the tied embedding
    def sum_tied_gradients(self) -> None:
        """Sum the gradients of the embedding (first stage) and its copy (last stage) on both: the
        gradient of the one tied weight of an unpipelined model."""
        if not self.tied or not (self.holds_first or self.holds_last):
            return
        grads = [p.grad for p in (self.model.embedding.weight if self.holds_first else None,
                                  self.model.output.weight if self.holds_last else None) if p is not None]
        if len(grads) != self.holds_first + self.holds_last:  # every rank must join the same collectives
            raise RuntimeError("the tied embedding or its copy has no gradient after the pipeline's backward")
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        if len(local) == 2:  # both on this rank (the V of ZB-V)
            total = local[0] + local[1]
            local[0].copy_(total)
            local[1].copy_(total)
        elif local:
            dist.all_reduce(local[0], op=dist.ReduceOp.SUM, group=self.tie_group())

    def tie_group(self):
        """The two ranks of this pipeline that hold the first and the last stage."""
        if self._tie_group is None:
            members = dist.get_process_group_ranks(self.group)  # global ranks, by pipeline rank
            pair = sorted({members[self.ranks[0]], members[self.ranks[-1]]})
            self._tie_group = self.group if len(pair) == len(members) else dist.new_group(
                pair, use_local_synchronization=True)
        return self._tie_group

    def norm_arguments(self) -> dict:
        """What the gradient norm needs under pipeline parallelism: the tied copy counted once (on the
        first stage), and the squares summed over the pipeline ranks."""
        uncounted = [self.model.output.weight] if self.tied and self.holds_last else []
        return {"uncounted": uncounted, "sum_over": self.group}

    # ------------------------------------------------------------------ forward only
    def _set_sequence(self, sequence: torch.Tensor | int) -> None:
        for stage in self.stages:
            stage.sequence = sequence

    @torch.no_grad()
    def forward_only(self, micro_batches: list[torch.Tensor], sequence: torch.Tensor | int) -> list[torch.Tensor]:
        """The micro-batches through every stage in order, without gradients, handing activations from
        rank to rank directly; the last stage's outputs on the rank that holds it (elsewhere [])."""
        self._set_sequence(sequence)
        outputs, handed, sent = [], {}, []
        last = self.layout.stages - 1
        for index, stage in self.by_index.items():
            for micro, x in enumerate(micro_batches):
                if index == 0:
                    h = x
                elif self.ranks[index - 1] == self.pp_rank:
                    h = handed.pop((index - 1, micro))
                else:
                    h = self._receive(self.ranks[index - 1])
                out = stage(h)
                if index == last:
                    if not self.router or not self.router.routing_only:
                        outputs.append(out)
                elif self.ranks[index + 1] == self.pp_rank:
                    handed[(index, micro)] = out
                else:
                    sent += self._send(out, self.ranks[index + 1])
        for work, _ in sent:
            work.wait()
        return outputs

    def routed_slots(self, micro_batches: list[torch.Tensor], sequence: torch.Tensor | int) -> torch.Tensor:
        """[n_layers, n_experts] slots routed over the micro-batches (rows of this rank's blocks; zero
        elsewhere): the routing pass of balance over the global batch."""
        self.router.reset(self.micro_batches)
        self.router.routing_only = True
        try:
            self.forward_only(micro_batches, sequence)
        finally:
            self.router.routing_only = False
        return self.router.routed.clone()

    def validation_loss(self, x: torch.Tensor, y: torch.Tensor, sequence: torch.Tensor | int) -> torch.Tensor:
        """Mean cross-entropy of one batch, the same on every pipeline rank."""
        outputs = self.forward_only([x], sequence)
        loss = torch.zeros((), device=self.device)
        if outputs:
            with loss_context(outputs[0]):
                loss = cross_entropy(outputs[0], y).float()
        return self.sum_over_pipeline(loss)

    def next_logits(self, context: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] logits of the position after `context` (for generation), on every pipeline rank.
        Under sequence parallelism a context is padded at the end to a multiple of tp (causal attention
        keeps the padding from the earlier positions)."""
        length = context.shape[1]
        tp = self.layout.tp
        padded = torch.nn.functional.pad(context, (0, -length % tp))
        outputs = self.forward_only([padded], padded.shape[1])
        logits = torch.empty(context.shape[0], self.model.cfg.vocab_size, device=self.device)
        if outputs:
            full = outputs[0].full_tensor() if isinstance(outputs[0], DTensor) else outputs[0]
            logits.copy_(full[:, length - 1].float())
        members = dist.get_process_group_ranks(self.group)
        dist.broadcast(logits, src=members[self.ranks[-1]], group=self.group)
        return logits

    # ------------------------------------------------------------------ activations between ranks
    _DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)

    def _send(self, tensor: torch.Tensor, to: int) -> list:
        tensor = tensor.contiguous()
        header = torch.zeros(8, dtype=torch.int64, device=tensor.device)
        header[0], header[1] = self._DTYPES.index(tensor.dtype), tensor.ndim
        header[2:2 + tensor.ndim] = torch.tensor(tensor.shape)
        return [(dist.isend(header, group=self.group, group_dst=to), header),
                (dist.isend(tensor, group=self.group, group_dst=to), tensor)]

    def _receive(self, source: int) -> torch.Tensor:
        header = torch.empty(8, dtype=torch.int64, device=self.device)
        dist.recv(header, group=self.group, group_src=source)
        dtype, ndim = self._DTYPES[int(header[0])], int(header[1])
        tensor = torch.empty(header[2:2 + ndim].tolist(), dtype=dtype, device=self.device)
        dist.recv(tensor, group=self.group, group_src=source)
        return tensor

