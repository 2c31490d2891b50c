"""Accelerator catalog as plain data. Dense (no 2:4 sparsity) datasheet peaks.

Sources: NVIDIA A100 datasheet (2021), H100 datasheet (2023, SXM5 column), H200 datasheet (2024),
H800 product brief, B200 / DGX B200 datasheet (2024); gathered in shared/reference/hardware.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense BF16/FP16 tensor-core peak
    fp8_tflops: float  # dense FP8 peak (0 where the GPU has none)
    hbm_gb: float
    hbm_tb_s: float
    nvlink_gb_s: float  # bidirectional per GPU
    tdp_w: float


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("A100 SXM 40GB", 312, 0, 40, 1.56, 600, 400),
    "a100-80gb": GPU("A100 SXM 80GB", 312, 0, 80, 2.04, 600, 400),
    "h100-sxm": GPU("H100 SXM5", 989, 1979, 80, 3.35, 900, 700),
    "h200-sxm": GPU("H200 SXM", 989, 1979, 141, 4.8, 900, 700),
    "h800-sxm": GPU("H800 SXM", 989, 1979, 80, 3.35, 400, 700),
    "b200": GPU("B200", 2250, 4500, 192, 8.0, 1800, 1000),
}

# Substrings of torch.cuda.get_device_name() -> catalog key, most specific first.
_NAME_HINTS = [("H200", "h200-sxm"), ("H800", "h800-sxm"), ("H100", "h100-sxm"), ("B200", "b200"),
               ("A100-SXM4-40GB", "a100-40gb"), ("A100", "a100-80gb")]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The catalog entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', if known."""
    for hint, key in _NAME_HINTS:
        if hint in device_name:
            return GPUS[key]
    return None
