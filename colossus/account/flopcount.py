"""Counting a step's FLOPs with torch.utils.flop_counter, to cross-check the model math.

FlopCounterMode knows matmuls and attention but not torch._grouped_mm (the MoE experts' kernel), so
its formula is registered here: a grouped matmul does the work of one matmul over all its rows.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 m k n summed over the groups: [M, K] x [G, K, N] -> [M, N] splits M; [K, M] x [M, N] -> [G, K, N]
    (the weight gradient) splits the contraction M."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    # batched [G, M, K] x [G, K, N]: every group's full product
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


def counted_flops(step: Callable[[], object]) -> tuple[object, int]:
    """Run `step` under FlopCounterMode; returns its result and the FLOPs counted (this process)."""
    mapping = {}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        mapping[torch.ops.aten._grouped_mm] = grouped_mm_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = step()
    return result, counter.get_total_flops()
