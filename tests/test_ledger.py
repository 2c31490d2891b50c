"""The compute ledger, the regulatory thresholds and the run report, on real runs and real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colossus import modelmath
from colossus.account.thresholds import crossed, load_thresholds
from colossus.train.trainer import train
from conftest import REPO, small_config, small_tables, write_toml

QUIET = dict(eval={"sample_tokens": 0, "interval": 100}, log={"interval": 1, "tensorboard": False})


def ledger_of(run: Path) -> dict:
    return json.loads((run / "ledger.json").read_text())


@pytest.mark.parametrize("experts", [4, 1], ids=["moe", "dense"])
def test_ledger_counts_match_the_model_math_and_torch(tmp_path: Path, corpus_dir: Path, experts: int) -> None:
    """Model FLOPs = tokens x FLOPs per token (the number `colossus models` prints) within 0.1%, and
    torch's flop counter agrees with the formula within 5% on the first step."""
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 5},
                          model={"n_experts": experts, "top_k": min(2, experts)}, **QUIET)
    train(config, tmp_path / "run")
    ledger = ledger_of(tmp_path / "run")
    assert ledger["tokens"] == 5 * config.train.global_batch * config.model.seq_len
    assert ledger["model_flops"] == pytest.approx(ledger["tokens"] * modelmath.flops_per_token(config.model), rel=1e-3)
    micro_batches = config.train.global_batch // config.train.micro_batch  # an MoE's routing pass counts too
    assert ledger["hardware_flops"] == pytest.approx(
        ledger["tokens"] * modelmath.hardware_flops_per_token(config.model, micro_batches=micro_batches), rel=1e-3)
    assert ledger["flop_counter_ratio"] == pytest.approx(1.0, abs=0.05)
    assert ledger["gpu_hours"] > 0 and ledger["energy_kwh"] > 0 and ledger["cost_usd"] > 0
    assert [s["status"] for s in ledger["segments"]] == ["finished"]
    assert {t["name"] for t in ledger["thresholds"]} == {"sb1047", "sb1047-finetune", "sb53", "eu-ai-act", "eo14110"}
    assert not any(t["crossed"] for t in ledger["thresholds"])


