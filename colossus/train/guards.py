"""Guards that keep a long run honest: preemption signals, hung ranks, and non-finite steps.

At 100,000 GPUs something breaks every few minutes (Llama 3: 419 unexpected interruptions in 54 days
on 16,384 GPUs, Dubey et al. 2024, section 3.3.4); each guard turns one kind of failure into a
recorded, recoverable event instead of a silent change to the run.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

# Exit status of a run stopped by SIGTERM/SIGINT after writing its checkpoint (EX_TEMPFAIL in
# sysexits.h: "try again later"); rerunning the same command continues from that step.
EXIT_PREEMPTED = 75
# Exit status of a rank killed by the hang watchdog, so that the launcher restarts the job.
EXIT_HUNG = 86


class PreemptionGuard:
    """Turns SIGTERM (Slurm preemption, torchrun shutdown) and SIGINT (Ctrl-C) into a flag that the
    loop reads between steps, so the current step finishes and a checkpoint is written."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self) -> bool:
        """True on every rank once any rank received a signal (one tiny all-reduce per step)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None  # one process: no tensor, no sync
        flag = torch.tensor([1 if self.received is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class HangWatchdog:
    """A thread that exits the process if the loop stops beating for longer than `timeout_s`: a rank
    stuck in a collective would otherwise hold the whole job forever. It prints every thread's stack
    first, so the log shows where it hung, and exits non-zero so torchrun restarts the job."""

    def __init__(self, timeout_s: float, on_hang: Callable[[int, float], None] | None = None):
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self.step = 0
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="colossus-hang-watchdog", daemon=True)

    def __enter__(self) -> "HangWatchdog":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step = step
        self._last_beat = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            stuck = time.monotonic() - self._last_beat
            if stuck > self.timeout_s:
                print(f"colossus: no progress for {stuck:.0f} s after step {self.step} "
                      f"(faults.hang_timeout_s={self.timeout_s:g}); stacks follow, exiting with {EXIT_HUNG}",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                if self.on_hang is not None:
                    self.on_hang(self.step, stuck)
                os._exit(EXIT_HUNG)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


@dataclass
class UnreadVerdict:
    """A finished step whose skip flag is still on the device (read one step later)."""

    skipped: torch.Tensor | bool
    grad_norm: torch.Tensor
    step: int
    position: str  # the loader position of its batch
    poison: bool = False  # a fault injected on purpose (faults.inject_nan_at_step)


class NanGuard:
    """Non-finite steps: each one's update is skipped (inside the optimizer step, on the device);
    after `max_bad_steps` in a row the run must roll back to its last checkpoint and skip the batch
    that broke it. Skip flags are read one step late, after the next step's work is queued, so a GPU
    never idles while the host waits; before anything is logged, evaluated or saved (or the run
    stops) every flag is read (`settle`). It also injects the faults that test it
    (faults.inject_nan_at_step / inject_nan_count)."""

    def __init__(self, max_bad_steps: int, inject_at_step: int = 0, inject_count: int = 1,
                 on_skip: Callable[[UnreadVerdict], None] | None = None):
        self.max_bad_steps = max_bad_steps
        self.inject_at_step = inject_at_step
        self.poison_left = inject_count if inject_at_step else 0
        self.on_skip = on_skip or (lambda verdict: None)
        self.unread: deque[UnreadVerdict] = deque()
        self.consecutive_bad = 0

    def poison(self, step: int) -> bool:
        """Whether the loss of `step` (1-based) is to be made NaN on purpose."""
        poison = self.poison_left > 0 and step >= self.inject_at_step
        self.poison_left -= int(poison)
        return poison

    def record(self, verdict: UnreadVerdict) -> None:
        self.unread.append(verdict)

    def settle(self, everything: bool) -> UnreadVerdict | None:
        """Read the skip flags of all unread steps but the newest (or of all of them: `everything`),
        reporting the skipped ones; returns the step that made `max_bad_steps` in a row, if one did
        (the rest stay unread)."""
        keep = 0 if everything else 1
        while len(self.unread) > keep:
            verdict = self.unread.popleft()
            if not bool(verdict.skipped):  # the host sync: a step whose successor is already queued
                self.consecutive_bad = 0
                continue
            self.consecutive_bad += 1
            self.on_skip(verdict)
            if self.consecutive_bad >= self.max_bad_steps:
                return verdict
        return None

    def rolled_back(self) -> None:
        """After a rollback: the discarded steps' flags no longer matter, and faults injected into
        them come again (the replay runs those steps once more)."""
        self.poison_left += sum(verdict.poison for verdict in self.unread)
        self.unread.clear()
        self.consecutive_bad = 0
