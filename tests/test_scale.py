"""Grok-1 at full size: sharded, layout-independent initialisation; a model larger than one rank's memory
trained under FSDP; the MoE balanced over the global batch; and the dry run that builds a rank of a
100,000-GPU run on this machine and checks the planner's memory against it. (Expert tensor parallelism
against one process, and checkpoints resharded from and to it, are in tests/test_parallel.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colossus import modelmath
from colossus.config import config_from_dict
from colossus.models.grok import build_model
from colossus.parallel.init import global_index
from conftest import REPO, small_config, small_tables, write_toml
from ranks import check, torchrun


def colossus(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colossus", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------ initialisation


def test_initial_values_depend_only_on_seed_name_and_index() -> None:
    """Any block of a parameter drawn alone equals that block of the whole; another seed or another
    name gives other values; the statistics are the init's (norms 1, others N(0, 0.02), output
    projections scaled by 1/sqrt(2 n_layers))."""
    model = build_model(config_from_dict({"model": {"preset": "tiny"}}).model, seed=3)
    whole = model.layers["1"].ffn.experts.w_in.detach()
    index = torch.arange(whole.numel()).view(whole.shape)[2:5, 10:20, 7:9]
    block = model.initial_values("layers.1.ffn.experts.w_in", index, seed=3)
    assert torch.equal(block, whole[2:5, 10:20, 7:9])
    assert not torch.equal(model.initial_values("layers.1.ffn.experts.w_in", index, seed=4), block)
    assert not torch.equal(model.initial_values("layers.2.ffn.experts.w_in", index, seed=3), block)
    assert whole.std().item() == pytest.approx(0.02, rel=0.02) and abs(whole.mean().item()) < 1e-3
    assert model.layers["0"].attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(model.layers["0"].attention_norm.weight, torch.ones(256))


def test_a_model_built_on_meta_is_materialised_as_one_process_builds_it() -> None:
    """The trainer's path: build on the meta device, (parallelise,) allocate and fill: the same weights as
    build_model on the CPU, bit for bit; global_index of a plain tensor is its own arange."""
    from colossus.parallel.init import materialize

    m = config_from_dict({"model": {"preset": "tiny", "n_layers": 2}}).model
    plain = build_model(m, seed=5)
    built = build_model(m, "meta")
    materialize(built, torch.device("cpu"), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), built.state_dict().values()))
    weight = plain.norm.weight
    assert torch.equal(global_index(weight), torch.arange(weight.numel()))


# ------------------------------------------------------------------------ the MoE balanced over the global batch


def run_losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.parametrize("balance", ["global_batch", "micro_batch"])
def test_global_batch_balance_is_the_same_for_every_micro_batch_split(tmp_path: Path, corpus_dir: Path,
                                                                      balance: str) -> None:
    """Steps of 8 sequences as one micro-batch or as four: balanced over the global batch, the
    load-balancing loss and the losses after each update agree; balanced per micro-batch (the old way),
    the load-balancing loss already differs at the first step."""
    from colossus.train.trainer import train

    runs = []
    for micro in (8, 2):
        config = small_config(corpus_dir, tmp_path / "cache", model={"moe_balance": balance},
                              train={"steps": 4, "micro_batch": micro}, eval={"sample_tokens": 0},
                              log={"interval": 1, "tensorboard": False})
        train(config, tmp_path / f"{balance}-{micro}")
        runs.append((run_losses(tmp_path / f"{balance}-{micro}"), run_losses(tmp_path / f"{balance}-{micro}", "aux_loss")))
    (whole, whole_aux), (split, split_aux) = runs
    if balance == "global_batch":
        assert whole_aux[0] == pytest.approx(split_aux[0], rel=1e-6)
        assert all(a == pytest.approx(b, rel=1e-5) for a, b in zip(whole, split)), (whole, split)
    else:
        assert whole_aux[0] != pytest.approx(split_aux[0], rel=1e-4)


def test_bias_balancing_moves_the_routing_bias_towards_balance(tmp_path: Path, corpus_dir: Path) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: the routing bias starts at 0, moves by the rate each
    step (down for the busiest experts), and is saved in checkpoints."""
    from colossus.train.trainer import train

    config = small_config(corpus_dir, tmp_path / "cache", model={"moe_balance": "bias", "moe_bias_rate": 0.01},
                          train={"steps": 6}, checkpoint={"interval": 6}, eval={"sample_tokens": 0},
                          log={"interval": 1, "tensorboard": False})
    train(config, tmp_path / "run")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "run" / "checkpoints" / "step-6"), str(tmp_path / "state.pt"))
    state = torch.load(tmp_path / "state.pt", weights_only=False)["train"]["model"]
    bias = state["layers.0.ffn.router_bias"]
    assert bias.shape == (4,) and bias.abs().max() > 0
    # each step moves every entry by exactly the rate (or not at all at exact balance): multiples of it
    torch.testing.assert_close(bias / 0.01, (bias / 0.01).round(), rtol=0, atol=1e-4)
    assert bias.abs().max() <= 6 * 0.01 + 1e-6


# ------------------------------------------------------------------------ a model larger than one rank's memory


