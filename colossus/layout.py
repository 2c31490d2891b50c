"""One description of how a run is laid out over its devices, shared by the trainer and the planner.

A Layout is plain data: the parallel degrees, the data-parallel split with its ZeRO stage, the batch
and the software choices that change speed and memory (recomputation, precision, pipeline schedule).
`colossus plan` ranks Layouts, `plan --write-config` writes one as a run config, and the trainer
builds its device mesh from the one its config describes (colossus.config.layout_from_config), so
both sides mean the same thing by every key.

Ranks, outermost first: pp, dp_replicate, dp_shard, ep, cp, tp. The data-parallel degree
dp = dp_replicate x dp_shard x ep: every one of those ranks reads different sequences (expert
parallelism is folded into data parallelism, as in torchtitan and Megatron-LM); tp and cp ranks share
them. Devices = pp x dp x cp x tp.

ZeRO (Rajbhandari et al. 2020) says what the data-parallel ranks shard, over dp_shard x ep (x cp) and
never across dp_replicate (HSDP's replicas): 0 nothing (plain data parallelism: dp_shard = 1), 1 the
optimizer state, 2 also the gradients, 3 also the weights between uses. In the trainer, FSDP2 runs
stage 3 as reshard-after-forward and stages 1 and 2 as keep-after-forward (FSDP2 always
reduce-scatters gradients, so stage 1 holds no more than stage 2 does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from colossus.errors import UserError
from colossus.modelconfig import ModelConfig

RECOMPUTE = ("none", "selective", "full")  # selective: the attention core only (Korthikanti et al. 2022)
PRECISIONS = ("fp32", "bf16", "fp8")
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}  # what a precision's matmuls run in
PP_SCHEDULES = ("1f1b", "interleaved-1f1b", "zbv")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Layout:
    tp: int = 1  # tensor (and sequence) parallel ranks
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual stages per pipeline rank (interleaved 1F1B)
    cp: int = 1  # context parallel: each sequence split over cp ranks
    ep: int = 1  # expert parallel ranks (data-parallel ranks too)
    dp_replicate: int = 1  # data-parallel replicas that shard nothing between them (HSDP's outer dim)
    dp_shard: int = 1  # data-parallel ranks that shard what `zero` says, with the ep ranks
    zero: int = 3
    mbs: int = 1  # micro-batch: sequences per forward/backward on one rank
    gbs: int = 1  # global batch: sequences per optimizer step, over all data-parallel ranks
    recompute: str = "none"
    recompute_every: int = 1  # recompute every k-th block only (1 = every block)
    precision: str = "bf16"
    pp_schedule: str = "1f1b"

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of each global batch are read."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per data-parallel rank and step (gradient accumulation, or the pipeline's)."""
        return self.gbs // (self.dp * self.mbs)

    @property
    def shard_group(self) -> int:
        """Ranks that shard the dense (non-expert) state between them under ZeRO >= 1."""
        return self.dp_shard * self.ep * self.cp

    def recomputed_fraction(self, n_layers: int) -> float:
        """Fraction of the blocks that recompute: blocks 0, k, 2k, ... for recompute_every = k."""
        return 0.0 if self.recompute == "none" else -(-n_layers // self.recompute_every) / n_layers

    def degrees(self) -> str:
        """The parallel degrees above 1, e.g. `ep=4 x tp=8`, or `one rank`."""
        names = ("pp", "dp_replicate", "dp_shard", "ep", "cp", "tp")
        return " x ".join(f"{name}={getattr(self, name)}" for name in names if getattr(self, name) > 1) or "one rank"

    def describe(self) -> str:
        """One line, e.g. `dp_shard=3125 x ep=4 x tp=8, zero 2, mbs 1, gbs 12500, recompute none, bf16`."""
        degrees = self.degrees()
        if self.vpp > 1:
            degrees += f" (vpp={self.vpp}, {self.pp_schedule})"
        recompute = self.recompute + (f" every {self.recompute_every}" if self.recompute_every > 1 else "")
        zero = f", zero {self.zero}" if self.dp * self.cp > 1 else ""  # nothing to shard on one data-parallel rank
        return f"{degrees}{zero}, mbs {self.mbs}, gbs {self.gbs}, recompute {recompute}, {self.precision}"

    def to_json(self) -> dict:
        """The fields, plus the data-parallel degree `dp` (a key of `colossus plan --json` since its start)."""
        return {**asdict(self), "dp": self.dp}


LAYOUT_FIELDS = tuple(f.name for f in fields(Layout))
# Keys `--layout` and layout_from_keys accept: the fields, plus `dp` (the data-parallel degree,
# split into dp_replicate x dp_shard x ep by the ZeRO stage: see layout_from_keys).
LAYOUT_KEYS = (*LAYOUT_FIELDS, "dp")
_CHOICES = {"recompute": RECOMPUTE, "precision": PRECISIONS, "pp_schedule": PP_SCHEDULES}


def check_value(key: str, value: object, where: str) -> None:
    """One key's own range; `where` prefixes the message (a config key or a --layout item)."""
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise UserError(f"{where}={value!r} is not one of {', '.join(_CHOICES[key])}")
    elif key == "zero":
        if value not in ZERO_STAGES:
            raise UserError(f"{where}={value} is not a ZeRO stage (0, 1, 2 or 3)")
    elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where} must be a positive integer, got {value!r}")


