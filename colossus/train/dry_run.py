"""`colossus train CONFIG --dry-run --world-size N`: the run's real sharded model and optimizer, built
at full size for one rank of an N-rank job, on this machine, in seconds: no data, no compute.

torch's fake process group (collectives that return at once, for any world size) stands in for the
cluster and every tensor lives on the meta device (shapes, no storage), while the trainer's own code
builds the device mesh, applies tensor, expert and data parallelism and creates AdamW. The figures are
those of rank 0, which holds the most: FSDP gives the first ranks of a group the larger chunks of each
parameter. Beside them stand the planner's figures for the same layout (costmodel.state_bytes), so the
dry run is the planner's memory check at the scale of a real cluster.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from colossus.config import RunConfig
from colossus.models.grok import build_model
from colossus.parallel.mesh import build_mesh
from colossus.parallel.parallelize import parallelize
from colossus.parallel.runtime import resolve_layout
from colossus.plan.costmodel import state_bytes
from colossus.train.optim import build_optimizer

FIELDS = ("param_bytes_per_rank_max", "grad_bytes_per_rank_max", "optimizer_bytes_per_rank_max")


def dry_run(config: RunConfig, world_size: int) -> dict:
    """Build rank 0 of `world_size` ranks and return its parameter, gradient and optimizer-state bytes,
    with the planner's figures for the same layout under "planner"."""
    device_type = "cpu" if config.train.device == "cpu" else "cuda"  # the device the run is for (auto: a GPU)
    layout = resolve_layout(config, world_size, device_type)
    from torch.testing._internal.distributed.fake_pg import FakeStore  # torch's fake process group

    started = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = build_mesh(layout, "cpu") if world_size > 1 else None
        model = build_model(config.model, "meta")
        parallelize(model, layout, mesh, torch.device(device_type), compile=False)
        optimizer = build_optimizer(model, config.train, torch.device("cpu"))
        locals_ = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        param_bytes = sum(t.numel() * t.element_size() for t in locals_)
        # FSDP reduce-scatters each gradient into the parameter's own shard, in its dtype; AdamW keeps two
        # moments per element of every parameter it steps (created at the first step).
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        moments = sum(2 * (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in stepped)
    finally:
        dist.destroy_process_group()
    planner = state_bytes(config.model, layout)
    return {
        "world_size": world_size, "rank": 0, "layout": layout.to_json(),
        "param_bytes_per_rank_max": param_bytes, "grad_bytes_per_rank_max": param_bytes,
        "optimizer_bytes_per_rank_max": moments,
        "planner": {"param_bytes_per_rank_max": planner["params"], "grad_bytes_per_rank_max": planner["gradients"],
                    "optimizer_bytes_per_rank_max": planner["optimizer"], "copy_bytes": planner["copies"]},
        "build_s": time.perf_counter() - started,
    }
