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
from functools import lru_cache

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
    pp_layers: tuple[int, ...] = ()  # blocks per pipeline stage, first to last (pp x vpp of them); () = balanced

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
    def stages(self) -> int:
        """Pipeline stages in all: pp ranks with vpp stages each."""
        return self.pp * self.vpp

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
        if self.pp > 1:
            degrees += f" ({self.pp_schedule}" + (f", vpp={self.vpp}" if self.vpp > 1 else "") + (
                f", blocks {'/'.join(map(str, self.pp_layers))}" if self.pp_layers else "") + ")"
        recompute = self.recompute + (f" every {self.recompute_every}" if self.recompute_every > 1 else "")
        zero = f", zero {self.zero}" if self.dp * self.cp > 1 else ""  # nothing to shard on one data-parallel rank
        return f"{degrees}{zero}, mbs {self.mbs}, gbs {self.gbs}, recompute {recompute}, {self.precision}"

    def to_json(self) -> dict:
        """The fields, plus the data-parallel degree `dp` (a key of `colossus plan --json` since its start)."""
        return {**asdict(self), "pp_layers": list(self.pp_layers), "dp": self.dp}


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
    elif key == "pp_layers":
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise UserError(f"{where} must be a list of positive block counts, one per pipeline stage, got {value!r}")
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


def stage_layers(layout: Layout, n_layers: int) -> tuple[int, ...]:
    """Blocks per pipeline stage, first to last: the layout's own split (pp_layers), else the balanced
    one. Balanced counts the embedding and the output as a block each, as Llama 3 did (126 blocks over
    16 stages: 7, 8 x 14, 7; Llama 3 paper section 3.3.2): the heaviest stage is as light as it can be
    with a block or more on every stage, and blocks beyond that come off the stages holding the most."""
    if layout.pp_layers:
        return tuple(layout.pp_layers)
    return _balanced_split(layout.stages, n_layers)


