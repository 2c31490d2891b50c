"""Where a run's numbers go: RUN/metrics.jsonl (one object per logged step), RUN/events.jsonl
(starts, resumes, checkpoints), TensorBoard under RUN/tb, and a live line on the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk at once, so a killed run keeps every line it logged."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ThroughputWindow:
    """Training steps and their wall time since the window opened: the step time and tokens/s that a
    logged line reports. Evaluations, saves and rollbacks reopen it, so they never count as training."""

    def __init__(self) -> None:
        self.reopen()

    def reopen(self) -> None:
        self.started, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def step_time(self) -> float:
        return (time.perf_counter() - self.started) / max(self.steps, 1)


class MetricsLogger:
    """Writes only where `enabled` (rank 0 of a distributed run), so every rank can call it alike.
    It logs every `interval` steps and at the last one (should_log)."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, console: Console | None = None,
                 enabled: bool = True, interval: int = 1):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.interval = interval
        self.enabled = enabled
        self.console = console or Console(highlight=False, soft_wrap=True, quiet=not enabled)
        self.tensorboard = tensorboard
        self.writer = None

    def open(self) -> None:
        """Start the TensorBoard writer (which creates RUN/tb): once the run folder may be written."""
        if self.tensorboard and self.enabled and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: slow, so only when asked

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def should_log(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / "events.jsonl", {"event": kind, "time": time.time(), **fields})

    def print(self, text: str) -> None:
        self.console.print(text)

    def log_step(self, record: dict[str, Any], eta_s: float) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        step = record["step"]
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "aux_loss", "z_loss"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], step)
            if record.get("expert_load"):
                # Mean over layers of each expert's share of routed tokens (1/n_experts when balanced).
                layers = record["expert_load"]
                for expert in range(len(layers[0])):
                    share = sum(layer[expert] for layer in layers) / len(layers)
                    self.writer.add_scalar(f"moe/expert_{expert}_load", share, step)
        mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "n/a"
        self.console.print(
            f"step {step:>6}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"ETA {format_duration(eta_s)}"
        )

    def log_validation(self, step: int, val_loss: float, elapsed_s: float) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, "val_loss": val_loss, "elapsed_s": elapsed_s})
        if self.writer is not None:
            self.writer.add_scalar("val/loss", val_loss, step)
        self.console.print(f"step {step:>6}/{self.total_steps} | [bold]val_loss {val_loss:.4f}[/bold]")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
