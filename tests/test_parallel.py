"""Scaling out on CPU with gloo: layouts give the single-process losses, checkpoints reshard across
layouts, two torchrun agents act as two nodes, and bad layouts fail before any model is built."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from colossus.config import ModelConfig, config_from_dict
from colossus.errors import UserError
from colossus.layout import Layout, check_fits
from colossus.parallel.runtime import resolve_layout
from conftest import REPO, metrics_by_step, small_tables, write_toml
from ranks import finish as finish_ranks, finish_training, rank_stderr, start_training

STEPS = 10
LAYOUTS = {
    "dp_shard=4": {},
    "dp_replicate=2,dp_shard=2": {"dp_replicate": 2},
    "dp_shard=2,tp=2": {"tp": 2},
    "dp_shard=2,ep=2": {"ep": 2},
    "ep=4": {"ep": 4},
    "zero=0,ep=2": {"zero": 0, "ep": 2},  # plain data parallelism: 2 replicas x 2 expert ranks, nothing sharded
    "tp=2,ep=2": {"tp": 2, "ep": 2},  # expert tensor parallelism: experts over ep, each one's hidden units over tp
    "dp_shard=2,tp=2,ep=2": {"tp": 2, "ep": 2, "dp_shard": 2},  # the same under FSDP: 8 processes
}
PROCESSES = {"dp_shard=2,tp=2,ep=2": 8}  # the others: 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, Path]:
    """One single-process reference run and one 4-process run per layout, all with the same seed and
    global batch of 8 sequences in micro-batches of 2 (so every layout sees the same MoE batches)."""
    root = tmp_path_factory.mktemp("parallel")
    tables = small_tables(corpus_dir, root / "cache", train={"steps": STEPS, "micro_batch": 2},
                          checkpoint={"interval": 5, "keep": 2}, eval={"interval": STEPS, "sample_tokens": 0},
                          log={"interval": 1, "tensorboard": False})
    config = write_toml(root / "run.toml", tables)
    single = subprocess.run([sys.executable, "-m", "colossus.train", str(config), "--out", "single"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    result = {"single": root / "single", "config": config, "root": root}
    for name, keys in LAYOUTS.items():
        overrides = [arg for key, value in keys.items() for arg in ("--set", f"parallel.{key}={value}")]
        finish_training(start_training([str(config), "--out", name, *overrides], root, PROCESSES.get(name, 4)))
        result[name] = root / name
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs: dict[str, Path], layout: str) -> None:
    """Loss and gradient norm of each of the first 10 steps within 1e-4 relative of one process (the MoE
    balanced over the global batch, in micro-batches of 2: the single process splits each step in 4)."""
    reference, parallel = metrics_by_step(runs["single"]), metrics_by_step(runs[layout])
    assert sorted(parallel) == list(range(1, STEPS + 1))
    # sharded initialisation: every layout starts from the one process's model
    assert parallel[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-6)
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert parallel[step][key] == pytest.approx(reference[step][key], rel=1e-4), (step, key)
    assert reference[STEPS]["loss"] < reference[1]["loss"] - 0.5  # and the model does learn


@pytest.mark.parametrize("source, target", [("dp_shard=4", "single"), ("dp_shard=4", "dp_shard=2,tp=2"),
                                            ("dp_shard=2,tp=2,ep=2", "single"), ("dp_shard=2,tp=2,ep=2", "dp_shard=4")])
def test_checkpoint_reshards_across_layouts(runs: dict[str, Path], source: str, target: str) -> None:
    """Saved under one layout at step 5, resumed under another: steps 6-10 match within 1e-5 (DCP
    reshards every weight and moment, expert tensor parallel ones included)."""
    root = runs["root"]
    resumed = root / f"resumed-{source}-{target}"
    shutil.copytree(runs[source], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    if target == "single":
        result = subprocess.run([sys.executable, "-m", "colossus.train", str(runs["config"]), "--out", str(resumed)],
                                cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
        output = result.stdout
    else:
        overrides = [arg for key, value in LAYOUTS[target].items() for arg in ("--set", f"parallel.{key}={value}")]
        output = finish_training(start_training([str(runs["config"]), "--out", str(resumed), *overrides], root, 4))
    assert "resumed" in output and "from step 5" in output
    uninterrupted = metrics_by_step(runs[source])
    after = metrics_by_step(resumed)
    for step in range(6, STEPS + 1):
        assert after[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step


def test_two_agents_as_two_nodes(runs: dict[str, Path]) -> None:
    """The command `colossus launch --nodes 2` prints, run twice on this machine as two "nodes" (2
    processes each, c10d rendezvous on 127.0.0.1), gives the losses of one agent with 4 processes."""
    root, port = runs["root"], free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    printed = subprocess.run([sys.executable, "-m", "colossus", "launch", "--nodes", "2", "--procs-per-node", "2",
                              "--head", "127.0.0.1", "--port", str(port), "--", str(runs["config"]), "--out", "two-nodes"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    command = printed.stdout.strip().splitlines()[-1]
    assert command.startswith("torchrun ") and "--nnodes=2" in command and f"127.0.0.1:{port}" in command
    logs = [root / f"logs-agent-{agent}" for agent in range(2)]
    # This interpreter's torchrun (a virtual environment's bin/ need not be on PATH), with per-rank logs.
    launcher = f"{sys.executable} -m torch.distributed.run --log-dir {{}} --redirects 3 --tee 3 "
    agents = [subprocess.Popen(command.replace("torchrun ", launcher.format(log), 1),
                               shell=True, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for log in logs]
    for agent, log in zip(agents, logs):
        finish_ranks(agent, log)
    one_agent, two_agents = metrics_by_step(runs["dp_shard=4"]), metrics_by_step(root / "two-nodes")
    for step in range(1, STEPS + 1):
        assert two_agents[step]["loss"] == pytest.approx(one_agent[step]["loss"], rel=1e-6)


def test_launch_single_node_and_slurm_script() -> None:
    from colossus.launch import plan_launch

    assert plan_launch(1, 8, "x", 29500, ["--steps", "5"]).command() == \
        "torchrun --nproc-per-node=8 --standalone -m colossus.train --steps 5"
    with pytest.raises(UserError):
        plan_launch(1, 8, "x", 70000, [])
    # several agents that restart need a rendezvous store per attempt (pytorch/pytorch#135712)
    restarting = plan_launch(2, 8, "head", 29500, [], max_restarts=3).command()
    assert restarting.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ") and "--max-restarts=3" in restarting
    assert plan_launch(2, 8, "head", 29500, []).command().startswith("torchrun ")
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # parses as bash
    text = script.read_text()
    assert "--rdzv-backend=c10d" in text and "srun" in text and "--ntasks-per-node=1" in text
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text


# ------------------------------------------------------------------------ layout checks (no processes)


def layout_of(world: int, **parallel) -> Layout:
    config = config_from_dict({"parallel": parallel, "train": {"global_batch": 8, "micro_batch": 2}})
    return resolve_layout(config, world, "cpu")


def test_dp_shard_fills_the_world() -> None:
    # 8 ranks share a batch of 8: each rank's one sequence is its micro-batch (train.micro_batch = 2 is more)
    assert layout_of(8) == Layout(dp_shard=8, mbs=1, gbs=8, precision="fp32")
    assert layout_of(2).mbs == 2
    assert (layout_of(8, dp_replicate=2, ep=2).dp_replicate, layout_of(8, dp_replicate=2, ep=2).dp_shard) == (2, 2)
    layout = layout_of(4, dp_shard=2, ep=2)
    assert (layout.dp, layout.world_size) == (4, 4)  # ep ranks are data-parallel ranks too
    plain = layout_of(4, zero=0)  # ZeRO 0 shards nothing: the replicas take the rest of the world
    assert (plain.dp_replicate, plain.dp_shard, plain.dp) == (4, 1, 4)


@pytest.mark.parametrize("parallel, world, words", [
    (dict(dp_shard=2, tp=2), 8, ["dp_shard=2 x tp=2", "needs 4 processes", "8 were launched"]),
    (dict(tp=3), 4, ["tp=3", "needs 3 processes", "4 were launched"]),
    (dict(pp=2, ep=4, dp_shard=2), 1, ["needs 16 processes", "1 was launched"]),
])
def test_layout_world_mismatch_names_the_numbers(parallel: dict, world: int, words: list[str]) -> None:
    with pytest.raises(UserError) as error:
        layout_of(world, **parallel)
    assert all(word in str(error.value) for word in words), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("layout, model, key", [
    (Layout(ep=3, gbs=6, mbs=2), ModelConfig(), "n_experts"),
    (Layout(ep=2, gbs=8), ModelConfig(n_experts=1, top_k=1), "model.n_experts > 1"),
    (Layout(tp=8, gbs=8), ModelConfig(), "n_heads"),
    (Layout(dp_shard=3, gbs=8, mbs=8), ModelConfig(), "global_batch"),
    (Layout(dp_shard=2, gbs=12, mbs=4), ModelConfig(), "micro_batch"),
    (Layout(dp_shard=2, zero=0, gbs=8), ModelConfig(), "parallel.zero=0"),
    (Layout(cp=2, gbs=8), ModelConfig(seq_len=255), "seq_len"),
])
def test_layout_that_does_not_fit_the_model(layout: Layout, model: ModelConfig, key: str) -> None:
    with pytest.raises(UserError) as error:
        check_fits(layout, model)
    assert key in str(error.value)


def test_what_the_trainer_cannot_run_yet_is_one_line() -> None:
    """Keys the trainer cannot run yet are accepted by the config and refused before anything is built."""
    config = config_from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(UserError) as error:
        resolve_layout(config, 1, "cpu")
    assert "fp8 training" in str(error.value) and "\n" not in str(error.value)


def test_world_size_mismatch_fails_before_building(tmp_path: Path, corpus_dir: Path) -> None:
    """Under torchrun with 2 processes, a layout for 4 stops with one line per rank and no run folder."""
    config = write_toml(tmp_path / "run.toml", small_tables(corpus_dir, tmp_path / "cache"))
    process = start_training([str(config), "--out", "r", "--set", "parallel.dp_shard=4"], tmp_path, 2)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    logs = Path(process.args[process.args.index("--log-dir") + 1])
    # The first rank to stop makes torchrun stop the other, which may not have reached the check yet (a
    # stress round under CPU load found its log empty): every rank that reached it says exactly one line.
    said = [lines for lines in (rank_stderr(logs, rank).splitlines() for rank in range(2)) if lines]
    assert said, output[-2000:]
    for lines in said:
        assert len(lines) == 1 and lines[0].startswith("colossus train: error:"), lines
        assert "4 processes, but 2 were launched" in lines[0]
    assert "colossus/" not in output  # torchrun reports the failed workers, but no frame of ours shows
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_numbers(tmp_path: Path, corpus_dir: Path, mode: str) -> None:
    """Recomputing blocks in the backward changes memory, not results: losses match the plain run,
    and its checkpoints use the same parameter names (they load into a run without it)."""
    from colossus.train.trainer import train
    from conftest import small_config

    sections = dict(train={"steps": 6}, eval={"sample_tokens": 0}, log={"interval": 1, "tensorboard": False})
    plain = small_config(corpus_dir, tmp_path / "cache", **sections)
    checkpointed = small_config(corpus_dir, tmp_path / "cache", parallel={"recompute": mode, "recompute_every": 2},
                                **sections)
    train(plain, tmp_path / "plain")
    train(checkpointed, tmp_path / "ac")
    reference, recomputed = metrics_by_step(tmp_path / "plain"), metrics_by_step(tmp_path / "ac")
    for step in range(1, 7):
        assert recomputed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6)
    # Resume the AC run's step-4 checkpoint without AC: the names match, so it loads.
    shutil.rmtree(tmp_path / "ac" / "checkpoints" / "step-6")
    longer = small_config(corpus_dir, tmp_path / "cache", **{**sections, "train": {"steps": 6}})
    summary = train(longer, tmp_path / "ac")
    assert summary["step"] == 6 and metrics_by_step(tmp_path / "ac")[6]["loss"] == pytest.approx(reference[6]["loss"], rel=1e-6)


def test_recompute_keeps_less_for_the_backward() -> None:
    """What autograd saves for the backward of one step: selective recomputation (the attention core)
    keeps less than none, full (whole blocks) less still; recompute_every=2 recomputes half the blocks."""
    import torch

    from colossus.models.grok import build_model
    from colossus.parallel.parallelize import apply_recompute
    from colossus.train.loss import training_loss

    m = ModelConfig(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, n_experts=4, top_k=2,
                    vocab_size=256, seq_len=64)
    tokens = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))

    def saved_bytes(recompute: str, every: int = 1) -> int:
        model = build_model(m, seed=0)
        apply_recompute(model, recompute, every)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            training_loss(model(tokens[:, :-1]), tokens[:, 1:], m).total.backward()
        return total

    none, selective, full = saved_bytes("none"), saved_bytes("selective"), saved_bytes("full")
    half = saved_bytes("full", every=2)
    assert full < selective < none and full < half < none
