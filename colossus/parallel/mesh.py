"""The DeviceMesh of a Layout, and the views of it each parallelism uses.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, ep, cp, tp. Data parallelism spans
dp_replicate x dp_shard x ep (every one of those ranks reads different sequences); context-parallel
ranks each hold a part of the same sequences and tensor-parallel ranks share them whole. Under
ZeRO 1-3 non-expert weights are sharded by FSDP over dp_shard x ep x cp ("fsdp", replicated over
dp_replicate: HSDP) and expert weights, split over ep, over dp_shard x cp; under ZeRO 0 both are
replicated over every rank that holds them and reads other tokens (FSDP2's replicate mode: plain data
parallelism with gradients all-reduced). Each pipeline stage has its own copy of all of this.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from colossus.layout import Layout


@dataclass(frozen=True)
class Meshes:
    """The DeviceMesh views each parallelism uses, sliced once from the world mesh."""

    world: object  # dims pp, dp_replicate, dp_shard, ep, cp, tp
    dp: object  # flattened dp_replicate x dp_shard x ep: who reads which data
    tokens: object  # flattened dp_replicate x dp_shard x ep x cp: who holds which tokens (loss means, expert loads)
    dense: object  # FSDP of non-expert weights (2-D [replicate, shard] for HSDP and ZeRO 0)
    expert_dp: object  # FSDP of expert weights, likewise
    ep: object
    tp: object
    cp: object
    pp: object
    experts: object = None  # [ep, tp] where both split the experts (expert tensor parallelism)


NAMES = ("pp", "dp_replicate", "dp_shard", "ep", "cp", "tp")


def build_mesh(layout: Layout, device_type: str) -> Meshes:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    world = init_device_mesh(device_type, tuple(getattr(layout, name) for name in NAMES), mesh_dim_names=NAMES)
    dp = world["dp_replicate", "dp_shard", "ep"]._flatten("dp")
    tokens = world["dp_replicate", "dp_shard", "ep", "cp"]._flatten("tokens")
    views = dict(ep=world["ep"], tp=world["tp"], cp=world["cp"], pp=world["pp"], experts=_expert_mesh(world, layout))
    if layout.zero == 0:
        # Replicate everything over the ranks that read other tokens: FSDP2 on a [replicate, shard] mesh
        # whose shard dimension has one rank (dp_shard = 1 under ZeRO 0). Dense weights replicate over
        # dp_replicate x ep x cp, experts over the ranks holding the same experts: dp_replicate x cp.
        simple = world["dp_replicate", "dp_shard"]
        dense = simple if layout.ep == layout.cp == 1 else _replicas(DeviceMesh, device_type, world, ("pp", "tp"))
        expert_dp = simple if layout.cp == 1 else _replicas(DeviceMesh, device_type, world, ("pp", "ep", "tp"))
        return Meshes(world, dp, tokens, dense, expert_dp, **views)
    with warnings.catch_warnings():  # HSDP needs a 2-D slice that includes the flattened dimension
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        fsdp = world["dp_shard", "ep", "cp"]._flatten("fsdp")
        dense = world["dp_replicate", "fsdp"] if layout.dp_replicate > 1 else fsdp
        expert_fsdp = world["dp_shard", "cp"]._flatten("expert_fsdp")
        expert_dp = world["dp_replicate", "expert_fsdp"] if layout.dp_replicate > 1 else expert_fsdp
    return Meshes(world, dp, tokens, dense, expert_dp, **views)


def _replicas(DeviceMesh, device_type: str, world, fixed: tuple[str, ...]):
    """A [replicas, 1] mesh of the ranks that share this rank's coordinates on the `fixed` dimensions
    of the world mesh and differ on the others (a mesh FSDP2 replicates over)."""
    order = [NAMES.index(name) for name in fixed] + [i for i, name in enumerate(NAMES) if name not in fixed]
    groups = world.mesh.permute(order).reshape(-1, world.mesh.numel() // _size(world, fixed), 1)
    return DeviceMesh(device_type, groups, mesh_dim_names=("fixed", "replicas", "one"))["replicas", "one"]


def _size(world, names: tuple[str, ...]) -> int:
    size = 1
    for name in names:
        size *= world.mesh.shape[NAMES.index(name)]
    return size


def _expert_mesh(world, layout: Layout):
    return world["ep", "tp"] if layout.ep > 1 and layout.tp > 1 else None
