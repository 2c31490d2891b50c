"""Failure model: interruptions per component, scaled by how many of each component a job uses.

Defaults are calibrated on the one public interruption log of a large run: Llama 3 405B, 54 days
on 16,384 H100 GPUs (2,048 nodes), 466 interruptions of which 47 planned and 419 unexpected
(Dubey et al. 2024, "The Llama 3 Herd of Models", section 3.3.4, Table 5). Each unexpected cause
is charged to the component it names; its rate is the count divided by (that component's count in
the Llama 3 job x 54 days). Network and software failures are charged per GPU (the switches, cables
and ranks grow with it). Planned interruptions (maintenance, upgrades) happen per job, not per GPU.
All rates can be overridden in a TOML file ([failures] table: `<cause>_per_day`, `planned_per_day`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from colossus.errors import UserError

LLAMA3_DAYS = 54
LLAMA3_GPUS = 16_384
LLAMA3_NODES = 2_048

# Unexpected interruptions by cause in the Llama 3 log: (count, component it scales with).
LLAMA3_CAUSES: dict[str, tuple[int, str]] = {
    "faulty_gpu": (148, "gpu"),
    "gpu_hbm3": (72, "gpu"),
    "software_bug": (54, "gpu"),
    "network_switch_cable": (35, "gpu"),
    "host_maintenance": (32, "node"),
    "gpu_sram": (19, "gpu"),
    "gpu_system_processor": (17, "gpu"),
    "nic": (7, "gpu"),  # one NIC per GPU
    "nccl_watchdog": (7, "gpu"),
    "silent_data_corruption": (6, "gpu"),
    "gpu_thermal": (6, "gpu"),
    "ssd": (3, "node"),
    "power_supply": (3, "node"),
    "server_chassis": (2, "node"),
    "io_expansion_board": (2, "node"),
    "dependency": (2, "node"),
    "cpu": (2, "node"),
    "system_memory": (2, "node"),
}
LLAMA3_PLANNED = 47
# Hardware causes take a node out until it is repaired or swapped for a spare; software ones do not.
SOFTWARE_CAUSES = frozenset({"software_bug", "nccl_watchdog", "dependency"})
# Causes that can take down more than one replica group at once, which replica recovery ([faults]
# replica_groups) cannot contain, so that the job restarts: a switch serves many nodes (a leaf switch of a
# rail-optimised fabric, one rail of every node under it) and the log counts switches and cables together,
# so all of them count; a dependency (storage, the scheduler) serves every node. Everything else fails in
# one node or one process: a GPU, its memory, a host, a NIC, a crashed or hung rank (software bugs and NCCL
# watchdog timeouts: a restart of the processes is what cures them, and a bug that hit every rank at once
# would not be cured by one either). `colossus simulate --job-wide` reads the log otherwise.
JOB_WIDE_CAUSES = frozenset({"network_switch_cable", "dependency"})


@dataclass
class FailureModel:
    """Per-component daily failure rates (failures per component per day)."""

    per_gpu_day: dict[str, float] = field(default_factory=dict)
    per_node_day: dict[str, float] = field(default_factory=dict)
    planned_per_day: float = LLAMA3_PLANNED / LLAMA3_DAYS  # per job

    @classmethod
    def llama3(cls) -> "FailureModel":
        model = cls()
        for cause, (count, component) in LLAMA3_CAUSES.items():
            if component == "gpu":
                model.per_gpu_day[cause] = count / (LLAMA3_GPUS * LLAMA3_DAYS)
            else:
                model.per_node_day[cause] = count / (LLAMA3_NODES * LLAMA3_DAYS)
        return model

    def unexpected_per_day(self, gpus: int, gpus_per_node: int = 8) -> dict[str, float]:
        """Expected unexpected interruptions per day of a job on `gpus` GPUs, by cause."""
        nodes = -(-gpus // gpus_per_node)
        rates = {cause: rate * gpus for cause, rate in self.per_gpu_day.items()}
        rates.update({cause: rate * nodes for cause, rate in self.per_node_day.items()})
        return rates

    def hardware_share(self, gpus: int, gpus_per_node: int = 8) -> float:
        rates = self.unexpected_per_day(gpus, gpus_per_node)
        total = sum(rates.values())
        return sum(v for k, v in rates.items() if k not in SOFTWARE_CAUSES) / total if total else 0.0

    def mtti_s(self, gpus: int, gpus_per_node: int = 8) -> float:
        """Mean time to an unexpected interruption, seconds (the failures form a Poisson process)."""
        per_day = sum(self.unexpected_per_day(gpus, gpus_per_node).values())
        return 86400 / per_day if per_day > 0 else float("inf")


def load_failure_model(path: Path) -> FailureModel:
    """The Llama 3 defaults with any rate from a [failures] table replaced: `<cause>_per_day` is per
    component (GPU or node, as listed in LLAMA3_CAUSES), `planned_per_day` per job."""
    try:
        table = tomllib.loads(path.read_text()).get("failures")
    except FileNotFoundError:
        raise UserError(f"failure model file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"failure model file {path} is not valid TOML ({exc})") from None
    if not isinstance(table, dict):
        raise UserError(f"{path} has no [failures] table")
    model = FailureModel.llama3()
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"{path}: failures.{key} must be a number >= 0, got {value!r}")
        if key == "planned_per_day":
            model.planned_per_day = float(value)
            continue
        cause = key.removesuffix("_per_day")
        if not key.endswith("_per_day") or cause not in LLAMA3_CAUSES:
            raise UserError(f"{path}: unknown key failures.{key}; use planned_per_day or <cause>_per_day with a cause "
                            f"from {', '.join(LLAMA3_CAUSES)}")
        target = model.per_gpu_day if LLAMA3_CAUSES[cause][1] == "gpu" else model.per_node_day
        target[cause] = float(value)
    return model
