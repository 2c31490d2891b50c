"""Accelerator and network catalog as plain data. Dense (no 2:4 sparsity) datasheet peaks.

Sources: NVIDIA A100 datasheet (2021, SXM and PCIe columns), H100 datasheets (2022: SXM5 and PCIe
columns; 2023: NVL column), H200 datasheet (2024),
H800 product brief, B200 / DGX B200 datasheet (2024), ConnectX-7 / BlueField-3 product briefs;
gathered in shared/reference/hardware.md. Achievable fractions (what NCCL or cuBLAS reach of the
datasheet figure) are separate constants with their own sources, so a datasheet row stays a datasheet row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from colossus.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense BF16/FP16 tensor-core peak
    fp8_tflops: float  # dense FP8 peak (0 where the GPU has none)
    hbm_gb: float  # memory capacity, GB as the datasheet counts (1e9 bytes)
    hbm_tb_s: float  # memory bandwidth
    nvlink_gb_s: float  # NVLink bandwidth per GPU, bidirectional (datasheet convention)
    tdp_w: float  # board power limit

    def peak_flops(self, precision: str) -> float:
        """Dense tensor-core peak in FLOP/s for "bf16" or "fp8" matmuls."""
        if precision == "fp8":
            if not self.fp8_tflops:
                raise UserError(f"{self.name} has no FP8 tensor cores; use precision=bf16")
            return self.fp8_tflops * 1e12
        if precision == "fp32":
            raise UserError(f"the catalog holds {self.name}'s BF16 and FP8 peaks only; plan fp32 on a measured "
                            "machine (--cluster local-N) or use precision=bf16")
        return self.bf16_tflops * 1e12


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("A100 SXM 40GB", 312, 0, 40, 1.56, 600, 400),
    "a100-80gb": GPU("A100 SXM 80GB", 312, 0, 80, 2.04, 600, 400),
    "a100-pcie-40gb": GPU("A100 PCIe 40GB", 312, 0, 40, 1.555, 600, 250),  # NVLink bridge; A100 PCIe product brief
    "a100-pcie-80gb": GPU("A100 PCIe 80GB", 312, 0, 80, 1.935, 600, 300),
    "h100-sxm": GPU("H100 SXM5", 989, 1979, 80, 3.35, 900, 700),
    "h100-pcie": GPU("H100 PCIe", 756, 1513, 80, 2.0, 600, 350),  # H100 datasheet (2022), PCIe column
    "h100-nvl": GPU("H100 NVL", 835, 1671, 94, 3.9, 600, 400),  # H100 datasheet (2023), NVL column
    "h200-sxm": GPU("H200 SXM", 989, 1979, 141, 4.8, 900, 700),
    "h200-nvl": GPU("H200 NVL", 835, 1671, 141, 4.8, 900, 600),  # H200 datasheet (2024), NVL column (2/4-way bridge)
    "h800-sxm": GPU("H800 SXM", 989, 1979, 80, 3.35, 400, 700),
    "b200": GPU("B200", 2250, 4500, 192, 8.0, 1800, 1000),
}


@dataclass(frozen=True)
class NIC:
    name: str
    gbps: float  # line rate per port


NICS: dict[str, NIC] = {
    "hdr-200": NIC("Mellanox ConnectX-6 HDR InfiniBand", 200),  # DGX A100: 8 per node, one per GPU
    "cx7-400": NIC("NVIDIA ConnectX-7 NDR / 400GbE", 400),  # DGX/HGX H100, H200
    "bf3-400": NIC("NVIDIA BlueField-3 SuperNIC 400GbE", 400),  # Spectrum-X (Colossus): one per GPU
    "cx8-800": NIC("NVIDIA ConnectX-8 800G", 800),  # B200 / GB200 generation
}

# What collectives reach of the line rate. NCCL all-reduce bus bandwidth inside an 8x H100 node is
# ~370 GB/s of NVLink 4's 450 GB/s per direction (nccl-tests issues 212, 290), and ~46-48 GB/s of
# a 400 Gb/s (50 GB/s) NIC across nodes (nccl-tests issue 290); see shared/reference/hardware.md.
NVLINK_EFFICIENCY = 0.82
NIC_EFFICIENCY = 0.92

# Fraction of the dense peak that large BF16 GEMMs reach with cuBLAS; smaller matrices reach less
# (see costmodel.gemm_efficiency). Calibrated on the published Megatron-LM runs (A100: HFU 44-52%
# with all communication and pipeline bubbles, Narayanan et al. 2021, Table 1), and on H100 from the
# same kernels' ~75% of peak at large sizes (the planner's validation table in the README).
GEMM_EFFICIENCY = {"a100-40gb": 0.74, "a100-80gb": 0.74, "a100-pcie-40gb": 0.74, "a100-pcie-80gb": 0.74,
                   "h100-sxm": 0.64, "h100-pcie": 0.64, "h100-nvl": 0.64, "h200-sxm": 0.64, "h200-nvl": 0.64,
                   "h800-sxm": 0.64,
                   "b200": 0.70}
DEFAULT_GEMM_EFFICIENCY = 0.72

# Substrings of torch.cuda.get_device_name() -> catalog key, most specific first.
# torch reports e.g. 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL', 'NVIDIA H200'
# (the SXM part: seen on a lent machine), 'NVIDIA H200 NVL', 'NVIDIA A100-SXM4-40GB', 'NVIDIA A100-PCIE-40GB',
# 'NVIDIA A100 80GB PCIe'.
_NAME_HINTS = [("H200 NVL", "h200-nvl"), ("H200", "h200-sxm"), ("H800", "h800-sxm"), ("H100 PCIe", "h100-pcie"),
               ("H100 NVL", "h100-nvl"), ("H100", "h100-sxm"), ("B200", "b200"), ("A100-SXM4-40GB", "a100-40gb"),
               ("A100-PCIE-40GB", "a100-pcie-40gb"), ("A100 80GB PCIe", "a100-pcie-80gb"), ("A100", "a100-80gb")]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The catalog entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', if known."""
    for hint, key in _NAME_HINTS:
        if hint in device_name:
            return GPUS[key]
    return None


