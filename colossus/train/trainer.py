"""The trainer: a Stateful object made of components that each own their state and decide when they
act (checkpoints, validation, metrics, the NaN guard, the ledger), and a loop that reads top to
bottom: draw a batch, train_step, then let each component do its part.

Everything with state (model, optimizer, schedule, data loader, progress counters, RNG) is saved in
every checkpoint, so a run killed at any point and started again with the same command continues
with exactly the batches and numbers the uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from colossus import modelmath
from colossus.account.flopcount import counted_flops
from colossus.account.ledger import Ledger, parent_lineage
from colossus.account.thresholds import load_thresholds
from colossus.config import RunConfig, config_to_dict, config_to_toml
from colossus.data import PrefetchingLoader, TokenLoader, make_loader, prepare_tokens, validation_batches
from colossus.errors import UserError
from colossus.files import write_atomic
from colossus.models.grok import Transformer, build_model, sample
from colossus.parallel.init import materialize
from colossus.parallel.parallelize import parallelize
from colossus.parallel.pipeline import Pipeline, load_saved, to_saved
from colossus.parallel.runtime import Runtime, setup_runtime
from colossus.train.accounting import Accounting, ledger_rates
from colossus.train.checkpoint import MODEL_KEY, Checkpointer, CheckpointPolicy, load_model_weights, refuse_imported
from colossus.train.evaluator import Evaluator
from colossus.train.guards import HangWatchdog, NanGuard, PreemptionGuard, UnreadVerdict
from colossus.train.metrics import MetricsLogger, ThroughputWindow
from colossus.train.optim import build_optimizer, build_scheduler
from colossus.train.peak import device_peak_flops
from colossus.train.prediction import PlannerCheck
from colossus.train.replicas import (QUORUM_TIMEOUT_S, Membership, ReplicaGroups, check_reachable, from_transport,
                                     lighthouse_address, state_digest, to_transport)
from colossus.train.startup import StartupTimes
from colossus.train.step import StepResult, train_step


def train(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Train (or resume) the run in folder `out`; returns the run summary (also saved as summary.json)."""
    startup = StartupTimes()
    startup.mark("imported")
    check_replica_folders(Path(out), config)
    out = replica_folder(Path(out), config)
    check_run_folder(out, config)
    if config.faults.replica_groups:  # before anything is built or written
        check_reachable(lighthouse_address(config.faults.lighthouse))
    runtime = setup_runtime(config)  # layout checked against world size and model before any build
    startup.mark("process_group")
    finished = False
    try:
        with deterministic_kernels(config.train.deterministic):
            summary = Trainer(config, out, runtime, startup).fit()
        finished = True
        return summary
    finally:
        runtime.close(finished)


@dataclass
class Progress:
    """Counters that survive restarts (saved in every checkpoint), and this process's training clock."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # training wall time summed over all segments of the run
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite gradient
    skip_batches: list[str] = field(default_factory=list)  # loader positions of batches that broke a run
    _clock: tuple[float, float] = (0.0, 0.0)  # (elapsed_s, perf_counter) when this process's clock started

    def start_clock(self) -> None:
        self._clock = (self.elapsed_s, time.perf_counter())

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens
        self.elapsed_s = self._clock[0] + time.perf_counter() - self._clock[1]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s,
                "skipped_steps": self.skipped_steps, "skip_batches": list(self.skip_batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.elapsed_s = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skip_batches = list(state.get("skip_batches", []))


# Flattened: the optimizer's state and hyperparameters keyed by parameter name, which pipeline stages
# need (each rank's param groups differ). Checkpoints before pipeline parallelism kept param groups as a
# list ("optimizer.param_groups.0.lr"); TrainingState reads those too.
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
LIST_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=False)


@dataclass
class TrainingState:
    """The one Stateful object a checkpoint holds: it gathers every component's state."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TokenLoader | PrefetchingLoader
    progress: Progress = field(default_factory=Progress)
    options: StateDictOptions = field(default_factory=lambda: STATE_OPTIONS)

    def match_checkpoint(self, keys: set[str]) -> None:
        """Before a load: read the optimizer state in the format the checkpoint (its keys, under this
        object's name) was written in."""
        listed = any(key.endswith("optimizer.param_groups.0.lr") for key in keys)
        self.options = LIST_OPTIONS if listed else STATE_OPTIONS

    def state_dict(self) -> dict[str, Any]:
        # One key per parameter, optimizer state and hyperparameters included, named as in the whole
        # model: every rank's entries are its own, whatever part of the model it holds (pipeline stages
        # differ), and another layout loads them by name.
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        model_state, optim_state = to_saved(self.model, model_state), to_saved(self.model, optim_state)
        return {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(), "progress": self.progress.state_dict(), "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The saved param groups carry the saving run's kernel choice (fused, foreach); keep this run's.
        kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=load_saved(self.model, state["model"]),
                       optim_state_dict=load_saved(self.model, state["optimizer"]), options=self.options)
        self.options = STATE_OPTIONS  # what this run saves
        for group, chosen in zip(self.optimizer.param_groups, kernels):
            group.update(chosen)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.progress.load_state_dict(state["progress"])
        torch.set_rng_state(state["rng"])


