"""Pipeline and context parallelism on CPU with gloo: every schedule and split gives one process's
losses and gradient norms, the tied embedding's gradient is one process's, pipelined checkpoints
resume without the pipeline, the grok-1 dry run builds with pp and cp, and bad layouts are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colossus.config import ModelConfig, config_from_dict
from colossus.errors import UserError
from colossus.layout import Layout, check_fits, rank_share, stage_layers, stage_ranks
from colossus.parallel.runtime import resolve_layout
from conftest import REPO, metrics_by_step, small_tables, write_toml
from ranks import finish as finish_ranks, finish_training, start_training, torchrun as launcher

STEPS = 10
# The `micro` MoE of the other parallel tests with 8 blocks (tests/conftest.py), a global batch of 8 in
# micro-batches of one sequence (a pipeline needs several in flight), balanced over the global batch.
LAYOUTS = {
    "pp=2,tp=2,dp_shard=2": ({"pp": 2, "tp": 2, "dp_shard": 2}, 8),
    "pp=2,ep=2,dp_shard=2": ({"pp": 2, "ep": 2, "dp_shard": 2}, 8),
    "cp=2,tp=2,dp_shard=2": ({"cp": 2, "tp": 2, "dp_shard": 2}, 8),
    "cp=2,dp_shard=4": ({"cp": 2, "dp_shard": 4}, 8),
    "pp=4,vpp=2": ({"pp": 4, "vpp": 2, "pp_schedule": "interleaved-1f1b"}, 4),
    "pp=2,zbv": ({"pp": 2, "vpp": 2, "pp_schedule": "zbv"}, 2),
    "pp=3": ({"pp": 3}, 3),  # 8 blocks over 3 stages: 3, 3, 2
}


def overrides(keys: dict) -> list[str]:
    return [arg for key, value in keys.items() for arg in ("--set", f"parallel.{key}={json.dumps(value)}")]


def torchrun(args: list[str], cwd: Path, nproc: int) -> str:
    return finish_training(start_training(args, cwd, nproc))


def single(config: Path, out: Path, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "colossus.train", str(config), "--out", str(out)], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    tables = small_tables(corpus_dir, root / "cache", model={"n_layers": 8},
                          train={"steps": STEPS, "micro_batch": 1},
                          checkpoint={"interval": 5, "keep": 2}, eval={"interval": STEPS, "sample_tokens": 8},
                          log={"interval": 1, "tensorboard": False})
    config = write_toml(root / "run.toml", tables)
    single(config, root / "single", root)
    result = {"single": root / "single", "config": config, "root": root}
    for name, (keys, processes) in LAYOUTS.items():
        torchrun([str(config), "--out", name, *overrides(keys)], root, processes)
        result[name] = root / name
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs: dict[str, Path], layout: str) -> None:
    """Loss and gradient norm of each of the first 10 steps within 1e-4 relative of one process; the
    validation loss and the sample too (the pipeline's forward-only pass, context parallel evaluation)."""
    reference, parallel = metrics_by_step(runs["single"]), metrics_by_step(runs[layout])
    assert sorted(parallel) == list(range(1, STEPS + 1))
    assert parallel[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-6)  # the same initial model
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "aux_loss"):
            assert parallel[step][key] == pytest.approx(reference[step][key], rel=1e-4), (step, key)
    assert reference[STEPS]["loss"] < reference[1]["loss"] - 0.5  # and the model does learn
    summary, reference_summary = (json.loads((runs[name] / "summary.json").read_text()) for name in (layout, "single"))
    assert summary["val_loss"] == pytest.approx(reference_summary["val_loss"], rel=1e-4)
    assert summary["sample"] and isinstance(summary["sample"], str)


