"""End-to-end training: the loss falls, the run folder is complete, and a resumed run (in-process or
after a real SIGKILL) continues bit for bit like the uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomllib

from colossus.config import config_from_dict
from colossus.train.trainer import train
from conftest import REPO, small_config, small_tables, write_toml

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_records(run: Path) -> dict[int, dict]:
    """The last logged training record of each step (a resumed run may log a step twice)."""
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def test_short_run_learns_and_fills_the_run_folder(tmp_path: Path, corpus_dir: Path) -> None:
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 40, "lr": 1e-2, "warmup_steps": 4},
                          checkpoint={"interval": 10, "keep": 2}, eval={"interval": 20})
    run = tmp_path / "run"
    summary = train(config, run)

    records = train_records(run)
    assert sorted(records) == list(range(2, 41, 2))
    assert all(METRIC_KEYS <= set(r) for r in records.values())
    first, last = records[2]["loss"], records[40]["loss"]
    assert first > 4.5 and last < first - 1.0, (first, last)  # starts near ln(256) = 5.55
    assert records[40]["tokens"] == 40 * 8 * 64
    assert all(0 < r["mfu"] < 1.5 and r["tokens_per_s"] > 0 for r in records.values())
    # The lr schedule: linear warmup to the peak over 4 steps, then cosine down to 10% at the end.
    assert math.isclose(records[2]["lr"], 1e-2 * 2 / 4)
    # Step 40 runs with the schedule's index 39: cosine progress (39 - 4) / (40 - 4).
    assert math.isclose(records[40]["lr"], 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 35 / 36))), rel_tol=1e-9)
    # Per-expert load: one row per layer, shares summing to 1.
    load = records[40]["expert_load"]
    assert len(load) == 2 and all(abs(sum(row) - 1) < 1e-3 for row in load)
    val = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [20, 40] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert summary["val_loss"] == val[-1]["val_loss"] and summary["unigram_val_loss"] > 3.0

    # The run folder: resolved config, events, TensorBoard, the newest `keep` checkpoints, summary.
    assert config_from_dict(tomllib.loads((run / "config.toml").read_text())) == config
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")][0] == "start"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-30", "step-40"]
    assert json.loads((run / "summary.json").read_text())["step"] == 40
    assert isinstance(summary["sample"], str) and summary["sample"].startswith("def ")


def test_resume_in_process_matches_uninterrupted(tmp_path: Path, corpus_dir: Path) -> None:
    """Stop after step 8 (by pruning the later checkpoints of a finished run) and train again: the
    resumed steps reproduce the uninterrupted losses exactly."""
    config = small_config(corpus_dir, tmp_path / "cache", checkpoint={"interval": 4, "keep": 5})
    full = tmp_path / "full"
    train(config, full)
    reference = train_records(full)

    resumed = tmp_path / "resumed"
    train(config, resumed)
    import shutil

    for step in (12,):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step}")
    summary = train(config, resumed)  # resumes from step 8 and redoes 9..12
    again = train_records(resumed)
    assert [e["event"] for e in read_jsonl(resumed / "events.jsonl")].count("resume") == 1
    for step in (10, 12):
        assert again[step]["loss"] == reference[step]["loss"]
        assert again[step]["grad_norm"] == reference[step]["grad_norm"]
    assert summary["step"] == 12


def test_deterministic_kernels_change_no_cpu_result_and_are_switched_off_after(tmp_path: Path, corpus_dir: Path) -> None:
    """train.deterministic turns on torch's deterministic kernels for the run (for GPUs); every op of
    the CPU step has one (no warning), the CPU numbers are the same bits, and the process-wide switch
    is back where it was when train() returns."""
    import warnings

    import torch

    plain = train(small_config(corpus_dir, tmp_path / "cache", train={"steps": 6}), tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deterministic")  # how a kernel without one says so
        strict = train(small_config(corpus_dir, tmp_path / "cache", train={"steps": 6, "deterministic": True}),
                       tmp_path / "strict")
    assert strict["val_loss"] == plain["val_loss"]
    assert train_records(tmp_path / "strict")[6]["loss"] == train_records(tmp_path / "plain")[6]["loss"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_more_steps_continue_a_finished_run(tmp_path: Path, corpus_dir: Path) -> None:
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 8})
    run = tmp_path / "run"
    train(config, run)
    longer = small_config(corpus_dir, tmp_path / "cache", train={"steps": 12})
    summary = train(longer, run)
    events = read_jsonl(run / "events.jsonl")
    assert [e["event"] for e in events if e["event"] in ("start", "resume")] == ["start", "resume"]
    assert [e for e in events if e["event"] == "resume"][0]["step"] == 8
    assert summary["step"] == 12 and summary["tokens"] == 12 * 8 * 64
    assert 12 in train_records(run)


def run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "colossus.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_midway_then_rerun_is_bit_identical(tmp_path: Path, corpus_dir: Path) -> None:
    """The acceptance test: SIGKILL a real training process between checkpoints, start the same
    command again, and the final loss equals the uninterrupted run's bit for bit."""
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 60}, checkpoint={"interval": 10, "keep": 2},
                          eval={"interval": 30, "sample_tokens": 0}, log={"interval": 5, "tensorboard": False})
    config_file = write_toml(tmp_path / "run.toml", tables)

    uninterrupted = run_cli([str(config_file), "--out", str(tmp_path / "a")], tmp_path)
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()

    victim = run_cli([str(config_file), "--out", str(tmp_path / "b")], tmp_path)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once step 25 is logged: after checkpoint 20, before 30
        if metrics.exists() and any(r.get("step", 0) >= 25 for r in read_jsonl(metrics) if "loss" in r):
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    killed_at = max(r["step"] for r in read_jsonl(metrics) if "loss" in r)
    assert 25 <= killed_at < 60

    rerun = run_cli([str(config_file), "--out", str(tmp_path / "b")], tmp_path)
    output, errors = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, errors
    assert "resumed" in output
    resume_step = [e for e in read_jsonl(tmp_path / "b" / "events.jsonl") if e["event"] == "resume"][0]["step"]
    assert resume_step in (20, 30) and resume_step <= killed_at
    final_a, final_b = train_records(tmp_path / "a")[60], train_records(tmp_path / "b")[60]
    assert final_b["loss"] == final_a["loss"]  # bit for bit: exact float equality
    assert final_b["tokens"] == final_a["tokens"]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("a", "b")]
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]