class Trainer:
    """One run: its components, built from the config. `state` (model, optimizer, schedule, loader,
    progress) is what a checkpoint holds; each other component decides for itself when it acts."""

    def __init__(self, config: RunConfig, out: Path, runtime: Runtime, startup: StartupTimes | None = None):
        self.config, self.out, self.runtime = config, out, runtime
        self.startup = startup or StartupTimes()
        tcfg, mcfg, layout, device = config.train, config.model, runtime.layout, runtime.device
        set_threads(tcfg.threads)
        self.data = prepare_tokens(config.data, mcfg.vocab_size, mcfg.seq_len)
        say = print if runtime.is_main else (lambda text: None)
        # The planner's prediction for this very run (rank 0), taken before the model is built.
        self.planner = PlannerCheck(config, layout, device, say) if runtime.is_main else None
        runtime.barrier()  # the other ranks wait idle while rank 0 may measure the machine for it
        torch.manual_seed(tcfg.seed)
        # Built on the meta device and parallelised there; each rank then allocates and fills only its own
        # shards, with the values one process would give the whole model (parallel/init.py).
        self.model = build_model(mcfg, "meta")
        stages = parallelize(self.model, layout, runtime.mesh, device, compile=tcfg.compile)
        materialize(self.model, device, tcfg.seed)
        # Under pipeline parallelism the model holds this rank's stages only, and a schedule runs them.
        self.pipeline = Pipeline(self.model, stages, layout, runtime.mesh.pp, device) if layout.pp > 1 else None
        self.optimizer = build_optimizer(self.model, tcfg, device)
        self.scheduler = build_scheduler(self.optimizer, tcfg)
        # Under replica groups each step's batch depends on who takes part: drawn after the quorum, not ahead.
        self.loader = make_loader(self.data.train, mcfg.seq_len, layout.gbs, runtime.dp_rank, layout.dp, tcfg.seed,
                                  prefetch=0 if runtime.replica_groups > 1 else config.data.prefetch,
                                  pin_memory=device.type == "cuda")
        self.progress = Progress()
        self.state = TrainingState(self.model, self.optimizer, self.scheduler, self.loader, self.progress)
        self.replicas: ReplicaGroups | None = None
        self.startup.mark("built")
        try:
            self.open_run()
        except BaseException:  # the loop closes these otherwise
            self.loader.close()
            if hasattr(self, "logger"):
                self.logger.close()
            if self.replicas is not None:
                self.replicas.close()
            raise

    def open_run(self) -> None:
        """Resume from the newest intact checkpoint (or a fine-tune's parent), check the ledger and its
        thresholds, and only then write the run folder; then the components that act during the loop."""
        config, out, runtime = self.config, self.out, self.runtime
        tcfg, mcfg, layout, device = config.train, config.model, runtime.layout, runtime.device
        checkpointer = Checkpointer(out / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
        if restart_count() == 0:
            checkpointer.kill_before_commit_at = config.faults.inject_kill_in_save_at_step
        self.logger = MetricsLogger(out, tcfg.steps, config.log.tensorboard, enabled=runtime.is_main,
                                    interval=config.log.interval)
        self.checkpoints = CheckpointPolicy(checkpointer, {MODEL_KEY: self.state}, self.logger, config.checkpoint.interval,
                                            tcfg.steps, config.checkpoint.on_error, {"config_sha": config_hash(config)})
        # Resume from the newest intact checkpoint, if any; only then touch the run folder. A replica group
        # (restarted by torchrun, or started on a spare node) takes the current state from a live peer
        # instead, at its first quorum, and reads its own checkpoint only if no peer is ahead of it (the
        # whole job was down).
        self.warn = (lambda text: print(f"warning: {text}")) if runtime.is_main else (lambda text: None)
        self.from_storage_later = runtime.replica_groups > 1
        reading = time.perf_counter()
        self.resumed_from = None if self.from_storage_later else checkpointer.load_latest({MODEL_KEY: self.state},
                                                                                           warn=self.warn)
        if self.resumed_from is not None:
            self.startup.took("checkpoint_read", time.perf_counter() - reading)
        self.checkpoints.saved_step = self.resumed_from
        lineage = None
        if self.resumed_from is None and tcfg.init_from:  # a fine-tune starts from another run's weights
            parent = Path(tcfg.init_from)
            lineage = {**parent_lineage(parent), "step": load_model_weights(parent / "checkpoints", self.model)}
        ledger = Ledger.open(out, ledger_rates(mcfg, layout, config.ledger, device, runtime.replica_groups),
                             load_thresholds(config.ledger.thresholds_file or None))
        self.accounting = Accounting(ledger, config.ledger.stop_at_threshold, self.logger, runtime.is_main,
                                     (lambda: self.progress.tokens) if runtime.replica_groups > 1 else None)
        if runtime.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "config.toml", config_to_toml(config))
        self.logger.open()
        # Batches of this group's size (the whole batch without replica groups); each group scores the same text.
        self.evaluator = Evaluator(validation_batches(self.data.val, mcfg.seq_len, layout.gbs,
                                                      config.eval.batches, runtime.dp_rank, layout.dp),
                                   config.eval.interval, tcfg.steps, runtime, layout.precision, self.pipeline)
        faults = config.faults
        self.nan_guard = NanGuard(faults.max_bad_steps, faults.inject_nan_at_step, faults.inject_nan_count,
                                  on_skip=self.skipped)
        self.throughput = ThroughputWindow()
        self.watchdog = HangWatchdog(faults.hang_timeout_s,
                                     on_hang=lambda step, stuck: self.logger.event("hang", step=step, stuck_s=stuck))
        self.flops_per_token = modelmath.flops_per_token(mcfg)
        self.peak = device_peak_flops(device, layout.precision, self.planner.cpu_profile if self.planner else None)
        self.announce(lineage, ledger)

    def join_replica_groups(self) -> None:
        """This group's torchft Manager, made just before its first quorum: from then on the Lighthouse
        counts it as alive, and a quorum waits for a live group that has not asked to join yet."""
        setting_up = time.perf_counter()
        self.replicas = ReplicaGroups(self.config.faults, self.runtime.device, self.progress.step, self.transport_state,
                                      self.load_transported)
        self.startup.took("replica_setup", time.perf_counter() - setting_up)
        self.logger.print(f"replica group {self.config.faults.replica_group} of {self.runtime.replica_groups} "
                          f"(torchft, Lighthouse {self.config.faults.lighthouse or '$TORCHFT_LIGHTHOUSE'})")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        steps, progress, stop = self.config.train.steps, self.progress, None
        with PreemptionGuard() as preemption, self.watchdog, contextlib.closing(self.loader), self.logger:
            if self.runtime.replica_groups > 1:
                self.join_replica_groups()
            while progress.step < steps:
                if self.accounting.stop_due():  # before the next batch is drawn: a resume trains on it
                    stop = self.stop("stopped at threshold")
                    break
                try:
                    batch = self.next_batch()
                except RunFinishedByPeers as finished:
                    stop = "finished by peers"
                    self.logger.event("finished_by_peers", step=progress.step, peer=str(finished))
                    self.logger.print(f"the run finished in {finished} while this replica group was down; "
                                      "nothing left to train")
                    break
                if batch is None:
                    continue
                result = self.train_step(*batch)
                if result is None:  # the replica groups did not all finish it: the step runs again
                    continue
                stopping = preemption.should_stop()
                log, evaluate, save = (self.logger.should_log(progress.step), self.evaluator.should_evaluate(progress.step),
                                       self.checkpoints.should_save(progress.step))
                bad = self.nan_guard.settle(everything=log or evaluate or save or stopping or self.accounting.stop_due())
                if bad is not None:
                    self.rollback(bad)
                    continue
                if log:
                    self.log(result)
                if evaluate:
                    self.val_loss = self.evaluator.evaluate(self.model)
                    self.logger.log_validation(progress.step, self.val_loss, progress.elapsed_s)
                if save:
                    self.checkpoints.save(progress.step)
                    self.accounting.save()
                paused = evaluate or save  # validation and saving are not training throughput
                if paused and not stopping:  # a signal that came during the evaluation or the save stops here
                    stopping = preemption.should_stop()  # (every rank pauses at the same steps)
                if stopping:
                    stop = self.stop("preempted", preemption.received)
                    break
                if paused:
                    self.throughput.reopen()
                    self.watchdog.beat(progress.step)
                    if self.planner is not None:
                        self.planner.forget_peak()
            if stop is None:
                self.checkpoints.finish()  # the last checkpoint is complete before the run reports success
            self.accounting.finish(stop or "finished")
            if self.replicas is not None:
                self.replicas.close()
        return self.summary(preempted=stop == "preempted", stopped_at_threshold=stop == "stopped at threshold",
                            finished_by_peers=stop == "finished by peers")

    # ------------------------------------------------------------------ what the loop asks for
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, str, Membership | None] | None:
        """The next batch with its loader position (and, under replica groups, the step's membership: the
        quorum comes first, since who takes part decides the batch); a batch that broke this run before
        is consumed and skipped (None)."""
        membership = self.join_step() if self.replicas is not None else None
        if membership is not None and self.progress.step >= self.config.train.steps:
            return None  # a finished run started again: its own checkpoint was the end
        position = loader_position(self.loader)
        if position in self.progress.skip_batches:  # consume the whole step's windows, every group's share
            self.loader.next_batch() if membership is None else self.loader.next_shared_batch(
                membership.participant, membership.participants)
            self.logger.event("skip_batch", step=self.progress.step, batch=position)
            return None
        if membership is None:
            return (*self.loader.next_batch(), position, None)
        return (*self.loader.next_shared_batch(membership.participant, membership.participants), position, membership)

    def join_step(self) -> Membership:
        """The replica groups' quorum for the next step. A group behind the others has taken a live peer's
        state in it; a restarted group that no peer is ahead of (the whole job was down) reads its own
        newest checkpoint and asks again."""
        self.position_before_step = self.loader.state_dict()
        # A job's first quorum waits (up to a quorum's timeout) for every group, so that a run starts (or
        # resumes) whole; a group that torchrun restarted joins the others at once.
        first = restart_count() == 0 and not self.startup.reported
        membership = self.replicas.start_step(QUORUM_TIMEOUT_S if first else 0.0)
        if not self.startup.reported:
            self.startup.took("quorum", membership.quorum_s - membership.transfer_s)
            self.startup.took("transfer", membership.transfer_s)
        if membership.healed_from is not None:
            self.from_storage_later = False
            step = self.progress.step
            self.accounting.ledger.joined_at(step)
            self.logger.event("recovered_from_peer", step=step, from_step=membership.healed_from,
                              seconds=round(membership.quorum_s, 3), transfer_s=round(membership.transfer_s, 3),
                              participants=membership.participants)
            self.logger.print(f"replica group {self.config.faults.replica_group}: took step {step} from a live peer "
                              f"in {membership.quorum_s:.2f} s (was at step {membership.healed_from})")
            self.progress.start_clock()
            self.throughput.reopen()
            self.position_before_step = self.loader.state_dict()
        elif self.from_storage_later:
            self.from_storage_later = False
            restored = self.checkpoints.checkpointer.load_latest({MODEL_KEY: self.state}, warn=self.warn)
            if restored is not None:
                self.checkpoints.saved_step = restored
                self.accounting.ledger.joined_at(restored)
                self.logger.event("resume", step=restored, restart=restart_count(), reason="no live replica group ahead")
                self.logger.print(f"resumed {self.out} from step {restored}: no live replica group was ahead")
                self.progress.start_clock()
            if self.progress.step >= self.config.train.steps:  # this group had finished: nothing to train
                return membership
            peer = finished_peer(self.out, self.config.train.steps)
            if peer is not None:  # no live group because they all finished while this one was down
                raise RunFinishedByPeers(peer)
            if restored is not None:
                self.replicas.manager.load_state_dict({"step": restored, "batches_committed": 0})
                return self.join_step()
        return membership

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, position: str,
                   membership: Membership | None = None) -> StepResult | None:
        """One step, the clocks and counters after it, and its skip flag queued for the NaN guard. The
        run's first step is also counted by torch's FLOP counter, a cross-check of the model math. Under
        replica groups, None when the step did not commit on every group (it runs again)."""
        tcfg, layout, progress = self.config.train, self.runtime.layout, self.progress
        self.lr = self.scheduler.get_last_lr()[0]
        poison = self.nan_guard.poison(progress.step + 1)
        inputs, targets, positions = self.runtime.split_sequences(inputs, targets)  # context parallel: a part of each
        batch_sum = self.runtime.batch_sum  # over the ranks that hold the step's tokens: every replica group's too
        if membership is not None:
            batch_sum = lambda tensor: self.replicas.sum(self.runtime.batch_sum(tensor))  # noqa: E731
        step = lambda: train_step(self.model, self.optimizer, self.scheduler, inputs, targets, layout.mbs,  # noqa: E731
                                  tcfg.grad_clip, self.runtime.device, layout.precision, poison, batch_sum,
                                  positions, self.pipeline, self.runtime.sequence_sum,
                                  self.across_replicas if membership is not None else None)
        ledger = self.accounting.ledger
        # Not under pipeline parallelism: the counter's module hooks break the schedule's autograd.grad.
        if ledger.flop_counter_ratio is None and progress.step == 0 and self.pipeline is None:
            result, counted = counted_flops(step, self.model)
            tokens = layout.gbs * self.config.model.seq_len * ledger.rates.hardware_flops_per_token
            ledger.flop_counter_ratio = self.runtime.sum_over_ranks(float(counted)) / tokens
        else:
            result = step()
        if not result.committed:
            self.loader.load_state_dict(self.position_before_step)
            self.logger.event("step_retried", step=progress.step + 1, participants=membership.participants)
            return None
        participants = membership.participants if membership is not None else 1
        self.step_tokens = layout.gbs * participants * self.config.model.seq_len
        progress.advance(self.step_tokens)
        short = membership is not None and participants < self.runtime.replica_groups
        if short:
            self.logger.event("replicas_short", step=progress.step, participants=participants,
                              groups=self.runtime.replica_groups, tokens=self.step_tokens)
        self.accounting.step(progress.step, self.step_tokens, short)
        if not self.startup.reported:  # this process's first step: how long each stage before it took
            self.startup.mark("first_step")
            self.logger.event("startup", step=progress.step, restart=restart_count(), **self.startup.report())
        self.throughput.tick()
        self.watchdog.beat(progress.step)
        self.nan_guard.record(UnreadVerdict(result.skipped, result.grad_norm, progress.step, position, poison))
        return result

    def across_replicas(self, result: StepResult) -> bool:
        """Average this group's gradients (and its loss, for the log) with the step's other replica groups,
        and whether the step commits on all of them. Every parameter takes part, with a zero gradient where
        it has none, so that every group's all-reduce has the same shape."""
        for param in self.model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        loss = result.loss.detach().float().reshape(1).clone()
        self.replicas.average([p.grad for p in self.model.parameters() if p.grad is not None] + [loss])
        result.loss = loss[0]
        return self.replicas.commit()

    def transport_state(self) -> dict[str, Any]:
        """What a live group sends a group that joins behind it: the checkpoint's state, shards as plain tensors."""
        return to_transport(self.state.state_dict())

    def load_transported(self, received: dict[str, Any]) -> None:
        self.state.load_state_dict(from_transport(received, self.state.state_dict()))

    def skipped(self, verdict: UnreadVerdict) -> None:
        self.progress.skipped_steps += 1
        self.logger.event("skipped_step", step=verdict.step, grad_norm=float(verdict.grad_norm), batch=verdict.position)

    def rollback(self, bad: UnreadVerdict) -> None:
        """Back to the newest intact checkpoint after max_bad_steps non-finite steps in a row, marking the
        last one's batch so that the replay skips it. Without a checkpoint there is nothing to go back to."""
        max_bad, ran_to = self.nan_guard.max_bad_steps, self.progress.step
        skip = sorted(set(self.progress.skip_batches) | {bad.position})
        skipped_steps = self.progress.skipped_steps
        restored = self.checkpoints.restore()
        if restored is None:
            raise UserError(f"{max_bad} consecutive steps up to step {bad.step} had non-finite gradients and there is "
                            "no checkpoint to roll back to; lower train.lr or check the data, then train again")
        self.progress.skip_batches = sorted(set(self.progress.skip_batches) | set(skip))
        self.progress.skipped_steps = skipped_steps
        self.logger.event("rollback", from_step=bad.step, to_step=restored, skip_batch=bad.position)
        self.accounting.rollback(ran_to, restored)  # the steps run after the bad one are lost too
        if self.replicas is not None:  # every group rolls back alike (they averaged the same gradients); one
            # without that checkpoint (it joined later) restores an older one and the next quorum heals it
            self.replicas.manager.load_state_dict({"step": self.progress.step, "batches_committed": 0})
        self.nan_guard.rolled_back()
        self.progress.start_clock()
        self.throughput.reopen()
        self.logger.print(f"rolled back to step {restored} after {max_bad} non-finite steps; skipping batch {bad.position}")

    def log(self, result: StepResult) -> None:
        runtime, progress = self.runtime, self.progress
        step_time = self.throughput.step_time()
        # MFU from this process's group: its own tokens on its own devices (tokens_per_s counts every group's).
        group_tokens_per_s = runtime.layout.gbs * self.config.model.seq_len / step_time
        record = {
            "step": progress.step, "loss": runtime.batch_mean(result.loss).item(), "lr": self.lr,
            "grad_norm": result.grad_norm.item(), "tokens": progress.tokens, "tokens_per_s": self.step_tokens / step_time,
            "mfu": group_tokens_per_s * self.flops_per_token / (self.peak * runtime.layout.world_size) if self.peak else None,
            "elapsed_s": progress.elapsed_s, "step_time_s": step_time,
        }
        if self.config.log.state_digest:
            record["state_sha256"] = state_digest(self.model, self.optimizer)
        if result.aux_loss is not None:
            record["aux_loss"] = runtime.batch_mean(result.aux_loss).item()
            record["z_loss"] = runtime.batch_mean(result.z_loss).item()
            record["expert_load"] = [[round(v, 4) for v in row] for row in runtime.batch_mean(result.expert_load).tolist()]
        self.logger.log_step(record, eta_s=(self.config.train.steps - progress.step) * step_time)
        if self.planner is not None:
            self.planner.record_step(step_time)
        self.accounting.note_crossed(progress.step)
        self.accounting.save()
        self.throughput.reopen()

    def stop(self, why: str, signum: int | None = None) -> str:
        """Stop early with a checkpoint of the current step: at a threshold, or on a signal."""
        step = self.progress.step
        saved = self.checkpoints.save(step)  # no second write if this step was just saved
        saved = self.checkpoints.finish() and saved
        if why == "preempted":
            signame = signal.Signals(signum).name if signum else "a signal on another rank"
            self.logger.event("preempted", step=step, signal=signame, checkpoint_written=saved)
            self.logger.print(f"stopped by {signame} at step {step}; "
                              + ("checkpoint written; " if saved else "its checkpoint failed (see above); ")
                              + "run the same command again to continue")
        else:
            threshold = self.config.ledger.stop_at_threshold
            self.logger.event("threshold_stop", step=step, threshold=threshold)
            self.logger.print(f"stopped at step {step}: the next step would exceed threshold {threshold} "
                              "(ledger.stop_at_threshold); checkpoint written")
        return why

    # ------------------------------------------------------------------ before and after
    def announce(self, lineage: dict | None, ledger: Ledger) -> None:
        """The run's first lines: fine-tune lineage, threshold warnings, start or resume, the model."""
        config, logger, mcfg, layout = self.config, self.logger, self.config.model, self.runtime.layout
        if lineage is not None and not ledger.segments:
            ledger.lineage = lineage
            logger.event("init_from", run=lineage["run"], step=lineage["step"],
                         parent_cumulative_model_flops=lineage["cumulative_model_flops"])
            logger.print(f"fine-tuning from {lineage['run']} step {lineage['step']} "
                         f"({lineage['cumulative_model_flops']:.3g} FLOP before this run)")
        ledger.start_segment(None if self.from_storage_later else self.resumed_from or 0, restart_count())
        self.accounting.warn_ahead(config.train.steps - self.progress.step)
        if self.resumed_from is not None:
            logger.event("resume", step=self.resumed_from, restart=restart_count())
            logger.print(f"resumed {self.out} from step {self.resumed_from}"
                         + (f" (restart {restart_count()} by the launcher)" if restart_count() else ""))
        else:
            logger.event("start", step=0, restart=restart_count())
        self.baseline = unigram_loss(self.data.train, self.data.val, mcfg.vocab_size)
        self.val_loss = None
        logger.print(
            f"model {mcfg.name}: {modelmath.params_total(mcfg) / 1e6:.1f}M parameters "
            f"({modelmath.params_active(mcfg) / 1e6:.1f}M active), {self.flops_per_token / 1e6:.1f} MFLOP/token | "
            f"data: {len(self.data.train):,} train / {len(self.data.val):,} val tokens ({self.data.tokenizer.name}) | "
            f"device {self.runtime.device}, {torch.get_num_threads()} threads, layout {layout.describe()} | "
            f"unigram val loss {self.baseline:.3f}")
        self.model.train()
        self.progress.start_clock()
        self.throughput.reopen()

    def summary(self, preempted: bool, stopped_at_threshold: bool, finished_by_peers: bool = False) -> dict[str, Any]:
        mcfg, progress, ledger = self.config.model, self.progress, self.accounting.ledger
        summary = {
            "step": progress.step, "tokens": progress.tokens, "val_loss": self.val_loss,
            "unigram_val_loss": self.baseline, "elapsed_s": progress.elapsed_s,
            "params_total": modelmath.params_total(mcfg), "params_active": modelmath.params_active(mcfg),
            "flops_per_token": self.flops_per_token, "skipped_steps": progress.skipped_steps,
            "checkpoint_failures": self.checkpoints.failures, "preempted": preempted,
            "stopped_at_threshold": stopped_at_threshold,
            "ledger": {k: v for k, v in ledger.to_json().items() if k in (
                "tokens", "model_flops", "hardware_flops", "flop_counter_ratio", "gpu_hours", "energy_kwh", "cost_usd",
                "cumulative_model_flops")},
        }
        if self.planner is not None and self.planner.summary().get("measured"):
            summary.update(self.planner.summary())
            self.logger.print(planner_line(summary))
        if finished_by_peers:
            summary["finished_by_peers"] = True
        if self.config.eval.sample_tokens > 0 and not preempted and not finished_by_peers:
            summary["sample"] = sample_text(self.model, self.data.tokenizer, self.config, self.runtime.device,
                                            self.pipeline)
            self.logger.print(f"sample:\n{summary['sample']}")
        if self.runtime.is_main:
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary


def planner_line(summary: dict[str, Any]) -> str:
    """One line: the run's measured step time and peak memory against the planner's prediction."""
    measured, predicted = summary["measured"], summary.get("predicted")
    if predicted is None:
        return (f"measured: {measured['step_time_s']:.3g} s per step, {measured['peak_memory_gib']:.2f} GiB peak "
                "(no prediction for this device)")
    parts = [f"{name} {measured[key]:.3g} {unit} measured vs {predicted[key]:.3g} predicted "
             f"({measured[key] / predicted[key] - 1:+.0%})" for name, key, unit in (
                 ("step", "step_time_s", "s"), ("peak memory", "peak_memory_gib", "GiB"))]
    return "planner check: " + "; ".join(parts) + " (summary.json: predicted, measured)"


def set_threads(threads: int) -> None:
    """Give each process on a machine its share of the cores, so ranks do not oversubscribe them."""
    if threads > 0:
        torch.set_num_threads(threads)
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_ranks > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """Deterministic CUDA kernels (index_add_, scatter, the attention backward) while training, so that a
    rerun or a resume gives the same bits on a GPU as it does on a CPU. cuBLAS needs a fixed workspace
    for that (CUDA docs, "Results reproducibility"), set before its first matmul; kernels without a
    deterministic version warn rather than stop the run. The process-wide switch is restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the validation tokens under the training set's token frequencies (add-one
    smoothed): the loss of a model that learned nothing but how often each token occurs."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_tokens].mean())


def check_run_folder(out: Path, config: RunConfig) -> None:
    """Refuse, before anything is written, to resume a run folder trained with another model or data."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pick another --out")
    refuse_imported(out)
    saved = out / "config.toml"
    if not saved.is_file():
        return
    try:
        previous = tomllib.loads(saved.read_text())
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise UserError(f"{saved} is unreadable ({exc}); fix it or train into a new --out folder") from None
    current, defaults = config_to_dict(config), config_to_dict(RunConfig())
    for section in ("model", "data"):
        # A key the saved config lacks (added since that run began) counts as its default then.
        before = {**defaults[section], **previous.get(section, {})}
        if before != current[section]:
            changed = sorted(k for k in current[section] if before.get(k) != current[section][k])
            raise UserError(
                f"{out} holds a run with a different [{section}] ({', '.join(f'{section}.{k}' for k in changed)}); "
                "use the same config to resume, or a new --out folder"
            )


