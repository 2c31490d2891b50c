"""The planner predicts this machine's own training steps, and every run checks it: at the start the
trainer asks the cost model about its own layout on this machine (the `colossus bench` profile, measured
when none is cached) and summary.json sets the measured step time beside the prediction. Here that is
held within 25% for several small single-process configurations (micro-batching, activation
recomputation, MoE and dense), and reported for a plan of two processes written by `colossus plan
--write-config` and run under torchrun. This is a real measurement on a shared machine: a case outside
the band is run once more with its profile measured again just before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from colossus.config import config_from_dict
from conftest import REPO, write_toml
from ranks import check, torchrun

MOE = dict(name="moe", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256, n_experts=4,
           top_k=2, vocab_size=256, seq_len=128)
DENSE = dict(name="dense", n_layers=2, d_model=256, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=1024,
             n_experts=1, top_k=1, vocab_size=256, seq_len=256, attn_softcap=0.0)
CASES = {
    "moe": (MOE, dict(global_batch=8, micro_batch=8), "none"),
    "moe-accumulate": (MOE, dict(global_batch=8, micro_batch=2), "none"),
    "moe-recompute": (MOE, dict(global_batch=8, micro_batch=8), "full"),
    "dense-fused-attention": (DENSE, dict(global_batch=4, micro_batch=4), "none"),
    "tiny-preset": (dict(preset="tiny"), dict(global_batch=4, micro_batch=2), "none"),
}


@pytest.fixture(scope="module")
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder of this module's own (XDG_CACHE_HOME): the runs measure the machine themselves."""
    return tmp_path_factory.mktemp("xdg")


def env_with(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache)}


@pytest.mark.parametrize("case", list(CASES))
def test_every_run_checks_the_planner(tmp_path: Path, corpus_dir: Path, profile_cache: Path, case: str) -> None:
    for attempt in (1, 2):
        if attempt == 2:  # this machine drifts 20-50% between minutes: measure it again, then run again
            for profile in (profile_cache / "colossus").glob("machine_profile-*.json"):
                profile.unlink()
        summary = run_case(tmp_path / f"attempt-{attempt}", corpus_dir, profile_cache, case)
        predicted, measured = summary["predicted"]["step_time_s"], summary["measured"]["step_time_s"]
        print(f"{case}: predicted {predicted * 1000:.1f} ms, measured {measured * 1000:.1f} ms "
              f"({measured / predicted - 1:+.1%})")
        if predicted == pytest.approx(measured, rel=0.25):
            break
    assert predicted == pytest.approx(measured, rel=0.25), (case, predicted, measured)
    assert summary["predicted"]["peak_memory_gib"] > 0 and summary["measured"]["peak_memory_gib"] > 0


def run_case(tmp_path: Path, corpus_dir: Path, cache: Path, case: str) -> dict:
    model, train, recompute = CASES[case]
    tmp_path.mkdir(parents=True)
    tables = {"model": model, "data": {"source": str(corpus_dir), "cache_dir": str(tmp_path / "cache")},
              "train": {"steps": 20, "lr": 1e-3, "warmup_steps": 1, "threads": 1, **train},
              "parallel": {"recompute": recompute},
              "checkpoint": {"interval": 1000, "async_save": False},
              "eval": {"interval": 1000, "batches": 1, "sample_tokens": 0}, "log": {"interval": 1, "tensorboard": False}}
    config = write_toml(tmp_path / "run.toml", tables)
    run = subprocess.run([sys.executable, "-m", "colossus.train", str(config), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, env=env_with(cache))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "planner check: step" in run.stdout
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_train_what_you_plan_on_two_processes(tmp_path: Path, corpus_dir: Path, profile_cache: Path) -> None:
    """`colossus plan --cluster local-2 --write-config`, then torchrun with 2 processes: the run's resolved
    config holds the plan's layout, and its summary the prediction and the measurement (reported, not
    held to a band: 2-process FSDP on gloo is a known gap of the cost model)."""
    env = env_with(profile_cache)
    planned = subprocess.run([sys.executable, "-m", "colossus", "plan", "--model", "tiny", "--cluster", "local-2",
                              "--write-config", str(tmp_path / "t.toml"), "--json"], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    layout = json.loads(planned.stdout)["layout"]
    config = tomllib.loads((tmp_path / "t.toml").read_text())
    # the test corpus, not the stdlib, so that tokenizing stays quick
    config_path = write_toml(tmp_path / "t.toml", {**config, "data": {"source": str(corpus_dir),
                                                                     "cache_dir": str(tmp_path / "cache")}})
    job = subprocess.run([*torchrun(2, tmp_path / "logs", "--standalone"), "-m", "colossus.train", str(config_path),
                          "--out", "r", "--steps", "20"], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    check(job.returncode, job.stdout + job.stderr, tmp_path / "logs")
    resolved = config_from_dict(tomllib.loads((tmp_path / "r" / "config.toml").read_text()))
    for key in ("dp_replicate", "dp_shard", "tp", "ep", "cp", "pp", "vpp", "pp_schedule", "zero", "recompute"):
        assert getattr(resolved.parallel, key) == layout[key], key
    assert (resolved.train.global_batch, resolved.train.micro_batch) == (layout["gbs"], layout["mbs"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    for side in ("predicted", "measured"):
        assert summary[side]["step_time_s"] > 0 and summary[side]["peak_memory_gib"] > 0, side
    predicted, measured = summary["predicted"]["step_time_s"], summary["measured"]["step_time_s"]
    print(f"2 processes ({layout['dp']} x dp, zero {layout['zero']}): predicted {predicted * 1000:.0f} ms, "
          f"measured {measured * 1000:.0f} ms ({measured / predicted - 1:+.0%})")


@pytest.mark.parametrize("model, constant", [(MOE, "OPS_PER_MOE_LAYER"), (DENSE, "OPS_PER_DENSE_LAYER")])
def test_op_counts_match_the_model(model: dict, constant: str) -> None:
    """The cost model's eager-op counts per layer are those of models/grok.py today (within 10%):
    profile a 2- and a 4-layer model's forward + backward and take the difference per layer."""
    import torch

    from colossus.models.grok import build_model
    from colossus.plan import costmodel
    from colossus.plan.profile import count_eager_ops
    from colossus.train.loss import training_loss

    counts = []
    for layers in (2, 4):
        m = config_from_dict({"model": {**model, "n_layers": layers}}).model
        net = build_model(m, torch.device("cpu"), seed=0)
        tokens = torch.randint(0, m.vocab_size, (2, m.seq_len))
        training_loss(net(tokens), tokens, m).total.backward()  # warm-up
        counts.append(count_eager_ops(lambda: training_loss(net(tokens), tokens, m).total.backward()))
    per_layer = (counts[1] - counts[0]) / 2
    assert per_layer == pytest.approx(getattr(costmodel, constant), rel=0.10)
    assert counts[0] - 2 * per_layer == pytest.approx(costmodel.OPS_PER_MICRO_BATCH, rel=0.25)