@lru_cache(maxsize=4096)
def _balanced_split(stages: int, n_layers: int) -> tuple[int, ...]:
    if stages == 1:
        return (n_layers,)
    ends = [1] + [0] * (stages - 2) + [1]  # the embedding on the first stage, the output on the last
    # the lightest heaviest stage: h blocks in the middle and h - 1 at each end hold h * stages - 2 blocks
    heaviest = 1 if n_layers <= stages else -(-(n_layers + 2) // stages)
    blocks = [max(heaviest - end, 1) for end in ends]
    for _ in range(sum(blocks) - n_layers):
        most = max(blocks)
        blocks[max(i for i, count in enumerate(blocks) if count == most)] -= 1
    return tuple(blocks)


def stage_ranks(layout: Layout) -> tuple[int, ...]:
    """The pipeline rank of each stage: round robin (stage s on rank s mod pp) for 1F1B and interleaved
    1F1B, a V for the zero-bubble ZB-V schedule (rank r holds stages r and 2 pp - 1 - r, so the first and
    last stage share rank 0; Qi et al. 2024, section 6)."""
    return _stage_ranks(layout.pp_schedule, layout.pp, layout.stages)


@lru_cache(maxsize=1024)
def _stage_ranks(schedule: str, pp: int, stages: int) -> tuple[int, ...]:
    if schedule == "zbv":
        return tuple(s if s < pp else 2 * pp - 1 - s for s in range(stages))
    return tuple(s % pp for s in range(stages))


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank holds of the model: its blocks, and whether the embedding (first stage)
    and the final norm and output projection (last stage; under tied embeddings a copy of the
    embedding) are among them."""

    blocks: int
    embedding: bool
    head: bool


def rank_share(layout: Layout, n_layers: int, pp_rank: int = 0) -> RankShare:
    return _rank_share(stage_layers(layout, n_layers), stage_ranks(layout), pp_rank)


def distinct_shares(layout: Layout, n_layers: int) -> tuple[tuple[int, RankShare], ...]:
    """(pipeline rank, share) for each different share, first rank first (at most a few: the first, the
    last, a middle one), so costs that depend only on the share are computed once per layout."""
    return _distinct_shares(stage_layers(layout, n_layers), stage_ranks(layout), layout.pp)


@lru_cache(maxsize=4096)
def _distinct_shares(counts: tuple[int, ...], ranks: tuple[int, ...], pp: int) -> tuple[tuple[int, RankShare], ...]:
    first: dict[RankShare, int] = {}
    for rank in range(pp):
        first.setdefault(_rank_share(counts, ranks, rank), rank)
    return tuple((rank, share) for share, rank in first.items())


@lru_cache(maxsize=4096)
def _rank_share(counts: tuple[int, ...], ranks: tuple[int, ...], pp_rank: int) -> RankShare:
    mine = [stage for stage, rank in enumerate(ranks) if rank == pp_rank]
    return RankShare(sum(counts[stage] for stage in mine), 0 in mine, len(counts) - 1 in mine)


def check_pipeline(layout: Layout, m: ModelConfig) -> None:
    """The pipeline's own constraints: stages that fit the blocks, a schedule that fits vpp, and enough
    micro-batches for the schedule to fill its stages (one line each, naming the key to change)."""
    if layout.pp == 1:
        if layout.vpp > 1:
            raise UserError(f"parallel.vpp={layout.vpp} interleaves pipeline stages: it needs parallel.pp > 1")
        if layout.pp_layers:
            raise UserError("parallel.pp_layers splits the blocks over pipeline stages: it needs parallel.pp > 1")
        return
    if layout.pp > m.n_layers:
        raise UserError(f"parallel.pp={layout.pp} is more pipeline stages than model.n_layers={m.n_layers}")
    if layout.stages > m.n_layers:
        lower = "parallel.pp (zbv runs two stages per rank)" if layout.pp_schedule == "zbv" else "parallel.vpp"
        raise UserError(f"parallel.pp={layout.pp} x vpp={layout.vpp} = {layout.stages} stages do not fit "
                        f"model.n_layers={m.n_layers} blocks (a block or more each); lower {lower}")
    wanted = {"1f1b": layout.vpp == 1, "interleaved-1f1b": layout.vpp > 1, "zbv": layout.vpp == 2}[layout.pp_schedule]
    if not wanted:
        need = {"1f1b": "vpp=1 (one stage per rank; interleaved-1f1b for more)",
                "interleaved-1f1b": "vpp >= 2 stages per rank", "zbv": "vpp=2 (two stages per rank, in a V)"}
        raise UserError(f"parallel.pp_schedule={layout.pp_schedule} needs parallel.{need[layout.pp_schedule]}, "
                        f"got parallel.vpp={layout.vpp}")
    if layout.pp_layers:
        if len(layout.pp_layers) != layout.stages or sum(layout.pp_layers) != m.n_layers:
            raise UserError(f"parallel.pp_layers={list(layout.pp_layers)} must list {layout.stages} block counts "
                            f"(pp x vpp stages) summing to model.n_layers={m.n_layers}")
    least, multiple = least_micro_batches(layout.pp_schedule, layout.pp, layout.vpp)
    micro = max(layout.micro_batches, 1)
    if micro < least or micro % multiple:
        rule = f"a multiple of pp={layout.pp}" if multiple > 1 else f"at least {least} (one per stage)"
        fixes = ["raise train.global_batch"] + (["lower train.micro_batch"] if layout.mbs > 1 else []) + ["lower parallel.pp"]
        raise UserError(f"parallel.pp_schedule={layout.pp_schedule} needs {rule} micro-batches per step on each "
                        f"data-parallel rank, but train.global_batch={layout.gbs} over {layout.dp} data-parallel "
                        f"rank(s) in micro-batches of {layout.mbs} gives {micro}; {', '.join(fixes[:-1])} or {fixes[-1]}")


def least_micro_batches(schedule: str, pp: int, vpp: int) -> tuple[int, int]:
    """(fewest micro-batches per step, a multiple they must be of) for a pipeline schedule: 1F1B needs one
    per rank in flight, interleaved 1F1B a multiple of pp (Narayanan et al. 2021, section 2.2), ZB-V one
    per stage (two per rank; Qi et al. 2024, section 6); as torch.distributed.pipelining checks."""
    if pp == 1:
        return 1, 1
    return {"1f1b": (pp, 1), "interleaved-1f1b": (pp, pp), "zbv": (pp * vpp, 1)}[schedule]


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
    check_pipeline(layout, m)