def layout_from_keys(keys: dict, checked: bool = False) -> Layout:
    """A Layout from field values and the shorthand `dp`: with ZeRO 0 the dp / ep data-parallel groups
    replicate (dp_replicate = dp / ep, dp_shard = 1), with ZeRO 1-3 they shard (dp_shard = dp / ep,
    or dp / (ep x dp_replicate) when dp_replicate is given: HSDP). `checked`: the values are known to be
    in range (the planner's own), so only the split is checked."""
    keys = dict(keys)
    dp = keys.pop("dp", None)
    if not checked:
        for key, value in {**keys, **({"dp": dp} if dp is not None else {})}.items():
            check_value(key, value, f"layout key {key}")
    layout = Layout(**keys)
    if dp is None:
        return layout
    outer = layout.ep * (layout.dp_replicate if "dp_replicate" in keys else 1)
    if dp % outer:
        raise UserError(f"dp={dp} is not a multiple of ep={layout.ep}" + (
            f" x dp_replicate={layout.dp_replicate}" if "dp_replicate" in keys else "") + "; the expert-parallel "
            "ranks are data-parallel ranks too")
    if "dp_shard" in keys or ("dp_replicate" in keys and layout.zero == 0):
        if layout.dp != dp:
            raise UserError(f"dp={dp} does not equal dp_replicate x dp_shard x ep = {layout.dp}; give one or the other")
        return layout
    if layout.zero == 0 and "dp_replicate" not in keys:
        return replace(layout, dp_replicate=dp // layout.ep, dp_shard=1)
    return replace(layout, dp_shard=dp // outer)


def expert_shard_dim(shape: tuple[int, ...], ranks: int) -> int:
    """The dimension FSDP shards a stacked expert weight on over `ranks`: dim 0 (the experts this rank
    holds after expert parallelism) while there are at least as many of them as ranks; else the first
    other dimension the ranks divide (FSDP2 splits only dim 0 unevenly); else dim 0 after all, where the
    first ranks hold whole experts and the rest none (the planner counts this in
    costmodel.state_bytes, and such a layout does not fit)."""
    if shape[0] >= ranks:
        return 0
    return next((dim for dim in range(1, len(shape)) if shape[dim] % ranks == 0), 0)


def check_fits(layout: Layout, m: ModelConfig) -> None:
    """Everything a layout needs to divide in the model and the batch, checked before anything is
    built (a one-line UserError naming the keys; parallel.* names are those of a run config)."""
    if layout.ep > 1 and not m.is_moe:
        raise UserError(f"parallel.ep={layout.ep} needs a mixture-of-experts model (model.n_experts > 1)")
    if m.n_experts % layout.ep:
        raise UserError(f"parallel.ep={layout.ep} does not divide model.n_experts={m.n_experts}; "
                        "each rank holds n_experts/ep experts")
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        if getattr(m, key) % layout.tp:
            raise UserError(f"parallel.tp={layout.tp} does not divide model.{key}={getattr(m, key)}; "
                            "tensor parallelism splits it")
    if m.seq_len % (layout.tp * layout.cp * (2 if layout.cp > 1 else 1)):
        raise UserError(f"model.seq_len={m.seq_len} must be divisible by tp={layout.tp} x cp={layout.cp}"
                        + (" x 2 (each context-parallel rank takes two balanced chunks)" if layout.cp > 1 else "")
                        + "; sequence and context parallelism split the sequence")
    if layout.pp > m.n_layers:
        raise UserError(f"parallel.pp={layout.pp} is more pipeline stages than model.n_layers={m.n_layers}")
    if layout.vpp > 1 and layout.pp == 1:
        raise UserError(f"parallel.vpp={layout.vpp} interleaves pipeline stages: it needs parallel.pp > 1")
    if layout.zero == 0 and layout.dp_shard > 1:
        raise UserError(f"parallel.zero=0 shards nothing, but parallel.dp_shard={layout.dp_shard}; set dp_shard=1 "
                        "and the data-parallel size in parallel.dp_replicate, or choose zero 1-3")
    if layout.gbs % layout.dp:
        raise UserError(f"train.global_batch={layout.gbs} is not divisible by the {layout.dp} data-parallel ranks "
                        f"(dp_replicate x dp_shard x ep); pick a multiple of {layout.dp}")
    share = layout.gbs // layout.dp  # a share smaller than one micro-batch runs as one micro-batch
    if share % layout.mbs and layout.mbs < share:
        raise UserError(f"train.micro_batch={layout.mbs} does not divide the {share} sequences each data-parallel "
                        "rank takes per step; pick a divisor of it")
