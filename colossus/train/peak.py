"""The peak FLOP/s that MFU is measured against: the datasheet peak of a known GPU in the run's
precision, and on a CPU the GEMM peak of this machine's profile (colossus.plan.profile.gemm_peak_flops,
the one measurement the planner and the benchmarks use too)."""

from __future__ import annotations

import torch

from colossus.hardware import gpu_from_device_name


def device_peak_flops(device: torch.device, precision: str, cpu_profile: object | None = None) -> float | None:
    """Peak FLOP/s for MFU, or None where none is known (an unknown accelerator, fp32 on a GPU)."""
    if device.type == "cpu":
        return cpu_profile.peak_flops() if cpu_profile is not None else None
    if device.type == "cuda":
        gpu = gpu_from_device_name(torch.cuda.get_device_name(device))
        if gpu is None or precision == "fp32":
            return None
        return gpu.peak_flops(precision)
    return None
