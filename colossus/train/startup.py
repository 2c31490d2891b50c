"""When this process started and when it reached each stage of getting to its first step: the
breakdown of a recovery (bench/recovery.py reads it from the `startup` event in events.jsonl)."""

from __future__ import annotations

import os
import time


def process_started() -> float:
    """The wall-clock time this process was created (Linux: /proc/self/stat's start time after boot),
    so that a launcher's delay and the interpreter's start count; elsewhere, now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StartupTimes:
    """Wall-clock marks, in order: process start, then each stage the trainer names (imported,
    process_group, built, state, first_step), and durations measured inside stages (checkpoint read,
    quorum, state transfer)."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"process": process_started()}
        self.durations: dict[str, float] = {}
        self.reported = False

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.time())

    def took(self, what: str, seconds: float) -> None:
        self.durations[what] = self.durations.get(what, 0.0) + seconds

    def report(self) -> dict:
        """The marks as seconds since the process started, and the durations (once per process)."""
        self.reported = True
        start = self.marks["process"]
        return {"process_started": start, **{f"{stage}_s": round(t - start, 3) for stage, t in self.marks.items()
                                             if stage != "process"},
                **{f"{what}_s": round(s, 3) for what, s in self.durations.items()}}
