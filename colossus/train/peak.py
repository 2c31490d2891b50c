"""The peak FLOP/s that MFU is measured against: the datasheet BF16 peak on a known GPU, and on a
CPU a GEMM peak measured once (fp32 matmul, median of several) and cached per CPU and thread count."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from colossus.plan.hardware import gpu_from_device_name


def measure_cpu_gemm_flops(size: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an fp32 size^3 matmul with torch's current thread count."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_flops(cache_dir: Path) -> float:
    """Cached measured GEMM peak for this CPU model, thread count and torch version."""
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = cache_dir / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    if key not in cached:
        cached[key] = measure_cpu_gemm_flops()
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    return cached[key]


def device_peak_flops(device: torch.device, cache_dir: Path) -> float | None:
    """Peak FLOP/s for MFU, or None for an unknown accelerator (MFU is then not reported)."""
    if device.type == "cpu":
        return cpu_peak_flops(cache_dir)
    if device.type == "cuda":
        gpu = gpu_from_device_name(torch.cuda.get_device_name(device))
        return gpu.bf16_tflops * 1e12 if gpu else None
    return None