class RunFinishedByPeers(Exception):
    """The other replica groups finished the run while this one was down (the message: where)."""


def finished_peer(out: Path, steps: int) -> Path | None:
    """Another replica group's folder beside `out` whose summary says it trained all `steps`."""
    for summary in sorted(out.parent.glob("replica-*/summary.json")):
        try:
            if summary.parent != out and json.loads(summary.read_text()).get("step") == steps:
                return summary.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


def check_replica_folders(out: Path, config: RunConfig) -> None:
    """Refuse to switch a run folder between one job and replica groups (each keeps its checkpoints
    elsewhere: the run would silently start again)."""
    if config.faults.replica_groups and (out / "checkpoints").is_dir():
        raise UserError(f"{out} holds a run trained without replica groups ({out / 'checkpoints'}); train replica "
                        "groups into a new --out folder, or resume it without faults.replica_groups")
    if not config.faults.replica_groups and any(out.glob("replica-*/checkpoints")):
        raise UserError(f"{out} holds a run trained as replica groups ({out}/replica-K/); resume it with the same "
                        "faults.replica_groups, or train into a new --out folder")


def replica_folder(out: Path, config: RunConfig) -> Path:
    """Where this process's run lives: the run folder, or under replica groups its group's own folder in
    it (RUN/replica-K: its metrics, events, ledger and checkpoints)."""
    return out / f"replica-{config.faults.replica_group}" if config.faults.replica_groups else out


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this job; 0 for a first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def loader_position(loader) -> str:
    """Where the loader stands, as a short stable label (epoch:cursor)."""
    state = loader.state_dict()
    return f"{state['epoch']}:{state['cursor']}"


def sample_text(model: Transformer, tokenizer, config: RunConfig, device: torch.device,
                pipeline: Pipeline | None = None) -> str:
    """A short generation from the trained model, seeded so it is the same every time (through the
    pipeline's stages when the model is split into them)."""
    prompt = tokenizer.encode(config.eval.sample_prompt) or [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    tokens = torch.tensor([prompt], device=device)
    model.eval()
    if pipeline is None:
        generated = model.generate(tokens, config.eval.sample_tokens, generator=generator)
    else:
        generated = sample(pipeline.next_logits, tokens, config.eval.sample_tokens, config.model.seq_len,
                           generator=generator)
    return tokenizer.decode(generated[0].tolist())


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(config_to_toml(config).encode()).hexdigest()[:16]