def test_killed_run_ledger_is_the_uninterrupted_one_plus_lost_work(tmp_path: Path, corpus_dir: Path) -> None:
    """SIGKILL between checkpoints, rerun: totals = the uninterrupted run's + the recorded lost work,
    and the killed segment is kept as interrupted."""
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 12}, checkpoint={"interval": 4, "keep": 3}, **QUIET)
    config = write_toml(tmp_path / "run.toml", tables)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "colossus.train", str(config), "--out"]
    assert subprocess.run([*command, str(tmp_path / "a")], env=env, capture_output=True).returncode == 0
    victim = subprocess.Popen([*command, str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:  # until checkpoint 4 is committed (saves are asynchronous) and the ledger is past it
            path = tmp_path / "b" / "ledger.json"
            committed = (tmp_path / "b" / "checkpoints" / "step-4" / "COMMITTED").is_file()
            if committed and path.is_file() and ledger_of(tmp_path / "b")["steps"] >= 6:
                break
            assert victim.poll() is None, "the run ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert subprocess.run([*command, str(tmp_path / "b")], env=env, capture_output=True).returncode == 0
    whole, resumed = ledger_of(tmp_path / "a"), ledger_of(tmp_path / "b")
    lost = resumed["lost"]
    assert lost["steps"] >= 2 and [s["status"] for s in resumed["segments"]] == ["interrupted", "finished"]
    assert resumed["segments"][1]["start_step"] in (4, 8)
    for key in ("tokens", "model_flops", "hardware_flops"):
        assert resumed[key] == pytest.approx(whole[key] + lost[key])


def test_fine_tune_carries_the_cumulative_total(tmp_path: Path, corpus_dir: Path) -> None:
    parent = small_config(corpus_dir, tmp_path / "cache", train={"steps": 6}, **QUIET)
    train(parent, tmp_path / "parent")
    child = small_config(corpus_dir, tmp_path / "cache", train={"steps": 4, "init_from": str(tmp_path / "parent")}, **QUIET)
    train(child, tmp_path / "child")
    mother, daughter = ledger_of(tmp_path / "parent"), ledger_of(tmp_path / "child")
    assert daughter["lineage"]["run"] == str((tmp_path / "parent").resolve()) and daughter["lineage"]["step"] == 6
    assert daughter["model_flops"] == pytest.approx(4 / 6 * mother["model_flops"])
    assert daughter["cumulative_model_flops"] == pytest.approx(mother["model_flops"] + daughter["model_flops"])
    first = lambda run: next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                             if "loss" in json.loads(line))
    assert first(tmp_path / "child") < first(tmp_path / "parent") - 0.2  # it really started from trained weights


def test_fine_tune_from_a_folder_without_checkpoints_is_one_line(tmp_path: Path, corpus_dir: Path) -> None:
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 2, "init_from": str(tmp_path / "nothing")}, **QUIET)
    result = subprocess.run([sys.executable, "-m", "colossus", "train", str(write_toml(tmp_path / "r.toml", tables)),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "train.init_from: no checkpoint in" in result.stderr
    assert "Traceback" not in result.stderr


THRESHOLDS = {t.name: t for t in load_thresholds()}


@pytest.mark.parametrize("name, limit, usd_limit, finetune", [
    ("sb1047", 1e26, 1e8, False), ("sb1047-finetune", 3e25, 1e7, True), ("sb53", 1e26, 0, False),
    ("eu-ai-act", 1e25, 0, False), ("eo14110", 1e26, 0, False)])
def test_each_threshold_at_below_and_above_its_limit(name: str, limit: float, usd_limit: float, finetune: bool) -> None:
    threshold = THRESHOLDS[name]
    assert threshold.limit_flops == limit and threshold.limit_usd == usd_limit
    rich = 2 * usd_limit + 1
    below, above = limit * (1 - 1e-9), limit * (1 + 1e-9)
    assert not crossed(threshold, below, below, rich, finetune)
    assert crossed(threshold, above, above, rich, finetune)
    # exactly at the limit: "more than" for all but SB 1047's fine-tuning clause ("3e25 or more")
    assert crossed(threshold, limit, limit, rich, finetune) == (name == "sb1047-finetune")
    if usd_limit:  # the cost condition must hold too
        assert not crossed(threshold, above, above, usd_limit, finetune)
        assert not crossed(threshold, above, above, rich, not finetune)  # pre-training vs fine-tuning clause
    if name in ("sb53", "eu-ai-act"):  # cumulative: a fine-tune counts its parent's compute
        assert crossed(threshold, limit * 0.1, above, 0.0, True)


def test_stop_at_threshold_and_warning(tmp_path: Path, corpus_dir: Path) -> None:
    """A user threshold crossed at step 6: the run warns at the start, stops after step 5 with a
    checkpoint, and records the stop."""
    per_step = 8 * 64 * modelmath.flops_per_token(small_config(corpus_dir, tmp_path).model)
    extra = tmp_path / "mine.toml"
    extra.write_text(f'[[threshold]]\nname = "lab-review"\nlimit_flops = {5.5 * per_step}\nscope = "cumulative"\n'
                     f'status = "internal"\nasks = "a safety review"\n')
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 10},
                          ledger={"thresholds_file": str(extra), "stop_at_threshold": "lab-review"}, **QUIET)
    summary = train(config, tmp_path / "run")
    assert summary["stopped_at_threshold"] and summary["step"] == 5
    assert (tmp_path / "run" / "checkpoints" / "step-5" / "COMMITTED").is_file()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert {"event": "threshold_ahead", "threshold": "lab-review", "step": 6}.items() <= \
        next(e for e in events if e["event"] == "threshold_ahead").items()
    assert any(e["event"] == "threshold_stop" and e["step"] == 5 for e in events)
    ledger = ledger_of(tmp_path / "run")
    assert ledger["segments"][-1]["status"] == "stopped at threshold"
    assert not next(t for t in ledger["thresholds"] if t["name"] == "lab-review")["crossed"]


