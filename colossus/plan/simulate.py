"""What a long run on a big cluster actually gets: interruptions, lost work, restarts, checkpoint
interval, goodput, wall-clock days and power (`colossus simulate`).

The run is a sequence of segments, each ended by an interruption (a Poisson process: unexpected
failures at the failure model's rate plus planned stops). A segment first pays the restart, then
trains in chunks of `interval` seconds, each followed by a checkpoint that blocks the loop for
`block_s` and is committed `write_s` after it started. An unexpected interruption loses the work since
the last committed checkpoint; a planned one checkpoints first (SIGTERM, then a synchronous save)
and loses nothing. Trials are vectorised with numpy: one row per trial, one column per segment.

Optimal interval, analytically: Young (1974) tau = sqrt(2 delta M); Daly (2006) for delta < 2M:
tau = sqrt(2 delta M) [1 + (1/3) sqrt(delta / 2M) + (1/9) (delta / 2M)] - delta, else M; with delta
the checkpoint's cost to the loop and M the mean time to interruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CheckpointCost:
    block_s: float  # the loop waits this long per checkpoint (staging for async, the whole write for sync)
    write_s: float  # from the start of a save until it is committed
    load_s: float  # reading it back at a restart


@dataclass(frozen=True)
class Scenario:
    mtti_s: float  # mean time to an unexpected interruption
    planned_per_s: float  # planned interruptions per second
    checkpoint: CheckpointCost
    restart_s: float  # reschedule, rendezvous, load and warm-up after an interruption
    repair_s: float = 0.0  # time to repair a node that a hardware failure took out
    hardware_share: float = 0.0  # fraction of unexpected interruptions that take a node out
    spare_nodes: int = 0  # idle nodes that replace a failed one at once (the GPUs the layout leaves over)

    def repair_wait(self) -> tuple[float, float]:
        """(probability, seconds) that a hardware failure waits for a repair because no spare is free.
        Nodes in repair form an M/G/infinity queue: their number is Poisson with mean (hardware failure
        rate) x (repair time), whatever the repair-time distribution (Palm's theorem; Kleinrock 1975,
        Queueing Systems I, section 3.5). With S spares a failure finds none free when that number is at
        least S; it then waits for the first of the S nodes in repair to return, repair_s / (S + 1) on
        average for residual times spread evenly over the repair (S = 0: the whole repair)."""
        if self.repair_s <= 0 or self.hardware_share <= 0:
            return 0.0, 0.0
        in_repair = self.hardware_share / self.mtti_s * self.repair_s
        term = math.exp(-in_repair)  # P(N = 0), then P(N = k) term by term
        below = 0.0
        for k in range(self.spare_nodes):
            below += term
            term *= in_repair / (k + 1)
        return max(0.0, 1.0 - below), self.repair_s / (self.spare_nodes + 1)


def young_interval(block_s: float, mtti_s: float) -> float:
    """Young (1974): tau = sqrt(2 delta M)."""
    return math.sqrt(2 * block_s * mtti_s)


def daly_interval(block_s: float, mtti_s: float) -> float:
    """Daly (2006), eq. 37: the higher-order optimum; tau = M once delta >= 2M."""
    if block_s >= 2 * mtti_s:
        return mtti_s
    ratio = block_s / (2 * mtti_s)
    return math.sqrt(2 * block_s * mtti_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - block_s


_TRIALS_PER_BLOCK = 100


@dataclass
class Outcome:
    wall_s: np.ndarray  # per trial: wall-clock seconds to finish the work (or the horizon)
    work_s: np.ndarray  # per trial: training seconds kept
    unexpected: np.ndarray  # per trial: unexpected interruptions
    planned: np.ndarray
    lost_s: np.ndarray  # training seconds lost to interruptions
    restart_s: np.ndarray  # seconds spent restarting

    @property
    def goodput(self) -> np.ndarray:
        return self.work_s / self.wall_s


def _trainable(progress: np.ndarray, interval: float, block: float) -> np.ndarray:
    """Training seconds done in `progress` seconds of a segment: full chunks plus the last partial one."""
    period = np.float32(interval + block)
    chunks = np.floor(progress / period)
    return chunks * np.float32(interval) + np.minimum(progress - chunks * period, np.float32(interval))


def _wall_for(work: np.ndarray, interval: float, block: float) -> np.ndarray:
    """Seconds of a segment needed to train `work` seconds (checkpoint blocks in between)."""
    return work + block * np.floor(work / interval)


def simulate_segments(scenario: Scenario, interval_s: float, block: float, rng: np.random.Generator, trials: int,
                      segments: int) -> tuple[np.ndarray, ...]:
    """Draw `segments` interruptions per trial: (kept, trained, gap, planned, restart, repair wait) per
    segment. A segment is the wait for a repair (if any), then the gap to the next interruption, which
    starts with the restart."""
    ckpt = scenario.checkpoint
    rate = 1 / scenario.mtti_s + scenario.planned_per_s
    gaps = rng.standard_exponential((trials, segments), dtype=np.float32) / np.float32(rate)
    kind = rng.random((trials, segments), dtype=np.float32)
    planned = kind < scenario.planned_per_s / rate
    # Hardware failures (a share of the unexpected ones) wait for a repair unless a spare node is free.
    hardware = ~planned & (kind < scenario.planned_per_s / rate + (1 - scenario.planned_per_s / rate) * scenario.hardware_share)
    chance, wait = scenario.repair_wait()
    # The wait for a repaired node comes before the restart; nothing runs to be interrupted meanwhile.
    waits = np.where(hardware & (rng.random((trials, segments), dtype=np.float32) < chance), np.float32(wait), np.float32(0))
    restart = np.full((trials, segments), scenario.restart_s + ckpt.load_s, dtype=np.float32)
    progress = np.maximum(gaps - restart, 0)
    trained = _trainable(progress, interval_s, block)
    # Work committed when an unexpected interruption strikes: chunk k is safe write_s after it ends.
    committed = np.floor(np.maximum(progress - (ckpt.write_s - block), 0) / (interval_s + block)) * np.float32(interval_s)
    kept = np.where(planned, trained, np.minimum(committed, trained))
    return kept, trained, gaps, planned, restart, waits


def simulate(scenario: Scenario, interval_s: float, trials: int, seed: int, work_s: float | np.ndarray | None = None,
             horizon_s: float | None = None) -> Outcome:
    """Monte Carlo of `trials` runs: until `work_s` training seconds are kept (one number, or one per
    trial), or for `horizon_s` of wall time."""
    if (work_s is None) == (horizon_s is None):
        raise ValueError("give exactly one of work_s and horizon_s")
    if work_s is not None:
        work_s = np.broadcast_to(np.asarray(work_s, dtype=np.float64), (trials,))
    rng = np.random.default_rng(seed)
    if trials > _TRIALS_PER_BLOCK:  # blocks of trials keep the arrays in cache; each its own stream
        seeds = rng.integers(2**63, size=-(-trials // _TRIALS_PER_BLOCK))
        parts = []
        for i, seed_i in enumerate(seeds):
            rows = slice(i * _TRIALS_PER_BLOCK, min((i + 1) * _TRIALS_PER_BLOCK, trials))
            parts.append(simulate(scenario, interval_s, rows.stop - rows.start, int(seed_i),
                                  None if work_s is None else work_s[rows], horizon_s))
        return Outcome(*(np.concatenate([getattr(p, f) for p in parts]) for f in Outcome.__dataclass_fields__))
    ckpt = scenario.checkpoint
    # A background save must finish before the next starts: if writing outlasts a chunk, the loop waits.
    block = max(ckpt.block_s, ckpt.write_s - interval_s)
    rate = 1 / scenario.mtti_s + scenario.planned_per_s
    if horizon_s is not None:
        expected = horizon_s * rate
    else:  # segments needed, from a pilot's mean kept work per segment, with room for unlucky trials
        pilot = simulate_segments(scenario, interval_s, block, rng, 4, 256)[0]
        expected = float(work_s.max()) / max(float(pilot.mean()), 1e-9)
    segments = int(expected + 6 * math.sqrt(expected + 1) + 0.05 * expected) + 16
    while True:
        kept, trained, gaps, planned, restart, waits = simulate_segments(scenario, interval_s, block, rng, trials, segments)
        restart[:, 0] = 0.0  # the first segment is the start of the run
        waits[:, 0] = 0.0
        stop_cost = np.where(planned, ckpt.write_s, 0.0)  # a planned stop writes a checkpoint first
        wall_of = waits + gaps + stop_cost
        kept_before = np.cumsum(kept, axis=1, dtype=np.float64) - kept
        wall_before = np.cumsum(wall_of, axis=1, dtype=np.float64) - wall_of
        if work_s is not None:
            done = kept_before + trained >= work_s[:, None]
        else:
            done = wall_before + wall_of >= horizon_s
        if done.any(axis=1).all():
            break
        segments *= 2  # some trial needed more segments than drawn
    last = done.argmax(axis=1)
    rows = np.arange(trials)
    if work_s is not None:
        remaining = work_s - kept_before[rows, last]
        wall = wall_before[rows, last] + waits[rows, last] + restart[rows, last] + _wall_for(remaining, interval_s, block)
        work = work_s.copy()
    else:
        into = horizon_s - wall_before[rows, last]
        partial = _trainable(np.maximum(into - waits[rows, last] - restart[rows, last], 0.0), interval_s, block)
        work = kept_before[rows, last] + partial
        wall = np.full(trials, horizon_s)
    index = np.arange(segments)[None, :]
    before = index < last[:, None]  # segments ended by an interruption
    unexpected = (before & ~planned).sum(axis=1)
    planned_count = (before & planned).sum(axis=1)
    lost = np.where(before, trained - kept, 0.0).sum(axis=1)
    restarts = np.where(index <= last[:, None], waits + np.minimum(restart, gaps), 0.0).sum(axis=1)
    return Outcome(wall, work, unexpected.astype(float), planned_count.astype(float), lost, restarts)


def best_interval(scenario: Scenario, trials: int, seed: int, work_s: float | None = None,
                  horizon_s: float | None = None, points: int = 25) -> tuple[float, list[tuple[float, float]]]:
    """The interval with the highest mean goodput over a log grid around Daly's optimum, refined by a
    parabola through the best point and its neighbours (in log interval). Returns it and the curve."""
    delta = max(scenario.checkpoint.block_s, 1e-3)
    center = daly_interval(delta, scenario.mtti_s)
    grid = np.geomspace(center / 8, center * 8, points)
    curve = []
    for interval in grid:
        outcome = simulate(scenario, float(interval), trials, seed, work_s, horizon_s)  # same seed: common random numbers
        curve.append((float(interval), float(outcome.goodput.mean())))
    values = np.array([g for _, g in curve])
    i = int(values.argmax())
    if 0 < i < points - 1:
        x = np.log(grid[i - 1:i + 2])
        a, b, _ = np.polyfit(x, values[i - 1:i + 2], 2)
        best = float(np.exp(-b / (2 * a))) if a < 0 else float(grid[i])
    else:
        best = float(grid[i])
    return best, curve