@pytest.mark.parametrize("target", ["single", "dp_shard=8"])
def test_pipelined_checkpoint_resumes_without_the_pipeline(runs: dict[str, Path], target: str) -> None:
    """Saved under pp=2 x tp=2 x dp_shard=2 at step 5, resumed under one process and under dp_shard=8:
    steps 6-10 match within 1e-5 (every weight and moment found by name, the tied copy as the embedding)."""
    root, source = runs["root"], "pp=2,tp=2,dp_shard=2"
    resumed = root / f"resumed-{target}"
    shutil.copytree(runs[source], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    metrics = resumed / "metrics.jsonl"  # the steps after the checkpoint must be logged again, by the resumed run
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line).get("step", 0) <= 5))
    if target == "single":
        output = single(runs["config"], resumed, root)
    else:
        output = torchrun([str(runs["config"]), "--out", str(resumed), "--set", "parallel.dp_shard=8"], root, 8)
    assert "resumed" in output and "from step 5" in output
    uninterrupted, after = metrics_by_step(runs[source]), metrics_by_step(resumed)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert after[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_tied_embedding_gradient_is_one_process(tmp_path: Path, schedule: str) -> None:
    """The embedding's gradient after one pipelined forward and backward, the first stage's and the last
    stage's summed (between ranks under 1F1B, on one rank in ZB-V's V), equals one process's (1e-6)."""
    logs = tmp_path / "logs"
    process = subprocess.Popen([*launcher(2, logs, "--standalone"), str(REPO / "tests" / "pipeline_worker.py"),
                                schedule, str(tmp_path / "result.json")], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finish_ranks(process, logs, timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["relative_difference"] < 1e-6, result
    assert result["gradient_norm"] > 0
    assert result["copies_equal"]  # both stages hold the same summed gradient


def test_grok1_dry_run_with_pipeline_and_context_parallel(tmp_path: Path) -> None:
    """grok-1 at 16,384 ranks with pp=8 and cp=2 (and tp=8, ep=8): rank 0 builds its stage's real sharded
    model, and its bytes are the planner's."""
    config = write_toml(tmp_path / "grok.toml", {"model": {"preset": "grok-1"}, "train": {
        "global_batch": 2048, "micro_batch": 1, "device": "cpu"}, "parallel": {"tp": 8, "ep": 8, "pp": 8, "cp": 2}})
    result = subprocess.run([sys.executable, "-m", "colossus", "train", str(config), "--dry-run", "--world-size",
                             "16384", "--json"], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"]["pp"] == 8 and report["layout"]["cp"] == 2 and report["layout"]["dp_shard"] == 16
    for key in ("param_bytes_per_rank_max", "optimizer_bytes_per_rank_max"):
        assert report[key] == pytest.approx(report["planner"][key], rel=0.05), key


# ------------------------------------------------------------------------ splits and checks (no processes)


def test_balanced_split_counts_the_embedding_and_the_output_as_blocks() -> None:
    assert stage_layers(Layout(pp=16), 126) == (7,) + (8,) * 14 + (7,)  # Llama 3's 126 blocks over 16 stages
    assert stage_layers(Layout(pp=3), 8) == (3, 3, 2)
    assert stage_layers(Layout(pp=4, vpp=2, pp_schedule="interleaved-1f1b"), 8) == (1,) * 8
    assert stage_layers(Layout(pp=2, vpp=2, pp_schedule="zbv"), 8) == (2, 2, 2, 2)
    assert stage_layers(Layout(pp=8), 64) == (8,) * 8
    assert stage_layers(Layout(pp=3, pp_layers=(2, 4, 2)), 8) == (2, 4, 2)
    assert stage_ranks(Layout(pp=2, vpp=2, pp_schedule="zbv")) == (0, 1, 1, 0)  # a V: rank 0 holds both ends
    assert stage_ranks(Layout(pp=2, vpp=2, pp_schedule="interleaved-1f1b")) == (0, 1, 0, 1)
    share = rank_share(Layout(pp=2, vpp=2, pp_schedule="zbv"), 8, 0)
    assert (share.blocks, share.embedding, share.head) == (4, True, True)


def test_a_rank_holding_the_embedding_and_its_tied_copy_resumes_two_optimizer_states() -> None:
    """Under ZB-V rank 0 holds the embedding and the last stage's copy of it: loading a checkpoint gives
    the copy its own moments (the same values), so one optimizer step advances each once."""
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    from colossus.parallel.pipeline import load_saved, to_saved

    model = nn.Module()
    model.embedding, model.output = nn.Embedding(16, 4), nn.Linear(4, 16, bias=False)
    model.saved_as = {"output.weight": "embedding.weight"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    (model.output(model.embedding(torch.arange(16))).square().sum()).backward()
    optimizer.step()
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = to_saved(model, get_optimizer_state_dict(model, optimizer, options=options))
    assert not any("output.weight" in key for key in saved)  # saved once, under the embedding's name
    set_optimizer_state_dict(model, optimizer, load_saved(model, saved), options=options)
    embedding, copy = (optimizer.state[p] for p in (model.embedding.weight, model.output.weight))
    assert torch.equal(embedding["exp_avg"], copy["exp_avg"])
    assert embedding["exp_avg"].data_ptr() != copy["exp_avg"].data_ptr()
    optimizer.step()
    assert float(embedding["step"]) == float(copy["step"]) == 2.0


def layout_of(world: int, model: dict | None = None, train: dict | None = None, **parallel) -> Layout:
    config = config_from_dict({"parallel": parallel, "model": model or {},
                               "train": {"global_batch": 8, "micro_batch": 1, **(train or {})}})
    return resolve_layout(config, world, "cpu")


@pytest.mark.parametrize("world, parallel, model, train, words", [
    (8, dict(pp=8), {"n_layers": 4}, None, ["parallel.pp=8", "model.n_layers=4"]),
    (4, dict(pp=4, vpp=2, pp_schedule="interleaved-1f1b"), {"n_layers": 4}, None, ["vpp=2", "8 stages", "lower parallel.vpp"]),
    (2, dict(pp=2, vpp=2), None, None, ["pp_schedule=1f1b", "vpp=1"]),
    (2, dict(pp=2, pp_schedule="zbv"), None, None, ["pp_schedule=zbv", "vpp=2"]),
    (2, dict(cp=2), {"seq_len": 250}, None, ["model.seq_len=250", "cp=2"]),
    (4, dict(pp=4), None, {"micro_batch": 4}, ["pp_schedule=1f1b", "at least 4", "gives 2", "train.micro_batch"]),
    (2, dict(pp=2, vpp=2, pp_schedule="zbv"), None, {"micro_batch": 4}, ["zbv", "at least 4", "gives 2"]),
    (2, dict(pp=2, vpp=2, pp_schedule="interleaved-1f1b"), None, {"global_batch": 3},
     ["a multiple of pp=2", "gives 3", "lower parallel.pp"]),
    (4, dict(pp=4, vpp=2, pp_schedule="zbv"), {"n_layers": 4}, None, ["8 stages", "lower parallel.pp"]),
    (3, dict(pp=3, pp_layers=[3, 3, 3]), None, None, ["pp_layers=[3, 3, 3]", "summing to model.n_layers=4"]),
    (2, dict(pp=2, vpp=2, pp_schedule="zbv"), None, {"compile": True}, ["train.compile", "pp_schedule=zbv"]),
])
def test_bad_pipeline_and_context_layouts_are_one_line(world: int, parallel: dict, model: dict | None,
                                                       train: dict | None, words: list[str]) -> None:
    with pytest.raises(UserError) as error:
        layout_of(world, model, train, **parallel)
    message = str(error.value)
    assert all(word in message for word in words), message
    assert "\n" not in message


def test_a_bad_layout_stops_the_cli_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "colossus", "train", "--set", "parallel.pp=9", "--set",
                             "parallel.dp_shard=1", "--dry-run", "--world-size", "9"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "parallel.pp=9" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_layouts_the_trainer_now_runs_pass_its_checks() -> None:
    m = ModelConfig(n_layers=8)
    for layout in (Layout(pp=2, tp=2, dp_shard=2, gbs=8), Layout(cp=2, dp_shard=4, gbs=8),
                   Layout(pp=2, vpp=2, pp_schedule="zbv", gbs=8), Layout(pp=3, gbs=8)):
        check_fits(layout, m)
