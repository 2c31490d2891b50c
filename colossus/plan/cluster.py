"""Clusters as plain data: presets (Colossus and generic DGX/HGX systems) and user TOML files.

A cluster file is a `[cluster]` table: `gpu` (a catalog name, or a `[cluster.gpu]` table with the
catalog's fields), `n_gpus`, `gpus_per_node`, `nic_gbps` (per GPU); optional `name`, `pue`,
`usd_per_gpu_hour`, `node_overhead_w`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from colossus.errors import UserError
from colossus.hardware import GPU, GPUS, get_gpu


@dataclass(frozen=True)
class Cluster:
    name: str
    gpu: GPU  # the GPU the job is paced by (for a mixed fleet: the slowest, smallest one)
    n_gpus: int
    gpus_per_node: int = 8  # also the NVLink domain: tensor/context/expert groups inside it use NVLink
    nic_gbps: float = 400.0  # scale-out bandwidth per GPU (one NIC per GPU on DGX/HGX)
    pue: float = 1.2  # facility power / IT power; liquid-cooled halls run ~1.1-1.2 (assumed, no published figure for Colossus)
    usd_per_gpu_hour: float = 2.0  # default price for cost figures; --usd-per-gpu-hour overrides
    node_overhead_w: float = 3000.0  # CPUs, memory, NICs, fans per 8-GPU node: DGX H100 is 10.2 kW max with 5.6 kW of GPUs
    fleet: tuple[tuple[str, int], ...] = ()  # a mixed fleet: (catalog GPU, count); empty means n_gpus of `gpu`
    note: str = ""

    @property
    def nodes(self) -> int:
        return -(-self.n_gpus // self.gpus_per_node)

    def gpus_by_type(self) -> list[tuple[GPU, int]]:
        if not self.fleet:
            return [(self.gpu, self.n_gpus)]
        return [(GPUS[key], count) for key, count in self.fleet]

    def with_gpus(self, n_gpus: int) -> "Cluster":
        """The first n_gpus of this cluster (a job that uses part of it)."""
        if n_gpus < 1 or n_gpus > self.n_gpus:
            raise UserError(f"--gpus {n_gpus} is not between 1 and the {self.n_gpus:,} GPUs of cluster {self.name}")
        if n_gpus == self.n_gpus:
            return self
        return replace(self, n_gpus=n_gpus, fleet=_take(self.fleet, n_gpus))


def _take(fleet: tuple[tuple[str, int], ...], n: int) -> tuple[tuple[str, int], ...]:
    taken = []
    for key, count in fleet:
        if n <= 0:
            break
        taken.append((key, min(count, n)))
        n -= count
    return tuple(taken)


COLOSSUS_NOTE_200K = (
    "mixed fleet planned as one synchronous job paced by its slowest, smallest GPU: the H100 (the H200 has the "
    "same 989 TFLOP/s BF16 peak, so compute-bound steps lose little; its extra memory is not used)"
)


def _colossus_100k() -> Cluster:
    # xAI Colossus, Memphis: ~100,000 liquid-cooled H100 SXM in Supermicro HGX servers of 8 GPUs, 64 per
    # rack, one 400 GbE BlueField-3 SuperNIC per GPU on a three-tier Spectrum-X fabric (NVIDIA and
    # Supermicro announcements, 2024; shared/reference/hardware.md).
    return Cluster("colossus-100k", GPUS["h100-sxm"], 100_000, 8, 400.0, pue=1.2, usd_per_gpu_hour=2.0,
                   note="100,000 H100 SXM, 8 per node, 64 per rack, 400 GbE Spectrum-X per GPU")


def _colossus_200k() -> Cluster:
    # The announced expansion: +50,000 H200 and +50,000 H100 on the same fabric.
    return Cluster("colossus-200k", GPUS["h100-sxm"], 200_000, 8, 400.0, pue=1.2, usd_per_gpu_hour=2.0,
                   fleet=(("h100-sxm", 150_000), ("h200-sxm", 50_000)), note=COLOSSUS_NOTE_200K)


# Generic systems, N = number of GPUs (a multiple of 8): DGX A100 has 8 HDR 200 Gb/s HCAs, DGX/HGX
# H100 and HGX H200 8 ConnectX-7 400 Gb/s, one per GPU (NVIDIA DGX A100 / H100 user guides).
_GENERIC = {
    "dgx-a100": ("a100-80gb", 200.0, 3300.0, 1.2),  # DGX A100: 6.5 kW max, 3.2 kW of GPUs
    "dgx-h100": ("h100-sxm", 400.0, 4600.0, 2.0),  # DGX H100: 10.2 kW max, 5.6 kW of GPUs
    "hgx-h200": ("h200-sxm", 400.0, 4600.0, 2.5),
}


def local_cluster(profile: object, processes: int) -> Cluster:
    """This machine as a cluster of `processes` ranks, described by a measured MachineProfile (the
    cost model then takes compute and all-reduce times from the profile, not a datasheet)."""
    peak = profile.peak_flops()
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 / processes  # RAM per process
    device = GPU(profile.name, peak / 1e12, 0.0, memory_gb, profile.memory_bytes_per_s / 1e12, 1.0, 100.0)
    return Cluster(f"local-{processes}", device, processes, processes, 1.0, pue=1.0, usd_per_gpu_hour=0.0,
                   node_overhead_w=0.0, note=f"this machine, measured by `colossus bench` ({profile.name})")


def preset_names() -> list[str]:
    return ["colossus-100k", "colossus-200k", *(f"{name}-N" for name in _GENERIC)]


def get_cluster(spec: str) -> Cluster:
    """A preset name or a TOML file with a [cluster] table."""
    if spec == "colossus-100k":
        return _colossus_100k()
    if spec == "colossus-200k":
        return _colossus_200k()
    match = re.fullmatch(r"(dgx-a100|dgx-h100|hgx-h200)-(\d+)", spec)
    if match:
        family, n = match.group(1), int(match.group(2))
        if n < 1 or n % 8:
            raise UserError(f"cluster {spec}: the GPU count must be a positive multiple of 8 (8 per node), got {n}")
        gpu, nic, overhead, price = _GENERIC[family]
        return Cluster(spec, GPUS[gpu], n, 8, nic, usd_per_gpu_hour=price, node_overhead_w=overhead)
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return load_cluster_file(path)
    raise UserError(f"unknown cluster {spec!r}; use one of {', '.join(preset_names())} or a TOML file with a [cluster] table")


def load_cluster_file(path: Path) -> Cluster:
    try:
        tables = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"cluster file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cluster file {path} is not valid TOML ({exc})") from None
    table = tables.get("cluster")
    if not isinstance(table, dict):
        raise UserError(f"cluster file {path} has no [cluster] table (keys: gpu, n_gpus, gpus_per_node, nic_gbps)")
    known = {"name", "gpu", "n_gpus", "gpus_per_node", "nic_gbps", "pue", "usd_per_gpu_hour", "node_overhead_w"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"{path}: unknown key cluster.{unknown[0]}; the keys are {', '.join(sorted(known))}")
    if "gpu" not in table or "n_gpus" not in table:
        raise UserError(f"{path}: [cluster] needs gpu and n_gpus")
    gpu = get_gpu(table["gpu"], str(path))
    values = {}
    for key, kind, default in (("n_gpus", int, None), ("gpus_per_node", int, 8), ("nic_gbps", float, 400.0),
                               ("pue", float, 1.2), ("usd_per_gpu_hour", float, 2.0), ("node_overhead_w", float, 3000.0)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise UserError(f"{path}: cluster.{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if value <= 0 or (key == "pue" and value < 1):
            raise UserError(f"{path}: cluster.{key} must be positive{' and at least 1' if key == 'pue' else ''}, got {value}")
        values[key] = kind(value)
    return Cluster(str(table.get("name", path.stem)), gpu, **values)
