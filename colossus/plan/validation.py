"""The planner against published large runs (plan/data/published_runs.toml, each row with its source).

`python -m colossus.plan.validation` prints two predicted-vs-published tables that the README quotes:
in sample (the cost model's fitted constants as shipped) and left out (each source's rows predicted with
the constants refit without that source). `--fit` prints the constants the published rows give.
Layout keys a paper does not state (micro-batch, interleaving) are searched, as `colossus plan` does.

The fitted constants are only the large-GEMM efficiency of each GPU architecture
(colossus.hardware.GEMM_EFFICIENCY); everything else in the cost model is a mechanism with datasheet
inputs. A fit picks, per architecture, the value on a 0.01 grid that minimises the mean |log| error of
that architecture's rows. Nothing is tuned per row.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path

from colossus.config import config_from_dict
from colossus.hardware import GEMM_EFFICIENCY, get_gpu
from colossus.plan.cluster import Cluster
from colossus.plan.costmodel import Prediction, Software
from colossus.plan.search import LAYOUT_KEYS, search

DATA = Path(__file__).parent / "data" / "published_runs.toml"
GRID = [round(0.40 + 0.01 * i, 2) for i in range(56)]  # large-GEMM efficiencies a fit may choose: 0.40-0.95


@dataclass
class Checked:
    name: str
    source: str
    published_s: float
    predicted: Prediction
    fits: bool = True  # False: the model's memory estimate says the published layout does not fit

    @property
    def error(self) -> float:
        return self.predicted.step_time_s / self.published_s - 1


def published_runs(path: Path = DATA) -> list[dict]:
    return tomllib.loads(path.read_text())["run"]


def validated_runs(path: Path = DATA) -> list[dict]:
    return [row for row in published_runs(path) if row.get("validate", False)]


def source_of(row: dict) -> str:
    """The publication a row comes from (rows of one paper or one document share it): its source up to
    the first comma or parenthesis."""
    return row["source"].split(",")[0].split(" (")[0].strip()


def architecture(row: dict) -> str:
    return get_gpu(row["cluster"]["gpu"], row["name"]).arch


def check(row: dict, fitted: dict[str, float] | None = None) -> Checked:
    """The planner's best prediction for a published run with its published layout keys fixed: the
    fastest layout that fits, or, where the memory model says none does (the run did fit), the fastest."""
    model = config_from_dict({"model": row["model"]}).model
    spec = row["cluster"]
    cluster = Cluster(row["name"], get_gpu(spec["gpu"], row["name"]), spec["n_gpus"], spec["gpus_per_node"],
                      spec["nic_gbps"])
    fixed = {key: value for key, value in row["layout"].items() if key in LAYOUT_KEYS}
    fixed.setdefault("cp", 1)
    fixed.setdefault("ep", 1)
    result = search(model, cluster, fixed, top=1, software=Software(**row.get("software", {})), spares=False,
                    fitted=fitted, keep_unfit=True)
    best = result.ranked[0] if result.ranked else result.fastest_unfit
    return Checked(row["name"], row["source"], row["step_time_s"], best, best.fits)


class Validator:
    """Predictions of the published rows, memoised by (row, the row's architecture's efficiency), so that
    fits and leave-one-source-out refits share them."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self._memo: dict[tuple[str, float], Checked] = {}

    def check(self, row: dict, efficiency: float | None = None) -> Checked:
        arch = architecture(row)
        efficiency = GEMM_EFFICIENCY.get(arch, 0.0) if efficiency is None else efficiency
        key = (row["name"], efficiency)
        if key not in self._memo:
            self._memo[key] = check(row, {arch: efficiency})
        return self._memo[key]

    def fit(self, rows: list[dict]) -> dict[str, float]:
        """Per architecture, the grid efficiency with the least mean |log(predicted / published)| on `rows`."""
        fitted = {}
        for arch in sorted({architecture(row) for row in rows}):
            mine = [row for row in rows if architecture(row) == arch]
            loss = lambda e: sum(abs(math.log1p(self.check(row, e).error)) for row in mine)  # noqa: E731
            fitted[arch] = min(GRID, key=loss)
        return fitted

    def in_sample(self) -> list[Checked]:
        return [self.check(row) for row in self.rows]

    def left_out(self) -> list[tuple[Checked, float]]:
        """Each source's rows, predicted with the efficiencies refit on every other source's rows (an
        architecture that only this source has keeps its shipped value); with the refit value used."""
        out = []
        for source in dict.fromkeys(source_of(row) for row in self.rows):
            others = [row for row in self.rows if source_of(row) != source]
            fitted = self.fit(others)
            for row in self.rows:
                if source_of(row) == source:
                    efficiency = fitted.get(architecture(row))
                    out.append((self.check(row, efficiency), efficiency if efficiency is not None else math.nan))
        return out


def summary(errors: list[float]) -> tuple[float, float]:
    """(median, worst) |error|."""
    magnitudes = [abs(e) for e in errors]
    return statistics.median(magnitudes), max(magnitudes)


def markdown_table(checked: list[Checked], refit: list[float] | None = None) -> str:
    head = "| run | GPUs | layout (searched: mbs, vpp) | published s/step | predicted | error |"
    lines = [head + (" refit efficiency |" if refit else ""), "|---|---|---|---|---|---|" + ("---|" if refit else "")]
    for i, c in enumerate(checked):
        lay = c.predicted.layout
        lines.append(f"| {c.name} | {lay.world_size:,} | tp{lay.tp} pp{lay.pp}" + (f"x{lay.vpp}" if lay.vpp > 1 else "")
                     + (f" cp{lay.cp}" if lay.cp > 1 else "") + (f" ep{lay.ep}" if lay.ep > 1 else "")
                     + f" dp{lay.dp} mbs{lay.mbs} gbs{lay.gbs} {lay.recompute}" + ("" if c.fits else " (memory model: no fit)")
                     + f" | {c.published_s:.2f} | {c.predicted.step_time_s:.2f} | {c.error:+.1%} |"
                     + (f" {refit[i]:.2f} |" if refit else ""))
    median, worst = summary([c.error for c in checked])
    lines.append(f"\nmedian |error| {median:.1%}, worst {worst:.1%}, {len(checked)} runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m colossus.plan.validation", description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="print the efficiencies the published rows give, per architecture")
    args = parser.parse_args(argv)
    validator = Validator(validated_runs())
    if args.fit:
        fitted = validator.fit(validator.rows)
        print("fitted large-GEMM efficiency: " + ", ".join(f"{k} {v:.2f}" for k, v in fitted.items())
              + "; shipped (colossus.hardware.GEMM_EFFICIENCY): " + ", ".join(f"{k} {GEMM_EFFICIENCY[k]:.2f}" for k in fitted))
        return
    print("## In sample\n")
    print(markdown_table(validator.in_sample()))
    left = validator.left_out()
    print("\n## Left out: each source predicted with the efficiencies refit without it\n")
    print(markdown_table([c for c, _ in left], [e for _, e in left]))


if __name__ == "__main__":
    main()
