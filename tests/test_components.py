"""The trainer's components, each on its own and in this process: the NaN guard, the throughput
window, the checkpoint policy, the evaluator, the ledger and threshold watcher, progress, the loss
outside the model and the step split into forward_backward and optimizer_step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from colossus.account.ledger import Ledger, Rates
from colossus.account.thresholds import Threshold
from colossus.config import ModelConfig
from colossus.errors import UserError
from colossus.layout import Layout
from colossus.models.grok import build_model
from colossus.parallel.runtime import Runtime
from colossus.train.accounting import Accounting
from colossus.train.checkpoint import Checkpointer, CheckpointPolicy
from colossus.train.evaluator import Evaluator
from colossus.train.guards import NanGuard, UnreadVerdict
from colossus.train.loss import cross_entropy, training_loss
from colossus.train.metrics import MetricsLogger, ThroughputWindow
from colossus.train.optim import build_optimizer, build_scheduler
from colossus.train.step import forward_backward, optimizer_step, train_step
from colossus.train.trainer import Progress

MODEL = ModelConfig(name="unit", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, n_experts=4,
                    top_k=2, vocab_size=64, seq_len=16)


class Events:
    """A MetricsLogger stand-in that keeps what it was told (events and printed lines) in lists."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lines: list[str] = []

    def event(self, kind: str, **fields) -> None:
        self.events.append({"event": kind, **fields})

    def print(self, text: str) -> None:
        self.lines.append(text)


def verdict(step: int, bad: bool, poison: bool = False) -> UnreadVerdict:
    return UnreadVerdict(torch.tensor(bad), torch.tensor(float("nan") if bad else 1.0), step, f"0:{step}", poison)


# ------------------------------------------------------------------------------------ NaN guard


def test_nan_guard_reads_one_step_late_and_counts_bad_steps_in_a_row() -> None:
    skipped = []
    guard = NanGuard(max_bad_steps=3, on_skip=skipped.append)
    guard.record(verdict(1, bad=True))
    assert guard.settle(everything=False) is None and len(guard.unread) == 1  # the newest stays unread
    guard.record(verdict(2, bad=True))
    assert guard.settle(everything=False) is None and [v.step for v in skipped] == [1]
    guard.record(verdict(3, bad=False))  # a good step breaks the run of bad ones
    guard.record(verdict(4, bad=True))
    guard.record(verdict(5, bad=True))
    assert guard.settle(everything=True) is None and guard.consecutive_bad == 2 and not guard.unread
    guard.record(verdict(6, bad=True))
    guard.record(verdict(7, bad=False))
    last_straw = guard.settle(everything=True)
    assert last_straw is not None and last_straw.step == 6  # the third bad step in a row
    assert [v.step for v in skipped] == [1, 2, 4, 5, 6] and [v.step for v in guard.unread] == [7]


def test_nan_guard_injects_faults_and_replays_them_after_a_rollback() -> None:
    guard = NanGuard(max_bad_steps=2, inject_at_step=3, inject_count=2)
    poisoned = [step for step in range(1, 7) if guard.poison(step)]
    assert poisoned == [3, 4] and guard.poison_left == 0
    guard.record(verdict(4, bad=True, poison=True))
    guard.record(verdict(5, bad=False))
    guard.rolled_back()  # the discarded step 4 is run again: its fault comes again
    assert guard.poison_left == 1 and not guard.unread and guard.consecutive_bad == 0


# ------------------------------------------------------------------------------------ clocks and counters


def test_throughput_window_divides_its_time_by_its_steps() -> None:
    window = ThroughputWindow()
    before = time.perf_counter()
    window.reopen()
    for _ in range(4):
        window.tick()
    elapsed = window.step_time() * 4
    assert 0 <= elapsed <= time.perf_counter() - before
    window.reopen()
    assert window.steps == 0


def test_progress_advances_and_keeps_its_clock_out_of_checkpoints() -> None:
    progress = Progress(elapsed_s=10.0)
    progress.start_clock()
    progress.advance(tokens=2048)
    progress.advance(tokens=2048)
    assert (progress.step, progress.tokens) == (2, 4096) and progress.elapsed_s >= 10.0
    restored = Progress()
    restored.load_state_dict(json.loads(json.dumps(progress.state_dict())))
    assert restored.state_dict() == progress.state_dict()


def test_logger_logs_every_interval_and_at_the_last_step(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, total_steps=25, tensorboard=True, interval=10)
    assert [s for s in range(1, 26) if logger.should_log(s)] == [10, 20, 25]
    assert not (tmp_path / "tb").exists()  # nothing written until the run folder may be: open()
    with logger:
        logger.open()
        assert (tmp_path / "tb").is_dir()
    assert logger.writer is None


# ------------------------------------------------------------------------------------ checkpoints


class Counter:
    """A Stateful with one tensor, for the checkpoint policy."""

    def __init__(self) -> None:
        self.value = torch.zeros(3)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])


def test_checkpoint_policy_saves_on_its_interval_once_per_step_and_restores(tmp_path: Path) -> None:
    counter, events = Counter(), Events()
    policy = CheckpointPolicy(Checkpointer(tmp_path / "checkpoints", keep=2), {"train": counter}, events,
                              interval=5, total_steps=12)
    assert [s for s in range(1, 13) if policy.should_save(s)] == [5, 10, 12]
    counter.value += 1
    assert policy.save(5) and policy.save(5)  # the second is no second write
    assert [e["step"] for e in events.events if e["event"] == "checkpoint"] == [5]
    counter.value += 1
    assert policy.save(10) and policy.finish()
    counter.value += 5
    assert policy.restore() == 10 and torch.equal(counter.value, torch.full((3,), 2.0))


