"""The compute ledger of a run (RUN/ledger.json): what was trained and what it cost, segment by segment.

A segment is one life of the run's processes: a start, or a restart after an interruption. Each
counts the steps it computed, their tokens, model FLOPs (from modelmath: the number behind MFU and
the regulatory thresholds), hardware FLOPs (with recomputation), device-seconds, energy and cost, and
the work it lost: steps computed past the checkpoint the next segment resumed from, or undone by a
rollback. The top-level totals are everything computed, lost work included (the compute was spent);
`lost` says how much of it was. A run started from another run's weights (`train.init_from`) carries
its parent's cumulative totals in `lineage`, so thresholds that count cumulative compute see them.

The file is rewritten atomically at every logged step and checkpoint and only ever grows: entries
from earlier segments are read back and kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from colossus.account.thresholds import Threshold, evaluate
from colossus.errors import UserError
from colossus.files import write_atomic

LEDGER = "ledger.json"
# A CPU's share of package power per busy thread (an assumption: ~10 W per core for a server CPU
# under load); GPUs use their catalog TDP. Override with [ledger] device_power_w.
CPU_WATTS_PER_THREAD = 10.0
# Default prices per device-hour: a cloud H100-class GPU ~$2, a cloud vCPU ~$0.04 (assumptions;
# override with [ledger] usd_per_device_hour).
GPU_USD_PER_HOUR = 2.0
CPU_USD_PER_THREAD_HOUR = 0.04


@dataclass
class Segment:
    index: int
    started_at: str  # wall-clock time, ISO 8601
    start_step: int  # the step it resumed from (0 for the first)
    restart: int = 0  # torchrun's restart count when it began
    step: int = 0  # the last step it finished
    steps_computed: int = 0  # optimizer steps it ran, rolled-back and lost ones included
    device_seconds: float = 0.0  # wall seconds x devices
    lost_steps: int = 0  # computed but not kept: past the next segment's resume point, or rolled back
    status: str = "running"  # running, finished, preempted, interrupted, stopped at a threshold
    tokens: int = -1  # tokens of the steps it computed (-1: a ledger from before this field, steps x tokens_per_step)
    short_steps: int = 0  # steps with fewer replica groups than the run has (a smaller batch)


@dataclass
class Rates:
    """What one step and one device-second are worth."""

    tokens_per_step: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    devices: int
    device_power_w: float
    usd_per_device_hour: float
    pue: float = 1.0


@dataclass
class Ledger:
    path: Path
    rates: Rates
    segments: list[Segment] = field(default_factory=list)
    flop_counter_ratio: float | None = None
    lineage: dict[str, Any] | None = None  # the parent run's cumulative totals, for fine-tunes
    thresholds: list[Threshold] = field(default_factory=list)
    crossed_noted: set[str] = field(default_factory=set)  # thresholds already announced in this process
    _segment_started: float = 0.0
    _lost_before: int | None = None  # the previous segment's lost steps before this segment counted its own

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, run: Path, rates: Rates, thresholds: list[Threshold]) -> "Ledger":
        """The run's ledger, with every earlier segment read back (a fresh one if there is none)."""
        ledger = cls(run / LEDGER, rates, thresholds=thresholds)
        if ledger.path.is_file():
            try:
                saved = json.loads(ledger.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"{ledger.path} is unreadable ({exc}); restore it, or move it aside to start a new "
                                "ledger (its earlier segments would be lost)") from None
            names = {f.name for f in fields(Segment)}
            ledger.segments = [Segment(**{k: v for k, v in s.items() if k in names}) for s in saved.get("segments", [])]
            ledger.flop_counter_ratio = saved.get("flop_counter_ratio")
            ledger.lineage = saved.get("lineage")
        return ledger

    def start_segment(self, resumed_step: int | None, restart: int) -> Segment:
        """Begin a new segment at `resumed_step`. Work the previous segment did past that step was
        lost with its process (it never reached a checkpoint). None: the step is not known yet (a replica
        group that will take it from a live peer: joined_at says)."""
        if self.segments and self.segments[-1].status == "running":
            self.segments[-1].status = "interrupted"
        segment = Segment(len(self.segments), time.strftime("%Y-%m-%dT%H:%M:%S%z"), resumed_step or 0, restart,
                          resumed_step or 0, tokens=0)
        self.segments.append(segment)
        if resumed_step is not None:
            self._count_lost(resumed_step)
        self._segment_started = time.perf_counter()
        return segment

    def step(self, step: int, tokens: int | None = None, short: bool = False) -> None:
        """Count a finished step: its tokens (those actually used; the full batch when None), and
        whether it ran with fewer replica groups than the run has."""
        segment = self.segments[-1]
        segment.step = step
        segment.steps_computed += 1
        segment.tokens = self.segment_tokens(segment) + (self.rates.tokens_per_step if tokens is None else tokens)
        segment.short_steps += short
        segment.device_seconds = (time.perf_counter() - self._segment_started) * self.rates.devices

    def joined_at(self, step: int) -> None:
        """This process took the run's state at `step` from a live replica group (or, none being ahead,
        from its checkpoint) instead of computing the steps before it: its segment starts there."""
        segment = self.segments[-1]
        segment.start_step = segment.step = step
        self._count_lost(step)

    def _count_lost(self, resumed_step: int) -> None:
        """The previous segment's work past `resumed_step` was lost (set once per segment: a replica group
        may resume from its checkpoint and then take a later step from a peer)."""
        if len(self.segments) > 1:
            previous = self.segments[-2]
            if self._lost_before is None:
                self._lost_before = previous.lost_steps
            previous.lost_steps = self._lost_before + max(0, previous.step - resumed_step)

    def segment_tokens(self, segment: Segment) -> int:
        return segment.tokens if segment.tokens >= 0 else segment.steps_computed * self.rates.tokens_per_step

    def rollback(self, from_step: int, to_step: int) -> None:
        segment = self.segments[-1]
        segment.lost_steps += from_step - to_step
        segment.step = to_step

    def finish(self, status: str) -> None:
        self.segments[-1].status = status
        self.segments[-1].device_seconds = (time.perf_counter() - self._segment_started) * self.rates.devices

    # ------------------------------------------------------------------ figures
    def totals(self) -> dict[str, Any]:
        r = self.rates
        steps = sum(s.steps_computed for s in self.segments)
        lost_steps = sum(s.lost_steps for s in self.segments)
        device_seconds = sum(s.device_seconds for s in self.segments)
        tokens = sum(self.segment_tokens(s) for s in self.segments)
        lost_tokens = lost_steps * r.tokens_per_step
        return {
            "steps": steps,
            "short_steps": sum(s.short_steps for s in self.segments),
            "tokens": tokens,
            "model_flops": tokens * r.model_flops_per_token,
            "hardware_flops": tokens * r.hardware_flops_per_token,
            "gpu_hours": device_seconds / 3600,
            "energy_kwh": device_seconds * r.device_power_w * r.pue / 3.6e6,
            "cost_usd": device_seconds / 3600 * r.usd_per_device_hour,
            "lost": {"steps": lost_steps, "tokens": lost_tokens, "model_flops": lost_tokens * r.model_flops_per_token,
                     "hardware_flops": lost_tokens * r.hardware_flops_per_token},
        }

    def cumulative_model_flops(self) -> float:
        parent = (self.lineage or {}).get("cumulative_model_flops", 0.0)
        return parent + self.totals()["model_flops"]

    def threshold_report(self, remaining_steps: int = 0) -> list[dict]:
        totals = self.totals()
        return evaluate(self.thresholds, totals["model_flops"], self.cumulative_model_flops(), totals["cost_usd"],
                        finetune=self.lineage is not None,
                        flops_per_unit=self.rates.tokens_per_step * self.rates.model_flops_per_token, unit="step")

    def to_json(self) -> dict[str, Any]:
        totals = self.totals()
        r = self.rates
        out = {
            **{k: totals[k] for k in ("tokens", "model_flops", "hardware_flops")},
            "flop_counter_ratio": self.flop_counter_ratio,
            **{k: totals[k] for k in ("gpu_hours", "energy_kwh", "cost_usd")},
            "steps": totals["steps"],
            "short_steps": totals["short_steps"],
            "lost": totals["lost"],
            "cumulative_model_flops": self.cumulative_model_flops(),
            "lineage": self.lineage,
            "rates": asdict(r),
            "segments": [self._segment_json(s) for s in self.segments],
            "thresholds": self.threshold_report(),
        }
        return out

    def _segment_json(self, s: Segment) -> dict[str, Any]:
        r = self.rates
        tokens = self.segment_tokens(s)
        lost = s.lost_steps * r.tokens_per_step
        return {**asdict(s), "tokens": tokens, "model_flops": tokens * r.model_flops_per_token,
                "hardware_flops": tokens * r.hardware_flops_per_token, "gpu_hours": s.device_seconds / 3600,
                "energy_kwh": s.device_seconds * r.device_power_w * r.pue / 3.6e6,
                "cost_usd": s.device_seconds / 3600 * r.usd_per_device_hour,
                "lost_tokens": lost, "lost_model_flops": lost * r.model_flops_per_token}

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.to_json(), indent=1))


def parent_lineage(parent_run: Path) -> dict[str, Any]:
    """What a fine-tune carries from the run it starts from: that run's cumulative totals."""
    path = parent_run / LEDGER
    if not path.is_file():
        return {"run": str(parent_run), "cumulative_model_flops": 0.0, "note": "the parent run has no ledger.json"}
    saved = json.loads(path.read_text())
    return {"run": str(parent_run.resolve()), "model_flops": saved.get("model_flops", 0.0),
            "cumulative_model_flops": saved.get("cumulative_model_flops", saved.get("model_flops", 0.0)),
            "cost_usd": saved.get("cost_usd", 0.0), "gpu_hours": saved.get("gpu_hours", 0.0),
            "parent_lineage": saved.get("lineage")}
