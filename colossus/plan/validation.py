"""The planner against published large runs (plan/data/published_runs.toml, each row with its source).

`python -m colossus.plan.validation` prints the predicted-vs-published table that the README shows;
tests/test_plan.py holds the planner to it (median step-time error at most 10%, none over 25%).
Layout keys a paper does not state (micro-batch, interleaving) are searched, as `colossus plan` does.
"""

from __future__ import annotations

import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path

from colossus.config import config_from_dict
from colossus.plan.cluster import Cluster
from colossus.plan.costmodel import Prediction, Software
from colossus.hardware import get_gpu
from colossus.plan.search import LAYOUT_KEYS, search

DATA = Path(__file__).parent / "data" / "published_runs.toml"


@dataclass
class Checked:
    name: str
    source: str
    published_s: float
    predicted: Prediction

    @property
    def error(self) -> float:
        return self.predicted.step_time_s / self.published_s - 1


def published_runs(path: Path = DATA) -> list[dict]:
    return tomllib.loads(path.read_text())["run"]


def check(row: dict) -> Checked:
    """The planner's best prediction for a published run with its published layout keys fixed."""
    model = config_from_dict({"model": row["model"]}).model
    spec = row["cluster"]
    cluster = Cluster(row["name"], get_gpu(spec["gpu"], row["name"]), spec["n_gpus"], spec["gpus_per_node"],
                      spec["nic_gbps"])
    fixed = {key: value for key, value in row["layout"].items() if key in LAYOUT_KEYS}
    fixed.setdefault("cp", 1)
    fixed.setdefault("ep", 1)
    result = search(model, cluster, fixed, top=1, software=Software(**row.get("software", {})), spares=False)
    best = result.ranked[0] if result.ranked else result.best_unfit
    return Checked(row["name"], row["source"], row["step_time_s"], best)


def check_all(path: Path = DATA) -> list[Checked]:
    return [check(row) for row in published_runs(path) if row.get("validate", False)]


def markdown_table(checked: list[Checked]) -> str:
    lines = ["| run | GPUs | layout (searched: mbs, vpp) | published s/step | predicted | error |",
             "|---|---|---|---|---|---|"]
    for c in checked:
        lay = c.predicted.layout
        lines.append(f"| {c.name} | {lay.world_size:,} | tp{lay.tp} pp{lay.pp}" + (f"x{lay.vpp}" if lay.vpp > 1 else "")
                     + f" dp{lay.dp} mbs{lay.mbs} gbs{lay.gbs} {lay.recompute} | {c.published_s:.2f} | "
                     f"{c.predicted.step_time_s:.2f} | {c.error:+.1%} |")
    errors = [abs(c.error) for c in checked]
    lines.append(f"\nmedian |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}, {len(checked)} runs")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(check_all()))
