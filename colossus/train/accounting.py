"""The run's compute ledger and the regulatory thresholds it watches, as one trainer component: it
counts every step, warns before the run starts about each threshold it will cross, records the
crossing when it happens, and says when the next step would pass ledger.stop_at_threshold."""

from __future__ import annotations

from typing import Callable

import torch

from colossus import modelmath
from colossus.account.ledger import CPU_USD_PER_THREAD_HOUR, CPU_WATTS_PER_THREAD, GPU_USD_PER_HOUR, Ledger, Rates
from colossus.config import LedgerConfig
from colossus.errors import UserError
from colossus.hardware import gpu_from_device_name
from colossus.layout import Layout
from colossus.modelconfig import ModelConfig
from colossus.train.metrics import MetricsLogger


def ledger_rates(m: ModelConfig, layout: Layout, cfg: LedgerConfig, device: torch.device, replicas: int = 1) -> Rates:
    """What a step and a device-second of this run are worth. Under replica groups `layout` is this
    group's: a full step reads `replicas` times its batch, and the devices are the group's own (each
    group keeps its own ledger of the steps it took part in)."""
    if device.type == "cuda":
        gpu = gpu_from_device_name(torch.cuda.get_device_name(device))
        power = cfg.device_power_w or (gpu.tdp_w if gpu else 700.0)
        price = GPU_USD_PER_HOUR
    else:
        power = cfg.device_power_w or CPU_WATTS_PER_THREAD * torch.get_num_threads()
        price = CPU_USD_PER_THREAD_HOUR * torch.get_num_threads()
    hardware = modelmath.hardware_flops_per_token(m, layout.recompute, recomputed_layers=layout.recomputed_fraction(
        m.n_layers), micro_batches=layout.micro_batches)
    return Rates(tokens_per_step=layout.gbs * replicas * m.seq_len, model_flops_per_token=modelmath.flops_per_token(m),
                 hardware_flops_per_token=hardware, devices=layout.world_size, device_power_w=power,
                 usd_per_device_hour=price if cfg.usd_per_device_hour < 0 else cfg.usd_per_device_hour, pue=cfg.pue)


class Accounting:
    def __init__(self, ledger: Ledger, stop_at: str, logger: MetricsLogger, is_main: bool,
                 run_tokens: Callable[[], int] | None = None):
        self.ledger, self.stop_at, self.logger, self.is_main = ledger, stop_at, logger, is_main
        # Under replica groups each group's ledger counts only the steps it took part in; the run's own token
        # count (which travels with the state a restarted group receives) is the same on every group, so
        # they all stop at the same step.
        self.run_tokens = run_tokens
        if stop_at and stop_at not in {t.name for t in ledger.thresholds}:
            raise UserError(f"ledger.stop_at_threshold = {stop_at!r} is not a known threshold "
                            f"({', '.join(t.name for t in ledger.thresholds)})")

    def warn_ahead(self, remaining_steps: int) -> None:
        """Before training: name every threshold this run will cross, the step it crosses it at, and
        what the text then asks."""
        for entry in self.ledger.threshold_report():
            at = entry.get("crosses_at_step")
            if entry["applies"] and not entry["crossed"] and at is not None and \
                    at <= self.ledger.segments[-1].step + remaining_steps:
                self.logger.print(f"warning: this run crosses {entry['name']} ({entry['title']}, "
                                  f"{entry['limit_flops']:.0e} FLOP, {entry['status']}) at step {at}; "
                                  f"it asks: {entry['asks']}")
                self.logger.event("threshold_ahead", threshold=entry["name"], step=at)

    def step(self, step: int, tokens: int | None = None, short: bool = False) -> None:
        self.ledger.step(step, tokens, short)

    def note_crossed(self, step: int) -> None:
        """Record a threshold the first time the ledger shows it crossed."""
        crossed = {e["name"] for e in self.ledger.threshold_report() if e["crossed"]}
        for name in sorted(crossed - self.ledger.crossed_noted):
            self.logger.event("threshold_crossed", threshold=name, step=step)
            self.logger.print(f"threshold {name} crossed at step {step} (see ledger.json)")
        self.ledger.crossed_noted |= crossed

    def stop_due(self) -> bool:
        """True when ledger.stop_at_threshold names a threshold the next step would take the run past."""
        if not self.stop_at:
            return False
        threshold = next(t for t in self.ledger.thresholds if t.name == self.stop_at)
        per_step = self.ledger.rates.tokens_per_step * self.ledger.rates.model_flops_per_token
        if self.run_tokens is not None:
            counted = self.run_tokens() * self.ledger.rates.model_flops_per_token
            if threshold.scope == "cumulative":
                counted += (self.ledger.lineage or {}).get("cumulative_model_flops", 0.0)
        else:
            counted = (self.ledger.cumulative_model_flops() if threshold.scope == "cumulative"
                       else self.ledger.totals()["model_flops"])
        return counted + per_step > threshold.limit_flops

    def rollback(self, from_step: int, to_step: int) -> None:
        self.ledger.rollback(from_step, to_step)

    def save(self) -> None:
        if self.is_main:
            self.ledger.save()

    def finish(self, status: str) -> None:
        self.ledger.finish(status)
        self.save()
