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
    sms: int = 0  # streaming multiprocessors, for GEMM wave quantisation (0: unknown, not modelled)
    arch: str = ""  # ampere, hopper or blackwell: which fitted large-GEMM efficiency applies


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


# SM counts: A100 108 (A100 whitepaper, 2020), H100 SXM5 132 and PCIe 114 (H100 whitepaper, 2022; the NVL
# part is the SXM die), H200 and H800 the H100 SXM5 die (132), B200 148 (two dies of 74; Blackwell
# architecture technical brief, 2024).
GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("A100 SXM 40GB", 312, 0, 40, 1.56, 600, 400, 108, "ampere"),
    "a100-80gb": GPU("A100 SXM 80GB", 312, 0, 80, 2.04, 600, 400, 108, "ampere"),
    "a100-pcie-40gb": GPU("A100 PCIe 40GB", 312, 0, 40, 1.555, 600, 250, 108, "ampere"),  # NVLink bridge; A100 PCIe product brief
    "a100-pcie-80gb": GPU("A100 PCIe 80GB", 312, 0, 80, 1.935, 600, 300, 108, "ampere"),
    "h100-sxm": GPU("H100 SXM5", 989, 1979, 80, 3.35, 900, 700, 132, "hopper"),
    "h100-pcie": GPU("H100 PCIe", 756, 1513, 80, 2.0, 600, 350, 114, "hopper"),  # H100 datasheet (2022), PCIe column
    "h100-nvl": GPU("H100 NVL", 835, 1671, 94, 3.9, 600, 400, 132, "hopper"),  # H100 datasheet (2023), NVL column
    "h200-sxm": GPU("H200 SXM", 989, 1979, 141, 4.8, 900, 700, 132, "hopper"),
    "h200-nvl": GPU("H200 NVL", 835, 1671, 141, 4.8, 900, 600, 132, "hopper"),  # H200 datasheet (2024), NVL column (2/4-way bridge)
    "h800-sxm": GPU("H800 SXM", 989, 1979, 80, 3.35, 400, 700, 132, "hopper"),
    "b200": GPU("B200", 2250, 4500, 192, 8.0, 1800, 1000, 148, "blackwell"),
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

# Fraction of the dense peak that large GEMMs reach, per architecture: the one figure of a GEMM no
# datasheet gives. Everything smaller is a mechanism (costmodel.gemm_efficiency: tile and wave
# quantisation over the SMs). Fitted on the published runs of each architecture
# (`python -m colossus.plan.validation --fit` prints the fit; tests/test_plan.py holds these to it).
# Blackwell has no published run in the table yet: it takes Hopper's figure, an assumption.
GEMM_EFFICIENCY = {"ampere": 0.70, "hopper": 0.63}
GEMM_EFFICIENCY["blackwell"] = GEMM_EFFICIENCY["hopper"]
DEFAULT_GEMM_EFFICIENCY = 0.72  # a GPU table without arch

# Fused causal attention (head dim 128, long sequences) reaches a published fraction of the dense bf16
# peak, forward + backward, that depends on the kernel more than on the GEMM library: FlashAttention-2
# was written for Ampere and runs Hopper without its new instructions. Each figure is the fwd+bwd rate
# (FLOPs counted as fwd 4*s^2*d*heads/2 causal, bwd 2.5x fwd) over the peak the papers use (A100 312,
# H100 989 TFLOP/s):
# - flash2 on Ampere: 189 TFLOP/s, causal hd128, 16k tokens (Dao 2023, FlashAttention-2, Fig. 4).
# - flash2 on Hopper: 308 TFLOP/s, causal hd128, 8k (Dao 2023, Fig. 7; Shah et al. 2024,
#   FlashAttention-3, "FlashAttention-2 achieving only 35% utilization on the H100").
# - flash3 on Hopper: forward 602 (causal hd128 8k, Shah et al. 2024 Fig. 5), backward 559 (non-causal
#   hd128 8k, Fig. 6; no causal backward is published): 3.5 / (1/602 + 2.5/559) = 570 TFLOP/s.
# - cudnn on Hopper (Transformer Engine's default there; PyTorch SDPA's first choice on sm90 from 2.9):
#   forward 529, backward 518 (cuDNN 9.1, the same figures): 521 TFLOP/s.
# Ampere has no flash3/cudnn figure: it runs flash2's. Blackwell, with no figure yet, takes Hopper's.
ATTENTION_KERNELS = ("flash2", "flash3", "cudnn")
ATTENTION_EFFICIENCY = {
    ("flash2", "ampere"): 189 / 312,
    ("flash2", "hopper"): 308 / 989,
    ("flash3", "hopper"): 570 / 989,
    ("cudnn", "hopper"): 521 / 989,
}


def attention_efficiency(gpu: GPU, kernel: str) -> float:
    """Fraction of the dense peak a fused causal attention kernel reaches forward + backward on this GPU."""
    arch = "hopper" if gpu.arch == "blackwell" else gpu.arch
    if (kernel, arch) in ATTENTION_EFFICIENCY:
        return ATTENTION_EFFICIENCY[kernel, arch]
    if ("flash2", arch) in ATTENTION_EFFICIENCY:
        return ATTENTION_EFFICIENCY["flash2", arch]
    return ATTENTION_EFFICIENCY["cudnn", "hopper"]

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


def gemm_peak_efficiency(gpu: GPU, fitted: dict[str, float] | None = None) -> float:
    """The large-GEMM fraction of peak for this GPU's architecture (from `fitted` where given: a refit)."""
    table = GEMM_EFFICIENCY if fitted is None else {**GEMM_EFFICIENCY, **fitted}
    return table.get(gpu.arch, DEFAULT_GEMM_EFFICIENCY)


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
    optional = {"fp8_tflops": 0.0, "sms": 0, "arch": ""}
    missing = [n for n in names if n not in spec and n not in optional]
    if unknown or missing:
        raise UserError(f"{where}: [cluster.gpu] " + (f"has unknown keys {', '.join(unknown)}" if unknown else
                        f"is missing {', '.join(missing)}") + f"; its keys are {', '.join(names)}")
    values = {**optional, **spec}
    if values["arch"] not in ("", *GEMM_EFFICIENCY):
        raise UserError(f"{where}: gpu.arch must be one of {', '.join(GEMM_EFFICIENCY)}, got {values['arch']!r}")
    numbers = [n for n in names[1:] if n != "arch"]
    for name in numbers:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and name not in optional):
            raise UserError(f"{where}: gpu.{name} must be a positive number, got {value!r}")
    return GPU(str(values["name"]), *(float(values[n]) for n in numbers if n != "sms"), int(values["sms"]),
               str(values["arch"]))