def test_a_model_three_times_one_ranks_memory_trains_under_fsdp(tmp_path: Path, corpus_dir: Path) -> None:
    """A 320M-parameter MoE, whose training state (fp32 weights, gradients and two AdamW moments: 4.8 GiB)
    is three times what each of 4 processes may hold: built on the meta device, each rank allocates only
    its quarter, and rank 0's peak resident memory above its start (state, the layers FSDP gathers in
    turn, activations) stays under the cap."""
    model = dict(name="deep", n_layers=24, d_model=512, n_heads=8, n_kv_heads=4, head_dim=64, ffn_dim=1024,
                 n_experts=8, top_k=2, vocab_size=256, seq_len=32, embedding_multiplier=8.0)
    m = config_from_dict({"model": model}).model
    state = modelmath.params_total(m) * (modelmath.MASTER_BYTES + modelmath.GRAD_BYTES + modelmath.OPTIMIZER_BYTES)
    cap = state / 3
    tables = small_tables(corpus_dir, tmp_path / "cache", model=model,
                          train={"steps": 3, "global_batch": 4, "micro_batch": 1, "warmup_steps": 1},
                          checkpoint={"interval": 100, "async_save": False}, eval={"interval": 100, "batches": 1,
                                                                                   "sample_tokens": 0},
                          log={"interval": 1, "tensorboard": False})
    config = write_toml(tmp_path / "run.toml", tables)
    # glibc returns every freed block of 64 KiB or more to the system, so that resident memory follows the
    # live tensors (as bench/throughput.py's memory worker does) rather than what malloc keeps for reuse
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    job = subprocess.run([*torchrun(4, tmp_path / "logs", "--standalone"), "-m", "colossus.train", str(config),
                          "--out", "run"], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    check(job.returncode, job.stdout + job.stderr, tmp_path / "logs")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    peak = summary["measured"]["peak_memory_gib"] * 2**30
    print(f"training state {state / 2**30:.2f} GiB in all; rank 0's peak {peak / 2**30:.2f} GiB, cap {cap / 2**30:.2f} GiB")
    assert 0 < peak < cap
    assert all(math.isfinite(loss) for loss in run_losses(tmp_path / "run"))


# ------------------------------------------------------------------------ the dry run


@pytest.mark.parametrize("parallel, world", [
    ({"dp_shard": 8}, 8), ({"tp": 2, "ep": 2, "dp_shard": 4}, 16), ({"ep": 4, "dp_shard": 3}, 12),
    ({"tp": 2, "dp_replicate": 2, "dp_shard": 2, "zero": 2}, 8), ({"zero": 0, "ep": 2}, 8),
])
def test_dry_run_and_planner_agree_on_every_rank_zero(parallel: dict, world: int) -> None:
    """The planner's per-rank state (costmodel.state_bytes) is what the trainer builds, byte for byte, on
    layouts with uneven shards (3 ranks for 8 experts' hidden units), expert tensor parallelism, HSDP and
    plain data parallelism."""
    result = colossus("train", "--dry-run", "--world-size", str(world), "--json",
                      *[arg for key, value in parallel.items() for arg in ("--set", f"parallel.{key}={value}")],
                      "--set", "train.global_batch=48", "--set", "train.micro_batch=2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for field in ("param_bytes_per_rank_max", "grad_bytes_per_rank_max", "optimizer_bytes_per_rank_max"):
        assert report[field] == report["planner"][field], (field, report[field], report["planner"][field])
    assert report["world_size"] == world and report["param_bytes_per_rank_max"] > 0


def test_grok1_dry_run_on_the_planned_colossus_layout(tmp_path: Path) -> None:
    """`colossus plan --model grok-1 --cluster colossus-100k --write-config`, then `colossus train
    --dry-run` of that config at the planned world size: rank 0's parameter, gradient and AdamW bytes
    within 5% of the planner's (the planner counts FSDP's uneven chunks, so they agree exactly)."""
    planned = colossus("plan", "--model", "grok-1", "--cluster", "colossus-100k", "--json",
                       "--write-config", str(tmp_path / "g.toml"))
    assert planned.returncode == 0, planned.stderr
    world = json.loads(planned.stdout)["gpus_used"]
    result = colossus("train", str(tmp_path / "g.toml"), "--dry-run", "--world-size", str(world), "--json", timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    print(f"grok-1 dry run on {world:,} ranks built in {report['build_s']:.0f} s: "
          + ", ".join(f"{k} {report[k]:,} (planner {report['planner'][k]:,.0f})" for k in report["planner"]
                      if k in report))
    for field in ("param_bytes_per_rank_max", "optimizer_bytes_per_rank_max", "grad_bytes_per_rank_max"):
        assert report[field] == pytest.approx(report["planner"][field], rel=0.05), field
    layout = report["layout"]
    assert (layout["tp"], layout["ep"]) == (8, 8) or layout["tp"] * layout["ep"] > 1  # experts split both ways


@pytest.mark.parametrize("sets, world, words", [
    (["parallel.dp_shard=3"], 4, ["needs 3 processes", "4 were launched"]),
    (["parallel.tp=3"], 3, ["parallel.tp=3 does not divide model.n_heads=4"]),
    (["parallel.ep=3"], 3, ["parallel.ep=3 does not divide model.n_experts=8"]),
    (["model.ffn_dim=501", "parallel.tp=2"], 2, ["parallel.tp=2 does not divide model.ffn_dim=501"]),
])
def test_layout_errors_are_one_line(sets: list[str], world: int, words: list[str]) -> None:
    """A layout that does not fit the world size, tp not dividing the experts' width (ffn_dim), ep not
    dividing the experts: one line each, before anything is built."""
    result = colossus("train", "--dry-run", "--world-size", str(world), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and all(w in result.stderr for w in words), result.stderr