def test_resume_keeps_this_runs_optimizer_kernel() -> None:
    """A checkpoint's param groups carry the saving run's kernel flags (an FSDP run saves foreach);
    resuming in one process keeps its own fused AdamW, and a non-finite step still skips its update."""
    import numpy as np
    import torch

    from colossus.config import TrainConfig
    from colossus.data.loader import TokenLoader
    from colossus.models.grok import build_model
    from colossus.train.optim import build_optimizer, build_scheduler
    from colossus.train.step import train_step
    from colossus.train.trainer import TrainingState

    model_cfg = config_from_dict({"model": {"preset": "tiny", "n_layers": 1, "seq_len": 16}}).model
    tcfg = TrainConfig(steps=4, global_batch=2, micro_batch=2, warmup_steps=1)
    device = torch.device("cpu")
    tokens = np.arange(1000, dtype=np.uint16) % model_cfg.vocab_size

    def state(fused: bool) -> TrainingState:
        model = build_model(model_cfg, device, seed=0)
        optimizer = build_optimizer(model, tcfg, device, fused=fused)
        return TrainingState(model, optimizer, build_scheduler(optimizer, tcfg), TokenLoader(tokens, 16, 2))

    def step(state: TrainingState, poison: bool = False):
        return train_step(state.model, state.optimizer, state.scheduler, batch[:, :-1], batch[:, 1:], tcfg.micro_batch,
                          tcfg.grad_clip, device, "fp32", poison=poison)

    saved = state(fused=False)
    batch = torch.arange(34).reshape(2, 17) % model_cfg.vocab_size
    step(saved)
    resumed = state(fused=True)
    resumed.load_state_dict(saved.state_dict())
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    before = [p.detach().clone() for p in resumed.model.parameters()]
    result = step(resumed, poison=True)
    assert bool(result.skipped)
    assert all(torch.equal(a, p) for a, p in zip(before, resumed.model.parameters()))
    result = step(resumed)
    assert not bool(result.skipped)
    assert not all(torch.equal(a, p) for a, p in zip(before, resumed.model.parameters()))
