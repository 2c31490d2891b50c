"""The training loop, top to bottom: set up, resume, then step / log / validate / checkpoint.

Everything with state (model, optimizer, schedule, data loader, progress counters, RNG) is saved in
every checkpoint, so a run killed at any point and started again with the same command continues
with exactly the batches and numbers the uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import tomllib
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from colossus import modelmath
from colossus.account.flopcount import counted_flops
from colossus.account.ledger import CPU_USD_PER_THREAD_HOUR, CPU_WATTS_PER_THREAD, GPU_USD_PER_HOUR, Ledger, Rates, parent_lineage
from colossus.account.thresholds import load_thresholds
from colossus.config import RunConfig, TrainConfig, config_to_dict, config_to_toml
from colossus.data import PrefetchingLoader, TokenLoader, make_loader, prepare_tokens, validation_batches
from colossus.data.cache import cache_root
from colossus.errors import UserError
from colossus.files import write_atomic
from colossus.models.grok import Transformer, build_model
from colossus.parallel.parallelize import clip_grad_norm, parallelize
from colossus.parallel.runtime import Runtime, setup_runtime
from colossus.train.checkpoint import Checkpointer, CheckpointWriteError, load_model_weights
from colossus.train.guards import HangWatchdog, PreemptionGuard
from colossus.train.metrics import MetricsLogger
from colossus.train.optim import build_optimizer, build_scheduler
from colossus.train.peak import device_peak_flops
from colossus.plan.hardware import gpu_from_device_name


@dataclass
class Progress:
    """Counters that survive restarts (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # training wall time summed over all segments of the run
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite gradient
    skip_batches: list[str] = field(default_factory=list)  # loader positions of batches that broke a run

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s,
                "skipped_steps": self.skipped_steps, "skip_batches": list(self.skip_batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.elapsed_s = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skip_batches = list(state.get("skip_batches", []))


@dataclass
class TrainingState:
    """The one Stateful object handed to DCP: it gathers every component's state."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TokenLoader | PrefetchingLoader
    progress: Progress = field(default_factory=Progress)

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The saved param groups carry the saving run's kernel choice (fused, foreach); keep this run's.
        kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for group, chosen in zip(self.optimizer.param_groups, kernels):
            group.update(chosen)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.progress.load_state_dict(state["progress"])
        torch.set_rng_state(state["rng"])


@dataclass
class StepResult:
    loss: torch.Tensor  # mean cross-entropy over the step's sequences (a 0-d tensor: no host sync)
    grad_norm: torch.Tensor
    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    expert_load: torch.Tensor | None  # [n_layers, n_experts]
    skipped: torch.Tensor | bool = False  # the gradient was not finite: no update was applied (a 0-d bool
    # tensor, so that reading it, the only host sync of a step, is the caller's choice)


@dataclass
class UnreadVerdict:
    """A finished step whose skip flag is still on the device (read one step later)."""

    skipped: torch.Tensor | bool
    grad_norm: torch.Tensor
    step: int
    position: str  # the loader position of its batch
    poison: bool = False  # a fault injected on purpose (faults.inject_nan_at_step)


def set_threads(cfg: TrainConfig) -> None:
    """Give each process on a machine its share of the cores, so ranks do not oversubscribe them."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_ranks > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               inputs: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, device: torch.device,
               poison: bool = False) -> StepResult:
    """One optimizer step over this rank's share of the global batch, in micro-batches. A step whose
    gradient norm is not finite applies no update (`poison` makes its loss NaN, for testing)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    n_micro = inputs.shape[0] // cfg.micro_batch if inputs.shape[0] >= cfg.micro_batch else 1
    loss_sum = aux_sum = z_sum = load_sum = None
    for x, y in zip(inputs.chunk(n_micro), targets.chunk(n_micro)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            out = model(x, y)
        loss = out.loss * float("nan") if poison else out.loss
        (loss / n_micro).backward()
        loss_sum = out.ce_loss if loss_sum is None else loss_sum + out.ce_loss
        if out.aux_loss is not None:
            aux_sum = out.aux_loss.detach() if aux_sum is None else aux_sum + out.aux_loss.detach()
            z_sum = out.z_loss.detach() if z_sum is None else z_sum + out.z_loss.detach()
            load_sum = out.expert_load if load_sum is None else load_sum + out.expert_load
    grad_norm = clip_grad_norm(list(model.parameters()), cfg.grad_clip)
    # The norm is global (the same on every rank), so all ranks agree on skipping a non-finite step.
    not_finite = ~torch.isfinite(grad_norm)
    # Read from the param groups, not the defaults: loading a checkpoint restores the saving run's flags.
    if all(group.get("fused") for group in optimizer.param_groups):
        # The fused kernel reads the flag where it lies and leaves weights, moments and step count
        # untouched when it is set (as under GradScaler): no host sync on the step's path.
        optimizer.found_inf = not_finite.float()
        optimizer.step()
    else:
        optimizer.__dict__.pop("found_inf", None)  # only the fused kernel accepts the flag
        if not bool(not_finite):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    mean = (lambda t: None if t is None else t / n_micro)
    loss_mean = loss_sum / n_micro if not poison else torch.full((), float("nan"), device=device)
    return StepResult(loss_mean, grad_norm, mean(aux_sum), mean(z_sum), mean(load_sum), skipped=not_finite)


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime) -> float:
    """Mean validation loss over this rank's share of the fixed validation batches, averaged over ranks."""
    device = runtime.device
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses = []
    for x, y in batches:
        with autocast:
            losses.append(model(x.to(device), y.to(device)).ce_loss)
    model.train()
    return runtime.dp_mean(torch.stack(losses).mean()).item()


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
    saved = out / "config.toml"
    if not saved.is_file():
        return
    try:
        previous = tomllib.loads(saved.read_text())
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise UserError(f"{saved} is unreadable ({exc}); fix it or train into a new --out folder") from None
    current = config_to_dict(config)
    for section in ("model", "data"):
        if previous.get(section) != current[section]:
            changed = sorted(k for k in current[section] if previous.get(section, {}).get(k) != current[section][k])
            raise UserError(
                f"{out} holds a run with a different [{section}] ({', '.join(f'{section}.{k}' for k in changed)}); "
                "use the same config to resume, or a new --out folder"
            )


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this job; 0 for a first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def train(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Train (or resume) the run in folder `out`; returns the run summary (also saved as summary.json)."""
    out = Path(out)
    check_run_folder(out, config)
    runtime = setup_runtime(config)  # layout checked against world size and model before any build
    finished = False
    kernels_before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if config.train.deterministic:
            use_deterministic_kernels()
        summary = _train(config, out, runtime)
        finished = True
        return summary
    finally:
        torch.use_deterministic_algorithms(kernels_before[0], warn_only=kernels_before[1])
        runtime.close(finished)


def use_deterministic_kernels() -> None:
    """Deterministic CUDA kernels (index_add_, scatter, the attention backward), so that a rerun or a
    resume gives the same bits on a GPU as it does on a CPU. cuBLAS needs a fixed workspace for that
    (CUDA docs, "Results reproducibility"), set before its first matmul; kernels without a
    deterministic version warn rather than stop the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def _train(config: RunConfig, out: Path, runtime: Runtime) -> dict[str, Any]:
    tcfg, mcfg = config.train, config.model
    device, layout = runtime.device, runtime.layout

    # --- set up: data, model, parallelism, optimizer, loader (nothing is written to the run folder yet)
    set_threads(tcfg)
    data = prepare_tokens(config.data, mcfg.vocab_size, mcfg.seq_len)
    torch.manual_seed(tcfg.seed)
    # Every rank builds the full model from the same seed, then keeps its shards: the weights are the
    # same whatever the layout. (Very large models will need meta-device initialisation instead.)
    model = build_model(mcfg, device, seed=tcfg.seed)
    parallelize(model, layout, runtime.mesh, config.parallel, tcfg, device)
    optimizer = build_optimizer(model, tcfg, device)
    scheduler = build_scheduler(optimizer, tcfg)
    loader = make_loader(data.train, mcfg.seq_len, tcfg.global_batch, runtime.dp_rank, layout.dp, tcfg.seed,
                         prefetch=config.data.prefetch, pin_memory=device.type == "cuda")
    state = TrainingState(model, optimizer, scheduler, loader)
    checkpointer = Checkpointer(out / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    if restart_count() == 0:
        checkpointer.kill_before_commit_at = config.faults.inject_kill_in_save_at_step

    # --- resume from the newest intact checkpoint, if any; only then touch the run folder
    warn = (lambda text: print(f"warning: {text}")) if runtime.is_main else (lambda text: None)
    resumed_from = checkpointer.load_latest({"train": state}, warn=warn)
    progress = state.progress
    thresholds = load_thresholds(config.ledger.thresholds_file or None)
    lineage = None
    if resumed_from is None and tcfg.init_from:  # a fine-tune starts from another run's weights
        parent = Path(tcfg.init_from)
        parent_step = load_model_weights(parent / "checkpoints", model)
        lineage = {**parent_lineage(parent), "step": parent_step}
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.toml", config_to_toml(config))
    logger = MetricsLogger(out, tcfg.steps, config.log.tensorboard, enabled=runtime.is_main)
    ledger = Ledger.open(out, ledger_rates(config, runtime), thresholds)
    if lineage is not None and not ledger.segments:
        ledger.lineage = lineage
        logger.event("init_from", run=lineage["run"], step=lineage["step"],
                     parent_cumulative_model_flops=lineage["cumulative_model_flops"])
        logger.print(f"fine-tuning from {lineage['run']} step {lineage['step']} "
                     f"({lineage['cumulative_model_flops']:.3g} FLOP before this run)")
    ledger.start_segment(resumed_from or 0, restart_count())
    warn_thresholds(ledger, tcfg.steps - progress.step, logger)
    if resumed_from is not None:
        logger.event("resume", step=resumed_from, restart=restart_count())
        logger.print(f"resumed {out} from step {resumed_from}"
                     + (f" (restart {restart_count()} by the launcher)" if restart_count() else ""))
    else:
        logger.event("start", step=0, restart=restart_count())

    flops_per_token = modelmath.flops_per_token(mcfg)
    peak = device_peak_flops(device, cache_root(config.data))
    # eval.batches global batches of validation windows: the same set whatever the layout.
    val_batches = validation_batches(data.val, mcfg.seq_len, tcfg.global_batch, config.eval.batches,
                                     runtime.dp_rank, layout.dp)
    baseline = unigram_loss(data.train, data.val, mcfg.vocab_size)
    logger.print(
        f"model {mcfg.name}: {modelmath.params_total(mcfg) / 1e6:.1f}M parameters "
        f"({modelmath.params_active(mcfg) / 1e6:.1f}M active), {flops_per_token / 1e6:.1f} MFLOP/token | "
        f"data: {len(data.train):,} train / {len(data.val):,} val tokens ({data.tokenizer.name}) | "
        f"device {device}, {torch.get_num_threads()} threads, layout {layout.describe()} | unigram val loss {baseline:.3f}"
    )

    # --- the loop: the host reads tensors back (.item()) only on logging steps, and each step's skip
    # flag one step late
    tokens_per_step = tcfg.global_batch * mcfg.seq_len  # over all ranks
    segment_start, elapsed_before = time.perf_counter(), progress.elapsed_s
    window_start, window_steps = segment_start, 0  # throughput window: training steps only
    val_loss = None
    faults = config.faults
    poisoned_left = faults.inject_nan_count if faults.inject_nan_at_step else 0
    consecutive_bad = 0
    unread: deque[UnreadVerdict] = deque()  # steps whose skip flag the NaN guard has not read yet
    preempted = stopped_at_threshold = False
    model.train()
    storage = CheckpointPolicy(checkpointer, {"train": state}, config, logger, saved_step=resumed_from)
    watchdog = HangWatchdog(faults.hang_timeout_s, on_hang=lambda step, stuck: logger.event("hang", step=step, stuck_s=stuck))
    try:
        with PreemptionGuard() as preemption, watchdog:
            while progress.step < tcfg.steps:
                if stop_before_threshold(ledger, config.ledger.stop_at_threshold):
                    storage.save(progress.step)  # before the next batch is drawn: a resume trains on it
                    storage.finish()
                    logger.event("threshold_stop", step=progress.step, threshold=config.ledger.stop_at_threshold)
                    logger.print(f"stopped at step {progress.step}: the next step would exceed threshold "
                                 f"{config.ledger.stop_at_threshold} (ledger.stop_at_threshold); checkpoint written")
                    stopped_at_threshold = True
                    break
                position = loader_position(loader)
                if position in progress.skip_batches:
                    loader.next_batch()  # a batch that broke this run before: consume it, train on the next
                    logger.event("skip_batch", step=progress.step, batch=position)
                    continue
                lr = scheduler.get_last_lr()[0]
                inputs, targets = loader.next_batch()
                poison = poisoned_left > 0 and progress.step + 1 >= faults.inject_nan_at_step
                poisoned_left -= int(poison)
                if ledger.flop_counter_ratio is None and progress.step == 0:
                    # Cross-check the model math once: count this first step's FLOPs as torch runs them.
                    result, counted = counted_flops(lambda: train_step(model, optimizer, scheduler, inputs, targets,
                                                                       tcfg, device, poison))
                    ledger.flop_counter_ratio = runtime.sum_over_ranks(float(counted)) / (
                        tokens_per_step * ledger.rates.hardware_flops_per_token)
                else:
                    result = train_step(model, optimizer, scheduler, inputs, targets, tcfg, device, poison)
                progress.step += 1
                ledger.step(progress.step)
                progress.tokens += tokens_per_step
                progress.elapsed_s = elapsed_before + time.perf_counter() - segment_start
                window_steps += 1
                watchdog.beat(progress.step)
                last = progress.step == tcfg.steps

                stopping = preemption.should_stop()
                log_due = progress.step % config.log.interval == 0 or last
                eval_due = progress.step % config.eval.interval == 0 or last
                save_due = progress.step % config.checkpoint.interval == 0 or last

                # The NaN guard reads a step's skip flag one step late, after the next step's work is
                # queued, so that a GPU never idles while the host waits; before anything is logged,
                # evaluated or saved (or the run stops) every flag is read.
                unread.append(UnreadVerdict(result.skipped, result.grad_norm, progress.step, position, poison))
                settle = (log_due or eval_due or save_due or stopping
                          or stop_before_threshold(ledger, config.ledger.stop_at_threshold))
                consecutive_bad, last_straw = read_verdicts(unread, 0 if settle else 1, consecutive_bad,
                                                            faults.max_bad_steps, progress, logger)
                if last_straw is not None:
                    bad_batch = last_straw.position
                    storage.finish()
                    ran_to = progress.step  # the steps run after the bad one are lost too
                    restored = rollback(checkpointer, state, bad_batch, last_straw.step, faults.max_bad_steps, logger)
                    ledger.rollback(ran_to, restored)  # (progress is the restored one now)
                    progress = state.progress
                    storage.saved_step = restored
                    poisoned_left += sum(v.poison for v in unread)  # injected faults of discarded steps come again
                    unread.clear()
                    consecutive_bad = 0
                    elapsed_before, segment_start = progress.elapsed_s, time.perf_counter()
                    window_start, window_steps = time.perf_counter(), 0
                    logger.print(f"rolled back to step {restored} after {faults.max_bad_steps} non-finite steps; "
                                 f"skipping batch {bad_batch}")
                    continue

                if log_due:
                    step_time = (time.perf_counter() - window_start) / window_steps
                    tokens_per_s = tokens_per_step / step_time
                    record = {
                        "step": progress.step,
                        "loss": runtime.dp_mean(result.loss).item(),
                        "lr": lr,
                        "grad_norm": result.grad_norm.item(),
                        "tokens": progress.tokens,
                        "tokens_per_s": tokens_per_s,
                        "mfu": tokens_per_s * flops_per_token / (peak * layout.world_size) if peak else None,
                        "elapsed_s": progress.elapsed_s,
                        "step_time_s": step_time,
                    }
                    if result.aux_loss is not None:
                        record["aux_loss"] = runtime.dp_mean(result.aux_loss).item()
                        record["z_loss"] = runtime.dp_mean(result.z_loss).item()
                        load = runtime.dp_mean(result.expert_load)
                        record["expert_load"] = [[round(v, 4) for v in row] for row in load.tolist()]
                    logger.log_step(record, eta_s=(tcfg.steps - progress.step) * step_time)
                    note_thresholds(ledger, progress.step, logger)
                    if runtime.is_main:
                        ledger.save()
                    window_start, window_steps = time.perf_counter(), 0

                paused = False  # validation and saving are not training throughput
                if eval_due:
                    val_loss = evaluate(model, val_batches, runtime)
                    logger.log_validation(progress.step, val_loss, progress.elapsed_s)
                    paused = True

                if save_due:
                    storage.save(progress.step)
                    if runtime.is_main:
                        ledger.save()
                    paused = True

                if paused and not stopping:  # a signal that came during the evaluation or the save stops here
                    stopping = preemption.should_stop()  # (every rank pauses at the same steps)
                if stopping:
                    saved = storage.save(progress.step)  # no second write if this step was just saved
                    saved = storage.finish() and saved
                    signame = signal.Signals(preemption.received).name if preemption.received else "a signal on another rank"
                    logger.event("preempted", step=progress.step, signal=signame, checkpoint_written=saved)
                    logger.print(f"stopped by {signame} at step {progress.step}; "
                                 + ("checkpoint written; " if saved else "its checkpoint failed (see above); ")
                                 + "run the same command again to continue")
                    preempted = True
                    break

                if paused:
                    window_start, window_steps = time.perf_counter(), 0
                    watchdog.beat(progress.step)
            storage.finish()  # the last checkpoint is complete before the run reports success
        ledger.finish("preempted" if preempted else "stopped at threshold" if stopped_at_threshold else "finished")
        if runtime.is_main:
            ledger.save()
    finally:
        loader.close()
        logger.close()

    summary = {
        "step": progress.step,
        "tokens": progress.tokens,
        "val_loss": val_loss,
        "unigram_val_loss": baseline,
        "elapsed_s": progress.elapsed_s,
        "params_total": modelmath.params_total(mcfg),
        "params_active": modelmath.params_active(mcfg),
        "flops_per_token": flops_per_token,
        "skipped_steps": progress.skipped_steps,
        "checkpoint_failures": storage.failures,
        "preempted": preempted,
        "stopped_at_threshold": stopped_at_threshold,
        "ledger": {k: v for k, v in ledger.to_json().items() if k in ("tokens", "model_flops", "hardware_flops",
                   "flop_counter_ratio", "gpu_hours", "energy_kwh", "cost_usd", "cumulative_model_flops")},
    }
    if config.eval.sample_tokens > 0 and not preempted:
        summary["sample"] = sample_text(model, data.tokenizer, config, device)
        logger.print(f"sample:\n{summary['sample']}")
    if runtime.is_main:
        write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


class CheckpointPolicy:
    """Saves the training state and applies checkpoint.on_error when storage fails: a failed save is
    recorded (events.jsonl, console) and the run goes on with its previous checkpoint intact, or
    stops with a one-line error naming the folder."""

    def __init__(self, checkpointer: Checkpointer, state: dict[str, Any], config: RunConfig, logger: MetricsLogger,
                 saved_step: int | None = None):
        self.checkpointer, self.state, self.logger = checkpointer, state, logger
        self.saved_step = saved_step  # the step whose checkpoint holds the current state (set it after a rollback)
        self.on_error = config.checkpoint.on_error
        self.extra = {"config_sha": _config_hash(config)}
        self.failures = 0

    def save(self, step: int) -> bool:
        """Start the checkpoint of `step` (after the previous one is done); False if either failed. A step
        already saved is not written again (replacing a checkpoint with itself only opens a window
        in which, with checkpoint.keep = 1, none is committed)."""
        previous_ok = self.finish()
        if step == self.saved_step:
            return previous_ok
        try:
            path = self.checkpointer.save(step, self.state, extra=self.extra)
        except CheckpointWriteError as exc:
            self._failed(exc)
            return False
        self.saved_step = step
        self.logger.event("checkpoint", step=step, path=str(path))
        return previous_ok

    def finish(self) -> bool:
        """Wait for a background save; False if it failed."""
        try:
            self.checkpointer.finish()
        except CheckpointWriteError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: CheckpointWriteError) -> None:
        self.failures += 1
        intact = next((step for step, _ in self.checkpointer.step_folders()), None)
        self.logger.event("checkpoint_failed", step=exc.step, reason=exc.reason, newest_intact=intact)
        where = f"the newest intact checkpoint is step {intact}" if intact is not None else "there is no earlier checkpoint"
        if self.on_error == "stop":
            raise UserError(f"{exc}; {where}; free space or fix {self.checkpointer.folder}, then run the same "
                            "command again (or set checkpoint.on_error=continue to train on)") from None
        self.logger.print(f"warning: {exc}; {where}; training goes on (checkpoint.on_error=continue)")


def ledger_rates(config: RunConfig, runtime: Runtime) -> Rates:
    """What a step and a device-second of this run are worth, for its ledger."""
    m, t, cfg = config.model, config.train, config.ledger
    recompute = {"none": "none", "full": "full", "selective": "full"}[config.parallel.activation_checkpoint]
    fraction = 1.0 if config.parallel.activation_checkpoint != "selective" else \
        -(-m.n_layers // config.parallel.ac_every) / m.n_layers  # every ac_every-th block is recomputed
    if runtime.device.type == "cuda":
        gpu = gpu_from_device_name(torch.cuda.get_device_name(runtime.device))
        power = cfg.device_power_w or (gpu.tdp_w if gpu else 700.0)
        price = GPU_USD_PER_HOUR
    else:
        power = cfg.device_power_w or CPU_WATTS_PER_THREAD * torch.get_num_threads()
        price = CPU_USD_PER_THREAD_HOUR * torch.get_num_threads()
    return Rates(tokens_per_step=t.global_batch * m.seq_len, model_flops_per_token=modelmath.flops_per_token(m),
                 hardware_flops_per_token=modelmath.hardware_flops_per_token(m, recompute, recomputed_layers=fraction),
                 devices=runtime.layout.world_size, device_power_w=power,
                 usd_per_device_hour=price if cfg.usd_per_device_hour < 0 else cfg.usd_per_device_hour, pue=cfg.pue)


def warn_thresholds(ledger: Ledger, remaining_steps: int, logger: MetricsLogger) -> None:
    """Before training: name every threshold this run will cross, the step it crosses it at, and what
    the text then asks."""
    for entry in ledger.threshold_report():
        at = entry.get("crosses_at_step")
        if entry["applies"] and not entry["crossed"] and at is not None and at <= ledger.segments[-1].step + remaining_steps:
            logger.print(f"warning: this run crosses {entry['name']} ({entry['title']}, {entry['limit_flops']:.0e} FLOP, "
                         f"{entry['status']}) at step {at}; it asks: {entry['asks']}")
            logger.event("threshold_ahead", threshold=entry["name"], step=at)


def note_thresholds(ledger: Ledger, step: int, logger: MetricsLogger) -> None:
    """Record a threshold the first time the ledger shows it crossed."""
    crossed = {e["name"] for e in ledger.threshold_report() if e["crossed"]}
    for name in sorted(crossed - ledger.crossed_noted):
        logger.event("threshold_crossed", threshold=name, step=step)
        logger.print(f"threshold {name} crossed at step {step} (see ledger.json)")
    ledger.crossed_noted |= crossed


def stop_before_threshold(ledger: Ledger, name: str) -> bool:
    """True when ledger.stop_at_threshold names a threshold the next step would take the run past."""
    if not name:
        return False
    for threshold in ledger.thresholds:
        if threshold.name == name:
            per_step = ledger.rates.tokens_per_step * ledger.rates.model_flops_per_token
            total = ledger.totals()["model_flops"]
            counted = ledger.cumulative_model_flops() if threshold.scope == "cumulative" else total
            return counted + per_step > threshold.limit_flops
    raise UserError(f"ledger.stop_at_threshold = {name!r} is not a known threshold "
                    f"({', '.join(t.name for t in ledger.thresholds)})")


def read_verdicts(unread: deque[UnreadVerdict], keep: int, consecutive_bad: int, max_bad_steps: int,
                  progress: Progress, logger: MetricsLogger) -> tuple[int, UnreadVerdict | None]:
    """Read the skip flags of all but the newest `keep` unread steps (the host sync: each is the flag of
    a step whose successor is queued), record the skipped ones, and return the new count of consecutive
    bad steps and the step that made it max_bad_steps, if one did (the rest stay unread)."""
    while len(unread) > keep:
        verdict = unread.popleft()
        if not bool(verdict.skipped):
            consecutive_bad = 0
            continue
        progress.skipped_steps += 1
        consecutive_bad += 1
        logger.event("skipped_step", step=verdict.step, grad_norm=float(verdict.grad_norm), batch=verdict.position)
        if consecutive_bad >= max_bad_steps:
            return consecutive_bad, verdict
    return consecutive_bad, None


def loader_position(loader: TokenLoader | PrefetchingLoader) -> str:
    """Where the loader stands, as a short stable label (epoch:cursor)."""
    state = loader.state_dict()
    return f"{state['epoch']}:{state['cursor']}"


def rollback(checkpointer: Checkpointer, state: TrainingState, bad_batch: str, step: int, bad_steps: int,
             logger: MetricsLogger) -> int:
    """Reload the newest intact checkpoint after `bad_steps` consecutive non-finite steps, and mark the
    last batch so the replay skips it. Without a checkpoint there is nothing to go back to: stop."""
    skip = sorted(set(state.progress.skip_batches) | {bad_batch})
    skipped_steps = state.progress.skipped_steps
    restored = checkpointer.load_latest({"train": state})
    if restored is None:
        raise UserError(f"{bad_steps} consecutive steps up to step {step} had non-finite gradients and there is no "
                        "checkpoint to roll back to; lower train.lr or check the data, then train again")
    state.progress.skip_batches = sorted(set(state.progress.skip_batches) | set(skip))
    state.progress.skipped_steps = skipped_steps
    logger.event("rollback", from_step=step, to_step=restored, skip_batch=bad_batch)
    return restored


def sample_text(model: Transformer, tokenizer, config: RunConfig, device: torch.device) -> str:
    """A short generation from the trained model, seeded so it is the same every time."""
    prompt = tokenizer.encode(config.eval.sample_prompt) or [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    tokens = torch.tensor([prompt], device=device)
    model.eval()
    generated = model.generate(tokens, config.eval.sample_tokens, generator=generator)
    return tokenizer.decode(generated[0].tolist())


def _config_hash(config: RunConfig) -> str:
    return hashlib.sha256(config_to_toml(config).encode()).hexdigest()[:16]