def gpu_key(gpu: GPU) -> str | None:
    return next((key for key, known in GPUS.items() if known == gpu), None)


def gemm_peak_efficiency(gpu: GPU) -> float:
    key = gpu_key(gpu)
    return GEMM_EFFICIENCY.get(key, DEFAULT_GEMM_EFFICIENCY) if key else DEFAULT_GEMM_EFFICIENCY


def get_gpu(spec: str | dict, where: str) -> GPU:
    """A catalog name, or a table with every GPU field (for hardware not in the catalog)."""
    if isinstance(spec, str):
        if spec not in GPUS:
            raise UserError(f"{where}: unknown GPU {spec!r}; use one of {', '.join(GPUS)} or a [cluster.gpu] table "
                            f"with {', '.join(f.name for f in fields(GPU))}")
        return GPUS[spec]
    if not isinstance(spec, dict):
        raise UserError(f"{where}: gpu must be a catalog name or a table, got {spec!r}")
    names = [f.name for f in fields(GPU)]
    unknown = sorted(set(spec) - set(names))
    missing = [n for n in names if n not in spec and n != "fp8_tflops"]
    if unknown or missing:
        raise UserError(f"{where}: [cluster.gpu] " + (f"has unknown keys {', '.join(unknown)}" if unknown else
                        f"is missing {', '.join(missing)}") + f"; its keys are {', '.join(names)}")
    values = {"fp8_tflops": 0.0, **spec}
    for name in names[1:]:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and name != "fp8_tflops"):
            raise UserError(f"{where}: gpu.{name} must be a positive number, got {value!r}")
    return GPU(str(values["name"]), *(float(values[n]) for n in names[1:]))
