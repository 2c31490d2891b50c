"""Sharded, layout-independent initialisation: the model is built on the meta device (nothing
allocated), parallelised there, then each rank allocates only its own shards and fills them.

Every element's initial value is a pure function of (seed, parameter name, element index)
(Transformer.initial_values, models/rng.py), so a shard is filled from the global indices of the
elements it holds: any layout starts from exactly the model one process would build, no rank ever
holds a tensor it does not own, and no "seed checkpoint" written by one device is needed (torchtitan
needs one for the same guarantee).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from colossus.models.grok import Transformer
from colossus.parallel.pipeline import saved_name

# Module names that wrappers insert into parameter names (activation checkpointing, torch.compile).
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """The parameter's name in the plain model (what checkpoints and the initial values use)."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def global_index(param: torch.Tensor) -> torch.Tensor:
    """The flat indices, into the whole parameter, of the elements this rank holds (int64, in the shape
    of its local shard): a block of the global tensor, at the offset its placements give it."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    else:
        shape, offset = tuple(param.shape), (0,) * param.ndim
    device = param.to_local().device if isinstance(param, DTensor) else param.device
    strides = torch.ones(len(param.shape), dtype=torch.int64)
    for dim in range(len(param.shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * param.shape[dim + 1]
    index = torch.zeros(shape, dtype=torch.int64, device=device)
    for dim, (size, start) in enumerate(zip(shape, offset)):
        view = [1] * len(shape)
        view[dim] = size
        index += (torch.arange(start, start + size, device=device) * int(strides[dim])).view(view)
    return index


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards of a model built on the meta device (and parallelised there) on
    `device`, and fill them with the values one process would have given the whole model."""
    model.to_empty(device=device)
    model.init_buffers()  # to_empty leaves buffers uninitialised too
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.numel() == 0:  # a rank that holds none of an unevenly sharded parameter
            continue
        # A pipeline's last stage initialises its copy of a tied embedding as the embedding.
        name = saved_name(model, canonical_name(name))
        local.copy_(model.initial_values(name, global_index(param), seed).to(local.dtype))
