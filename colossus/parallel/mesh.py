"""The DeviceMesh of a Layout, and the views of it each parallelism uses.

Mesh dimensions, outermost first: dp_replicate, dp_shard, ep, tp (pipeline and context parallel
dimensions join when the trainer runs them). Data parallelism spans dp_replicate x dp_shard x ep
(every one of those ranks reads different sequences); tensor-parallel ranks share their data.
Under ZeRO 1-3 non-expert weights are sharded by FSDP over dp_shard x ep ("fsdp", replicated over
dp_replicate: HSDP) and expert weights, split over ep, are sharded over dp_shard; under ZeRO 0 both
are replicated over every data-parallel rank that holds them (FSDP2's replicate mode: plain data
parallelism with gradients all-reduced).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from colossus.layout import Layout


@dataclass(frozen=True)
class Meshes:
    """The DeviceMesh views each parallelism uses, sliced once from the world mesh."""

    world: object  # dims dp_replicate, dp_shard, ep, tp
    dp: object  # flattened dp_replicate x dp_shard x ep: who reads which data
    dense: object  # FSDP of non-expert weights (2-D [replicate, shard] for HSDP and ZeRO 0)
    expert_dp: object  # FSDP of expert weights, likewise
    ep: object
    tp: object
    experts: object = None  # [ep, tp] where both split the experts (expert tensor parallelism)


def build_mesh(layout: Layout, device_type: str) -> Meshes:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    names = ("dp_replicate", "dp_shard", "ep", "tp")
    world = init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.ep, layout.tp),
                             mesh_dim_names=names)
    dp = world["dp_replicate", "dp_shard", "ep"]._flatten("dp")
    if layout.zero == 0:
        # Replicate everything over the data-parallel ranks: FSDP2 on a [replicate, shard] mesh whose shard
        # dimension has one rank (dp_shard = 1 under ZeRO 0). Experts replicate over the ranks holding
        # the same experts; the dense weights over every data-parallel rank, ep ranks included, which
        # with ep > 1 is a mesh of its own.
        replicate = world["dp_replicate", "dp_shard"]
        dense = replicate
        if layout.ep > 1:
            ranks = world.mesh.reshape(-1, 1, layout.tp)  # [dp_replicate x ep, 1, tp]
            dense = DeviceMesh(device_type, ranks, mesh_dim_names=("dp_all", "one", "tp_all"))["dp_all", "one"]
        return Meshes(world, dp, dense, replicate, world["ep"], world["tp"], _expert_mesh(world, layout))
    fsdp = world["dp_shard", "ep"]._flatten("fsdp")
    with warnings.catch_warnings():  # HSDP needs a 2-D slice that includes the flattened dimension
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        dense = world["dp_replicate", "fsdp"] if layout.dp_replicate > 1 else fsdp
    expert_dp = world["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else world["dp_shard"]
    return Meshes(world, dp, dense, expert_dp, world["ep"], world["tp"], _expert_mesh(world, layout))


def _expert_mesh(world, layout: Layout):
    return world["ep", "tp"] if layout.ep > 1 and layout.tp > 1 else None
