"""The planner predicts this machine's own training steps: `colossus bench` measures the machine
(matmuls by shape, pointwise throughput, per-op cost), the cost model turns that into a step time,
and the trainer's measured step time must agree within 25% for several small models and layouts
(micro-batching, activation recomputation, MoE and dense). This is a real measurement on a shared
machine, so each prediction uses a profile measured just before its run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from colossus.config import config_from_dict
from colossus.plan.cluster import local_cluster
from colossus.plan.costmodel import Layout, eager_cpu_software, predict
from colossus.plan.profile import measure
from conftest import REPO, write_toml

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


@pytest.mark.parametrize("case", list(CASES))
def test_planner_predicts_this_machines_step_time(tmp_path: Path, corpus_dir: Path, case: str) -> None:
    # This machine's speed drifts 20-50% between minutes (other tenants): a case outside the band is
    # measured once more, profile and run, before it counts as a miss.
    for attempt in (1, 2):
        predicted, measured = predicted_and_measured_step(tmp_path / f"attempt-{attempt}", corpus_dir, case)
        if predicted == pytest.approx(measured, rel=0.25):
            break
    assert predicted == pytest.approx(measured, rel=0.25), (case, predicted, measured)


def predicted_and_measured_step(tmp_path: Path, corpus_dir: Path, case: str) -> tuple[float, float]:
    model, train, recompute = CASES[case]
    tmp_path.mkdir(parents=True)
    profile = measure(threads=1, quick=True, processes=())  # one thread, as the run below
    tables = {"model": model, "data": {"source": str(corpus_dir), "cache_dir": str(tmp_path / "cache")},
              "train": {"steps": 20, "lr": 1e-3, "warmup_steps": 1, "threads": 1, **train},
              "parallel": {"activation_checkpoint": recompute},
              "checkpoint": {"interval": 1000, "async_save": False},
              "eval": {"interval": 1000, "batches": 1, "sample_tokens": 0}, "log": {"interval": 1, "tensorboard": False}}
    config = write_toml(tmp_path / "run.toml", tables)
    run = subprocess.run([sys.executable, "-m", "colossus.train", str(config), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # steps 3-20 (the first ones warm up); a low percentile, like the profile's timings, skips the
    # moments another tenant of this machine takes a core (both sides then describe an unloaded machine)
    measured = float(np.percentile([r["step_time_s"] for r in records if "step_time_s" in r and r["step"] >= 3], 10))
    m = config_from_dict({"model": model}).model
    layout = Layout(dp=1, mbs=train["micro_batch"], gbs=train["global_batch"], zero=0, recompute=recompute)
    predicted = predict(m, local_cluster(profile, 1), layout, profile, software=eager_cpu_software(m)).step_time_s
    print(f"{case}: predicted {predicted * 1000:.1f} ms, measured {measured * 1000:.1f} ms ({predicted / measured - 1:+.1%})")
    return predicted, measured


@pytest.mark.parametrize("model, constant", [(MOE, "OPS_PER_MOE_LAYER"), (DENSE, "OPS_PER_DENSE_LAYER")])
def test_op_counts_match_the_model(model: dict, constant: str) -> None:
    """The cost model's eager-op counts per layer are those of models/grok.py today (within 10%):
    profile a 2- and a 4-layer model's forward + backward and take the difference per layer."""
    import torch

    from colossus.models.grok import build_model
    from colossus.plan import costmodel
    from colossus.plan.profile import count_eager_ops

    counts = []
    for layers in (2, 4):
        m = config_from_dict({"model": {**model, "n_layers": layers}}).model
        net = build_model(m, torch.device("cpu"), seed=0)
        tokens = torch.randint(0, m.vocab_size, (2, m.seq_len))
        net(tokens, tokens).loss.backward()  # warm-up
        counts.append(count_eager_ops(lambda: net(tokens, tokens).loss.backward()))
    per_layer = (counts[1] - counts[0]) / 2
    assert per_layer == pytest.approx(getattr(costmodel, constant), rel=0.10)
    assert counts[0] - 2 * per_layer == pytest.approx(costmodel.OPS_PER_MICRO_BATCH, rel=0.25)
