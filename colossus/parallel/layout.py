"""A parallel layout resolved against a world size, checked against the model, and its DeviceMesh.

Mesh dimensions, outermost first: dp_replicate, dp_shard, ep, tp. Data parallelism spans
dp_replicate x dp_shard x ep (every one of those ranks reads different sequences); tensor-parallel
ranks share their data. Non-expert weights are sharded by FSDP over dp_shard x ep ("fsdp", replicated
over dp_replicate: HSDP); expert weights are split over ep and sharded by FSDP over dp_shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from colossus.config import ModelConfig, ParallelConfig, TrainConfig
from colossus.errors import UserError


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    ep: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of each global batch are read."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def is_trivial(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in ("dp_replicate", "dp_shard", "ep", "tp") if getattr(self, name) > 1]
        return " x ".join(parts) or "single process"


def resolve_layout(cfg: ParallelConfig, world_size: int) -> Layout:
    """Fill in dp_shard = -1 and check that the layout's product is the world size."""
    fixed = cfg.dp_replicate * cfg.tp * cfg.ep
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise UserError(
                f"world size {world_size} is not divisible by dp_replicate={cfg.dp_replicate} x tp={cfg.tp} x ep={cfg.ep} = {fixed}; "
                "change [parallel] or the number of processes"
            )
        dp_shard = world_size // fixed
    layout = Layout(cfg.dp_replicate, dp_shard, cfg.ep, cfg.tp)
    if layout.world_size != world_size:
        raise UserError(
            f"the layout dp_replicate={cfg.dp_replicate} x dp_shard={dp_shard} x tp={cfg.tp} x ep={cfg.ep} = {layout.world_size} "
            f"processes, but {world_size} were launched; make the product equal the world size (or set parallel.dp_shard=-1)"
        )
    return layout


def check_layout_fits(layout: Layout, model: ModelConfig, train: TrainConfig) -> None:
    """Everything the layout needs to divide, checked before any model is built."""
    if layout.ep > 1 and not model.is_moe:
        raise UserError(f"parallel.ep={layout.ep} needs a mixture-of-experts model (model.n_experts > 1)")
    if model.n_experts % layout.ep:
        raise UserError(f"parallel.ep={layout.ep} does not divide model.n_experts={model.n_experts}; each rank holds n_experts/ep experts")
    if layout.tp > 1 and layout.ep > 1:
        raise UserError(f"parallel.tp={layout.tp} together with parallel.ep={layout.ep} is not available yet; use one of them")
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "seq_len", "vocab_size"):
        if getattr(model, key) % layout.tp:
            raise UserError(f"parallel.tp={layout.tp} does not divide model.{key}={getattr(model, key)}; tensor parallelism splits it")
    if train.global_batch % layout.dp:
        raise UserError(
            f"train.global_batch={train.global_batch} is not divisible by the {layout.dp} data-parallel ranks "
            f"(dp_replicate x dp_shard x ep); pick a multiple of {layout.dp}"
        )


@dataclass(frozen=True)
class Meshes:
    """The DeviceMesh views each parallelism uses, sliced once from the 4-D world mesh."""

    world: object  # dims dp_replicate, dp_shard, ep, tp
    dp: object  # flattened dp_replicate x dp_shard x ep: who reads which data
    dense: object  # FSDP of non-expert weights: dp_shard x ep, with dp_replicate outside for HSDP
    expert_dp: object  # FSDP of expert weights: dp_shard, with dp_replicate outside for HSDP
    ep: object
    tp: object


def build_mesh(layout: Layout, device_type: str) -> Meshes:
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp_replicate", "dp_shard", "ep", "tp")
    world = init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.ep, layout.tp), mesh_dim_names=names)
    dp = world["dp_replicate", "dp_shard", "ep"]._flatten("dp")
    fsdp = world["dp_shard", "ep"]._flatten("fsdp")
    with warnings.catch_warnings():  # HSDP needs a 2-D slice that includes the flattened dimension
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        dense = world["dp_replicate", "fsdp"] if layout.dp_replicate > 1 else fsdp
    expert_dp = world["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else world["dp_shard"]
    return Meshes(world, dp, dense, expert_dp, world["ep"], world["tp"])