@pytest.mark.parametrize("on_error", ["continue", "stop"])
def test_checkpoint_policy_on_a_failed_save(tmp_path: Path, on_error: str) -> None:
    """A save that cannot be written is recorded, and the run goes on or stops as checkpoint.on_error says."""
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    events = Events()
    policy = CheckpointPolicy(Checkpointer(tmp_path / "checkpoints", keep=2), {"train": Counter()}, events,
                              interval=5, total_steps=10, on_error=on_error)
    if on_error == "stop":
        with pytest.raises(UserError) as error:
            policy.save(5)
        assert "checkpoint of step 5 was not written" in str(error.value) and "\n" not in str(error.value)
    else:
        assert policy.save(5) is False and "training goes on" in events.lines[-1]
    assert policy.failures == 1 and events.events[-1]["event"] == "checkpoint_failed"


# ------------------------------------------------------------------------------------ evaluation and loss


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        data = torch.randint(0, MODEL.vocab_size, (4, MODEL.seq_len + 1), generator=g)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def test_evaluator_is_the_mean_cross_entropy_of_its_batches() -> None:
    model = build_model(MODEL, seed=0)
    runtime = Runtime(torch.device("cpu"), Layout(precision="fp32"), None, 0)
    evaluator = Evaluator(batches(), interval=4, total_steps=10, runtime=runtime, precision="fp32")
    assert [s for s in range(1, 11) if evaluator.should_evaluate(s)] == [4, 8, 10]
    with torch.no_grad():
        expected = sum(cross_entropy(model(x).logits, y).item() for x, y in batches()) / 2
    assert evaluator.evaluate(model) == pytest.approx(expected, rel=1e-6)
    assert model.training  # back in training mode


def test_loss_is_computed_outside_the_model_from_its_output() -> None:
    model = build_model(MODEL, seed=1)
    x, y = batches(1)[0]
    out = model(x)
    loss = training_loss(out, y, MODEL)
    manual = -out.logits.double().log_softmax(-1).gather(-1, y.unsqueeze(-1)).mean()
    assert loss.cross_entropy.item() == pytest.approx(manual.item(), rel=1e-5)
    assert loss.total.item() == pytest.approx(
        (loss.cross_entropy + MODEL.moe_aux_loss_coef * loss.aux_loss + MODEL.moe_z_loss_coef * out.z_loss).item())
    padded = y.clone()
    padded[:, -3:] = -100  # ignored positions (sequence-parallel padding) do not count
    keep = (slice(None), slice(0, MODEL.seq_len - 3))
    assert cross_entropy(out.logits, padded).item() == pytest.approx(
        cross_entropy(out.logits[keep], y[keep]).item(), rel=1e-6)


def test_train_step_is_forward_backward_then_optimizer_step() -> None:
    """The two halves run apart give exactly what train_step gives, micro-batches included."""
    from colossus.config import TrainConfig

    tcfg = TrainConfig(steps=3, global_batch=4, micro_batch=2, warmup_steps=1)
    x, y = batches(1)[0]
    results = []
    for split in (False, True):
        model = build_model(MODEL, seed=2)
        optimizer = build_optimizer(model, tcfg, torch.device("cpu"))
        scheduler = build_scheduler(optimizer, tcfg)
        if split:
            result = forward_backward(model, x, y, 2, torch.device("cpu"), "fp32")
            result.grad_norm, result.skipped = optimizer_step(model, optimizer, scheduler, tcfg.grad_clip)
        else:
            result = train_step(model, optimizer, scheduler, x, y, 2, tcfg.grad_clip, torch.device("cpu"), "fp32")
        results.append((result.loss, result.grad_norm, [p.detach().clone() for p in model.parameters()]))
    (loss_a, norm_a, weights_a), (loss_b, norm_b, weights_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(norm_a, norm_b)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))


# ------------------------------------------------------------------------------------ ledger and thresholds


def test_accounting_warns_notes_and_stops_before_a_threshold(tmp_path: Path) -> None:
    rates = Rates(tokens_per_step=1000, model_flops_per_token=1e6, hardware_flops_per_token=1e6, devices=1,
                  device_power_w=10.0, usd_per_device_hour=0.0)
    review = Threshold(name="review", title="lab review", limit_flops=5.5e9, scope="pretraining", status="internal",
                       asks="a review", source="this test")
    ledger = Ledger.open(tmp_path, rates, [review])
    ledger.start_segment(0, 0)
    events = Events()
    with pytest.raises(UserError, match="is not a known threshold"):
        Accounting(ledger, "nope", events, is_main=True)
    accounting = Accounting(ledger, "review", events, is_main=True)
    accounting.warn_ahead(remaining_steps=10)
    assert [e["step"] for e in events.events if e["event"] == "threshold_ahead"] == [6]
    stops = []
    for step in range(1, 8):
        stops.append(accounting.stop_due())
        accounting.step(step)
        accounting.note_crossed(step)
    assert stops == [False] * 5 + [True, True]  # after 5 steps (5e9 FLOPs) the next one would pass 5.5e9
    crossed = [e for e in events.events if e["event"] == "threshold_crossed"]
    assert [e["step"] for e in crossed] == [6]  # noted once, when it happened
    accounting.finish("finished")
    assert json.loads((tmp_path / "ledger.json").read_text())["segments"][0]["status"] == "finished"
    # A replica group that joined late counted fewer steps in its own ledger; it stops where the run's
    # token count (the same on every group) says, like the others.
    joined = Ledger.open(tmp_path / "late", rates, [review])
    joined.start_segment(0, 0)
    late = Accounting(joined, "review", Events(), is_main=True, run_tokens=lambda: 5 * 1000)
    assert late.stop_due() and not Accounting(joined, "review", Events(), is_main=True).stop_due()
