"""Regulatory training-compute thresholds (account/thresholds.toml, user-extendable) and which of them
a run or a plan crosses, and when."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from colossus.errors import UserError

BUILTIN = Path(__file__).with_name("thresholds.toml")
SCOPES = ("cumulative", "finetune", "pretraining")


@dataclass(frozen=True)
class Threshold:
    name: str
    title: str
    limit_flops: float
    scope: str
    status: str
    asks: str
    source: str
    limit_usd: float = 0.0  # a second condition when > 0: the cost must exceed it too


def load_thresholds(extra: str | Path | None = None) -> list[Threshold]:
    """The built-in table, plus (or replacing by name) those of a user file of the same shape."""
    table = {t.name: t for t in _read(BUILTIN)}
    if extra:
        for threshold in _read(Path(extra)):
            table[threshold.name] = threshold
    return list(table.values())


def _read(path: Path) -> list[Threshold]:
    try:
        rows = tomllib.loads(path.read_text()).get("threshold", [])
    except FileNotFoundError:
        raise UserError(f"thresholds file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"thresholds file {path} is not valid TOML ({exc})") from None
    thresholds = []
    for index, row in enumerate(rows):
        where = f"{path}: threshold {index + 1}"
        missing = [k for k in ("name", "limit_flops", "scope") if k not in row]
        if missing:
            raise UserError(f"{where} is missing {', '.join(missing)}")
        if row["scope"] not in SCOPES:
            raise UserError(f"{where}: scope {row['scope']!r} is not one of {', '.join(SCOPES)}")
        for key in ("limit_flops", "limit_usd"):
            value = row.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (key == "limit_flops" and value <= 0):
                raise UserError(f"{where}: {key} must be a positive number, got {value!r}")
        thresholds.append(Threshold(str(row["name"]), str(row.get("title", row["name"])), float(row["limit_flops"]),
                                    row["scope"], str(row.get("status", "")), str(row.get("asks", "")),
                                    str(row.get("source", "")), float(row.get("limit_usd", 0.0))))
    return thresholds


def applies(threshold: Threshold, finetune: bool) -> bool:
    return {"cumulative": True, "finetune": finetune, "pretraining": not finetune}[threshold.scope]


def counted_flops(threshold: Threshold, run_flops: float, cumulative_flops: float) -> float:
    """The compute a threshold counts: the model's cumulative total, or this run's own."""
    return cumulative_flops if threshold.scope == "cumulative" else run_flops


def crossed(threshold: Threshold, run_flops: float, cumulative_flops: float, cost_usd: float, finetune: bool) -> bool:
    """Strictly above the limit ("more than 1e26"), and above the cost condition where there is one;
    SB 1047's fine-tuning clause says "3e25 or more", hence >= for that scope."""
    if not applies(threshold, finetune):
        return False
    flops = counted_flops(threshold, run_flops, cumulative_flops)
    over = flops >= threshold.limit_flops if threshold.scope == "finetune" else flops > threshold.limit_flops
    return over and (threshold.limit_usd <= 0 or cost_usd > threshold.limit_usd)


def evaluate(thresholds: list[Threshold], run_flops: float, cumulative_flops: float, cost_usd: float,
             finetune: bool, flops_per_unit: float | None = None, unit: str = "step",
             units_done: float = 0.0) -> list[dict]:
    """One entry per threshold: crossed or not, and (given the run's compute per step or per day) the
    step or day its compute limit is passed, counted from the start of this run."""
    results = []
    for threshold in thresholds:
        entry = {"name": threshold.name, "title": threshold.title, "limit_flops": threshold.limit_flops,
                 "limit_usd": threshold.limit_usd or None, "scope": threshold.scope, "applies": applies(threshold, finetune),
                 "crossed": crossed(threshold, run_flops, cumulative_flops, cost_usd, finetune),
                 "status": threshold.status, "asks": threshold.asks, "source": threshold.source}
        if flops_per_unit and entry["applies"]:
            already = counted_flops(threshold, 0.0, cumulative_flops - run_flops)  # before this run
            remaining = threshold.limit_flops - already
            entry[f"crosses_at_{unit}"] = max(0.0, remaining / flops_per_unit) if unit == "day" else \
                max(1, math.floor(remaining / flops_per_unit) + 1)
        results.append(entry)
    return results


def as_dicts(thresholds: list[Threshold]) -> list[dict]:
    return [asdict(t) for t in thresholds]