def test_threshold_stop_on_a_save_step_writes_its_checkpoint_once(tmp_path: Path, corpus_dir: Path) -> None:
    """Step 4 is saved by the interval and is also where the threshold stops the run: one write, not
    two (a rewrite replaces the folder with itself); running the command again stops at once, still
    without rewriting it, and trains on the same batches when the threshold is lifted."""
    per_step = 8 * 64 * modelmath.flops_per_token(small_config(corpus_dir, tmp_path).model)
    extra = tmp_path / "mine.toml"
    extra.write_text(f'[[threshold]]\nname = "lab-review"\nlimit_flops = {4.5 * per_step}\nscope = "cumulative"\n'
                     f'status = "internal"\nasks = "a safety review"\n')
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 10}, checkpoint={"interval": 4, "keep": 1},
                          ledger={"thresholds_file": str(extra), "stop_at_threshold": "lab-review"}, **QUIET)
    run = tmp_path / "run"
    assert train(config, run)["step"] == 4
    assert train(config, run)["step"] == 4  # the same command again: the threshold still holds
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4]
    assert [e["step"] for e in events if e["event"] == "threshold_stop"] == [4, 4]
    config.ledger.stop_at_threshold = ""
    assert train(config, run)["step"] == 10
    straight = small_config(corpus_dir, tmp_path / "cache", train={"steps": 10}, checkpoint={"interval": 4, "keep": 1}, **QUIET)
    assert train(straight, tmp_path / "straight")["val_loss"] == json.loads((run / "summary.json").read_text())["val_loss"]


def test_plan_projects_the_ledger_and_thresholds() -> None:
    result = subprocess.run([sys.executable, "-m", "colossus", "plan", "--model", "grok-1", "--cluster", "colossus-100k",
                             "--tokens", "2e13", "--json"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    report = json.loads(result.stdout)
    assert report["total_flops"] == pytest.approx(2e13 * modelmath.flops_per_token(__import__("colossus.models.presets", fromlist=["x"]).get_preset("grok-1")))
    names = {t["name"]: t for t in report["thresholds"]}
    assert set(names) >= {"sb1047", "sb1047-finetune", "sb53", "eu-ai-act", "eo14110"}
    assert all({"name", "limit_flops", "crossed"} <= set(t) for t in report["thresholds"])
    assert names["eu-ai-act"]["crossed"] and not names["sb53"]["crossed"]  # 1.08e25 FLOP
    assert names["eu-ai-act"]["crosses_at_day"] == pytest.approx(report["days"] * 1e25 / report["total_flops"])


def test_report_of_a_run_with_a_restart(tmp_path: Path, corpus_dir: Path) -> None:
    config = small_config(corpus_dir, tmp_path / "cache", train={"steps": 8}, checkpoint={"interval": 4},
                          eval={"interval": 4, "sample_tokens": 0}, log={"interval": 1, "tensorboard": False})
    train(config, tmp_path / "run")
    config.train.steps = 12
    train(config, tmp_path / "run")  # a second segment: resumed from step 8
    result = subprocess.run([sys.executable, "-m", "colossus", "report", str(tmp_path / "run")], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}, timeout=120)
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "run" / "report.md").read_text()
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line][-1]["loss"]
    assert f"{final:.4f}" in markdown and "resume" in markdown and "Compute ledger" in markdown
    assert "eu-ai-act" in markdown and "report_loss.png" in markdown and "report_experts.png" in markdown
    for name in ("report_loss.png", "report_throughput.png", "report_experts.png"):
        data = (tmp_path / "run" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "<img src=\"report_loss.png\"" in (tmp_path / "run" / "report.html").read_text()
    missing = subprocess.run([sys.executable, "-m", "colossus", "report", str(tmp_path / "nope")], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert missing.returncode == 2 and "not a run folder" in missing.stderr
