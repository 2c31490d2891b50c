"""Counting a step's FLOPs with torch.utils.flop_counter, to cross-check the model math.

FlopCounterMode knows matmuls and attention but not torch._grouped_mm (the MoE experts' kernel), so
its formula is registered here: a grouped matmul does the work of one matmul over all its rows. A
compiled FlexAttention kernel cannot run inside the counter: while counting, the model's attention
cores that pick it run it beside the counter (attention_outside_dispatch_modes), which credits its
FLOPs. The model itself knows nothing of this.
"""

from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode_stack
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 m k n summed over the groups: [M, K] x [G, K, N] -> [M, N] splits M; [K, M] x [M, N] -> [G, K, N]
    (the weight gradient) splits the contraction M."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    # batched [G, M, K] x [G, K, N]: every group's full product
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


def counted_flops(step: Callable[[], object], model: torch.nn.Module | None = None) -> tuple[object, int]:
    """Run `step` (which runs `model`) under FlopCounterMode; returns its result and the FLOPs counted
    (this process)."""
    mapping = {}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        mapping[torch.ops.aten._grouped_mm] = grouped_mm_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, _flex_beside_counter(model):
        result = step()
    return result, counter.get_total_flops()


@contextmanager
def _flex_beside_counter(model: torch.nn.Module | None) -> Iterator[None]:
    """While counting, every attention core of `model` (models.grok.AttentionCore: it has kernel_for)
    that picks FlexAttention runs it outside the counter's dispatch modes."""
    from colossus.models.grok import AttentionCore

    cores = [m for m in (model.modules() if model is not None else ()) if isinstance(m, AttentionCore)]

    def forward(core: AttentionCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None) -> torch.Tensor:
        kernel = core.kernel_for(q, k)
        positions = None if q_positions is None else (q_positions, q_positions if k_positions is None else k_positions)
        if kernel != "flex":
            return core.attend(kernel, q, k, v, positions)
        return attention_outside_dispatch_modes(functools.partial(core.attend, "flex", positions=positions), q, k, v)

    for core in cores:
        core.forward = types.MethodType(forward, core)
    try:
        yield
    finally:
        for core in cores:
            del core.forward


def active_flop_counters() -> list[FlopCounterMode]:
    """The FlopCounterModes counting now (torch pushes a dispatch mode that holds its counter)."""
    modes = _get_current_dispatch_mode_stack()
    counters = [mode if isinstance(mode, FlopCounterMode) else getattr(mode, "counter", None) for mode in modes]
    return [counter for counter in counters if isinstance(counter, FlopCounterMode)]


def attention_outside_dispatch_modes(kernel: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                                     v: torch.Tensor) -> torch.Tensor:
    """kernel(q, k, v), an attention kernel that cannot run inside the active dispatch modes (under
    FlopCounterMode torch.compile does not compile, and eager FlexAttention fails), run outside them,
    forward and backward, on detached inputs and with the counters' module tracking paused (its hooks
    would otherwise be traced into the kernel's graph, and fail there); its FLOPs are credited to the
    active counters as torch counts scaled_dot_product_attention."""
    return _OutsideDispatchModes.apply(kernel, active_flop_counters(), q, k, v)


@contextmanager
def _module_tracking_paused(counters: list[FlopCounterMode]) -> Iterator[None]:
    """Lift the global module hooks of the counters' ModTrackers (torch.utils.module_tracker) for a
    while: they would fire on the fx modules a compiled kernel traces (FlexAttention's score_mod)."""
    trackers = [tracker for tracker in (getattr(counter, "mod_tracker", None) for counter in counters)
                if hasattr(tracker, "_fw_pre_handle") and hasattr(tracker, "_fw_post_handle")]
    for tracker in trackers:
        tracker._fw_pre_handle.remove()
        tracker._fw_post_handle.remove()
    try:
        yield
    finally:
        for tracker in trackers:
            tracker._fw_pre_handle = register_module_forward_pre_hook(tracker._fw_pre_hook)
            tracker._fw_post_handle = register_module_forward_hook(tracker._fw_post_hook)


def _credit(counters: list[FlopCounterMode], flops: int) -> None:
    for counter in counters:
        counter.flop_counts["Global"][torch.ops.aten._scaled_dot_product_flash_attention] += flops


def _query_shaped(q: torch.Tensor, kv: torch.Tensor) -> tuple[int, ...]:
    # key/value heads broadcast over their query group (the formula of older torch wants equal heads)
    return (kv.shape[0], q.shape[1], *kv.shape[2:])


class _OutsideDispatchModes(torch.autograd.Function):
    """The kernel's own autograd graph, built and run outside the modes, as one node of the outer graph."""

    @staticmethod
    def forward(ctx, kernel, counters, q, k, v):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        with _disable_current_modes(), _module_tracking_paused(counters), torch.enable_grad():
            out = kernel(*inputs)
        ctx.inputs, ctx.out, ctx.counters = inputs, out, counters
        _credit(counters, sdpa_flop_count(q.shape, _query_shaped(q, k), _query_shaped(q, v)))
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        inputs, out = ctx.inputs, ctx.out
        wanted = [t for t in inputs if t.requires_grad]
        with _disable_current_modes(), _module_tracking_paused(ctx.counters):
            grads = iter(torch.autograd.grad(out, wanted, grad))
        q, k, v = inputs
        _credit(ctx.counters, sdpa_backward_flop_count(grad.shape, q.shape, _query_shaped(q, k), _query_shaped(q, v)))
        return None, None, *(next(grads) if t.requires_grad else None for t in inputs)
